"""Accumulation that equals one step on the concatenated batch, whatever each call holds: a loss
given as `(loss_sum, count)`, a micro-batch skipped for an overflow without losing its window,
the window's sums checkpointed by `trainop.train`, and a partial window at the end of the data.

The reference is plain: one `tf.GradientTape` step of the same optimizer family on the
concatenation of the window's batches, with the loss averaged over all its examples (or
unmasked tokens).
"""

from __future__ import annotations

import logging
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import FAMILIES, make_optimizer

RNG = np.random.default_rng(7)
W0 = RNG.normal(size=(3, 2)).astype(np.float32)
SIZES = [2, 5, 3, 1, 4, 6, 2, 3, 5, 1, 2, 4]
XS = [RNG.normal(size=(n, 3)).astype(np.float32) for n in SIZES]
YS = [RNG.normal(size=(n, 2)).astype(np.float32) for n in SIZES]


def per_example(w, x, y):
    return tf.reduce_sum((tf.tanh(x @ w) - y) ** 2, axis=1)


def counted(w):
    def loss_fn(x, y):
        return tf.reduce_sum(per_example(w, x, y)), tf.shape(x)[0]

    return loss_fn


def reference(family, kind, windows):
    """One tape step per window, on its batches concatenated, the loss their mean."""
    w = tf.Variable(W0)
    optimizer = make_optimizer(family, kind, 0.1)
    for window in windows:
        x = np.concatenate([XS[i] for i in window])
        y = np.concatenate([YS[i] for i in window])
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example(w, x, y))
        optimizer.apply_gradients([(tape.gradient(loss, w), w)])
    return w.numpy()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_micro_batches_of_different_sizes_make_the_step_on_their_concatenation(family, kind):
    w = tf.Variable(W0)
    train_op = trainop.create_train_op(
        counted(w), make_optimizer(family, kind, 0.1), global_step=None, accumulation_steps=3
    )
    losses = [float(train_op(XS[i], YS[i])) for i in range(6)]
    np.testing.assert_allclose(
        w.numpy(), reference(family, kind, [[0, 1, 2], [3, 4, 5]]), rtol=2e-5, atol=1e-6
    )
    # Each call returns its own batch's mean loss (the sum over the count).
    expected = float(tf.reduce_mean(per_example(tf.constant(W0), XS[0], YS[0])))
    assert losses[0] == pytest.approx(expected, rel=1e-6)

    # A mean loss weights the calls equally: not the step on the concatenation here.
    equal = tf.Variable(W0)
    equal_op = trainop.create_train_op(
        lambda x, y: tf.reduce_mean(per_example(equal, x, y)),
        make_optimizer(family, kind, 0.1),
        global_step=None,
        accumulation_steps=3,
    )
    for i in range(6):
        equal_op(XS[i], YS[i])
    assert not np.allclose(equal.numpy(), w.numpy(), rtol=1e-4)


@pytest.mark.parametrize("family", ["keras", "v1"])
def test_masked_token_losses_count_the_tokens_not_the_sequences(family):
    vocabulary, length = 5, 6
    initial = RNG.normal(size=(vocabulary, vocabulary)).astype(np.float32)
    table = tf.Variable(initial)
    batches = []
    for n, kept in [(3, 0.2), (2, 0.9), (4, 0.5)]:
        tokens = RNG.integers(0, vocabulary, size=(n, length)).astype(np.int32)
        targets = RNG.integers(0, vocabulary, size=(n, length)).astype(np.int32)
        mask = (RNG.random(size=(n, length)) < kept).astype(np.float32)
        mask[0, 0] = 1.0  # at least one token counts
        batches.append((tokens, targets, mask))

    def token_losses(table, tokens, targets):
        logits = tf.nn.embedding_lookup(table, tokens)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)

    def loss_fn(tokens, targets, mask):
        return tf.reduce_sum(token_losses(table, tokens, targets) * mask), tf.reduce_sum(mask)

    train_op = trainop.create_train_op(
        loss_fn, make_optimizer(family, "adam", 0.05), global_step=None, accumulation_steps=3
    )
    for batch in batches:
        train_op(*batch)

    expected = tf.Variable(initial)
    tokens, targets, mask = (np.concatenate(parts) for parts in zip(*batches))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(token_losses(expected, tokens, targets) * mask) / mask.sum()
    # Dense: the window's mean gradient of a table is applied dense (see the README).
    gradient = tf.convert_to_tensor(tape.gradient(loss, expected))
    make_optimizer(family, "adam", 0.05).apply_gradients([(gradient, expected)])
    np.testing.assert_allclose(table.numpy(), expected.numpy(), rtol=2e-5, atol=1e-6)


