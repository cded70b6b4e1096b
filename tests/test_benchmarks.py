"""The benchmarks: smoke runs (they run, report every variant, and the variants agree), and the
suite's command (a table printed as soon as it is measured, a progress bar only on a terminal,
Ctrl-C keeping what was measured).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
from types import SimpleNamespace

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# benchmarks/ is a directory of the checkout, not an installed package.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import options, suite  # noqa: E402

# What tqdm draws: a carriage return between updates, and its rate.
PROGRESS_BAR_SIGNS = ("\r", "it/s")


def _run_json(module, tmp_path, *args, timeout=300):
    """Runs `python -m module *args --json PATH`; returns the process and the JSON it wrote."""
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", module, *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(out.read_text())


def test_bench_core_smoke_run(tmp_path):
    result, results = _run_json(
        "benchmarks.bench_core", tmp_path, "--blocks", "2", "--steps-per-block", "2"
    )
    assert "| trainop |" in result.stdout and "| baseline |" in result.stdout
    assert set(results["variants"]) == {"baseline", "trainop", "trainop_vars"}
    assert all(r["time_ratio"] > 0 for r in results["ratios"].values())
    # Same batches, same initial weights: the train ops did exactly the baseline's work.
    assert results["max_weight_diff"] == {"trainop": 0.0, "trainop_vars": 0.0}


FEATURES_THAT_CHANGE_NOTHING = [
    "metrics",
    "ema",
    "keras_use_ema",
    "skip",
    "summaries",
    "skip_summaries",
    "skip_spikes",
    "skip_updates",
]


def test_bench_features_smoke_run(tmp_path):
    result, results = _run_json(
        "benchmarks.bench_features", tmp_path, "--blocks", "2", "--steps-per-block", "2"
    )
    assert "| skip | " in result.stdout and "| summaries | " in result.stdout
    assert set(results["ratios"]) == {
        "skip",
        "summaries",
        "skip_summaries",
        "skip_spikes",
        "skip_updates",
        "agc",
        "centralization",
        "lr_multipliers",
        "ema",
        "keras_use_ema",
        "metrics",
        "accumulate",
        "accumulate_counted",
    }
    # On healthy batches the guard and the summaries change nothing that is trained.
    # (The transforms change the update: their weights differ, by design.)
    assert {k: results["max_weight_diff"][k] for k in FEATURES_THAT_CHANGE_NOTHING} == {
        "metrics": 0.0,
        "ema": 0.0,
        "keras_use_ema": 0.0,
        "skip": 0.0,
        "summaries": 0.0,
        "skip_summaries": 0.0,
        "skip_spikes": 0.0,
        "skip_updates": 0.0,
    }


def test_benchmark_suite_quick_run(tmp_path):
    result, results = _run_json("benchmarks", tmp_path, "--quick", "--models", "tiny", timeout=600)
    headings = [line for line in result.stdout.splitlines() if line.startswith("### ")]
    assert [h.split(",")[0].split(":")[0] for h in headings] == [
        "### tiny",
        "### fit",
        "### fit",
        "### Build time",
        "### Steady state",
    ]
    # Neither stdout nor stderr is a terminal: no progress bar on either.
    for sign in PROGRESS_BAR_SIGNS:
        assert sign not in result.stdout and sign not in result.stderr
    variants = results["speed"]["tiny"]["variants"]
    expected = {
        "baseline",
        "baseline_xla",
        "trainop",
        "trainop_all",
        "trainop_v1adam",
        "trainop_graph",
    }
    assert expected <= set(variants)
    assert variants["baseline"]["time_ratio"] == 1.0
    assert all(v["median_s_per_step"] > 0 for v in variants.values())
    for per_call in (1, 16):
        fit = results["fit"][f"steps_per_execution_{per_call}"]["variants"]
        assert set(fit) == {"baseline", "trainop", "trainop_skip"}
        assert fit["baseline"]["time_ratio"] == 1.0
        assert all(v["median_s_per_step"] > 0 for v in fit.values())
    steady = results["steady_state"]
    # One trace for the whole run, and every step counted once.
    assert steady["traces_after_warmup"] == steady["traces_at_end"] == 1
    assert steady["global_step"] == steady["steps"] == 200
    assert set(results["machine"]) >= {"cpu_count", "tensorflow"}


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--models", "huge", "--models must name some of tiny, mlp, conv; received 'huge'"),
        ("--sections", "speed,x", "--sections must name some of speed, fit, build, steady"),
    ],
    ids=["models", "sections"],
)
def test_benchmark_suite_rejects_bad_options(option, value, message):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", option, value],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_every_benchmark_suite_option_has_a_help_text():
    parser = options.build_parser()
    options_without_help = [
        action.option_strings
        for action in parser._actions
        if action.option_strings and not (action.help and action.help.strip())
    ]
    assert options_without_help == []


@pytest.fixture(scope="module")
def interrupted_suite(tmp_path_factory):
    """`python -m benchmarks` stopped by SIGINT once its first table is out.

    Two sections: build time (10 variables, quick), then a steady state of 10^8 steps, which
    would run for hours: the first table can only come while the suite is still running. Stdout
    is a pipe, read line by line; stderr is a terminal (a pseudo-terminal), where the progress
    bar goes.
    """
    out = tmp_path_factory.mktemp("interrupted") / "results.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "--sections",
        "build,steady",
        "--build-variables",
        "10",
        "--steady-steps",
        str(10**8),
        "--json",
        str(out),
    ]
    terminal, stderr = pty.openpty()
    # A terminal 100 columns wide (a new pseudo-terminal has 0, where tqdm draws nothing).
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    os.close(stderr)
    drawn = []

    def read_terminal():
        while True:
            try:
                data = os.read(terminal, 65536)
            except OSError:  # the process has exited
                return
            if not data:
                return
            drawn.append(data)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    # Not a time limit on the suite: only a hung process's end.
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        first_table = []
        for line in process.stdout:
            first_table.append(line)
            # A table ends with a blank line after its rows.
            if line == "\n" and first_table[-2:-1] and first_table[-2].startswith("|"):
                break
        running_after_first_table = process.poll() is None
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate()
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
    reader.join(timeout=30)
    os.close(terminal)
    return SimpleNamespace(
        first_table="".join(first_table),
        running_after_first_table=running_after_first_table,
        stdout="".join(first_table) + rest,
        stderr=b"".join(drawn).decode(errors="replace"),
        returncode=process.returncode,
        json=json.loads(out.read_text()) if out.exists() else None,
    )


def test_benchmark_suite_prints_each_table_as_soon_as_it_is_measured(interrupted_suite):
    # The build-time table was read whole while the steady state, hours long, was under way.
    assert "### Build time, 10 variables\n" in interrupted_suite.first_table
    assert "| trainop graph (build) |" in interrupted_suite.first_table
    assert "Steady state" not in interrupted_suite.first_table
    assert interrupted_suite.running_after_first_table


def test_benchmark_suite_keeps_what_it_measured_on_ctrl_c(interrupted_suite):
    assert interrupted_suite.returncode == 130, interrupted_suite.stderr[-3000:]
    assert "Traceback" not in interrupted_suite.stderr
    assert "KeyboardInterrupt" not in interrupted_suite.stderr
    stdout = interrupted_suite.stdout
    # The finished table, then the one under way, marked, then one line saying so.
    assert stdout.startswith("trainop benchmarks: ")
    assert interrupted_suite.first_table in stdout
    partial = stdout.split(interrupted_suite.first_table, 1)[1]
    assert partial.startswith(f"### Steady state, {10**8} steps of the eager train op")
    assert "(interrupted after " in partial.splitlines()[0]
    assert stdout.rstrip("\n").splitlines()[-1] == (
        "Interrupted (Ctrl-C) during steady state: the tables above are what was measured."
    )
    # --json holds the same: the finished section, the partial one, and where it stopped.
    results = interrupted_suite.json
    assert results["interrupted_during"] == "steady state"
    assert "trainop graph (build)" in results["build_time"]
    assert results["steady_state"]["steps"] == 10**8
    assert "speed" not in results


def test_benchmark_suite_draws_its_progress_bar_on_a_terminal_stderr_only(interrupted_suite):
    # Drawn before the first table, which comes once its bar is closed.
    assert "[1/2] build time" in interrupted_suite.stderr
    assert "it/s" in interrupted_suite.stderr
    for sign in PROGRESS_BAR_SIGNS:
        assert sign not in interrupted_suite.stdout


def _fake_table(record, interrupted):
    heading = f"### {record['name']}" + (" (interrupted)" if interrupted else "")
    return "\n".join([heading, *record["rows"]])


def test_an_interrupted_section_prints_its_rows_so_far(capsys):
    def complete(record, bar):
        record["rows"] += ["| a | 1 |", "| b | 2 |"]
        bar.update()

    def interrupted(record, bar):
        record["rows"].append("| c | 3 |")
        raise KeyboardInterrupt

    def never_started(record, bar):
        raise AssertionError("a section after the interrupted one ran")

    sections = [
        suite.Section(name, (name,), {"name": name, "rows": []}, measure, _fake_table)
        for name, measure in [
            ("first", complete),
            ("second", interrupted),
            ("third", never_started),
        ]
    ]
    results = {}
    assert suite.run_sections(sections, results) is sections[1]
    assert capsys.readouterr().out == (
        "### first\n| a | 1 |\n| b | 2 |\n\n### second (interrupted)\n| c | 3 |\n\n"
    )
    assert results == {
        "first": {"name": "first", "rows": ["| a | 1 |", "| b | 2 |"]},
        "second": {"name": "second", "rows": ["| c | 3 |"]},
    }


def test_ctrl_c_lost_inside_a_section_still_stops_it_at_its_next_update(capsys):
    """TensorFlow's C++ code can clear a KeyboardInterrupt raised in Python it calls back into:
    the section is stopped at its next progress update all the same."""
    updates = []

    def swallows_the_interrupt(record, bar):
        # What a C++ caller that clears the error does.
        with contextlib.suppress(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        for _ in range(5):
            record["rows"].append(f"| {len(updates)} |")
            bar.update()
            updates.append(1)

    section = suite.Section(
        "lost", ("lost",), {"name": "lost", "rows": []}, swallows_the_interrupt, _fake_table
    )
    handler_before = signal.getsignal(signal.SIGINT)
    assert suite.run_sections([section], {}) is section
    assert updates == []
    assert capsys.readouterr().out == "### lost (interrupted)\n| 0 |\n\n"
    # The handler from before is back.
    assert signal.getsignal(signal.SIGINT) is handler_before


def test_partial_tables_say_how_far_they_got():
    variants = [
        suite.Variant(name, name + " step", lambda: None, lambda: None)
        for name in ("baseline", "trainop")
    ]
    times = {"baseline": [1e-3, 2e-3, 9.0], "trainop": [2e-3, 2e-3]}
    speed = {
        "blocks": 150,
        "steps_per_block": 10,
        "rounds_done": 2,
        "variants": suite.speed_summaries(variants, times, rounds=2),
        "notes": [],
    }
    table = suite.speed_table(suite.MODELS["tiny"], speed, interrupted=True).splitlines()
    assert table[0] == "### tiny: batch 8, 150 blocks x 10 steps (interrupted: 2 of them measured)"
    # Only the rounds done by every variant: the baseline's third block is left out.
    assert table[-2].startswith("| baseline | 1.500 | 667 |")
    assert table[-1].startswith("| trainop | 2.000 | 500 |")
    assert suite.speed_summaries(variants, times, rounds=0) == {}

    steady = {"steps": 10_000, "warmup_steps": 1000, "steps_done": 300}
    assert suite.steady_state_table(steady, interrupted=True).endswith(
        "Interrupted during the warm-up of 1000 steps."
    )
    steady.update(
        steps_done=3000,
        global_step=3000,
        rss_mb_after_warmup=100.0,
        rss_mb_at_end=101.5,
        traces_after_warmup=1,
        traces_at_end=1,
    )
    assert suite.steady_state_table(steady, interrupted=True).splitlines()[-1] == (
        "RSS 100.0 MB after warm-up, 101.5 MB after 3000 steps (growth +1.5 MB); traces 1 after "
        "warm-up, 1 after 3000 steps; global step 3000."
    )


def test_bench_scale_smoke_run(tmp_path):
    result, results = _run_json("benchmarks.bench_scale", tmp_path, "--blocks", "2")
    assert "### small: 784-64-64-10, batch 8" in result.stdout
    for model in ("mlp", "small"):
        variants = results["results"][model]
        assert set(variants) == {
            "baseline",
            "baseline_jit",
            "trainop",
            "jit",
            "jit_unchecked",
            "k16",
            "k16_jit",
        }
        # Unrolled or looped, the same steps: the same weights as the hand-written step.
        assert variants["trainop"]["max_weight_diff_vs_baseline"] == 0.0
        assert variants["k16"]["max_weight_diff_vs_baseline"] == 0.0
        assert all(v["speedup_vs_baseline"] > 0 for v in variants.values())


def test_bench_strategy_smoke_run(tmp_path):
    result, results = _run_json("benchmarks.bench_strategy", tmp_path, "--blocks", "2")
    assert "MirroredStrategy over 2 logical CPUs" in result.stdout
    assert set(results["variants"]) == {"baseline", "trainop", "skip", "clip"}
    # The same batches and weights: the train op did the hand-written distributed step's work,
    # with or without the skip guard; the clip changed the updates.
    assert results["max_weight_diff"]["trainop"] == results["max_weight_diff"]["skip"] == 0.0
    assert results["max_weight_diff"]["clip"] > 0.0
    assert all(r["time_ratio"] > 0 for r in results["ratios"].values())
