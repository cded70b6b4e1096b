"""add_gradients_summaries and add_variables_summaries."""

from __future__ import annotations

import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import trainop
from conftest import make_optimizer, read_summaries


def _read(logdir):
    """The last (step, value) of each tag."""
    return {tag: points[-1] for tag, points in read_summaries(logdir).items()}


def test_gradient_and_variable_summaries_are_written_with_their_values(tmp_path):
    v = tf.Variable([3.0, 4.0], name="layer/kernel")
    e = tf.Variable(tf.zeros((10, 2)), name="embedding")
    sparse = tf.IndexedSlices(
        tf.constant([[1.0, 2.0], [2.0, 0.0]]), tf.constant([1, 4]), tf.constant([10, 2])
    )
    grads_and_vars = [(tf.constant([0.6, 0.8]), v), (sparse, e)]
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        written = trainop.add_gradients_summaries(grads_and_vars, step=5)
        written += trainop.add_variables_summaries(grads_and_vars, step=5)
    writer.flush()
    assert written == [True] * 8
    values = _read(tmp_path)
    assert values["summarize_grads/layer/kernel_0_gradient_norm"][0] == 5
    assert float(values["summarize_grads/layer/kernel_0_gradient_norm"][1]) == pytest.approx(1.0)
    assert float(values["summarize_grads/embedding_0_gradient_norm"][1]) == pytest.approx(3.0)
    assert float(values["summarize_vars/layer/kernel_0_value_norm"][1]) == pytest.approx(5.0)
    histogram = values["summarize_grads/embedding_0_gradient"][1]
    # A histogram of the 4 values of the slices (not of the dense 10 x 2 gradient).
    assert histogram[:, 2].sum() == 4


def test_summaries_without_a_writer_write_nothing():
    v = tf.Variable(1.0)
    assert trainop.add_gradients_summaries([(tf.constant(1.0), v)], step=0) == [False, False]


def test_gradient_summaries_skip_missing_gradients(tmp_path):
    v = tf.Variable(1.0, name="unused")
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        assert trainop.add_gradients_summaries([(None, v)], step=0) == []


def test_tf_slim_call_without_step_uses_the_global_step_in_graph_mode(tmp_path):
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        step = tf.compat.v1.train.get_or_create_global_step()
        v = tf.Variable([1.0], name="w")
        writer = tf.summary.create_file_writer(str(tmp_path))
        with writer.as_default():
            ops = trainop.add_gradients_summaries([(tf.constant([2.0]), v)])
        assert len(ops) == 2 and all(isinstance(op, tf.Tensor) for op in ops)
        session.run([tf.compat.v1.global_variables_initializer(), writer.init()])
        session.run(step.assign(12))
        session.run(ops)
        session.run(writer.flush())
    values = _read(tmp_path)
    # A tf.summary writer: TensorFlow 2's summaries, named as TF-Agents names them.
    assert values["summarize_grads/w_0_gradient_norm"][0] == 12
    np.testing.assert_allclose(values["summarize_grads/w_0_gradient_norm"][1], 2.0)


def test_graph_mode_without_a_writer_adds_tf1_summaries_for_tf_slim_loops():
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.compat.v1.get_variable("w", initializer=[3.0, 4.0], use_resource=True)
        train_op = trainop.create_train_op(
            0.5 * tf.reduce_sum(w * w),
            tf.compat.v1.train.GradientDescentOptimizer(0.5),
            summarize_gradients=True,
        )
        merged = tf.compat.v1.summary.merge_all()
        session.run(tf.compat.v1.global_variables_initializer())
        summary = tf.compat.v1.Summary.FromString(session.run(merged))
        session.run(train_op)
    values = {v.tag: v for v in summary.value}
    assert values["summarize_grads/w_gradient_norm"].simple_value == pytest.approx(5.0)
    assert values["summarize_grads/w_gradient"].histo.num == 2


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).normal(size=(784, 256)),
        np.random.default_rng(1).normal(size=(1000,)).astype(np.float32),
        np.full((5,), 2.5),  # one distinct value
        np.zeros((0,)),  # no values
        np.arange(10),  # integers
        np.linspace(-4.6, 2.7, 31),  # a value on every inner bucket edge
        np.linspace(-1.0, 2.0, 91).astype(np.float32),  # three on each edge, float32
    ],
    ids=["float64", "float32", "one_value", "empty", "int", "on_edges", "on_edges_float32"],
)
def test_histogram_writes_what_tensorboard_writes(tmp_path, data):
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        assert trainop.summaries.histogram("ours", tf.constant(data), step=3)
        tf.summary.histogram("tensorboard", tf.constant(data), step=3)
    writer.flush()
    values = _read(tmp_path)
    ours, theirs = values["ours"][1], values["tensorboard"][1]
    assert ours.shape == theirs.shape == (30, 3)
    np.testing.assert_array_equal(ours, theirs)
    assert ours[:, 2].sum() == data.size


