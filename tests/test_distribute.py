"""tf.distribute: the train op on several replicas against one device on the whole batch.

Each program runs in a child process (the logical devices, or the cluster, must be set before
TensorFlow starts) and prints one line per case; each case is checked by a test of its own,
so that a failure names its case. The programs run once per module.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import socket
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import pytest

PROGRAMS = pathlib.Path(__file__).parent / "programs"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
FAMILIES = ["v1", "keras", "tf_keras", "tf_keras_legacy"]


class _Run(NamedTuple):
    lines: dict[tuple[str, str], list[str]]
    returncode: int
    stderr: str


def _fields(run: _Run, key: tuple[str, str]) -> list[str]:
    assert key in run.lines, (
        f"the program printed no line for {' '.join(key)!r} (exit code {run.returncode}); "
        f"its stderr ends: {run.stderr[-3000:]}"
    )
    return run.lines[key]


# --- MirroredStrategy over two logical CPUs (programs/mirrored_child.py) -----------------------

# The global steps of 4 batches: a NaN or an overflow in one replica's half of a batch skips
# that step on both replicas; accumulation applies every second batch.
_STEPS = {
    "plain": 4,
    "skip": 3,
    "clip": 4,
    "skip_clip": 3,
    "accumulate": 2,
    "lr_multipliers": 4,
    "ema": 3,
    "metrics": 3,
}
_STEPS_KERAS_ONLY = {
    "jit": 4,
    "jit_skip": 3,
    "jit_clip": 4,
    "overflow": 3,
    "overflow_clip": 3,
    "large": 4,
    "summaries": 4,
}
# The optimizer's own clipping options (Keras 3; global_clipnorm for tf_keras too).
_OPTIMIZER_CLIPPING = ["global_clipnorm", "clipnorm", "clipvalue"]
_LOSS_CASES = {
    "reduce_mean": 3,
    "keras_ops_mean": 3,
    "keras_object": 3,
    "keras_mse_object": 3,
    "compute_average_loss": 3,
    "compute_average_loss_global": 3,
    "keras_object_regularized": 3,
    "tf_keras_object_unreduced": 3,
    "reduce_mean_batch_remainder": 3,
    "reduce_mean_skip": 3,
    "keras_object_clip": 3,
    "keras_object_jit": 3,
    "keras_object_summaries": 3,
}
_REFUSED = [
    "tf_keras_default_reduction",
    "zero_argument_loss",
    "inside_run_check_numerics",
    "inside_run_accumulation_steps",
    "inside_run_learning_rate_multipliers",
    "inside_run_moving_average",
    "inside_run_step_metrics",
    "called_inside_run",
    "variables_to_train",
    "global_step",
    "xla",
    "spike_threshold",
    "check_updates",
    "counted_loss",
    "create_train_step",
    "graph",
]
MIRRORED_CASES = [
    *(("step", f"{case}/{family}") for case in _STEPS for family in FAMILIES),
    *(("step", f"{case}/keras") for case in _STEPS_KERAS_ONLY),
    *(("step", f"optimizer_{option}/keras") for option in _OPTIMIZER_CLIPPING),
    ("step", "optimizer_global_clipnorm/tf_keras"),
    ("step", "optimizer_global_clipnorm/tf_keras_legacy"),
    *(("loss", case) for case in _LOSS_CASES),
    *(("steps_per_call", case) for case in ["plain", "skip", "clip", "jit"]),
    *(("inside_run", case) for case in ["plain", "overflow"]),
    *(("sparse", case) for case in ["plain", "skip", "clip", "accumulate"]),
    *(("raise", family) for family in FAMILIES),
    ("loop", "resumed"),
    *(("refused", name) for name in _REFUSED),
]


@pytest.fixture(scope="module")
def mirrored() -> _Run:
    result = subprocess.run(
        [sys.executable, str(PROGRAMS / "mirrored_child.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    lines = {}
    for line in result.stdout.splitlines():
        group, case, *fields = line.split()
        lines[(group, case)] = fields
    return _Run(lines, result.returncode, result.stderr)


def test_two_replicas_report_every_case_and_no_other(mirrored):
    assert sorted(mirrored.lines) == sorted(MIRRORED_CASES)
    assert mirrored.returncode == 0, mirrored.stderr[-3000:]


@pytest.mark.parametrize("key", MIRRORED_CASES, ids="-".join)
def test_two_replicas_make_the_update_of_one_device_on_the_whole_batch(mirrored, key):
    group, case = key
    fields = _fields(mirrored, key)
    assert not fields[0].startswith("error:"), f"{fields[0]}: {mirrored.stderr[-3000:]}"
    if group == "step":
        # The train op on two replicas against the train op on one device (plain SGD): the
        # update of one device on the whole batch, up to the order of float additions. The
        # clip sees the gradient of the whole batch, not each replica's.
        weight_diff, loss_diff, steps, one_device_steps, *extra = fields
        name = case.split("/")[0]
        assert float(weight_diff) < 1e-6 and float(loss_diff) < 1e-6
        # The global step counts each step once, not once per replica, and only if applied.
        expected_steps = {**_STEPS, **_STEPS_KERAS_ONLY}.get(name, 4)  # optimizer_*: 4
        assert int(steps) == int(one_device_steps) == expected_steps
        if name.startswith("overflow"):
            # The loss-scale optimizer halved its scale once, as on one device.
            assert extra == ["16384.0", "16384.0"]
        elif name == "large":
            # Large finite gradients are applied, as without a strategy: the scale stays.
            assert extra == ["32768.0", "32768.0"]
        elif name == "summaries":
            # 4 steps of loss, gradient norm, learning rate and a norm per gradient, each
            # written once (not once per replica) and as one device writes it.
            assert extra[0] == "20" and float(extra[1]) < 1e-6
        else:
            assert extra == []
    elif group == "loss":
        # However the loss is written, on batches split 2+1, 3+2 and 1+0: the weights and
        # losses of plain SGD on one device in float64 (up to float32 rounding), and each step
        # counted once. The empty share neither raises (the default check) nor is skipped.
        weight_diff, loss_diff, steps, batches, *summaries = fields
        assert float(weight_diff) < 1e-6 and float(loss_diff) < 1e-6
        assert int(steps) == int(batches) == _LOSS_CASES[case]
        if case.endswith("_summaries"):
            # `train/loss` and `train/global_gradient_norm` read one device's, not half.
            assert float(summaries[0]) < 1e-6
        else:
            assert summaries == []
    elif group == "steps_per_call":
        # Each replica given its share of the 2 batches of a call.
        weight_diff, loss_diff, steps, one_device_steps = fields
        assert float(weight_diff) < 1e-6 and float(loss_diff) < 1e-6
        assert int(steps) == int(one_device_steps) == (3 if case == "skip" else 4)
    elif group == "inside_run":
        # create_train_step inside the user's strategy.run (TF-Agents' agents): the global step
        # counted once; a LossScaleOptimizer skips when the second replica alone overflows.
        weight_diff, loss_diff, *rest = fields
        assert float(weight_diff) < 1e-6 and float(loss_diff) < 1e-6
        if case == "plain":
            assert rest == ["4", "4"]
        else:
            assert rest == ["3", "3", "16384.0", "16384.0"]
    elif group == "sparse":
        # IndexedSlices gradients (an embedding lookup), summed by the optimizer or by the
        # train op.
        weight_diff, steps, one_device_steps = fields
        assert float(weight_diff) < 1e-6
        assert int(steps) == int(one_device_steps) == (2 if case == "accumulate" else 4)
    elif group == "raise":
        # The default check raises on a NaN in the second replica's half of the second batch,
        # before anything changes (the update op's target too): the weights after one batch.
        weight_diff, calls, steps = fields
        assert float(weight_diff) == 0.0 and (calls, steps) == ("2", "1")
    elif group == "loop":
        # trainop.train on the distributed dataset, with the skip guard (a NaN in every
        # fourth batch), stopped at global step 3 and resumed to 6: the weights of a run to 6
        # at once, and one loss summary per global step.
        weight_diff, *loop = fields
        assert float(weight_diff) < 1e-6 and loop == ["6", "True", "0,1,2,3,4,5"]
    else:
        # Refused with its own error message, naming the argument.
        assert fields == ["yes"], mirrored.stderr[-3000:]


# --- MultiWorkerMirroredStrategy, two worker processes (programs/multiworker_child.py) ---------

MULTIWORKER_CASES = {
    "plain": 4,
    "uneven_keras_object": 3,
    "empty_share": 3,
    "skip": 3,
    "clip": 4,
    "overflow_clip": 3,
}


def _unused_ports(count: int) -> list[int]:
    """Ports that nothing is bound to now, outside the kernel's range of ephemeral ports.

    A port is free only until a worker binds it. Outside the ephemeral range, no process can be
    given it by binding port 0 or by connecting meanwhile; only one naming it can.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            low = int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(max(1024, low - 10000), max(2048, low))
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def _run_workers(ports: list[int], timeout: float = 300) -> list[tuple[int, str, str]]:
    """Runs both workers; returns each one's (exit code, stdout, stderr)."""
    program = str(PROGRAMS / "multiworker_child.py")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as files:
        # Files, not pipes: the workers are polled, not read, until they end.
        outputs = [
            tuple(files.enter_context(open(f"{tmp}/{i}.{kind}", "w+")) for kind in ("out", "err"))
            for i in (0, 1)
        ]
        workers = [
            subprocess.Popen(
                [sys.executable, program, str(index), *map(str, ports)],
                stdout=out,
                stderr=err,
                text=True,
                env=ENV,
            )
            for index, (out, err) in enumerate(outputs)
        ]
        deadline = time.monotonic() + timeout
        try:
            # A worker that failed leaves the other waiting for it in the cluster forever.
            while time.monotonic() < deadline and any(w.poll() is None for w in workers):
                if any(w.poll() not in (None, 0) for w in workers):
                    break
                time.sleep(0.5)
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                worker.wait()
        results = []
        for worker, (out, err) in zip(workers, outputs):
            out.seek(0)
            err.seek(0)
            results.append((worker.returncode, out.read(), err.read()))
        return results


