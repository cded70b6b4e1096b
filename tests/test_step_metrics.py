"""`step_metrics=True`: the last step's gradient norms, whether it applied, and the guard's
counts, written on the device by the step and read by the caller; against norms computed in
NumPy from a `tf.GradientTape`'s gradients."""

from __future__ import annotations

import re
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import FAMILIES, GraphRunner, make_optimizer

W0 = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
B0 = np.array([0.25, -0.5], np.float32)
X = np.array([[1.0, 2.0], [-1.0, 0.5], [0.0, 1.5]], np.float32)
CLIP = 0.5


def loss_of(w, b, x):
    return tf.reduce_mean(tf.square(x @ w + b))


def reference_norm(w, b, x):
    w, b = tf.Variable(w), tf.Variable(b)
    with tf.GradientTape() as tape:
        loss = loss_of(w, b, x)
    grads = tape.gradient(loss, [w, b])
    return float(np.sqrt(sum(np.sum(np.square(g.numpy().astype(np.float64))) for g in grads)))


def make(family, **kwargs):
    w, b = tf.Variable(W0, name="w"), tf.Variable(B0, name="b")
    train_op = trainop.create_train_op(
        lambda x: loss_of(w, b, x),
        make_optimizer(family, "sgd", 0.1),
        global_step=None,
        transform_grads_fn=trainop.clip_by_global_norm_fn(CLIP),
        step_metrics=True,
        **kwargs,
    )
    return w, b, train_op


