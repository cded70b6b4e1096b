"""check_numerics: an inf or NaN loss raises before anything changes."""

from __future__ import annotations

import contextlib
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import EagerRunner, GraphRunner, make_optimizer, optimizer_state, read_summaries


def _model(runner):
    w = runner.variable(np.array([1.0, -2.0, 3.0], np.float32), "w")
    b = runner.variable(0.5, "b")
    # `scale` stays 1 while the loss is healthy; the test sets it to inf or NaN.
    scale = runner.variable(1.0, "scale", trainable=False)
    return [w, b], scale, lambda: scale * (tf.reduce_sum(w * w) + b * b)


def _state(runner, optimizer, variables):
    return (
        [runner.read(v) for v in variables]
        + optimizer_state(optimizer, variables, runner)
        + [runner.read(runner.global_step())]
    )


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_bad_loss_raises_and_changes_nothing(runner, family, bad_value):
    variables, scale, loss_fn = _model(runner)
    optimizer = make_optimizer(family, "adam", 0.1)
    step = runner.train_op(loss_fn, optimizer)
    step()
    step()  # slots and counters now hold values that a bad step could disturb
    before = _state(runner, optimizer, variables)

    runner.assign(scale, bad_value)
    with pytest.raises(tf.errors.InvalidArgumentError, match=trainop.LOSS_NOT_FINITE_MESSAGE):
        step()

    after = _state(runner, optimizer, variables)
    assert len(after) == len(before) > 3
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)  # bit-identical, NaN-free

    # Training goes on from where it was.
    runner.assign(scale, 1.0)
    step()
    assert runner.read(runner.global_step()) == 3


def test_eager_update_ops_do_not_run_on_a_bad_step():
    w = tf.Variable(1.0)
    scale = tf.Variable(1.0, trainable=False)
    counter = tf.Variable(0, trainable=False)
    train_op = trainop.create_train_op(
        lambda: scale * w * w,
        make_optimizer("keras"),
        update_ops=[lambda: counter.assign_add(1)],
        global_step=None,
    )
    train_op()
    scale.assign(np.nan)
    with pytest.raises(tf.errors.InvalidArgumentError):
        train_op()
    assert counter.numpy() == 1


def test_without_check_numerics_a_nan_loss_reaches_the_weights(runner):
    # What the check guards against: the same step, unchecked, corrupts the weights.
    variables, scale, loss_fn = _model(runner)
    step = runner.train_op(loss_fn, make_optimizer("keras", "sgd"), check_numerics=False)
    runner.assign(scale, np.nan)
    step()
    assert np.isnan(runner.read(variables[0])).all()


def test_keras_model_with_nan_input_batch_keeps_its_weights():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam(0.01)
    train_op = trainop.create_train_op(
        lambda x: tf.reduce_mean(model(x) ** 2),
        optimizer,
        variables_to_train=model.trainable_variables,
        global_step=None,
    )
    train_op(tf.ones((2, 3)))
    weights = [w.numpy().copy() for w in model.weights]
    slots = [v.numpy().copy() for v in optimizer.variables]
    with pytest.raises(tf.errors.InvalidArgumentError, match="LossTensor is inf or nan"):
        train_op(tf.constant(np.nan, shape=(2, 3)))
    for before, w in zip(weights, model.weights):
        np.testing.assert_array_equal(w.numpy(), before)
    for before, v in zip(slots, optimizer.variables):
        np.testing.assert_array_equal(v.numpy(), before)


@pytest.mark.parametrize("family", ["keras", "tf_keras", "tf_keras_legacy", "v1"])
def test_a_bad_first_step_leaves_the_optimizer_usable(runner, family):
    # The optimizer's state is made before the check guards the update: a NaN on the very
    # first step must not leave it half-made.
    variables, scale, loss_fn = _model(runner)
    optimizer = make_optimizer(family, "adam", 0.1)
    step = runner.train_op(loss_fn, optimizer)
    w0 = runner.read(variables[0])
    runner.assign(scale, np.nan)
    with pytest.raises(tf.errors.InvalidArgumentError, match=trainop.LOSS_NOT_FINITE_MESSAGE):
        step()
    np.testing.assert_array_equal(runner.read(variables[0]), w0)
    runner.assign(scale, 1.0)
    step()
    # Adam's first step: each weight moves by the learning rate against its gradient's sign.
    np.testing.assert_allclose(runner.read(variables[0]), w0 - 0.1 * np.sign(w0), rtol=1e-5)
    assert runner.read(runner.global_step()) == 1


