"""Learning rates per variable: each chosen variable's update, scaled after the optimizer made it.

Multiplying a gradient does not change the step of an adaptive optimizer (Adam, RMSprop,
Adagrad divide the scale back out), so a multiplier of the learning rate cannot be a gradient
transform. It scales the update itself: a chosen variable's value before the update is read,
and once the optimizer has applied it, `before + multiplier * (after - before)` is written. For
every optimizer whose update is proportional to its learning rate (SGD, momentum, Adam, AdamW,
RMSprop, Adagrad, Adadelta, Adamax, Nadam, Lion; decoupled weight decay included, as Keras
multiplies it by the rate), that is the update
the variable would get from the same optimizer at `multiplier` times the rate, while its slots
(moments, accumulators) move as the optimizer moves them. This is Caffe's `lr_mult`, and
PyTorch's parameter groups with their own `lr`, for one optimizer object. (FTRL's update is not
proportional to its rate: there the factor scales its update, which is not FTRL at that rate.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from trainop import _gradients, _variables

logger = logging.getLogger("trainop")

ARGUMENT = "learning_rate_multipliers"


def _static_value(multiplier: Any) -> float | None:
    """`multiplier` as a Python float if it is known before the step runs, else None."""
    if isinstance(multiplier, tf.Variable):
        return None
    if isinstance(multiplier, tf.Tensor):
        value = tf.get_static_value(multiplier)
        return None if value is None else float(value)
    return float(multiplier)


def _check_multiplier(key: Any, multiplier: Any) -> None:
    if isinstance(multiplier, (tf.Tensor, tf.Variable)):
        if not multiplier.dtype.is_floating or multiplier.shape.rank != 0:
            raise TypeError(
                f"`{ARGUMENT}` values must be numbers or scalar floating-point tensors or "
                f"variables. Received for {key!r:.100}: {multiplier!r:.200}"
            )
    elif isinstance(multiplier, (bool, np.bool_)) or not isinstance(
        multiplier, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"`{ARGUMENT}` values must be numbers or scalar floating-point tensors or "
            f"variables. Received for {key!r:.100}: {multiplier!r:.200}"
        )
    value = _static_value(multiplier)
    if value is not None and not (np.isfinite(value) and value >= 0):
        raise ValueError(
            f"`{ARGUMENT}` values must be finite and not negative. "
            f"Received for {key!r:.100}: {multiplier!r:.200}"
        )


class LearningRateMultipliers:
    """The checked `learning_rate_multipliers` of a train op, and the update they scale.

    Args:
      multipliers: a dict, or a list of pairs, from variables (or `v.ref()`), variable names or
        compiled regular expressions over names, to the factor of their learning rate: a
        finite number >= 0, or a scalar floating-point `tf.Variable` (read at every step) or
        tensor. The first key that matches a variable gives its factor, as for
        `multiply_gradients`; a key that matches nothing is ignored.

    Raises:
      ValueError: `multipliers` is not a dict or list of pairs, is empty, or holds a negative,
        infinite or NaN factor.
      TypeError: a key is not a variable, name or expression; a factor is not a number nor a
        scalar floating-point tensor.
    """

    def __init__(self, multipliers: Any):
        self.items = _variables.keyed_items(multipliers, ARGUMENT, "learning-rate factors")
        for key, multiplier in self.items:
            _check_multiplier(key, multiplier)
        self._reported = False

    def _report_unmatched(self, variables: Sequence[Any]) -> None:
        """Logs, once, the keys that match none of `variables`: a name that is not the
        variable's (a Keras 3 variable's is its `path`) would train at the full rate."""
        if self._reported:
            return
        self._reported = True
        unmatched = [
            key
            for key, _ in self.items
            if not any(_variables.value_for(v, [(key, True)]) for v in variables)
        ]
        if unmatched:
            logger.warning(
                "learning_rate_multipliers: %s match no variable to train, which train at the "
                "optimizer's rate. Variables are matched by name (a Keras 3 variable's path: "
                "%s).",
                ", ".join(repr(k.pattern if hasattr(k, "pattern") else k) for k in unmatched),
                ", ".join(repr(_variables.variable_name(v)) for v in variables[:3])
                + (", ..." if len(variables) > 3 else ""),
            )

    def of(self, variable: Any) -> Any:
        """`variable`'s factor; None if it has none, or a factor known to be 1."""
        multiplier = _variables.value_for(variable, self.items)
        if multiplier is None or _static_value(multiplier) == 1.0:
            return None
        return multiplier

    def scaled_update(
        self, variables: Sequence[Any], update: Callable[[], Sequence[Any]]
    ) -> list[Any]:
        """Adds `update()` (the optimizer's update of `variables`, returning ops and tensors to
        wait for), and then the ops that scale
        each chosen variable's change by its factor and apply its constraint again, if it has
        one; returns the ops to wait for.

        The values before the update are read before any op of `update()` runs (an explicit
        control dependency: in a `tf.cond` branch of a `tf.compat.v1` graph, automatic ones
        do not order them).
        """
        self._report_unmatched(variables)
        chosen = [(v, m) for v in variables if (m := self.of(v)) is not None]
        if not chosen:
            return list(update())
        targets = [_variables.as_tf_variable(v) for v, _ in chosen]
        # A copy: a tf.compat.v1 reference variable's read is its buffer, which the update
        # writes in place (a resource variable's read is copied on write).
        before = [
            tf.raw_ops.Snapshot(input=t.read_value())
            if _variables.is_reference(t)
            else t.read_value()
            for t in targets
        ]
        with tf.control_dependencies(before):
            done = list(update())
        with tf.control_dependencies(done):
            scaled = []
            for (variable, multiplier), target, old in zip(chosen, targets, before):
                # before + multiplier * (after - before), not the fused after - (1 - multiplier)
                # * (after - before): that one rounds, and a factor of 0 would move the weight.
                value = _moved(old, target.read_value(), multiplier)
                constraint = getattr(variable, "constraint", None)
                if constraint is not None:
                    value = tf.cast(constraint(value), target.dtype)
                scaled.append(target.assign(value, read_value=False))
        return [*done, tf.group(*scaled)]


def _moved(before: tf.Tensor, after: tf.Tensor, multiplier: Any) -> tf.Tensor:
    """`before + multiplier * (after - before)`, in float32 at least, in `before`'s dtype;
    exactly `before` for a factor known to be 0."""
    if _static_value(multiplier) == 0.0:
        return before
    dtype = _gradients.wide_dtype(before.dtype)
    old = tf.cast(before, dtype)
    step = tf.cast(after, dtype) - old
    return tf.cast(old + tf.cast(multiplier, dtype) * step, before.dtype)


def resolve(multipliers: Any) -> LearningRateMultipliers | None:
    """`multipliers` checked (see `LearningRateMultipliers`), or None if None."""
    return None if multipliers is None else LearningRateMultipliers(multipliers)
