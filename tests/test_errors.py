"""Bad input gets a ValueError or TypeError naming the argument, when the train op is built."""

from __future__ import annotations

import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer


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


def test_nothing_trained_is_lost_when_building_fails(runner):
    # A failed build leaves the variables as they were.
    w = runner.variable(2.0, "w")
    step = runner.train_op(lambda: w * w, make_optimizer("keras"), global_step=None)
    step()
    with pytest.raises(ValueError):
        build(runner, lambda: w * w, gate_gradients=9)
    assert runner.read(w) == pytest.approx(1.6)


def test_loss_scale_optimizer_is_refused_rather_than_misapplied():
    import keras
    import tf_keras

    w = tf.Variable(1.0)
    for optimizer in (
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
        tf_keras.mixed_precision.LossScaleOptimizer(tf_keras.optimizers.SGD(0.1)),
    ):
        with pytest.raises(TypeError, match="`optimizer` is a LossScaleOptimizer"):
            trainop.create_train_op(lambda: w * w, optimizer)
    assert w.numpy() == 1.0