def test_graph_keras_optimizer_state_initializes_without_feeding_the_inputs():
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.compat.v1.get_variable("w", initializer=[1.0, -2.0], use_resource=True)
        x = tf.compat.v1.placeholder(tf.float32, [])
        optimizer = keras.optimizers.RMSprop(0.1)
        train_op = trainop.create_train_op(x * tf.reduce_sum(w * w), optimizer)
        session.run(tf.compat.v1.global_variables_initializer())  # no feed needed
        with pytest.raises(tf.errors.InvalidArgumentError):
            session.run(train_op, {x: np.nan})
        np.testing.assert_array_equal(session.run(w), [1.0, -2.0])
        assert session.run(train_op, {x: 1.0}) == 5.0
        assert session.run(tf.compat.v1.train.get_global_step()) == 1


# --- check_numerics="skip": SkipNonFiniteSteps -------------------------------------------------


W0 = np.array([[0.5], [-0.5], [1.0]], np.float32)
B0 = np.array([0.1], np.float32)
REGRESSION_LR = 0.05


def _regression(runner):
    """A linear regression whose batch (and gradient scale) the test sets before each step."""
    w = runner.variable(W0, "w")
    b = runner.variable(B0, "b")
    x = runner.variable(np.zeros((4, 3), np.float32), "x", trainable=False)
    y = runner.variable(np.zeros((4, 1), np.float32), "y", trainable=False)
    # 1 on healthy steps; NaN makes the gradients NaN while the loss stays finite.
    grad_scale = runner.variable(1.0, "grad_scale", trainable=False)

    @tf.custom_gradient
    def scale_gradient(t):
        return tf.identity(t), lambda dy: dy * grad_scale

    def loss_fn():
        return tf.reduce_mean((scale_gradient(tf.matmul(x, w) + b) - y) ** 2)

    return [w, b], (x, y, grad_scale), loss_fn


def _batch(i):
    rng = np.random.default_rng(i)
    return rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 1)).astype(np.float32)


# Steps 30 and 31 are bad in a row; step 64 has a finite loss and NaN gradients.
BAD_STEPS = {7: "nan_input", 30: "inf_input", 31: "nan_input", 64: "nan_gradient"}


def _regression_reference(family, kind, steps):
    """The regression trained by plain SGD or Adam in float64 NumPy on the batches `steps`.

    Returns the weights [w, b] and each step's loss (before its update).
    """
    params = [W0.astype(np.float64), B0.astype(np.float64)]
    moments = [np.zeros_like(p) for p in params]
    squares = [np.zeros_like(p) for p in params]
    epsilon = 1e-8 if family == "v1" else 1e-7  # tf.compat.v1's Adam, Keras' Adam
    losses = []
    for t, i in enumerate(steps, start=1):
        x, y = (a.astype(np.float64) for a in _batch(i))
        error = x @ params[0] + params[1] - y
        losses.append(np.mean(error**2))
        d_error = 2.0 * error / error.size
        grads = [x.T @ d_error, d_error.sum(0)]
        if kind == "sgd":
            params = [p - REGRESSION_LR * g for p, g in zip(params, grads)]
            continue
        moments = [0.9 * m + 0.1 * g for m, g in zip(moments, grads)]
        squares = [0.999 * v + 0.001 * g * g for v, g in zip(squares, grads)]
        alpha = REGRESSION_LR * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        params = [
            p - alpha * m / (np.sqrt(v) + epsilon) for p, m, v in zip(params, moments, squares)
        ]
    return params, np.array(losses)


def _train(runner, family, kind, steps, check_numerics):
    """Trains on the batches `steps` (bad ones made bad); returns what the tests compare."""
    variables, (x, y, grad_scale), loss_fn = _regression(runner)
    optimizer = make_optimizer(family, kind, REGRESSION_LR)
    step = runner.train_op(loss_fn, optimizer, check_numerics=check_numerics)
    skipped_at = []
    losses = {}
    for i in steps:
        inputs, targets = _batch(i)
        kind_of_bad = BAD_STEPS.get(i)
        if kind_of_bad == "nan_input":
            inputs[1, 2] = np.nan
        elif kind_of_bad == "inf_input":
            inputs[0, 0] = np.inf
        runner.assign(x, inputs)
        runner.assign(y, targets)
        runner.assign(grad_scale, np.nan if kind_of_bad == "nan_gradient" else 1.0)
        before = runner.read(check_numerics.skipped_steps) if kind_of_bad is not None else None
        losses[i] = float(step())
        if kind_of_bad is not None:
            skipped_at += [i] * int(runner.read(check_numerics.skipped_steps) - before)
    weights = [runner.read(v) for v in variables]
    return weights, losses, runner.read(runner.global_step()), skipped_at


