"""create_train_step: TF-Agents' semantics, in graph and eager mode."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer

INPUTS = np.array([[1, 2], [2, 3], [3, 4]], np.float32)
LABELS = np.array([0, 1, 2], np.int32)
# The losses TF-Agents' own tests expect of this model: a dense layer of ones, 3 classes,
# gradient descent at 0.1.
INITIAL_LOSS = 1.098612
LOSS_AFTER_ONE_STEP = 1.064379
LOSS_AFTER_SIX_STEPS = 1.033917


def classifier(runner, name):
    kernel = runner.variable(np.ones((2, 3), np.float32), f"{name}/kernel")
    bias = runner.variable(np.zeros(3, np.float32), f"{name}/bias")

    def loss():
        logits = tf.matmul(INPUTS, kernel) + bias
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=LABELS, logits=logits)
        )

    loss.kernel, loss.bias = kernel, bias
    return loss


def run_train_step(runner, loss, optimizer, **kwargs):
    """Runs one step: in eager mode `create_train_step` does; in graph mode its tensors do."""
    if runner.mode == "eager":
        return trainop.create_train_step(loss, optimizer, **kwargs)
    if not hasattr(runner, "train_step"):
        runner.train_step = trainop.create_train_step(loss(), optimizer, **kwargs)
        runner.initialize()
    return runner.session.run(runner.train_step)


def test_returns_the_loss_and_trains(runner):
    loss = classifier(runner, "model")
    optimizer = make_optimizer("v1", "sgd", 0.1)
    assert float(run_train_step(runner, loss, optimizer)) == pytest.approx(INITIAL_LOSS, 1e-5)
    assert float(run_train_step(runner, loss, optimizer)) == pytest.approx(
        LOSS_AFTER_ONE_STEP, 1e-5
    )
    assert runner.read(runner.global_step()) == 2


def test_repeated_calls_train_each_time_and_trace_once(runner):
    traces = []
    model_loss = classifier(runner, "model")

    def loss():
        traces.append(1)
        return model_loss()

    optimizer = make_optimizer("v1", "sgd", 0.1)
    losses = [float(run_train_step(runner, loss, optimizer)) for _ in range(7)]
    assert losses[0] == pytest.approx(INITIAL_LOSS, 1e-5)
    assert losses[-1] == pytest.approx(LOSS_AFTER_SIX_STEPS, 1e-5)
    assert len(traces) == 1


def test_total_loss_fn_picks_what_to_minimize_and_the_structure_is_returned(runner):
    first = classifier(runner, "first")
    second = classifier(runner, "second")
    losses = lambda: {"first": first(), "second": (second(), 2.0 * second())}  # noqa: E731
    optimizer = make_optimizer("keras", "sgd", 0.1)

    def step():
        return run_train_step(runner, losses, optimizer, total_loss_fn=lambda ls: ls["first"])

    result = step()
    assert set(result) == {"first", "second"}
    np.testing.assert_allclose(
        [result["first"], *result["second"]],
        [INITIAL_LOSS, INITIAL_LOSS, 2 * INITIAL_LOSS],
        rtol=1e-5,
    )
    result = step()
    # Only the first model was trained.
    assert float(result["first"]) == pytest.approx(LOSS_AFTER_ONE_STEP, 1e-5)
    assert float(result["second"][0]) == pytest.approx(INITIAL_LOSS, 1e-5)


def test_variables_to_train_as_a_callable(runner):
    loss = classifier(runner, "model")
    optimizer = make_optimizer("v1", "sgd", 0.1)
    for _ in range(2):
        run_train_step(runner, loss, optimizer, variables_to_train=lambda: [loss.kernel])
    np.testing.assert_array_equal(runner.read(loss.bias), np.zeros(3))
    assert np.abs(runner.read(loss.kernel) - 1.0).sum() > 0.01


def test_bad_arguments():
    w = tf.Variable(1.0)
    # ValueError, as TF-Agents raises.
    with pytest.raises(ValueError, match="`total_loss_fn` must be a callable"):
        trainop.create_train_step(lambda: w * w, make_optimizer("keras"), total_loss_fn=3)
    with pytest.raises(ValueError, match="`loss` must be a zero-argument callable"):
        trainop.create_train_step(w * w, make_optimizer("keras"))


def test_nan_loss_raises_before_anything_changes():
    w = tf.Variable(1.0)
    scale = tf.Variable(1.0, trainable=False)
    optimizer = make_optimizer("keras", "adam")
    loss = lambda: (scale * w * w, w)  # noqa: E731
    trainop.create_train_step(loss, optimizer, total_loss_fn=lambda losses: losses[0])
    before = w.numpy(), [v.numpy() for v in optimizer.variables]
    scale.assign(np.nan)
    with pytest.raises(tf.errors.InvalidArgumentError, match="LossTensor is inf or nan"):
        trainop.create_train_step(loss, optimizer, total_loss_fn=lambda losses: losses[0])
    assert w.numpy() == before[0]
    for b, v in zip(before[1], optimizer.variables):
        np.testing.assert_array_equal(v.numpy(), b)


def test_compiled_steps_of_old_losses_are_let_go():
    import gc
    import weakref

    def train_once(value):
        w = tf.Variable(value)
        trainop.create_train_step(lambda: w * w, make_optimizer("keras"), global_step=None)
        return weakref.ref(w)

    first = train_once(1.0)
    gc.collect()
    assert first() is not None  # its compiled step is kept for the next call
    for value in range(2, 12):
        train_once(float(value))
    gc.collect()
    assert first() is None


def test_a_bound_method_as_loss_is_compiled_once():
    class Agent:
        def __init__(self):
            self.w = tf.Variable(3.0)
            self.traces = 0

        def loss(self):
            self.traces += 1
            return self.w * self.w

    agent = Agent()
    optimizer = make_optimizer("keras", "sgd", 0.1)
    optimizer.build([agent.w])
    losses = [float(trainop.create_train_step(agent.loss, optimizer)) for _ in range(4)]
    np.testing.assert_allclose(losses, [9.0 * 0.64**i for i in range(4)], rtol=1e-5)
    assert agent.traces == 1
