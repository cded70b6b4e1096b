"""What a Keras 3 variable carries besides its value: `trainable` and `constraint`.

A Keras 3 variable wraps a `tf.Variable`; a `tf.GradientTape` sees only the inner one, whose
own `trainable` flag Keras never changes, and only Keras 3 optimizers apply the Keras
variable's constraint. The train op honours both whatever the optimizer family.

Eager only: Keras 3 does not build its layers in a `tf.compat.v1` graph (its variables are
initialized eagerly, at creation), so there is no graph-mode Keras 3 model to train.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import FAMILIES, make_optimizer

LEARNING_RATE = 0.1
X = np.random.RandomState(0).randn(8, 2).astype("float32")
Y = np.random.RandomState(1).randn(8, 1).astype("float32")


def _frozen_base_model(kernel_constraint=None):
    keras.utils.set_random_seed(7)
    base = keras.layers.Dense(3, name="base")
    head = keras.layers.Dense(1, name="head", kernel_constraint=kernel_constraint)
    model = keras.Sequential([keras.Input((2,)), base, head])
    base.trainable = False
    return model, base, head


def _loss_fn(model):
    return lambda: tf.reduce_mean(tf.square(model(X) - Y))


def _hand_sgd(model, variables):
    """`w - lr * grad` for each of `variables`, the gradients taken at the current weights."""
    with tf.GradientTape() as tape:
        loss = _loss_fn(model)()
    grads = tape.gradient(loss, variables)
    return [v.numpy() - LEARNING_RATE * g.numpy() for v, g in zip(variables, grads)]


@pytest.mark.parametrize("given", ["none", "list"])
@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_layer_stays_and_head_trains(family, given):
    model, base, head = _frozen_base_model()
    base_before = [v.numpy().copy() for v in base.weights]
    expected_head = _hand_sgd(model, head.trainable_variables)
    variables = None if given == "none" else model.trainable_variables

    train_op = trainop.create_train_op(
        _loss_fn(model), make_optimizer(family), variables_to_train=variables
    )
    train_op()

    for v, before in zip(base.weights, base_before):
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
    for v, expected in zip(head.weights, expected_head):
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=v.path)


def test_only_frozen_layers_read_is_nothing_to_train():
    model, _, head = _frozen_base_model()
    head.trainable = False
    train_op = trainop.create_train_op(_loss_fn(model), make_optimizer("v1"))
    with pytest.raises(ValueError, match="variables_to_train"):
        train_op()


def _constrained_model():
    """A head whose kernel SGD drives below zero, for `NonNeg` to clip."""
    model, base, head = _frozen_base_model(kernel_constraint=keras.constraints.NonNeg())
    base.kernel.assign(np.ones((2, 3), "float32"))
    base.bias.assign(np.zeros(3, "float32"))
    head.kernel.assign(np.array([[0.01], [0.5], [2.0]], "float32"))
    return model, head


@pytest.mark.parametrize("given", ["none", "list"])
@pytest.mark.parametrize("family", FAMILIES)
def test_constraint_is_applied_by_every_family(family, given):
    model, head = _constrained_model()
    expected_kernel, expected_bias = _hand_sgd(model, [head.kernel, head.bias])
    assert (expected_kernel < 0).any() and (expected_kernel > 0).any()
    variables = None if given == "none" else model.trainable_variables

    train_op = trainop.create_train_op(
        _loss_fn(model), make_optimizer(family), variables_to_train=variables
    )
    train_op()

    np.testing.assert_allclose(
        head.kernel.numpy(), np.maximum(expected_kernel, 0.0), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(head.bias.numpy(), expected_bias, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_inner_tf_variables_given_stand_for_their_keras_variables(family):
    """The `tf.Variable` inside each Keras variable (`variable.value`, or what a tape
    watched), given as `variables_to_train`: its Keras variable's constraint is applied."""
    model, head = _constrained_model()
    expected_kernel, expected_bias = _hand_sgd(model, [head.kernel, head.bias])
    inner = [v.value for v in model.trainable_variables]
    assert all(type(v) is not type(head.kernel) for v in inner)

    trainop.create_train_op(_loss_fn(model), make_optimizer(family), variables_to_train=inner)()

    np.testing.assert_allclose(
        head.kernel.numpy(), np.maximum(expected_kernel, 0.0), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(head.bias.numpy(), expected_bias, rtol=1e-6, atol=1e-7)


def test_inner_tf_variable_of_a_frozen_layer_given_is_refused():
    """Keras never changes the inner `tf.Variable`'s own `trainable`: the frozen layer's is
    told by its Keras variable, and refused before anything changes."""
    model, base, _ = _frozen_base_model()
    before = [v.numpy() for v in model.weights]
    with pytest.raises(ValueError, match="not trainable: .*kernel.*layer.trainable = True"):
        trainop.create_train_op(
            _loss_fn(model),
            make_optimizer("v1"),
            variables_to_train=[v.value for v in model.weights],
        )
    assert base.kernel.value.trainable
    for v, value in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), value)


