"""Variables of either kind, `tf.Variable` or Keras 3's, which wraps one and is not one.

The helpers that every stage uses to name, key and unwrap a variable: a gradient is taken with
respect to the `tf.Variable`, a Keras 3 optimizer is handed the Keras variable, and a name is a
Keras variable's `path`.
"""

from __future__ import annotations

import contextlib
import gc
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
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


def add_slots(
    variables: Sequence[Any],
    slots: dict[int, tf.Variable],
    saved: list[tf.Variable],
    suffix: str,
    dtype_of: Callable[[tf.DType], tf.DType],
) -> list[Any]:
    """Makes the state a stage keeps per trained variable, as an optimizer's slot, for each of
    `variables` that has none in `slots` yet (keyed by `variable_key`): a non-trainable
    variable of zeros of its shape, of `dtype_of(its dtype)`, named `<its name>/<suffix>`,
    appended to `saved` (checkpointed by position: the variables are taken in `by_name`
    order) and entered in `slots`. Made in the current scope (the caller's `tf.init_scope`).

    Returns:
      The variables given a slot now, in that order.
    """
    added = []
    for variable in by_name(variables):
        key = variable_key(variable)
        if key in slots:
            continue
        slot = tf.Variable(
            tf.zeros(as_tf_variable(variable).shape, dtype_of(as_tf_variable(variable).dtype)),
            trainable=False,
            name=variable_name(variable).replace(":", "_") + "/" + suffix,
        )
        saved.append(slot)
        slots[key] = slot
        added.append(variable)
    return added


def by_name(variables: Sequence[Any]) -> list[Any]:
    """`variables` in the order of their names without the first part of a path (a Keras
    model's name, which a model made again changes: `sequential_1/dense/kernel`), for state
    saved by position; a stable sort, so variables of one name keep their order."""
    return sorted(variables, key=lambda v: variable_name(v).partition("/")[2])


def is_reference(variable: tf.Variable) -> bool:
    """Whether `variable` is a `tf.compat.v1` reference variable (what TF-Slim programs under
    `disable_v2_behavior` make): no resource handle, and a read that is its buffer."""
    if isinstance(variable, tf.distribute.DistributedValues):
        return False  # its `handle` raises outside a replica
    return not hasattr(variable, "handle")


def subtract_scaled(variable: Any, alpha: Any, delta: tf.Tensor) -> Any:
    """Adds the op `variable -= alpha * delta` (`alpha` a scalar), fused into one kernel for a
    plain resource variable (`ResourceApplyGradientDescent`, one pass over the buffer), else
    (a variable mirrored by a `tf.distribute` strategy, a `tf.compat.v1` reference variable)
    as `assign_sub`; returns the op."""
    variable = as_tf_variable(variable)
    alpha = tf.cast(alpha, variable.dtype)
    if isinstance(variable, tf.distribute.DistributedValues) or is_reference(variable):
        return variable.assign_sub(alpha * delta, read_value=False)
    return tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=alpha, delta=delta)


def as_variable_or_name(key: Any) -> Any:
    """`key`, or the variable it refers to if it is a `v.ref()` (how TensorFlow 2 makes a
    variable usable as a dict key)."""
    deref = getattr(key, "deref", None)
    return deref() if callable(deref) else key


def keyed_items(mapping: Any, argument: str, values: str) -> list[tuple[Any, Any]]:
    """`mapping` (a dict, or a list of pairs) as (key, value) pairs, each key a variable, a
    variable name or a compiled regular expression over names, as TF-Slim's
    `multiply_gradients` keys its multipliers (and beyond it, the expressions).

    Args:
      mapping: what the caller passed as `argument`.
      argument: the argument's name, for the errors.
      values: what the values are, for the errors ("multipliers").

    Raises:
      ValueError: `mapping` is not a dict or a list of pairs, or is empty.
      TypeError: a key is not a variable, a `v.ref()`, a name or a compiled expression.
    """
    if isinstance(mapping, Mapping):
        items = list(mapping.items())
    elif isinstance(mapping, (list, tuple)) and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in mapping
    ):
        items = [tuple(pair) for pair in mapping]
    else:
        raise ValueError(  # ValueError, as TF-Slim raises for its multipliers.
            f"`{argument}` must map variables or variable names to {values}. "
            f"Received: {argument}={mapping!r:.200}"
        )
    if not items:
        raise ValueError(f"`{argument}` is empty.")
    items = [(as_variable_or_name(key), value) for key, value in items]
    for key, _ in items:
        if not isinstance(key, (str, re.Pattern)) and not is_variable(key):
            raise TypeError(
                f"`{argument}` keys must be variables, variable references (`v.ref()`), "
                "variable names such as 'conv0/weights' or compiled regular expressions over "
                f"names (`re.compile(r'.*/bias')`). Received key: {key!r:.200}"
            )
    return items


def value_for(variable: Any, items: list[tuple[Any, Any]]) -> Any:
    """The value of the first of `items` (from `keyed_items`) whose key is `variable`, its
    name, or an expression that matches the whole name; None if none is."""
    key = variable_key(variable)
    name = variable_name(variable)
    for candidate, value in items:
        if isinstance(candidate, str):
            if candidate == name:
                return value
        elif isinstance(candidate, re.Pattern):
            if candidate.fullmatch(name):
                return value
        elif variable_key(candidate) == key:
            return value
    return None


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


# --- What the forward pass writes -------------------------------------------------------------

