"""Gradient accumulation: the gradient of N calls' batches together, applied once.

Each call's gradient is added with a weight, its count: 1 for a loss averaged over its batch,
or the count the loss gives with its sum (`(loss_sum, count)`: the examples, the tokens not
masked). The window's update divides the weighted sum once by the window's total count, so it
is one step on the concatenated batch whatever the calls held: the equal-weight mean of
Keras's `gradient_accumulation_steps` and optax's `MultiSteps` is that only when every call
counts the same (the 2024 accumulation bug of several large-model trainers was that it did not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from trainop import _gradients, _variables

# The callable that makes a window's update, given the (mean gradient, variable) pairs, the mean
# loss and whether to run the caller's update ops; returns the ops to wait for.
WindowUpdate = Callable[[list[tuple[Any, Any]], tf.Tensor, bool], Sequence[Any]]


class _Window:
    """What the accumulator knows besides its checkpointed variables: the sums by the key of
    their variable, and what the train op's trace left to apply a window with. Held apart from
    the module's attributes, which `tf.Module` tracks."""

    def __init__(self) -> None:
        self.sums: dict[int, tf.Variable] = {}
        # What the train op's trace saw: the update of a window, the variables in the order
        # it takes them, the loss's dtype; and the function that applies a partial window.
        self.window_update: WindowUpdate | None = None
        self.variables: list[Any] = []
        self.loss_dtype: tf.DType | None = None
        self.flush: Any = None
        # In a tf.compat.v1 graph: the ops that apply and that drop a partial window.
        self.graph_ops: tuple[Any, Any] | None = None


