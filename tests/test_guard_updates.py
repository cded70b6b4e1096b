"""`SkipNonFiniteSteps(check_updates=True)`: an optimizer that makes inf or NaN weights out of
finite gradients (a huge learning rate, a float16 Adam whose epsilon underflows) has its
update undone, every variable it wrote (weights, slots, counters, the global step) and what the
forward pass wrote back as before, and the step counted as skipped.

Reference: the state before the bad step, read back; and the run without the bad step.
"""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import trainop
from trainop import _optimizers

W0 = np.array([1.0, 2.0], np.float32)
# At w = 0.8 * W0 the gradient of sum(w * w) is [1.6, 3.2]: a rate of 2e38 makes -6.4e38, inf
# in float32.
HUGE = 2e38


def _momentum(family, rate):
    return {
        "keras": lambda: keras.optimizers.SGD(rate, momentum=0.9),
        "tf_keras": lambda: tf_keras.optimizers.SGD(rate, momentum=0.9),
        "tf_keras_legacy": lambda: tf_keras.optimizers.legacy.SGD(rate, momentum=0.9),
        "v1": lambda: tf.compat.v1.train.MomentumOptimizer(tf.Variable(rate), momentum=0.9),
    }[family]()


def _set_rate(optimizer, rate):
    variable = _optimizers.OptimizerAdapter(optimizer).learning_rate_variable()
    variable.assign(rate)


def _state(optimizer, w):
    """The optimizer's variables but its learning rate, and w, as arrays."""
    rate = _optimizers.OptimizerAdapter(optimizer).learning_rate_variable()
    state = _optimizers.OptimizerAdapter(optimizer).state_variables([w])
    return [v.numpy() for v in state if v is not rate] + [w.numpy()]


FAMILIES = ["keras", "tf_keras", "tf_keras_legacy", "v1"]


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_an_update_made_not_finite_is_undone_and_skipped(family, jit_compile, capfd):
    w = tf.Variable(W0)
    step = tf.Variable(0, dtype=tf.int64)
    optimizer = _momentum(family, 0.1)
    guard = trainop.SkipNonFiniteSteps(check_updates=True)
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(w * w),
        optimizer,
        global_step=step,
        check_numerics=guard,
        jit_compile=jit_compile,
    )
    train_op()
    before = _state(optimizer, w)
    _set_rate(optimizer, HUGE)
    train_op()

    for got, expected in zip(_state(optimizer, w), before):
        np.testing.assert_array_equal(got, expected)
    assert int(step) == 1 and int(guard.skipped_steps) == 1
    # The run goes on as if the bad step had not been.
    _set_rate(optimizer, 0.1)
    train_op()
    reference_w = tf.Variable(W0)
    reference_optimizer = _momentum(family, 0.1)
    reference = trainop.create_train_op(
        lambda: tf.reduce_sum(reference_w * reference_w), reference_optimizer, global_step=None
    )
    reference()
    reference()
    np.testing.assert_allclose(w.numpy(), reference_w.numpy(), rtol=1e-6)
    assert int(guard.consecutive_skipped_steps) == 0
    if not jit_compile:  # XLA compiles no print
        said = [line for line in capfd.readouterr().err.splitlines() if "trainop:" in line]
        # The weight went inf (and, depending on the family, its momentum); of the floating
        # variables the update writes (weights, slots; Keras's learning rate too).
        assert len(said) == 1
        assert re.fullmatch(
            r"trainop: a step not applied at global step 1 - the update made variables not "
            r'finite \(from finite gradients\): [12] of [23] \["Variable".*\]',
            said[0],
        ), said[0]


def test_a_float16_adam_whose_epsilon_underflows_is_undone():
    """Keras 3 Adam, epsilon 1e-8 (0 in float16): a zero gradient gives 0 / 0."""

    def run(check_updates):
        w = tf.Variable(np.array([1.0, 2.0], np.float16))
        guard = trainop.SkipNonFiniteSteps(check_updates=check_updates)
        train_op = trainop.create_train_op(
            lambda x: tf.reduce_sum(w * x),
            keras.optimizers.Adam(1e-3, epsilon=1e-8),
            global_step=None,
            check_numerics=guard,
        )
        train_op(tf.constant(np.array([0.0, 1.0], np.float16)))
        return w.numpy(), int(guard.skipped_steps)

    unchecked, skipped = run(False)
    assert np.isnan(unchecked[0]) and skipped == 0  # today's behaviour, the option off
    checked, skipped = run(True)
    np.testing.assert_array_equal(checked, np.array([1.0, 2.0], np.float16))
    assert skipped == 1


def test_check_updates_is_refused_in_a_graph():
    with tf.Graph().as_default():
        w = tf.Variable(W0)
        guard = trainop.SkipNonFiniteSteps(check_updates=True)
        with pytest.raises(ValueError, match="check_updates=True\\) works in eager mode"):
            trainop.create_train_op(
                tf.reduce_sum(w * w),
                tf.compat.v1.train.GradientDescentOptimizer(0.1),
                check_numerics=guard,
            )


def test_what_the_forward_pass_wrote_is_undone_with_the_update():
    """A model with batch normalization: after the undone step every variable of the model
    and the optimizer is as before."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization()]
    )
    optimizer = keras.optimizers.SGD(0.1)
    guard = trainop.SkipNonFiniteSteps(check_updates=True)
    x = tf.constant(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32))
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(model(x, training=True) ** 2) * 1e3,
        optimizer,
        global_step=None,
        check_numerics=guard,
    )
    train_op()
    before = [v.numpy() for v in model.variables + optimizer.variables]
    optimizer.learning_rate = 1e38
    train_op()
    after = [v.numpy() for v in model.variables + optimizer.variables]
    assert int(guard.skipped_steps) == 1
    for got, expected in zip(after[:-1] + [np.float32(0.1)], before[:-1] + [np.float32(0.1)]):
        np.testing.assert_array_equal(got, expected)


def test_without_check_updates_the_update_goes_through():
    w = tf.Variable(W0)
    optimizer = keras.optimizers.SGD(0.1)
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(w * w), optimizer, global_step=None, check_numerics="skip"
    )
    train_op()
    optimizer.learning_rate = HUGE
    train_op()
    assert not np.isfinite(w.numpy()).all()


def test_updates_made_not_finite_count_towards_the_limit():
    w = tf.Variable(W0)
    optimizer = keras.optimizers.SGD(HUGE)
    guard = trainop.SkipNonFiniteSteps(max_consecutive=2, check_updates=True)
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(w * w), optimizer, global_step=None, check_numerics=guard
    )
    train_op()
    train_op()
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        train_op()
    assert re.search(r"the update made variables not finite.*\W1\W+of \d", str(raised.value))
    np.testing.assert_array_equal(w.numpy(), W0)


def test_check_updates_is_refused_with_accumulation():
    w = tf.Variable(W0)
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(w * w),
        keras.optimizers.SGD(0.1),
        global_step=None,
        check_numerics=trainop.SkipNonFiniteSteps(check_updates=True),
        accumulation_steps=2,
    )
    with pytest.raises(ValueError, match="check_updates=True.*accumulation_steps"):
        train_op()


def test_check_updates_must_be_a_bool():
    with pytest.raises(TypeError, match="`check_updates` must be True or False"):
        trainop.SkipNonFiniteSteps(check_updates="yes")
