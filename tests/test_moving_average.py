"""`moving_average=trainop.ExponentialMovingAverage(...)`: the average of the trained variables,
against the formula applied, in float64, to the weights the run had after each applied update;
and against Keras 3's own `use_ema`.
"""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import FAMILIES, GraphRunner, make_optimizer

INITIAL = {
    "kernel": np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(3, 2),
    "bias": np.array([0.5, -0.25], np.float32),
}
BATCHES = np.random.default_rng(3).normal(size=(6, 4, 3)).astype(np.float32)


def loss_of(weights, x):
    return tf.reduce_mean((tf.tanh(x @ weights["kernel"] + weights["bias"]) - 0.5) ** 2)


def expected_average(history, decay, dynamic=False):
    """The formula, in float64, over the weights after each applied update."""
    average = None
    for n, weights in enumerate(history):
        weights = np.asarray(weights, np.float64)
        if average is None:
            average = weights
            continue
        d = min(decay, (1 + n) / (10 + n)) if dynamic else decay
        average = d * average + (1 - d) * weights
    return average


def run_eager(family, batches, ema, kind="adam", **kwargs):
    """Trains one call per batch; returns the weights and, per name, the weights after each
    update that changed the optimizer's state (the applied ones)."""
    weights = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    train_op = trainop.create_train_op(
        lambda x: loss_of(weights, x),
        make_optimizer(family, kind, 0.05),
        global_step=None,
        moving_average=ema,
        **kwargs,
    )
    history = {name: [] for name in weights}
    for x in batches:
        train_op(tf.constant(x))
        if np.isfinite(x).all():
            for name, v in weights.items():
                history[name].append(v.numpy())
    return weights, history


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_the_average_follows_the_formula_over_the_applied_steps(family, dynamic):
    batches = BATCHES.copy()
    batches[2, 0, 0] = np.nan  # skipped by the guard: not averaged
    ema = trainop.ExponentialMovingAverage(0.8, dynamic_decay=dynamic)
    weights, history = run_eager(family, batches, ema, check_numerics="skip")
    for name, v in weights.items():
        np.testing.assert_allclose(
            ema.average(v).numpy(), expected_average(history[name], 0.8, dynamic), rtol=1e-6
        )
    assert int(ema.averaged_updates.numpy()) == len(batches) - 1
    # The weights are trained as without an average.
    plain, _ = run_eager(family, batches, None, check_numerics="skip")
    for name in weights:
        np.testing.assert_array_equal(weights[name].numpy(), plain[name].numpy())


@pytest.mark.parametrize("family", ["v1", "keras"])
def test_in_a_v1_graph_with_the_skip_guard_and_swapped_with_a_session(family):
    runner = GraphRunner()
    ema = trainop.ExponentialMovingAverage(0.5)
    try:
        x = tf.compat.v1.placeholder(tf.float32, [4, 3])
        weights = {name: runner.variable(value, name) for name, value in INITIAL.items()}
        train_op = trainop.create_train_op(
            loss_of(weights, x),
            make_optimizer(family, "sgd", 0.1),
            check_numerics="skip",
            moving_average=ema,
        )
        runner.initialize()
        history = []
        batches = BATCHES[:4].copy()
        batches[1, 2, 2] = np.inf
        for batch in batches:
            runner.session.run(train_op, {x: batch})
            if np.isfinite(batch).all():
                history.append(runner.read(weights["kernel"]))
        average = runner.session.run(ema.average(weights["kernel"]))
        trained = runner.read(weights["kernel"])
        with ema.swap_weights(runner.session):
            swapped = runner.read(weights["kernel"])
        after = runner.read(weights["kernel"])
    finally:
        runner.close()
    np.testing.assert_allclose(average, expected_average(history, 0.5), rtol=1e-6)
    np.testing.assert_array_equal(swapped, average)
    np.testing.assert_array_equal(after, trained)


