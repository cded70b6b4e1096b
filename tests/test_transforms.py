"""clip_gradient_norms, clip_gradient_norms_fn and multiply_gradients."""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

import trainop

# TensorFlow flushes subnormal float32 results to zero on the CPU: keep values (and their
# products with the multipliers and scales below) in float32's normal range.
gradient_values = st.floats(-1e3, 1e3, width=32).filter(lambda x: x == 0 or abs(x) >= 1e-20)


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


@given(
    values=st.lists(gradient_values, min_size=1, max_size=6),
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
    assert [float(g) for g, _ in by_pairs[:2]] == [20.0, 2.0]
    assert by_pairs[2][0] is None  # a multiplier of 0 freezes c
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


# --- Transforms beyond the peers' ---------------------------------------------------------------

gradient_lists = st.lists(
    st.lists(gradient_values, min_size=1, max_size=5),
    min_size=1,
    max_size=4,
)


def _pairs(values):
    return [(tf.constant(v, tf.float32), tf.Variable(tf.zeros(len(v)))) for v in values]


@given(values=gradient_lists, max_norm=st.floats(0.125, 100.0, width=32))
def test_clip_by_global_norm_bounds_the_norm_and_leaves_small_gradients_exactly(values, max_norm):
    pairs = _pairs(values)
    clipped = trainop.clip_by_global_norm(pairs, max_norm)
    # The oracle is NumPy's, not trainop.global_norm: a norm of the first gradient only would
    # otherwise agree with itself.
    norm = np.sqrt(sum(np.sum(np.square(np.array(v, np.float64))) for v in values))
    clipped_norm = np.sqrt(sum(np.sum(np.square(c.numpy().astype(np.float64))) for c, _ in clipped))
    assert float(trainop.global_norm(pairs)) == pytest.approx(norm, rel=1e-6)
    assert clipped_norm <= max_norm * (1 + 1e-5)
    # Whether to clip is decided in float32, as the step decides it.
    norm = float(trainop.global_norm(pairs))
    if norm <= max_norm:
        for (g, _), (c, _) in zip(pairs, clipped):
            np.testing.assert_array_equal(c.numpy(), g.numpy())
    else:  # every gradient is scaled by the same factor
        for (g, _), (c, _) in zip(pairs, clipped):
            np.testing.assert_allclose(
                c.numpy(), g.numpy() * max_norm / norm, rtol=1e-4, atol=1e-30
            )


@given(values=gradient_lists, max_norm=st.floats(0.125, 100.0, width=32))
def test_dense_and_indexed_slices_gradients_clip_alike(values, max_norm):
    dense = _pairs(values)
    sparse = [(tf.IndexedSlices(tf.reshape(g, (-1, 1)), tf.range(tf.size(g))), v) for g, v in dense]
    for (d, _), (s, _) in zip(
        trainop.clip_by_global_norm(dense, max_norm), trainop.clip_by_global_norm(sparse, max_norm)
    ):
        assert isinstance(s, tf.IndexedSlices)
        np.testing.assert_allclose(tf.reshape(s.values, [-1]).numpy(), d.numpy(), rtol=1e-6)


def test_clip_by_global_norm_passes_none_and_poisons_a_nan_norm():
    v = tf.Variable([0.0])
    pairs = [(None, v), (tf.constant([np.nan]), v), (tf.constant([1.0]), v)]
    clipped = trainop.clip_by_global_norm(pairs, 1.0)
    assert clipped[0][0] is None
    assert np.isnan(clipped[2][0].numpy()).all()  # never a silent zero


@given(
    value=gradient_values,
    multiplier=st.floats(-10, 10, width=32).filter(lambda m: abs(m) >= 1e-3),
)
def test_multipliers_scale_exactly(value, multiplier):
    v = tf.Variable(0.0, name="layer/kernel")
    [(g, _)] = trainop.multiply_gradients([(tf.constant(value), v)], {"layer/kernel": multiplier})
    assert g.numpy() == np.float32(value) * np.float32(multiplier)


def test_multipliers_by_regular_expression_first_match_wins():
    kernel = tf.Variable(1.0, name="dense/kernel")
    bias = tf.Variable(1.0, name="dense/bias")
    other = tf.Variable(1.0, name="head/bias")
    grads = [(tf.constant(1.0), kernel), (tf.constant(1.0), bias), (tf.constant(1.0), other)]
    result = trainop.multiply_gradients(
        grads, [("head/bias", 5.0), (re.compile(r".*/bias"), 2.0), (re.compile(".*"), 3.0)]
    )
    assert [float(g) for g, _ in result] == [3.0, 2.0, 5.0]


def test_a_zero_multiplier_freezes_a_variable_even_under_adam(caplog):
    frozen = tf.Variable(1.0, name="frozen")
    trained = tf.Variable(1.0, name="trained")
    train_op = trainop.create_train_op(
        lambda: frozen * frozen + trained * trained,
        keras.optimizers.Adam(0.1),
        transform_grads_fn=trainop.multiply_gradients_fn({"frozen": 0.0}),
        global_step=None,
    )
    with caplog.at_level("WARNING", logger="trainop"):
        for _ in range(3):
            train_op()
    assert frozen.numpy() == 1.0
    assert trained.numpy() < 0.8
    assert "no gradient" not in caplog.text


def test_chain_applies_transforms_in_order():
    v = tf.Variable([0.0], name="v")
    double = trainop.multiply_gradients_fn({"v": 2.0})
    clip = trainop.clip_by_value_fn(-1.0, 1.0)
    grads = [(tf.constant([3.0]), v)]
    assert float(trainop.chain(clip, double)(grads)[0][0][0]) == 2.0
    assert float(trainop.chain(double, clip)(grads)[0][0][0]) == 1.0
    assert trainop.chain()(grads) == grads


def test_gradient_noise_is_annealed_by_the_step():
    v = tf.Variable(tf.zeros(200_000))
    step = tf.Variable(0, dtype=tf.int64)
    noisy = trainop.add_gradient_noise_fn(1.0, decay_exponent=0.55, step=step, seed=1)
    zeros = [(tf.zeros(200_000), v), (None, v)]
    std_at_0 = float(tf.math.reduce_std(noisy(zeros)[0][0]))
    step.assign(99)
    result = noisy(zeros)
    assert result[1][0] is None
    std_at_99 = float(tf.math.reduce_std(result[0][0]))
    assert std_at_0 == pytest.approx(1.0, rel=0.02)
    assert std_at_99 == pytest.approx(100**-0.55, rel=0.02)


def test_clip_by_value_on_indexed_slices():
    v = tf.Variable(tf.zeros((4, 1)))
    grad = tf.IndexedSlices(tf.constant([[5.0], [-0.5]]), tf.constant([0, 3]))
    [(clipped, _)] = trainop.clip_by_value([(grad, v)], -1.0, 1.0)
    np.testing.assert_array_equal(clipped.values.numpy(), [[1.0], [-0.5]])
    np.testing.assert_array_equal(clipped.indices.numpy(), [0, 3])


NAN, INF = float("nan"), float("inf")
BAD_SETTINGS = [
    (lambda: trainop.clip_gradient_norms_fn(-1.0), ValueError, "`max_norm`.*max_norm=-1.0"),
    (lambda: trainop.clip_gradient_norms_fn(0.0), ValueError, "`max_norm`.*max_norm=0.0"),
    (lambda: trainop.clip_gradient_norms_fn(NAN), ValueError, "`max_norm`.*max_norm=nan"),
    (lambda: trainop.clip_gradient_norms([], -INF), ValueError, "`max_norm`.*max_norm=-inf"),
    (lambda: trainop.clip_by_global_norm_fn(0.0), ValueError, "`max_norm`.*max_norm=0.0"),
    (lambda: trainop.clip_by_global_norm_fn(NAN), ValueError, "`max_norm`.*max_norm=nan"),
    (lambda: trainop.clip_by_global_norm([], -2), ValueError, "`max_norm`.*max_norm=-2"),
    (lambda: trainop.clip_by_global_norm_fn("1"), TypeError, "`max_norm`.*max_norm='1'"),
    (lambda: trainop.clip_by_global_norm_fn(True), TypeError, "`max_norm`.*max_norm=True"),
    (lambda: trainop.clip_by_value_fn(1.0, -1.0), ValueError, "`clip_value_min` must not"),
    (lambda: trainop.clip_by_value_fn(NAN, 1.0), ValueError, "`clip_value_min`.*=nan"),
    (lambda: trainop.clip_by_value_fn(-1.0, NAN), ValueError, "`clip_value_max`.*=nan"),
    (lambda: trainop.clip_by_value([], INF, -INF), ValueError, "`clip_value_min` must not"),
    (lambda: trainop.add_gradient_noise_fn(-1.0), ValueError, "`stddev`.*stddev=-1.0"),
    (lambda: trainop.add_gradient_noise_fn(NAN), ValueError, "`stddev`.*stddev=nan"),
    (lambda: trainop.add_gradient_noise_fn(INF), ValueError, "`stddev`.*stddev=inf"),
    (lambda: trainop.add_gradient_noise([], -0.5), ValueError, "`stddev`.*stddev=-0.5"),
    (
        lambda: trainop.add_gradient_noise_fn(1.0, decay_exponent=-0.5),
        ValueError,
        "`decay_exponent`.*decay_exponent=-0.5",
    ),
    (lambda: trainop.multiply_gradients_fn({"w": NAN}), ValueError, "`gradient_multipliers`.*nan"),
    (lambda: trainop.multiply_gradients_fn({"w": INF}), ValueError, "`gradient_multipliers`.*inf"),
]


@pytest.mark.parametrize("make, error, message", BAD_SETTINGS)
def test_transforms_check_their_numbers_when_made(make, error, message):
    with pytest.raises(error, match=message):
        make()


EDGE_GRADIENTS = [
    (tf.constant([3e30, -4e30]), tf.Variable([0.0, 0.0])),
    (tf.constant([1e-30], tf.float16), tf.Variable([0.0], dtype=tf.float16)),
    (
        tf.IndexedSlices(tf.constant([[1e20, 2.0], [1e20, -1.0]]), tf.constant([2, 2]), [4, 2]),
        tf.Variable(tf.zeros((4, 2))),
    ),
    (tf.constant([INF, 1.0]), tf.Variable([0.0, 0.0])),
]


@pytest.mark.parametrize(
    "transform",
    [
        trainop.clip_gradient_norms_fn(INF),
        trainop.clip_by_global_norm_fn(INF),
        trainop.clip_by_value_fn(-INF, INF),
        trainop.add_gradient_noise_fn(0.0),
        trainop.chain(trainop.clip_by_global_norm_fn(INF), trainop.clip_gradient_norms_fn(INF)),
    ],
    ids=["clip_each", "clip_global", "clip_value", "noise_0", "chain"],
)
def test_an_infinite_bound_clips_nothing(transform):
    for (grad, var), (out, out_var) in zip(EDGE_GRADIENTS, transform(EDGE_GRADIENTS)):
        assert out_var is var
        dense = tf.convert_to_tensor(grad).numpy()
        np.testing.assert_array_equal(tf.convert_to_tensor(out).numpy(), dense)


@pytest.mark.parametrize("max_norm", [1e-6, 1e6])
def test_tiny_and_huge_bounds_clip_to_exactly_the_bound(max_norm):
    grads = [(tf.constant([3.0, 4.0]), None), (tf.constant([[1e3]]), None)]
    norm = np.sqrt(25.0 + 1e6)
    each = trainop.clip_gradient_norms(grads, max_norm)
    together = trainop.clip_by_global_norm(grads, max_norm)
    np.testing.assert_allclose(each[0][0].numpy(), np.array([3, 4]) * min(1, max_norm / 5))
    np.testing.assert_allclose(each[1][0].numpy(), [[1e3 * min(1, max_norm / 1e3)]], rtol=1e-6)
    scale = min(1.0, max_norm / norm)
    np.testing.assert_allclose(together[0][0].numpy(), np.array([3, 4]) * scale, rtol=1e-6)


def test_transform_factories_reject_bad_settings():
    with pytest.raises(TypeError, match="`chain` takes transform_grads_fn callables"):
        trainop.chain(trainop.clip_by_value_fn(-1.0, 1.0), 3.0)
    with pytest.raises(TypeError, match="compiled regular"):
        trainop.multiply_gradients_fn({3.5: 1.0})
