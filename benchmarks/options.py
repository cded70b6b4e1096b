"""The suite's command-line options, parsed without importing TensorFlow.

`python -m benchmarks` and `trainop bench` both parse with `parse`, so that `--help` and a
mistyped option answer at once.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

MODEL_NAMES = ("tiny", "mlp", "conv")
DESCRIPTION = "trainop's benchmark suite: speed, build time and steady state, in one process."


def parse(
    argv: Sequence[str] | None,
    prog: str = "python -m benchmarks",
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> argparse.Namespace:
    """Parses the suite's options; exits with status 2 on a bad one.

    Returns:
      The options, with `models` as a list of names and `--quick` applied.
    """
    parser = parser_class(prog=prog, description=DESCRIPTION)
    parser.add_argument(
        "--models", default=",".join(MODEL_NAMES), help="comma-separated, of tiny, mlp, conv"
    )
    parser.add_argument(
        "--blocks-scale",
        type=float,
        default=1.0,
        help="scales every model's number of timed blocks (default 1: about 5 minutes)",
    )
    parser.add_argument("--steady-steps", type=int, default=10_000)
    parser.add_argument("--build-variables", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: a few blocks, 200 steady-state steps, 50 variables",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results to this file")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if (
        unknown
        or not args.models
        or not (0 < args.blocks_scale < math.inf)
        or min(args.steady_steps, args.build_variables) < 10
        or args.threads < 1
    ):
        parser.error(
            f"--models must name some of {', '.join(MODEL_NAMES)}; --blocks-scale must be "
            "positive and finite; --steady-steps and --build-variables at least 10; --threads "
            "at least 1"
        )
    if args.quick:
        args.blocks_scale, args.steady_steps, args.build_variables = 0.02, 200, 50
    return args
