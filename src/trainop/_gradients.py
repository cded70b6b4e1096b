"""Arithmetic on gradients that every stage shares: values, rows, norms, scaling.

A gradient is a dense tensor, a `tf.IndexedSlices` or None. Two rules hold everywhere a
gradient is measured:

* **Norms in a wide float type.** A sum of squares is taken in float32 at least (float64 when a
  gradient is float64), so that a finite float16 or bfloat16 gradient never gets an inf norm,
  and gradients of mixed float types can be measured together. Squares of finite float32
  values that overflow (elements above about 1.8e19) fall back to a sum rescaled by the largest
  magnitude, so that a finite gradient always has a finite norm when its norm is representable.
* **Rows summed before they are measured.** An `IndexedSlices` gradient may name a row more than
  once (an embedding looking up the same id twice); the gradient is the sum of its slices per
  row, so its norm, its clipped values and its histogram are those of the summed rows, as for
  the dense gradient they add up to. (TF-Agents and TF-Slim measure the slices as they come.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf


def values(grad: Any) -> tf.Tensor:
    """The values of a dense gradient (itself) or of an `IndexedSlices` gradient."""
    return grad.values if isinstance(grad, tf.IndexedSlices) else grad


def map_values(grad: Any, fn: Callable[[tf.Tensor], tf.Tensor]) -> Any:
    """`fn` applied to a dense gradient, or to the values of an `IndexedSlices` gradient."""
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(fn(grad.values), grad.indices, grad.dense_shape)
    return fn(grad)


def wide_dtype(dtype: tf.DType) -> tf.DType:
    """The type to do arithmetic on `dtype` in: float32 for float16 and bfloat16."""
    return tf.float32 if dtype.size < 4 else dtype


def norm_dtype(grads: Sequence[Any]) -> tf.DType:
    """float64 if any of `grads` is float64 or complex128, else float32."""
    wide = (tf.float64, tf.complex128)
    return tf.float64 if any(g.dtype in wide for g in grads if g is not None) else tf.float32


def magnitudes(t: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """`t` as real values of `dtype` with the same squares: a complex value by its modulus,
    |z| = sqrt(real(z * conj(z)))."""
    return tf.cast(tf.abs(t) if t.dtype.is_complex else t, dtype)


def _in_xla() -> bool:
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def as_tensor(value: Any, dtype: tf.DType) -> tf.Tensor:
    """`value` (a number or a tensor) as a tensor of `dtype`.

    A Python number becomes a constant of `dtype` directly: `tf.cast` would first make it a
    float32 constant, and a float64 0.1 would be 0.10000000149.
    """
    if isinstance(value, (int, float, np.number)):
        return tf.constant(value, dtype)
    return tf.cast(value, dtype)


def summed_rows(grad: Any) -> Any:
    """An `IndexedSlices` gradient with each row once: the slices of a repeated row summed.

    Dense gradients and None come back as they are. The sum is taken in float32 for 16-bit
    values. Under XLA, which needs static shapes, the slices keep their number: the first
    slice of a row holds the row's sum and the others zeros (`map_rows` keeps them zeros).
    """
    return _summed_rows(grad)[0]


def map_rows(grad: Any, fn: Callable[[tf.Tensor], tf.Tensor]) -> Any:
    """`fn` applied to a gradient's values, the slices of a repeated row summed first.

    For an element-wise `fn` that is not linear (a clip, added noise), the gradient is the sum
    of its slices per row, so `fn` must see that sum, as it would see the dense gradient's rows.
    The result keeps the gradient's form: dense, or `IndexedSlices`.
    """
    rows, repeats = _summed_rows(grad)
    mapped = map_values(rows, fn)
    if repeats is None:
        return mapped
    # Under XLA: the repeated slices, zeros, stay zeros whatever `fn` makes of a zero.
    return map_values(
        mapped, lambda t: tf.where(_broadcast_to_rank(repeats, t), tf.zeros_like(t), t)
    )


def _broadcast_to_rank(mask: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    return tf.reshape(mask, [-1] + [1] * (like.shape.rank - 1))


def _summed_rows(grad: Any) -> tuple[Any, tf.Tensor | None]:
    """`summed_rows(grad)`, and under XLA which slices repeat a row (else None)."""
    if not isinstance(grad, tf.IndexedSlices):
        return grad, None
    count = grad.indices.shape.num_elements()
    if (count is not None and count <= 1) or grad.values.shape.rank in (None, 0):
        # Nothing can repeat (TF-Agents' tests also build slices of a scalar value).
        return grad, None
    dtype = grad.values.dtype
    slices = tf.cast(grad.values, wide_dtype(dtype))
    if not _in_xla():
        unique, positions = tf.unique(grad.indices)
        summed = tf.math.unsorted_segment_sum(slices, positions, tf.shape(unique)[0])
        return tf.IndexedSlices(tf.cast(summed, dtype), unique, grad.dense_shape), None
    # XLA needs static shapes: the rows are summed in a table-sized buffer, and each row's sum
    # goes to its first slice.
    rows = grad.dense_shape[0]
    table = tf.math.unsorted_segment_sum(slices, grad.indices, rows)
    positions = tf.range(tf.shape(grad.indices)[0])
    first = tf.gather(tf.math.unsorted_segment_min(positions, grad.indices, rows), grad.indices)
    repeats = tf.not_equal(first, positions)
    summed = tf.gather(table, grad.indices)
    summed = tf.where(_broadcast_to_rank(repeats, summed), tf.zeros_like(summed), summed)
    return tf.IndexedSlices(tf.cast(summed, dtype), grad.indices, grad.dense_shape), repeats


def _flat_values(grads: Sequence[Any], dtype: tf.DType) -> list[tf.Tensor]:
    return [tf.reshape(magnitudes(values(summed_rows(g)), dtype), [-1]) for g in grads]


def _squares(flat: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    # L2Loss reads each value once, with no squares written.
    return [2.0 * tf.nn.l2_loss(v) for v in flat]


def _unless_finite(
    value: tf.Tensor, exact: Callable[[], tf.Tensor], careful: Callable[[], tf.Tensor]
) -> tf.Tensor:
    """`exact()` if `value` is finite, else `careful()`, in a `tf.cond`.

    The careful branch is one call of a function that is not inlined: a lowered `tf.cond`
    visits every op of the branch it does not take, and the healthy steps take `exact`.
    """
    careful_call = tf.function(
        careful, autograph=False, experimental_attributes={"_noinline": True}
    )
    return tf.cond(tf.reduce_all(tf.math.is_finite(value)), exact, careful_call)


def _rescaled_norms(flat: Sequence[tf.Tensor], squares: tf.Tensor) -> tf.Tensor:
    """Each norm, where some squares overflowed or a value is not finite: measured in units of
    the gradient's largest magnitude, which is finite unless the gradient is not."""
    largest = tf.stack([tf.reduce_max(tf.abs(v)) for v in flat])
    unit = tf.stack([tf.reduce_sum(tf.square(v / largest[i])) for i, v in enumerate(flat)])
    careful = tf.where(tf.math.is_inf(largest), largest, largest * tf.sqrt(unit))
    return tf.where(tf.math.is_finite(squares), tf.sqrt(squares), careful)


