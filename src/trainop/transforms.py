"""Gradient transforms: pure functions on lists of (gradient, variable) pairs.

Each transform comes as a function that maps `[(grad, var), ...]` to a new list, and as a
`*_fn` factory that returns a `transform_grads_fn` for `create_train_op`. `IndexedSlices`
gradients keep their indices; `None` gradients pass through untouched. No transform knows about
optimizers, execution modes or summaries.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from trainop import _gradients, _variables

GradsAndVars = list[tuple[Any, Any]]
TransformGradsFn = Callable[[GradsAndVars], GradsAndVars]


def _map_gradients(
    grads_and_vars: Sequence[tuple[Any, Any]], fn: Callable[[tf.Tensor], tf.Tensor]
) -> GradsAndVars:
    """Applies `fn` to every gradient's values; None gradients pass through."""
    return [(_gradients.map_values(g, fn), v) for g, v in grads_and_vars]


def _map_rows(
    grads_and_vars: Sequence[tuple[Any, Any]], fn: Callable[[tf.Tensor], tf.Tensor]
) -> GradsAndVars:
    """Applies `fn` to every gradient's values, the slices of a repeated row summed first."""
    return [(_gradients.map_rows(g, fn) if g is not None else None, v) for g, v in grads_and_vars]


def _static_number(value: Any) -> Any:
    """`value` as a Python or NumPy number if it is known before the step runs, else None."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, (tf.Tensor, tf.Variable)):
        value = tf.get_static_value(value) if isinstance(value, tf.Tensor) else None
        if value is None or np.ndim(value) != 0:
            return None
        return value.item()
    return value


def _check_number(name: str, value: Any, *, sign: str = "", finite: bool = False) -> None:
    """Raises unless `value` is a number, not NaN, of the `sign` asked for.

    Args:
      name: the argument's name, for the error.
      value: a number, or a tensor (whose value, unless known before the step runs, passes).
      sign: "positive" (> 0), "non-negative" (>= 0) or "" (any).
      finite: whether inf is refused.

    Raises:
      TypeError: if `value` is not a real number or a tensor.
      ValueError: if it is NaN, of the wrong sign, or infinite where `finite` is asked.
    """
    number = _static_number(value)
    if number is None and isinstance(value, (tf.Tensor, tf.Variable)):
        return
    if isinstance(number, (bool, np.bool_)) or not isinstance(number, numbers.Real):
        raise TypeError(f"`{name}` must be a number. Received: {name}={value!r:.200}")
    expected = " ".join(word for word in ("a", "finite" if finite else "", sign, "number") if word)
    wrong_sign = (sign == "positive" and number <= 0) or (sign == "non-negative" and number < 0)
    if math.isnan(number) or wrong_sign or (finite and math.isinf(number)):
        raise ValueError(f"`{name}` must be {expected}. Received: {name}={value!r}")


def _is_inf(value: Any) -> bool:
    number = _static_number(value)
    return isinstance(number, numbers.Real) and math.isinf(number) and number > 0


def _clip_scale(norm: tf.Tensor, max_norm: Any) -> tf.Tensor:
    """min(1, max_norm / norm), in `norm`'s type; NaN if `norm` is inf or NaN.

    Exactly 1 when no clipping is needed. A non-finite norm makes the gradients NaN, for the
    numerics guard to see, rather than silently zero.
    """
    max_norm = _gradients.as_tensor(max_norm, norm.dtype)
    tiny = tf.constant(1e-30, norm.dtype)
    return tf.where(
        tf.math.is_finite(norm),
        tf.minimum(tf.ones_like(norm), max_norm / tf.maximum(norm, tiny)),
        tf.fill(tf.shape(norm), tf.constant(float("nan"), norm.dtype)),
    )


def clip_gradient_norms(
    gradients_to_variables: Sequence[tuple[Any, Any]], max_norm: float
) -> GradsAndVars:
    """Clips each gradient to a norm of at most `max_norm`.

    Each gradient is clipped on its own, as TF-Slim's and TF-Agents' function of the same name
    does, with three differences (see `trainop._gradients`): the norm is taken in float32 at
    least, so a float16 gradient is measured without overflow, and the clipped gradient keeps
    its own dtype; an `IndexedSlices` gradient is measured by its rows summed, as the dense
    gradient it adds up to (the peers measure its slices); `max_norm=inf` returns the gradients
    unchanged. A gradient holding inf or NaN comes back NaN, for the numerics guard to see.

    Args:
      gradients_to_variables: a list of (gradient, variable) pairs; a gradient is a dense
        tensor, an `IndexedSlices` or None.
      max_norm: the largest L2 norm a gradient may keep: a positive number, inf, or a scalar
        tensor (one whose value is not known before the step runs is not checked).

    Returns:
      A new list of (gradient, variable) pairs, in the same order: each gradient scaled by
      `min(1, max_norm / norm)`, of its own dtype and kind; None gradients stay None.

    Raises:
      ValueError: if `max_norm` is not positive, or NaN.
      TypeError: if `max_norm` is not a number.

    Example:
      >>> import tensorflow as tf, trainop
      >>> v = tf.Variable(0.0)
      >>> [(g, _)] = trainop.clip_gradient_norms([(tf.constant(4.0), v)], 3.0)
      >>> float(g)
      3.0
    """
    _check_number("max_norm", max_norm, sign="positive")
    pairs = list(gradients_to_variables)
    present = [g for g, _ in pairs if g is not None]
    if _is_inf(max_norm) or not present:
        return pairs
    scales = iter(tf.unstack(_clip_scale(_gradients.norms(present), max_norm)))
    return [(None if g is None else _gradients.scale(g, next(scales)), v) for g, v in pairs]


def clip_gradient_norms_fn(max_norm: float) -> TransformGradsFn:
    """Returns a `transform_grads_fn` that applies `clip_gradient_norms(..., max_norm)`.

    Each gradient is clipped on its own; to bound all of them together, use
    `clip_by_global_norm_fn`.

    Args:
      max_norm: the largest L2 norm a gradient may keep, as for `clip_gradient_norms`.

    Returns:
      A callable mapping a list of (gradient, variable) pairs to the clipped list, for
      `create_train_op`'s `transform_grads_fn` or `chain`.

    Raises:
      ValueError: if `max_norm` is not positive, or NaN (raised here, not at the first step).
      TypeError: if `max_norm` is not a number.

    Example:
      >>> import tensorflow as tf, trainop
      >>> clip = trainop.clip_gradient_norms_fn(3.0)
      >>> [(g, _)] = clip([(tf.constant(-4.0), tf.Variable(0.0))])
      >>> float(g)
      -3.0
    """
    _check_number("max_norm", max_norm, sign="positive")

    def clip_norms(gradients_to_variables: GradsAndVars) -> GradsAndVars:
        return clip_gradient_norms(gradients_to_variables, max_norm)

    return clip_norms


def _multiplier_items(gradient_multipliers: Any) -> list[tuple[Any, Any]]:
    """Returns `gradient_multipliers` as (variable or name, multiplier) pairs, checked."""
    items = _variables.keyed_items(gradient_multipliers, "gradient_multipliers", "multipliers")
    for key, multiplier in items:
        # A multiplier may be negative (gradient ascent), not NaN or infinite.
        _check_multiplier(key, multiplier)
    return items


def _static_array(value: Any) -> np.ndarray | None:
    """`value` as a NumPy array if it is known before the step runs (a number, an array, a
    constant tensor), else None (a variable, a tensor computed by the step)."""
    if isinstance(value, tf.Variable):
        return None
    if isinstance(value, tf.Tensor):
        value = tf.get_static_value(value)
        return None if value is None else np.asarray(value)
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        return None
    return array if array.dtype.kind in "iuf" else None


def _known_zero(multiplier: Any) -> bool:
    array = _static_array(multiplier)
    return array is not None and array.size > 0 and bool(np.all(array == 0))


def _check_multiplier(key: Any, multiplier: Any) -> None:
    if isinstance(multiplier, (tf.Tensor, tf.Variable)):
        if not (multiplier.dtype.is_floating or multiplier.dtype.is_integer):
            raise TypeError(
                "`gradient_multipliers` values must be numbers or real tensors. "
                f"Received for {key!r}: {multiplier!r:.200}"
            )
        array = _static_array(multiplier)
    else:
        array = _static_array(multiplier)
        if array is None:
            raise TypeError(
                "`gradient_multipliers` values must be numbers, arrays or tensors. "
                f"Received for {key!r}: {multiplier!r:.200}"
            )
    if array is not None and not np.all(np.isfinite(array)):
        raise ValueError(
            "`gradient_multipliers` values must be finite numbers. "
            f"Received for {key!r}: {multiplier!r:.200}"
        )


def multiply_gradients(
    grads_and_vars: Sequence[tuple[Any, Any]], gradient_multipliers: Any
) -> GradsAndVars:
    """Scales the gradients of chosen variables.

    As TF-Slim's `multiply_gradients`: a variable is chosen by its name (`'conv0/weights'`, the
    name without `:0`; a Keras 3 variable's `path`, such as `'sequential/dense/kernel'`, which
    begins with the model's name) or by the variable itself; and, beyond TF-Slim, by a compiled
    regular expression that matches the whole name (`re.compile(r'.*/bias')`). The first key
    that matches a variable gives its multiplier; a key that matches nothing is ignored, as in
    TF-Slim. A multiplier known to be zero when the transform is made (a Python or NumPy
    number, an array of zeros, a constant tensor) freezes the variable: its gradient becomes
    None, so that no optimizer moves it (with a zero gradient, momentum, Adam's moments and
    weight decay still would). A multiplier that becomes zero only when the step runs (a
    `tf.Variable`) multiplies the gradient by zero, with those effects. TensorFlow 2
    variables are not hashable: key a dict by `v.ref()`, or pass a list of (variable or name,
    multiplier) pairs instead of a dict.

    The product is computed in float32 at least and cast back to the gradient's dtype; an
    `IndexedSlices` gradient keeps its indices (its values are multiplied).

    Args:
      grads_and_vars: a list or tuple of (gradient, variable) pairs.
      gradient_multipliers: a dict, or a list of pairs, from variables (or `v.ref()`),
        variable names or compiled regular expressions over names, to the multiplier of their
        gradients: a finite number (negative for gradient ascent), or an array, tensor or
        `tf.Variable` that broadcasts against the gradient (against an `IndexedSlices`
        gradient's values).

    Returns:
      A new list of (gradient, variable) pairs, in the same order: chosen gradients multiplied,
      frozen ones None, the others unchanged.

    Raises:
      ValueError: if `grads_and_vars` is not a list or tuple, `gradient_multipliers` is empty
        or not a dict or list, a multiplier known now is inf or NaN, or a chosen variable has
        no gradient (ValueError, as in TF-Slim).
      TypeError: if a key of `gradient_multipliers` is neither a variable nor a name nor a
        compiled regular expression, or a multiplier is not a real number, array or tensor.

    Example:
      >>> import tensorflow as tf, trainop
      >>> v = tf.Variable(0.0, name='conv0/weights')
      >>> [(g, _)] = trainop.multiply_gradients([(tf.constant(2.0), v)], {'conv0/weights': 3.0})
      >>> float(g)
      6.0
    """
    if not isinstance(grads_and_vars, (list, tuple)):
        raise ValueError(  # ValueError, as TF-Slim raises.
            "`grads_and_vars` must be a list of (gradient, variable) pairs. "
            f"Received: {type(grads_and_vars).__name__}"
        )
    items = _multiplier_items(gradient_multipliers)

    result = []
    for grad, var in grads_and_vars:
        multiplier = _variables.value_for(var, items)
        if multiplier is not None:
            if grad is None:
                raise ValueError(
                    "`gradient_multipliers` names a variable that has no gradient: "
                    f"{_variables.variable_name(var)}"
                )
            # Known to be zero: frozen, no gradient at all, so that no optimizer moves it (a
            # zero gradient would still let momentum, Adam's moments or weight decay move it).
            grad = None if _known_zero(multiplier) else _gradients.scale(grad, multiplier)
        result.append((grad, var))
    return result


def multiply_gradients_fn(gradient_multipliers: Any) -> TransformGradsFn:
    """Returns a `transform_grads_fn` that applies `multiply_gradients(..., gradient_multipliers)`.

    The multipliers are checked here, so that a bad one fails before the first step; a zero
    multiplier freezes its variables, as in `multiply_gradients`.

    Args:
      gradient_multipliers: a dict, or a list of pairs, from variables (or `v.ref()`),
        variable names or compiled regular expressions over names to multipliers, as for
        `multiply_gradients`.

    Returns:
      A callable mapping a list of (gradient, variable) pairs to the multiplied list, for
      `create_train_op`'s `transform_grads_fn` or `chain`.

    Raises:
      ValueError: if `gradient_multipliers` is empty, not a dict or list, or holds an inf or
        NaN multiplier. The returned callable raises as `multiply_gradients` does (a chosen
        variable without gradient: ValueError).
      TypeError: if a key is neither a variable nor a name nor a compiled regular expression,
        or a multiplier is not a real number, array or tensor.

    Example:
      >>> import tensorflow as tf, trainop
      >>> v = tf.Variable(0.0, name='frozen')
      >>> freeze = trainop.multiply_gradients_fn({'frozen': 0.0})
      >>> freeze([(tf.constant(2.0), v)])[0][0] is None
      True
    """
    _multiplier_items(gradient_multipliers)  # Bad multipliers fail here, not at the first step.

    def multiply(grads_and_vars: GradsAndVars) -> GradsAndVars:
        return multiply_gradients(grads_and_vars, gradient_multipliers)

    return multiply


def _check_value_bounds(clip_value_min: Any, clip_value_max: Any) -> None:
    _check_number("clip_value_min", clip_value_min)
    _check_number("clip_value_max", clip_value_max)
    low, high = _static_number(clip_value_min), _static_number(clip_value_max)
    if low is not None and high is not None and low > high:
        raise ValueError(
            "`clip_value_min` must not exceed `clip_value_max`. Received: "
            f"clip_value_min={clip_value_min}, clip_value_max={clip_value_max}"
        )


def clip_by_value(
    grads_and_vars: Sequence[tuple[Any, Any]], clip_value_min: float, clip_value_max: float
) -> GradsAndVars:
    """Clips every gradient element into [`clip_value_min`, `clip_value_max`].

    As `tf.clip_by_value` on each gradient (Keras's optimizer argument `clipvalue` clips the
    same way, symmetrically). An `IndexedSlices` gradient is clipped after the slices of a
    repeated row are summed, as its dense gradient would be, and stays sparse. Infinite bounds
    clip nothing on their side; a NaN element stays NaN, for the numerics guard to see.

    Args:
      grads_and_vars: a list of (gradient, variable) pairs; None gradients pass through.
      clip_value_min: the lower bound: a number, -inf, or a scalar tensor.
      clip_value_max: the upper bound: a number, inf, or a scalar tensor; not below
        `clip_value_min`.

    Returns:
      A new list of (gradient, variable) pairs, in the same order, each gradient clipped in
      its own dtype.

    Raises:
      ValueError: if a bound is NaN or `clip_value_min > clip_value_max`.
      TypeError: if a bound is not a number, or a gradient is complex (complex values have no
        order: clip them by norm).

    Example:
      >>> import tensorflow as tf, trainop
      >>> [(g, _)] = trainop.clip_by_value([(tf.constant([-3.0, 0.5, 9.0]), None)], -1.0, 1.0)
      >>> g.numpy().tolist()
      [-1.0, 0.5, 1.0]
    """
    _check_value_bounds(clip_value_min, clip_value_max)

    def clip(t: tf.Tensor) -> tf.Tensor:
        if t.dtype.is_complex:
            raise TypeError(
                "`clip_by_value` cannot clip a complex gradient: complex values have no order. "
                "Clip complex gradients by their norm (clip_by_global_norm, clip_gradient_norms)."
            )
        low = _gradients.as_tensor(clip_value_min, t.dtype)
        high = _gradients.as_tensor(clip_value_max, t.dtype)
        # A NaN stays NaN, for the numerics guard to see: XLA's clamp would make it `low`.
        return tf.where(tf.math.is_nan(t), t, tf.clip_by_value(t, low, high))

    return _map_rows(grads_and_vars, clip)


def clip_by_value_fn(clip_value_min: float, clip_value_max: float) -> TransformGradsFn:
    """Returns a `transform_grads_fn` that applies `clip_by_value`.

    Args:
      clip_value_min: the lower bound, as for `clip_by_value`.
      clip_value_max: the upper bound, as for `clip_by_value`.

    Returns:
      A callable mapping a list of (gradient, variable) pairs to the clipped list, for
      `create_train_op`'s `transform_grads_fn` or `chain`.

    Raises:
      ValueError: if a bound is NaN or `clip_value_min > clip_value_max` (raised here, not at
        the first step).
      TypeError: if a bound is not a number. The returned callable raises a TypeError for a
        complex gradient.

    Example:
      >>> import tensorflow as tf, trainop
      >>> clip = trainop.clip_by_value_fn(-1.0, 1.0)
      >>> [(g, _)] = clip([(tf.constant([-3.0, 0.5]), tf.Variable([0.0, 0.0]))])
      >>> g.numpy().tolist()
      [-1.0, 0.5]
    """
    _check_value_bounds(clip_value_min, clip_value_max)

    def clip(grads_and_vars: GradsAndVars) -> GradsAndVars:
        return clip_by_value(grads_and_vars, clip_value_min, clip_value_max)

    return clip


def global_norm(grads_and_vars: Sequence[tuple[Any, Any]]) -> tf.Tensor:
    """The norm of all gradients together, as if concatenated (None gradients left out).

    As `tf.linalg.global_norm` and optax's `global_norm`, taken in float32, or float64 if a
    gradient is float64 (or complex128), whatever the gradients' own float types (mixed ones
    too), without overflow where the squares would leave that range; a complex gradient is
    measured by its moduli, and an `IndexedSlices` gradient by its rows summed. Inf or NaN in
    a gradient makes the norm inf or NaN.

    Args:
      grads_and_vars: a list of (gradient, variable) pairs; the variables are not read.

    Returns:
      A scalar `tf.Tensor` of dtype float32 (float64 as said above): the L2 norm, 0 when
      there is no gradient.

    Example:
      >>> import tensorflow as tf, trainop
      >>> pairs = [(tf.constant([3.0], tf.float16), None), (tf.constant([4.0]), None)]
      >>> float(trainop.global_norm(pairs))
      5.0
    """
    return _gradients.global_norm([g for g, _ in grads_and_vars])


def clip_by_global_norm(grads_and_vars: Sequence[tuple[Any, Any]], max_norm: float) -> GradsAndVars:
    """Scales all gradients together so that their global norm is at most `max_norm`.

    Gradients whose global norm is already within the bound, or `max_norm=inf`, are returned
    exactly as they were. The norm is `global_norm` (float32 at least; repeated rows summed),
    and each gradient keeps its own dtype. An inf or NaN norm makes every gradient NaN, for
    the numerics guard to see, rather than silently zero. As `tf.clip_by_global_norm` and
    optax's `clip_by_global_norm` (the clipping of Pascanu et al., 2013, "On the difficulty
    of training recurrent neural networks").

    Args:
      grads_and_vars: a list of (gradient, variable) pairs; None gradients pass through.
      max_norm: the largest global L2 norm: a positive number, inf, or a scalar tensor.

    Returns:
      A new list of (gradient, variable) pairs, in the same order, every gradient multiplied
      by `min(1, max_norm / global_norm(grads_and_vars))`.

    Raises:
      ValueError: if `max_norm` is not positive, or NaN.
      TypeError: if `max_norm` is not a number.

    Example:
      >>> import tensorflow as tf, trainop
      >>> pairs = [(tf.constant([3.0]), None), (tf.constant([4.0]), None)]
      >>> [float(g[0]) for g, _ in trainop.clip_by_global_norm(pairs, 1.0)]
      [0.6000000238418579, 0.800000011920929]
    """
    _check_number("max_norm", max_norm, sign="positive")
    grads_and_vars = list(grads_and_vars)
    if _is_inf(max_norm):
        return grads_and_vars
    scale = _clip_scale(global_norm(grads_and_vars), max_norm)
    return [(_gradients.scale(g, scale), v) for g, v in grads_and_vars]


def clip_by_global_norm_fn(max_norm: float) -> TransformGradsFn:
    """Returns a `transform_grads_fn` that applies `clip_by_global_norm(..., max_norm)`.

    One bound on all gradients together, as `tf.clip_by_global_norm`, optax's
    `clip_by_global_norm` and Keras's optimizer argument `global_clipnorm`; TF-Agents' and
    TF-Slim's `clip_gradient_norms_fn` (here too) bounds each gradient on its own.

    Args:
      max_norm: the largest global L2 norm, as for `clip_by_global_norm`.

    Returns:
      A callable mapping a list of (gradient, variable) pairs to the clipped list, for
      `create_train_op`'s `transform_grads_fn` or `chain`.

    Raises:
      ValueError: if `max_norm` is not positive, or NaN (raised here, not at the first step).
      TypeError: if `max_norm` is not a number.

    Example:
      >>> import tensorflow as tf, trainop
      >>> clip = trainop.clip_by_global_norm_fn(1.0)
      >>> v = tf.Variable([0.0, 0.0])
      >>> [(g, _)] = clip([(tf.constant([3.0, 4.0]), v)])
      >>> [round(x, 6) for x in g.numpy().tolist()]
      [0.6, 0.8]
    """
    _check_number("max_norm", max_norm, sign="positive")

    def clip(grads_and_vars: GradsAndVars) -> GradsAndVars:
        return clip_by_global_norm(grads_and_vars, max_norm)

    return clip


def add_gradient_noise(
    grads_and_vars: Sequence[tuple[Any, Any]], stddev: Any, seed: int | None = None
) -> GradsAndVars:
    """Adds Gaussian noise of standard deviation `stddev` to every gradient element.

    The gradient noise of Neelakantan et al., 2015, "Adding gradient noise improves learning
    for very deep networks", at one standard deviation; `add_gradient_noise_fn` anneals it
    over the steps. The noise is drawn in the gradient's dtype, one draw per element at every
    step. An `IndexedSlices` gradient gets one draw per row it holds, after the slices of a
    repeated row are summed (a row looked up twice gets one draw, not two); the rows it does
    not hold get none, and it stays sparse.

    Args:
      grads_and_vars: a list of (gradient, variable) pairs; None gradients pass through.
      stddev: the noise's standard deviation, in the gradients' units: a finite non-negative
        number, or a scalar tensor (one whose value is not known before the step runs is not
        checked).
      seed: an operation seed, as `tf.random.normal`'s, from which each gradient gets its own
        (so that gradients of one shape get different noise); with it, the draws are the same
        from one run of the program to the next. None: random.

    Returns:
      A new list of (gradient, variable) pairs, in the same order, each gradient with noise
      added.

    Raises:
      ValueError: if `stddev` is negative, infinite or NaN.
      TypeError: if `stddev` is not a number or a tensor, or a gradient is not floating-point
        (an integer or complex gradient).

    Example:
      >>> import tensorflow as tf, trainop
      >>> v = tf.Variable([0.0, 0.0, 0.0])
      >>> [(g, _)] = trainop.add_gradient_noise([(tf.constant([1.0, 2.0, 3.0]), v)], 0.1, seed=7)
      >>> g.shape, g.dtype
      (TensorShape([3]), tf.float32)
    """
    _check_number("stddev", stddev, sign="non-negative", finite=True)
    result = []
    for index, (grad, var) in enumerate(grads_and_vars):
        if grad is not None:
            # A seed of its own per gradient: one seed for all would draw the same noise for
            # gradients of one shape. Each draw's op advances its state at every step.
            grad_seed = None if seed is None else _seed_for(seed, index)
            grad = _gradients.map_rows(
                grad, lambda t, grad_seed=grad_seed, var=var: t + _noise(t, stddev, grad_seed, var)
            )
        result.append((grad, var))
    return result


def _seed_for(seed: int, index: int) -> int:
    """A seed for the `index`-th gradient, different for each index, fixed by `seed`."""
    return (int(seed) * 1_000_003 + index) % (2**31 - 1)


def _noise(t: tf.Tensor, stddev: Any, seed: int | None, var: Any) -> tf.Tensor:
    if not t.dtype.is_floating:
        raise TypeError(
            "`add_gradient_noise` draws real Gaussian noise and cannot add it to a gradient of "
            f"type {t.dtype.name} (variable {_name_or_none(var)})."
        )
    return tf.random.normal(tf.shape(t), stddev=tf.cast(stddev, t.dtype), dtype=t.dtype, seed=seed)


def _name_or_none(var: Any) -> str:
    return _variables.variable_name(var) if var is not None else "unnamed"


def add_gradient_noise_fn(
    stddev: float, decay_exponent: float = 0.55, step: Any = None, seed: int | None = None
) -> TransformGradsFn:
    """Returns a `transform_grads_fn` adding Gaussian noise annealed by the global step.

    At step t the noise has standard deviation `stddev / (1 + t) ** decay_exponent`, computed
    in float32, t being read before the step's update (so the first step, at t = 0, has
    `stddev`). Neelakantan et al., 2015, "Adding gradient noise improves learning for very deep
    networks", anneal the *variance*, `eta / (1 + t) ** gamma` with gamma = 0.55: the paper's
    schedule is `stddev=sqrt(eta)` with `decay_exponent=gamma / 2`; the default 0.55 here
    anneals the standard deviation at that rate, the variance twice as fast. The step is
    `step` or, by default, the program's global step (`tf.compat.v1.train.get_global_step()`)
    when the transform runs; with neither, the noise does not decay. A train op given its own
    `global_step` variable should pass it as `step` too.

    Args:
      stddev: the noise's standard deviation at step 0: a finite non-negative number.
      decay_exponent: the exponent of the annealing: a finite non-negative number; 0 keeps
        the noise constant.
      step: the integer variable (or tensor) holding t, or None for the global step.
      seed: an operation seed, as for `add_gradient_noise`.

    Returns:
      A callable mapping a list of (gradient, variable) pairs to the list with noise added,
      for `create_train_op`'s `transform_grads_fn` or `chain`.

    Raises:
      ValueError: if `stddev` or `decay_exponent` is negative, infinite or NaN (raised here,
        not at the first step).
      TypeError: if either is not a number. The returned callable raises a TypeError for a
        gradient that is not floating-point.

    Example:
      >>> import tensorflow as tf, trainop
      >>> noisy = trainop.add_gradient_noise_fn(0.0)
      >>> [(g, _)] = noisy([(tf.constant([1.0]), None)])
      >>> g.numpy().tolist()
      [1.0]
    """
    _check_number("stddev", stddev, sign="non-negative", finite=True)
    _check_number("decay_exponent", decay_exponent, sign="non-negative", finite=True)

    def add_noise(grads_and_vars: GradsAndVars) -> GradsAndVars:
        current = step if step is not None else tf.compat.v1.train.get_global_step()
        scale = stddev
        if current is not None:
            t = tf.cast(tf.convert_to_tensor(_variables.as_tf_variable(current)), tf.float32)
            scale = stddev / (1.0 + t) ** decay_exponent
        return add_gradient_noise(grads_and_vars, scale, seed)

    return add_noise


def _excluded(exclude: Any, argument: str = "exclude") -> Callable[[Any], bool]:
    """Whether a variable is left out by `exclude`: None (none is), or a variable, a name or a
    compiled regular expression over names, or a list of them, as `multiply_gradients` keys."""
    if exclude is None:
        return lambda var: False
    single = isinstance(exclude, (str, re.Pattern)) or _variables.is_variable(exclude)
    if not single and not isinstance(exclude, (list, tuple, set)):
        exclude = [exclude]  # refused below, by name
    keys = [_variables.as_variable_or_name(k) for k in ([exclude] if single else list(exclude))]
    for key in keys:
        if not isinstance(key, (str, re.Pattern)) and not _variables.is_variable(key):
            raise TypeError(
                f"`{argument}` must hold variables, variable names or compiled regular "
                f"expressions over names (`re.compile(r'.*/logits/.*')`). Received: {key!r:.200}"
            )
    items = [(key, True) for key in keys]
    return lambda var: _variables.value_for(var, items) is not None


def _unit_axes(shape: tf.TensorShape, transform: str) -> tuple[int, ...] | None:
    """The axes a unit's norm is taken over, as optax's `unitwise_norm` takes it: None (each
    element on its own) for a scalar or a vector (what is left once axes of size 1 are
    dropped), the input axis 0 of a dense kernel (rank 2 or 3), the spatial and input axes
    (0, 1, 2) of a convolution kernel (rank 4).

    Raises:
      ValueError: for a variable of unknown rank, or of rank above 4.
    """
    if shape.rank is None:
        raise ValueError(f"`{transform}` needs variables of known rank. Received shape {shape}")
    if sum(1 for d in shape if d != 1) <= 1:
        return None
    if shape.rank in (2, 3):
        return (0,)
    if shape.rank == 4:
        return (0, 1, 2)
    raise ValueError(
        f"`{transform}` measures units of variables of rank 1 to 4 (vectors, dense and "
        f"convolution kernels); exclude this one (`exclude=`). Received shape {shape}"
    )


def _unit_norms(t: tf.Tensor, axes: tuple[int, ...] | None) -> tf.Tensor:
    if axes is None:
        return tf.abs(t)
    # One kernel (EuclideanNorm), where square, sum and square root would be three.
    return tf.math.reduce_euclidean_norm(t, axis=axes, keepdims=True)


def _check_real(grads_and_vars: Sequence[tuple[Any, Any]], transform: str) -> None:
    for g, v in grads_and_vars:
        if g is not None and _gradients.values(g).dtype.is_complex:
            raise TypeError(
                f"`{transform}` cannot measure a complex gradient: "
                f"{_variables.variable_name(v)} is {_gradients.values(g).dtype.name}."
            )


def adaptive_gradient_clipping(
    grads_and_vars: Sequence[tuple[Any, Any]],
    clipping: float = 0.01,
    eps: float = 1e-3,
    exclude: Any = None,
) -> GradsAndVars:
    """Adaptive gradient clipping (AGC): clips each unit's gradient relative to its weight.

    From the NFNets paper (Brock et al., 2021, "High-Performance Large-Scale Image Recognition
    Without Normalization"), as optax's `adaptive_grad_clip` computes it: for each unit (see
    below), where `||G|| / max(||W||, eps) > clipping`, the gradient is scaled to norm
    `clipping * max(||W||, eps)`. A unit is an output unit of a dense kernel (its column: the
    norm over axis 0 of a rank-2 or rank-3 kernel), of a convolution kernel (the norm over the
    spatial and input axes 0, 1, 2 of a rank-4 HWIO kernel), and each element of a vector or
    scalar (a bias: `|g|` against `|w|`). The paper leaves the last (classifier) layer out:
    pass its variables in `exclude`.

    An `IndexedSlices` gradient (an embedding table's) keeps its rows: its units (the table's
    columns) are measured on the rows it names, summed (the dense gradient's other rows are
    zero), against the whole table. Norms are taken in float32 at least; each gradient keeps
    its dtype. A unit holding inf or NaN comes back holding NaN, for the numerics guard to see.

    Args:
      grads_and_vars: a list of (gradient, variable) pairs; a gradient is a dense tensor, an
        `IndexedSlices` or None.
      clipping: the largest ratio of a unit's gradient norm to its weight norm, a positive
        number (0.01 in the paper for a batch size of 4096; larger for smaller batches).
      eps: the weight norm below which a unit is measured as if it were `eps`, so that units
        at zero (a bias at initialization) can move; a positive number.
      exclude: variables left as they are: a variable, a name (a Keras 3 variable's path such
        as 'sequential/logits/kernel'), a compiled regular expression over names, or a list
        of them.

    Returns:
      A new list of (gradient, variable) pairs, in the same order; None gradients stay None.

    Raises:
      ValueError: if `clipping` or `eps` is not positive or is NaN, or a variable to clip has
        a rank above 4 (exclude it).
      TypeError: if `clipping` or `eps` is not a number, an `exclude` entry is not a variable,
        a name or a pattern, or a gradient to clip is complex.

    Example:
      >>> import tensorflow as tf, trainop
      >>> w = tf.Variable([[3.0], [4.0]])  # one unit, of weight norm 5
      >>> [(g, _)] = trainop.adaptive_gradient_clipping([(tf.constant([[0.6], [0.8]]), w)], 0.1)
      >>> [round(x, 6) for x in g.numpy().ravel().tolist()]  # norm 1 clipped to 0.1 * 5
      [0.3, 0.4]
    """
    _check_number("clipping", clipping, sign="positive")
    _check_number("eps", eps, sign="positive")
    excluded = _excluded(exclude)
    pairs = list(grads_and_vars)
    chosen = [(g, v) for g, v in pairs if g is not None and not excluded(v)]
    _check_real(chosen, "adaptive_gradient_clipping")
    return [
        (g if g is None or excluded(v) else _adaptive_clip(g, v, clipping, eps), v)
        for g, v in pairs
    ]


def _adaptive_clip(grad: Any, var: Any, clipping: Any, eps: Any) -> Any:
    axes = _unit_axes(var.shape, "adaptive_gradient_clipping")
    sparse = isinstance(grad, tf.IndexedSlices)
    if sparse:
        grad = _gradients.summed_rows(grad)
    values = _gradients.values(grad)
    dtype = _gradients.wide_dtype(values.dtype)
    g = tf.cast(values, dtype)
    w = tf.cast(tf.convert_to_tensor(_variables.as_tf_variable(var)), dtype)
    if sparse and axes is None:
        w = tf.gather(tf.reshape(w, [-1]), grad.indices)  # a vector's rows: its elements
    elif not sparse and axes is None:
        w = tf.reshape(w, tf.shape(g))
    g_norm = _unit_norms(g, axes)
    w_norm = _unit_norms(w, axes)
    max_norm = tf.maximum(w_norm, _gradients.as_tensor(eps, dtype)) * _gradients.as_tensor(
        clipping, dtype
    )
    # One scale per unit, then one multiply: max_norm / max(g_norm, max_norm) is exactly 1
    # where the unit is within its bound, else max_norm / g_norm. (max_norm is positive, as
    # eps and clipping are, unless it underflows: the floor keeps 0 / 0 out.)
    floor = tf.maximum(max_norm, tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype))
    scale = max_norm / tf.maximum(g_norm, floor)
    clipped = tf.cast(g * scale, values.dtype)
    if sparse:
        return tf.IndexedSlices(clipped, grad.indices, grad.dense_shape)
    return clipped


def adaptive_gradient_clipping_fn(
    clipping: float = 0.01, eps: float = 1e-3, exclude: Any = None
) -> TransformGradsFn:
    """Returns a `transform_grads_fn` that applies `adaptive_gradient_clipping`.

    Args:
      clipping: as for `adaptive_gradient_clipping`.
      eps: as for `adaptive_gradient_clipping`.
      exclude: as for `adaptive_gradient_clipping`: the last layer, in the paper.

    Returns:
      A callable mapping a list of (gradient, variable) pairs to the clipped list, for
      `create_train_op`'s `transform_grads_fn` or `chain`.

    Raises:
      ValueError, TypeError: for bad `clipping`, `eps` or `exclude`, raised here.

    Example:
      >>> import re, trainop
      >>> agc = trainop.adaptive_gradient_clipping_fn(0.01, exclude=re.compile(r".*logits.*"))
    """
    _check_number("clipping", clipping, sign="positive")
    _check_number("eps", eps, sign="positive")
    _excluded(exclude)

    def clip(grads_and_vars: GradsAndVars) -> GradsAndVars:
        return adaptive_gradient_clipping(grads_and_vars, clipping, eps, exclude)

    return clip


def gradient_centralization(
    grads_and_vars: Sequence[tuple[Any, Any]], exclude: Any = None
) -> GradsAndVars:
    """Gradient centralization: each output unit's gradient made to sum to zero.

    From Yong et al., 2020 ("Gradient Centralization: A New Optimization Technique for Deep
    Neural Networks"): the gradient of a kernel of rank 2 or more has, for each output unit
    (the last axis, as Keras lays kernels out), its mean over the other axes subtracted.
    Vectors and scalars (biases, normalization scales) are left as they are. An
    `IndexedSlices` gradient (an embedding table's) becomes the dense gradient it adds up to,
    centralized: every row of the table then moves. Exclude such a table to keep it sparse.
    The mean is taken in float32 at least; each gradient keeps its dtype.

    Args:
      grads_and_vars: a list of (gradient, variable) pairs; a gradient is a dense tensor, an
        `IndexedSlices` or None.
      exclude: variables left as they are, as for `adaptive_gradient_clipping`.

    Returns:
      A new list of (gradient, variable) pairs, in the same order; None gradients stay None.

    Raises:
      TypeError: if an `exclude` entry is not a variable, a name or a pattern.

    Example:
      >>> import tensorflow as tf, trainop
      >>> w = tf.Variable(tf.zeros([2, 1]))
      >>> [(g, _)] = trainop.gradient_centralization([(tf.constant([[1.0], [3.0]]), w)])
      >>> g.numpy().ravel().tolist()
      [-1.0, 1.0]
    """
    excluded = _excluded(exclude)
    return [
        (g if g is None or excluded(v) or v.shape.rank in (0, 1) else _centralized(g), v)
        for g, v in grads_and_vars
    ]


def _centralized(grad: Any) -> tf.Tensor:
    values = tf.convert_to_tensor(grad)  # an IndexedSlices: the dense gradient
    rank = values.shape.rank
    if rank is None or rank < 2:
        return values
    wide = tf.cast(values, _gradients.wide_dtype(values.dtype))
    mean = tf.reduce_mean(wide, axis=list(range(rank - 1)), keepdims=True)
    return tf.cast(wide - mean, values.dtype)


def gradient_centralization_fn(exclude: Any = None) -> TransformGradsFn:
    """Returns a `transform_grads_fn` that applies `gradient_centralization`.

    Args:
      exclude: as for `gradient_centralization`.

    Returns:
      A callable mapping a list of (gradient, variable) pairs to the centralized list, for
      `create_train_op`'s `transform_grads_fn` or `chain`.

    Raises:
      TypeError: for a bad `exclude` entry, raised here.

    Example:
      >>> import trainop
      >>> centralize = trainop.gradient_centralization_fn()
    """
    _excluded(exclude)

    def centralize(grads_and_vars: GradsAndVars) -> GradsAndVars:
        return gradient_centralization(grads_and_vars, exclude)

    return centralize


def chain(*transforms: TransformGradsFn) -> TransformGradsFn:
    """Returns a `transform_grads_fn` that applies `transforms` in order, left to right.

    As optax's `chain`. `chain(clip_by_global_norm_fn(1.0), multiply_gradients_fn({...}))`
    clips first, then scales: the scaled gradients may exceed the bound. Put the clip last to
    bound what the optimizer sees.

    Args:
      *transforms: `transform_grads_fn` callables, each mapping a list of (gradient,
        variable) pairs to a new one; none at all gives the identity.

    Returns:
      A callable that passes the list of (gradient, variable) pairs through every transform
      and returns the last one's result, for `create_train_op`'s `transform_grads_fn`.

    Raises:
      TypeError: if a transform is not callable.

    Example:
      >>> import re, tensorflow as tf, trainop
      >>> double = trainop.multiply_gradients_fn([(re.compile('.*'), 2.0)])
      >>> clip = trainop.clip_by_value_fn(-1.0, 1.0)
      >>> v = tf.Variable([0.0], name='v')
      >>> [(g, _)] = trainop.chain(clip, double)([(tf.constant([3.0]), v)])
      >>> float(g[0])  # clipped to 1, then doubled
      2.0
    """
    for transform in transforms:
        if not callable(transform):
            raise TypeError(
                f"`chain` takes transform_grads_fn callables. Received: {transform!r:.200}"
            )

    def chained(grads_and_vars: GradsAndVars) -> GradsAndVars:
        for transform in transforms:
            grads_and_vars = transform(grads_and_vars)
        return grads_and_vars

    return chained