def test_equal_to_keras_use_ema():
    """Keras 3's own average (`use_ema=True`): the same formula, the same first copy."""
    keras_weights = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    keras_adam = keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.9)
    for x in BATCHES:
        with tf.GradientTape() as tape:
            loss = loss_of(keras_weights, tf.constant(x))
        variables = list(keras_weights.values())
        keras_adam.apply_gradients(zip(tape.gradient(loss, variables), variables))
    ema = trainop.ExponentialMovingAverage(0.9)
    weights, _ = run_eager("keras", BATCHES, ema)
    for i, name in enumerate(weights):
        np.testing.assert_allclose(
            ema.average(weights[name]).numpy(),
            keras_adam._model_variables_moving_average[i].numpy(),
            rtol=1e-6,
        )


def test_a_step_the_loss_scale_optimizer_skips_is_not_averaged():
    w = tf.Variable([1.0, 2.0], name="w")
    ema = trainop.ExponentialMovingAverage(0.5)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    train_op = trainop.create_train_op(
        lambda scale: tf.reduce_sum(w * w) * scale,
        optimizer,
        global_step=None,
        check_numerics=False,
        moving_average=ema,
    )
    train_op(tf.constant(1.0))
    after_first = w.numpy()
    train_op(tf.constant(3e38))  # the scaled gradients overflow: skipped by the optimizer
    np.testing.assert_array_equal(w.numpy(), after_first)
    train_op(tf.constant(1.0))
    expected = 0.5 * after_first + 0.5 * w.numpy()
    np.testing.assert_allclose(ema.average(w).numpy(), expected, rtol=1e-6)
    assert int(ema.averaged_updates.numpy()) == 2


def test_accumulation_averages_once_per_window():
    ema = trainop.ExponentialMovingAverage(0.5)
    weights, _ = run_eager("keras", BATCHES[:4], ema, kind="sgd", accumulation_steps=2)
    assert int(ema.averaged_updates.numpy()) == 2
    plain = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    sgd = keras.optimizers.SGD(0.05)
    history = []
    for window in (BATCHES[:2], BATCHES[2:4]):
        with tf.GradientTape() as tape:
            loss = tf.add_n([loss_of(plain, tf.constant(x)) for x in window]) / 2
        variables = list(plain.values())
        sgd.apply_gradients(zip(tape.gradient(loss, variables), variables))
        history.append(plain["kernel"].numpy())
    np.testing.assert_allclose(
        ema.average(weights["kernel"]).numpy(), expected_average(history, 0.5), rtol=1e-5
    )


def test_swap_weights_puts_the_averages_in_and_the_weights_back_bit_for_bit():
    ema = trainop.ExponentialMovingAverage(0.9)
    weights, _ = run_eager("tf_keras", BATCHES, ema)
    trained = {name: v.numpy() for name, v in weights.items()}
    with ema.swap_weights():
        for name, v in weights.items():
            np.testing.assert_array_equal(v.numpy(), ema.average(v).numpy())
            assert not np.array_equal(v.numpy(), trained[name])
    for name, v in weights.items():
        np.testing.assert_array_equal(v.numpy(), trained[name])
    # An error inside the block puts them back too.
    with pytest.raises(RuntimeError, match="evaluation failed"), ema.swap_weights():
        raise RuntimeError("evaluation failed")
    for name, v in weights.items():
        np.testing.assert_array_equal(v.numpy(), trained[name])


def test_a_float16_variable_is_averaged_in_float32():
    w = tf.Variable(np.array([1.0], np.float16), name="w")
    ema = trainop.ExponentialMovingAverage(0.999)
    train_op = trainop.create_train_op(
        lambda: -tf.reduce_sum(tf.cast(w, tf.float32)),
        keras.optimizers.SGD(2.0**-6),
        global_step=None,
        moving_average=ema,
    )
    history = []
    for _ in range(20):
        train_op()
        history.append(w.numpy())
    assert ema.average(w).dtype == tf.float32
    np.testing.assert_allclose(ema.average(w).numpy(), expected_average(history, 0.999), rtol=1e-6)
    # In float16, (1 - 0.999) * (w - average) would round to nothing: the average would stick.
    assert ema.average(w).numpy()[0] > 1.0