@contextlib.contextmanager
def _fresh_runner(mode):
    runner = GraphRunner() if mode == "graph" else EagerRunner()
    try:
        yield runner
    finally:
        runner.close()
        tf.compat.v1.get_default_graph().clear_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_skip_mode_skips_exactly_the_bad_steps_and_ends_as_if_they_never_were(runner, family, kind):
    guard = trainop.SkipNonFiniteSteps(max_consecutive=2)
    weights, losses, global_step, skipped_at = _train(runner, family, kind, range(100), guard)
    counts = runner.read(guard.skipped_steps), runner.read(guard.consecutive_skipped_steps)

    assert skipped_at == sorted(BAD_STEPS)
    assert counts == (4, 0)
    assert global_step == 96
    # The weights and losses of plain SGD or Adam on the 96 good batches alone: a skipped
    # step left no trace, in the weights or in the optimizer's moments and step count.
    clean_steps = sorted(set(range(100)) - set(BAD_STEPS))
    expected_weights, expected_losses = _regression_reference(family, kind, clean_steps)
    # float32 against float64 over 96 steps; Adam's divisions by small moments drift more.
    rtol = 1e-5 if kind == "sgd" else 1e-4
    for value, expected in zip(weights, expected_weights):
        np.testing.assert_allclose(value, expected, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose([losses[i] for i in clean_steps], expected_losses, rtol=rtol)


def test_too_many_bad_steps_in_a_row_raise_naming_the_step_and_change_nothing(runner, family):
    variables, scale, loss_fn = _model(runner)
    optimizer = make_optimizer(family, "adam", 0.1)
    guard = trainop.SkipNonFiniteSteps(max_consecutive=2)
    step = runner.train_op(loss_fn, optimizer, check_numerics=guard)
    step()
    step()
    before = _state(runner, optimizer, variables)

    runner.assign(scale, np.nan)
    step()
    step()  # the second bad step in a row: still skipped
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=rf"{trainop.NOT_FINITE_MESSAGE} at global step\] \[2\] \[after 2 skipped steps",
    ):
        step()
    for b, a in zip(before, _state(runner, optimizer, variables)):
        np.testing.assert_array_equal(a, b)
    assert runner.read(guard.skipped_steps) == 2  # the step that raised is not counted

    # A good step resets the run of bad ones.
    runner.assign(scale, 1.0)
    step()
    assert runner.read(guard.consecutive_skipped_steps) == 0
    runner.assign(scale, np.inf)
    step()
    assert runner.read(guard.skipped_steps) == 3
    assert runner.read(runner.global_step()) == 3


def test_max_consecutive_zero_raises_on_nan_gradients_that_the_default_check_misses(runner):
    variables, (x, y, grad_scale), loss_fn = _regression(runner)
    unchecked_default = runner.train_op(loss_fn, make_optimizer("keras", "sgd"))
    guard = trainop.SkipNonFiniteSteps(max_consecutive=0)
    guarded = runner.train_op(loss_fn, make_optimizer("keras", "sgd"), check_numerics=guard)
    inputs, targets = _batch(0)
    runner.assign(x, inputs)
    runner.assign(y, targets)
    runner.assign(grad_scale, np.nan)  # a finite loss, NaN gradients
    w = runner.read(variables[0])
    with pytest.raises(tf.errors.InvalidArgumentError, match=trainop.NOT_FINITE_MESSAGE):
        guarded()
    np.testing.assert_array_equal(runner.read(variables[0]), w)
    assert runner.read(guard.skipped_steps) == 0
    unchecked_default()  # the default check looks at the loss only
    assert np.isnan(runner.read(variables[0])).all()


