"""`Rollback`: what `trainop.train` does when the numerics guard gives up, instead of stopping."""

from __future__ import annotations

import logging
from typing import Any

import tensorflow as tf

from trainop import _checkpoints, _optimizers, numerics
from trainop._checks import check_count, is_number

logger = logging.getLogger("trainop")


class Rollback:
    """Restores the last healthy checkpoint, lowers the learning rate and trains on.

    Pass it as `trainop.train(..., rollback=Rollback(optimizer))`. When the train op's numerics
    guard gives up (the default check's error on an inf or NaN loss, or a `SkipNonFiniteSteps`
    past `max_consecutive` skipped steps in a row: the number of bad steps that triggers a roll
    back is the guard's), `train` restores the newest checkpoint in its `logdir` whose
    variables are all finite (the model, the optimizer's slots and counters, the global step,
    the guard's counts if it is in `checkpoint`), multiplies the learning rate by
    `learning_rate_factor`, and goes on with the batches that come next: those consumed since
    the checkpoint are not seen again, as the restarts of large-model runs skip the batches
    around a loss spike (PaLM, section 5.1). Each roll back is logged (a warning on the
    `trainop` logger) and counted in `TrainResult.rollbacks`; after `max_rollbacks` of them in
    one call of `train`, the guard's next error passes through, with its diagnosis. `train`
    writes a checkpoint after its first call (once the optimizer's slots exist), so that there
    is one to go back to; an error before it passes through. The optimizer must be in
    `checkpoint` (or held by something there), so that rolling back restores its state.

    The learning rate must be a value the steps read (a Keras 3 or tf_keras optimizer made with
    a number, or a `tf.compat.v1` optimizer given a `tf.Variable`), not a schedule, unless
    `learning_rate_factor` is 1.

    Args:
      optimizer: the train op's optimizer (a Keras 3 `LossScaleOptimizer`: the inner rate).
      max_rollbacks: how many times one call of `train` may roll back (an integer >= 1).
      learning_rate_factor: what the learning rate is multiplied by at each roll back, in
        (0, 1].

    Attributes:
      optimizer: as given.
      max_rollbacks: as given.
      learning_rate_factor: as given, a float.

    Raises:
      TypeError: if `optimizer` is not an optimizer trainop supports, or its learning rate is
        a schedule or a number baked into the step while `learning_rate_factor` is not 1.
      ValueError: if `max_rollbacks` is not a positive integer or `learning_rate_factor` is
        not in (0, 1].

    Example:
      >>> import keras, trainop
      >>> optimizer = keras.optimizers.Adam(1e-3)
      >>> trainop.Rollback(optimizer, max_rollbacks=2, learning_rate_factor=0.5)
      Rollback(Adam, max_rollbacks=2, learning_rate_factor=0.5)
    """

    def __init__(self, optimizer: Any, max_rollbacks: int = 3, learning_rate_factor: float = 0.5):
        self._adapter = _optimizers.OptimizerAdapter(optimizer)
        check_count("max_rollbacks", max_rollbacks)
        if not (is_number(learning_rate_factor) and 0 < learning_rate_factor <= 1):
            raise ValueError(
                "`learning_rate_factor` must be in (0, 1]. "
                f"Received: learning_rate_factor={learning_rate_factor!r}"
            )
        if learning_rate_factor != 1 and not self._adapter.learning_rate_is_a_number():
            raise TypeError(
                "`optimizer`'s learning rate cannot be multiplied by `learning_rate_factor`: it "
                "is a schedule, or a number a tf.compat.v1 optimizer bakes into its step. Make "
                "the optimizer with a number (Keras) or a tf.Variable (tf.compat.v1), or pass "
                f"learning_rate_factor=1. Received: optimizer={optimizer!r}"
            )
        self.optimizer = optimizer
        self.max_rollbacks = int(max_rollbacks)
        self.learning_rate_factor = float(learning_rate_factor)

    def __repr__(self) -> str:
        return (
            f"Rollback({type(self.optimizer).__name__}, max_rollbacks={self.max_rollbacks}, "
            f"learning_rate_factor={self.learning_rate_factor})"
        )

    def check_saved_in(self, checkpoint: Any) -> None:
        """Raises a ValueError unless the optimizer is among what `checkpoint` (the mapping
        given to `train`) saves, directly or held by one of its objects."""
        root = tf.train.Checkpoint(**checkpoint)  # held: the view refers to it weakly
        saved = tf.train.TrackableView(root).descendants()
        if not any(node is self.optimizer for node in saved):
            raise ValueError(
                "`rollback`'s optimizer is not in `checkpoint`: rolling back could not restore "
                "its state. Add it (checkpoint={..., 'optimizer': optimizer}), and pass the "
                "train op's own optimizer to Rollback."
            )

    def roll_back(
        self, saver: _checkpoints.Checkpoints, error: BaseException, done: int
    ) -> str | None:
        """Rolls back after `error`, the `done + 1`-th time; returns the checkpoint restored, or
        None (logged) if no more roll backs are allowed or no checkpoint was written yet.

        Raises:
          FloatingPointError: if every checkpoint holds inf or NaN (from
            `Checkpoints.restore_latest_finite`).
        """
        if done >= self.max_rollbacks:
            logger.error(
                "The numerics guard gave up after %d roll back(s), the most allowed: stopping.",
                done,
            )
            return None
        scaled = self.learning_rate_factor != 1
        before = self._learning_rate() if scaled else None
        path = saver.restore_latest_finite(data_position=False)
        if path is None:
            logger.error(
                "The numerics guard gave up before a first checkpoint: nothing to roll back to."
            )
            return None
        rate = "learning rate unchanged"
        if before is not None:
            after = before * self.learning_rate_factor
            self._set_learning_rate(after)
            rate = f"learning rate {before:.6g} -> {after:.6g}"
        for guard in numerics.guards_of(self.optimizer):
            guard.consecutive_skipped_steps.assign(0)
        logger.warning(
            "Rolled back to %s (roll back %d of %d) after: %s. %s; training goes on with the "
            "batches that come next.",
            path,
            done + 1,
            self.max_rollbacks,
            _what_failed(error),
            rate[0].upper() + rate[1:],
        )
        return path

    def _learning_rate(self) -> float:
        variable = self._adapter.learning_rate_variable()
        if variable is not None:
            return float(variable.numpy())
        return float(self.optimizer._hyper["learning_rate"])  # tf_keras legacy, before its step

    def _set_learning_rate(self, value: float) -> None:
        variable = self._adapter.learning_rate_variable()
        if variable is not None:
            variable.assign(tf.cast(value, variable.dtype))
        else:
            self.optimizer.learning_rate = value  # tf_keras legacy: its own setter


def _what_failed(error: BaseException) -> str:
    """The line of the guard's error that says what failed (an assertion's is in the middle of
    TensorFlow's message), with where the batch was, which ends the message."""
    lines = [line.strip() for line in error.message.splitlines() if line.strip()]
    said = next(
        (
            line
            for line in lines
            if numerics.LOSS_NOT_FINITE_MESSAGE in line or numerics.NOT_FINITE_MESSAGE in line
        ),
        lines[-1] if lines else "",
    )
    where = lines[-1][lines[-1].rfind(" (batch ") :] if lines and " (batch " in lines[-1] else ""
    return (said if where in said else said + where)[:1000]
