"""The `trainop` command: its help, its bad options, and `trainop demo` end to end."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _trainop(*args, timeout=300, module=False):
    """Runs the `trainop` console script's code (or `python -m trainop`) with `args`."""
    launcher = (
        ["-m", "trainop"]
        if module
        else ["-c", "from trainop_cli import console_main; console_main()"]
    )
    return subprocess.run(
        [sys.executable, *launcher, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def test_help_says_what_each_command_does():
    top = _trainop("--help")
    demo = _trainop("demo", "--help")
    bench = _trainop("bench", "--help")
    assert top.returncode == demo.returncode == bench.returncode == 0
    assert "demo" in top.stdout and "bench" in top.stdout
    assert "8x8 digits" in demo.stdout and "CartPole" in demo.stdout and "--outdir" in demo.stdout
    assert "--models" in bench.stdout and "--quick" in bench.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--task", "mnist"], "argument --task: invalid choice: 'mnist'"),
        (["demo", "--steps", "0"], "argument --steps: must be at least 1: 0"),
        (["demo", "--steps", "ten"], "argument --steps: not an integer: 'ten'"),
        (["demo", "--seed", "-1"], "argument --seed: must be at least 0: -1"),
        (["bench", "--blocks-scale", "nan"], "--blocks-scale must be positive and finite"),
        (["demo", "--colour"], "unrecognized arguments: --colour"),
        (["train"], "argument {demo,bench}: invalid choice: 'train'"),
        ([], "the following arguments are required: {demo,bench}"),
        (["bench", "--models", "huge"], "--models must name some of tiny, mlp, conv"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_status_2(args, message):
    result = _trainop(*args, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert result.stderr.startswith("trainop")


def test_python_dash_m_trainop_is_the_same_command():
    result = _trainop("demo", "--task", "mnist", module=True, timeout=120)
    assert result.returncode == 2
    assert "argument --task: invalid choice: 'mnist'" in result.stderr.splitlines()[-1]


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
    assert "already reaches it: not training further" in again.stdout
    assert line in again.stdout
