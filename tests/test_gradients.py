"""Norms, clips and finiteness tests of gradients in narrow and mixed float types and of
`IndexedSlices` with repeated rows, against float64 NumPy arithmetic."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer

TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-6, "float64": 1e-12}


def _reference_global_clip(grads: list[np.ndarray], max_norm: float) -> list[np.ndarray]:
    norm = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in grads))
    return [g.astype(np.float64) * min(1.0, max_norm / norm) for g in grads]


def _reference_clip_each(grads: list[np.ndarray], max_norm: float) -> list[np.ndarray]:
    return [_reference_global_clip([g], max_norm)[0] for g in grads]


def test_clip_by_global_norm_of_float16_and_float32_gradients_keeps_each_dtype():
    pairs = [
        (tf.constant([3.0, 4.0], tf.float16), tf.Variable([0.0, 0.0], dtype=tf.float16)),
        (tf.constant([0.0, 12.0], tf.float32), tf.Variable([0.0, 0.0])),
    ]
    (g16, _), (g32, _) = trainop.clip_by_global_norm(pairs, 1.0)
    assert (g16.dtype, g32.dtype) == (tf.float16, tf.float32)
    np.testing.assert_allclose(g16.numpy(), [3 / 13, 4 / 13], rtol=1e-3)
    np.testing.assert_allclose(g32.numpy(), [0.0, 12 / 13], rtol=1e-6)


DTYPE_MIXES = [
    ("float16", "float32"),
    ("bfloat16", "bfloat16"),
    ("float64", "float64"),
    ("float32", "float64"),
    ("float16", "float16"),
]


@pytest.mark.parametrize("dtypes", DTYPE_MIXES, ids=["-".join(d) for d in DTYPE_MIXES])
@pytest.mark.parametrize("clip", ["global", "each"])
@pytest.mark.parametrize("magnitude", [1.0, 300.0])
def test_a_step_clips_gradients_of_any_float_types_as_float64_arithmetic(
    runner, dtypes, clip, magnitude
):
    """A model of two variables of `dtypes` (a float16 kernel and a float32 batch-norm scale,
    say), SGD with rate 1: the update is the clipped gradient, each in its own dtype. At
    magnitude 300, float16 squares (9e4) overflow float16."""
    grads = [np.array([3.0, 4.0]) * magnitude, np.array([0.0, 12.0]) * magnitude]
    w = [
        runner.variable(np.zeros(2), f"w{i}", dtype=tf.as_dtype(dtype))
        for i, dtype in enumerate(dtypes)
    ]

    def loss():
        # d loss / d w_i = grads[i].
        terms = [tf.reduce_sum(tf.cast(v, tf.float64) * g) for v, g in zip(w, grads)]
        return tf.cast(tf.add_n(terms), tf.float32)

    max_norm = 1.0
    transform = (
        trainop.clip_by_global_norm_fn(max_norm)
        if clip == "global"
        else trainop.clip_gradient_norms_fn(max_norm)
    )
    # keras.optimizers.SGD takes every float type; tf.compat.v1's has no bfloat16 kernel.
    step = runner.train_op(
        loss, keras.optimizers.SGD(1.0), global_step=None, transform_grads_fn=transform
    )
    step()
    expected = (_reference_global_clip if clip == "global" else _reference_clip_each)(
        grads, max_norm
    )
    for v, dtype, g in zip(w, dtypes, expected):
        applied = -runner.read(v).astype(np.float64)
        assert runner.read(v).dtype == tf.as_dtype(dtype).as_numpy_dtype
        np.testing.assert_allclose(applied, g, rtol=TOLERANCE[dtype], atol=1e-7)


def test_finite_gradients_too_large_to_square_are_clipped_not_made_nan():
    pairs = [(tf.constant([3e20, 4e20]), None), (tf.constant([1e-3]), None)]
    (big, _), (small, _) = trainop.clip_by_global_norm(pairs, 1.0)
    np.testing.assert_allclose(big.numpy(), [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(small.numpy(), [2e-24], rtol=1e-5)
    [(each, _)] = trainop.clip_gradient_norms([(tf.constant([3e20, 4e20]), None)], 5.0)
    np.testing.assert_allclose(each.numpy(), [3.0, 4.0], rtol=1e-6)
    assert float(trainop.global_norm(pairs)) == pytest.approx(5e20, rel=1e-6)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_non_finite_gradient_makes_the_clipped_gradients_nan(bad):
    pairs = [(tf.constant([1.0, bad]), None), (tf.constant([2.0], tf.float16), None)]
    for clipped in (
        trainop.clip_by_global_norm(pairs, 1.0),
        trainop.clip_gradient_norms(pairs[:1], 1.0),
    ):
        assert np.isnan(clipped[0][0].numpy()).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_global_norm_is_taken_in_a_wide_type(dtype):
    # Squares of 3e3 and 4e3 overflow float16; the norm is 5e3 in any case.
    pairs = [(tf.constant([3e3, 4e3], tf.as_dtype(dtype)), None)]
    norm = trainop.global_norm(pairs)
    assert norm.dtype == (tf.float64 if dtype == "float64" else tf.float32)
    assert float(norm) == pytest.approx(5e3, rel=TOLERANCE[dtype])


def test_global_norm_is_of_every_gradient_not_the_first():
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=shape) for shape in [(3, 2), (4,), (), (2, 2, 2)]]
    pairs = [(tf.constant(g, tf.float32), None) for g in grads] + [(None, None)]
    expected = np.sqrt(sum(np.sum(g**2) for g in grads))
    assert float(trainop.global_norm(pairs)) == pytest.approx(expected, rel=1e-6)


# --- IndexedSlices with repeated rows -------------------------------------------------------


def _embedding(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 10 x 4 table, targets for its rows at `ids`, and the dense gradient of
    sum((table[ids] - targets) ** 2), in float64."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(10, 4)).astype(np.float32)
    targets = rng.normal(size=(len(ids), 4)).astype(np.float32)
    dense = np.zeros((10, 4))
    np.add.at(dense, ids, 2.0 * (table[ids].astype(np.float64) - targets))
    return table, targets, dense


def _embedding_update(runner, ids, transform, family="keras") -> np.ndarray:
    """The update of one SGD step (rate 1) of the table of `_embedding(ids)`, in float64."""
    initial, targets, _ = _embedding(ids)
    table = runner.variable(initial, "table")

    def loss():
        # The gradient of a gather is IndexedSlices: a slice per looked-up id.
        return tf.reduce_sum(tf.square(tf.gather(table, ids) - targets))

    step = runner.train_op(
        loss, make_optimizer(family, "sgd", 1.0), global_step=None, transform_grads_fn=transform
    )
    step()
    return initial.astype(np.float64) - runner.read(table).astype(np.float64)


@pytest.mark.parametrize("family", ["v1", "keras", "tf_keras", "tf_keras_legacy"])
@pytest.mark.parametrize("clip", ["global", "each"])
def test_clipping_an_embedding_looked_up_40_times_clips_the_gradient_rows_sum(runner, family, clip):
    ids = np.array([3] * 40)
    dense = _embedding(ids)[2]
    max_norm = float(np.linalg.norm(dense)) / 4
    transform = (
        trainop.clip_by_global_norm_fn(max_norm)
        if clip == "global"
        else trainop.clip_gradient_norms_fn(max_norm)
    )
    update = _embedding_update(runner, ids, transform, family)
    np.testing.assert_allclose(update, dense * max_norm / np.linalg.norm(dense), rtol=1e-5)
    assert np.linalg.norm(update) == pytest.approx(max_norm, rel=1e-5)


def test_clip_by_value_of_repeated_rows_clips_their_sum(runner):
    ids = np.array([1, 1, 1, 2, 7, 7])
    update = _embedding_update(runner, ids, trainop.clip_by_value_fn(-1.5, 1.5))
    np.testing.assert_allclose(update, np.clip(_embedding(ids)[2], -1.5, 1.5), atol=1e-5)


def test_noise_on_repeated_rows_is_drawn_once_per_row():
    grad = tf.IndexedSlices(tf.zeros([50, 2]), tf.constant([4] * 50), tf.constant([10, 2]))
    [(noisy, _)] = trainop.add_gradient_noise([(grad, None)], 1.0, seed=1)
    assert noisy.values.shape == (1, 2)
    assert noisy.indices.numpy().tolist() == [4]


def test_global_norm_of_repeated_rows_is_the_dense_gradients():
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    indices = np.array([0, 3, 0, 3, 3, 9])
    grad = tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([10, 2]))
    dense = np.zeros((10, 2))
    np.add.at(dense, indices, values)
    assert float(trainop.global_norm([(grad, None)])) == pytest.approx(np.linalg.norm(dense))


def test_repeated_rows_are_summed_under_xla_too():
    values = tf.constant([[1.0, 2.0], [2.0, 2.0], [1.0, 1.0]])

    @tf.function(jit_compile=True)
    def clipped():
        grad = tf.IndexedSlices(values, tf.constant([2, 2, 5]), tf.constant([6, 2]))
        return tf.convert_to_tensor(trainop.clip_gradient_norms([(grad, None)], 1.0)[0][0])

    dense = np.zeros((6, 2))
    np.add.at(dense, [2, 2, 5], values.numpy())
    np.testing.assert_allclose(clipped().numpy(), dense / np.linalg.norm(dense), rtol=1e-6)


# --- The skip guard's finiteness test ----------------------------------------------------------


def _with_gradient(x: tf.Tensor, gradient: tf.Tensor) -> tf.Tensor:
    """`x`, whose gradient is `gradient` times the incoming one: a finite loss, any gradient."""

    @tf.custom_gradient
    def identity(x):
        return tf.identity(x), lambda dy: dy * gradient

    return identity(x)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_the_skip_guard_applies_large_finite_gradients(runner, dtype):
    # float16 squares of 300 overflow float16; float32 squares of 1e20 overflow float32.
    large = {"float16": 300.0, "float32": 1e20, "float64": 1e200}[dtype]
    w = runner.variable(np.zeros(2), "w", dtype=tf.as_dtype(dtype))
    guard = trainop.SkipNonFiniteSteps()

    def loss():
        return tf.cast(tf.reduce_sum(_with_gradient(w, tf.constant(large, w.dtype))), tf.float32)

    step = runner.train_op(loss, keras.optimizers.SGD(1e-3), global_step=None, check_numerics=guard)
    step()
    np.testing.assert_allclose(runner.read(w).astype(np.float64), [-large * 1e-3] * 2, rtol=1e-3)
    assert runner.read(guard.skipped_steps) == 0


def test_the_skip_guard_skips_an_inf_in_a_float16_gradient(runner):
    w = runner.variable(np.ones(2), "w", dtype=tf.float16)
    guard = trainop.SkipNonFiniteSteps()

    def loss():
        gradient = tf.constant([1.0, np.inf], tf.float16)
        return tf.cast(tf.reduce_sum(_with_gradient(w, gradient)), tf.float32)

    step = runner.train_op(loss, keras.optimizers.SGD(0.1), global_step=None, check_numerics=guard)
    step()
    np.testing.assert_array_equal(runner.read(w), [1.0, 1.0])
    assert runner.read(guard.skipped_steps) == 1


# --- Under XLA, and in float64 ---------------------------------------------------------------


@pytest.mark.parametrize("jit_compile", [False, True])
def test_transformed_sparse_gradients_stay_sparse_under_xla(jit_compile):
    """A clip or noise on repeated rows sees their sum and leaves the rows not looked up alone:
    an optimizer with sparse updates (momentum, Adam's lazy variants) moves only those rows."""
    values = tf.constant([[1.0, 2.0], [1.0, -3.0], [0.5, 0.5], [-4.0, 0.0]])
    ids = tf.constant([0, 0, 1, 3])
    dense = np.zeros((5, 2))
    np.add.at(dense, ids.numpy(), values.numpy())
    clip = trainop.clip_by_value_fn(-1.5, 1.5)
    noise = trainop.add_gradient_noise_fn(1.0, seed=3)

    @tf.function(jit_compile=jit_compile)
    def transformed():
        grad = tf.IndexedSlices(values, ids, tf.constant([5, 2]))
        out = [clip([(grad, None)])[0][0], noise([(grad, None)])[0][0]]
        assert all(isinstance(g, tf.IndexedSlices) for g in out)
        return [tf.convert_to_tensor(g) for g in out]

    clipped, noisy = (t.numpy() for t in transformed())
    np.testing.assert_allclose(clipped, np.clip(dense, -1.5, 1.5))
    looked_up = np.isin(np.arange(5), ids.numpy())
    np.testing.assert_array_equal(noisy[~looked_up], 0.0)
    assert np.all(noisy[looked_up] != dense[looked_up])


def test_a_clip_by_value_keeps_a_nan_for_the_guard_under_xla():
    w = tf.Variable([0.5, 0.5])
    guard = trainop.SkipNonFiniteSteps()
    step = trainop.create_train_op(
        lambda g: tf.reduce_sum(_with_gradient(w, g)),
        keras.optimizers.SGD(0.125),
        global_step=None,
        transform_grads_fn=trainop.clip_by_value_fn(-0.5, 3.0),
        check_numerics=guard,
        jit_compile=True,
        steps_per_call=2,
    )
    step(tf.constant([[np.nan, 1.0], [1.0, 1.0]]))
    np.testing.assert_allclose(w.numpy(), [0.375, 0.375])  # the second step only
    assert int(guard.skipped_steps) == 1


@pytest.mark.parametrize("multiplier", [0.1, np.float64(0.3), 1 / 3])
def test_float64_gradients_are_transformed_in_float64(multiplier):
    v = tf.Variable([0.0, 0.0], dtype=tf.float64, name="v")
    grad = tf.constant([1.0, 3.0], tf.float64)
    [(g, _)] = trainop.multiply_gradients([(grad, v)], {"v": multiplier})
    np.testing.assert_array_equal(g.numpy(), np.array([1.0, 3.0]) * multiplier)
    [(g, _)] = trainop.clip_by_global_norm([(grad, v)], multiplier)
    np.testing.assert_allclose(g.numpy(), grad.numpy() * multiplier / np.sqrt(10), rtol=1e-15)
    [(g, _)] = trainop.clip_by_value([(grad, v)], -multiplier, multiplier)
    np.testing.assert_array_equal(g.numpy(), [multiplier, multiplier])
