"""Variables of either kind, `tf.Variable` or Keras 3's, which wraps one and is not one.

The helpers that every stage uses to name, key and unwrap a variable: a gradient is taken with
respect to the `tf.Variable`, a Keras 3 optimizer is handed the Keras variable, and a name is a
Keras variable's `path`.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import weakref
from collections.abc import Iterator
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


# Keras 3 reads a variable's value through its `value` property (its `__tf_tensor__`, the
# conversion of every op's inputs and `numpy()` go through it), while a tape sees only the
# `tf.Variable` inside. Wrapped once, the property records, while `recording_reads` is
# active in the thread, which Keras variable each read `tf.Variable` belongs to; at other
# times it only forwards. (Nothing else links the two: a `tf.Variable` holds no reference to
# its wrapper, and Keras keeps no registry of its variables.)
_recording = threading.local()
_install_lock = threading.Lock()
_installed: list[type] = []


def _install_read_recorder(variable_type: type) -> None:
    with _install_lock:
        if _installed:
            return
        owner = next(
            (c for c in variable_type.__mro__ if isinstance(c.__dict__.get("value"), property)),
            None,
        )
        if owner is None:  # Another Keras: `keras_owners` falls back to its search.
            return
        original = owner.__dict__["value"]

        def value(self: Any) -> Any:
            reads = getattr(_recording, "reads", None)
            if reads is not None:
                inner = getattr(self, "_value", None)
                if inner is not None:
                    reads[id(inner)] = self
            return original.fget(self)

        owner.value = property(value, original.fset, original.fdel, original.__doc__)
        _installed.append(owner)


@contextlib.contextmanager
def recording_reads() -> Iterator[dict[int, Any]]:
    """Within it, the Keras 3 variables read, by the id of the `tf.Variable` each wraps.

    Yields:
      A dict, filled as the code in the `with` block reads Keras 3 variables (empty without
      Keras 3). Nested blocks also record into the outer one.
    """
    reads: dict[int, Any] = {}
    variable_type = keras3_variable_type()
    if variable_type is None:
        yield reads
        return
    _install_read_recorder(variable_type)
    outer = getattr(_recording, "reads", None)
    _recording.reads = reads
    try:
        yield reads
    finally:
        _recording.reads = outer
        if outer is not None:
            outer.update(reads)


# What the search below found, by the id of each `tf.Variable`, both held weakly: its Keras
# wrapper, or None for a variable that has none (a plain `tf.Variable`).
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref | None]] = {}


def keras_owners(tf_variables: list[Any], reads: dict[int, Any]) -> list[Any]:
    """Each of `tf_variables`, or the Keras 3 variable that wraps it.

    The wrapper is the one `reads` (from `recording_reads`) saw read. A variable the loss read
    without its wrapper's `value` (inside a `tf.function` traced before, or through a
    `tf.Variable` taken out earlier) is looked for among the live objects, once: `gc.get_objects`
    lists them without running any of their code, and each is tested by its type alone. (Not
    `gc.get_referrers`, whose traversal of every object crashed the process on one.)
    """
    variable_type = keras3_variable_type()
    owners = {}
    unknown = []
    for v in tf_variables:
        owner = reads.get(id(v))
        if owner is None:
            cached = _OWNERS.get(id(v))
            if cached is not None and cached[0]() is v and cached[1] is None:
                continue  # Known to have no wrapper.
            owner = cached[1]() if cached is not None and cached[0]() is v else None
        if owner is not None and getattr(owner, "_value", None) is v:
            owners[id(v)] = owner
        elif variable_type is not None:
            unknown.append(v)
    if unknown:
        owners.update(_search(unknown, variable_type))
    return [owners.get(id(v), v) for v in tf_variables]


def _search(unknown: list[Any], variable_type: type) -> dict[int, Any]:
    wanted = {id(v): v for v in unknown}
    found = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), variable_type):
            inner = obj.__dict__.get("_value")
            if inner is not None and wanted.get(id(inner)) is inner:
                found[id(inner)] = obj
    for key, v in wanted.items():
        owner = found.get(key)
        _OWNERS[key] = (
            weakref.ref(v, lambda _, key=key: _OWNERS.pop(key, None)),
            None if owner is None else weakref.ref(owner),
        )
    return found
