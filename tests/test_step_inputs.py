"""Inputs the step must take as a user gives them: an int32 global step with summaries, noise
seeds, multipliers known to be zero in any type, complex variables. Each against plain
arithmetic."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer, read_summaries

# --- An int32 global step ----------------------------------------------------------------------


def test_an_int32_global_step_writes_the_summaries_at_its_steps(tmp_path):
    w = tf.Variable([3.0, 4.0], name="w")
    step = tf.Variable(0)  # int32, as TF-Agents' examples make their step counter
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        train_op = trainop.create_train_op(
            lambda: 0.5 * tf.reduce_sum(w * w),
            make_optimizer("keras", "sgd", 0.5),
            step,
            summarize_gradients=True,
        )
        for _ in range(3):
            train_op()
        trainop.add_variables_summaries([(None, w)], step=tf.Variable(7))
    writer.flush()
    series = read_summaries(tmp_path)
    assert [s for s, _ in series["train/loss"]] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in series["train/loss"]], [12.5, 3.125, 0.78125])
    assert [s for s, _ in series["summarize_grads/w_0_gradient_norm"]] == [0, 1, 2]
    assert [s for s, _ in series["summarize_vars/w_0_value_norm"]] == [7]
    assert int(step.numpy()) == 3


def test_an_int32_global_step_in_a_graph_with_a_writer(tmp_path):
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.compat.v1.get_variable("w", initializer=[3.0, 4.0], use_resource=True)
        step = tf.compat.v1.get_variable("step", initializer=0, dtype=tf.int32, use_resource=True)
        writer = tf.summary.create_file_writer(str(tmp_path))
        with writer.as_default():
            train_op = trainop.create_train_op(
                0.5 * tf.reduce_sum(w * w),
                make_optimizer("v1", "sgd", 0.5),
                step,
                summarize_every_n_steps=2,
            )
        session.run([tf.compat.v1.global_variables_initializer(), writer.init()])
        for _ in range(3):
            session.run(train_op)
        session.run(writer.flush())
    series = read_summaries(tmp_path)
    assert [s for s, _ in series["train/loss"]] == [0, 2]
    np.testing.assert_allclose([v for _, v in series["train/loss"]], [12.5, 0.78125])


# --- Gradient noise ----------------------------------------------------------------------------


def _noise_of(seed, steps=3, shape=(2000,)):
    """The noise `add_gradient_noise_fn(1.0, seed)` adds to two zero gradients of one shape,
    at `steps` steps of one train op (SGD with rate 1 writes it into the variables)."""
    a, b = tf.Variable(tf.zeros(shape)), tf.Variable(tf.zeros(shape))
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(a * 0.0) + tf.reduce_sum(b * 0.0),
        make_optimizer("v1", "sgd", 1.0),
        global_step=None,
        transform_grads_fn=trainop.add_gradient_noise_fn(1.0, seed=seed),
    )
    draws = []
    for _ in range(steps):
        before = (a.numpy(), b.numpy())
        train_op()
        draws.append((before[0] - a.numpy(), before[1] - b.numpy()))
    return draws


def test_gradient_noise_is_drawn_afresh_per_gradient_and_per_step_and_repeats_with_its_seed():
    draws = _noise_of(seed=7)
    for a, b in draws:
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.1
        assert np.std(a) == pytest.approx(1.0, rel=0.1)
    assert abs(np.corrcoef(draws[0][0], draws[1][0])[0, 1]) < 0.1
    again = _noise_of(seed=7)
    for (a, b), (a2, b2) in zip(draws, again):
        np.testing.assert_array_equal(a, a2)
        np.testing.assert_array_equal(b, b2)


# --- Multipliers known to be zero --------------------------------------------------------------


@pytest.mark.parametrize(
    "zero",
    [0, 0.0, np.int64(0), np.float32(0.0), np.array(0.0), np.zeros(1), tf.constant(0.0)],
    ids=["int", "float", "np.int64", "np.float32", "0-d array", "size-1 array", "constant"],
)
def test_a_multiplier_known_to_be_zero_freezes_the_variable_under_weight_decay(zero):
    frozen = tf.Variable([1.0], name="frozen")
    trained = tf.Variable([1.0], name="trained")
    optimizer = keras.optimizers.AdamW(0.1, weight_decay=0.5)
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(frozen * frozen + trained * trained),
        optimizer,
        global_step=None,
        variables_to_train=[frozen, trained],
        transform_grads_fn=trainop.multiply_gradients_fn({"frozen": zero}),
    )
    train_op()
    train_op()
    np.testing.assert_array_equal(frozen.numpy(), [1.0])
    assert trained.numpy()[0] < 0.9


def test_a_multiplier_that_becomes_zero_at_run_time_multiplies_by_zero():
    """A tf.Variable multiplier is read when the step runs: its zero gradient still lets weight
    decay move the variable, as documented."""
    w = tf.Variable([1.0], name="w")
    multiplier = tf.Variable(0.0)
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(w * w),
        keras.optimizers.AdamW(0.1, weight_decay=0.5),
        global_step=None,
        transform_grads_fn=trainop.multiply_gradients_fn({"w": multiplier}),
    )
    train_op()
    np.testing.assert_allclose(w.numpy(), [1.0 - 0.1 * 0.5], rtol=1e-6)


# --- Complex variables -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"transform_grads_fn": trainop.clip_by_global_norm_fn(1.0)}, 0.8881966 + 1.7763932j),
        ({"transform_grads_fn": trainop.clip_gradient_norms_fn(1.0)}, 0.8881966 + 1.7763932j),
        ({"check_numerics": "skip"}, 0.5 + 1j),
        ({}, 0.5 + 1j),
    ],
    ids=["clip_global", "clip_each", "skip", "plain"],
)
def test_a_complex_variable_is_clipped_and_guarded_by_its_modulus(runner, kwargs, expected):
    # loss |z|^2 at z = 1 + 2j: TensorFlow's gradient is 2z, of norm sqrt(20); SGD 0.25.
    z = runner.variable(1 + 2j, "z", dtype=tf.complex64)
    step = runner.train_op(
        lambda: tf.math.real(z * tf.math.conj(z)),
        make_optimizer("v1", "sgd", 0.25),
        global_step=None,
        **kwargs,
    )
    step()
    np.testing.assert_allclose(runner.read(z), expected, rtol=1e-6)


def test_a_complex_gradient_holding_nan_is_skipped():
    z = tf.Variable([1 + 2j, 3j], dtype=tf.complex64)
    guard = trainop.SkipNonFiniteSteps()
    step = trainop.create_train_op(
        lambda c: tf.math.real(tf.reduce_sum(z * c)),
        make_optimizer("v1", "sgd", 0.25),
        global_step=None,
        check_numerics=guard,
    )
    step(tf.constant(np.array([1.0, complex(0.0, np.nan)], np.complex64)))
    np.testing.assert_array_equal(z.numpy(), [1 + 2j, 3j])
    assert int(guard.skipped_steps) == 1


@pytest.mark.parametrize(
    "transform, message",
    [
        (trainop.clip_by_value_fn(-1.0, 1.0), "`clip_by_value` cannot clip a complex"),
        (trainop.add_gradient_noise_fn(1.0), "`add_gradient_noise`.*complex64"),
    ],
)
def test_transforms_that_need_real_values_refuse_a_complex_gradient(transform, message):
    z = tf.Variable(1 + 2j, dtype=tf.complex64, name="z")
    with pytest.raises(TypeError, match=message):
        transform([(tf.constant(2 + 4j, tf.complex64), z)])
