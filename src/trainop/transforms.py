"""Gradient transforms: pure functions on lists of (gradient, variable) pairs.

Each transform comes as a function that maps `[(grad, var), ...]` to a new list, and as a
`*_fn` factory that returns a `transform_grads_fn` for `create_train_op`. `IndexedSlices`
gradients keep their indices; `None` gradients pass through untouched. No transform knows about
optimizers, execution modes or summaries.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from trainop import optimizers

GradsAndVars = list[tuple[Any, Any]]
TransformGradsFn = Callable[[GradsAndVars], GradsAndVars]


def _map_gradients(
    grads_and_vars: Sequence[tuple[Any, Any]], fn: Callable[[tf.Tensor], tf.Tensor]
) -> GradsAndVars:
    """Applies `fn` to every gradient's values; None gradients pass through."""
    return [(None if g is None else _map_values(g, fn), v) for g, v in grads_and_vars]


def _map_values(grad: Any, fn: Callable[[tf.Tensor], tf.Tensor]) -> Any:
    """Applies `fn` to a dense gradient, or to the values of an `IndexedSlices` gradient."""
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(fn(grad.values), grad.indices, grad.dense_shape)
    return fn(grad)


def clip_gradient_norms(
    gradients_to_variables: Sequence[tuple[Any, Any]], max_norm: float
) -> GradsAndVars:
    """Clips each gradient to a norm of at most `max_norm` (`tf.clip_by_norm`).

    Each gradient is clipped on its own; see TF-Slim's and TF-Agents' function of the same name.
    For an `IndexedSlices` gradient the norm is that of its values.

    Args:
      gradients_to_variables: a list of (gradient, variable) pairs.
      max_norm: the largest norm a gradient may keep.

    Returns:
      The list of (clipped gradient, variable) pairs.

    Example:
      >>> import tensorflow as tf, trainop
      >>> v = tf.Variable(0.0)
      >>> [(g, _)] = trainop.clip_gradient_norms([(tf.constant(4.0), v)], 3.0)
      >>> float(g)
      3.0
    """
    return _map_gradients(gradients_to_variables, lambda t: tf.clip_by_norm(t, max_norm))


def clip_gradient_norms_fn(max_norm: float) -> TransformGradsFn:
    """Returns a `transform_grads_fn` that applies `clip_gradient_norms(..., max_norm)`.

    Example:
      >>> import tensorflow as tf, trainop
      >>> clip = trainop.clip_gradient_norms_fn(3.0)
      >>> [(g, _)] = clip([(tf.constant(-4.0), tf.Variable(0.0))])
      >>> float(g)
      -3.0
    """

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
    for key, _ in items:
        if not isinstance(key, (str, re.Pattern)) and not optimizers.is_variable(key):
            raise TypeError(
                "`gradient_multipliers` keys must be variables, variable references "
                "(`v.ref()`), variable names such as 'conv0/weights' or compiled regular "
                f"expressions over names (`re.compile(r'.*/bias')`). Received key: {key!r}"
            )
    return items


def _multiplier_for(var: Any, items: list[tuple[Any, Any]]) -> Any:
    """Finds `var`'s multiplier, keyed by the variable itself or by its name."""
    key = optimizers.variable_key(var)
    name = optimizers.variable_name(var)
    for candidate, multiplier in items:
        if isinstance(candidate, str):
            if candidate == name:
                return multiplier
        elif isinstance(candidate, re.Pattern):
            if candidate.fullmatch(name):
                return multiplier
        elif optimizers.variable_key(candidate) == key:
            return multiplier
    return None


