"""The optimizer adapter: an optimizer already built for other variables.

Keras 3 and current `tf_keras` optimizers are built once, for the variables they first train,
and keep no state for any other: given other variables they fail only inside the traced update
(Keras 3: "Unknown variable"; tf_keras: a `KeyError` telling to call `optimizer.build`, which
does nothing once built). The train op refuses them when it is built, or on its first trace
when the variables are found there, before anything changes. `tf.compat.v1` and
`tf_keras.optimizers.legacy` optimizers make their slots per variable, and train any variable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer, optimizer_state

LR = 0.1
A0 = np.array([1.0, -2.0], np.float32)
B0 = np.array([3.0, 0.5, -4.0], np.float32)


def half_square(w):
    """0.5 * |w|^2, whose gradient is w itself."""
    return lambda: 0.5 * tf.reduce_sum(w * w)


def train_b(runner, optimizer, b, how):
    """Builds (and in eager mode, where the variables may be found on the first call, calls)
    a train step for `b` with `optimizer`."""
    if how == "train_step":
        loss = half_square(b)
        return trainop.create_train_step(loss() if runner.mode == "graph" else loss, optimizer)
    variables = [b] if how == "listed" else None
    if runner.mode == "graph":
        return trainop.create_train_op(half_square(b)(), optimizer, variables_to_train=variables)
    return trainop.create_train_op(half_square(b), optimizer, variables_to_train=variables)()


@pytest.mark.parametrize("how", ["listed", "found", "train_step"])
@pytest.mark.parametrize("family", ["keras", "tf_keras"])
def test_optimizer_built_for_other_variables_is_refused_before_anything_changes(
    runner, family, how
):
    optimizer = make_optimizer(family, "adam", LR)
    a = runner.variable(A0, "a")
    step_a = runner.train_op(half_square(a), optimizer, variables_to_train=[a])
    step_a()
    # Adam's first step moves each weight by lr * sign(grad), up to epsilon.
    np.testing.assert_allclose(runner.read(a), A0 - LR * np.sign(A0), rtol=1e-5)

    # Made after A's train op: in graph mode, `variables_to_train=None` then means A and B.
    b = runner.variable(B0, "b")
    if runner.mode == "graph":
        runner.session.run(b.initializer)
    a_before = runner.read(a)
    state_before = optimizer_state(optimizer, [a], runner)
    step_before = runner.read(runner.global_step())

    with pytest.raises(ValueError) as error:
        train_b(runner, optimizer, b, how)
    message = str(error.value)
    assert "`optimizer` must be a new optimizer, or one built for the variables" in message
    assert "keeps no state for these: b" in message
    assert "one optimizer per set of variables" in message.lower()
    assert "Received: optimizer=" in message

    np.testing.assert_array_equal(runner.read(a), a_before)
    np.testing.assert_array_equal(runner.read(b), B0)
    for after, before in zip(optimizer_state(optimizer, [a], runner), state_before):
        np.testing.assert_array_equal(after, before)
    assert runner.read(runner.global_step()) == step_before
    # A's own train op still trains A.
    step_a()
    assert not np.array_equal(runner.read(a), a_before)


@pytest.mark.parametrize("family", ["keras", "tf_keras"])
def test_optimizer_built_for_more_variables_trains_a_subset(runner, family):
    optimizer = make_optimizer(family, "sgd", LR)
    a = runner.variable(A0, "a")
    b = runner.variable(B0, "b")
    step_both = runner.train_op(
        lambda: half_square(a)() + half_square(b)(), optimizer, variables_to_train=[a, b]
    )
    step_both()
    a1, b1 = A0 - np.float32(LR) * A0, B0 - np.float32(LR) * B0
    np.testing.assert_allclose(runner.read(a), a1, rtol=1e-6)
    np.testing.assert_allclose(runner.read(b), b1, rtol=1e-6)

    step_b = runner.train_op(half_square(b), optimizer, variables_to_train=[b])
    step_b()
    np.testing.assert_allclose(runner.read(a), a1, rtol=1e-6)
    np.testing.assert_allclose(runner.read(b), b1 - np.float32(LR) * b1, rtol=1e-6)


@pytest.mark.parametrize("how", ["listed", "found"])
@pytest.mark.parametrize("family", ["v1", "tf_keras_legacy"])
def test_optimizer_that_makes_slots_per_variable_trains_other_variables(runner, family, how):
    optimizer = make_optimizer(family, "sgd", LR)
    a = runner.variable(A0, "a")
    runner.train_op(half_square(a), optimizer, variables_to_train=[a])()
    a1 = A0 - np.float32(LR) * A0
    np.testing.assert_allclose(runner.read(a), a1, rtol=1e-6)

    b = runner.variable(B0, "b")
    if runner.mode == "graph":
        # The session initializes B, made after the first step.
        runner.session.run(b.initializer)
    variables = [b] if how == "listed" else None
    step_b = runner.train_op(half_square(b), optimizer, variables_to_train=variables)
    step_b()
    step_b()
    b2 = B0 * np.float32(1 - LR) ** 2
    np.testing.assert_allclose(runner.read(b), b2, rtol=1e-6)
    # (In a graph, None means every trainable variable: A, whose gradient is None, stays.)
    np.testing.assert_allclose(runner.read(a), a1, rtol=1e-6)


def test_loss_scale_optimizer_built_for_other_variables_is_refused():
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR))
    a, b = tf.Variable(A0, name="a"), tf.Variable(B0, name="b")
    trainop.create_train_op(half_square(a), optimizer, global_step=None)()
    np.testing.assert_allclose(a.numpy(), A0 * np.float32(1 - LR), rtol=1e-6)
    with pytest.raises(ValueError, match="LossScaleOptimizer was built for 1 variable"):
        trainop.create_train_op(half_square(b), optimizer, variables_to_train=[b])
    np.testing.assert_array_equal(b.numpy(), B0)


def test_loss_scale_optimizer_whose_inner_optimizer_knows_other_variables_is_refused():
    inner = keras.optimizers.SGD(LR)
    a, b = tf.Variable(A0, name="a"), tf.Variable(B0, name="b")
    inner.build([a])
    optimizer = keras.optimizers.LossScaleOptimizer(inner)
    with pytest.raises(ValueError, match="SGD was built for 1 variable.*these: b"):
        trainop.create_train_op(half_square(b), optimizer, variables_to_train=[b])
    np.testing.assert_array_equal(b.numpy(), B0)


def test_one_optimizer_built_for_two_models_trains_each():
    # The remedy the error names: one build with every variable, before the first step.
    optimizer = keras.optimizers.SGD(LR)
    a, b = tf.Variable(A0, name="a"), tf.Variable(B0, name="b")
    optimizer.build([a, b])
    trainop.create_train_op(half_square(a), optimizer, global_step=None)()
    trainop.create_train_op(half_square(b), optimizer, global_step=None)()
    np.testing.assert_allclose(a.numpy(), A0 * np.float32(1 - LR), rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), B0 * np.float32(1 - LR), rtol=1e-6)


LEGACY_KERAS_PROGRAM = textwrap.dedent("""
    import json
    import tensorflow as tf
    import trainop

    optimizer = tf.keras.optimizers.Adam(0.1)  # tf_keras's, as TF-Agents programs have it
    a, b = tf.Variable([1.0, -2.0], name="a"), tf.Variable([3.0], name="b")
    trainop.create_train_step(lambda: 0.5 * tf.reduce_sum(a * a), optimizer)
    try:
        trainop.create_train_step(lambda: 0.5 * tf.reduce_sum(b * b), optimizer)
        error = None
    except ValueError as e:
        error = str(e)
    print(json.dumps({
        "optimizer": type(optimizer).__module__,
        "a": a.numpy().tolist(), "b": b.numpy().tolist(), "error": error,
        "global_step": int(tf.compat.v1.train.get_global_step()),
    }))
""")


def test_refused_with_tf_use_legacy_keras():
    result = subprocess.run(
        [sys.executable, "-c", LEGACY_KERAS_PROGRAM],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_USE_LEGACY_KERAS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["optimizer"].startswith("tf_keras")
    np.testing.assert_allclose(report["a"], [0.9, -1.9], rtol=1e-5)
    assert report["b"] == [3.0]
    assert report["global_step"] == 1
    assert "keeps no state for these: b" in report["error"]
