"""The `trainop` command (also `python -m trainop`): `trainop demo` and `trainop bench`.

A module beside the `trainop` package rather than inside it: importing anything from `trainop`
imports TensorFlow first, and `trainop --help` or a mistyped option should answer at once,
without TensorFlow's start-up messages.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

EXIT_BAD_OPTION = 2
DEMO_STEPS = {"digits": 1500, "cartpole": 25_000}


class OneLineErrorParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line, and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_OPTION, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0: {value}")
    return value


def _parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog="trainop",
        description="trainop: the training step of a TensorFlow model in one call. "
        "`trainop demo` trains a model end to end; `trainop bench` runs the benchmark suite.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{demo,bench}", required=True)
    demo = commands.add_parser(
        "demo",
        help="train a real model end to end with create_train_op and train",
        description="Trains a real model end to end with trainop.create_train_op and "
        "trainop.train, on data that needs no download, and leaves TensorBoard logs, "
        "checkpoints and a plot (training.png) in its output directory. digits (default): a "
        "small convolutional network on scikit-learn's 8x8 digits, to at least 95%% test "
        "accuracy in under a minute on 2 CPU cores. cartpole: a DQN on Gymnasium's "
        "CartPole-v1, to an average return of at least 195. Run again with the same "
        "--outdir, it resumes from the last checkpoint.",
    )
    demo.add_argument("--task", choices=sorted(DEMO_STEPS), default="digits")
    demo.add_argument(
        "--outdir", help="output directory (default: ./trainop-demo-TASK)", default=None
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="global step to train to (default: 1500 for digits, 25000 for cartpole)",
    )
    demo.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--no-progress", action="store_true", help="no progress bar (off anyway without a tty)"
    )
    commands.add_parser(
        "bench",
        help="run the benchmark suite and print its table",
        description="Runs the benchmark suite (benchmarks/ of a source checkout) and prints "
        "its table; the options are the suite's, see `trainop bench --help`.",
        add_help=False,
    )
    return parser


def _demo(args: argparse.Namespace) -> int:
    from trainop import demo

    outdir = os.path.abspath(args.outdir or f"trainop-demo-{args.task}")
    run = demo.digits if args.task == "digits" else demo.cartpole
    result = run(
        outdir,
        steps=args.steps or DEMO_STEPS[args.task],
        seed=args.seed,
        progress=False if args.no_progress else None,
    )
    value = f"{result.value:.1%}" if result.metric == "test accuracy" else f"{result.value:.1f}"
    target = f"{result.target:.0%}" if result.metric == "test accuracy" else f"{result.target:.0f}"
    signal_numbers = {"SIGINT": 2, "SIGTERM": 15}
    if result.stopped_by in signal_numbers:
        print(f"Stopped by {result.stopped_by} at global step {result.global_step}.")
    print(
        f"{result.metric}: {value} at global step {result.global_step} "
        f"(stated target: at least {target}: {'reached' if result.reached else 'NOT reached'})"
    )
    print(
        f"Output in {result.outdir}: TensorBoard logs (tensorboard --logdir {result.outdir}), "
        f"checkpoints (ckpt-*), plot {result.plot}"
    )
    if result.stopped_by in signal_numbers:
        return 128 + signal_numbers[result.stopped_by]
    return 0 if result.reached else 1


def _bench(argv: Sequence[str]) -> int:
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "suite.py").is_file():
        print(
            "trainop bench: error: the benchmark suite is in the benchmarks/ directory of a "
            "source checkout of trainop, and this trainop is installed without it: clone the "
            "repository and `pip install -e .` there.",
            file=sys.stderr,
        )
        return EXIT_BAD_OPTION
    sys.path.insert(0, str(root))
    from benchmarks import options

    args = options.parse(argv, prog="trainop bench", parser_class=OneLineErrorParser)
    from benchmarks import suite

    suite.main(args=args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns its exit status."""
    # TensorFlow's C++ start-up messages, unless the user asks for them.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    return _demo(args)


def console_main() -> Any:
    """The console script's entry point."""
    sys.exit(main())
