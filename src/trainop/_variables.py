"""Variables of either kind, `tf.Variable` or Keras 3's, which wraps one and is not one.

The helpers that every stage uses to name, key and unwrap a variable: a gradient is taken with
respect to the `tf.Variable`, a Keras 3 optimizer is handed the Keras variable, and a name is a
Keras variable's `path`.
"""

from __future__ import annotations

import sys
from typing import Any

import tensorflow as tf


def keras3_variable_type() -> type | None:
    keras = sys.modules.get("keras")
    variable_type = getattr(keras, "Variable", None)
    # Keras 2 (the `keras` package before 3.0) has no `keras.Variable`.
    return variable_type if isinstance(variable_type, type) else None


def as_tf_variable(variable: Any) -> Any:
    """Returns the `tf.Variable` behind `variable` (a Keras 3 variable wraps one)."""
    variable_type = keras3_variable_type()
    if variable_type is not None and isinstance(variable, variable_type):
        return variable.value
    return variable


def is_variable(value: Any) -> bool:
    """Whether `value` is a `tf.Variable` or a Keras 3 variable."""
    return isinstance(as_tf_variable(value), tf.Variable)


def variable_name(variable: Any) -> str:
    """A variable's name as TF-Slim keys it: `'conv0/weights'`, without the `:0` suffix.

    Keras 3 variables are named by their `path` (`'dense/kernel'`).
    """
    path = getattr(variable, "path", None)
    if isinstance(path, str) and not isinstance(variable, tf.Variable):
        return path
    name = variable.name
    return name[:-2] if name.endswith(":0") else name


def variable_key(variable: Any) -> int:
    """A hashable identity for a variable (TensorFlow 2 variables are not hashable)."""
    return id(as_tf_variable(variable))
