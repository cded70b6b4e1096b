"""jit_compile and steps_per_call: the same training, compiled or looped."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer, read_summaries

RNG = np.random.default_rng(0)
XS = RNG.normal(size=(8, 16, 5)).astype(np.float32)
YS = RNG.normal(size=(8, 16, 1)).astype(np.float32)
LR = 0.05


def _mlp():
    """The seeded 5-8-1 MLP (float32 out)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1, dtype="float32"),
        ]
    )


def _mlp_train_op(optimizer, **kwargs):
    """The seeded MLP and its train op; returns (model, step, train_op)."""
    model = _mlp()
    step = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(
        lambda x, y: tf.reduce_mean((model(x) - y) ** 2),
        optimizer,
        step,
        variables_to_train=model.trainable_variables,
        **kwargs,
    )
    return model, step, train_op


def _initial_mlp_weights():
    """The seeded MLP's weights before training: kernel 1, bias 1, kernel 2, bias 2."""
    return [np.asarray(w.numpy(), np.float64) for w in _mlp().weights]


def _mlp_reference(batches, lr=LR, max_norm=None):
    """Plain SGD on the seeded MLP in float64 NumPy, the gradients written out by hand.

    Returns the weights after the batches (flattened and concatenated as `_train` returns
    them) and each step's loss, taken before its update. With `max_norm`, the gradients are
    scaled together to a global norm of at most `max_norm` first.
    """
    k1, b1, k2, b2 = _initial_mlp_weights()
    losses = []
    for x, y in batches:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        hidden = x @ k1 + b1
        active = np.maximum(hidden, 0.0)
        error = active @ k2 + b2 - y
        losses.append(np.mean(error**2))
        d_out = 2.0 * error / error.size
        d_hidden = (d_out @ k2.T) * (hidden > 0)
        grads = [x.T @ d_hidden, d_hidden.sum(0), active.T @ d_out, d_out.sum(0)]
        if max_norm is not None:
            norm = np.sqrt(sum(np.sum(g**2) for g in grads))
            grads = [g * min(1.0, max_norm / norm) for g in grads]
        k1, b1, k2, b2 = (w - lr * g for w, g in zip((k1, b1, k2, b2), grads))
    return np.concatenate([np.ravel(w) for w in (k1, b1, k2, b2)]), np.array(losses)


def _train(family, steps_per_call=1, **kwargs):
    """Trains the MLP with SGD on the 8 batches; returns its weights, the losses, the step."""
    model, step, train_op = _mlp_train_op(
        make_optimizer(family, "sgd", LR), steps_per_call=steps_per_call, **kwargs
    )
    losses = []
    for i in range(0, 8, steps_per_call):
        if steps_per_call == 1:
            losses.append(float(train_op(XS[i], YS[i])))
        else:
            losses += list(train_op(XS[i : i + steps_per_call], YS[i : i + steps_per_call]))
    weights = np.concatenate([np.ravel(w.numpy()) for w in model.weights])
    return weights, np.array(losses), int(step.numpy()), train_op


@pytest.mark.parametrize("family", ["v1", "keras", "tf_keras", "tf_keras_legacy"])
def test_steps_per_call_runs_the_same_steps_in_one_call(family):
    reference_weights, reference_losses = _mlp_reference(zip(XS, YS))
    weights, losses, step, _ = _train(family)
    looped_weights, looped_losses, looped_step, train_op = _train(family, steps_per_call=4)
    # Plain SGD, float32 against float64: equal up to float32 rounding.
    np.testing.assert_allclose(weights, reference_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, atol=1e-6)
    # The loop in one call does the same float32 work as the calls one by one.
    np.testing.assert_array_equal(looped_weights, weights)
    np.testing.assert_array_equal(looped_losses, losses)
    assert looped_step == step == 8
    assert train_op.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("family", ["v1", "keras"])
