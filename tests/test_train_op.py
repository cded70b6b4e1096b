"""create_train_op: every argument, in graph and eager mode, with every optimizer family."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer, read_summaries

LR = 0.1


def quadratic(runner, name="w", value=(1.0, -2.0, 3.0)):
    """A variable and the loss 0.5 * sum(w * w), whose gradient is w itself."""
    w = runner.variable(np.array(value, np.float32), name)
    return w, lambda: 0.5 * tf.reduce_sum(w * w)


# --- The numbers -------------------------------------------------------------------------------


def test_gradient_descent_step_is_w_minus_lr_times_grad(runner, family):
    w, loss_fn = quadratic(runner)
    step = runner.train_op(loss_fn, make_optimizer(family, "sgd", LR))
    w0 = runner.read(w)

    loss = step()

    expected = w0 - np.float32(LR) * w0  # the gradient of 0.5 * |w|^2 is w
    np.testing.assert_array_equal(runner.read(w), expected)
    # The loss returned is the one the gradients were taken of, before the update.
    np.testing.assert_allclose(loss, 0.5 * np.sum(w0 * w0), rtol=1e-6)


def test_adam_matches_the_optimizer_applied_by_hand(runner, family):
    # Adam's first step moves each weight by lr * sign(grad) (up to epsilon).
    w, loss_fn = quadratic(runner)
    step = runner.train_op(loss_fn, make_optimizer(family, "adam", LR))
    w0 = runner.read(w)
    step()
    np.testing.assert_allclose(runner.read(w), w0 - LR * np.sign(w0), rtol=1e-5)


def test_loss_falls_over_steps(runner, family):
    w, loss_fn = quadratic(runner)
    step = runner.train_op(loss_fn, make_optimizer(family, "sgd", LR))
    losses = [float(step()) for _ in range(5)]
    np.testing.assert_allclose(losses[1:], np.array(losses[:-1]) * (1 - LR) ** 2, rtol=1e-5)


# --- global_step -------------------------------------------------------------------------------


def test_default_global_step_counts_each_step_once(runner, family):
    w, loss_fn = quadratic(runner)
    step = runner.train_op(loss_fn, make_optimizer(family))
    for _ in range(3):
        step()
    assert runner.read(runner.global_step()) == 3


def test_global_step_none_counts_nothing(runner, family):
    w, loss_fn = quadratic(runner)
    step = runner.train_op(loss_fn, make_optimizer(family), global_step=None)
    step()
    step()
    assert runner.global_step() is None  # not even created
    assert runner.read(w)[0] == pytest.approx(0.81)


def test_explicit_global_step_variable(runner, family):
    w, loss_fn = quadratic(runner)
    counter = runner.variable(10, "my_step", trainable=False, dtype=tf.int64)
    step = runner.train_op(loss_fn, make_optimizer(family), global_step=counter)
    step()
    step()
    assert runner.read(counter) == 12


@pytest.mark.parametrize("family", ["keras", "tf_keras", "tf_keras_legacy"])
def test_optimizer_iterations_as_global_step_is_not_counted_twice(runner, family):
    w, loss_fn = quadratic(runner)
    optimizer = make_optimizer(family)
    step = runner.train_op(loss_fn, optimizer, global_step=optimizer.iterations)
    for _ in range(3):
        step()
    assert runner.read(optimizer.iterations) == 3


def test_optimizer_iterations_and_global_step_both_count_once(runner):
    w, loss_fn = quadratic(runner)
    optimizer = keras.optimizers.Adam(LR)
    step = runner.train_op(loss_fn, optimizer)
    step()
    step()
    assert runner.read(optimizer.iterations) == 2
    assert runner.read(runner.global_step()) == 2


# --- update_ops --------------------------------------------------------------------------------


def test_update_ops_run_in_each_step(runner):
    w, loss_fn = quadratic(runner)
    counter = runner.variable(0.0, "counter", trainable=False)
    update = runner.update_op(lambda: counter.assign_add(1.0))
    step = runner.train_op(loss_fn, make_optimizer("v1"), update_ops=[update])
    step()
    assert runner.read(counter) == 1.0
    step()
    assert runner.read(counter) == 2.0


def test_graph_update_ops_default_to_the_collection():
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.Variable(1.0)
        counter = tf.Variable(0.0, trainable=False)
        tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.UPDATE_OPS, counter.assign_add(1.0))
        train_op = trainop.create_train_op(w * w, make_optimizer("v1"))
        session.run(tf.compat.v1.global_variables_initializer())
        session.run(train_op)
        session.run(train_op)
        assert session.run(counter) == 2.0


def test_graph_update_ops_left_out_are_not_run_and_logged(caplog):
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.Variable(1.0)
        counter = tf.Variable(0.0, trainable=False)
        update = counter.assign_add(1.0, name="moving_mean_update")
        tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.UPDATE_OPS, update)
        with caplog.at_level(logging.WARNING, logger="trainop"):
            train_op = trainop.create_train_op(w * w, make_optimizer("v1"), update_ops=[])
        assert "moving_mean_update" in caplog.text
        session.run(tf.compat.v1.global_variables_initializer())
        session.run(train_op)
        assert session.run(counter) == 0.0


def test_graph_update_ops_run_before_the_loss_is_returned():
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.Variable(2.0)
        shift = tf.Variable(0.0, trainable=False)
        update = shift.assign(5.0)
        # The loss reads `shift` after the update op: 2 * 2 + 5.
        with tf.control_dependencies([update]):
            loss = w * w + shift.read_value()
        train_op = trainop.create_train_op(loss, make_optimizer("v1"), update_ops=[update])
        session.run(tf.compat.v1.global_variables_initializer())
        assert session.run(train_op) == 9.0
        assert session.run(shift) == 5.0


def test_eager_update_ops_see_the_weights_before_the_update():
    w = tf.Variable(2.0)
    target = tf.Variable(0.0, trainable=False)
    train_op = trainop.create_train_op(
        lambda: w * w, make_optimizer("v1"), global_step=None, update_ops=[lambda: target.assign(w)]
    )
    train_op()
    assert target.numpy() == 2.0  # copied before w moved to 2 - 0.1 * 4
    assert w.numpy() == pytest.approx(1.6)


# --- variables_to_train ------------------------------------------------------------------------


def test_variables_to_train_selects_a_subset(runner, family):
    a = runner.variable(1.0, "a")
    b = runner.variable(1.0, "b")
    step = runner.train_op(lambda: a * a + b * b, make_optimizer(family), variables_to_train=[b])
    step()
    assert runner.read(a) == 1.0
    assert runner.read(b) == pytest.approx(0.8)


def test_variables_to_train_as_a_callable(runner):
    a = runner.variable(1.0, "a")
    b = runner.variable(1.0, "b")
    step = runner.train_op(
        lambda: a * a + b * b, make_optimizer("keras"), variables_to_train=lambda: [a]
    )
    step()
    assert runner.read(a) == pytest.approx(0.8)
    assert runner.read(b) == 1.0


def test_eager_default_trains_the_variables_the_loss_reads(caplog):
    read = tf.Variable(1.0)
    tf.Variable(1.0)  # trainable, never read: neither trained nor reported
    frozen = tf.Variable(3.0, trainable=False)
    train_op = trainop.create_train_op(
        lambda: read * frozen, make_optimizer("keras"), global_step=None
    )
    with caplog.at_level(logging.WARNING, logger="trainop"):
        train_op()
    assert read.numpy() == pytest.approx(1.0 - LR * 3.0)
    assert frozen.numpy() == 3.0
    assert "no gradient" not in caplog.text


def test_graph_default_trains_all_trainable_variables_and_logs_those_without_gradient(caplog):
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        used = tf.compat.v1.get_variable("used", initializer=1.0, use_resource=True)
        tf.compat.v1.get_variable("unused", initializer=1.0, use_resource=True)
        with caplog.at_level(logging.WARNING, logger="trainop"):
            train_op = trainop.create_train_op(used * used, make_optimizer("v1"))
        assert "unused" in caplog.text and "no gradient" in caplog.text
        assert caplog.text.count("unused") == 1
        session.run(tf.compat.v1.global_variables_initializer())
        session.run(train_op)
        assert session.run(used) == pytest.approx(0.8)


def test_variable_without_gradient_is_logged_once_in_eager_mode(caplog):
    used = tf.Variable(1.0, name="used")
    unused = tf.Variable(1.0, name="never_used")
    train_op = trainop.create_train_op(
        lambda: used * used,
        make_optimizer("keras"),
        variables_to_train=[used, unused],
        global_step=None,
    )
    with caplog.at_level(logging.WARNING, logger="trainop"):
        for _ in range(3):
            train_op()
    assert caplog.text.count("never_used") == 1
    assert unused.numpy() == 1.0


# --- transform_grads_fn ------------------------------------------------------------------------


def test_transform_grads_fn_changes_the_update(runner, family):
    a = runner.variable(1.0, "a")
    b = runner.variable(1.0, "b")
    freeze_a = lambda gv: trainop.multiply_gradients(gv, [(a, 0.0), (b, 10.0)])  # noqa: E731
    step = runner.train_op(
        lambda: a * a + b * b, make_optimizer(family), transform_grads_fn=freeze_a
    )
    step()
    assert runner.read(a) == 1.0
    assert runner.read(b) == pytest.approx(1.0 - LR * 2.0 * 10.0)


def test_clip_gradient_norms_fn_as_transform(runner):
    w = runner.variable(np.array([3.0, 4.0], np.float32), "w")
    step = runner.train_op(
        lambda: tf.reduce_sum(w * w),
        make_optimizer("keras", "sgd", 1.0),
        transform_grads_fn=trainop.clip_gradient_norms_fn(1.0),
    )
    step()
    # The gradient (6, 8) has norm 10 and is clipped to (0.6, 0.8).
    np.testing.assert_allclose(runner.read(w), [2.4, 3.2], rtol=1e-6)


# --- summarize_gradients -----------------------------------------------------------------------


def test_summarize_gradients_writes_a_norm_and_histogram_per_gradient_eager(tmp_path):
    w = tf.Variable([3.0, 4.0], name="weights")
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        train_op = trainop.create_train_op(
            lambda: 0.5 * tf.reduce_sum(w * w),
            make_optimizer("keras", "sgd", 0.5),
            summarize_gradients=True,
            global_step=tf.Variable(7, dtype=tf.int64),
        )
        train_op()
        train_op()
    writer.flush()
    scalars = read_summaries(tmp_path)
    # The gradient is w: norm 5 at step 7, then w halves: norm 2.5 at step 8.
    norms = scalars["summarize_grads/weights_0_gradient_norm"]
    assert [s for s, _ in norms] == [7, 8]
    np.testing.assert_allclose([v for _, v in norms], [5.0, 2.5], rtol=1e-6)
    assert "summarize_grads/weights_0_gradient" in scalars  # the histogram


def test_summarize_gradients_in_graph_mode(tmp_path):
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.compat.v1.get_variable("weights", initializer=[3.0, 4.0], use_resource=True)
        writer = tf.summary.create_file_writer(str(tmp_path))
        with writer.as_default():
            train_op = trainop.create_train_op(
                0.5 * tf.reduce_sum(w * w),
                make_optimizer("v1", "sgd", 0.5),
                summarize_gradients=True,
            )
        session.run([tf.compat.v1.global_variables_initializer(), writer.init()])
        session.run(train_op)
        session.run(writer.flush())
    norms = read_summaries(tmp_path)["summarize_grads/weights_0_gradient_norm"]
    assert len(norms) == 1
    assert norms[0][1] == pytest.approx(5.0)


def _summarized_train_op(w):
    return trainop.create_train_op(
        lambda: 0.5 * tf.reduce_sum(w * w),
        make_optimizer("keras", "sgd", 0.5),
        summarize_gradients=True,
        global_step=tf.Variable(0, dtype=tf.int64),
    )


def test_summarize_gradients_without_a_default_writer_writes_nothing(tmp_path):
    w = tf.Variable([3.0, 4.0], name="weights")
    # A writer exists, but is not the default one when the train op is built and called.
    writer = tf.summary.create_file_writer(str(tmp_path))
    train_op = _summarized_train_op(w)
    train_op()
    writer.flush()
    assert read_summaries(tmp_path) == {}
    # Nothing to write, nothing computed for it: the step holds no summary op at all.
    op_types = {op.type for op in train_op.get_concrete_function().graph.get_operations()}
    assert not {t for t in op_types if "Summary" in t}
    np.testing.assert_allclose(w.numpy(), [1.5, 2.0], rtol=1e-6)  # w - 0.5 * w

    # The same train op built with that writer as the default writes into it.
    with writer.as_default():
        _summarized_train_op(w)()
    writer.flush()
    norms = read_summaries(tmp_path)["summarize_grads/weights_0_gradient_norm"]
    np.testing.assert_allclose([v for _, v in norms], [2.5], rtol=1e-6)  # the norm of w


# --- gate_gradients and aggregation_method -----------------------------------------------------


def _ops(runner, step):
    if runner.mode == "graph":
        return runner.graph.get_operations()
    return step.op.get_concrete_function().graph.get_operations()


def _gradient_graph(runner, **kwargs):
    x = runner.variable(2.0, "x")
    # x is used three times: its gradient sums three terms.
    step = runner.train_op(
        lambda: x * 3.0 + tf.sin(x) + x * x, make_optimizer("v1"), global_step=None, **kwargs
    )
    step()
    return runner.read(x), _ops(runner, step)


@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_gate_gradients_reaches_the_gradient_computation(mode):
    from conftest import EagerRunner, GraphRunner

    results = {}
    for gate in (0, 1, 2):
        runner = GraphRunner() if mode == "graph" else EagerRunner()
        try:
            results[gate] = _gradient_graph(runner, gate_gradients=gate)
        finally:
            runner.close()
    values = {gate: value for gate, (value, _) in results.items()}
    assert values[0] == values[1] == values[2]
    # GATE_OP groups the input gradients of each op (a tf.tuple per op); GATE_GRAPH groups
    # all the gradients at the end instead (one tf.tuple); GATE_NONE groups nothing.
    per_op = {
        g: sum("_grad/tuple/group_deps" in op.name for op in ops) for g, (_, ops) in results.items()
    }
    whole = {
        g: sum(op.name.startswith("tuple/group_deps") for op in ops)
        for g, (_, ops) in results.items()
    }
    assert (per_op[0], whole[0]) == (0, 0)
    assert per_op[1] == 4 and whole[1] == 0  # two multiplications, two additions
    assert (per_op[2], whole[2]) == (0, 1)


@pytest.mark.parametrize("mode", ["graph", "eager"])
@pytest.mark.parametrize(
    "method",
    [tf.AggregationMethod.EXPERIMENTAL_TREE, tf.AggregationMethod.EXPERIMENTAL_ACCUMULATE_N],
)
def test_aggregation_method_reaches_the_gradient_computation(mode, method):
    from conftest import EagerRunner, GraphRunner

    results = {}
    for aggregation in (tf.AggregationMethod.ADD_N, method):
        runner = GraphRunner() if mode == "graph" else EagerRunner()
        try:
            results[aggregation] = _gradient_graph(
                runner, aggregation_method=aggregation, gate_gradients=0
            )
        finally:
            runner.close()

    def add_n_sizes(ops):
        return sorted(len(op.inputs) for op in ops if op.type == "AddN")

    assert results[0][0] == pytest.approx(results[method][0])
    # x * 3 + sin(x) + x * x: four gradient terms for x. ADD_N adds them in one op, the
    # other methods in a tree of pairwise additions.
    assert add_n_sizes(results[0][1]) == [4]
    assert add_n_sizes(results[method][1]) == [2, 2, 2]


# --- Trace count -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["keras", "tf_keras", "tf_keras_legacy"])
def test_eager_train_op_traces_once_for_one_input_shape(family):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    train_op = trainop.create_train_op(
        lambda x, y: tf.reduce_mean((model(x) - y) ** 2),
        make_optimizer(family, "adam"),
        variables_to_train=model.trainable_variables,
    )
    for seed in range(5):
        x = tf.random.stateless_normal((8, 4), seed=(seed, 0))
        train_op(x, tf.ones((8, 1)))
    assert train_op.experimental_get_tracing_count() == 1
    # A new input shape makes one more trace.
    train_op(tf.ones((16, 4)), tf.ones((16, 1)))
    assert train_op.experimental_get_tracing_count() == 2


def test_eager_train_op_does_not_retrace_per_call_when_state_is_made_on_first_call():
    w = tf.Variable([1.0, 2.0])
    train_op = trainop.create_train_op(
        lambda x: tf.reduce_sum(w * x), tf.compat.v1.train.AdamOptimizer(0.1)
    )
    train_op(tf.constant([1.0, 1.0]))
    after_first = train_op.experimental_get_tracing_count()
    for _ in range(5):
        train_op(tf.constant([3.0, 1.0]))
    assert train_op.experimental_get_tracing_count() == after_first


# --- Keras 3 models and variables --------------------------------------------------------------


def test_keras3_model_trains_with_keras_variables():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    x = tf.random.stateless_normal((64, 4), seed=(1, 2))
    y = tf.reduce_sum(x, axis=1, keepdims=True)
    optimizer = keras.optimizers.Adam(0.01)
    train_op = trainop.create_train_op(
        lambda x, y: tf.reduce_mean(keras.losses.mean_squared_error(y, model(x))),
        optimizer,
        variables_to_train=model.trainable_variables,
    )
    losses = [float(train_op(x, y)) for _ in range(200)]
    assert losses[-1] < 0.1 * losses[0]
    assert int(tf.compat.v1.train.get_global_step()) == 200
    assert int(optimizer.iterations) == 200


@pytest.mark.parametrize(
    "family",
    [
        "v1",
        "keras",
        "tf_keras",
        "tf_keras_legacy",
    ],
)
def test_a_keras3_model_trains_with_every_optimizer_family(family):
    dense = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros")
    dense.build((None, 2))
    x = np.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], np.float32)
    y = np.array([[1.0], [0.0], [2.0]], np.float32)
    train_op = trainop.create_train_op(
        lambda: tf.reduce_mean((dense(x) - y) ** 2),
        make_optimizer(family, "sgd", LR),
        global_step=None,
        variables_to_train=dense.trainable_variables,
    )
    losses = [float(train_op()) for _ in range(3)]

    kernel, bias, expected_losses = np.ones((2, 1)), np.zeros(1), []
    for _ in range(3):
        error = x.astype(np.float64) @ kernel + bias - y
        expected_losses.append(np.mean(error**2))
        d_error = 2.0 * error / error.size
        kernel, bias = kernel - LR * x.T @ d_error, bias - LR * d_error.sum(0)
    np.testing.assert_allclose(dense.kernel.numpy(), kernel, rtol=1e-5)
    np.testing.assert_allclose(dense.bias.numpy(), bias, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)


def test_multiply_gradients_by_keras_variable_path():
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(1, name="dense")], name="sequential"
    )
    kernel_before = model.layers[0].kernel.numpy().copy()
    bias_before = model.layers[0].bias.numpy().copy()
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(model(tf.ones((1, 2)))),
        keras.optimizers.SGD(0.1),
        variables_to_train=model.trainable_variables,
        global_step=None,
        transform_grads_fn=lambda gv: trainop.multiply_gradients(
            gv, {"sequential/dense/kernel": 0.0}
        ),
    )
    train_op()
    np.testing.assert_array_equal(model.layers[0].kernel.numpy(), kernel_before)
    np.testing.assert_allclose(model.layers[0].bias.numpy(), bias_before - 0.1)


# --- Graph-mode extras (TF-Slim) ---------------------------------------------------------------


def test_graph_train_op_is_added_to_the_train_op_collection():
    with tf.Graph().as_default():
        w = tf.Variable(1.0)
        train_op = trainop.create_train_op(
            w * w, make_optimizer("v1"), colocate_gradients_with_ops=True
        )
        assert train_op in tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.TRAIN_OP)


def test_graph_train_op_in_a_monitored_session():
    with tf.Graph().as_default():
        w = tf.compat.v1.get_variable("w", initializer=1.0, use_resource=True)
        train_op = trainop.create_train_op(w * w, make_optimizer("v1"))
        global_step = tf.compat.v1.train.get_global_step()
        steps = []

        class RecordStep(tf.compat.v1.train.SessionRunHook):
            def after_run(self, run_context, run_values):
                steps.append(run_context.session.run(global_step))

        hooks = [tf.compat.v1.train.StopAtStepHook(last_step=4), RecordStep()]
        losses = []
        with tf.compat.v1.train.MonitoredSession(hooks=hooks) as session:
            while not session.should_stop():
                losses.append(session.run(train_op))
        assert steps == [1, 2, 3, 4]
        # Each loss is w * w before its update, w shrinking by 0.8 a step.
        np.testing.assert_allclose(losses, [1.0, 0.64, 0.4096, 0.262144], rtol=1e-6)


def test_graph_mode_accepts_a_loss_callable():
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.Variable(1.0)
        train_op = trainop.create_train_op(lambda: w * w, make_optimizer("v1"))
        session.run(tf.compat.v1.global_variables_initializer())
        assert session.run(train_op) == 1.0
        assert session.run(w) == pytest.approx(0.8)


def test_graph_front_end_inside_a_users_tf_function():
    w = tf.Variable(1.0)
    optimizer = keras.optimizers.SGD(0.1)

    @tf.function
    def my_step():
        return trainop.create_train_op(w * w, optimizer, global_step=None, variables_to_train=[w])

    assert float(my_step()) == 1.0
    assert w.numpy() == pytest.approx(0.8)


def test_variable_without_gradient_is_logged_once_when_the_first_call_traces_twice(caplog):
    # Adam makes its slots on the first call, so TensorFlow traces that call twice.
    used = tf.Variable(1.0, name="used")
    unused = tf.Variable(1.0, name="never_used")
    train_op = trainop.create_train_op(
        lambda: used * used,
        tf.compat.v1.train.AdamOptimizer(0.1),
        variables_to_train=lambda: [used, unused],
        global_step=None,
    )
    with caplog.at_level(logging.WARNING, logger="trainop"):
        train_op()
        train_op()
    assert train_op.experimental_get_tracing_count() == 2
    assert caplog.text.count("never_used") == 1


def test_a_variable_listed_twice_is_trained_once(runner, family):
    shared = runner.variable(1.0, "encoder")
    head = runner.variable(1.0, "head")
    step = runner.train_op(
        lambda: shared * shared + head * head,
        make_optimizer(family),
        variables_to_train=[shared, head, shared],
    )
    step()
    assert runner.read(shared) == pytest.approx(0.8)
    assert runner.read(head) == pytest.approx(0.8)


def test_graph_front_end_in_a_tf_function_with_two_train_ops_and_the_default_step():
    actor = tf.Variable(1.0)
    critic = tf.Variable(2.0)
    actor_optimizer = tf.compat.v1.train.GradientDescentOptimizer(0.1)
    critic_optimizer = keras.optimizers.SGD(0.1)

    @tf.function
    def train():
        actor_loss = trainop.create_train_op(
            actor * actor, actor_optimizer, variables_to_train=[actor]
        )
        critic_loss = trainop.create_train_op(
            critic * critic, critic_optimizer, variables_to_train=[critic], global_step=None
        )
        return actor_loss, critic_loss

    assert [float(loss) for loss in train()] == [1.0, 4.0]
    assert actor.numpy() == pytest.approx(0.8)
    assert critic.numpy() == pytest.approx(1.6)
    assert int(tf.compat.v1.train.get_global_step()) == 1


def test_v1_optimizer_in_eager_mode_traces_once_with_variables_to_train():
    w = tf.Variable([1.0, 2.0])
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(w * w), tf.compat.v1.train.AdamOptimizer(0.1), variables_to_train=[w]
    )
    for _ in range(3):
        train_op()
    assert train_op.experimental_get_tracing_count() == 1