def test_a_skipped_step_runs_no_update_op_and_writes_no_summary(tmp_path):
    w = tf.Variable([1.0, 2.0], name="w")
    scale = tf.Variable(1.0, trainable=False)
    target_updates = tf.Variable(0, trainable=False)
    guard = trainop.SkipNonFiniteSteps()
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        train_op = trainop.create_train_op(
            lambda: scale * tf.reduce_sum(w * w),
            make_optimizer("keras", "sgd"),
            update_ops=[lambda: target_updates.assign_add(1)],
            check_numerics=guard,
            summarize_gradients=True,
        )
        for value in [1.0, np.nan, 1.0]:
            scale.assign(value)
            train_op()
    writer.flush()
    assert target_updates.numpy() == 2
    assert int(guard.skipped_steps) == 1
    steps = sorted(step for step, _ in read_summaries(tmp_path)["train/loss"])
    assert steps == [0, 1]  # the skipped step did not count, nor write


def test_the_skipped_steps_counter_is_checkpointed(tmp_path):
    w = tf.Variable(1.0)
    x = tf.Variable(np.nan, trainable=False)
    guard = trainop.SkipNonFiniteSteps()
    train_op = trainop.create_train_op(
        lambda: x * w, make_optimizer("keras"), global_step=None, check_numerics=guard
    )
    train_op()
    train_op()
    path = tf.train.Checkpoint(guard=guard).save(str(tmp_path / "ckpt"))
    restored = trainop.SkipNonFiniteSteps()
    tf.train.Checkpoint(guard=restored).restore(path).assert_consumed()
    assert int(restored.skipped_steps) == int(restored.consecutive_skipped_steps) == 2


def test_skip_is_a_fresh_guard_with_the_default_limit(runner):
    variables, scale, loss_fn = _model(runner)
    step = runner.train_op(loss_fn, make_optimizer("keras"), check_numerics="skip")
    runner.assign(scale, np.nan)
    for _ in range(trainop.SkipNonFiniteSteps().max_consecutive):
        step()
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_consecutive=10"):
        step()
    assert runner.read(runner.global_step()) == 0


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_max_consecutive_must_be_a_count(value):
    with pytest.raises(ValueError, match="`max_consecutive` must be an integer >= 0 or None"):
        trainop.SkipNonFiniteSteps(max_consecutive=value)


def test_a_guard_from_another_graph_is_refused():
    guard = trainop.SkipNonFiniteSteps()  # eager variables
    with tf.Graph().as_default():
        w = tf.compat.v1.get_variable("w", initializer=1.0, use_resource=True)
        with pytest.raises(ValueError, match="SkipNonFiniteSteps created in another"):
            trainop.create_train_op(w * w, make_optimizer("v1"), check_numerics=guard)


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_healthy_steps_of_the_skip_guard_are_those_of_the_default_check(mode, family):
    results = []
    for skip in (False, True):
        with _fresh_runner(mode) as runner:
            check_numerics = trainop.SkipNonFiniteSteps() if skip else True
            results.append(_train(runner, family, "sgd", range(5), check_numerics))
    (default, default_losses, _, _), (guarded, guarded_losses, steps, _) = results
    for d, g in zip(default, guarded):
        np.testing.assert_array_equal(g, d)  # bit-identical
    assert guarded_losses == default_losses
    assert steps == 5
    expected_weights, expected_losses = _regression_reference(family, "sgd", range(5))
    for value, expected in zip(guarded, expected_weights):
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(list(guarded_losses.values()), expected_losses, rtol=1e-5)


def test_a_nan_gradient_of_a_frozen_variable_does_not_skip_the_step(runner):
    w = runner.variable(np.array([1.0, 2.0], np.float32), "w")
    frozen = runner.variable(1.0, "frozen")
    guard = trainop.SkipNonFiniteSteps()
    step = runner.train_op(
        # d/d(frozen) of sqrt(frozen - 1) at 1 is inf.
        lambda: tf.reduce_sum(w * w) + tf.sqrt(frozen - 1.0),
        make_optimizer("keras", "sgd", 0.25),
        check_numerics=guard,
        transform_grads_fn=trainop.multiply_gradients_fn({"frozen": 0.0}),
    )
    step()
    assert runner.read(guard.skipped_steps) == 0
    np.testing.assert_allclose(runner.read(w), [0.5, 1.0])