@pytest.mark.parametrize("family", ["v1", "keras", "tf_keras", "tf_keras_legacy"])
def test_train_summaries_are_written_at_the_cadence_with_their_values(tmp_path, family):
    w = tf.Variable([3.0, 4.0], name="weights")
    b = tf.Variable(1.0, name="bias")
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        train_op = trainop.create_train_op(
            lambda: 0.5 * tf.reduce_sum(w * w) + b,
            make_optimizer(family, "sgd", 0.25),
            summarize_every_n_steps=3,
        )
        losses, norms = [], []
        for _ in range(7):
            # The gradients are w and 1.
            norms.append(np.sqrt(np.sum(w.numpy() ** 2) + 1.0))
            losses.append(float(train_op()))
    writer.flush()
    series = read_summaries(tmp_path)
    assert set(series) == {"train/loss", "train/global_gradient_norm", "train/learning_rate"}
    for tag, expected in [
        ("train/loss", losses),
        ("train/global_gradient_norm", norms),
        ("train/learning_rate", [0.25] * 7),
    ]:
        assert [step for step, _ in series[tag]] == [0, 3, 6]
        np.testing.assert_allclose([v for _, v in series[tag]], np.take(expected, [0, 3, 6]), 1e-6)


def test_gradient_summaries_follow_the_cadence_and_a_learning_rate_schedule(tmp_path):
    w = tf.Variable([3.0, 4.0], name="weights")
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=1, decay_rate=0.5)
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        train_op = trainop.create_train_op(
            lambda: 0.5 * tf.reduce_sum(w * w),
            keras.optimizers.SGD(schedule),
            summarize_gradients=True,
            summarize_every_n_steps=2,
        )
        gradient_norms = []
        for _ in range(5):
            gradient_norms.append(np.linalg.norm(w.numpy()))
            train_op()
    writer.flush()
    series = read_summaries(tmp_path)
    assert [s for s, _ in series["summarize_grads/weights_0_gradient_norm"]] == [0, 2, 4]
    np.testing.assert_allclose(
        [v for _, v in series["summarize_grads/weights_0_gradient_norm"]],
        np.take(gradient_norms, [0, 2, 4]),
        rtol=1e-6,
    )
    assert [v[:, 2].sum() for _, v in series["summarize_grads/weights_0_gradient"]] == [2, 2, 2]
    # The rate the update of that step used: 0.5 * 0.5 ** step.
    np.testing.assert_allclose(
        [v for _, v in series["train/learning_rate"]], [0.5, 0.125, 0.03125], rtol=1e-6
    )


def test_record_if_decides_with_the_cadence(tmp_path):
    w = tf.Variable(2.0, name="w")
    step = tf.compat.v1.train.get_or_create_global_step()
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default(), tf.summary.record_if(lambda: step >= 4):
        train_op = trainop.create_train_op(
            lambda: w * w, make_optimizer("keras", "sgd", 0.1), summarize_every_n_steps=2
        )
        for _ in range(9):
            train_op()
    writer.flush()
    assert [s for s, _ in read_summaries(tmp_path)["train/loss"]] == [4, 6, 8]


def test_graph_mode_writes_the_train_summaries_to_a_v2_writer(tmp_path):
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.compat.v1.get_variable("w", initializer=[3.0, 4.0], use_resource=True)
        writer = tf.summary.create_file_writer(str(tmp_path))
        with writer.as_default():
            train_op = trainop.create_train_op(
                0.5 * tf.reduce_sum(w * w),
                tf.compat.v1.train.GradientDescentOptimizer(0.5),
                summarize_every_n_steps=2,
            )
        session.run([tf.compat.v1.global_variables_initializer(), writer.init()])
        losses = [session.run(train_op) for _ in range(4)]
        session.run(writer.flush())
    series = read_summaries(tmp_path)
    assert [s for s, _ in series["train/loss"]] == [0, 2]
    np.testing.assert_allclose([v for _, v in series["train/loss"]], [losses[0], losses[2]])
    np.testing.assert_allclose([v for _, v in series["train/learning_rate"]], [0.5, 0.5])