def test_constraint_as_keras_applies_it():
    """The reference: Keras's own `apply_gradients` on the Keras variables."""
    model, head = _constrained_model()
    reference, reference_head = _constrained_model()
    optimizer = keras.optimizers.SGD(LEARNING_RATE)
    with tf.GradientTape() as tape:
        loss = _loss_fn(reference)()
    variables = reference.trainable_variables
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

    trainop.create_train_op(_loss_fn(model), make_optimizer("tf_keras_legacy"))()

    for v, expected in zip(head.weights, reference_head.weights):
        np.testing.assert_allclose(v.numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_step_applies_no_constraint(family):
    model, head = _constrained_model()
    # A kernel the constraint would change, set around it: a skipped step must leave it.
    head.kernel.assign(np.array([[-1.0], [0.5], [2.0]], "float32"))
    before = [v.numpy().copy() for v in model.weights]
    nan = tf.Variable(np.nan, dtype=tf.float32, trainable=False)

    train_op = trainop.create_train_op(
        lambda: _loss_fn(model)() * nan, make_optimizer(family), check_numerics="skip"
    )
    train_op()

    for v, expected in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), expected, err_msg=v.path)


def test_accumulated_update_with_constraint_applies_every_mean():
    """A tf_keras optimizer, a Keras 3 constraint, accumulation over two calls: every variable
    takes its mean gradient. The accumulator's sums were read in the branch that also resets
    them, and Grappler could drop the order of read and reset: the bias of the second layer,
    whose constraint-free update nothing else waits for, took a mean of zero about half the
    time. Repeated, as the fault was a race."""
    x, zeros = np.zeros((2, 1), "float32"), np.zeros((2, 2), "float32")
    target = zeros.copy()
    target[1, 1] = 0.25
    expected_bias = [0.0, LEARNING_RATE * 0.25 / 2]  # -lr * the mean of 0 and -0.25
    for _ in range(12):
        constrained = keras.layers.Dense(
            2,
            use_bias=False,
            kernel_initializer="zeros",
            kernel_constraint=keras.constraints.NonNeg(),
        )
        free = keras.layers.Dense(2, kernel_initializer="zeros")

        def loss_fn(x, t, constrained=constrained, free=free):
            return 0.5 * tf.reduce_sum(tf.square(constrained(x))) + 0.5 * tf.reduce_sum(
                tf.square(free(x) - t)
            )

        train_op = trainop.create_train_op(
            loss_fn, make_optimizer("tf_keras", learning_rate=LEARNING_RATE), accumulation_steps=2
        )
        train_op(x, zeros)
        train_op(x, target)
        np.testing.assert_allclose(free.bias.numpy(), expected_bias, rtol=0, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_create_train_step_keeps_a_frozen_layer_frozen(family):
    """`create_train_step` in eager mode finds the variables as the train op does: the Keras
    variables the loss reads, a frozen layer's left out."""
    model, base, head = _frozen_base_model()
    base_before = [v.numpy().copy() for v in base.weights]
    expected_head = _hand_sgd(model, head.trainable_variables)

    trainop.create_train_step(_loss_fn(model), make_optimizer(family))

    for v, before in zip(base.weights, base_before):
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
    for v, expected in zip(head.weights, expected_head):
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=v.path)


@pytest.mark.parametrize("entry", ["create_train_op", "create_train_step"])
@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_layer_stays_when_the_loss_calls_a_function_traced_before(family, entry):
    """A forward pass traced before (for evaluation, say) reads the Keras variables when it was
    traced, not in the train op's trace: the frozen layer is still found frozen."""
    model, base, head = _frozen_base_model()
    forward = tf.function(lambda x: model(x))
    forward(X)
    base_before = [v.numpy().copy() for v in base.weights]
    expected_head = _hand_sgd(model, head.trainable_variables)

    def loss():
        return tf.reduce_mean(tf.square(forward(X) - Y))

    if entry == "create_train_op":
        trainop.create_train_op(loss, make_optimizer(family))()
    else:
        trainop.create_train_step(loss, make_optimizer(family))

    for v, before in zip(base.weights, base_before):
        np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)
    for v, expected in zip(head.weights, expected_head):
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=v.path)