def test_the_skip_guard_applies_a_healthy_float16_step_with_large_gradients(runner, family):
    # The gradient (3e4, 2e4, 2e4) is finite in float16, but neither its sum (7e4) nor its
    # squares are: float16 tops out at 65504. The guard must measure it in float32.
    w = runner.variable(np.full(3, 2.0, np.float16), "w", dtype=tf.float16)
    coefficients = np.array([3e4, 2e4, 2e4], np.float32)
    guard = trainop.SkipNonFiniteSteps()
    step = runner.train_op(
        lambda: tf.reduce_sum(tf.cast(w, tf.float32) * coefficients),
        make_optimizer(family, "sgd", 2.0**-14),
        check_numerics=guard,
    )
    loss = step()
    # Every value here is exact in float16: 2 - 2**-14 * 3e4 = 0.1689453125.
    expected = np.full(3, 2.0) - 2.0**-14 * coefficients.astype(np.float64)
    np.testing.assert_array_equal(runner.read(w).astype(np.float64), expected)
    assert float(loss) == 2.0 * coefficients.sum()
    assert runner.read(guard.skipped_steps) == 0
    assert runner.read(runner.global_step()) == 1


def test_a_nan_made_by_a_transform_skips_the_step(runner):
    w = runner.variable(np.array([1.0, 2.0], np.float32), "w")
    guard = trainop.SkipNonFiniteSteps()
    step = runner.train_op(
        lambda: tf.reduce_sum(w * w),
        make_optimizer("keras", "sgd", 0.25),
        check_numerics=guard,
        transform_grads_fn=lambda pairs: [(g * np.nan, v) for g, v in pairs],
    )
    step()
    assert runner.read(guard.skipped_steps) == 1
    np.testing.assert_array_equal(runner.read(w), [1.0, 2.0])


def test_skip_works_when_the_train_op_is_built_inside_a_users_tf_function():
    w = tf.Variable([1.0, 2.0])
    x = tf.Variable(1.0, trainable=False)
    optimizer = make_optimizer("keras", "sgd", 0.25)

    @tf.function
    def train_step():
        # The first trace builds the optimizer's state, so TensorFlow traces twice.
        return trainop.create_train_op(
            x * tf.reduce_sum(w * w),
            optimizer,
            global_step=None,
            variables_to_train=[w],
            check_numerics="skip",
        )

    train_step()
    x.assign(np.nan)
    train_step()
    np.testing.assert_allclose(w.numpy(), [0.5, 1.0])
    guard = trainop.numerics.resolve_check_numerics("skip", optimizer)
    assert int(guard.skipped_steps) == 1


# --- What the forward pass writes, undone on a rejected step ------------------------------------


@pytest.mark.parametrize(
    "check_numerics, jit_compile", [("skip", False), (True, False), ("skip", True), (True, True)]
)
def test_a_rejected_step_leaves_every_variable_of_the_model_as_it_was(check_numerics, jit_compile):
    """Batch normalization's moving statistics and dropout's seed state are written by the
    forward pass, before any check: a step that the guard skips or raises on writes them back,
    bit for bit."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(1),
        ]
    )
    train_op = trainop.create_train_op(
        lambda x: tf.reduce_mean(model(x, training=True) ** 2),
        keras.optimizers.SGD(0.1),
        global_step=None,
        variables_to_train=model.trainable_variables,
        check_numerics=check_numerics,
        jit_compile=jit_compile,
    )
    good = tf.constant(np.random.default_rng(0).normal(size=(8, 3)), tf.float32)
    train_op(good)
    before = [v.numpy() for v in model.variables]
    bad = tf.constant(np.full((8, 3), np.nan), tf.float32)
    if check_numerics == "skip":
        train_op(bad)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="LossTensor is inf or nan"):
            train_op(bad)
    after = [v.numpy() for v in model.variables]
    assert [v.path for v in model.variables if "moving" in v.path or "seed" in v.path]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    # A good step after it trains on, moving the statistics again.
    moving_mean = model.layers[1].moving_mean
    index = [v.path for v in model.variables].index(moving_mean.path)
    train_op(good)
    assert not np.array_equal(moving_mean.numpy(), before[index])


def _one_nan_gradient_at_zero(**settings):
    """A train op on `w1 ** 2 + sqrt(|w2 * z|)` (w1 = w2 = 1, SGD 0.1) under a skip guard that
    allows one skipped step: at z = 0 the loss is finite and w2's gradient NaN."""
    w1, w2 = tf.Variable(1.0, name="w1"), tf.Variable(1.0, name="w2")
    return trainop.create_train_op(
        lambda z: w1**2 + tf.sqrt(tf.abs(w2 * z)),
        keras.optimizers.SGD(0.1),
        global_step=tf.Variable(0, dtype=tf.int64),
        check_numerics=trainop.SkipNonFiniteSteps(max_consecutive=1),
        **settings,
    )


