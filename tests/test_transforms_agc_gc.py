"""Adaptive gradient clipping and gradient centralization, against plain float64 NumPy.

The references follow the papers' definitions (and optax's `adaptive_grad_clip` for AGC's
units): a dense kernel's unit is its column (norm over axis 0), a convolution kernel's its
output channel (axes 0, 1, 2), a vector's its elements; centralization subtracts, per output
unit (last axis), the mean over the other axes, and leaves vectors alone.
"""

from __future__ import annotations

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import trainop

SHAPES = [(3,), (1,), (4, 2), (2, 3, 2), (2, 2, 3, 2), (1, 5)]
DTYPES = {
    "float16": (np.float16, 2e-3),
    "float32": (np.float32, 1e-5),
    "float64": (np.float64, 1e-12),
}


def agc_reference(g, w, clipping, eps):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    if np.squeeze(g).ndim <= 1:
        g_norm, w_norm = np.abs(g), np.abs(w)
    else:
        axes = (0,) if g.ndim in (2, 3) else (0, 1, 2)
        g_norm = np.sqrt(np.sum(g * g, axis=axes, keepdims=True))
        w_norm = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
    max_norm = np.maximum(w_norm, eps) * clipping
    return np.where(g_norm < max_norm, g, g * max_norm / np.maximum(g_norm, 1e-6))


def gc_reference(g):
    g = np.asarray(g, np.float64)
    if g.ndim < 2:
        return g
    return g - g.mean(axis=tuple(range(g.ndim - 1)), keepdims=True)


def _arrays(draw, shape, dtype):
    size = int(np.prod(shape))
    values = draw(st.lists(st.integers(-16, 16), min_size=size, max_size=size))
    return (np.array(values, np.float64) / 8).reshape(shape).astype(dtype)


@st.composite
def cases(draw):
    shape = draw(st.sampled_from(SHAPES))
    dtype_name = draw(st.sampled_from(sorted(DTYPES)))
    dtype, tolerance = DTYPES[dtype_name]
    return (
        _arrays(draw, shape, dtype),
        _arrays(draw, shape, dtype),
        draw(st.sampled_from([1e-3, 0.01, 0.1, 1.0, 10.0])),
        draw(st.sampled_from([1e-3, 0.1, 1.0])),
        tolerance,
    )


@settings(deadline=None)
@given(cases())
def test_adaptive_gradient_clipping_matches_the_reference(case):
    g, w, clipping, eps, tolerance = case
    [(got, _)] = trainop.adaptive_gradient_clipping(
        [(tf.constant(g), tf.Variable(w))], clipping, eps
    )
    assert got.dtype == tf.as_dtype(g.dtype)
    expected = agc_reference(g, w, clipping, eps)
    np.testing.assert_allclose(got.numpy(), expected, rtol=tolerance, atol=tolerance * 1e-3)


