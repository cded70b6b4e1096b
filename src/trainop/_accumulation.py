"""Gradient accumulation: the mean gradient of N calls, applied once.

With a loss averaged over its batch, the mean of the gradients of N batches is the gradient of
the batch N times larger, so N calls of the accumulating train op make the update that one step
on the large batch would (up to float rounding), in the memory of a small one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from trainop import _gradients, _variables


class GradientAccumulator:
    """Sums the gradients of `steps` calls and then runs the update on their mean.

    One accumulator per train op; its variables (a sum per trained variable, of the losses, and a
    call count)
    are made the first time a variable is seen, outside any function, as the optimizer's slots
    are. They are not checkpointed: a run resumed mid-accumulation starts its sums again. An
    `IndexedSlices` gradient is summed into a dense variable the size of its table, and its
    mean applied as a dense gradient.

    Args:
      steps: the calls per applied update, at least 2.
    """

    def __init__(self, steps: int):
        self.steps = steps
        self._sums: dict[int, tf.Variable] = {}
        self._count: tf.Variable | None = None
        self._loss_total: tf.Variable | None = None

    def _sum_for(self, variable: Any) -> tf.Variable:
        key = _variables.variable_key(variable)
        if key not in self._sums:
            tf_variable = _variables.as_tf_variable(variable)
            # float16 and bfloat16 sums overflow early: they are kept in float32.
            dtype = tf.float32 if tf_variable.dtype.size < 4 else tf_variable.dtype
            with tf.init_scope():
                self._sums[key] = tf.Variable(
                    tf.zeros(tf_variable.shape, dtype),
                    trainable=False,
                    name=_variables.variable_name(variable).replace(":", "_") + "/gradient_sum",
                )
        return self._sums[key]

    def _counter(self) -> tf.Variable:
        if self._count is None:
            with tf.init_scope():
                self._count = tf.Variable(
                    0, dtype=tf.int64, trainable=False, name="accumulated_calls"
                )
        return self._count

    def _loss_sum(self, loss: tf.Tensor) -> tf.Variable:
        if self._loss_total is None:
            with tf.init_scope():
                self._loss_total = tf.Variable(
                    tf.zeros([], _gradients.wide_dtype(loss.dtype)),
                    trainable=False,
                    name="accumulated_loss",
                )
        return self._loss_total

    def add_and_maybe_apply(
        self,
        grads_and_vars: Sequence[tuple[Any, Any]],
        loss: tf.Tensor,
        apply: Callable[[list[tuple[Any, Any]], tf.Tensor], Sequence[Any]],
    ) -> tf.Tensor:
        """Adds this call's gradients and loss; on the `steps`-th call, runs `apply` on the means.

        Args:
          grads_and_vars: this call's (gradient, variable) pairs; None gradients add nothing.
          loss: this call's loss, a scalar.
          apply: adds the update for the (mean gradient, variable) pairs, in the order of
            `grads_and_vars` (None where the gradient is None), and the mean loss; returns the
            ops to wait for.

        Returns:
          A boolean tensor, whether this call applied an update.
        """
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        sums = [self._sum_for(v) for _, v in pairs]
        count = self._counter()
        loss_sum = self._loss_sum(loss)
        added = [loss_sum.assign_add(tf.cast(loss, loss_sum.dtype), read_value=False)]
        for (grad, _), total in zip(pairs, sums):
            if isinstance(grad, tf.IndexedSlices):
                values = tf.cast(grad.values, total.dtype)
                added.append(
                    total.scatter_add(tf.IndexedSlices(values, grad.indices, grad.dense_shape))
                )
            else:
                added.append(total.assign_add(tf.cast(grad, total.dtype), read_value=False))
        with tf.control_dependencies(added):
            calls = count.assign_add(1)
            # The sums are read here, not in the branch that resets them: as inputs of the
            # cond, they are read before any op of the branch runs. Read in the branch, only
            # an automatic control dependency ordered each read before its reset, and
            # Grappler's dependency optimizer can drop it (it did, as redundant through an
            # IdentityN that a later pass removed: a mean of zero was applied, at random).
            totals = [total.read_value() for total in sums]
            loss_total = loss_sum.read_value()

        def apply_means() -> tf.Tensor:
            mean_of = {
                _variables.variable_key(v): tf.cast(value / self.steps, grad.dtype)
                for value, (grad, v) in zip(totals, pairs)
            }
            means = [(mean_of.get(_variables.variable_key(v)), v) for _, v in grads_and_vars]
            mean_loss = tf.cast(loss_total / self.steps, loss.dtype)
            with tf.control_dependencies(apply(means, mean_loss)):
                reset = [total.assign(tf.zeros_like(total), read_value=False) for total in sums]
                reset.append(loss_sum.assign(tf.zeros_like(loss_sum), read_value=False))
                reset.append(count.assign(0, read_value=False))
            with tf.control_dependencies(reset):
                return tf.constant(True)

        def keep_adding() -> tf.Tensor:
            return tf.constant(False)

        return tf.cond(calls >= self.steps, apply_means, keep_adding)
