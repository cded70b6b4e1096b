"""create_train_step: TF-Agents' semantics, in graph and eager mode."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer, read_summaries

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


def compiled_updates(optimizer):
    """The compiled updates that `create_train_step` keeps for `optimizer`."""
    return [
        update
        for prepared, _ in trainop._eager.STEP_CACHE.values()
        if prepared.adapter.optimizer is optimizer
        for update, _ in prepared.updates.values()
    ]


def test_repeated_calls_train_each_time_and_compile_the_update_once(runner):
    calls = []
    model_loss = classifier(runner, "model")

    def loss():
        calls.append(1)
        return model_loss()

    optimizer = make_optimizer("v1", "sgd", 0.1)
    losses = [float(run_train_step(runner, loss, optimizer)) for _ in range(7)]
    assert losses[0] == pytest.approx(INITIAL_LOSS, 1e-5)
    assert losses[-1] == pytest.approx(LOSS_AFTER_SIX_STEPS, 1e-5)
    if runner.mode == "graph":
        assert len(calls) == 1  # the loss tensor, built once
    else:
        # The loss is evaluated afresh on every call, as TF-Agents does; what follows the
        # gradients is traced once.
        assert len(calls) == 7
        [update] = compiled_updates(optimizer)
        assert update.experimental_get_tracing_count() == 1


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


def test_a_bound_method_as_loss_reads_the_attributes_of_each_call():
    class Agent:
        def __init__(self):
            self.w = tf.Variable(3.0)
            self.scale = 1.0
            self.calls = 0

        def loss(self):
            self.calls += 1
            return self.scale * self.w * self.w

    agent = Agent()
    optimizer = make_optimizer("keras", "sgd", 0.1)
    optimizer.build([agent.w])
    w, expected = 3.0, []
    for scale in [1.0, 2.0, 0.5, 3.0]:
        agent.scale = scale  # a Python attribute, rebound: a trace would keep the first one
        expected.append(scale * w * w)
        w -= 0.1 * 2.0 * scale * w
        assert float(trainop.create_train_step(agent.loss, optimizer)) == pytest.approx(
            expected[-1], 1e-5
        )
    assert agent.w.numpy() == pytest.approx(w, 1e-5)
    assert agent.calls == 4
    [update] = compiled_updates(optimizer)
    assert update.experimental_get_tracing_count() == 1


# --- Every call trains on what the loss reads now ----------------------------------------------

BATCHES = [
    (np.array([[1.0, 2.0], [3.0, -1.0]], np.float32), np.array([1.0, 0.0], np.float32)),
    (np.array([[-2.0, 0.5], [1.0, 1.0]], np.float32), np.array([2.0, -1.0], np.float32)),
    (np.array([[0.5, 0.5], [4.0, -3.0]], np.float32), np.array([0.0, 3.0], np.float32)),
]
W0 = np.array([0.5, -0.25], np.float32)


def sgd_reference(batches, lr=0.1):
    """Plain SGD on mean((x @ w - y)^2): the weights after each batch, and the losses before."""
    w, losses = W0.astype(np.float64), []
    for x, y in batches:
        error = x @ w - y
        losses.append(np.mean(error**2))
        w = w - lr * 2.0 * x.T @ error / len(y)
    return w, losses


def mse(w, x, y):
    return tf.reduce_mean((tf.linalg.matvec(x, w) - y) ** 2)


# Rebound by the loop of the test below, as a training script rebinds its batch.
x_now, y_now = BATCHES[0]


@pytest.mark.parametrize("family", ["v1", "keras", "tf_keras", "tf_keras_legacy"])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "eager_tensor"])
def test_a_loss_reading_a_rebound_global_trains_on_each_batch(family, as_tensor):
    global x_now, y_now
    w = tf.Variable(W0)
    optimizer = make_optimizer(family, "sgd", 0.1)

    def loss_fn():
        return mse(w, x_now, y_now)

    losses = []
    for x, y in BATCHES:
        x_now, y_now = (tf.constant(x), tf.constant(y)) if as_tensor else (x, y)
        losses.append(float(trainop.create_train_step(loss_fn, optimizer)))
    expected_w, expected_losses = sgd_reference(BATCHES)
    np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-5)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)


def test_a_loss_reading_a_rebound_closure_variable_trains_on_each_batch():
    w = tf.Variable(W0)
    optimizer = make_optimizer("keras", "sgd", 0.1)
    x, y = BATCHES[0]

    def loss_fn():
        return mse(w, x, y)

    for batch in BATCHES:
        x, y = batch
        trainop.create_train_step(loss_fn, optimizer)
    np.testing.assert_allclose(w.numpy(), sgd_reference(BATCHES)[0], rtol=1e-5)


def test_a_lambda_made_each_step_trains_on_its_batch():
    # Each lambda dies after its step: its id may be lent to the next one.
    w = tf.Variable(W0)
    optimizer = make_optimizer("v1", "sgd", 0.1)
    for x, y in BATCHES:
        trainop.create_train_step(lambda: mse(w, x, y), optimizer)  # noqa: B023
    np.testing.assert_allclose(w.numpy(), sgd_reference(BATCHES)[0], rtol=1e-5)


def test_a_batch_buffer_refilled_in_place_trains_on_each_batch():
    w = tf.Variable(W0)
    optimizer = make_optimizer("keras", "sgd", 0.1)
    x, y = np.zeros_like(BATCHES[0][0]), np.zeros_like(BATCHES[0][1])

    def loss_fn():
        return mse(w, x, y)

    for batch_x, batch_y in BATCHES:
        x[:], y[:] = batch_x, batch_y  # the same arrays, new contents
        trainop.create_train_step(loss_fn, optimizer)
    np.testing.assert_allclose(w.numpy(), sgd_reference(BATCHES)[0], rtol=1e-5)


def test_transform_grads_fn_runs_on_each_call():
    w = tf.Variable(W0)
    optimizer = make_optimizer("keras", "sgd", 0.1)
    factor = 1.0

    def scaled(grads_and_vars):
        return [(g * factor, v) for g, v in grads_and_vars]

    x, y = BATCHES[0]

    def loss_fn():
        return mse(w, x, y)

    expected = W0.astype(np.float64)
    for factor in [1.0, 0.0, 2.0]:
        trainop.create_train_step(loss_fn, optimizer, transform_grads_fn=scaled)
        expected = expected - 0.1 * factor * 2.0 * x.T @ (x @ expected - y) / len(y)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-5)


# --- What the kept update depends on -----------------------------------------------------------


def test_check_numerics_is_part_of_what_the_kept_update_is_kept_for():
    w = tf.Variable(W0)
    optimizer = make_optimizer("keras", "sgd", 0.1)
    x, y = BATCHES[0]

    def loss_fn():
        return mse(w, x, y)

    trainop.create_train_step(loss_fn, optimizer, check_numerics=False)
    after_one = sgd_reference(BATCHES[:1])[0]
    np.testing.assert_allclose(w.numpy(), after_one, rtol=1e-5)
    x = np.full_like(x, np.nan)
    with pytest.raises(tf.errors.InvalidArgumentError, match="LossTensor is inf or nan"):
        trainop.create_train_step(loss_fn, optimizer, check_numerics=True)
    np.testing.assert_allclose(w.numpy(), after_one, rtol=1e-5)


def test_variables_to_train_is_part_of_what_the_kept_update_is_kept_for(runner):
    loss = classifier(runner, "model")
    optimizer = make_optimizer("v1", "sgd", 0.1)
    run_train_step(runner, loss, optimizer, variables_to_train=[loss.kernel])
    np.testing.assert_array_equal(runner.read(loss.bias), np.zeros(3))
    if runner.mode == "eager":
        kernel = runner.read(loss.kernel)
        trainop.create_train_step(loss, optimizer, variables_to_train=[loss.kernel, loss.bias])
        assert np.abs(runner.read(loss.bias)).sum() > 0.01
        assert np.abs(runner.read(loss.kernel) - kernel).sum() > 0.01


def test_a_new_program_global_step_is_counted_in():
    w = tf.Variable(W0)
    optimizer = make_optimizer("keras", "sgd", 0.1)
    x, y = BATCHES[0]

    def loss_fn():
        return mse(w, x, y)

    trainop.create_train_step(loss_fn, optimizer)
    first = tf.compat.v1.train.get_global_step()
    assert int(first.numpy()) == 1
    tf.compat.v1.get_default_graph().clear_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP)
    trainop.create_train_step(loss_fn, optimizer)
    second = tf.compat.v1.train.get_global_step()
    assert second is not first
    assert (int(first.numpy()), int(second.numpy())) == (1, 1)


def test_a_writer_set_after_the_first_call_is_written_to(tmp_path):
    w = tf.Variable(W0)
    optimizer = make_optimizer("keras", "sgd", 0.1)
    x, y = BATCHES[0]

    def loss_fn():
        return mse(w, x, y)

    trainop.create_train_step(loss_fn, optimizer)
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        loss = trainop.create_train_step(loss_fn, optimizer)
    writer.flush()
    series = read_summaries(tmp_path)
    [(step, value)] = series["train/loss"]
    assert step == 1
    assert float(value) == pytest.approx(float(loss), 1e-6)


def test_update_ops_run_as_they_read_on_each_call():
    w = tf.Variable(W0)
    counter = tf.Variable(0.0, trainable=False)
    optimizer = make_optimizer("keras", "sgd", 0.1)
    x, y = BATCHES[0]
    increment = 0.0
    update_ops = [lambda: counter.assign_add(increment)]

    def loss_fn():
        return mse(w, x, y)

    for value in [1.0, 2.0, 4.0]:
        increment = value  # read by the update op, as the loss reads its batch
        trainop.create_train_step(loss_fn, optimizer, update_ops=update_ops)
    assert counter.numpy() == 7.0
    np.testing.assert_allclose(w.numpy(), sgd_reference(BATCHES[:1] * 3)[0], rtol=1e-5)


# --- The gradients, taken eagerly ---------------------------------------------------------------


def test_loss_scale_optimizer_steps_as_its_inner_optimizer():
    w = tf.Variable(W0)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    for x, y in BATCHES:
        trainop.create_train_step(lambda: mse(w, x, y), optimizer)  # noqa: B023
    np.testing.assert_allclose(w.numpy(), sgd_reference(BATCHES)[0], rtol=1e-5)
    assert int(optimizer.iterations.numpy()) == 3


@pytest.mark.parametrize("family", ["v1", "keras"])
def test_embedding_rows_get_sparse_gradients_with_repeats(family):
    table = tf.Variable(np.arange(8, dtype=np.float32).reshape(4, 2))
    optimizer = make_optimizer(family, "sgd", 0.5)
    expected = table.numpy().astype(np.float64)
    for ids in [[0, 2, 2], [3, 1, 3, 3]]:
        # 0.5 * sum of the looked-up rows' squares: each lookup adds its row to the gradient.
        trainop.create_train_step(
            lambda: 0.5 * tf.reduce_sum(tf.gather(table, ids) ** 2),  # noqa: B023
            optimizer,
            global_step=None,
        )
        counts = np.bincount(ids, minlength=4)[:, None]
        expected = expected - 0.5 * counts * expected
    np.testing.assert_allclose(table.numpy(), expected, rtol=1e-6)


def test_skip_guard_skips_a_nan_batch_and_trains_on_the_next():
    w = tf.Variable(W0)
    guard = trainop.SkipNonFiniteSteps(max_consecutive=2)
    optimizer = make_optimizer("keras", "sgd", 0.1)
    nan_batch = (np.full_like(BATCHES[0][0], np.nan), BATCHES[0][1])
    for x, y in [BATCHES[0], nan_batch, BATCHES[1]]:
        trainop.create_train_step(lambda: mse(w, x, y), optimizer, check_numerics=guard)  # noqa: B023
    np.testing.assert_allclose(w.numpy(), sgd_reference(BATCHES[:2])[0], rtol=1e-5)
    assert int(guard.skipped_steps.numpy()) == 1


def test_setting_the_summary_step_each_call_does_not_retrace(tmp_path):
    """The usual TensorFlow 2 loop sets tf.summary's step to a Python int every step: the
    train op writes at its global step, so the compiled update is traced once."""
    w = tf.Variable([3.0, 4.0])
    optimizer = make_optimizer("keras", "sgd", 0.5)
    global_step = tf.Variable(0, dtype=tf.int64)
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        for i in range(4):
            tf.summary.experimental.set_step(i)
            trainop.create_train_step(lambda: 0.5 * tf.reduce_sum(w * w), optimizer, global_step)
    tf.summary.experimental.set_step(None)
    np.testing.assert_allclose(w.numpy(), np.array([3.0, 4.0]) * 0.5**4)
    [update] = compiled_updates(optimizer)
    assert update.experimental_get_tracing_count() == 1
