"""clip_gradient_norms, clip_gradient_norms_fn and multiply_gradients."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import trainop


def test_clip_gradient_norms_clips_each_gradient_on_its_own():
    a, b = tf.Variable(0.0), tf.Variable([0.0, 0.0])
    grads = [(tf.constant(4.0), a), (tf.constant([0.3, 0.4]), b)]
    (ga, va), (gb, vb) = trainop.clip_gradient_norms(grads, 3.0)
    assert float(ga) == pytest.approx(3.0)
    np.testing.assert_allclose(gb.numpy(), [0.3, 0.4])  # norm 0.5: untouched
    assert va is a and vb is b


def test_clip_gradient_norms_of_indexed_slices_keeps_the_indices():
    v = tf.Variable(tf.zeros((5, 2)))
    grad = tf.IndexedSlices(tf.constant([[3.0, 4.0]]), tf.constant([3]), tf.constant([5, 2]))
    [(clipped, _)] = trainop.clip_gradient_norms([(grad, v)], 1.0)
    assert isinstance(clipped, tf.IndexedSlices)
    np.testing.assert_allclose(clipped.values.numpy(), [[0.6, 0.8]], rtol=1e-6)
    np.testing.assert_array_equal(clipped.indices.numpy(), [3])


def test_clip_gradient_norms_passes_none_through():
    v = tf.Variable(0.0)
    assert trainop.clip_gradient_norms([(None, v)], 1.0) == [(None, v)]


def test_clip_gradient_norms_fn_in_graph_mode():
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        x = tf.Variable(0.0)
        grads = tf.gradients([x * 4.0], [x])
        clipped = trainop.clip_gradient_norms_fn(3.0)(list(zip(grads, [x])))
        session.run(tf.compat.v1.global_variables_initializer())
        assert session.run(clipped[0][0]) == pytest.approx(3.0)


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=6),
    max_norm=st.floats(0.125, 100.0, width=32),
)
def test_clipped_norm_never_exceeds_the_bound_and_small_gradients_stay(values, max_norm):
    v = tf.Variable(tf.zeros(len(values)))
    grad = tf.constant(values, tf.float32)
    [(clipped, _)] = trainop.clip_gradient_norms([(grad, v)], max_norm)
    norm = float(tf.norm(grad))
    assert float(tf.norm(clipped)) <= max_norm * (1 + 1e-5)
    if norm <= max_norm:
        # tf.clip_by_norm multiplies by max_norm / max_norm: equal up to rounding.
        np.testing.assert_allclose(clipped.numpy(), grad.numpy(), rtol=1e-6)


def test_multiply_gradients_by_name_variable_ref_and_pairs():
    a = tf.Variable(1.0, name="conv0/weights")
    b = tf.Variable(1.0, name="conv0/biases")
    c = tf.Variable(1.0, name="logits/weights")
    grads = [(tf.constant(2.0), a), (tf.constant(2.0), b), (tf.constant(2.0), c)]

    by_name = trainop.multiply_gradients(grads, {"conv0/weights": 3.0})
    by_ref = trainop.multiply_gradients(grads, {b.ref(): 0.5})
    by_pairs = trainop.multiply_gradients(grads, [(c, 0.0), ("conv0/weights", 10.0)])

    assert [float(g) for g, _ in by_name] == [6.0, 2.0, 2.0]
    assert [float(g) for g, _ in by_ref] == [2.0, 1.0, 2.0]
    assert [float(g) for g, _ in by_pairs] == [20.0, 2.0, 0.0]
    assert [v for _, v in by_pairs] == [a, b, c]


def test_multiply_gradients_scales_indexed_slices_values():
    v = tf.Variable(tf.zeros((4, 1)), name="embedding")
    grad = tf.IndexedSlices(tf.constant([[1.0], [2.0]]), tf.constant([0, 2]))
    [(scaled, _)] = trainop.multiply_gradients([(grad, v)], {"embedding": 0.5})
    np.testing.assert_allclose(scaled.values.numpy(), [[0.5], [1.0]])
    np.testing.assert_array_equal(scaled.indices.numpy(), [0, 2])


def test_multiply_gradients_in_graph_mode_by_op_name():
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        with tf.compat.v1.variable_scope("conv0"):
            w = tf.compat.v1.get_variable("weights", initializer=1.0, use_resource=True)
        [(g, _)] = trainop.multiply_gradients([(tf.constant(2.0), w)], {"conv0/weights": 4.0})
        assert session.run(g) == 8.0


def test_multiply_gradients_rejects_bad_input():
    v = tf.Variable(1.0, name="v")
    with pytest.raises(ValueError, match="`gradient_multipliers` is empty"):
        trainop.multiply_gradients([(tf.constant(1.0), v)], {})
    # ValueError where TF-Slim raises one.
    with pytest.raises(ValueError, match="`gradient_multipliers` must map"):
        trainop.multiply_gradients([(tf.constant(1.0), v)], 2.0)
    with pytest.raises(TypeError, match="`gradient_multipliers` keys must be"):
        trainop.multiply_gradients([(tf.constant(1.0), v)], {3: 2.0})
    with pytest.raises(ValueError, match="`grads_and_vars` must be a list"):
        trainop.multiply_gradients(iter([(tf.constant(1.0), v)]), {"v": 2.0})
    with pytest.raises(ValueError, match="has no gradient: v"):
        trainop.multiply_gradients([(None, v)], {"v": 2.0})
