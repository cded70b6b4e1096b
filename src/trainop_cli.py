"""The `trainop` command (also `python -m trainop`): `trainop demo` and `trainop bench`.

A module beside the `trainop` package rather than inside it: importing anything from `trainop`
imports TensorFlow first, and `trainop --help`, a mistyped option or a missing extra should
answer at once, without TensorFlow's start-up messages. Each command parses its options and
checks (with `importlib.util.find_spec`, importing nothing) that what it needs is installed
before it imports TensorFlow or trains anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

# The exit statuses. 2 is argparse's for a bad option; a missing extra shares it because in both
# cases nothing ran and the command line or the install needs fixing, which a script can tell
# from 1, a demo that ran to the end and missed its stated target.
EXIT_TARGET_MISSED = 1
EXIT_CANNOT_START = 2
SIGNAL_NUMBERS = {"SIGINT": 2, "SIGTERM": 15}
EXIT_STATUSES = (
    "Exit status: 0 done (for the demo: its stated target reached); 1 the demo missed its "
    "stated target; 2 nothing ran: a bad option, or something the command needs is not "
    "installed (the message names the pip install to run); 130 or 143 stopped by Ctrl-C or "
    "SIGTERM, after saving a checkpoint."
)
DEMO_STEPS = {"digits": 1500, "cartpole": 25_000}


@dataclasses.dataclass(frozen=True)
class Requirement:
    """A module a command imports, and the extra of trainop that installs it."""

    module: str
    name: str
    extra: str


TENSORFLOW = Requirement("tensorflow", "TensorFlow", "cpu")
TQDM = Requirement("tqdm", "tqdm", "demo")
DEMO_REQUIREMENTS = {
    "digits": [
        TENSORFLOW,
        Requirement("sklearn", "scikit-learn", "demo"),
        Requirement("matplotlib", "matplotlib", "demo"),
    ],
    "cartpole": [
        TENSORFLOW,
        Requirement("gymnasium", "Gymnasium", "demo"),
        Requirement("matplotlib", "matplotlib", "demo"),
    ],
}
DEMO_NAMES = {"digits": "the digits demo", "cartpole": "the CartPole demo"}
# The extras that install TensorFlow, the first one recommended (as `import trainop` does).
TENSORFLOW_EXTRAS = ("cpu", "tensorflow", "gpu")


class OneLineErrorParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line, and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CANNOT_START, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class CommandParser(OneLineErrorParser):
    """The parser of a command (`trainop demo`): its own errors name it, unknown options too.

    argparse hands a subcommand's unknown options up to the top parser, whose error would name
    `trainop` instead of `trainop demo`.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: an integer of at least `minimum`, one message for any other."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {value}")
        return value

    return parse


def _parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog="trainop",
        description="trainop: the training step of a TensorFlow model in one call. "
        "`trainop demo` trains a model end to end; `trainop bench` runs the benchmark suite.",
        epilog=EXIT_STATUSES,
    )
    # Not required=True: argparse would then report the missing command before an unknown
    # option (`trainop --bogus`); main() reports a missing command itself.
    commands = parser.add_subparsers(
        dest="command", metavar="{demo,bench}", parser_class=CommandParser
    )
    demo = commands.add_parser(
        "demo",
        help="train a real model end to end with create_train_op and train",
        # A description is shown as written (argparse formats only one holding "%(prog)"), so
        # its percent sign is not doubled, unlike those of `help=`.
        description="Trains a real model end to end with trainop.create_train_op and "
        "trainop.train, on data that needs no download, and leaves TensorBoard logs, "
        "checkpoints and a plot (training.png) in its output directory. digits (default): a "
        "small convolutional network on scikit-learn's 8x8 digits, to at least 95% test "
        "accuracy in under a minute on 2 CPU cores. cartpole: a DQN on Gymnasium's "
        "CartPole-v1, to an average return of at least 195. Run again with the same "
        "--outdir, it resumes from the last checkpoint. Needs the demo extra: "
        "pip install 'trainop[demo]'.",
        epilog=EXIT_STATUSES,
    )
    demo.add_argument(
        "--task",
        choices=sorted(DEMO_STEPS),
        default="digits",
        help="digits (default): a convolutional network on 8x8 digits; cartpole: a DQN",
    )
    demo.add_argument(
        "--outdir",
        help="output directory (default: ./trainop-demo-TASK, ./trainop-demo-digits-fit with "
        "--fit)",
        default=None,
    )
    demo.add_argument(
        "--steps",
        type=_int_at_least(1),
        default=None,
        help="global step to train to (default: 1500 for digits, 25000 for cartpole)",
    )
    demo.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed (default 0)")
    demo.add_argument(
        "--no-progress", action="store_true", help="no progress bar (off anyway without a tty)"
    )
    demo.add_argument(
        "--fit",
        action="store_true",
        help="digits only: train with Keras's model.fit and trainop.keras.compile instead, "
        "with a NaN batch injected, which the numerics guard skips",
    )
    commands.add_parser(
        "bench",
        help="run the benchmark suite and print its table",
        description="Runs the benchmark suite (benchmarks/ of a source checkout) and prints "
        "its table; the options are the suite's, see `trainop bench --help`.",
        add_help=False,
    )
    return parser


