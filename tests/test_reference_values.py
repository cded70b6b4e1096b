"""Gradient norms and clipping against plain float64 NumPy arithmetic.

The oracle is never trainop itself: a norm taken over the first gradient only, or a clip by
each gradient's own norm where the global norm was asked for, gives other numbers than these.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer

# Dense float32 gradients of different shapes; the first alone has norm 1.
GRADIENTS = [
    np.array([0.6, -0.8], np.float32),
    np.array([[1.5, -2.0], [0.25, 3.0]], np.float32),
    np.array(-4.0, np.float32),
]


def _numpy_global_norm(arrays):
    return np.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2) for a in arrays))


def _pairs(arrays):
    return [(tf.constant(a), None) for a in arrays]


def test_global_norm_is_the_norm_of_all_gradients_together():
    expected = _numpy_global_norm(GRADIENTS)  # sqrt(1 + 15.3125 + 16) = 5.684...
    norm = trainop.global_norm(_pairs(GRADIENTS))
    np.testing.assert_allclose(float(norm), expected, rtol=1e-6)
    # A None gradient (a variable the loss does not read) counts for nothing.
    with_none = trainop.global_norm([(None, None), *_pairs(GRADIENTS)])
    np.testing.assert_allclose(float(with_none), expected, rtol=1e-6)


@pytest.mark.parametrize("max_norm", [1.5, 4.0, 100.0])
def test_clip_by_global_norm_scales_every_gradient_by_the_norm_of_all(max_norm):
    norm = _numpy_global_norm(GRADIENTS)
    scale = min(1.0, max_norm / norm)
    clipped = trainop.clip_by_global_norm(_pairs(GRADIENTS), max_norm)
    assert len(clipped) == len(GRADIENTS)
    for (g, _), original in zip(clipped, GRADIENTS):
        np.testing.assert_allclose(g.numpy(), original.astype(np.float64) * scale, rtol=1e-6)
    np.testing.assert_allclose(
        _numpy_global_norm([g.numpy() for g, _ in clipped]), min(norm, max_norm), rtol=1e-6
    )


def test_clip_gradient_norms_clips_each_gradient_by_its_own_norm():
    max_norm = 2.0
    clipped = trainop.clip_gradient_norms(_pairs(GRADIENTS), max_norm)
    for (g, _), original in zip(clipped, GRADIENTS):
        own = _numpy_global_norm([original])
        expected = original.astype(np.float64) * min(1.0, max_norm / own)
        np.testing.assert_allclose(g.numpy(), expected, rtol=1e-6)


def test_a_train_op_clipped_by_global_norm_makes_the_numpy_step(runner, family):
    a0 = np.array([0.3, -0.4], np.float32)
    b0 = np.array([[1.0, 2.0], [-2.0, 0.5]], np.float32)
    a = runner.variable(a0, "a")
    b = runner.variable(b0, "b")
    global_step = runner.variable(0, "global_step", trainable=False, dtype=tf.int64)
    max_norm, lr = 2.0, 0.5
    step = runner.train_op(
        # The gradients are a and 2 * b: norms 0.5 and 6.2, together 6.22.
        lambda: 0.5 * tf.reduce_sum(a * a) + tf.reduce_sum(b * b),
        make_optimizer(family, "sgd", lr),
        global_step=global_step,
        transform_grads_fn=trainop.clip_by_global_norm_fn(max_norm),
    )
    losses = [float(step()) for _ in range(3)]

    expected_a, expected_b = a0.astype(np.float64), b0.astype(np.float64)
    expected_losses = []
    for _ in range(3):
        expected_losses.append(0.5 * np.sum(expected_a**2) + np.sum(expected_b**2))
        grads = [expected_a, 2.0 * expected_b]
        scale = min(1.0, max_norm / _numpy_global_norm(grads))
        expected_a = expected_a - lr * scale * grads[0]
        expected_b = expected_b - lr * scale * grads[1]
    np.testing.assert_allclose(runner.read(a), expected_a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(runner.read(b), expected_b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert runner.read(global_step) == 3
