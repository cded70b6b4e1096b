"""The loop's checkpoints: written only when every variable is finite, restored newest first."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from trainop import _optimizers, _variables
from trainop._data import Batches

logger = logging.getLogger("trainop")


class Checkpoints:
    """A `CheckpointManager` that writes only checkpoints whose variables are all finite."""

    def __init__(
        self,
        objects: Mapping[str, Any],
        global_step: tf.Variable,
        batches: Batches,
        directory: str,
        max_to_keep: int,
        session: Any,
        restore_data_position: bool = True,
        accumulator: Any = None,
    ):
        state = {"global_step": global_step}
        if accumulator is not None:
            # The sums of an accumulation window, so that a run stopped inside one resumes it.
            state["accumulation"] = accumulator
        extra = dict(state)
        if batches.trackable is not None:
            extra["data"] = batches.trackable
        clashing = sorted(set(objects) & set(extra))
        if clashing:
            raise ValueError(
                f"`checkpoint` must not use the names {clashing}: the loop saves the global "
                "step, the accumulation window and the data position under them."
            )
        self.checkpoint = tf.train.Checkpoint(**objects, **extra)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep)
        # What a resume restores: all of it, or all but the data position.
        self._without_data = tf.train.Checkpoint(**objects, **state)
        self._restored = self.checkpoint if restore_data_position else self._without_data
        self._session = session
        self._batches = batches
        self._finite_ops: dict[tuple[int, ...], Any] = {}

    def float_variables(self) -> list[tf.Variable]:
        """Every float variable the checkpoint saves, optimizer slots included.

        Gathered at each call: a model built on its first call and an optimizer's slots appear
        after training starts.
        """
        found: dict[int, tf.Variable] = {}
        for node in tf.train.TrackableView(self.checkpoint).descendants():
            candidates = [node]
            # Slot variables are saved through their optimizer, not as its children.
            if is_optimizer(node):
                slots = node.variables
                candidates += list(slots() if callable(slots) else slots)
            for candidate in candidates:
                variable = _variables.as_tf_variable(candidate)
                if isinstance(variable, tf.Variable) and variable.dtype.is_floating:
                    found.setdefault(id(variable), variable)
        return list(found.values())

    def non_finite_variables(self) -> list[str]:
        """The names of the checkpoint's variables that hold inf or NaN."""
        variables = self.float_variables()
        if not variables:
            return []
        if self._session is not None:
            key = tuple(id(v) for v in variables)
            if key not in self._finite_ops:
                self._finite_ops[key] = [tf.reduce_all(tf.math.is_finite(v)) for v in variables]
            finite = self._session.run(self._finite_ops[key])
        else:
            finite = [bool(tf.reduce_all(tf.math.is_finite(v))) for v in variables]
        return [_variables.variable_name(v) for v, ok in zip(variables, finite) if not ok]

    def save(self, step: int) -> str:
        """Writes a checkpoint numbered `step`.

        Raises:
          FloatingPointError: if a variable holds inf or NaN; nothing is written, and the
            checkpoints already written are kept.
        """
        bad = self.non_finite_variables()
        if bad:
            raise FloatingPointError(
                f"Not saving a checkpoint at global step {step}: these variables hold inf or "
                f"NaN: {bad[:10]}{' ...' if len(bad) > 10 else ''}. The checkpoints already "
                f"written are kept: {self.manager.checkpoints}"
            )
        if self._session is None:
            self._batches.before_save()
        return self.manager.save(checkpoint_number=step)

    def restore_latest_finite(self, data_position: bool = True) -> str | None:
        """Restores the newest checkpoint whose variables are all finite; returns its path.

        Args:
          data_position: False: all but the data position, which stays where it is (a roll
            back goes on with the batches that come next).

        Raises:
          FloatingPointError: if every checkpoint holds inf or NaN (the variables now hold the
            oldest one's values: training must not go on from them).
        """
        for path in reversed(self.manager.checkpoints):
            if data_position:
                self._restore(path)
            else:
                self._run_restore(self._without_data, path)
            bad = self.non_finite_variables()
            if not bad:
                return path
            logger.warning("Checkpoint %s holds inf or NaN in %s: trying an older one.", path, bad)
        if self.manager.checkpoints:
            raise FloatingPointError(
                f"Every checkpoint in {self.manager.directory} holds inf or NaN: "
                f"{self.manager.checkpoints}. Remove them (or pick another logdir) to start over."
            )
        return None

    def _restore(self, path: str) -> None:
        """Restores `path`; the data position too, unless `restore_data_position` was False.

        Raises:
          ValueError: if the data position cannot be restored into the dataset given (its
            pipeline is not the one that saved it) while the rest of the checkpoint can.
        """
        try:
            self._run_restore(self._restored, path)
        except (tf.errors.OpError, ValueError) as error:
            if self._restored is self._without_data:
                raise
            try:
                self._run_restore(self._without_data, path)
            except (tf.errors.OpError, ValueError):
                raise error from None
            logger.debug("Restoring the data position from %s failed: %s", path, error)
            raise ValueError(
                f"`dataset` is not the input pipeline that saved {path} (its definition "
                "changed), so its position there cannot be restored: start a new `logdir`, or "
                "pass `restore_data_position=False` to resume from the checkpoint and read "
                "`dataset` from its start."
            ) from None

    def _run_restore(self, checkpoint: tf.train.Checkpoint, path: str) -> None:
        status = checkpoint.restore(path)
        if checkpoint is self._without_data:
            status.expect_partial()  # The data position is in the file, and left there.
        if self._session is not None:
            status.run_restore_ops(self._session)


def is_optimizer(value: Any) -> bool:
    try:
        _optimizers.optimizer_family(value)
    except TypeError:
        return False
    return True
