"""Gradient transforms: pure functions on lists of (gradient, variable) pairs.

Each transform comes as a function that maps `[(grad, var), ...]` to a new list, and as a
`*_fn` factory that returns a `transform_grads_fn` for `create_train_op`. `IndexedSlices`
gradients keep their indices; `None` gradients pass through untouched. No transform knows about
optimizers, execution modes or summaries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from trainop import optimizers

GradsAndVars = list[tuple[Any, Any]]
TransformGradsFn = Callable[[GradsAndVars], GradsAndVars]


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
    return [
        (None if grad is None else _map_values(grad, lambda t: tf.clip_by_norm(t, max_norm)), var)
        for grad, var in gradients_to_variables
    ]


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
        if not isinstance(key, str) and not optimizers.is_variable(key):
            raise TypeError(
                "`gradient_multipliers` keys must be variables, variable references "
                f"(`v.ref()`) or variable names such as 'conv0/weights'. Received key: {key!r}"
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
        elif optimizers.variable_key(candidate) == key:
            return multiplier
    return None


def multiply_gradients(
    grads_and_vars: Sequence[tuple[Any, Any]], gradient_multipliers: Any
) -> GradsAndVars:
    """Scales the gradients of chosen variables.

    As TF-Slim's `multiply_gradients`: a variable is chosen by its name (`'conv0/weights'`, the
    name without `:0`; a Keras 3 variable's `path`, such as `'sequential/dense/kernel'`, which
    begins with the model's name) or by the variable itself. A name that matches no variable is
    ignored, as in TF-Slim. TensorFlow 2 variables are not hashable: key a dict by `v.ref()`, or
    pass a list of (variable or name, multiplier) pairs instead of a dict.

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
            grad = _map_values(grad, lambda t, m=multiplier: t * tf.cast(m, t.dtype))
        result.append((grad, var))
    return result


def multiply_gradients_fn(gradient_multipliers: Any) -> TransformGradsFn:
    """Returns a `transform_grads_fn` that applies `multiply_gradients(..., gradient_multipliers)`.

    Example:
      >>> import tensorflow as tf, trainop
      >>> v = tf.Variable(0.0, name='frozen')
      >>> freeze = trainop.multiply_gradients_fn({'frozen': 0.0})
      >>> [(g, _)] = freeze([(tf.constant(2.0), v)])
      >>> float(g)
      0.0
    """
    _multiplier_items(gradient_multipliers)  # Bad multipliers fail here, not at the first step.

    def multiply(grads_and_vars: GradsAndVars) -> GradsAndVars:
        return multiply_gradients(grads_and_vars, gradient_multipliers)

    return multiply