def numbers(train_op):
    return {name: value.numpy() for name, value in train_op.step_metrics.result().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_norms_before_and_after_the_transform_and_whether_it_applied(family):
    w, b, train_op = make(family, check_numerics="skip")
    raw = reference_norm(W0, B0, X)
    assert raw > CLIP  # the clip binds
    train_op(X)
    found = numbers(train_op)
    assert found["gradient_norm"] == pytest.approx(raw, rel=1e-6)
    assert found["applied_gradient_norm"] == pytest.approx(CLIP, rel=1e-6)
    assert found["applied"] and found["skipped_steps"] == 0

    # The next step from the weights the first left.
    second = reference_norm(w.numpy(), b.numpy(), X * 0.1)
    train_op(X * 0.1)
    found = numbers(train_op)
    assert found["gradient_norm"] == pytest.approx(second, rel=1e-6)
    assert found["applied_gradient_norm"] == pytest.approx(min(second, CLIP), rel=1e-6)

    # A skipped step: not applied, its norm NaN, the applied norm kept, counted.
    train_op(X * np.nan)
    found = numbers(train_op)
    assert not found["applied"] and np.isnan(found["gradient_norm"])
    assert found["applied_gradient_norm"] == pytest.approx(min(second, CLIP), rel=1e-6)
    assert (found["skipped_steps"], found["consecutive_skipped_steps"]) == (1, 1)


def test_the_step_returns_the_loss_only_and_calls_back_to_no_host_code():
    _, _, train_op = make("keras")
    loss = train_op(X)
    assert isinstance(loss, tf.Tensor) and loss.shape == ()
    graph = train_op.get_concrete_function(tf.TensorSpec([None, 2], tf.float32)).graph
    types = {op.type for op in graph.get_operations()}
    assert not types & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
    assert "AssignVariableOp" in types  # the numbers are written on the device
    assert set(numbers(train_op)) == {"gradient_norm", "applied_gradient_norm", "applied"}


def test_a_step_the_loss_scale_optimizer_skips_is_not_applied():
    w = tf.Variable(W0, name="w")
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    train_op = trainop.create_train_op(
        lambda scale: tf.reduce_sum(w) * scale, optimizer, global_step=None, step_metrics=True
    )
    train_op(tf.constant(1.0))
    assert numbers(train_op)["applied"]
    assert numbers(train_op)["applied_gradient_norm"] == pytest.approx(2.0)  # 4 ones
    train_op(tf.constant(1e35))  # finite loss; its scaled gradients overflow
    found = numbers(train_op)
    assert not found["applied"]
    assert found["applied_gradient_norm"] == pytest.approx(2.0)
    assert found["gradient_norm"] == np.inf  # unscaled from the overflowed ones


def test_accumulation_applies_once_a_window_with_the_norm_of_its_mean():
    w, b, train_op = make("keras", accumulation_steps=2)
    train_op(X)
    assert not numbers(train_op)["applied"]
    assert numbers(train_op)["gradient_norm"] == pytest.approx(reference_norm(W0, B0, X), 1e-6)
    train_op(X * 0.01)
    found = numbers(train_op)
    assert found["applied"]
    wv, bv = tf.Variable(W0), tf.Variable(B0)
    with tf.GradientTape() as tape:
        loss = (loss_of(wv, bv, X) + loss_of(wv, bv, X * 0.01)) / 2
    mean = tape.gradient(loss, [wv, bv])
    norm = float(tf.linalg.global_norm(mean))
    assert found["applied_gradient_norm"] == pytest.approx(min(norm, CLIP), rel=1e-6)


def test_under_xla_with_steps_per_call_the_last_step_is_kept():
    w, b, train_op = make("keras", jit_compile=True, steps_per_call=2)
    batches = np.stack([X, X * 0.2])
    train_op(batches)
    # The second step's norm, from the weights after the first (SGD on the clipped gradient).
    wv, bv = tf.Variable(W0), tf.Variable(B0)
    with tf.GradientTape() as tape:
        loss = loss_of(wv, bv, X)
    grads = tape.gradient(loss, [wv, bv])
    clipped, _ = tf.clip_by_global_norm(grads, CLIP)
    wv.assign_sub(0.1 * clipped[0])
    bv.assign_sub(0.1 * clipped[1])
    found = numbers(train_op)
    assert found["gradient_norm"] == pytest.approx(
        reference_norm(wv.numpy(), bv.numpy(), X * 0.2), rel=1e-5
    )
    assert found["applied"]


@pytest.mark.parametrize("family", ["v1", "keras"])
def test_in_a_v1_graph_read_with_the_session(family):
    runner = GraphRunner()
    try:
        x = tf.compat.v1.placeholder(tf.float32, [None, 2])
        w, b = runner.variable(W0, "w"), runner.variable(B0, "b")
        train_op = trainop.create_train_op(
            loss_of(w, b, x),
            make_optimizer(family, "sgd", 0.1),
            check_numerics="skip",
            transform_grads_fn=trainop.clip_by_global_norm_fn(CLIP),
            step_metrics=True,
        )
        runner.initialize()
        metrics = train_op.step_metrics.result()
        runner.session.run(train_op, {x: X})
        first = runner.session.run(metrics)
        runner.session.run(train_op, {x: X * np.inf})
        second = runner.session.run(metrics)
    finally:
        runner.close()
    assert first["gradient_norm"] == pytest.approx(reference_norm(W0, B0, X), rel=1e-6)
    assert first["applied_gradient_norm"] == pytest.approx(CLIP, rel=1e-6) and first["applied"]
    assert not second["applied"] and second["skipped_steps"] == 1
    assert second["applied_gradient_norm"] == pytest.approx(CLIP, rel=1e-6)


def test_model_fit_logs_them():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    y = np.ones((3, 1), np.float32)
    trainop.keras.compile(model, optimizer="sgd", loss="mse", step_metrics=True)
    history = model.fit(X, y, batch_size=3, verbose=0)
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(y, copy(X))
    norm = float(tf.linalg.global_norm(tape.gradient(loss, copy.trainable_variables)))
    assert history.history["gradient_norm"][0] == pytest.approx(norm, rel=1e-5)
    assert history.history["applied_gradient_norm"][0] == pytest.approx(norm, rel=1e-5)
    assert history.history["applied"] == [1.0]


def test_the_progress_bar_shows_the_gradient_norm(capsys):
    step = tf.Variable(0, dtype=tf.int64)
    w, b = tf.Variable(W0), tf.Variable(B0)
    counted = trainop.create_train_op(
        lambda x: loss_of(w, b, x),
        keras.optimizers.SGD(0.1),
        step,
        check_numerics="skip",
        step_metrics=True,
    )
    # The bar's postfix is read at most twice a second: a slow hook lets it be.
    slow = trainop.Hook(lambda step, loss: time.sleep(0.3), every_n_steps=1)
    trainop.train(counted, [(X,)] * 4, progress=True, global_step=step, hooks=[slow])
    err = capsys.readouterr().err
    shown = re.search(r"grad_norm=([0-9.e+-]+)", err)
    assert shown is not None and "skipped=0" in err, err
    assert float(shown.group(1)) == pytest.approx(reference_norm(W0, B0, X), rel=1e-3)


def test_bad_settings_are_refused():
    w = tf.Variable(1.0)
    with pytest.raises(TypeError, match="`step_metrics` must be True or False"):
        trainop.create_train_op(lambda: w * w, keras.optimizers.SGD(0.1), step_metrics="yes")
    train_op = trainop.create_train_op(
        lambda: w * w, keras.optimizers.SGD(0.1), global_step=None, step_metrics=True
    )
    with pytest.raises(ValueError, match="no step has run yet"):
        train_op.step_metrics.result()
    assert trainop.create_train_op(lambda: w * w, keras.optimizers.SGD(0.1)).step_metrics is None


def test_an_embedding_gradient_is_measured_as_the_dense_gradient_it_adds_up_to():
    table = tf.Variable(np.ones((4, 3), np.float32), name="table")
    train_op = trainop.create_train_op(
        lambda ids: tf.reduce_sum(tf.nn.embedding_lookup(table, ids)),
        keras.optimizers.SGD(0.1),
        global_step=None,
        step_metrics=True,
    )
    train_op(tf.constant([0, 2, 2]))
    # Dense gradient: row 0 ones, row 2 twos (its two slices summed, not measured apart).
    assert numbers(train_op)["gradient_norm"] == pytest.approx(np.sqrt(3 * 1 + 3 * 4), rel=1e-6)


def test_an_update_undone_by_check_updates_is_not_applied():
    w = tf.Variable([1.0, 2.0], name="w")
    train_op = trainop.create_train_op(
        lambda scale: tf.reduce_sum(w) * scale,
        tf.compat.v1.train.GradientDescentOptimizer(1e10),
        global_step=None,
        check_numerics=trainop.SkipNonFiniteSteps(check_updates=True),
        step_metrics=True,
    )
    train_op(tf.constant(1e-10))
    applied_norm = numbers(train_op)["applied_gradient_norm"]
    train_op(tf.constant(1e30))  # finite gradients, an inf update: undone
    found = numbers(train_op)
    assert not found["applied"] and found["skipped_steps"] == 1
    assert found["applied_gradient_norm"] == applied_norm
