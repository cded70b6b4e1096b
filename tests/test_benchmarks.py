"""A smoke run of the benchmark suite: it runs, reports every variant, and its variants agree."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_json(module, tmp_path, *args, timeout=300):
    """Runs `python -m module *args --json PATH`; returns its stdout and the JSON it wrote."""
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
    return result.stdout, json.loads(out.read_text())


def test_bench_core_smoke_run(tmp_path):
    stdout, results = _run_json(
        "benchmarks.bench_core", tmp_path, "--blocks", "2", "--steps-per-block", "2"
    )
    assert "| trainop |" in stdout and "| baseline |" in stdout
    assert set(results["variants"]) == {"baseline", "trainop", "trainop_vars"}
    assert all(r["time_ratio"] > 0 for r in results["ratios"].values())
    # Same batches, same initial weights: the train ops did exactly the baseline's work.
    assert results["max_weight_diff"] == {"trainop": 0.0, "trainop_vars": 0.0}


def test_bench_features_smoke_run(tmp_path):
    stdout, results = _run_json(
        "benchmarks.bench_features", tmp_path, "--blocks", "2", "--steps-per-block", "2"
    )
    assert "| skip | " in stdout and "| summaries | " in stdout
    assert set(results["ratios"]) == {"skip", "summaries", "skip_summaries"}
    # On healthy batches the guard and the summaries change nothing that is trained.
    assert results["max_weight_diff"] == {"skip": 0.0, "summaries": 0.0, "skip_summaries": 0.0}


def test_benchmark_suite_quick_run(tmp_path):
    stdout, results = _run_json("benchmarks", tmp_path, "--quick", "--models", "tiny", timeout=600)
    assert "### tiny: batch 8" in stdout and "### Build time" in stdout
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
    steady = results["steady_state"]
    # One trace for the whole run, and every step counted once.
    assert steady["traces_after_warmup"] == steady["traces_at_end"] == 1
    assert steady["global_step"] == steady["steps"] == 200
    assert set(results["machine"]) >= {"cpu_count", "tensorflow"}


def test_benchmark_suite_rejects_bad_options():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--models", "huge"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--models must name some of tiny, mlp, conv" in result.stderr


def test_bench_scale_smoke_run(tmp_path):
    stdout, results = _run_json("benchmarks.bench_scale", tmp_path, "--blocks", "2")
    assert "### small: 784-64-64-10, batch 8" in stdout
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
    stdout, results = _run_json("benchmarks.bench_strategy", tmp_path, "--blocks", "2")
    assert "MirroredStrategy over 2 logical CPUs" in stdout
    assert set(results["variants"]) == {"baseline", "trainop", "skip", "clip"}
    # The same batches and weights: the train op did the hand-written distributed step's work,
    # with or without the skip guard; the clip changed the updates.
    assert results["max_weight_diff"]["trainop"] == results["max_weight_diff"]["skip"] == 0.0
    assert results["max_weight_diff"]["clip"] > 0.0
    assert all(r["time_ratio"] > 0 for r in results["ratios"].values())
