"""What an optimizer does while the gradients are computed is honoured, as its `minimize` does.

* A Keras 3 optimizer made with `loss_scale_factor=` divides the gradients by it in
  `apply_gradients`, expecting the gradients of `optimizer.scale_loss(loss)`: the step takes the
  gradients of the scaled loss, and the guard, transforms and summaries see them unscaled.
* A `tf.compat.v1` optimizer that overrides `compute_gradients` (loss scaling, Horovod's
  averaging across workers) computes the step's gradients itself, with the step's
  `gate_gradients`, `aggregation_method` and variables.
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop

W0 = np.array([1.0, 2.0], np.float32)
B0 = np.array([3.0], np.float32)


def square(w):
    """sum(w * w), whose gradient is 2 w."""
    return lambda: tf.reduce_sum(w * w)


# --- Keras 3 loss_scale_factor --------------------------------------------------------------


@pytest.mark.parametrize("check_numerics", [True, "skip"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_keras_loss_scale_factor_updates_as_the_optimizer_expects(runner, check_numerics, clip):
    optimizer = keras.optimizers.SGD(0.1, loss_scale_factor=128.0)
    w = runner.variable(W0, "w")
    transform = None if clip is None else trainop.clip_gradient_norms_fn(clip)
    step = runner.train_op(
        square(w),
        optimizer,
        check_numerics=check_numerics,
        transform_grads_fn=transform,
        global_step=None,
    )
    step()
    grad = 2 * W0
    if clip is not None:
        # The transform sees the true gradient (norm 4.47), not 128 times it.
        grad = grad / np.linalg.norm(grad) * clip
    np.testing.assert_allclose(runner.read(w), W0 - 0.1 * grad, rtol=1e-6)
    if clip is None:
        np.testing.assert_allclose(runner.read(w), [0.8, 1.6], rtol=1e-6)


def test_keras_loss_scale_factor_is_what_scale_loss_and_apply_gradients_do():
    reference_optimizer = keras.optimizers.SGD(0.1, loss_scale_factor=128.0)
    reference = tf.Variable(W0)
    with tf.GradientTape() as tape:
        loss = reference_optimizer.scale_loss(square(reference)())
    reference_optimizer.apply_gradients([(tape.gradient(loss, reference), reference)])

    w = tf.Variable(W0)
    trainop.create_train_op(square(w), keras.optimizers.SGD(0.1, loss_scale_factor=128.0))()
    np.testing.assert_allclose(w.numpy(), reference.numpy(), rtol=1e-6)


def test_keras_loss_scale_factor_summaries_see_true_gradients(tmp_path):
    from conftest import read_summaries

    optimizer = keras.optimizers.SGD(0.1, loss_scale_factor=128.0)
    w = tf.Variable(W0, name="w")
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default(step=0):
        trainop.create_train_op(square(w), optimizer, summarize_gradients=True)()
    writer.flush()
    norms = {
        tag: values for tag, values in read_summaries(tmp_path).items() if tag.endswith("norm")
    }
    assert norms, read_summaries(tmp_path).keys()
    for values in norms.values():
        np.testing.assert_allclose(values[0][1], np.linalg.norm(2 * W0), rtol=1e-5)


def test_keras_loss_scale_factor_skip_guard_sees_gradients(runner):
    """A NaN gradient of a finite loss is caught by the guard: the optimizer does not skip."""
    optimizer = keras.optimizers.SGD(0.1, loss_scale_factor=128.0)
    w = runner.variable(W0, "w")

    @tf.custom_gradient
    def nan_gradient(x):
        return tf.identity(x), lambda dy: dy * float("nan")

    step = runner.train_op(
        lambda: tf.reduce_sum(nan_gradient(w) * w),
        optimizer,
        check_numerics="skip",
        global_step=None,
    )
    step()
    np.testing.assert_array_equal(runner.read(w), W0)


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_keras_loss_scale_factor_train_step(mode):
    if mode == "eager":
        w = tf.Variable(W0)
        optimizer = keras.optimizers.SGD(0.1, loss_scale_factor=128.0)
        trainop.create_train_step(square(w), optimizer, global_step=None)
        np.testing.assert_allclose(w.numpy(), [0.8, 1.6], rtol=1e-6)
        return
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.compat.v1.get_variable("w", initializer=W0, use_resource=True)
        optimizer = keras.optimizers.SGD(0.1, loss_scale_factor=128.0)
        step = trainop.create_train_step(square(w)(), optimizer, global_step=None)
        session.run(tf.compat.v1.global_variables_initializer())
        session.run(step)
        np.testing.assert_allclose(session.run(w), [0.8, 1.6], rtol=1e-6)


# --- tf.compat.v1 optimizers overriding compute_gradients ---------------------------------


class DoublingSGD(tf.compat.v1.train.GradientDescentOptimizer):
    """Scales the loss by 4 and halves the gradients: twice `tf.gradients`, on purpose, so that
    bypassing it shows. Records the arguments of each call."""

    def __init__(self, learning_rate):
        super().__init__(learning_rate)
        self.calls = []

    def compute_gradients(
        self,
        loss,
        var_list=None,
        gate_gradients=tf.compat.v1.train.Optimizer.GATE_OP,
        aggregation_method=None,
        **kwargs,
    ):
        self.calls.append(
            {
                "var_list": None if var_list is None else [v.name for v in var_list],
                "gate_gradients": gate_gradients,
                "aggregation_method": aggregation_method,
                "loss_is_callable": callable(loss),
            }
        )
        scaled = (lambda: 4.0 * loss()) if callable(loss) else 4.0 * loss
        pairs = super().compute_gradients(
            scaled,
            var_list=var_list,
            gate_gradients=gate_gradients,
            aggregation_method=aggregation_method,
            **kwargs,
        )
        return [(None if g is None else g / 2.0, v) for g, v in pairs]


def two_variable_loss(w, b):
    return lambda: tf.reduce_sum(w * w) + tf.reduce_sum(b * b * b)


def minimize_reference(mode):
    """w and b after one `optimizer.minimize` of the loss over [w]."""
    optimizer = DoublingSGD(0.1)
    if mode == "eager":
        w, b = tf.Variable(W0, name="w"), tf.Variable(B0, name="b")
        optimizer.minimize(two_variable_loss(w, b), var_list=[w])
        return w.numpy(), b.numpy()
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.compat.v1.get_variable("w", initializer=W0, use_resource=True)
        b = tf.compat.v1.get_variable("b", initializer=B0, use_resource=True)
        op = optimizer.minimize(two_variable_loss(w, b)(), var_list=[w])
        session.run(tf.compat.v1.global_variables_initializer())
        session.run(op)
        return session.run(w), session.run(b)


def test_v1_reference_doubles_the_gradient():
    w, b = minimize_reference("graph")
    np.testing.assert_allclose(w, W0 - 0.1 * 2 * (2 * W0), rtol=1e-6)
    np.testing.assert_array_equal(b, B0)
    np.testing.assert_allclose(minimize_reference("eager")[0], w, rtol=1e-6)


@pytest.mark.parametrize("check_numerics", [True, "skip"])
def test_v1_overridden_compute_gradients_is_called_as_minimize_calls_it(runner, check_numerics):
    optimizer = DoublingSGD(0.1)
    w = runner.variable(W0, "w")
    b = runner.variable(B0, "b")
    step = runner.train_op(
        two_variable_loss(w, b),
        optimizer,
        variables_to_train=[w],
        gate_gradients=tf.compat.v1.train.Optimizer.GATE_GRAPH,
        aggregation_method=tf.AggregationMethod.EXPERIMENTAL_TREE,
        check_numerics=check_numerics,
    )
    step()
    expected_w, expected_b = minimize_reference(runner.mode)
    np.testing.assert_allclose(runner.read(w), expected_w, rtol=1e-6)
    np.testing.assert_array_equal(runner.read(b), expected_b)
    assert optimizer.calls, "the optimizer's compute_gradients was not called"
    for call in optimizer.calls:
        assert call == {
            "var_list": [w.name],
            "gate_gradients": tf.compat.v1.train.Optimizer.GATE_GRAPH,
            "aggregation_method": tf.AggregationMethod.EXPERIMENTAL_TREE,
            "loss_is_callable": False,
        }


def test_v1_overridden_compute_gradients_with_a_transform(runner):
    optimizer = DoublingSGD(0.1)
    w = runner.variable(W0, "w")
    seen = []

    def transform(pairs):
        seen.append(len(pairs))
        return [(g * 0.5, v) for g, v in pairs]

    runner.train_op(square(w), optimizer, transform_grads_fn=transform)()
    # The optimizer's doubled gradient, halved by the transform: plain SGD.
    np.testing.assert_allclose(runner.read(w), W0 - 0.1 * 2 * W0, rtol=1e-6)
    assert seen


def test_v1_plain_optimizer_is_not_routed_through_compute_gradients():
    adapter = trainop._optimizers.OptimizerAdapter(tf.compat.v1.train.AdamOptimizer(0.1))
    assert not adapter.computes_gradients
    assert trainop._optimizers.OptimizerAdapter(DoublingSGD(0.1)).computes_gradients


def test_v1_compute_gradients_for_other_variables_is_refused():
    class Other(tf.compat.v1.train.GradientDescentOptimizer):
        def compute_gradients(self, loss, var_list=None, **kwargs):
            return [(tf.ones_like(extra), extra)]

    extra = tf.Variable(B0, name="extra")
    w = tf.Variable(W0, name="w")
    with pytest.raises(ValueError, match="not given"):
        trainop.create_train_op(square(w), Other(0.1), variables_to_train=[w])()


def test_eager_train_step_refuses_an_optimizer_whose_compute_gradients_it_would_bypass():
    """create_train_step in eager mode takes its gradients with a tape, as TF-Agents does: an
    overridden compute_gradients is refused by name, with nothing changed, not bypassed."""
    w = tf.Variable(W0)
    optimizer = DoublingSGD(0.1)
    with pytest.raises(ValueError, match="`optimizer` overrides compute_gradients"):
        trainop.create_train_step(square(w), optimizer, global_step=None)
    np.testing.assert_array_equal(w.numpy(), W0)
    assert optimizer.calls == []


def test_keras_loss_scale_factor_with_an_embedding_trains_as_plain_sgd():
    """Keras divides the gradients by its loss_scale_factor with `/`, which IndexedSlices lack
    (Keras's own apply_gradients fails): trainop hands them over dense."""
    table = tf.Variable(np.ones((4, 2), np.float32))
    step = trainop.create_train_op(
        lambda ids: tf.reduce_sum(tf.gather(table, ids) ** 2),
        keras.optimizers.SGD(0.25, loss_scale_factor=128.0),
        global_step=None,
    )
    step(tf.constant([1, 1, 3]))
    # d/dtable: 2 * 2 * 1 for row 1 (looked up twice), 2 for row 3; SGD 0.25.
    np.testing.assert_allclose(table.numpy()[:, 0], [1.0, 0.0, 1.0, 0.5])


@pytest.mark.parametrize("loss_scale", [128.0, "dynamic"])
def test_v1_mixed_precision_loss_scale_optimizer_trains_as_its_minimize(runner, loss_scale):
    """tf.compat.v1's MixedPrecisionLossScaleOptimizer scales the loss in `compute_gradients`
    and unscales there: the step equals plain SGD, w - 0.1 * 2w (its own `minimize` too)."""
    inner = tf.compat.v1.train.GradientDescentOptimizer(0.1)
    optimizer = tf.compat.v1.mixed_precision.MixedPrecisionLossScaleOptimizer(inner, loss_scale)
    assert trainop._optimizers.OptimizerAdapter(optimizer).computes_gradients
    w = runner.variable(W0, "w")
    step = runner.train_op(square(w), optimizer)
    step()
    step()
    expected = W0 - 0.1 * 2 * W0
    expected = expected - 0.1 * 2 * expected
    np.testing.assert_allclose(runner.read(w), expected, rtol=1e-6)


# --- SyncReplicasOptimizer: ops built apart from the step ------------------------------------


def _sync_replicas_run(scales, make_step, applied):
    """Runs a graph with `w = [1, 2]`, loss `x * sum(w * w)`, a SyncReplicasOptimizer over
    SGD 0.1 (one replica, one gradient to aggregate) in a MonitoredSession with its hook, one
    call per value of `scales`; returns w, once the chief applied `applied` updates (it
    applies them in a thread of its own), and how many calls raised.

    With one replica, a call's gradients are stale (dropped by the optimizer) unless the call
    before it took the token of the last update: the first call's are applied, the second's
    dropped, the third's applied, and so on; a call that raises takes no token."""
    with tf.Graph().as_default():
        w = tf.Variable(W0, name="w")
        x = tf.compat.v1.placeholder(tf.float32, [])
        global_step = tf.compat.v1.train.get_or_create_global_step()
        optimizer = tf.compat.v1.train.SyncReplicasOptimizer(
            tf.compat.v1.train.GradientDescentOptimizer(0.1),
            replicas_to_aggregate=1,
            total_num_replicas=1,
        )
        step = make_step(x * tf.reduce_sum(w * w), optimizer, global_step)
        raised = 0
        hook = optimizer.make_session_run_hook(is_chief=True)
        # The chief's thread waits for gradients until the session closes: do not wait for it.
        with tf.compat.v1.train.MonitoredSession(hooks=[hook], stop_grace_period_secs=0) as session:
            for value in scales:
                try:
                    session.run(step, {x: value})
                except tf.errors.InvalidArgumentError:
                    raised += 1
            deadline = time.monotonic() + 60
            while session.run(global_step) < applied and time.monotonic() < deadline:
                time.sleep(0.01)
            assert session.run(global_step) == applied
            return session.run(w), raised


def test_sync_replicas_optimizer_trains_as_its_minimize():
    """SyncReplicasOptimizer builds, in `apply_gradients`, ops that its session hook runs when
    the session is made (a readiness check of the variables, its token queue): built under the
    step's loss check they waited for the step's input, and the session could not be made."""
    w, raised = _sync_replicas_run(
        [1.0, 1.0, 1.0],
        lambda loss, opt, gs: trainop.create_train_op(loss, opt, global_step=gs),
        applied=2,
    )
    reference, _ = _sync_replicas_run(
        [1.0, 1.0, 1.0], lambda loss, opt, gs: opt.minimize(loss, global_step=gs), applied=2
    )
    np.testing.assert_allclose(w, W0 * 0.8 * 0.8, rtol=1e-6)
    np.testing.assert_array_equal(w, reference)
    assert raised == 0


def test_sync_replicas_optimizer_step_whose_loss_is_nan_applies_nothing():
    # Applied: the first call; the NaN one raises (no token taken); the third is stale; the
    # fourth applied.
    w, raised = _sync_replicas_run(
        [1.0, math.nan, 1.0, 1.0],
        lambda loss, opt, gs: trainop.create_train_op(loss, opt, global_step=gs),
        applied=2,
    )
    np.testing.assert_allclose(w, W0 * 0.8 * 0.8, rtol=1e-6)
    assert raised == 1


@pytest.mark.parametrize(
    "argument",
    [
        dict(check_numerics=trainop.SkipNonFiniteSteps()),
        dict(check_numerics="skip"),
        dict(accumulation_steps=2),
    ],
)
def test_sync_replicas_optimizer_refuses_an_update_in_a_cond(argument):
    (name,) = argument
    with tf.Graph().as_default():
        w = tf.Variable(W0)
        optimizer = tf.compat.v1.train.SyncReplicasOptimizer(
            tf.compat.v1.train.GradientDescentOptimizer(0.1), 1, 1
        )
        with pytest.raises(ValueError, match=f"`{name}` cannot be used with a SyncReplicas"):
            trainop.create_train_op(tf.reduce_sum(w * w), optimizer, **argument)


def test_v1_optimizer_applies_a_tf_variable_constraint_after_the_update_in_a_graph():
    """A `tf.Variable(constraint=...)`: a v1 optimizer projects it after its update (as its
    own `minimize` does), and a step the guard skips leaves it as it was."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.Variable(W0, constraint=lambda v: tf.clip_by_value(v, -0.5, 1.5))
        x = tf.compat.v1.placeholder(tf.float32, [])
        step = trainop.create_train_op(
            x * tf.reduce_sum(w * w),
            tf.compat.v1.train.GradientDescentOptimizer(0.1),
            check_numerics=trainop.SkipNonFiniteSteps(),
        )
        session.run(tf.compat.v1.global_variables_initializer())
        seen = []
        for value in [1.0, math.nan, 1.0]:
            session.run(step, {x: value})
            seen.append(session.run(w))
    # [1, 2] -> 0.8 * [1, 2] = [0.8, 1.6], projected to [0.8, 1.5]; skipped; 0.8 * that.
    np.testing.assert_allclose(seen, [[0.8, 1.5], [0.8, 1.5], [0.64, 1.2]], rtol=1e-6)
