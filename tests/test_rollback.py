"""`trainop.train(..., rollback=trainop.Rollback(optimizer))`: when the numerics guard gives
up, the run goes back to its newest healthy checkpoint, lowers the learning rate and trains on
with the batches that come next.

Reference: plain SGD in float64 NumPy on the batches that were applied, at the rate of the
moment.
"""

from __future__ import annotations

import logging
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import trainop

W0 = np.array([1.0, 2.0])
STEPS = 40
X = np.random.default_rng(0).normal(size=(STEPS, 2))


def _data(bad):
    """Batches `x` (float32), NaN at the indices in `bad`."""
    x = X.copy()
    x[list(bad)] = np.nan
    return tf.data.Dataset.from_tensor_slices(x.astype(np.float32))


def _sgd(w, xs, rate):
    """SGD on loss ||w - x||^2, one step per x, in float64."""
    for x in xs:
        w = w - rate * 2 * (w - x)
    return w


def _train(tmp_path, bad, optimizer, check_numerics, rollback=True, jit_compile=False, **settings):
    w = tf.Variable(W0.astype(np.float32))
    step = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(
        lambda x: tf.reduce_sum((w - x) ** 2),
        optimizer,
        global_step=step,
        check_numerics=check_numerics,
        jit_compile=jit_compile,
    )
    result = trainop.train(
        train_op,
        _data(bad),
        logdir=str(tmp_path),
        checkpoint={"w": w, "optimizer": optimizer},
        save_every_n_steps=5,
        global_step=step,
        progress=False,
        rollback=trainop.Rollback(optimizer, **settings) if rollback else None,
    )
    return result, w.numpy()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda: keras.optimizers.SGD(0.1),
        lambda: tf_keras.optimizers.SGD(0.1),
        lambda: tf_keras.optimizers.legacy.SGD(0.1),
        lambda: tf.compat.v1.train.GradientDescentOptimizer(tf.Variable(0.1)),
    ],
    ids=["keras", "tf_keras", "tf_keras_legacy", "v1"],
)
def test_a_bad_stretch_under_the_skip_guard_rolls_back_lowers_the_rate_and_finishes(
    tmp_path, caplog, make_optimizer
):
    """Batches 20 to 24 are NaN. The guard (max 2 in a row) skips 20 and 21 and gives up at
    22: back to the checkpoint of step 20, the rate halved; 23 and 24 skipped, then batches
    25 to 39 applied at 0.05."""
    optimizer = make_optimizer()
    guard = trainop.SkipNonFiniteSteps(max_consecutive=2)
    with caplog.at_level(logging.WARNING, logger="trainop"):
        result, w = _train(tmp_path, range(20, 25), optimizer, guard)

    expected = _sgd(_sgd(W0, X[:20], 0.1), X[25:], 0.05)
    np.testing.assert_allclose(w, expected, rtol=1e-5)
    assert (result.rollbacks, result.global_step, result.stopped_by) == (1, 35, "end_of_data")
    assert int(guard.skipped_steps) == 4 and int(guard.consecutive_skipped_steps) == 0
    rollbacks = [r.getMessage() for r in caplog.records if "Rolled back" in r.getMessage()]
    assert len(rollbacks) == 1
    assert f"Rolled back to {tmp_path / 'ckpt-20'} (roll back 1 of 3)" in rollbacks[0]
    assert "Learning rate 0.1 -> 0.05" in rollbacks[0]
    # The guard's own words, and the batch.
    assert "The loss or a gradient is inf or nan at global step" in rollbacks[0]
    assert "gradients not finite:" in rollbacks[0] and "(batch 22 of the data)" in rollbacks[0]


