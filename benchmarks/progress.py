"""The suite's progress bar: tqdm on stderr when stderr is a terminal, else nothing.

Piped or redirected output, and the tests, see only the tables on stdout. tqdm comes with
trainop's `demo` and `loop` extras; without it the suite runs without a bar.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is in the extras the suite is run with
    tqdm = None
else:
    # No monitor thread waking up during the timed blocks.
    tqdm.monitor_interval = 0


class NoBar:
    """What the suite calls on a bar, doing nothing: the stand-in when tqdm is missing."""

    def update(self, n: int = 1) -> None:
        pass

    def reset(self, total: int | None = None) -> None:
        pass

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        pass


@functools.cache
def _say_tqdm_is_missing() -> None:
    print("(no progress bar: `pip install tqdm` for one)", file=sys.stderr, flush=True)


def bar(description: str) -> Any:
    """A progress bar named `description`, to use as a context manager; cleared when done.

    Its total is unknown until the section calls `reset(total=...)`.
    """
    if tqdm is None:
        if sys.stderr.isatty():
            _say_tqdm_is_missing()
        return NoBar()
    # disable=None: shown only when stderr is a terminal.
    return tqdm(desc=description, file=sys.stderr, disable=None, leave=False, dynamic_ncols=True)


class InterruptCheckedBar:
    """A bar whose every call first raises KeyboardInterrupt if Ctrl-C was pressed.

    Python raises KeyboardInterrupt in whatever Python code runs when SIGINT lands. When that
    code was called from TensorFlow's C++ (a trace, a conversion of an argument), the C++ side
    can clear the exception and carry on, and the interrupt would be lost: the signal handler of
    `interrupts_recorded` also records it, and this bar raises it again at the section's next
    progress update.
    """

    def __init__(self, bar: Any, interrupted: Callable[[], bool]) -> None:
        self._bar = bar
        self._interrupted = interrupted

    def _check(self) -> None:
        if self._interrupted():
            raise KeyboardInterrupt

    def update(self, n: int = 1) -> None:
        self._check()
        self._bar.update(n)

    def reset(self, total: int | None = None) -> None:
        self._check()
        self._bar.reset(total=total)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self._check()
        self._bar.set_postfix_str(text, refresh=refresh)


@contextlib.contextmanager
def interrupts_recorded() -> Iterator[Callable[[], bool]]:
    """Within: SIGINT raises KeyboardInterrupt, as by default, and is also recorded.

    Yields:
      A function of no arguments: whether SIGINT came since the block was entered. Pass it to
      `InterruptCheckedBar`.
    """
    received = []

    def handle(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, previous)
