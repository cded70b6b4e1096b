"""accumulation_steps: N calls make one update, on the mean of their gradients.

Each test compares the weights and the losses with plain SGD written in float64 NumPy: an
update on the sum of the gradients instead of their mean, or a sparse gradient whose rows
overwrite one another instead of adding up, moves the weights elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer

LR = 0.1


def _linear_data():
    rows = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)
    targets = rows @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
    return rows, targets


def _linear_reference(rows, targets, batch, accumulation_steps):
    """SGD on mean((x @ w - y)^2) in float64: one update per `accumulation_steps` batches, on
    the gradient of their rows taken together. Returns the weights and each call's loss."""
    w = np.zeros((4, 1))
    rows, targets = rows.astype(np.float64), targets.astype(np.float64)
    losses = []
    for start in range(0, len(rows), batch):
        error = rows[start : start + batch] @ w - targets[start : start + batch]
        losses.append(np.mean(error**2))
        end = start + batch
        if (end // batch) % accumulation_steps == 0:
            # The loss is a mean over its batch: the mean of the calls' gradients is the
            # gradient on their rows together.
            first = end - batch * accumulation_steps
            x, y = rows[first:end], targets[first:end]
            w = w - LR * 2.0 * x.T @ (x @ w - y) / len(x)
    return w, np.array(losses)


def _accumulated(runner, family, batch, **kwargs):
    """Trains the linear model on the 32 rows, `batch` rows per call, with SGD."""
    rows, targets = _linear_data()
    w = runner.variable(np.zeros((4, 1), np.float32), "w")
    x = runner.variable(np.zeros((batch, 4), np.float32), "x", trainable=False)
    y = runner.variable(np.zeros((batch, 1), np.float32), "y", trainable=False)
    global_step = runner.variable(0, "global_step", trainable=False, dtype=tf.int64)
    step = runner.train_op(
        lambda: tf.reduce_mean((tf.matmul(x, w) - y) ** 2),
        make_optimizer(family, "sgd", LR),
        global_step=global_step,
        **kwargs,
    )
    losses = []
    for start in range(0, len(rows), batch):
        runner.assign(x, rows[start : start + batch])
        runner.assign(y, targets[start : start + batch])
        losses.append(float(step()))
    return runner.read(w), np.array(losses), runner.read(global_step)


def test_accumulating_4_calls_is_one_step_on_the_4_times_larger_batch(runner, family):
    w, losses, step = _accumulated(runner, family, batch=4, accumulation_steps=4)
    expected_w, expected_losses = _linear_reference(*_linear_data(), batch=4, accumulation_steps=4)
    assert step == 2  # the global step counts applied updates, not calls
    np.testing.assert_allclose(w, expected_w, rtol=1e-5, atol=1e-6)
    # The weights stay as they were while the calls accumulate: each call's loss is that of
    # the weights of the last update.
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5, atol=1e-6)


def _embedding_reference(table, bias, batches, accumulation_steps):
    """SGD on mean((table[ids] + bias - target)^2) in float64, one update per
    `accumulation_steps` calls on the mean of their dense gradients; repeated ids add up."""
    table, bias = table.astype(np.float64), bias.astype(np.float64)
    losses = []
    table_grad, bias_grad = np.zeros_like(table), np.zeros_like(bias)
    for call, (ids, target) in enumerate(batches, start=1):
        error = table[ids] + bias - target
        losses.append(np.mean(error**2))
        d_error = 2.0 * error / error.size
        np.add.at(table_grad, ids, d_error)
        bias_grad += d_error.sum(0)
        if call % accumulation_steps == 0:
            table = table - LR * table_grad / accumulation_steps
            bias = bias - LR * bias_grad / accumulation_steps
            table_grad, bias_grad = np.zeros_like(table), np.zeros_like(bias)
    return table, bias, np.array(losses)


# Rows 1, 3 and 4 are looked up by both calls of the first update; rows 1 and 4 twice in one call.
IDS = np.array([[1, 3, 1], [3, 4, 4], [0, 1, 1], [1, 5, 0]], np.int32)
TARGETS = np.random.default_rng(2).normal(size=(4, 3, 2)).astype(np.float32)