class GradientAccumulator(tf.Module):
    """Adds each call's weighted gradients and loss; every `steps` calls, applies their means.

    One accumulator per train op. Its variables (a sum per trained variable, kept in float32 for
    16-bit variables; the loss's sum; the window's calls and total count) are made the first
    time a variable is seen, outside any function, as the optimizer's slots are. It is a
    `tf.Module`: `trainop.train` checkpoints it (it is the train op's `accumulator`), so a run
    stopped inside a window resumes with its sums, and at the end of the data applies or drops
    a partial window. An `IndexedSlices` gradient is summed into a dense
    variable the size of its table, and its mean applied as a dense gradient.

    Args:
      steps: the calls per applied update, at least 2.
    """

    def __init__(self, steps: int):
        super().__init__(name="gradient_accumulator")
        self.steps = steps
        # Checkpointed by position, in the order of the variables' names (see
        # `averaging.ExponentialMovingAverage.averages`).
        self.gradient_sums: list[tf.Variable] = []
        self.calls: tf.Variable | None = None
        self.total_count: tf.Variable | None = None
        self.loss_sum: tf.Variable | None = None
        self._index = _Window()

    def build(self, variables: Sequence[Any], loss_dtype: tf.DType) -> None:
        """Makes what is missing of the sums of `variables`, the loss's and the counters."""
        with tf.init_scope():
            if self.calls is None:
                self.calls = tf.Variable(0, dtype=tf.int64, trainable=False, name="window_calls")
                self.total_count = tf.Variable(
                    0.0, dtype=tf.float32, trainable=False, name="window_count"
                )
                self.loss_sum = tf.Variable(
                    tf.zeros([], _gradients.wide_dtype(loss_dtype)),
                    trainable=False,
                    name="window_loss_sum",
                )
            _variables.add_slots(
                variables,
                self._index.sums,
                self.gradient_sums,
                "gradient_sum",
                _gradients.wide_dtype,
            )

    def pending_calls(self, session: Any = None) -> int:
        """How many calls the current window holds (0 before the first call); in a
        `tf.compat.v1` graph, read with `session`."""
        if self.calls is None:
            return 0
        return int(session.run(self.calls) if session is not None else self.calls.numpy())

    def build_graph_ops(self) -> None:
        """Makes, in the current `tf.compat.v1` graph, the ops that `apply_partial_window` and
        `drop_partial_window` run there."""
        index = self._index
        if index.graph_ops is None and index.window_update is not None:
            with tf.name_scope("partial_window"):
                apply_op = self._apply_partial()
                with tf.control_dependencies(None):
                    drop_op = tf.group(*self._reset())
            index.graph_ops = (apply_op, drop_op)

    def add_and_maybe_apply(
        self,
        grads_and_vars: Sequence[tuple[Any, Any]],
        loss: tf.Tensor,
        count: tf.Tensor | None,
        update: WindowUpdate,
    ) -> tf.Tensor:
        """Adds this call's gradients and loss, weighted by `count`; on the `steps`-th call of
        the window, makes the window's update with `update` and starts a new window.

        Args:
          grads_and_vars: this call's (gradient, variable) pairs, the gradients of its mean
            loss; None gradients add nothing.
          loss: this call's mean loss, a scalar.
          count: what this call's loss counts (its examples, its tokens), a scalar; None: 1.
          update: makes the update from the window's (mean gradient, variable) pairs (in the
            order of `grads_and_vars`, None where the gradient is None) and mean loss; kept,
            to apply a partial window later (`apply_partial_window`).

        Returns:
          A boolean tensor, whether this call applied an update.
        """
        index = self._index
        index.window_update, index.loss_dtype = update, loss.dtype
        index.variables = [v for _, v in grads_and_vars]
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        self.build([v for _, v in pairs], loss.dtype)
        sums = [self._index.sums[_variables.variable_key(v)] for _, v in pairs]
        # Without a count each call weighs 1, and nothing is multiplied.
        weight = None if count is None else tf.cast(count, tf.float32)

        def weighted(value: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
            value = tf.cast(value, dtype)
            return value if weight is None else value * tf.cast(weight, dtype)

        added = [
            self.loss_sum.assign_add(weighted(loss, self.loss_sum.dtype), read_value=False),
            self.total_count.assign_add(
                tf.constant(1.0) if weight is None else weight, read_value=False
            ),
        ]
        for (grad, _), total in zip(pairs, sums):
            if isinstance(grad, tf.IndexedSlices):
                values = weighted(grad.values, total.dtype)
                added.append(
                    total.scatter_add(tf.IndexedSlices(values, grad.indices, grad.dense_shape))
                )
            else:
                added.append(total.assign_add(weighted(grad, total.dtype), read_value=False))
        with tf.control_dependencies(added):
            calls = self.calls.assign_add(1)
            # Read here, not in the branch that resets them: as inputs of the cond, they are
            # read before any op of the branch runs. Read in the branch, only an automatic
            # control dependency ordered each read before its reset, and Grappler's dependency
            # optimizer can drop it (it did: a mean of zero was applied, at random).
            window = self._read_window(sums)

        def apply_window() -> tf.Tensor:
            with tf.control_dependencies(self._apply(window, [v for _, v in pairs], True)):
                return tf.constant(True)

        return tf.cond(calls >= self.steps, apply_window, lambda: tf.constant(False))

    def _read_window(self, sums: list[tf.Variable]) -> tuple[list[tf.Tensor], tf.Tensor, Any]:
        return (
            [total.read_value() for total in sums],
            self.loss_sum.read_value(),
            self.total_count.read_value(),
        )

    def _apply(
        self,
        window: tuple[list[tf.Tensor], tf.Tensor, Any],
        summed: list[Any],
        run_update_ops: bool,
    ) -> list[Any]:
        """Adds the window's update on its means (of the variables `summed`, whose sums
        `window` holds, in that order), then resets the window; returns the ops."""
        totals, loss_total, total_count = window
        mean_of = {}
        for value, v in zip(totals, summed):
            # A window that counted nothing (every token masked) applies a zero gradient.
            mean = tf.math.divide_no_nan(value, tf.cast(total_count, value.dtype))
            mean_of[_variables.variable_key(v)] = tf.cast(mean, _variables.as_tf_variable(v).dtype)
        index = self._index
        means = [(mean_of.get(_variables.variable_key(v)), v) for v in index.variables]
        mean_loss = tf.math.divide_no_nan(loss_total, tf.cast(total_count, loss_total.dtype))
        mean_loss = tf.cast(mean_loss, index.loss_dtype)
        with tf.control_dependencies(list(index.window_update(means, mean_loss, run_update_ops))):
            return self._reset()

    def _reset(self) -> list[Any]:
        reset = [t.assign(tf.zeros_like(t), read_value=False) for t in self._index.sums.values()]
        reset.append(self.loss_sum.assign(tf.zeros_like(self.loss_sum), read_value=False))
        reset.append(self.total_count.assign(0.0, read_value=False))
        reset.append(self.calls.assign(0, read_value=False))
        return reset

    def apply_partial_window(self, session: Any = None) -> int:
        """Applies the update of the calls the window holds, if any (their weighted mean), and
        starts a new window; returns how many calls it held. After the train op's calls; in a
        `tf.compat.v1` graph, run in `session`."""
        pending = self.pending_calls(session)
        if pending == 0 or self._index.window_update is None:
            return 0
        if session is not None:
            session.run(self._index.graph_ops[0])
            return pending
        if self._index.flush is None:
            self._index.flush = tf.function(self._apply_partial)
        self._index.flush()
        return pending

    def _apply_partial(self) -> tf.Tensor:
        # The variables that had a gradient in the train op's trace, as a window's calls sum.
        summed = [
            v for v in self._index.variables if _variables.variable_key(v) in self._index.sums
        ]
        sums = [self._index.sums[_variables.variable_key(v)] for v in summed]
        # The caller's update ops belong to a call's batch: a partial window runs none.
        with tf.control_dependencies(self._apply(self._read_window(sums), summed, False)):
            return tf.constant(True)

    def drop_partial_window(self, session: Any = None) -> int:
        """Drops the calls the window holds; returns how many there were; in a
        `tf.compat.v1` graph, run in `session`."""
        pending = self.pending_calls(session)
        if pending and session is not None:
            session.run(self._index.graph_ops[1])
        elif pending:
            self._reset()
        return pending
