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
from collections.abc import Callable, Mapping, Sequence
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
      gradients_to_variables: a list of (gradient, variable) pairs.
      max_norm: the largest norm a gradient may keep: a positive number, inf, or a scalar
        tensor.

    Returns:
      The list of (clipped gradient, variable) pairs.

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

    Raises:
      ValueError, TypeError: as `clip_gradient_norms`, when called.

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


def _as_variable_or_name(key: Any) -> Any:
    # `tf.Variable.ref()` is how TensorFlow 2 makes a variable usable as a dict key.
    deref = getattr(key, "deref", None)
    return deref() if callable(deref) else key


def _multiplier_items(gradient_multipliers: Any) -> list[tuple[Any, Any]]:
    """Returns `gradient_multipliers` as (variable or name, multiplier) pairs, checked."""
    if isinstance(gradient_multipliers, Mapping):
        items = list(gradient_multipliers.items())
    elif isinstance(gradient_multipliers, (list, tuple)):
        items = [tuple(pair) for pair in gradient_multipliers]
    else:
        raise ValueError(  # ValueError, as TF-Slim raises.
            "`gradient_multipliers` must map variables or variable names to multipliers. "
            f"Received: gradient_multipliers={gradient_multipliers!r:.200}"
        )
    if not items:
        raise ValueError("`gradient_multipliers` is empty.")
    items = [(_as_variable_or_name(key), multiplier) for key, multiplier in items]
    for key, multiplier in items:
        # A multiplier may be negative (gradient ascent), not NaN or infinite.
        _check_multiplier(key, multiplier)
        if not isinstance(key, (str, re.Pattern)) and not _variables.is_variable(key):
            raise TypeError(
                "`gradient_multipliers` keys must be variables, variable references "
                "(`v.ref()`), variable names such as 'conv0/weights' or compiled regular "
                f"expressions over names (`re.compile(r'.*/bias')`). Received key: {key!r}"
            )
    return items


def _multiplier_for(var: Any, items: list[tuple[Any, Any]]) -> Any:
    """Finds `var`'s multiplier, keyed by the variable itself or by its name."""
    key = _variables.variable_key(var)
    name = _variables.variable_name(var)
    for candidate, multiplier in items:
        if isinstance(candidate, str):
            if candidate == name:
                return multiplier
        elif isinstance(candidate, re.Pattern):
            if candidate.fullmatch(name):
                return multiplier
        elif _variables.variable_key(candidate) == key:
            return multiplier
    return None


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

    Args:
      grads_and_vars: a list of (gradient, variable) pairs.
      gradient_multipliers: a dict, or a list of pairs, from variables or variable names to the
        number each gradient is multiplied by.

    Returns:
      The list of (gradient, variable) pairs, chosen gradients scaled.

    Raises:
      ValueError: if `grads_and_vars` is not a list, `gradient_multipliers` is empty or not a
        dict or list, or a chosen variable has no gradient (ValueError, as in TF-Slim).
      TypeError: if a key of `gradient_multipliers` is neither a variable nor a name.

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
        multiplier = _multiplier_for(var, items)
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

    An `IndexedSlices` gradient is clipped after the slices of a repeated row are summed, as
    its dense gradient would be. Infinite bounds clip nothing on their side.

    Raises:
      ValueError: if a bound is NaN or `clip_value_min > clip_value_max`.
      TypeError: if a bound is not a number.

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

    Raises:
      ValueError, TypeError: as `clip_by_value`, when called.
    """
    _check_value_bounds(clip_value_min, clip_value_max)

    def clip(grads_and_vars: GradsAndVars) -> GradsAndVars:
        return clip_by_value(grads_and_vars, clip_value_min, clip_value_max)

    return clip


def global_norm(grads_and_vars: Sequence[tuple[Any, Any]]) -> tf.Tensor:
    """The norm of all gradients together, as if concatenated (None gradients left out).

    Taken in float32, or float64 if a gradient is float64, whatever the gradients' own float
    types (mixed ones too); an `IndexedSlices` gradient is measured by its rows summed. Inf or
    NaN in a gradient makes the norm inf or NaN.

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
    optax's `clip_by_global_norm`.

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

    Raises:
      ValueError, TypeError: as `clip_by_global_norm`, when called.
    """
    _check_number("max_norm", max_norm, sign="positive")

    def clip(grads_and_vars: GradsAndVars) -> GradsAndVars:
        return clip_by_global_norm(grads_and_vars, max_norm)

    return clip


def add_gradient_noise(
    grads_and_vars: Sequence[tuple[Any, Any]], stddev: Any, seed: int | None = None
) -> GradsAndVars:
    """Adds Gaussian noise of standard deviation `stddev` to every gradient element.

    An `IndexedSlices` gradient gets one draw per row it holds, after the slices of a repeated
    row are summed (a row looked up twice gets one draw, not two); the rows it does not hold get
    none, and it stays sparse.

    Raises:
      ValueError: if `stddev` is negative, infinite or NaN.
      TypeError: if `stddev` is not a number or a tensor.
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

    At step t the noise has standard deviation `stddev / (1 + t) ** decay_exponent`
    (Neelakantan et al., 2015, "Adding gradient noise improves learning for very deep
    networks", use 0.55). The step is `step` (a variable) or, by default, the global step when
    the transform runs; with neither, the noise does not decay.

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


def chain(*transforms: TransformGradsFn) -> TransformGradsFn:
    """Returns a `transform_grads_fn` that applies `transforms` in order, left to right.

    `chain(clip_by_global_norm_fn(1.0), multiply_gradients_fn({...}))` clips first, then
    scales: the scaled gradients may exceed the bound. Put the clip last to bound what the
    optimizer sees.

    Example:
      >>> import tensorflow as tf, trainop
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