def norms(grads: Sequence[Any], dtype: tf.DType | None = None) -> tf.Tensor:
    """The L2 norm of each gradient (None gradients left out), a vector of `dtype`.

    `dtype` is by default `norm_dtype(grads)`. `IndexedSlices` are measured by their summed rows.
    A gradient holding inf or NaN gets an inf or NaN norm.
    """
    grads = [g for g in grads if g is not None]
    if dtype is None:
        dtype = norm_dtype(grads)
    if not grads:
        return tf.zeros([0], dtype)
    flat = _flat_values(grads, dtype)
    squares = tf.stack(_squares(flat))
    return _unless_finite(squares, lambda: tf.sqrt(squares), lambda: _rescaled_norms(flat, squares))


def global_norm(grads: Sequence[Any], dtype: tf.DType | None = None) -> tf.Tensor:
    """The norm of all `grads` together, as if concatenated: a scalar of `dtype`.

    `dtype` is by default `norm_dtype(grads)`. Inf or NaN in any gradient makes it inf or NaN.
    """
    grads = [g for g in grads if g is not None]
    if dtype is None:
        dtype = norm_dtype(grads)
    if not grads:
        return tf.zeros([], dtype)
    flat = _flat_values(grads, dtype)
    squares = _squares(flat)
    total = tf.add_n(squares)

    def careful() -> tf.Tensor:
        each = _rescaled_norms(flat, tf.stack(squares))
        largest = tf.reduce_max(each)
        # Norms finite each but too large to square: summed in units of the largest.
        rescaled = largest * tf.sqrt(tf.reduce_sum(tf.square(each / largest)))
        return tf.where(tf.reduce_all(tf.math.is_finite(each)), rescaled, tf.reduce_sum(each))

    return _unless_finite(total, lambda: tf.sqrt(total), careful)


