"""add_gradients_summaries and add_variables_summaries."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import trainop


def _read(logdir):
    values = {}
    for path in tf.io.gfile.glob(f"{logdir}/events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values[value.tag] = (event.step, tf.make_ndarray(value.tensor))
    return values


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
    assert values["summarize_grads/layer/kernel_gradient_norm"][0] == 5
    assert float(values["summarize_grads/layer/kernel_gradient_norm"][1]) == pytest.approx(1.0)
    assert float(values["summarize_grads/embedding_gradient_norm"][1]) == pytest.approx(3.0)
    assert float(values["summarize_vars/layer/kernel_value_norm"][1]) == pytest.approx(5.0)
    histogram = values["summarize_grads/embedding_gradient"][1]
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
    assert values["summarize_grads/w_gradient_norm"][0] == 12
    np.testing.assert_allclose(values["summarize_grads/w_gradient_norm"][1], 2.0)


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