@pytest.mark.parametrize("check_numerics", [True, "skip"])
@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_jit_compile_trains_as_the_uncompiled_step(family, check_numerics, steps_per_call):
    reference_weights, reference_losses = _mlp_reference(zip(XS, YS))
    weights, losses, _, _ = _train(family)
    compiled_weights, compiled_losses, step, _ = _train(
        family, steps_per_call, jit_compile=True, check_numerics=check_numerics
    )
    # XLA fuses and reorders floating-point work: close, not bit-identical.
    np.testing.assert_allclose(compiled_weights, weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(compiled_losses, losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(compiled_weights, reference_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(compiled_losses, reference_losses, rtol=1e-5, atol=1e-6)
    assert step == 8


def test_compiled_skip_guard_still_skips():
    w = tf.Variable([1.0, 2.0])
    guard = trainop.SkipNonFiniteSteps()
    train_op = trainop.create_train_op(
        lambda x: x * tf.reduce_sum(w * w),
        make_optimizer("keras", "sgd", 0.25),
        global_step=None,
        check_numerics=guard,
        jit_compile=True,
    )
    train_op(tf.constant(np.nan))
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
    train_op(tf.constant(1.0))
    np.testing.assert_allclose(w.numpy(), [0.5, 1.0])
    assert int(guard.skipped_steps) == 1


def test_an_op_xla_cannot_compile_is_a_plain_error():
    w = tf.Variable(1.0)
    train_op = trainop.create_train_op(
        lambda: tf.py_function(lambda v: v * v, [w], tf.float32) + w * w,
        make_optimizer("keras"),
        global_step=None,
        jit_compile=True,
    )
    with pytest.raises(ValueError, match="`jit_compile=True`: XLA cannot compile this train step"):
        train_op()
    assert float(w.numpy()) == 1.0


def test_jit_compile_refuses_summaries(tmp_path):
    w = tf.Variable(1.0)
    writer = tf.summary.create_file_writer(str(tmp_path))
    train_op = trainop.create_train_op(lambda: w * w, make_optimizer("keras"), jit_compile=True)
    with writer.as_default(), pytest.raises(ValueError, match="XLA does not compile summary"):
        train_op()


def test_bad_scale_arguments():
    w = tf.Variable(1.0)
    with pytest.raises(ValueError, match="`steps_per_call` must be a positive integer"):
        trainop.create_train_op(lambda: w * w, make_optimizer("keras"), steps_per_call=0)
    with pytest.raises(TypeError, match="`jit_compile` must be True or False"):
        trainop.create_train_op(lambda: w * w, make_optimizer("keras"), jit_compile="yes")
    train_op = trainop.create_train_op(
        lambda x: w * x, make_optimizer("keras"), global_step=None, steps_per_call=4
    )
    with pytest.raises(ValueError, match="must hold 4 batches along its first axis"):
        train_op(tf.ones((3,)))
    with tf.Graph().as_default():
        v = tf.compat.v1.get_variable("v", initializer=1.0, use_resource=True)
        with pytest.raises(ValueError, match="apply to the eager train op"):
            trainop.create_train_op(v * v, make_optimizer("v1"), jit_compile=True)


def _mixed(loss_scale=None, policy="float32", calls=8, **kwargs):
    """Trains a small MLP, with a LossScaleOptimizer of that initial scale if one is given."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        optimizer = keras.optimizers.SGD(LR)
        if loss_scale is not None:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=loss_scale)
        model, step, train_op = _mlp_train_op(optimizer, **kwargs)
        for i in range(calls):
            train_op(XS[i], YS[i])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    weights = np.concatenate([np.ravel(np.asarray(w.numpy(), np.float32)) for w in model.weights])
    return weights, int(step.numpy()), optimizer


def test_a_loss_scale_optimizer_trains_as_its_inner_optimizer_and_clips_true_gradients():
    clip = {"transform_grads_fn": trainop.clip_by_global_norm_fn(0.05)}
    reference, _ = _mlp_reference(zip(XS, YS), max_norm=0.05)
    plain, plain_steps, _ = _mixed(**clip)
    scaled, steps, optimizer = _mixed(loss_scale=2.0**12, **clip)
    # The transform saw the unscaled gradients: had it clipped the scaled ones, the optimizer
    # would have divided the clipped gradient by 4096.
    np.testing.assert_allclose(scaled, plain, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scaled, reference, rtol=1e-5, atol=1e-6)
    assert steps == plain_steps == 8
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**12


@pytest.mark.parametrize("check_numerics", [True, "skip"])
def test_an_overflowing_step_is_skipped_and_not_a_numerics_error(check_numerics):
    guard = trainop.SkipNonFiniteSteps() if check_numerics == "skip" else True
    initial, _, _ = _mixed(calls=0)
    # The scaled loss overflows float32 on the first call: the optimizer skips it and halves
    # its scale; the numerics check (of the unscaled loss) lets it through.
    weights, steps, optimizer = _mixed(loss_scale=3e38, calls=1, check_numerics=guard)
    np.testing.assert_array_equal(weights, initial)
    assert steps == 0
    assert float(optimizer.dynamic_scale.numpy()) == pytest.approx(1.5e38)
    if check_numerics == "skip":
        assert int(guard.skipped_steps) == 0
    # Training goes on at the halved scale: the next 7 calls train as the inner optimizer.
    weights, steps, _ = _mixed(loss_scale=3e38, calls=8, check_numerics=guard)
    assert steps == 7
    assert np.abs(weights - initial).max() > 1e-3


@pytest.mark.parametrize("check_numerics", [True, "skip"])
def test_graph_loss_scale_optimizer_counts_only_the_steps_it_applies(check_numerics):
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.compat.v1.get_variable("w", initializer=[1.0, -2.0], use_resource=True)
        x = tf.compat.v1.placeholder(tf.float32, [])
        optimizer = keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=2.0**15
        )
        guard = trainop.SkipNonFiniteSteps() if check_numerics == "skip" else True
        train_op = trainop.create_train_op(
            x * tf.reduce_sum(w * w), optimizer, check_numerics=guard
        )
        global_step = tf.compat.v1.train.get_global_step()
        session.run(tf.compat.v1.global_variables_initializer())
        # With x = 1e35 the loss (about 1e35) is finite and its gradient too, but the scaled
        # gradient (2**15 * 1e35 * 2 * w) overflows float32: the optimizer skips those steps.
        inputs = [1.0, 1e35, 1.0, 1.0, 1e35, 1.0, 1.0, 1.0]
        losses = [session.run(train_op, {x: value}) for value in inputs]
        w_value, steps, iterations, scale = session.run(
            [w, global_step]
            + [
                trainop._variables.as_tf_variable(v)
                for v in (optimizer.iterations, optimizer.dynamic_scale)
            ]
        )
        skipped = session.run(guard.skipped_steps) if check_numerics == "skip" else 0
    # Plain SGD on x * |w|^2 in float64, the overflowing steps left out.
    expected_w, expected_losses = np.array([1.0, -2.0]), []
    for value in inputs:
        expected_losses.append(value * np.sum(expected_w**2))
        if value == 1.0:
            expected_w = expected_w - 0.1 * 2.0 * value * expected_w
    np.testing.assert_allclose(w_value, expected_w, rtol=1e-6)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-6)
    assert steps == iterations == 6  # the overflowing steps are not counted
    assert scale == 2.0**13  # halved by each overflow
    assert skipped == 0  # an overflow is the optimizer's to skip, not the guard's


def test_mixed_float16_trains_close_to_float32():
    full, _, _ = _mixed()
    mixed, steps, _ = _mixed(loss_scale=2.0**15, policy="mixed_float16")
    reference, _ = _mlp_reference(zip(XS, YS))
    np.testing.assert_allclose(full, reference, rtol=1e-5, atol=1e-6)
    assert steps == 8
    np.testing.assert_allclose(mixed, full, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_compiled_default_check_still_raises_and_changes_nothing(steps_per_call):
    w = tf.Variable([1.0, 2.0])
    step = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(
        lambda x: tf.reduce_sum(x) * tf.reduce_sum(w * w),
        make_optimizer("keras", "sgd", 0.1),
        step,
        jit_compile=True,
        steps_per_call=steps_per_call,
    )
    healthy = np.ones((steps_per_call, 2), np.float32)
    train_op(healthy)
    before = w.numpy().copy()
    bad = healthy.copy()
    bad[-1, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match=trainop.LOSS_NOT_FINITE_MESSAGE):
        train_op(bad)
    if steps_per_call == 1:
        np.testing.assert_array_equal(w.numpy(), before)
    assert int(step.numpy()) == 2 * steps_per_call - 1  # the bad step alone was not applied
    assert np.isfinite(w.numpy()).all()


def _compiled_guarded_square():
    """w = 1 trained on x * w^2 by a compiled step with a skip guard allowing 1 bad step in a
    row; returns (w, guard, train_op)."""
    w = tf.Variable(1.0)
    guard = trainop.SkipNonFiniteSteps(max_consecutive=1)
    train_op = trainop.create_train_op(
        lambda x: x * w * w,
        make_optimizer("keras", "sgd", 0.1),
        global_step=None,
        check_numerics=guard,
        jit_compile=True,
    )
    return w, guard, train_op


def test_compiled_skip_guard_stops_after_max_consecutive():
    w, guard, train_op = _compiled_guarded_square()
    train_op(tf.constant(np.nan))  # skipped
    with pytest.raises(tf.errors.InvalidArgumentError, match="after 1 skipped steps in a row"):
        train_op(tf.constant(np.nan))
    assert float(w.numpy()) == 1.0


def test_steps_per_call_with_float64_losses_and_summaries_under_their_own_tags(tmp_path):
    w = tf.Variable([1.0, 2.0], dtype=tf.float64)
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        train_op = trainop.create_train_op(
            lambda x: tf.reduce_sum(x * w * w),
            make_optimizer("keras", "sgd", 0.1),
            steps_per_call=3,
        )
        losses = train_op(tf.ones((3, 2), tf.float64))
    writer.flush()
    assert losses.dtype == tf.float32 and losses.shape == (3,)
    tags = set(read_summaries(tmp_path))
    assert "train/loss" in tags and not any(tag.startswith("while") for tag in tags)


# --- The numerics guard compiled: as the uncompiled step ---------------------------------------

NAN, INF = np.nan, np.inf
# steps_per_call and the calls, each the values of `x` of its steps (NaN or inf: a bad step).
GUARDED_CALLS = {
    "bad": (1, [[NAN]]),
    "good_bad_good": (1, [[1.0], [NAN], [1.0]]),
    "bad_bad_good_then_three_bad": (1, [[NAN], [INF], [1.0], [NAN], [NAN], [NAN], [1.0]]),
    "bad_then_good_in_a_call": (2, [[NAN, 1.0]]),
    "good_then_bad_in_a_call": (2, [[1.0, NAN], [1.0, 1.0]]),
    "bad_bad_in_a_call": (2, [[NAN, NAN], [1.0, 1.0]]),
    "bad_bad_across_calls": (2, [[1.0, NAN], [NAN, 1.0], [1.0, 1.0]]),
    "bad_good_then_bad_bad_bad": (2, [[INF, 1.0], [NAN, NAN], [NAN, 1.0], [1.0, 1.0]]),
}
GUARDS = {
    "max_consecutive_0": lambda: trainop.SkipNonFiniteSteps(max_consecutive=0),
    "max_consecutive_1": lambda: trainop.SkipNonFiniteSteps(max_consecutive=1),
    "no_limit": lambda: trainop.SkipNonFiniteSteps(max_consecutive=None),
    "check_numerics_true": lambda: True,
}


def _guarded_run(
    family, guard_name, steps_per_call, calls, jit_compile, global_step=True, accumulation_steps=1
):
    """Runs the calls; returns, per call, the losses (or the message of the error it raised)
    and every variable after it: weights, global step, optimizer state, the guard's counters."""
    w = tf.Variable([1.0, 2.0])
    step = tf.Variable(0, dtype=tf.int64) if global_step else None
    optimizer = make_optimizer(family, "sgd", 0.125)
    guard = GUARDS[guard_name]()
    train_op = trainop.create_train_op(
        lambda x: x * tf.reduce_sum(w * w),
        optimizer,
        step,
        check_numerics=guard,
        jit_compile=jit_compile,
        steps_per_call=steps_per_call,
        accumulation_steps=accumulation_steps,
    )
    outcomes = []
    for call in calls:
        x = np.array(call if steps_per_call > 1 else call[0], np.float32)
        try:
            result = np.asarray(train_op(x), np.float64)
        except tf.errors.InvalidArgumentError as error:
            result = error.message
        state = [w.numpy()]
        state += [np.asarray(v) for v in optimizer.variables] if family == "keras" else []
        state += [step.numpy()] if step is not None else []
        if guard is not True:
            state += [guard.skipped_steps.numpy(), guard.consecutive_skipped_steps.numpy()]
        outcomes.append((result, state))
    return outcomes


def _assert_same_outcomes(compiled, uncompiled):
    for call, ((result, state), (expected, expected_state)) in enumerate(
        zip(compiled, uncompiled, strict=True)
    ):
        if isinstance(expected, str):
            assert isinstance(result, str), f"call {call}: returned {result}, should raise"
            for message in (trainop.LOSS_NOT_FINITE_MESSAGE, trainop.NOT_FINITE_MESSAGE):
                assert (message in result) == (message in expected), (result, expected)
        else:
            assert not isinstance(result, str), f"call {call} raised: {result}"
            np.testing.assert_allclose(result, expected, rtol=1e-6, err_msg=f"call {call}")
        assert len(state) == len(expected_state)
        for value, expected_value in zip(state, expected_state):
            np.testing.assert_allclose(value, expected_value, rtol=1e-6, err_msg=f"call {call}")


@pytest.mark.parametrize("calls", GUARDED_CALLS)
@pytest.mark.parametrize("guard", GUARDS)
@pytest.mark.parametrize("family", ["keras", "v1"])
def test_a_compiled_guard_raises_and_changes_what_the_uncompiled_one_does(family, guard, calls):
    steps_per_call, calls = GUARDED_CALLS[calls]
    _assert_same_outcomes(
        _guarded_run(family, guard, steps_per_call, calls, jit_compile=True),
        _guarded_run(family, guard, steps_per_call, calls, jit_compile=False),
    )


@pytest.mark.parametrize("family", ["keras", "v1"])
def test_a_compiled_guard_without_a_global_step_stops_as_the_uncompiled_one(family):
    steps_per_call, calls = GUARDED_CALLS["bad_good_then_bad_bad_bad"]
    compiled, uncompiled = (
        _guarded_run(family, "max_consecutive_1", steps_per_call, calls, jit, global_step=False)
        for jit in (True, False)
    )
    _assert_same_outcomes(compiled, uncompiled)
    # Keras counts in its optimizer's iterations, which the error names; v1 has no counter.
    step = "at optimizer step 1 " if family == "keras" else "inf or nan after"
    assert step in compiled[2][0] and "after 1 skipped steps in a row" in compiled[2][0]


@pytest.mark.parametrize("calls", ["good_then_bad_in_a_call", "bad_good_then_bad_bad_bad"])
@pytest.mark.parametrize("guard", ["max_consecutive_0", "max_consecutive_1", "check_numerics_true"])
def test_a_compiled_guard_with_accumulation_raises_and_adds_what_the_uncompiled_one_does(
    guard, calls
):
    steps_per_call, calls = GUARDED_CALLS[calls]
    compiled, uncompiled = (
        _guarded_run("keras", guard, steps_per_call, calls, jit, accumulation_steps=2)
        for jit in (True, False)
    )
    _assert_same_outcomes(compiled, uncompiled)


def test_the_steps_of_a_call_after_a_compiled_step_that_raises_do_not_run():
    w = tf.Variable(1.0)
    forward_passes = tf.Variable(0)

    def loss(x):
        # A write of the forward pass, as batch normalization's statistics are.
        forward_passes.assign_add(1)
        return x * w * w

    train_op = trainop.create_train_op(
        loss,
        make_optimizer("keras", "sgd", 0.1),
        global_step=None,
        check_numerics=trainop.SkipNonFiniteSteps(max_consecutive=0),
        jit_compile=True,
        steps_per_call=3,
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=trainop.NOT_FINITE_MESSAGE):
        train_op(tf.constant([1.0, np.nan, 1.0]))
    assert float(w.numpy()) == pytest.approx(0.8)  # the first step's update
    # The first step's write; the second step's, undone with its rejection; the third step
    # did not run (it would have written 2).
    assert int(forward_passes.numpy()) == 1


def test_the_stop_flag_is_no_part_of_the_guards_checkpoint(tmp_path):
    # A checkpoint of a guard from before the flag: its two counters.
    old = tf.Module()
    old.skipped_steps = tf.Variable(3, dtype=tf.int64)
    old.consecutive_skipped_steps = tf.Variable(1, dtype=tf.int64)
    old_path = tf.train.Checkpoint(guard=old).save(str(tmp_path / "old"))

    w, guard, train_op = _compiled_guarded_square()
    tf.train.Checkpoint(guard=guard).restore(old_path).assert_consumed()
    assert (int(guard.skipped_steps), int(guard.consecutive_skipped_steps)) == (3, 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="after 1 skipped steps in a row"):
        train_op(tf.constant(np.nan))
    assert len(guard.variables) == 2
    new_path = tf.train.Checkpoint(guard=guard).save(str(tmp_path / "new"))
    assert sorted(name for name, _ in tf.train.list_variables(new_path)) == sorted(
        name for name, _ in tf.train.list_variables(old_path)
    )
    # The call that stopped cleared the flag: a healthy step trains.
    train_op(tf.constant(1.0))
    assert float(w.numpy()) == pytest.approx(0.8)
    assert int(guard.consecutive_skipped_steps) == 0