def test_a_count_of_zero_adds_nothing_and_returns_a_zero_loss():
    w = tf.Variable(W0)
    train_op = trainop.create_train_op(
        lambda x, y, count: (tf.reduce_sum(per_example(w, x, y)) * count, count),
        keras.optimizers.SGD(0.1),
        global_step=None,
        accumulation_steps=2,
    )
    assert float(train_op(XS[0], YS[0], tf.constant(0.0))) == 0.0
    train_op(XS[1], YS[1], tf.constant(1.0))
    # The window counted 1: the step of the second batch's sum alone.
    w_ref = tf.Variable(W0)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(per_example(w_ref, XS[1], YS[1]))
    w_ref.assign_sub(0.1 * tape.gradient(loss, w_ref))
    np.testing.assert_allclose(w.numpy(), w_ref.numpy(), rtol=1e-6)


def graph_train_op(x, y):
    """In the current `tf.compat.v1` graph: the variable and the train op on its (sum, count)."""
    w = tf.compat.v1.get_variable("w", initializer=W0, use_resource=True)
    train_op = trainop.create_train_op(
        (tf.reduce_sum(per_example(w, x, y)), tf.shape(x)[0]),
        tf.compat.v1.train.GradientDescentOptimizer(0.1),
        accumulation_steps=3,
    )
    return w, train_op


def test_in_a_v1_graph_the_loss_tensor_may_be_a_sum_and_count():
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 3])
        y = tf.compat.v1.placeholder(tf.float32, [None, 2])
        w, loss = graph_train_op(x, y)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for i in range(3):
                session.run(loss, {x: XS[i], y: YS[i]})
            found = session.run(w)
    np.testing.assert_allclose(found, reference("v1", "sgd", [[0, 1, 2]]), rtol=2e-5, atol=1e-6)


def test_an_overflowing_micro_batch_keeps_the_rest_of_its_window():
    w = tf.Variable(W0)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    train_op = trainop.create_train_op(
        lambda x, y, scale: (tf.reduce_sum(per_example(w, x, y)) * scale, tf.shape(x)[0]),
        optimizer,
        global_step=None,
        accumulation_steps=3,
    )
    one = tf.constant(1.0)
    train_op(XS[0], YS[0], one)
    train_op(XS[1], YS[1], tf.constant(1e34))  # a finite loss, whose scaled gradients overflow
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**14  # halved once, as on one step
    np.testing.assert_array_equal(w.numpy(), W0)
    train_op(XS[2], YS[2], one)
    train_op(XS[3], YS[3], one)
    # The window is the three good calls: nothing of theirs was dropped.
    np.testing.assert_allclose(w.numpy(), reference("keras", "sgd", [[0, 2, 3]]), rtol=2e-5)
    assert int(optimizer.iterations.numpy()) == 1


def _train(data, logdir, kind="adam", **kwargs):
    w = tf.Variable(W0)
    optimizer = make_optimizer("keras", kind, 0.1)
    step = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(counted(w), optimizer, step, accumulation_steps=3)
    result = trainop.train(
        train_op,
        data,
        logdir=str(logdir) if logdir is not None else None,
        checkpoint={"w": w, "optimizer": optimizer} if logdir is not None else None,
        progress=False,
        global_step=step,
        **kwargs,
    )
    return w.numpy(), result, train_op


def test_a_run_stopped_inside_a_window_resumes_it_with_the_same_weights(tmp_path):
    data = list(zip(XS, YS))
    uninterrupted, result, _ = _train(data, None)
    assert result.global_step == 4
    # 7 batches: two windows and one call of the third, kept in the checkpointed sums, which
    # the resumed run restores (the data position says batch 7 was consumed).
    _, first, train_op = _train(data[:7], tmp_path, partial_window="keep")
    assert first.global_step == 2 and train_op.accumulator.pending_calls() == 1
    resumed, second, _ = _train(data, tmp_path)
    assert second.resumed_from is not None and second.global_step == 4
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-6)
    np.testing.assert_allclose(
        uninterrupted,
        reference("keras", "adam", [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]),
        rtol=2e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "partial_window,steps,windows",
    [
        ("apply", 3, [[0, 1, 2], [3, 4, 5], [6]]),
        ("drop", 2, [[0, 1, 2], [3, 4, 5]]),
        ("keep", 2, [[0, 1, 2], [3, 4, 5]]),
    ],
)
def test_the_end_of_the_data_inside_a_window_does_what_partial_window_says(
    partial_window, steps, windows, caplog
):
    with caplog.at_level(logging.INFO, logger="trainop"):
        found, result, train_op = _train(
            list(zip(XS, YS))[:7], None, kind="sgd", partial_window=partial_window
        )
    assert result.global_step == steps
    np.testing.assert_allclose(found, reference("keras", "sgd", windows), rtol=2e-5, atol=1e-6)
    assert train_op.accumulator.pending_calls() == (1 if partial_window == "keep" else 0)
    assert f"after 1 of its 3 calls: partial_window={partial_window!r}" in caplog.text


