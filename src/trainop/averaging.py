"""Weight averaging: an exponential moving average of the trained variables, for every optimizer.

Keras 3 optimizers average the weights themselves (`use_ema=True`); `tf.compat.v1` and
`tf_keras` optimizers do not, and a Keras 3 `LossScaleOptimizer` averages the steps it skips.
`ExponentialMovingAverage`, passed to a train op as `moving_average`, averages after each
update the optimizer applies, whatever its family, and only then.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from trainop import _gradients, _variables


class _Index:
    """The averages and their variables by the variable's key, and the swap ops of each graph:
    held apart from the module's attributes, which `tf.Module` tracks (a dict keyed by numbers
    could not be checkpointed)."""

    def __init__(self) -> None:
        self.averages: dict[int, tf.Variable] = {}
        self.variables: dict[int, Any] = {}
        # Per tf.compat.v1 graph: the ops of `swap_weights`, made once.
        self.swaps: dict[Any, tuple[Any, list[Any], Any]] = {}


class ExponentialMovingAverage(tf.Module):
    """An exponential moving average of the trained variables, updated by the train op.

    Pass it as `moving_average=` to `create_train_op`, `create_train_step` or
    `trainop.keras.compile`. After each update the optimizer applies (not after a step the
    numerics guard skips, nor one a `LossScaleOptimizer` skips for an overflow, nor the calls
    of an accumulation window that apply nothing), each trained variable's average becomes

        average = decay_t * average + (1 - decay_t) * variable

    in float32 at least (a float16 variable's average is kept in float32), where `decay_t` is
    0 at the first averaged update (the average starts as the weights, as Keras's
    `use_ema` starts), then `decay`, or with `dynamic_decay=True`, `min(decay, (1 + n) /
    (10 + n))` after `n` averaged updates, as `tf.train.ExponentialMovingAverage` with
    `num_updates` ramps it. The Polyak average of the NFNets and "Mean teacher" papers is this
    with a decay near 1.

    The averages are variables of this module (made when the train op is first built or
    traced, one per trained variable): put it in the checkpoint beside the model
    (`tf.train.Checkpoint(model=model, ema=ema)`, or `trainop.train(checkpoint={..., "ema":
    ema})`), and a resumed run goes on with the same averages. A checkpoint restored before the
    first step is applied to them when they are made.

    Args:
      decay: the weight of the past, in [0, 1): 0.999 averages over about the last 1,000
        updates.
      dynamic_decay: ramp the decay up over the first updates, as above.
      name: the module's name.

    Raises:
      ValueError: `decay` is not in [0, 1).
      TypeError: `decay` is not a number, or `dynamic_decay` is not a bool.

    Example:
      >>> import keras, tensorflow as tf, trainop
      >>> w = tf.Variable(0.0)
      >>> ema = trainop.ExponentialMovingAverage(decay=0.5)
      >>> train_op = trainop.create_train_op(lambda: -w, keras.optimizers.SGD(1.0),
      ...                                    global_step=None, moving_average=ema)
      >>> for _ in range(3):
      ...     _ = train_op()
      >>> float(w.numpy()), float(ema.average(w).numpy())  # 1, 2, 3 averaged: 1, 1.5, 2.25
      (3.0, 2.25)
      >>> with ema.swap_weights():
      ...     float(w.numpy())
      2.25
      >>> float(w.numpy())
      3.0
    """

    def __init__(
        self, decay: float = 0.999, *, dynamic_decay: bool = False, name: str | None = None
    ):
        if isinstance(decay, (bool, np.bool_)) or not isinstance(
            decay, (int, float, np.integer, np.floating)
        ):
            raise TypeError(f"`decay` must be a number in [0, 1). Received: decay={decay!r:.200}")
        if not (math.isfinite(decay) and 0 <= decay < 1):
            raise ValueError(f"`decay` must be in [0, 1). Received: decay={decay!r}")
        if not isinstance(dynamic_decay, (bool, np.bool_)):
            raise TypeError(
                f"`dynamic_decay` must be True or False. Received: dynamic_decay={dynamic_decay!r}"
            )
        super().__init__(name=name or "exponential_moving_average")
        self.decay = float(decay)
        self.dynamic_decay = bool(dynamic_decay)
        # Checkpointed by position, as a Keras optimizer saves its slots, the variables of each
        # `build` in the order of their names (`_variables.by_name`): a model made again under
        # another name (`sequential_1`), or listed in another order, restores into the same
        # averages.
        self.averages: list[tf.Variable] = []
        self.averaged_updates: tf.Variable | None = None
        self._index = _Index()

    def build(self, variables: Sequence[Any]) -> None:
        """Makes the averages of `variables` that have none yet (zeros: the first averaged
        update copies the weights), and the counter of averaged updates. Called by the train
        op when it is built; outside any function, as a Keras optimizer makes its slots.

        Call it yourself to use averages from a checkpoint without training (evaluation in a
        new process): `ema.build(model.trainable_variables)`, with the variables the train op
        trained (in any order: they are taken in the order of their names), before or after
        `checkpoint.restore(...)`.

        Args:
          variables: the variables to average (`tf.Variable`s or Keras 3 variables).
        """
        with tf.init_scope():
            if self.averaged_updates is None:
                self.averaged_updates = tf.Variable(
                    0, dtype=tf.int64, trainable=False, name="averaged_updates"
                )
            added = _variables.add_slots(
                variables,
                self._index.averages,
                self.averages,
                "average",
                _gradients.wide_dtype,
            )
            for variable in added:
                self._index.variables[_variables.variable_key(variable)] = variable

    def average(self, variable: Any) -> tf.Variable:
        """The average of `variable` (a variable the train op trains): a `tf.Variable` of its
        shape, float32 for a 16-bit variable, else of its dtype.

        Raises:
          ValueError: `variable` is not averaged here (no train op with this average has
            trained it yet).
        """
        key = _variables.variable_key(variable)
        if key not in self._index.averages:
            raise ValueError(
                "`variable` has no average here: pass this ExponentialMovingAverage as "
                "`moving_average` to the train op that trains it, and run it. "
                f"Received: {_variables.variable_name(variable)}"
            )
        return self._index.averages[key]

    def state_variables(self) -> list[tf.Variable]:
        """Every variable an update of the averages writes."""
        found = list(self._index.averages.values())
        return found + ([self.averaged_updates] if self.averaged_updates is not None else [])

    def update(self, variables: Sequence[Any], applied: tf.Tensor | None = None) -> tf.Operation:
        """Adds the ops that average `variables` (built by `build`) after an update; where the
        boolean tensor `applied` is False (an optimizer that skipped its update), they keep
        their averages and count nothing."""
        count = self.averaged_updates
        n = tf.cast(count, tf.float32)
        decay = tf.constant(self.decay, tf.float32)
        if self.dynamic_decay:
            decay = tf.minimum(decay, (1.0 + n) / (10.0 + n))
        # The first averaged update copies the weights.
        decay = tf.where(count > 0, decay, 0.0)
        # average -= (1 - decay) * (average - value): one subtraction and one fused update per
        # variable (as `tf.train.ExponentialMovingAverage`'s `assign_moving_average`, fused).
        rate = 1.0 - decay
        if applied is not None:
            rate = rate * tf.cast(applied, tf.float32)
        updates = []
        for variable in variables:
            average = self.average(variable)
            value = _variables.as_tf_variable(variable)
            if value.dtype != average.dtype:
                value = tf.cast(value, average.dtype)
            updates.append(_variables.subtract_scaled(average, rate, average.read_value() - value))
        with tf.control_dependencies(updates):
            counted = count.assign_add(
                1 if applied is None else tf.cast(applied, tf.int64), read_value=False
            )
        return tf.group(*updates, counted)

    @contextlib.contextmanager
    def swap_weights(self, session: Any = None) -> Iterator[None]:
        """Within it, the averaged variables hold their averages (cast to their dtype); on
        leaving (an exception too), they hold their own values again, bit for bit. For
        evaluation or export with the averaged weights, as TF Model Garden's and TF Addons'
        `swap_weights`; the averages themselves are left as they are.

        Args:
          session: in a `tf.compat.v1` graph, the `Session` that runs the swaps; eager mode:
            None.

        Raises:
          ValueError: nothing is averaged yet; or a `tf.compat.v1` graph without `session`.
        """
        keys = list(self._index.averages)
        if not keys or (tf.executing_eagerly() and int(self.averaged_updates.numpy()) == 0):
            raise ValueError(
                "swap_weights: nothing is averaged yet: run the train op that has this "
                "ExponentialMovingAverage as its `moving_average` first; or, for averages "
                "restored from a checkpoint, call build(model.trainable_variables) and restore."
            )
        targets = [_variables.as_tf_variable(self._index.variables[k]) for k in keys]
        averages = [self._index.averages[k] for k in keys]
        if tf.executing_eagerly():
            kept = [target.read_value() for target in targets]
            for target, average in zip(targets, averages):
                target.assign(tf.cast(average, target.dtype))
            try:
                yield
            finally:
                for target, value in zip(targets, kept):
                    target.assign(value)
            return
        if session is None:
            raise ValueError(
                "swap_weights in a tf.compat.v1 graph needs the `session` that runs it."
            )
        graph = targets[0].graph
        if (graph, len(keys)) not in self._index.swaps:
            with graph.as_default():
                swap_in = tf.group(
                    *[t.assign(tf.cast(a, t.dtype)) for t, a in zip(targets, averages)]
                )
                placeholders = [tf.compat.v1.placeholder(t.dtype, t.shape) for t in targets]
                swap_out = tf.group(*[t.assign(p) for t, p in zip(targets, placeholders)])
            self._index.swaps[graph, len(keys)] = swap_in, placeholders, swap_out
        swap_in, placeholders, swap_out = self._index.swaps[graph, len(keys)]
        kept = session.run(targets)
        session.run(swap_in)
        try:
            yield
        finally:
            session.run(swap_out, dict(zip(placeholders, kept)))


def check_moving_average(moving_average: Any) -> None:
    """Raises a TypeError unless `moving_average` is None or an `ExponentialMovingAverage`."""
    if moving_average is not None and not isinstance(moving_average, ExponentialMovingAverage):
        raise TypeError(
            "`moving_average` must be a trainop.ExponentialMovingAverage or None. "
            f"Received: moving_average={moving_average!r:.200}"
        )