def quick_global_norm(grads: Sequence[Any]) -> tf.Tensor:
    """The global norm of `grads` as a float32 scalar, in one `L2Loss` per gradient and a sum:
    `global_norm` without its care for squares that overflow (a norm above about 1.8e19 reads
    inf here), for a number that is only reported (`StepMetrics`). An `IndexedSlices`
    gradient is measured as the dense gradient it adds up to; None gradients count nothing.
    """
    present = [g for g in grads if g is not None]
    if not present:
        return tf.constant(0.0)
    squares = []
    for grad in present:
        if isinstance(grad, tf.IndexedSlices):
            grad = summed_rows(grad).values  # a repeated row counts once, summed
        if grad.dtype != tf.float32:
            grad = tf.cast(grad, tf.float32)
        squares.append(tf.nn.l2_loss(grad))
    return tf.sqrt(2.0 * tf.add_n(squares))


def scale(grad: Any, factor: Any, divide: bool = False) -> Any:
    """`grad * factor` (or `grad / factor`), computed in float32 at least and cast back.

    For a dense or `IndexedSlices` gradient, or None. A 16-bit gradient is multiplied in
    float32, so that a factor outside its range (a loss scale of 65536 in float16) or too
    small for it does not turn the gradient into zeros or infs on its way.
    """

    def scaled(t: tf.Tensor) -> tf.Tensor:
        wide = wide_dtype(t.dtype)
        f = as_tensor(factor, wide)
        result = tf.cast(t, wide) / f if divide else tf.cast(t, wide) * f
        return tf.cast(result, t.dtype)

    return map_values(grad, scaled)


def every_element_finite(grad: Any) -> tf.Tensor:
    """A boolean scalar: whether every element of `grad` (both parts of a complex one) is
    finite; exact, at the cost of a test of every element (see `all_finite` for the cheap
    check of many)."""
    v = values(grad)
    if v.dtype.is_complex:
        v = tf.stack([tf.math.real(v), tf.math.imag(v)])
    return tf.reduce_all(tf.math.is_finite(v))


def all_finite(tensors: Sequence[Any]) -> tf.Tensor:
    """A boolean scalar: whether every element of `tensors` (None left out) is finite.

    One plain sum per tensor, in float32 at least (float64 for float64 tensors), and one sum
    of those: inf or NaN anywhere makes it inf or NaN. A sum reads each value once (a 16-bit
    one through a float32 copy), at about half the cost of an `is_finite` test of every
    element; unlike a sum of squares, it overflows only when the values add up beyond the
    type's range (about 3.4e38 in float32), so large finite gradients are not taken for inf.
    """
    sums = []
    for t in tensors:
        if t is not None:
            v = values(t)
            if v.dtype.is_complex:
                # Both parts: inf or NaN in either makes the value not finite.
                sums.append(tf.reduce_sum(tf.math.real(v)) + tf.reduce_sum(tf.math.imag(v)))
            else:
                sums.append(tf.reduce_sum(tf.cast(v, wide_dtype(v.dtype))))
    if not sums:
        return tf.constant(True)
    dtype = norm_dtype(sums)
    return tf.math.is_finite(tf.add_n([tf.cast(s, dtype) for s in sums]))
