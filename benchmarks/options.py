"""The suite's command-line options, parsed without importing TensorFlow.

`python -m benchmarks` and `trainop bench` both parse with `parse`, so that `--help` and a
mistyped option answer at once.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

MODEL_NAMES = ("tiny", "mlp", "conv")
SECTION_NAMES = ("speed", "fit", "build", "steady")
DESCRIPTION = "trainop's benchmark suite: speed, build time and steady state, in one process."
EPILOG = (
    "Each table is printed as soon as it is measured; a progress bar goes to stderr when it is "
    "a terminal. Ctrl-C prints the tables measured so far, with the rows of the one under way. "
    "Exit status: 0 done; 2 nothing ran: a bad option, or TensorFlow is not installed (the "
    "message names the pip install to run); 130 stopped by Ctrl-C."
)


def build_parser(
    prog: str = "python -m benchmarks",
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """The suite's argument parser, without the checks across options that `parse` adds."""
    parser = parser_class(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument(
        "--models",
        metavar="NAMES",
        default=",".join(MODEL_NAMES),
        help="the speed section's models, comma-separated, of tiny, mlp, conv (default: all)",
    )
    parser.add_argument(
        "--sections",
        metavar="NAMES",
        default=",".join(SECTION_NAMES),
        help="the sections to run, comma-separated, of speed (a table per model), fit (Keras's "
        "fit step with trainop's and without), build (build time), steady (steady state); "
        "always in that order (default: all)",
    )
    parser.add_argument(
        "--blocks-scale",
        metavar="F",
        type=float,
        default=1.0,
        help="scales every model's number of timed blocks (default 1: about 5 minutes)",
    )
    parser.add_argument(
        "--steady-steps",
        metavar="N",
        type=int,
        default=10_000,
        help="steps of the eager train op in the steady-state section (default %(default)s)",
    )
    parser.add_argument(
        "--build-variables",
        metavar="N",
        type=int,
        default=1000,
        help="variables of the model whose train op's build is timed (default %(default)s)",
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=int,
        default=1,
        help="TensorFlow's intra-op and inter-op thread counts (default %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: a few blocks, 200 steady-state steps, 50 variables",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results to this file")
    return parser


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _writable_file(path: str) -> bool:
    """Whether a file can be written at `path` (checked before the suite runs, not after)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return False
    return os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)


def parse(
    argv: Sequence[str] | None,
    prog: str = "python -m benchmarks",
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> argparse.Namespace:
    """Parses the suite's options; exits with status 2 on a bad one.

    Returns:
      The options, with `models` and `sections` as lists of names and `--quick` applied.
    """
    parser = build_parser(prog, parser_class)
    args = parser.parse_args(argv)
    received_models, received_sections = args.models, args.sections
    args.models, args.sections = _names(args.models), _names(args.sections)
    checks = [
        (
            args.models and set(args.models) <= set(MODEL_NAMES),
            f"--models must name some of {', '.join(MODEL_NAMES)}; received {received_models!r}",
        ),
        (
            args.sections and set(args.sections) <= set(SECTION_NAMES),
            f"--sections must name some of {', '.join(SECTION_NAMES)}; "
            f"received {received_sections!r}",
        ),
        (
            0 < args.blocks_scale < math.inf,
            f"--blocks-scale must be positive and finite; received {args.blocks_scale}",
        ),
        (
            args.steady_steps >= 10,
            f"--steady-steps must be at least 10; received {args.steady_steps}",
        ),
        (
            args.build_variables >= 10,
            f"--build-variables must be at least 10; received {args.build_variables}",
        ),
        (args.threads >= 1, f"--threads must be at least 1; received {args.threads}"),
        (
            args.json is None or _writable_file(args.json),
            f"--json {args.json}: not a file that can be written (a directory, or in a "
            "directory that does not exist or cannot be written in)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    if args.quick:
        args.blocks_scale, args.steady_steps, args.build_variables = 0.02, 200, 50
    return args
