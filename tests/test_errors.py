"""Bad input gets a ValueError or TypeError naming the argument, when the train op is built."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer, optimizer_state


def build(runner, loss_fn, optimizer=None, **kwargs):
    """Builds the train op and, in eager mode, traces it (the first call)."""
    step = runner.train_op(loss_fn, optimizer or make_optimizer("keras"), **kwargs)
    if runner.mode == "eager":
        step.op.get_concrete_function()
    return step


def test_non_scalar_loss(runner):
    w = runner.variable([1.0, 2.0], "w")
    with pytest.raises(ValueError, match="`total_loss` must be a scalar.*shape \\(2,\\)"):
        build(runner, lambda: w * w)


def test_integer_loss(runner):
    w = runner.variable(1, "w", dtype=tf.int32)
    with pytest.raises(TypeError, match="`total_loss` must be a floating-point.*int32"):
        build(runner, lambda: w * w)


def test_unknown_optimizer(runner):
    w = runner.variable(1.0, "w")
    with pytest.raises(TypeError, match="`optimizer` must be.*Received: optimizer='adam'"):
        build(runner, lambda: w * w, optimizer="adam")


def test_tensor_loss_in_eager_mode_asks_for_a_callable():
    w = tf.Variable(1.0)
    with pytest.raises(TypeError, match="`total_loss` must be a callable"):
        trainop.create_train_op(w * w, make_optimizer("keras"))


def test_empty_variables_to_train(runner):
    w = runner.variable(1.0, "w")
    with pytest.raises(ValueError, match="`variables_to_train` is empty"):
        build(runner, lambda: w * w, variables_to_train=[])


def test_eager_loss_that_reads_no_variable():
    train_op = trainop.create_train_op(lambda: tf.constant(1.0), make_optimizer("keras"))
    with pytest.raises(ValueError, match="`variables_to_train` is None and the loss reads no"):
        train_op()


def test_variable_that_is_not_trainable_is_named(runner):
    w = runner.variable(1.0, "w")
    frozen = runner.variable(1.0, "frozen_scale", trainable=False)
    with pytest.raises(ValueError, match="not trainable: frozen_scale"):
        build(runner, lambda: w * frozen, variables_to_train=[w, frozen])


def test_variables_to_train_holding_something_else(runner):
    w = runner.variable(1.0, "w")
    with pytest.raises(TypeError, match="`variables_to_train` must hold variables"):
        build(runner, lambda: w * w, variables_to_train=[w, 3.0])


@pytest.mark.parametrize("gate", [3, -1, "op", True])
def test_unknown_gate_gradients(runner, gate):
    w = runner.variable(1.0, "w")
    with pytest.raises(ValueError, match="`gate_gradients` must be.*Received: gate_gradients="):
        build(runner, lambda: w * w, gate_gradients=gate)


@pytest.mark.parametrize("method", [7, "add_n"])
def test_unknown_aggregation_method(runner, method):
    w = runner.variable(1.0, "w")
    with pytest.raises(ValueError, match="`aggregation_method` must be"):
        build(runner, lambda: w * w, aggregation_method=method)


def test_transform_grads_fn_returning_no_list(runner):
    w = runner.variable(1.0, "w")
    with pytest.raises(TypeError, match="`transform_grads_fn` must return a list of"):
        build(runner, lambda: w * w, transform_grads_fn=lambda gv: None)


def test_transform_grads_fn_returning_other_variables(runner):
    w = runner.variable(1.0, "w")
    v = runner.variable(1.0, "other")
    with pytest.raises(ValueError, match="`transform_grads_fn` must return a pair for each"):
        build(runner, lambda: w * w + v * v, transform_grads_fn=lambda gv: gv[:1])


def test_transform_grads_fn_not_callable(runner):
    w = runner.variable(1.0, "w")
    with pytest.raises(TypeError, match="`transform_grads_fn` must be a callable"):
        build(runner, lambda: w * w, transform_grads_fn=0.5)


def test_global_step_of_the_wrong_kind(runner):
    w = runner.variable(1.0, "w")
    float_step = runner.variable(0.0, "float_step", trainable=False)
    with pytest.raises(TypeError, match="`global_step` must be an integer tf.Variable"):
        build(runner, lambda: w * w, global_step=float_step)
    with pytest.raises(TypeError, match="`global_step` must be"):
        build(runner, lambda: w * w, global_step=5)


def test_eager_update_ops_that_are_not_callables():
    w = tf.Variable(1.0)
    with pytest.raises(TypeError, match="`update_ops` must be a list of zero-argument"):
        trainop.create_train_op(lambda: w * w, make_optimizer("keras"), update_ops=[w.assign(2.0)])


def test_no_gradient_for_any_variable(runner):
    w = runner.variable(1.0, "w")
    v = runner.variable(1.0, "v")
    with pytest.raises(ValueError, match="no gradient with respect to any.*'v'"):
        build(runner, lambda: w * w, variables_to_train=[v])


def _adam_steps(w, grads_of, steps, epsilon=1e-7, lr=0.1, beta_1=0.9, beta_2=0.999):
    """`steps` Adam updates of `w` in float64, the gradient `grads_of(w)`."""
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t in range(1, steps + 1):
        g = grads_of(w)
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        alpha = lr * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        w = w - alpha * m / (np.sqrt(v) + epsilon)
    return w


def test_a_build_that_fails_late_leaves_the_optimizer_and_the_train_op_as_they_were(runner, family):
    # The build fails in the transform's check, after the gradients exist and the optimizer
    # has made its state for the variables: the train op built before it, sharing that
    # optimizer and the global step, must go on as if the failed build had never been tried.
    w0 = np.array([1.0, -2.0], np.float32)
    w = runner.variable(w0, "w")
    optimizer = make_optimizer(family, "adam", 0.1)
    step = runner.train_op(lambda: tf.reduce_sum(w * w), optimizer)
    step()
    before = [runner.read(w), runner.read(runner.global_step())]
    before += optimizer_state(optimizer, [w], runner)
    with pytest.raises(ValueError, match="does not fit its variable w"):
        build(
            runner,
            lambda: tf.reduce_sum(w * w),
            optimizer,
            transform_grads_fn=lambda gv: [(tf.reduce_sum(g), v) for g, v in gv],
        )
    after = [runner.read(w), runner.read(runner.global_step())]
    after += optimizer_state(optimizer, [w], runner)
    assert len(after) == len(before) > 2
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    step()
    # Two Adam steps on |w|^2 (gradient 2w), as if the failed build had not happened.
    epsilon = 1e-8 if family == "v1" else 1e-7
    expected = _adam_steps(w0.astype(np.float64), lambda v: 2.0 * v, 2, epsilon)
    np.testing.assert_allclose(runner.read(w), expected, rtol=1e-5)
    assert runner.read(runner.global_step()) == 2


def test_tf_keras_loss_scale_optimizer_is_refused_rather_than_misapplied():
    import tf_keras

    w = tf.Variable(1.0)
    optimizer = tf_keras.mixed_precision.LossScaleOptimizer(tf_keras.optimizers.SGD(0.1))
    with pytest.raises(TypeError, match="`optimizer` is a tf_keras LossScaleOptimizer"):
        trainop.create_train_op(lambda: w * w, optimizer)
    assert w.numpy() == 1.0


def test_gradient_accumulating_optimizer_is_refused():
    import keras

    w = tf.Variable(1.0)
    with pytest.raises(TypeError, match="gradient_accumulation_steps=4"):
        trainop.create_train_op(lambda: w * w, keras.optimizers.SGD(gradient_accumulation_steps=4))


def test_summarize_gradients_without_any_step_to_write_at(tmp_path):
    w = tf.Variable(1.0)
    writer = tf.summary.create_file_writer(str(tmp_path))
    train_op = trainop.create_train_op(
        lambda: w * w, make_optimizer("v1"), global_step=None, summarize_gradients=True
    )
    with writer.as_default(), pytest.raises(ValueError, match="`summarize_gradients=True` needs"):
        train_op()
    assert w.numpy() == 1.0


@pytest.mark.parametrize("update_ops", [5, ["x"], [lambda: None], [None]])
def test_graph_update_ops_of_the_wrong_kind(update_ops):
    with tf.Graph().as_default():
        w = tf.Variable(1.0)
        with pytest.raises(TypeError, match="`update_ops` must be a list of ops"):
            trainop.create_train_op(w * w, make_optimizer("v1"), update_ops=update_ops)


def test_transform_grads_fn_returning_a_gradient_of_the_wrong_shape(runner):
    w = runner.variable([1.0, 2.0], "w")
    with pytest.raises(ValueError, match="does not fit its variable w"):
        build(
            runner,
            lambda: tf.reduce_sum(w * w),
            transform_grads_fn=lambda gv: [(tf.reduce_sum(g), v) for g, v in gv],
        )


@pytest.mark.parametrize("returned", [1.5, "variable"])
def test_eager_loss_that_returns_no_tensor(returned):
    w = tf.Variable(1.0)
    train_op = trainop.create_train_op(
        lambda: w if returned == "variable" else returned, make_optimizer("keras")
    )
    with pytest.raises(TypeError, match="`total_loss` must return a scalar loss tensor"):
        train_op()


def test_check_numerics_and_gate_gradients_of_the_wrong_type(runner):
    w = runner.variable(1.0, "w")
    with pytest.raises(ValueError, match="`check_numerics` must be True, False, .skip. or"):
        build(runner, lambda: w * w, check_numerics="no")
    with pytest.raises(TypeError, match="`check_numerics` must be True, False, .skip. or"):
        build(runner, lambda: w * w, check_numerics=1)
    with pytest.raises(ValueError, match="`gate_gradients` must be"):
        build(runner, lambda: w * w, gate_gradients=1.0)


def test_missing_gradients_raise_names_every_variable_without_gradient(runner):
    used = runner.variable(1.0, "used")
    idle_a = runner.variable(1.0, "idle_a")
    idle_b = runner.variable(1.0, "idle_b")
    with pytest.raises(ValueError, match=r"missing_gradients='raise'.*idle_a.*idle_b"):
        build(
            runner,
            lambda: used * used,
            variables_to_train=[used, idle_a, idle_b],
            missing_gradients="raise",
        )
    with pytest.raises(ValueError, match="`missing_gradients` must be 'log' or 'raise'"):
        build(runner, lambda: used * used, missing_gradients="ignore")


def test_missing_gradients_raise_is_quiet_when_every_variable_has_a_gradient(runner):
    w = runner.variable(1.0, "w")
    step = runner.train_op(lambda: w * w, make_optimizer("keras"), missing_gradients="raise")
    step()
    assert runner.read(w) == pytest.approx(0.8)