def missing_message(purpose: str, requirements: Sequence[Requirement]) -> str | None:
    """What to install for `purpose`, in one sentence; None if everything is installed.

    Args:
      purpose: what needs the requirements ('the digits demo').
      requirements: the modules it imports.

    Returns:
      A sentence naming the missing modules and the `pip install 'trainop[...]'` that installs
      them, or None.

    Example:
      >>> missing_message("the demo", [Requirement("no_such_module", "Nothing", "demo")])
      "the demo needs Nothing, which is not installed: run `pip install 'trainop[demo]'`"
    """
    missing = [r for r in requirements if importlib.util.find_spec(r.module) is None]
    if not missing:
        return None
    names = [r.name for r in missing]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    extras = [TENSORFLOW_EXTRAS[0]] if TENSORFLOW in missing else []
    extras += sorted({r.extra for r in missing} - set(TENSORFLOW_EXTRAS))
    install = f"run `pip install 'trainop[{','.join(extras)}]'`"
    if TENSORFLOW in missing:
        others = [",".join([tf_extra, *extras[1:]]) for tf_extra in TENSORFLOW_EXTRAS[1:]]
        install += f" (or `trainop[{others[0]}]`, `trainop[{others[1]}]`)"
    verb = "is" if len(missing) == 1 else "are"
    return f"{purpose} needs {listed}, which {verb} not installed: {install}"


def _cannot_start(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_CANNOT_START)


def _prepare(argv: Sequence[str]) -> Callable[[], int]:
    """Parses `argv` and checks what the command needs; returns the command to run.

    Exits with status 0 after --help, and with status 2 (printing one line) on a bad option or
    when something to install is missing. Imports neither TensorFlow nor `trainop`.
    """
    if argv and argv[0] == "bench":
        return _prepare_bench(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("the following arguments are required: {demo,bench}")
    if args.fit and args.task != "digits":
        _cannot_start("trainop demo", "--fit trains the digits demo only (see trainop demo --help)")
    problem = _unwritable_directory(args.outdir)
    if problem is not None:
        _cannot_start(
            "trainop demo", f"--outdir {args.outdir}: {problem} (see trainop demo --help)"
        )
    requirements = list(DEMO_REQUIREMENTS[args.task])
    if not args.no_progress and sys.stderr.isatty():
        requirements.append(TQDM)
    message = missing_message(DEMO_NAMES[args.task], requirements)
    if message is not None:
        _cannot_start("trainop demo", message)
    return lambda: _demo(args)


def _unwritable_directory(path: str | None) -> str | None:
    """Why `path` cannot be the output directory (a file, or under one it cannot write in), in
    a few words; None if it can (or if it is None: the default, in the working directory)."""
    if path is None:
        return None
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "it is a file, not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else "it is not writable"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"it cannot be created in {parent} (not writable)"
    return None


def _demo(args: argparse.Namespace) -> int:
    from trainop._demos import cartpole, digits

    default_outdir = f"trainop-demo-{args.task}" + ("-fit" if args.fit else "")
    outdir = os.path.abspath(args.outdir or default_outdir)
    run = digits.run if args.task == "digits" else cartpole.run
    if args.fit:
        run = digits.run_fit
    result = run(
        outdir,
        steps=args.steps or DEMO_STEPS[args.task],
        seed=args.seed,
        progress=False if args.no_progress else None,
    )
    value = f"{result.value:.1%}" if result.metric == "test accuracy" else f"{result.value:.1f}"
    target = f"{result.target:.0%}" if result.metric == "test accuracy" else f"{result.target:.0f}"
    # A signal's "Stopped by SIGINT at global step N." is the loop's warning: not printed again.
    print(
        f"{result.metric}: {value} at global step {result.global_step} "
        f"(stated target: at least {target}: {'reached' if result.reached else 'NOT reached'})"
    )
    print(
        f"Output in {result.outdir}: TensorBoard logs (tensorboard --logdir {result.outdir}), "
        f"checkpoints, plot {result.plot}"
    )
    if result.stopped_by in SIGNAL_NUMBERS:
        return 128 + SIGNAL_NUMBERS[result.stopped_by]
    return 0 if result.reached else EXIT_TARGET_MISSED


def _prepare_bench(argv: Sequence[str]) -> Callable[[], int]:
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "suite.py").is_file():
        _cannot_start(
            "trainop bench",
            "the benchmark suite is in the benchmarks/ directory of a source checkout of "
            "trainop, and this trainop is installed without it: clone the repository and "
            "`pip install -e .` there.",
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import options

    args = options.parse(argv, prog="trainop bench", parser_class=OneLineErrorParser)
    message = missing_message("the benchmark suite", [TENSORFLOW])
    if message is not None:
        _cannot_start("trainop bench", message)

    def bench() -> int:
        from benchmarks import command

        return command.run(args)  # 130 after Ctrl-C, the tables measured so far printed

    return bench


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns its exit status (see `EXIT_STATUSES`)."""
    # TensorFlow's C++ start-up messages, unless the user asks for them.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    run = _prepare(list(sys.argv[1:] if argv is None else argv))
    return run()


def console_main() -> Any:
    """The console script's entry point."""
    sys.exit(main())


def check_python_dash_m() -> None:
    """`python -m trainop`: parses and checks the command line before TensorFlow is imported.

    `python -m trainop` imports the package `trainop`, and so TensorFlow, before it runs
    `trainop/__main__.py`: the package calls this first, so that --help, a bad option and a
    missing extra answer as they do for `trainop` (at once, and without TensorFlow installed),
    and TensorFlow starts quietly. Does nothing unless Python is locating `trainop` for `-m`
    (while it does, `sys.argv[0]` is '-m').
    """
    if sys.argv[:1] != ["-m"] or len(sys.orig_argv) < len(sys.argv):
        return
    # The module named after -m: what precedes the module's own arguments.
    module = sys.orig_argv[-len(sys.argv)].removeprefix("-m")
    if module in ("trainop", "trainop.__main__"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        _prepare(sys.argv[1:])