def test_a_graph_train_op_applies_its_partial_window_at_the_end_of_its_input(tmp_path):
    with tf.Graph().as_default():
        data = tf.compat.v1.data.make_one_shot_iterator(
            tf.data.Dataset.from_generator(
                lambda: iter(list(zip(XS, YS))[:5]),
                output_signature=(
                    tf.TensorSpec([None, 3], tf.float32),
                    tf.TensorSpec([None, 2], tf.float32),
                ),
            )
        )
        w, train_op = graph_train_op(*data.get_next())
        with tf.compat.v1.Session() as session:
            result = trainop.train(train_op, max_steps=100, session=session, progress=False)
            found = session.run(w)
    assert result.global_step == 2 and result.stopped_by == "end_of_data"
    np.testing.assert_allclose(found, reference("v1", "sgd", [[0, 1, 2], [3, 4]]), rtol=2e-5)


@pytest.mark.parametrize(
    "loss,error,message",
    [
        (lambda x, y: (tf.reduce_sum(x), "n"), TypeError, "real scalar count"),
        (lambda x, y: (tf.reduce_sum(x), tf.ones([2])), TypeError, "real scalar count"),
        (lambda x, y: (tf.reduce_sum(x), tf.constant(True)), TypeError, "real scalar count"),
        (lambda x, y: (x, tf.shape(x)[0]), ValueError, "must have a scalar loss_sum"),
        (lambda x, y: (tf.reduce_sum(x), -2.0), ValueError, "must have a count >= 0"),
        (
            lambda x, y: (tf.reduce_sum(x), -tf.shape(x)[0]),
            tf.errors.InvalidArgumentError,
            "must have a count >= 0",
        ),
        (lambda x, y: (x, y, x), TypeError, "or a pair (loss_sum, count)"),
    ],
)
def test_a_bad_count_is_refused(loss, error, message):
    w = tf.Variable(1.0)
    train_op = trainop.create_train_op(
        lambda x, y: loss(x * w, y), keras.optimizers.SGD(0.1), global_step=None
    )
    with pytest.raises(error, match=re.escape(message)):
        train_op(XS[0], YS[0])


def test_only_a_plain_pair_is_a_sum_and_count():
    """A namedtuple or a list is a loss structure, as TF-Agents' `LossInfo`: refused by
    `create_train_op`, picked by `create_train_step`'s `total_loss_fn`, never divided."""
    import collections

    LossInfo = collections.namedtuple("LossInfo", ["loss", "extra"])
    w = tf.Variable([2.0], name="w")
    for structure in (LossInfo, lambda a, b: [a, b]):
        train_op = trainop.create_train_op(
            lambda structure=structure: structure(tf.reduce_sum(w * w), 4.0),
            keras.optimizers.SGD(0.1),
        )
        with pytest.raises(TypeError, match="must return a scalar loss tensor"):
            train_op()
    with tf.Graph().as_default():
        v = tf.Variable([2.0], name="v")
        with pytest.raises(TypeError, match=r"through `total_loss_fn`"):
            trainop.create_train_step(
                (tf.reduce_sum(v * v), tf.constant(4.0)),
                tf.compat.v1.train.GradientDescentOptimizer(0.1),
            )
        losses = trainop.create_train_step(
            LossInfo(tf.reduce_sum(v * v), tf.constant(4.0)),
            tf.compat.v1.train.GradientDescentOptimizer(0.1),
            total_loss_fn=lambda info: info.loss,
        )
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(losses)
            assert session.run(v)[0] == pytest.approx(2.0 - 0.1 * 4.0)


def test_a_float16_sum_is_divided_in_float32():
    w = tf.Variable(np.ones(4, np.float16), name="w")
    train_op = trainop.create_train_op(
        lambda: (tf.reduce_sum(w) * np.float16(10000.0), tf.constant(70000.0)),
        keras.optimizers.SGD(0.1),
        global_step=None,
    )
    # 4 * 10000 / 70000, not 0 (70000 is inf in float16).
    assert float(train_op()) == pytest.approx(40000.0 / 70000.0, rel=1e-3)


def test_partial_window_must_be_one_of_its_values():
    w = tf.Variable(1.0)
    train_op = trainop.create_train_op(lambda: w * w, keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="`partial_window` must be 'apply', 'drop' or 'keep'"):
        trainop.train(train_op, max_steps=1, partial_window="flush")