def test_a_rejected_step_says_which_gradients_were_not_finite(capfd):
    """The loss is finite, one of two gradients is NaN (the square root's at 0): the skip
    guard prints, from the device, the step, the loss and the variable, and its error at the
    limit says the same."""
    train_op = _one_nan_gradient_at_zero()
    train_op(tf.constant(1.0))
    capfd.readouterr()
    train_op(tf.constant(0.0))
    printed = capfd.readouterr().err
    expected = "a step not applied at global step 1 - loss 0.64 - gradients not finite: 1 of 2"
    assert f'trainop: {expected} ["w2"]' in printed.replace("0.640000045", "0.64")
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        train_op(tf.constant(0.0))
    message = " ".join(str(raised.value).split())
    assert "after 1 skipped steps in a row" in message
    assert "[- gradients not finite:] [1] [of 2] [w2]" in message
    # A healthy step prints nothing.
    capfd.readouterr()
    train_op(tf.constant(1.0))
    assert "trainop:" not in capfd.readouterr().err


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_a_compiled_rejected_step_is_said_after_the_call(caplog, steps_per_call):
    """Under XLA, which prints nothing, the step records what was not finite on the device and
    the train op says it after the call, from the host; the error at the limit ends with it.
    A healthy call says nothing."""
    train_op = _one_nan_gradient_at_zero(jit_compile=True, steps_per_call=steps_per_call)

    def batch(z):
        return tf.constant([z] * steps_per_call if steps_per_call > 1 else z)

    with caplog.at_level(logging.WARNING, logger="trainop"):
        train_op(batch(1.0))
        assert not caplog.records
        train_op(tf.constant([1.0, 0.0]) if steps_per_call > 1 else batch(0.0))
        said = [r.getMessage() for r in caplog.records]
    at = 2 * steps_per_call - 1  # the steps applied before the rejected one
    loss = f"{0.8 ** (2 * at):.6g}"
    assert len(said) == 1 and said[0].startswith(
        f"trainop: a step not applied at global step {at} - loss {loss}"
    )
    assert said[0].endswith("- gradients not finite: 1 of 2 (w2)")
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        train_op(batch(0.0))
    assert str(raised.value).endswith(
        f"(a compiled step) - loss {loss} - gradients not finite: 1 of 2 (w2)"
    )


def _under_the_default_check(**settings):
    """A train op on `w1 ** 2 * x + w2 * z` (w1 = w2 = 1, SGD 0.1) with the default check;
    returns it, its global step and w1."""
    w1, w2 = tf.Variable(1.0, name="w1"), tf.Variable(1.0, name="w2")
    step = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(
        lambda x, z: w1**2 * x + w2 * z, keras.optimizers.SGD(0.1), global_step=step, **settings
    )
    return train_op, step, w1


@pytest.mark.parametrize("jit_compile", [False, True])
def test_with_several_steps_a_call_the_default_checks_error_says_which_step_failed(jit_compile):
    """Four steps a call, the third's x NaN: the two before it applied, and the error names
    the step, its place in the call and what was not finite (diagnosed on its own batch)."""
    train_op, step, w1 = _under_the_default_check(steps_per_call=4, jit_compile=jit_compile)
    train_op(tf.ones([4]), tf.ones([4]))
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        train_op(tf.constant([1.0, 1.0, np.nan, 1.0]), tf.ones([4]))
    assert str(raised.value).endswith(
        "LossTensor is inf or nan at global step 6 (step 3 of the call's 4): the loss is nan; "
        "gradients not finite: 1 of 2 (w1)"
    )
    assert int(step) == 6
    np.testing.assert_allclose(w1.numpy(), 0.8**6, rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_the_default_checks_error_says_what_was_not_finite_and_train_says_which_batch(
    jit_compile,
):
    train_op, step, w1 = _under_the_default_check(jit_compile=jit_compile)
    batches = [(1.0, 1.0), (1.0, 1.0), (1.0, float("nan")), (1.0, 1.0)]
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        trainop.train(
            train_op,
            [tuple(map(tf.constant, b)) for b in batches],
            progress=False,
            global_step=step,
        )
    assert raised.value.message == (
        "LossTensor is inf or nan at global step 2: the loss is nan; gradients not finite: "
        "1 of 2 (w2) (batch 2 of the data)"
    )
    # Nothing of the bad step applied: the two good steps only.
    assert int(step) == 2 and float(w1.numpy()) == pytest.approx(0.8**2)
