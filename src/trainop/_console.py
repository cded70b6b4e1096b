"""What the loop shows and hears: its progress bar, and SIGTERM or Ctrl-C as a request to stop."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger("trainop")


class StopRequest:
    """Turns SIGTERM and a first Ctrl-C into a request to stop after the current step."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if name == "SIGINT":
                raise KeyboardInterrupt  # Ctrl-C after a first signal: stop now
            return
        self.signal_name = name
        logger.warning("%s received: stopping after this step and saving a checkpoint.", name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            # Python delivers signals to the main thread only.
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


# --- Progress ----------------------------------------------------------------------------------


class Progress:
    """A tqdm bar of the global step, with the loss, refreshed twice a second at most."""

    def __init__(self, enabled: bool | None, start: int, total: int | None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                logger.warning("Progress bar off: tqdm is not installed (pip install tqdm).")
            else:
                self._bar = tqdm(
                    total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr
                )
                self._logging = _logging_above_the_bar()
                self._logging.__enter__()
        self._last_refresh = 0.0

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def update(
        self,
        step: int,
        loss: Callable[[], float | None],
        metrics: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Moves the bar to `step`; at most twice a second, reads `loss()` and `metrics()` (a
        train op's `StepMetrics.result()`) for the postfix: the only host reads they cost."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        now = time.monotonic()
        if now - self._last_refresh >= 0.5:
            self._last_refresh = now
            postfix = {}
            value = loss()
            if value is not None:
                postfix["loss"] = f"{value:.4g}"
            if metrics is not None:
                numbers = metrics()
                postfix["grad_norm"] = f"{float(numbers['gradient_norm']):.4g}"
                if "skipped_steps" in numbers:
                    postfix["skipped"] = int(numbers["skipped_steps"])
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._logging.__exit__(None, None, None)
            self._bar.close()


def _logging_above_the_bar() -> contextlib.AbstractContextManager:
    """While the bar is drawn, the loop's log lines (a signal heard, a step skipped) are
    written above it rather than onto its line: through tqdm's own redirection, of the root
    logger's console handlers if it has any (its format kept), else of trainop's logger
    (whose lines Python's last-resort handler would print)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    root_prints = any(
        isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
        for h in logging.root.handlers
    )
    return logging_redirect_tqdm(loggers=[logging.root if root_prints else logger])