def multiply_gradients(
    grads_and_vars: Sequence[tuple[Any, Any]], gradient_multipliers: Any
) -> GradsAndVars:
    """Scales the gradients of chosen variables.

    As TF-Slim's `multiply_gradients`: a variable is chosen by its name (`'conv0/weights'`, the
    name without `:0`; a Keras 3 variable's `path`, such as `'sequential/dense/kernel'`, which
    begins with the model's name) or by the variable itself; and, beyond TF-Slim, by a compiled
    regular expression that matches the whole name (`re.compile(r'.*/bias')`). The first key
    that matches a variable gives its multiplier; a key that matches nothing is ignored, as in
    TF-Slim. A Python multiplier of 0 freezes the variable: its gradient becomes None, so that
    no optimizer moves it (with a zero gradient, momentum and Adam still would). TensorFlow 2
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
                    f"{optimizers.variable_name(var)}"
                )
            if isinstance(multiplier, (int, float)) and multiplier == 0:
                # Frozen: no gradient at all, so that no optimizer moves it (a zero gradient
                # would still let Adam's or momentum's running averages move it).
                grad = None
            else:
                grad = _map_values(grad, lambda t, m=multiplier: t * tf.cast(m, t.dtype))
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


def clip_by_value(
    grads_and_vars: Sequence[tuple[Any, Any]], clip_value_min: float, clip_value_max: float
) -> GradsAndVars:
    """Clips every gradient element into [`clip_value_min`, `clip_value_max`].

    Example:
      >>> import tensorflow as tf, trainop
      >>> [(g, _)] = trainop.clip_by_value([(tf.constant([-3.0, 0.5, 9.0]), None)], -1.0, 1.0)
      >>> g.numpy().tolist()
      [-1.0, 0.5, 1.0]
    """
    if clip_value_min > clip_value_max:
        raise ValueError(
            "`clip_value_min` must not exceed `clip_value_max`. Received: "
            f"clip_value_min={clip_value_min}, clip_value_max={clip_value_max}"
        )
    return _map_gradients(
        grads_and_vars, lambda t: tf.clip_by_value(t, clip_value_min, clip_value_max)
    )


def clip_by_value_fn(clip_value_min: float, clip_value_max: float) -> TransformGradsFn:
    """Returns a `transform_grads_fn` that applies `clip_by_value`."""
    clip_by_value([], clip_value_min, clip_value_max)  # Bad bounds fail here.

    def clip(grads_and_vars: GradsAndVars) -> GradsAndVars:
        return clip_by_value(grads_and_vars, clip_value_min, clip_value_max)

    return clip


def global_norm(grads_and_vars: Sequence[tuple[Any, Any]]) -> tf.Tensor:
    """The norm of all gradients together, as if concatenated (None gradients left out)."""
    values = [_values(g) for g, _ in grads_and_vars if g is not None]
    return tf.linalg.global_norm(values) if values else tf.constant(0.0)


def _values(grad: Any) -> Any:
    return grad.values if isinstance(grad, tf.IndexedSlices) else grad


def clip_by_global_norm(grads_and_vars: Sequence[tuple[Any, Any]], max_norm: float) -> GradsAndVars:
    """Scales all gradients together so that their global norm is at most `max_norm`.

    Gradients whose global norm is already within the bound are returned exactly as they were
    (multiplied by 1.0). An inf or NaN norm makes every gradient NaN, for the numerics guard to
    see, rather than silently zero.

    Example:
      >>> import tensorflow as tf, trainop
      >>> pairs = [(tf.constant([3.0]), None), (tf.constant([4.0]), None)]
      >>> [float(g[0]) for g, _ in trainop.clip_by_global_norm(pairs, 1.0)]
      [0.6000000238418579, 0.800000011920929]
    """
    if not max_norm > 0:
        raise ValueError(f"`max_norm` must be positive. Received: max_norm={max_norm}")
    grads_and_vars = list(grads_and_vars)
    norm = global_norm(grads_and_vars)
    # max_norm / norm <= 1 only when clipping is needed; otherwise the scale is exactly 1.
    scale = tf.where(
        tf.math.is_finite(norm),
        tf.minimum(1.0, max_norm / tf.maximum(norm, 1e-30)),
        tf.constant(float("nan")),
    )
    return _map_gradients(grads_and_vars, lambda t: t * tf.cast(scale, t.dtype))


def clip_by_global_norm_fn(max_norm: float) -> TransformGradsFn:
    """Returns a `transform_grads_fn` that applies `clip_by_global_norm(..., max_norm)`."""
    if not max_norm > 0:
        raise ValueError(f"`max_norm` must be positive. Received: max_norm={max_norm}")

    def clip(grads_and_vars: GradsAndVars) -> GradsAndVars:
        return clip_by_global_norm(grads_and_vars, max_norm)

    return clip


def add_gradient_noise(
    grads_and_vars: Sequence[tuple[Any, Any]], stddev: Any, seed: int | None = None
) -> GradsAndVars:
    """Adds Gaussian noise of standard deviation `stddev` to every gradient element."""

    def add_noise(t: tf.Tensor) -> tf.Tensor:
        noise = tf.random.normal(
            tf.shape(t), stddev=tf.cast(stddev, t.dtype), dtype=t.dtype, seed=seed
        )
        return t + noise

    return _map_gradients(grads_and_vars, add_noise)


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
    if stddev < 0 or decay_exponent < 0:
        raise ValueError(
            "`stddev` and `decay_exponent` must not be negative. Received: "
            f"stddev={stddev}, decay_exponent={decay_exponent}"
        )

    def add_noise(grads_and_vars: GradsAndVars) -> GradsAndVars:
        current = step if step is not None else tf.compat.v1.train.get_global_step()
        scale = stddev
        if current is not None:
            t = tf.cast(tf.convert_to_tensor(optimizers.as_tf_variable(current)), tf.float32)
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
