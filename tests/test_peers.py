"""The peers' own test files, run with trainop's functions in place of theirs.

TF-Slim's `tf_slim/training/training_test.py` and TF-Agents' `tf_agents/utils/eager_utils_test.py`
are the measure of "one changed import". They are read from the peers' wheels in
`$TRAINOP_PEER_WHEELS` (default: `.peers/` at the repository root), which `.ci/run` fills with
`pip download --no-deps`. Each run is a subprocess: TF-Slim's tests switch eager execution off
for the whole process.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
WHEELS = pathlib.Path(os.environ.get("TRAINOP_PEER_WHEELS", ROOT / ".peers"))
RUNNER = pathlib.Path(__file__).resolve().parent / "peers" / "run_peer_tests.py"

PEER_SUITES = {
    "tf_slim": (
        ["ClipGradsTest", "CreateTrainOpTest", "TrainBatchNormClassifierTest", "TrainTest"],
        15,
    ),
    "tf_agents": (["ClipGradsTest", "CreateTrainOpTest", "EagerUtilsTest"], 9),
}


@pytest.mark.parametrize(
    "peer, legacy_keras",
    [("tf_slim", "0"), ("tf_agents", "1"), ("tf_agents", "0")],
    ids=["tf_slim", "tf_agents-TF_USE_LEGACY_KERAS", "tf_agents-keras3"],
)
def test_peer_test_file_passes_with_trainop(peer, legacy_keras):
    if not list(WHEELS.glob(f"{peer}-*.whl")):
        message = f"no {peer} wheel in {WHEELS}: `bash .ci/run` downloads it"
        if os.environ.get("TRAINOP_REQUIRE_PEERS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    classes, expected_tests = PEER_SUITES[peer]
    result = subprocess.run(
        [sys.executable, str(RUNNER), peer, str(WHEELS), *classes],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_USE_LEGACY_KERAS": legacy_keras},
    )
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], result.stderr[-5000:]
    # tf.test.TestCase's deprecated `test_session` method is the only test skipped.
    assert all(name.startswith("test_session ") for name in report["skipped"])
    assert report["run"] - len(report["skipped"]) == expected_tests