@pytest.mark.parametrize("check_numerics", [True, "skip_at_once"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_the_guards_first_error_rolls_back_at_once(tmp_path, check_numerics, jit_compile):
    """The default check, or a guard that skips none: the NaN batch 12 raises; back to step
    10 (the checkpoint), the batches 10 and 11 are not seen again, 13 onwards at the halved
    rate. Compiled by XLA too, where the error comes after the call."""
    optimizer = keras.optimizers.SGD(0.1)
    if check_numerics == "skip_at_once":
        check_numerics = trainop.SkipNonFiniteSteps(max_consecutive=0)
    result, w = _train(tmp_path, [12], optimizer, check_numerics, jit_compile=jit_compile)
    expected = _sgd(_sgd(W0, X[:10], 0.1), X[13:], 0.05)
    np.testing.assert_allclose(w, expected, rtol=1e-5)
    assert (result.rollbacks, result.global_step) == (1, 37)
    assert float(optimizer.learning_rate) == pytest.approx(0.05)


def test_without_rollback_the_guards_error_ends_the_run_as_before(tmp_path):
    optimizer = keras.optimizers.SGD(0.1)
    guard = trainop.SkipNonFiniteSteps(max_consecutive=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\(batch 22 of the data\)"):
        _train(tmp_path, range(20, 25), optimizer, guard, rollback=False)
    assert float(optimizer.learning_rate) == pytest.approx(0.1)


def test_after_max_rollbacks_the_guards_error_passes_through(tmp_path, caplog):
    """The data never recovers after batch 20: two roll backs, then the error, with its
    diagnosis and the batch; the rate quartered."""
    optimizer = keras.optimizers.SGD(0.1)
    guard = trainop.SkipNonFiniteSteps(max_consecutive=1)
    with (
        caplog.at_level(logging.WARNING, logger="trainop"),
        pytest.raises(tf.errors.InvalidArgumentError) as raised,
    ):
        _train(tmp_path, range(20, STEPS), optimizer, guard, max_rollbacks=2)
    # Skipped 20, gave up at 21; skipped 22, gave up at 23; skipped 24, error at 25.
    assert "(batch 25 of the data)" in str(raised.value)
    # The guard's diagnosis, as its assertion prints it: `[gradients not finite:] [1] [of 1]`.
    assert re.search(r"gradients not finite:\W+1\W+of 1", str(raised.value))
    assert float(optimizer.learning_rate) == pytest.approx(0.025)
    assert sum("Rolled back" in r.getMessage() for r in caplog.records) == 2
    assert any("gave up after 2 roll back(s)" in r.getMessage() for r in caplog.records)


def test_a_factor_of_one_keeps_the_rate_and_takes_a_schedule(tmp_path):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1000, decay_rate=0.5)
    optimizer = keras.optimizers.SGD(schedule)
    result, w = _train(tmp_path, [12], optimizer, True, learning_rate_factor=1.0)
    assert result.rollbacks == 1 and np.isfinite(w).all()


@pytest.mark.parametrize(
    "make, settings, error, message",
    [
        (
            lambda: keras.optimizers.SGD(
                keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
            ),
            {},
            TypeError,
            "learning rate cannot be multiplied",
        ),
        (
            lambda: tf.compat.v1.train.GradientDescentOptimizer(0.1),
            {},
            TypeError,
            "learning rate cannot be multiplied",
        ),
        (lambda: keras.optimizers.SGD(0.1), dict(max_rollbacks=0), ValueError, "max_rollbacks"),
        (
            lambda: keras.optimizers.SGD(0.1),
            dict(learning_rate_factor=0.0),
            ValueError,
            "`learning_rate_factor` must be in",
        ),
        (
            lambda: keras.optimizers.SGD(0.1),
            dict(learning_rate_factor=2),
            ValueError,
            "`learning_rate_factor` must be in",
        ),
        (lambda: "sgd", {}, TypeError, "`optimizer` must be"),
    ],
)
def test_bad_rollback_settings_are_refused_by_name(make, settings, error, message):
    with pytest.raises(error, match=message):
        trainop.Rollback(make(), **settings)


def test_train_refuses_a_rollback_it_cannot_do(tmp_path):
    optimizer = keras.optimizers.SGD(0.1)
    w = tf.Variable(1.0)
    train_op = trainop.create_train_op(lambda: w * w, optimizer, global_step=None)
    step = tf.Variable(0, dtype=tf.int64)
    with pytest.raises(ValueError, match="`rollback` needs `logdir` and `checkpoint`"):
        trainop.train(train_op, max_steps=3, global_step=step, rollback=trainop.Rollback(optimizer))
    with pytest.raises(TypeError, match="`rollback` must be a trainop.Rollback"):
        trainop.train(train_op, max_steps=3, global_step=step, rollback=0.5)
    with tf.Graph().as_default():
        v = tf.Variable(1.0)
        graph_op = trainop.create_train_op(v * v, tf.compat.v1.train.GradientDescentOptimizer(0.1))
        with pytest.raises(ValueError, match="`rollback` needs an eager train op"):
            trainop.train(
                graph_op,
                max_steps=3,
                logdir=str(tmp_path),
                checkpoint={"v": v},
                rollback=trainop.Rollback(keras.optimizers.SGD(0.1)),
            )


def test_the_batch_the_guard_gave_up_on_is_saved_for_inspection(tmp_path):
    w = tf.Variable(W0.astype(np.float32))
    step = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(
        lambda x, y: tf.reduce_sum((w - x) ** 2 * y), keras.optimizers.SGD(0.1), global_step=step
    )
    x = X.astype(np.float32)
    x[3, 1] = np.nan
    y = np.arange(STEPS, dtype=np.float32)
    data = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        trainop.train(
            train_op,
            data,
            logdir=str(tmp_path),
            global_step=step,
            progress=False,
            save_bad_batch=True,
        )
    path = tmp_path / "bad_batch-3.npz"
    assert f"(batch 3 of the data, saved in {path})" in str(raised.value)
    saved = np.load(path)
    assert sorted(saved.files) == ["0", "1"]
    np.testing.assert_array_equal(saved["0"], x[3])
    assert saved["1"] == y[3]


def test_save_bad_batch_needs_a_logdir():
    w = tf.Variable(1.0)
    train_op = trainop.create_train_op(lambda: w * w, keras.optimizers.SGD(0.1), global_step=None)
    with pytest.raises(ValueError, match="`save_bad_batch` needs `logdir`"):
        trainop.train(
            train_op, max_steps=2, global_step=tf.Variable(0, dtype=tf.int64), save_bad_batch=True
        )


def test_a_roll_back_before_the_first_scheduled_save_restores_the_optimizers_slots(tmp_path):
    """Adam, the NaN batch 2 under the default check: back to the checkpoint written after the
    first call (its slots and counter included), so the run equals Adam on batch 0, then on
    batches 3 onwards at half the rate: batch 1's update leaves nothing behind."""
    optimizer = keras.optimizers.Adam(0.1)
    result, w = _train(tmp_path, [2], optimizer, True)

    reference = keras.Variable(W0.astype(np.float32))
    reference_optimizer = keras.optimizers.Adam(0.1)
    for i in [0, *range(3, STEPS)]:
        if i == 3:
            reference_optimizer.learning_rate = 0.05
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum((reference - X[i].astype(np.float32)) ** 2)
        reference_optimizer.apply_gradients([(tape.gradient(loss, reference), reference)])
    np.testing.assert_allclose(w, reference.numpy(), rtol=1e-5)
    assert result.rollbacks == 1
    assert int(optimizer.iterations) == int(reference_optimizer.iterations) == STEPS - 2


def test_rollback_needs_its_optimizer_in_the_checkpoint(tmp_path):
    optimizer = keras.optimizers.SGD(0.1)
    w = tf.Variable(1.0)
    train_op = trainop.create_train_op(lambda: w * w, optimizer, global_step=None)
    with pytest.raises(ValueError, match="`rollback`'s optimizer is not in `checkpoint`"):
        trainop.train(
            train_op,
            max_steps=3,
            global_step=tf.Variable(0, dtype=tf.int64),
            logdir=str(tmp_path),
            checkpoint={"w": w},
            rollback=trainop.Rollback(optimizer),
        )
