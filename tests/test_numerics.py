"""check_numerics: an inf or NaN loss raises before anything changes."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer, optimizer_state


def _model(runner):
    w = runner.variable(np.array([1.0, -2.0, 3.0], np.float32), "w")
    b = runner.variable(0.5, "b")
    # `scale` stays 1 while the loss is healthy; the test sets it to inf or NaN.
    scale = runner.variable(1.0, "scale", trainable=False)
    return [w, b], scale, lambda: scale * (tf.reduce_sum(w * w) + b * b)


def _state(runner, optimizer, variables):
    return (
        [runner.read(v) for v in variables]
        + optimizer_state(optimizer, variables, runner)
        + [runner.read(runner.global_step())]
    )


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_bad_loss_raises_and_changes_nothing(runner, family, bad_value):
    variables, scale, loss_fn = _model(runner)
    optimizer = make_optimizer(family, "adam", 0.1)
    step = runner.train_op(loss_fn, optimizer)
    step()
    step()  # slots and counters now hold values that a bad step could disturb
    before = _state(runner, optimizer, variables)

    runner.assign(scale, bad_value)
    with pytest.raises(tf.errors.InvalidArgumentError, match=trainop.LOSS_NOT_FINITE_MESSAGE):
        step()

    after = _state(runner, optimizer, variables)
    assert len(after) == len(before) > 3
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)  # bit-identical, NaN-free

    # Training goes on from where it was.
    runner.assign(scale, 1.0)
    step()
    assert runner.read(runner.global_step()) == 3


def test_eager_update_ops_do_not_run_on_a_bad_step():
    w = tf.Variable(1.0)
    scale = tf.Variable(1.0, trainable=False)
    counter = tf.Variable(0, trainable=False)
    train_op = trainop.create_train_op(
        lambda: scale * w * w,
        make_optimizer("keras"),
        update_ops=[lambda: counter.assign_add(1)],
        global_step=None,
    )
    train_op()
    scale.assign(np.nan)
    with pytest.raises(tf.errors.InvalidArgumentError):
        train_op()
    assert counter.numpy() == 1


def test_without_check_numerics_a_nan_loss_reaches_the_weights(runner):
    # What the check guards against: the same step, unchecked, corrupts the weights.
    variables, scale, loss_fn = _model(runner)
    step = runner.train_op(loss_fn, make_optimizer("keras", "sgd"), check_numerics=False)
    runner.assign(scale, np.nan)
    step()
    assert np.isnan(runner.read(variables[0])).all()


def test_keras_model_with_nan_input_batch_keeps_its_weights():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam(0.01)
    train_op = trainop.create_train_op(
        lambda x: tf.reduce_mean(model(x) ** 2),
        optimizer,
        variables_to_train=model.trainable_variables,
        global_step=None,
    )
    train_op(tf.ones((2, 3)))
    weights = [w.numpy().copy() for w in model.weights]
    slots = [v.numpy().copy() for v in optimizer.variables]
    with pytest.raises(tf.errors.InvalidArgumentError, match="LossTensor is inf or nan"):
        train_op(tf.constant(np.nan, shape=(2, 3)))
    for before, w in zip(weights, model.weights):
        np.testing.assert_array_equal(w.numpy(), before)
    for before, v in zip(slots, optimizer.variables):
        np.testing.assert_array_equal(v.numpy(), before)


@pytest.mark.parametrize("family", ["keras", "tf_keras", "tf_keras_legacy", "v1"])
def test_a_bad_first_step_leaves_the_optimizer_usable(runner, family):
    # The optimizer's state is made before the check guards the update: a NaN on the very
    # first step must not leave it half-made.
    variables, scale, loss_fn = _model(runner)
    optimizer = make_optimizer(family, "adam", 0.1)
    step = runner.train_op(loss_fn, optimizer)
    w0 = runner.read(variables[0])
    runner.assign(scale, np.nan)
    with pytest.raises(tf.errors.InvalidArgumentError, match=trainop.LOSS_NOT_FINITE_MESSAGE):
        step()
    np.testing.assert_array_equal(runner.read(variables[0]), w0)
    runner.assign(scale, 1.0)
    step()
    # Adam's first step: each weight moves by the learning rate against its gradient's sign.
    np.testing.assert_allclose(runner.read(variables[0]), w0 - 0.1 * np.sign(w0), rtol=1e-5)
    assert runner.read(runner.global_step()) == 1


def test_graph_keras_optimizer_state_initializes_without_feeding_the_inputs():
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.compat.v1.get_variable("w", initializer=[1.0, -2.0], use_resource=True)
        x = tf.compat.v1.placeholder(tf.float32, [])
        optimizer = keras.optimizers.RMSprop(0.1)
        train_op = trainop.create_train_op(x * tf.reduce_sum(w * w), optimizer)
        session.run(tf.compat.v1.global_variables_initializer())  # no feed needed
        with pytest.raises(tf.errors.InvalidArgumentError):
            session.run(train_op, {x: np.nan})
        np.testing.assert_array_equal(session.run(w), [1.0, -2.0])
        assert session.run(train_op, {x: 1.0}) == 5.0
        assert session.run(tf.compat.v1.train.get_global_step()) == 1