def test_an_update_undone_by_check_updates_leaves_the_average():
    w = tf.Variable([1.0, 2.0], name="w")
    ema = trainop.ExponentialMovingAverage(0.5)
    train_op = trainop.create_train_op(
        lambda scale: tf.reduce_sum(w) * scale,
        tf.compat.v1.train.GradientDescentOptimizer(1e10),
        global_step=None,
        check_numerics=trainop.SkipNonFiniteSteps(check_updates=True),
        moving_average=ema,
    )
    train_op(tf.constant(1e-10))
    average = ema.average(w).numpy()
    train_op(tf.constant(1e30))  # finite gradients, an inf update: undone
    np.testing.assert_array_equal(ema.average(w).numpy(), average)
    assert int(ema.averaged_updates.numpy()) == 1


def test_a_checkpoint_restored_before_the_first_step_resumes_the_averages(tmp_path):
    ema = trainop.ExponentialMovingAverage(0.7)
    weights, _ = run_eager("keras", BATCHES, ema, kind="sgd")
    uninterrupted = ema.average(weights["kernel"]).numpy()

    first = trainop.ExponentialMovingAverage(0.7)
    w1 = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    op1 = trainop.create_train_op(
        lambda x: loss_of(w1, x), keras.optimizers.SGD(0.05), None, moving_average=first
    )
    for x in BATCHES[:3]:
        op1(tf.constant(x))
    path = tf.train.Checkpoint(weights=w1, ema=first).save(str(tmp_path / "ckpt"))

    second = trainop.ExponentialMovingAverage(0.7)
    w2 = {name: tf.Variable(np.zeros_like(value), name=name) for name, value in INITIAL.items()}
    # Restored before the averages exist: applied when the train op makes them.
    tf.train.Checkpoint(weights=w2, ema=second).restore(path)
    op2 = trainop.create_train_op(
        lambda x: loss_of(w2, x), keras.optimizers.SGD(0.05), None, moving_average=second
    )
    for x in BATCHES[3:]:
        op2(tf.constant(x))
    np.testing.assert_allclose(second.average(w2["kernel"]).numpy(), uninterrupted, rtol=1e-6)
    assert int(second.averaged_updates.numpy()) == len(BATCHES)


def test_model_fit_averages_and_swaps_for_evaluation():
    def model():
        keras.utils.set_random_seed(2)
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])

    x = BATCHES.reshape(-1, 3)
    y = np.ones((len(x), 1), np.float32)
    ema = trainop.ExponentialMovingAverage(0.9)
    fitted = model()
    trainop.keras.compile(
        fitted, optimizer=keras.optimizers.SGD(0.05), loss="mse", moving_average=ema
    )
    fitted.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    reference = model()
    reference.compile(
        optimizer=keras.optimizers.SGD(0.05, use_ema=True, ema_momentum=0.9), loss="mse"
    )
    # Keras's fit ends by writing the averages into the weights (finalize_variable_values).
    reference.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    with ema.swap_weights():
        for found, expected in zip(fitted.trainable_variables, reference.trainable_variables):
            np.testing.assert_allclose(found.numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)
        averaged_loss = fitted.evaluate(x, y, verbose=0)
    assert averaged_loss == pytest.approx(reference.evaluate(x, y, verbose=0), rel=1e-5)


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda: trainop.ExponentialMovingAverage(1.0), ValueError, "`decay` must be in [0, 1)"),
        (lambda: trainop.ExponentialMovingAverage(-0.1), ValueError, "`decay` must be in"),
        (lambda: trainop.ExponentialMovingAverage(float("nan")), ValueError, "`decay` must be"),
        (lambda: trainop.ExponentialMovingAverage("0.9"), TypeError, "`decay` must be a number"),
        (
            lambda: trainop.ExponentialMovingAverage(0.9, dynamic_decay=1),
            TypeError,
            "`dynamic_decay` must be True or False",
        ),
        (
            lambda: trainop.create_train_op(
                lambda: tf.Variable(1.0) * 2.0, keras.optimizers.SGD(0.1), moving_average=0.999
            ),
            TypeError,
            "`moving_average` must be a trainop.ExponentialMovingAverage",
        ),
        (
            lambda: trainop.ExponentialMovingAverage().swap_weights().__enter__(),
            ValueError,
            "nothing is averaged yet",
        ),
        (
            lambda: trainop.ExponentialMovingAverage().average(tf.Variable(1.0, name="lone")),
            ValueError,
            "has no average here",
        ),
    ],
)
def test_bad_arguments_are_named(make, error, message):
    with pytest.raises(error, match=re.escape(message)):
        make()