@pytest.fixture(scope="module")
def multiworker() -> _Run:
    for _ in range(3):
        results = _run_workers(_unused_ports(2))
        # Taken between the choice and the bind: choose again.
        if not any("Could not start gRPC server" in err for _, _, err in results):
            break
    code, stdout, _ = results[0]
    lines = {}
    for line in stdout.splitlines():
        case, *fields = line.split()
        lines[("multiworker", case)] = fields
    # The worker that failed first, not the one stopped for it.
    failed = sorted((code < 0, code, err) for code, _, err in results if code != 0)
    return _Run(lines, failed[0][1] if failed else 0, failed[0][2] if failed else "")


def test_two_workers_report_every_case_and_no_other(multiworker):
    assert sorted(case for _, case in multiworker.lines) == sorted(MULTIWORKER_CASES)
    assert multiworker.returncode == 0, multiworker.stderr[-3000:]


@pytest.mark.parametrize("case", MULTIWORKER_CASES)
def test_two_worker_processes_make_the_update_of_one_device_on_the_whole_batch(multiworker, case):
    # Plain SGD on both sides, so that a gradient of the wrong scale shows in the weights, and
    # the returned losses compared too.
    fields = _fields(multiworker, ("multiworker", case))
    assert not fields[0].startswith("error:"), f"{fields[0]}: {multiworker.stderr[-3000:]}"
    weight_diff, loss_diff, steps, one_device_steps, *skipped = fields
    assert float(weight_diff) < 1e-6 and float(loss_diff) < 1e-6
    assert int(steps) == int(one_device_steps) == MULTIWORKER_CASES[case]
    if case == "skip":
        # A NaN in one worker's half of a batch skips the step on both workers.
        assert skipped == ["1", "1"]
    else:
        assert skipped == []
