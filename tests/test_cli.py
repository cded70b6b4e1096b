"""The `trainop` command: its help, its bad options, missing extras, and `trainop demo`."""

from __future__ import annotations

import io
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import trainop_cli
from trainop._demos import common, digits

ROOT = pathlib.Path(__file__).resolve().parent.parent
WITHOUT_MODULES = ROOT / "tests" / "programs" / "without_modules.py"


def _trainop(*args, timeout=300, module=False, missing=()):
    """Runs the `trainop` console script's code (or `python -m trainop`) with `args`.

    `missing`: top-level modules that the command finds not installed.
    """
    launcher = (
        ["-m", "trainop"]
        if module
        else ["-c", "from trainop_cli import console_main; console_main()"]
    )
    if missing:
        launcher = [str(WITHOUT_MODULES), ",".join(missing), *launcher]
    return subprocess.run(
        [sys.executable, *launcher, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def _start_trainop(*args):
    """Starts the `trainop` console script's code with `args`, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-c", "from trainop_cli import console_main; console_main()", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def test_help_says_what_each_command_does():
    top = _trainop("--help")
    demo = _trainop("demo", "--help")
    bench = _trainop("bench", "--help")
    assert top.returncode == demo.returncode == bench.returncode == 0
    assert "demo" in top.stdout and "bench" in top.stdout
    assert "8x8 digits" in demo.stdout and "CartPole" in demo.stdout and "--outdir" in demo.stdout
    # A description is shown as written: its percent sign is not doubled.
    assert "95% test accuracy" in demo.stdout.replace("\n", " ") and "%%" not in demo.stdout
    assert "--models" in bench.stdout and "--quick" in bench.stdout
    for help_text in (top.stdout, demo.stdout, bench.stdout):
        help_text = " ".join(help_text.split())
        assert "Exit status: 0 done" in help_text and "2 nothing ran" in help_text


@pytest.mark.parametrize(
    "args, prog, message",
    [
        (["demo", "--task", "mnist"], "trainop demo", "argument --task: invalid choice: 'mnist'"),
        (["demo", "--steps", "0"], "trainop demo", "argument --steps: must be at least 1: 0"),
        (["demo", "--steps", "-5"], "trainop demo", "argument --steps: must be at least 1: -5"),
        (["demo", "--steps", "ten"], "trainop demo", "argument --steps: not an integer: 'ten'"),
        (["demo", "--seed", "-1"], "trainop demo", "argument --seed: must be at least 0: -1"),
        (["bench", "--blocks-scale", "nan"], "trainop bench", "--blocks-scale must be positive"),
        (["demo", "--colour"], "trainop demo", "unrecognized arguments: --colour"),
        (["demo", "--bogus"], "trainop demo", "unrecognized arguments: --bogus"),
        (["--bogus"], "trainop", "unrecognized arguments: --bogus"),
        (["--bogus", "demo"], "trainop", "unrecognized arguments: --bogus"),
        (["train"], "trainop", "argument {demo,bench}: invalid choice: 'train'"),
        ([], "trainop", "the following arguments are required: {demo,bench}"),
        (["bench", "--models", "huge"], "trainop bench", "--models must name some of tiny"),
        (["bench", "--json", "/dev/null/x.json"], "trainop bench", "--json /dev/null/x.json: "),
        (["demo", "--fit", "--task", "cartpole"], "trainop demo", "--fit trains the digits"),
        (["demo", "--outdir", "/dev/null"], "trainop demo", "--outdir /dev/null: it is a file"),
        (["demo", "--outdir", "/dev/null/x"], "trainop demo", "/dev/null is a file, not a"),
    ],
)
def test_a_bad_option_is_one_line_naming_it_and_exit_status_2(args, prog, message):
    result = _trainop(*args, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert result.stderr.startswith(f"{prog}: error: ")
    assert result.stderr.endswith(f" (see {prog} --help)\n")


def test_python_dash_m_trainop_is_the_same_command():
    result = _trainop("demo", "--task", "mnist", module=True, timeout=120)
    assert result.returncode == 2
    assert "argument --task: invalid choice: 'mnist'" in result.stderr.splitlines()[-1]


def test_python_dash_m_trainop_answers_help_without_tensorflow():
    expected = _trainop("--help", timeout=60)
    for module in (False, True):
        top = _trainop("--help", module=module, missing=["tensorflow"], timeout=60)
        bench = _trainop("bench", "--help", module=module, missing=["tensorflow"], timeout=60)
        assert (top.returncode, top.stdout, top.stderr) == (0, expected.stdout, "")
        assert bench.returncode == 0 and "--quick" in bench.stdout and bench.stderr == ""


TENSORFLOW_AND_DEMO = (
    "the digits demo needs TensorFlow, scikit-learn and matplotlib, which are not installed: "
    "run `pip install 'trainop[cpu,demo]'` (or `trainop[tensorflow,demo]`, `trainop[gpu,demo]`)"
)


@pytest.mark.parametrize(
    "args, missing, module, error",
    [
        (
            ["demo"],
            ["sklearn"],
            False,
            "trainop demo: error: the digits demo needs scikit-learn, which is not installed: "
            "run `pip install 'trainop[demo]'`",
        ),
        (
            ["demo"],
            ["matplotlib"],
            False,
            "trainop demo: error: the digits demo needs matplotlib, which is not installed: "
            "run `pip install 'trainop[demo]'`",
        ),
        (
            ["demo", "--task", "cartpole"],
            ["gymnasium"],
            False,
            "trainop demo: error: the CartPole demo needs Gymnasium, which is not installed: "
            "run `pip install 'trainop[demo]'`",
        ),
        (
            ["demo"],
            ["tensorflow", "keras", "sklearn", "matplotlib", "gymnasium", "tqdm"],
            False,
            f"trainop demo: error: {TENSORFLOW_AND_DEMO}",
        ),
        (
            ["demo"],
            ["tensorflow", "keras", "sklearn", "matplotlib", "gymnasium", "tqdm"],
            True,
            f"trainop demo: error: {TENSORFLOW_AND_DEMO}",
        ),
        (
            ["bench", "--quick"],
            ["tensorflow", "keras"],
            False,
            "trainop bench: error: the benchmark suite needs TensorFlow, which is not installed: "
            "run `pip install 'trainop[cpu]'` (or `trainop[tensorflow]`, `trainop[gpu]`)",
        ),
        (
            ["bench", "--quick"],
            ["tensorflow", "keras"],
            True,
            "trainop bench: error: the benchmark suite needs TensorFlow, which is not installed: "
            "run `pip install 'trainop[cpu]'` (or `trainop[tensorflow]`, `trainop[gpu]`)",
        ),
    ],
)
def test_a_missing_extra_is_one_line_naming_it_before_anything_runs(
    args, missing, module, error, tmp_path
):
    outdir = tmp_path / "out"
    if args[0] == "demo":
        args = [*args, "--outdir", str(outdir)]
    result = _trainop(*args, module=module, missing=missing, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == error + "\n"
    assert not outdir.exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_demo_needs_tqdm_only_for_its_progress_bar(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with pytest.raises(SystemExit) as stopped:
        trainop_cli.main(["demo", "--outdir", str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert terminal.getvalue() == (
        "trainop demo: error: the digits demo needs tqdm, which is not installed: "
        "run `pip install 'trainop[demo]'`\n"
    )
    # No bar, no tqdm needed: the command is ready to run.
    assert callable(trainop_cli._prepare(["demo", "--no-progress"]))
    assert not (tmp_path / "out").exists()


def test_a_rerun_of_the_digits_demo_says_that_it_resumed(tmp_path):
    outdir = str(tmp_path / "digits")
    first, again, further = [], [], []
    digits.run(outdir, steps=20, progress=False, say=first.append)
    result = digits.run(outdir, steps=20, progress=False, say=again.append)
    assert not any("Resuming" in line for line in first)
    checkpoint = os.path.join(outdir, "ckpt-20")
    assert again[1:] == [
        f"Resuming from {checkpoint} at global step 20: already trained; evaluating."
    ]
    assert result.global_step == 20
    result = digits.run(outdir, steps=30, progress=False, say=further.append)
    assert further[1:] == [
        f"Resuming from {checkpoint} at global step 20: training on to global step 30."
    ]
    assert result.global_step == 30


def test_the_plot_shows_accuracy_in_percent_and_marks_a_short_series():
    from matplotlib import pyplot as plt

    loss = [(step, 1.0 / step) for step in range(10, 1510, 10)]
    digits_figure = common.training_figure(
        {"train/loss": loss, "eval/accuracy": [(100, 0.9), (200, 0.955)]},
        "eval/accuracy",
        "test accuracy",
        percent=True,
    )
    cartpole_figure = common.training_figure(
        {"eval/return": [(1000, 150.0), (2000, 200.0)]}, "eval/return", "average return"
    )
    try:
        loss_axes, accuracy_axes = digits_figure.axes
        (accuracy,) = accuracy_axes.get_lines()
        assert list(accuracy.get_ydata()) == pytest.approx([90.0, 95.5])
        assert accuracy_axes.get_title() == "test accuracy (%)"
        assert accuracy.get_marker() == "o"
        # 150 points: a line without markers.
        assert loss_axes.get_lines()[0].get_marker() == "None"
        (returns,) = cartpole_figure.axes[1].get_lines()
        assert list(returns.get_ydata()) == [150.0, 200.0] and returns.get_marker() == "o"
        assert cartpole_figure.axes[1].get_title() == "average return"
    finally:
        plt.close(digits_figure)
        plt.close(cartpole_figure)


def test_ctrl_c_stops_the_demo_and_it_says_so_once(tmp_path):
    outdir = tmp_path / "digits"
    process = _start_trainop("demo", "--steps", "1000000", "--outdir", str(outdir), "--no-progress")
    try:
        deadline = time.monotonic() + 120
        # The loop writes its event file just before it installs its signal handlers.
        while not list(outdir.glob("events.out.tfevents.*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-3000:]
    assert (stdout + stderr).count("Stopped by SIGINT at global step") == 1
    assert "test accuracy: " in stdout and list(outdir.glob("ckpt-*.index"))


def test_demo_reaches_its_stated_accuracy_and_leaves_logs_checkpoint_and_plot(tmp_path):
    outdir = tmp_path / "demo"
    result = _trainop("demo", "--outdir", str(outdir), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8x8 digits" in result.stdout
    accuracy_line = next(line for line in result.stdout.splitlines() if "test accuracy" in line)
    assert "at global step 1500" in accuracy_line and "reached" in accuracy_line
    accuracy = float(accuracy_line.split("test accuracy: ")[1].split("%")[0]) / 100
    assert accuracy >= 0.95
    assert f"Output in {outdir}" in result.stdout
    assert list(outdir.glob("events.out.tfevents.*"))
    assert (outdir / "ckpt-1500.index").is_file()
    png = (outdir / "training.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    again = _trainop("demo", "--outdir", str(outdir), "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    # Resumed at its end: nothing left to train, the same model evaluated again.
    assert (
        f"Resuming from {outdir / 'ckpt-1500'} at global step 1500: already trained; evaluating."
        in again.stdout
    )
    assert accuracy_line in again.stdout


def test_cartpole_demo_reaches_its_stated_return_and_does_not_train_past_it(tmp_path):
    outdir = tmp_path / "cartpole"
    result = _trainop("demo", "--task", "cartpole", "--seed", "0", "--outdir", str(outdir))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if "average return" in line)
    assert "at least 195: reached" in line
    average = float(line.split("average return: ")[1].split()[0])
    assert average >= 195
    assert (outdir / "training.png").is_file() and list(outdir.glob("ckpt-*.index"))

    again = _trainop("demo", "--task", "cartpole", "--outdir", str(outdir))
    assert again.returncode == 0
    assert "at least 195: not training further." in again.stdout
    assert line in again.stdout


def test_bench_interrupted_prints_what_it_measured_and_exits_130():
    """`trainop bench` passes the suite's Ctrl-C status through: the build table, measured
    before the signal, is printed, and the steady-state run under way is marked interrupted."""
    process = _start_trainop(
        "bench",
        "--sections",
        "build,steady",
        "--build-variables",
        "10",
        "--steady-steps",
        "100000000",
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            # The build table ends with a blank line after its rows: steady state is running.
            if not line.strip() and lines[-2].startswith("|"):
                break
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    stdout = "".join(lines) + rest
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "### Build time, 10 variables" in stdout
    assert "Interrupted (Ctrl-C) during" in stdout


def test_the_fit_demo_skips_its_nan_batch_and_resumes(tmp_path):
    outdir = tmp_path / "fit"
    first = _trainop("demo", "--fit", "--steps", "200", "--outdir", str(outdir), "--no-progress")
    assert first.returncode in (0, 1), first.stderr[-3000:]  # 1: 200 steps miss the target
    skipped = "Batches skipped by the guard: 1 (the NaN batch); the weights are all finite: True."
    assert skipped in first.stdout
    assert "at global step 199 " in first.stdout  # 200 batches, one of them skipped
    assert (outdir / "training.png").is_file() and list((outdir / "backup").glob("ckpt-*"))
    # Resumed at its end: nothing left to train, the guard's count restored with the model.
    again = _trainop("demo", "--fit", "--steps", "200", "--outdir", str(outdir), "--no-progress")
    assert skipped in again.stdout and "at global step 199 " in again.stdout
    accuracy = [line for line in first.stdout.splitlines() if line.startswith("test accuracy")]
    assert accuracy and accuracy[0] in again.stdout
    assert _trainop("demo", "--task", "cartpole", "--fit").returncode == 2