@settings(deadline=None)
@given(cases())
def test_gradient_centralization_matches_the_reference(case):
    g, w, _, _, tolerance = case
    [(got, _)] = trainop.gradient_centralization([(tf.constant(g), tf.Variable(w))])
    assert got.dtype == tf.as_dtype(g.dtype)
    np.testing.assert_allclose(got.numpy(), gc_reference(g), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("rank", [1, 2])
def test_an_embeddings_indexed_slices_clip_as_the_dense_gradient_and_stay_sparse(rank):
    """Rows named twice are summed before being measured; the rows not named are zero in the
    dense gradient, and the units (columns) are measured over the whole table."""
    table = np.random.default_rng(0).normal(size=(5, 3) if rank == 2 else (5,))
    values = np.random.default_rng(1).normal(size=(4, 3) if rank == 2 else (4,))
    indices = np.array([1, 3, 1, 0])
    slices = tf.IndexedSlices(
        tf.constant(values), tf.constant(indices), tf.constant(table.shape, tf.int64)
    )
    dense = np.zeros_like(table)
    np.add.at(dense, indices, values)
    [(got, _)] = trainop.adaptive_gradient_clipping([(slices, tf.Variable(table))], 0.05)
    assert isinstance(got, tf.IndexedSlices)
    np.testing.assert_allclose(
        tf.convert_to_tensor(got).numpy(), agc_reference(dense, table, 0.05, 1e-3), rtol=1e-10
    )


def test_an_embeddings_indexed_slices_centralized_become_the_dense_gradient_centralized():
    table = tf.Variable(np.zeros((4, 2)))
    slices = tf.IndexedSlices(
        tf.constant([[1.0, 2.0], [3.0, 4.0]], tf.float64), tf.constant([0, 0]), [4, 2]
    )
    [(got, _)] = trainop.gradient_centralization([(slices, table)])
    dense = np.array([[4.0, 6.0], [0, 0], [0, 0], [0, 0]])
    np.testing.assert_allclose(got.numpy(), gc_reference(dense))


def test_excluded_variables_and_none_gradients_pass_through():
    kernel, logits = tf.Variable(np.ones((2, 2))), tf.Variable(np.ones((2, 2)), name="logits")
    big = tf.constant(np.full((2, 2), 100.0))
    pairs = [(big, kernel), (big, logits), (None, tf.Variable([1.0]))]
    for transform in (
        trainop.adaptive_gradient_clipping_fn(0.01, exclude=re.compile(r"logits.*")),
        trainop.gradient_centralization_fn(exclude=[logits]),
    ):
        [(clipped, _), (kept, _), (none, _)] = transform(pairs)
        assert kept is big and none is None
        assert not np.array_equal(clipped.numpy(), big.numpy())


def test_in_a_train_op_the_step_is_sgd_on_the_transformed_gradient():
    """A Keras Dense layer, SGD 0.5: the step applies AGC then centralization, as chained."""
    keras.utils.set_random_seed(0)
    layer = keras.layers.Dense(2)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    layer(x)
    kernel, bias = layer.kernel.numpy().astype(np.float64), layer.bias.numpy().astype(np.float64)
    # d/dW of sum(xW + b) is x summed over the batch, for every column; d/db is 8.
    g_kernel = np.repeat(x.astype(np.float64).sum(axis=0, keepdims=True).T, 2, axis=1)
    g_bias = np.full(2, 8.0)
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(layer(x)),
        keras.optimizers.SGD(0.5),
        global_step=None,
        transform_grads_fn=trainop.chain(
            trainop.adaptive_gradient_clipping_fn(0.01),
            trainop.gradient_centralization_fn(),
        ),
    )
    train_op()
    expected_kernel = kernel - 0.5 * gc_reference(agc_reference(g_kernel, kernel, 0.01, 1e-3))
    expected_bias = bias - 0.5 * agc_reference(g_bias, bias, 0.01, 1e-3)
    np.testing.assert_allclose(layer.kernel.numpy(), expected_kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.bias.numpy(), expected_bias, rtol=1e-5, atol=1e-6)


def test_a_non_finite_gradient_comes_back_nan_for_the_guard():
    w = tf.Variable(np.ones((2, 2)))
    g = tf.constant([[math.inf, 1.0], [1.0, 1.0]], tf.float64)
    [(got, _)] = trainop.adaptive_gradient_clipping([(g, w)], 0.01)
    # The unit (column) holding inf is scaled by max_norm / inf = 0: inf * 0 is NaN.
    assert np.isnan(got.numpy()[:, 0]).any() and np.isfinite(got.numpy()[:, 1]).all()


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: trainop.adaptive_gradient_clipping_fn(0.0), ValueError, "`clipping` must be"),
        (lambda: trainop.adaptive_gradient_clipping_fn(math.nan), ValueError, "`clipping`"),
        (lambda: trainop.adaptive_gradient_clipping_fn(0.01, eps=-1.0), ValueError, "`eps`"),
        (lambda: trainop.adaptive_gradient_clipping_fn("0.01"), TypeError, "`clipping`"),
        (lambda: trainop.adaptive_gradient_clipping_fn(exclude=[3]), TypeError, "`exclude`"),
        (lambda: trainop.gradient_centralization_fn(exclude=1.5), TypeError, "`exclude`"),
    ],
)
def test_bad_settings_are_refused_when_the_transform_is_made(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_what_agc_cannot_measure_is_refused_by_name():
    with pytest.raises(ValueError, match="rank 1 to 4"):
        trainop.adaptive_gradient_clipping(
            [(tf.ones([2, 2, 2, 2, 2]), tf.Variable(tf.ones([2, 2, 2, 2, 2])))]
        )
    with pytest.raises(TypeError, match="cannot measure a complex gradient"):
        trainop.adaptive_gradient_clipping(
            [(tf.constant([1 + 1j]), tf.Variable(tf.constant([1 + 0j])))]
        )