def test_without_a_writer_the_train_op_holds_no_summary_op():
    w = tf.Variable([3.0, 4.0])
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(w * w),
        make_optimizer("keras"),
        summarize_gradients=True,
        summarize_every_n_steps=10,
    )
    graph = train_op.get_concrete_function().graph
    op_types = {op.type for op in graph.get_operations()}
    op_types |= {node.op for f in graph.as_graph_def().library.function for node in f.node_def}
    assert not any("Summary" in t or "Histogram" in t for t in op_types)
    writer = tf.summary.create_file_writer(tempfile.mkdtemp())
    with writer.as_default():
        traced_with_writer = trainop.create_train_op(
            lambda: tf.reduce_sum(w * w), make_optimizer("keras"), summarize_gradients=True
        ).get_concrete_function()
    library = traced_with_writer.graph.as_graph_def().library.function
    assert any(node.op == "WriteSummary" for f in library for node in f.node_def)


def test_histogram_of_data_with_nan_and_inf_counts_the_finite_values(tmp_path):
    writer = tf.summary.create_file_writer(str(tmp_path))
    data = tf.constant([1.0, np.nan, 2.0, np.inf, 3.0, -np.inf])
    with writer.as_default():
        assert trainop.summaries.histogram("h", data, step=0)
    writer.flush()
    buckets = _read(tmp_path)["h"][1]
    assert buckets[:, 2].sum() == 3
    assert (buckets[0, 0], buckets[-1, 1]) == (1.0, 3.0)


def test_a_nan_gradient_does_not_break_a_writing_step(tmp_path):
    w = tf.Variable([1.0, 2.0], name="w")
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        train_op = trainop.create_train_op(
            # A finite loss, NaN gradients: the default check lets the step through.
            lambda: tf.reduce_sum(tf.where(w > 5.0, tf.sqrt(w - 5.0), 0.0)),
            make_optimizer("keras", "sgd"),
            summarize_gradients=True,
        )
        train_op()
    writer.flush()
    assert "summarize_grads/w_0_gradient" in _read(tmp_path)


def test_gradients_of_mixed_float_dtypes_have_one_global_norm(tmp_path):
    w32 = tf.Variable([3.0], dtype=tf.float32, name="w32")
    w64 = tf.Variable([4.0], dtype=tf.float64, name="w64")
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        train_op = trainop.create_train_op(
            lambda: (
                0.5 * tf.reduce_sum(w32 * w32) + tf.cast(0.5 * tf.reduce_sum(w64 * w64), tf.float32)
            ),
            make_optimizer("keras", "sgd"),
        )
        train_op()
    writer.flush()
    np.testing.assert_allclose(_read(tmp_path)["train/global_gradient_norm"][1], 5.0)


def test_skip_mode_keeps_tf_slims_tf1_gradient_summaries():
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.compat.v1.get_variable("w", initializer=[3.0, 4.0], use_resource=True)
        trainop.create_train_op(
            0.5 * tf.reduce_sum(w * w),
            tf.compat.v1.train.GradientDescentOptimizer(0.5),
            summarize_gradients=True,
            check_numerics="skip",
        )
        session.run(tf.compat.v1.global_variables_initializer())
        summary = tf.compat.v1.Summary.FromString(session.run(tf.compat.v1.summary.merge_all()))
    values = {v.tag: v for v in summary.value}
    assert values["summarize_grads/w_gradient_norm"].simple_value == pytest.approx(5.0)


@pytest.mark.parametrize("family", ["keras", "tf_keras", "tf_keras_legacy"])
def test_the_learning_rate_written_is_the_one_of_that_update(tmp_path, family):
    schedules = {
        "keras": lambda: keras.optimizers.SGD(
            keras.optimizers.schedules.ExponentialDecay(0.5, 1, 0.5)
        ),
        "tf_keras": lambda: tf_keras.optimizers.SGD(
            tf_keras.optimizers.schedules.ExponentialDecay(0.5, 1, 0.5)
        ),
        "tf_keras_legacy": lambda: tf_keras.optimizers.legacy.SGD(
            tf_keras.optimizers.schedules.ExponentialDecay(0.5, 1, 0.5)
        ),
    }
    w = tf.Variable([3.0, 4.0])
    writer = tf.summary.create_file_writer(str(tmp_path))
    applied = []
    with writer.as_default():
        train_op = trainop.create_train_op(lambda: 0.5 * tf.reduce_sum(w * w), schedules[family]())
        for _ in range(3):
            before = w.numpy().copy()
            train_op()
            applied.append(1.0 - w.numpy()[0] / before[0])  # w <- w - rate * w
    writer.flush()
    written = [v for _, v in read_summaries(tmp_path)["train/learning_rate"]]
    np.testing.assert_allclose(written, applied, rtol=1e-5)
    np.testing.assert_allclose(written, [0.5, 0.25, 0.125], rtol=1e-6)