def test_create_train_step_averages_each_call_in_eager_mode():
    w = tf.Variable([1.0, 2.0], name="w")
    ema = trainop.ExponentialMovingAverage(0.5)
    history = []
    for _ in range(3):
        trainop.create_train_step(
            lambda: tf.reduce_sum(w * w), keras.optimizers.SGD(0.1), None, moving_average=ema
        )
        history.append(w.numpy())
    np.testing.assert_allclose(ema.average(w).numpy(), expected_average(history, 0.5), rtol=1e-6)


def test_averages_restore_for_evaluation_into_a_model_made_again_under_another_name(tmp_path):
    def model():
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])

    trained, ema = model(), trainop.ExponentialMovingAverage(0.5)
    train_op = trainop.create_train_op(
        lambda x: tf.reduce_mean(trained(x) ** 2),
        keras.optimizers.SGD(0.1),
        None,
        moving_average=ema,
    )
    for x in BATCHES:
        train_op(tf.constant(x))
    averages = [ema.average(v).numpy() for v in trained.trainable_variables]
    path = tf.train.Checkpoint(model=trained, average=ema).save(str(tmp_path / "ckpt"))

    # As in a new process: another model first, so the paths differ (sequential_2/...).
    model()
    evaluated, restored = model(), trainop.ExponentialMovingAverage(0.5)
    assert evaluated.trainable_variables[0].path != trained.trainable_variables[0].path
    restored.build(evaluated.trainable_variables)
    with pytest.raises(ValueError, match="nothing is averaged yet"):
        restored.swap_weights().__enter__()
    tf.train.Checkpoint(model=evaluated, average=restored).restore(path).assert_consumed()
    with restored.swap_weights():
        for v, average in zip(evaluated.trainable_variables, averages):
            np.testing.assert_array_equal(v.numpy(), average)


def test_averages_restore_by_name_not_by_the_order_the_step_read_them(tmp_path):
    """A subclassed model that makes `head` before `body` but calls `body` first: the train
    op meets the variables in the order body, head; `trainable_variables` lists head, body."""

    class Model(keras.Model):
        def __init__(self):
            super().__init__(name="m")
            self.head = keras.layers.Dense(3, name="head")
            self.body = keras.layers.Dense(3, name="body")

        def call(self, x):
            return self.head(self.body(x))

    trained, ema = Model(), trainop.ExponentialMovingAverage(0.5)
    trained(tf.zeros([1, 3]))
    train_op = trainop.create_train_op(
        lambda x: tf.reduce_mean(trained(x) ** 2), keras.optimizers.SGD(0.1), None,
        moving_average=ema,
    )  # fmt: skip
    for x in BATCHES:
        train_op(tf.constant(x))
    path = tf.train.Checkpoint(average=ema).save(str(tmp_path / "ckpt"))
    evaluated, restored = Model(), trainop.ExponentialMovingAverage(0.5)
    evaluated(tf.zeros([1, 3]))
    assert [v.path for v in evaluated.trainable_variables][0].endswith("head/kernel")
    restored.build(evaluated.trainable_variables)
    tf.train.Checkpoint(average=restored).restore(path)
    for mine, theirs in zip(evaluated.trainable_variables, trained.trainable_variables):
        np.testing.assert_array_equal(
            restored.average(mine).numpy(), ema.average(theirs).numpy(), err_msg=mine.path
        )
