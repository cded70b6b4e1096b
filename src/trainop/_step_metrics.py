"""The numbers of a train op's last step, kept on the device for whoever reads them."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from trainop import _gradients


class StepMetrics(tf.Module):
    """What a train op's last step did, in variables the step writes and nothing reads.

    A train op made with `step_metrics=True` has one, as `train_op.step_metrics` (and
    `trainop.keras.compile(..., step_metrics=True)` adds them to `fit`'s logs). The step only
    writes them, on the device: reading them (`result()`, `.numpy()`) is the caller's host read,
    as often as it likes: every step in a custom loop, at each refresh of `trainop.train`'s
    progress bar, at each of `fit`'s log updates. Attributes, each a `tf.Variable`:

    * `gradient_norm` (float32 scalar): the global norm of the last step's gradients as the loss
      gives them, before `transform_grads_fn` (the `train/global_gradient_norm` summary's
      value); inf or NaN for a step the guard rejected for it. With accumulation, of the
      last call's own gradients.
    * `applied_gradient_norm` (float32 scalar): the global norm of the gradients last applied,
      after `transform_grads_fn` (with accumulation, of the window's mean); kept from the
      last applied update by a step that applied none.
    * `applied` (bool scalar): whether the last call applied an update (False: skipped by the
      numerics guard or by a loss-scale optimizer for an overflow, or an accumulation window
      not complete yet).

    With a `SkipNonFiniteSteps` guard, `result()` also holds its `skipped_steps` and
    `consecutive_skipped_steps`. With `steps_per_call`, the values are those of the call's
    last step. Peers: Keras's `train_step` logs, the `grad_norm` of Hugging Face's `Trainer`.

    Args:
      guard: the train op's `SkipNonFiniteSteps`, whose counts `result()` adds; None.

    Example:
      >>> import keras, tensorflow as tf, trainop
      >>> w = tf.Variable([3.0, 4.0])
      >>> train_op = trainop.create_train_op(lambda: tf.reduce_sum(w), keras.optimizers.SGD(0.1),
      ...                                    global_step=None, step_metrics=True)
      >>> _ = train_op()
      >>> numbers = train_op.step_metrics.result()
      >>> float(numbers["gradient_norm"]), bool(numbers["applied"])  # the gradient is [1, 1]
      (1.4142135381698608, True)
    """

    def __init__(self, guard: Any = None):
        super().__init__(name="step_metrics")
        self.gradient_norm: tf.Variable | None = None
        self.applied_gradient_norm: tf.Variable | None = None
        self.applied: tf.Variable | None = None
        self._guard = guard

    def build(self) -> None:
        """Makes the variables, outside any function, once."""
        if self.applied is not None:
            return
        with tf.init_scope():
            self.gradient_norm = tf.Variable(
                float("nan"), trainable=False, name="gradient_norm", dtype=tf.float32
            )
            self.applied_gradient_norm = tf.Variable(
                float("nan"), trainable=False, name="applied_gradient_norm", dtype=tf.float32
            )
            self.applied = tf.Variable(False, trainable=False, name="applied")

    def written_by_update(self) -> list[tf.Variable]:
        """What the update writes (not `gradient_norm`, written before it)."""
        return [self.applied_gradient_norm, self.applied]

    def result(self) -> dict[str, tf.Tensor]:
        """The last step's numbers by name (as in `fit`'s logs): `gradient_norm`,
        `applied_gradient_norm`, `applied` and, with a skip guard, `skipped_steps` and
        `consecutive_skipped_steps`; tensors on the device, read when converted.

        Raises:
          ValueError: no step has run yet.
        """
        if self.applied is None:
            raise ValueError("step_metrics: no step has run yet.")
        values = {
            "gradient_norm": self.gradient_norm.read_value(),
            "applied_gradient_norm": self.applied_gradient_norm.read_value(),
            "applied": self.applied.read_value(),
        }
        guard = self._guard
        if guard is not None and getattr(guard, "skipped_steps", None) is not None:
            values["skipped_steps"] = guard.skipped_steps.read_value()
            values["consecutive_skipped_steps"] = guard.consecutive_skipped_steps.read_value()
        return values

    def record_gradients(self, grads: list[Any]) -> tuple[Any, tf.Tensor]:
        """Assigns the global norm of `grads` (the step's, before any transform); returns the
        op and the norm."""
        norm = _gradients.quick_global_norm(grads)
        return self.gradient_norm.assign(norm, read_value=False), norm

    def record_applied(
        self,
        grads: list[Any],
        applied: tf.Tensor | None = None,
        norm: tf.Tensor | None = None,
    ) -> list[Any]:
        """Assigns the norm of the applied `grads` (`norm`, if it is known already), and that
        an update was applied; where the boolean tensor `applied` is False (an optimizer that
        skipped the update), neither."""
        if norm is None:
            norm = _gradients.quick_global_norm(grads)
        if applied is None:
            return [
                self.applied_gradient_norm.assign(norm, read_value=False),
                self.applied.assign(True, read_value=False),
            ]
        kept = tf.where(applied, norm, self.applied_gradient_norm.read_value())
        return [
            self.applied_gradient_norm.assign(kept, read_value=False),
            self.applied.assign(applied, read_value=False),
        ]