def test_tf1_histograms_of_a_non_finite_gradient_hold_its_finite_values():
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.compat.v1.get_variable("w", initializer=[1.0, 2.0, 3.0], use_resource=True)
        guard = trainop.SkipNonFiniteSteps()

        # A finite loss whose gradient is [1, inf, 3]: the guard skips the step.
        @tf.custom_gradient
        def identity(x):
            return tf.identity(x), lambda dy: dy * tf.constant([1.0, np.inf, 3.0])

        loss = tf.reduce_sum(identity(w))
        [grad] = tf.gradients(loss, [w])
        standalone = trainop.add_gradients_summaries([(grad, w)])
        train_op = trainop.create_train_op(
            loss,
            tf.compat.v1.train.GradientDescentOptimizer(0.5),
            summarize_gradients=True,
            check_numerics=guard,
        )
        merged = tf.compat.v1.summary.merge_all()
        session.run(tf.compat.v1.global_variables_initializer())
        summary, _ = session.run([merged, train_op])
        np.testing.assert_array_equal(session.run(w), [1.0, 2.0, 3.0])
        assert session.run(guard.skipped_steps) == 1
        assert len(standalone) == 2
    values = {v.tag: v for v in tf.compat.v1.Summary.FromString(summary).value}
    # TF-Slim's names: the standalone function in the caller's scope, the train op's in
    # summarize_grads/.
    for tag in ("w_gradient", "summarize_grads/w_gradient"):
        assert values[tag].histo.num == 2
        assert (values[tag].histo.min, values[tag].histo.max) == (1.0, 3.0)
        assert np.isinf(values[tag + "_norm"].simple_value)


def test_tags_are_the_peers_tags(tmp_path):
    """TensorFlow 2 summaries as TF-Agents' eager_utils names them (`var.name`, ':' made '_');
    TF1 summaries as TF-Slim names them (`var.op.name`); Keras 3 variables by their path."""
    kernel = tf.Variable([3.0, 4.0], name="dense/kernel")
    layer = keras.layers.Dense(1, name="head")
    layer.build((None, 2))
    pairs = [(tf.constant([0.0, 1.0]), kernel), (tf.ones((2, 1)), layer.kernel)]
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        trainop.add_gradients_summaries(pairs, step=1)
        trainop.add_variables_summaries(pairs, step=1)
    writer.flush()
    assert set(_read(tmp_path)) == {
        "summarize_grads/dense/kernel_0_gradient",
        "summarize_grads/dense/kernel_0_gradient_norm",
        "summarize_grads/head/kernel_gradient",
        "summarize_grads/head/kernel_gradient_norm",
        "summarize_vars/dense/kernel_0_value",
        "summarize_vars/dense/kernel_0_value_norm",
        "summarize_vars/head/kernel_value",
        "summarize_vars/head/kernel_value_norm",
    }
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        v = tf.compat.v1.get_variable("dense/kernel", initializer=[[1.0, 2.0]], use_resource=True)
        b = tf.compat.v1.get_variable("dense/bias", initializer=3.0, use_resource=True)
        trainop.add_gradients_summaries([(tf.constant([[2.0, 0.0]]), v), (tf.constant(4.0), b)])
        trainop.add_variables_summaries([(None, v)])
        session.run(tf.compat.v1.global_variables_initializer())
        summary = session.run(tf.compat.v1.summary.merge_all())
    values = tf.compat.v1.Summary.FromString(summary).value
    assert [v.tag for v in values] == [
        "dense/kernel_gradient",
        "dense/kernel_gradient_norm",
        "dense/bias_gradient",
        "dense/bias_gradient_norm",
        "dense/kernel_value",
        "dense/kernel_value_norm",
    ]
    norms = [v.simple_value for v in values if v.tag.endswith("_norm")]
    np.testing.assert_allclose(norms, [2.0, 4.0, 5.0**0.5], rtol=1e-7)
