"""A smoke run of the benchmark suite: it runs, reports every variant, and its variants agree."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bench_core_smoke_run(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_core",
            "--blocks",
            "2",
            "--steps-per-block",
            "2",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| trainop |" in result.stdout and "| baseline |" in result.stdout
    results = json.loads(out.read_text())
    assert set(results["variants"]) == {"baseline", "trainop", "trainop_vars"}
    assert all(r["time_ratio"] > 0 for r in results["ratios"].values())
    # Same batches, same initial weights: the train ops did exactly the baseline's work.
    assert results["max_weight_diff"] == {"trainop": 0.0, "trainop_vars": 0.0}