# The methods of `tf.Variable` (of its resource variables, which a Keras 3 variable wraps)
# that `recording_writes` watches: what batch normalization's moving statistics, a seed
# generator's state and a metric's update call.
_WRITES = ("assign", "assign_add", "assign_sub")
_writes_watched = False


def _watch_writes() -> None:
    """Wraps the `_WRITES` methods once, for `recording_writes`: outside one, a wrapped call
    costs one attribute lookup more, when the op is built (not when it runs)."""
    global _writes_watched
    if _writes_watched:
        return
    from tensorflow.python.ops import resource_variable_ops

    classes, pending = [], [resource_variable_ops.BaseResourceVariable]
    while pending:
        cls = pending.pop()
        classes.append(cls)
        pending.extend(cls.__subclasses__())
    # Each class that defines a method of its own (ResourceVariable overrides its base's).
    for variable_class, name in [(c, n) for c in classes for n in _WRITES if n in vars(c)]:
        original = vars(variable_class)[name]

        def watched(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            writes = getattr(_recording, "writes", None)
            if (
                writes is not None
                and id(self) not in writes
                # Not in an inner graph (a loop body, whose tensors stay inside it), nor eager.
                and tf.compat.v1.get_default_graph() is _recording.graph
                and not tf.executing_eagerly()
            ):
                # Its value before the first write: read here, this op comes before the write
                # (the automatic control dependencies keep the order of a variable's ops).
                writes[id(self)] = (self, self.read_value())
            return _original(self, *args, **kwargs)

        setattr(variable_class, name, watched)
    _writes_watched = True


@contextlib.contextmanager
def recording_writes() -> Iterator[dict[int, tuple[Any, Any]]]:
    """Within it, while a graph is built (a `tf.function` traced), each variable that the code
    assigns, with its value before the first assignment, by the variable's id.

    What the forward pass of a loss writes (batch normalization's moving statistics, dropout's
    seed state, the loss metrics of Keras's `compute_loss`) is recorded, so that a step that
    the numerics guard rejects can write the old values back (`undo_writes`). Writes that run
    eagerly (a variable's initialization in `tf.init_scope`), and those inside an inner graph
    (a `tf.while_loop` body), are not recorded.

    Yields:
      A dict, filled as the code in the `with` block assigns variables.
    """
    _watch_writes()
    outer = getattr(_recording, "writes", None)
    outer_graph = getattr(_recording, "graph", None)
    writes: dict[int, tuple[Any, Any]] = {}
    _recording.writes = writes
    _recording.graph = tf.compat.v1.get_default_graph()
    try:
        yield writes
    finally:
        _recording.writes = outer
        _recording.graph = outer_graph
        if outer is not None:
            for key, value in writes.items():
                outer.setdefault(key, value)


def undo_writes(writes: dict[int, tuple[Any, Any]], unless: Any = None) -> list[Any]:
    """Adds the ops that write back the values `recording_writes` recorded; returns them.

    With `unless`, a boolean scalar tensor, each variable is assigned, unconditionally, its
    value before where `unless` is False and its value now where it is True: a select and an
    assignment per written variable (batch normalization's statistics are small), cheaper than
    a `tf.cond` around the writes.
    """
    if unless is None:
        return [variable.assign(value, read_value=False) for variable, value in writes.values()]
    return [
        variable.assign(tf.where(unless, variable.read_value(), value), read_value=False)
        for variable, value in writes.values()
    ]


# The Keras 3 variables alive, by the id of the `tf.Variable` each wraps (held weakly), for
# `keras_owners`: filled once from the heap, then by each Keras variable as it is made.
_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_owners_watched: type | None = None


@tf.autograph.experimental.do_not_convert
def keras_owners(tf_variables: list[Any], reads: dict[int, Any]) -> list[Any]:
    """Each of `tf_variables`, or the Keras 3 variable that wraps it (a Keras 3 variable
    stays itself).

    The wrapper is the one `reads` (from `recording_reads`) saw read, else the one that wraps
    it among the live Keras variables (see `_watch_owners`): a dictionary lookup.
    """
    variable_type = keras3_variable_type()
    if variable_type is None:
        return list(tf_variables)
    _watch_owners(variable_type)
    found = []
    for v in tf_variables:
        owner = None
        if not isinstance(v, variable_type):
            # (Not `or`: a Keras variable's truth is its value's.)
            owner = reads.get(id(v))
            if owner is None:
                owner = _OWNERS.get(id(v))
        found.append(owner if owner is not None and owner.__dict__.get("_value") is v else v)
    return found


def _watch_owners(variable_type: type) -> None:
    """Makes `_OWNERS` know every Keras 3 variable: those alive now, found once among the live
    objects (`gc.get_objects` lists them without running any of their code, and each is tested
    by its type alone; not `gc.get_referrers`, whose traversal of every object crashed the
    process once), and each one made from now on, as its value is made (`_initialize`)."""
    global _owners_watched
    if _owners_watched is variable_type:
        return
    original = variable_type._initialize

    def _initialize(self: Any, value: Any) -> None:
        original(self, value)
        _add_owner(self)

    variable_type._initialize = _initialize
    _owners_watched = variable_type
    for obj in gc.get_objects():
        if issubclass(type(obj), variable_type):
            _add_owner(obj)


def _add_owner(variable: Any) -> None:
    inner = variable.__dict__.get("_value")
    if inner is not None:
        _OWNERS[id(inner)] = variable