def test_accumulated_sparse_gradients_add_up_repeated_rows(runner, family):
    table0 = np.arange(12, dtype=np.float32).reshape(6, 2) / 4.0
    bias0 = np.array([0.5, -0.5], np.float32)
    table = runner.variable(table0, "embedding")
    bias = runner.variable(bias0, "bias")
    ids = runner.variable(np.zeros(3, np.int32), "ids", trainable=False)
    target = runner.variable(np.zeros((3, 2), np.float32), "target", trainable=False)
    global_step = runner.variable(0, "global_step", trainable=False, dtype=tf.int64)

    def loss_fn():
        # The gradient of the lookup is an IndexedSlices with a row per id, repeats included.
        return tf.reduce_mean((tf.gather(table, ids) + bias - target) ** 2)

    step = runner.train_op(
        loss_fn,
        make_optimizer(family, "sgd", LR),
        global_step=global_step,
        accumulation_steps=2,
    )
    losses = []
    for call_ids, call_target in zip(IDS, TARGETS):
        runner.assign(ids, call_ids)
        runner.assign(target, call_target)
        losses.append(float(step()))

    expected_table, expected_bias, expected_losses = _embedding_reference(
        table0, bias0, zip(IDS, TARGETS), accumulation_steps=2
    )
    assert runner.read(global_step) == 2
    np.testing.assert_allclose(runner.read(table), expected_table, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(runner.read(bias), expected_bias, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)


def test_accumulation_transforms_the_mean_and_skips_bad_calls():
    w = tf.Variable([0.0, 0.0])
    x = tf.Variable([1.0, 1.0], trainable=False)
    guard = trainop.SkipNonFiniteSteps()
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(w * x),
        make_optimizer("keras", "sgd", 1.0),
        global_step=None,
        accumulation_steps=2,
        check_numerics=guard,
        transform_grads_fn=trainop.clip_by_global_norm_fn(1.0),
    )
    for value in ([1.0, 0.0], [np.nan, 0.0], [0.0, 3.0]):
        x.assign(value)
        train_op()
    # The NaN call was skipped; the update applied the mean of [1, 0] and [0, 3], clipped to
    # norm 1. (The mean of the clipped gradients would be [0.5, 0.5].)
    assert int(guard.skipped_steps) == 1
    mean = np.array([0.5, 1.5])
    np.testing.assert_allclose(w.numpy(), -mean / np.linalg.norm(mean), rtol=1e-6)


@pytest.mark.parametrize("accumulation_steps", [0, -1, 1.5, True])
def test_accumulation_steps_must_be_a_count(accumulation_steps):
    w = tf.Variable(1.0)
    with pytest.raises(ValueError, match="`accumulation_steps` must be a positive integer"):
        trainop.create_train_op(
            lambda: w * w, make_optimizer("keras"), accumulation_steps=accumulation_steps
        )


def test_float16_gradients_are_accumulated_in_float32():
    w = tf.Variable([1.0], dtype=tf.float16)
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(tf.cast(4e4, tf.float16) * w),
        make_optimizer("keras", "sgd", 1e-5),
        global_step=None,
        accumulation_steps=4,
    )
    for _ in range(4):
        train_op()
    # The float16 sum of four 4e4 gradients would be inf; their float32 mean is 4e4.
    np.testing.assert_allclose(w.numpy(), [1.0 - 1e-5 * 4e4], rtol=1e-3)


def test_the_summaries_of_an_accumulated_update_are_of_the_window(tmp_path):
    """train/loss and train/global_gradient_norm of an update on the mean of 2 calls: the mean
    of their losses and the norm of their mean gradient, written once, when it applies."""
    from conftest import read_summaries

    w = tf.Variable([0.0, 0.0])
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        step = trainop.create_train_op(
            lambda g: tf.reduce_sum(w * g) + 1.0,
            make_optimizer("keras", "sgd", LR),
            tf.Variable(0, dtype=tf.int64),
            accumulation_steps=2,
        )
        for gradient in ([0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, -1.0]):
            step(tf.constant(gradient))
    writer.flush()
    series = read_summaries(tmp_path)
    np.testing.assert_allclose([v for _, v in series["train/global_gradient_norm"]], [2.5, 1.0])
    # Loss of the second call: w is still 0 at both calls of the first window.
    first_window = 1.0
    second_window = (
        1.0 - LR * np.dot([1.5, 2.0], [1.0, 1.0]) / 2 - LR * np.dot([1.5, 2.0], [1, -1]) / 2
    )
    np.testing.assert_allclose(
        [v for _, v in series["train/loss"]], [first_window, second_window], rtol=1e-6
    )
    assert [s for s, _ in series["train/loss"]] == [0, 1]


def test_a_transform_of_the_mean_sees_every_variable_given(runner):
    """As without accumulation, a multiplier naming a variable with no gradient is refused."""
    w = runner.variable([1.0], "w")
    unused = runner.variable([1.0], "unused")
    # Raised when the step is built: in graph mode by create_train_op, eagerly by its trace.
    with pytest.raises(ValueError, match="names a variable that has no gradient: unused"):
        runner.train_op(
            lambda: tf.reduce_sum(w * w),
            make_optimizer("v1", "sgd", LR),
            global_step=None,
            variables_to_train=[w, unused],
            transform_grads_fn=trainop.multiply_gradients_fn({"unused": 2.0}),
            accumulation_steps=2,
        )()
    np.testing.assert_array_equal(runner.read(w), [1.0])
