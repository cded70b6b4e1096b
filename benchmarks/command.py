"""The suite's command, `python -m benchmarks` and `trainop bench`.

The options are parsed before the suite, and so TensorFlow, is imported: `--help` and a
mistyped option answer at once. Ctrl-C exits with status 130 and no traceback, whenever it
comes (the suite itself prints what it has measured).
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Sequence

from benchmarks import options

# As a shell reports a process stopped by SIGINT.
EXIT_INTERRUPTED = 128 + signal.SIGINT.value


def run(args: argparse.Namespace) -> int:
    """Imports the suite (and TensorFlow) and runs it with the parsed options `args`.

    Returns:
      The exit status: 0, or 130 when interrupted.
    """
    try:
        from benchmarks import suite

        return suite.main(args=args)
    except KeyboardInterrupt:
        # Outside a section (importing TensorFlow, writing --json): no table to add.
        print("Interrupted (Ctrl-C).", flush=True)
        return EXIT_INTERRUPTED


def main(
    argv: Sequence[str] | None,
    prog: str = "python -m benchmarks",
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> int:
    """Parses the command line `argv` and runs the suite.

    Args:
      argv: the options, without the program's name.
      prog: the command's name in `--help` and errors.
      parser_class: the `argparse.ArgumentParser` subclass to parse with.

    Returns:
      The exit status: 0, or 130 when interrupted (2 for a bad option, by `SystemExit`).
    """
    return run(options.parse(argv, prog=prog, parser_class=parser_class))
