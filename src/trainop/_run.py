"""The loop's body, `run`: calls the step until the data, `max_steps`, a hook or a signal
stops it, saving at the cadence and at the end; and what `train` takes and returns from its
user (`Hook`, `StopTraining`, `TrainResult`, re-exported by `trainop`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from trainop import _checkpoints, _console, numerics
from trainop._checks import check_count

logger = logging.getLogger("trainop")

# `TrainResult.stopped_by` when the global step reached `max_steps`, and when the data ran out.
MAX_STEPS = "max_steps"
END_OF_DATA = "end_of_data"

# A global step that stays put for this many calls in a row means the train op does not count
# the step the loop reads (a skip guard raises long before).
_MAX_CALLS_WITHOUT_PROGRESS = 1000


class StopTraining(Exception):
    """Raised by a hook to end training: the loop saves a checkpoint and returns.

    As Keras's `model.stop_training = True` from a callback, or a `SessionRunHook` calling
    `request_stop()`: the step under way is complete, the loop writes a checkpoint (with
    `checkpoint`) and returns a `TrainResult` whose `stopped_by` is
    `'StopTraining: <message>'`. Raised anywhere else, it is an ordinary exception.

    Args:
      *args: the message, as for any `Exception`.

    Example:
      >>> import keras, tensorflow as tf, trainop
      >>> step, w = tf.Variable(0, dtype=tf.int64), tf.Variable(1.0)
      >>> train_op = trainop.create_train_op(lambda: (w - 3.0) ** 2, keras.optimizers.SGD(0.4),
      ...                                    global_step=step)
      >>> def stop_when_good(step, loss):
      ...     if loss < 0.01:
      ...         raise trainop.StopTraining(f"loss {loss:.2g} at step {step}")
      >>> result = trainop.train(train_op, max_steps=100, global_step=step, progress=False,
      ...                        hooks=[trainop.Hook(stop_when_good)])
      >>> result.stopped_by, result.global_step
      ('StopTraining: loss 0.0064 at step 3', 3)
    """


@dataclasses.dataclass(frozen=True)
class Hook:
    """User code that `train` calls every `every_n_steps` global steps.

    Precisely: after each call of the train op in which the global step reached or passed a
    multiple of `every_n_steps` (a call that runs several steps, `steps_per_call`, can pass
    one), with the global step read after that call, which need then not be the multiple
    itself. It plays the part of a Keras callback's `on_train_batch_end`; the hooks due after
    a call run in the order of `hooks`.

    Args:
      fn: called as `fn(global_step, loss)` with Python numbers: the global step after the
        call, and the loss the train op returned (a structure's `loss` field or `'loss'` key,
        else its first element; the last of a vector of `steps_per_call` losses), or None if
        it is not a number. It may raise `StopTraining` to end training after this step.
      every_n_steps: the cadence, in global steps; 1 (the default): after every call.

    Attributes:
      fn: the callable, as given.
      every_n_steps: the cadence, as given.

    Raises:
      TypeError: if `fn` is not callable.
      ValueError: if `every_n_steps` is not a positive integer.

    Example:
      >>> import keras, tensorflow as tf, trainop
      >>> step, w = tf.Variable(0, dtype=tf.int64), tf.Variable(1.0)
      >>> train_op = trainop.create_train_op(lambda: (w - 3.0) ** 2, keras.optimizers.SGD(0.1),
      ...                                    global_step=step)
      >>> seen = []
      >>> hook = trainop.Hook(lambda step, loss: seen.append(step), every_n_steps=2)
      >>> _ = trainop.train(train_op, max_steps=5, global_step=step, hooks=[hook],
      ...                   progress=False)
      >>> seen
      [2, 4]
    """

    fn: Callable[[int, float], Any]
    every_n_steps: int = 1

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"`fn` must be callable. Received: fn={self.fn!r:.200}")
        check_count("every_n_steps", self.every_n_steps)


@dataclasses.dataclass
class TrainResult:
    """What `train` did: returned by `train`, not made by users.

    Attributes:
      global_step: the global step at the end.
      loss: the loss of the last step run, as a Python float (as a `Hook` gets it), or None
        if none ran.
      steps_run: the calls of the train op in this run (with `steps_per_call`, each ran
        several steps).
      stopped_by: why the run ended: 'max_steps' (the global step reached it), 'end_of_data'
        (`dataset` ran out, or a graph's input raised `tf.errors.OutOfRangeError`), 'SIGTERM'
        or 'SIGINT' (a signal), or 'StopTraining: <its message>' (a hook).
      resumed_from: the path of the checkpoint restored at the start, or None.
      last_checkpoint: the path of the newest checkpoint at the end (written by this run or
        restored), or None.
      rollbacks: how many times the run rolled back (see `trainop.Rollback`).

    Example:
      >>> import keras, tensorflow as tf, trainop
      >>> step, w = tf.Variable(0, dtype=tf.int64), tf.Variable(1.0)
      >>> train_op = trainop.create_train_op(lambda x: (w * x - 3.0) ** 2,
      ...                                    keras.optimizers.SGD(0.1), global_step=step)
      >>> result = trainop.train(train_op, [1.0, 1.0], global_step=step, progress=False)
      >>> result.stopped_by, result.global_step, result.steps_run, result.last_checkpoint
      ('end_of_data', 2, 2, None)
      >>> round(result.loss, 4)  # (w - 3) ** 2 before the second update: w = 1.4
      2.56
    """

    global_step: int
    loss: float | None
    steps_run: int
    stopped_by: str
    resumed_from: str | None
    last_checkpoint: str | None
    rollbacks: int = 0


def first_loss(result: Any) -> Any:
    """The loss in what a train op returns: itself, its `loss` (TF-Agents' `LossInfo`, a dict's
    'loss' key), else its first element."""
    if isinstance(result, Mapping) and "loss" in result:
        return result["loss"]
    if not isinstance(result, (tf.Tensor, tf.Variable)) and hasattr(result, "loss"):
        return result.loss
    flat = tf.nest.flatten(result)
    return flat[0] if flat else None


def as_float(value: Any) -> float | None:
    """A loss as a Python float: a vector of losses (`steps_per_call`) gives its last."""
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return float(array.reshape(-1)[-1]) if array.size else None


class PartialWindow:
    """The accumulation window of a train op (its `accumulator`) as the loop sees it: how many
    calls it holds, and what the end of the data does with them (`partial_window`).

    Args:
      accumulator: the train op's `_accumulation.GradientAccumulator`.
      partial_window: 'apply' (their update, on the weighted mean of the calls held), 'drop'
        or 'keep' (left in the sums, which the checkpoint saves, for a run that goes on).
      session: the `Session` of a graph train op; None for an eager one.
    """

    def __init__(self, accumulator: Any, partial_window: str, session: Any = None):
        self._accumulator = accumulator
        self._partial_window = partial_window
        self._session = session

    def pending(self) -> int:
        return self._accumulator.pending_calls(self._session)

    def at_end_of_data(self) -> None:
        pending, steps = self.pending(), self._accumulator.steps
        if not pending:
            return
        if self._partial_window == "apply":
            self._accumulator.apply_partial_window(self._session)
            done = "applied their update"
        elif self._partial_window == "drop":
            self._accumulator.drop_partial_window(self._session)
            done = "dropped them"
        else:
            done = "kept them in the accumulation sums, saved with the checkpoint"
        # Loud unless the calls were applied (the default): data dropped, or left pending.
        logger.log(
            logging.INFO if self._partial_window == "apply" else logging.WARNING,
            "The data ended inside an accumulation window, after %d of its %d calls: "
            "partial_window=%r %s.",
            pending,
            steps,
            self._partial_window,
            done,
        )


class Run:
    """What the loop knows as it runs: the global step, the last loss, what was saved."""

    def __init__(
        self,
        read_step: Callable[[], int],
        saver: _checkpoints.Checkpoints | None,
        resumed_from: str | None,
        hooks: list[Hook],
        save_every_n_steps: int,
        hooks_writer: Any = None,
        step_metrics: Any = None,
    ):
        self._read_step = read_step
        # The train op's `StepMetrics`, shown with the loss by the progress bar.
        self._step_metrics = step_metrics
        # The default tf.summary writer around the hooks, when it is not around the whole run.
        self._hooks_writer = hooks_writer
        self._saver = saver
        self._hooks = hooks
        self._save_every_n_steps = save_every_n_steps
        self.step = read_step()
        self.resumed_from = resumed_from
        self.last_checkpoint = resumed_from
        self._saved_step = self.step if resumed_from is not None else None
        self.loss: Any = None
        self.steps_run = 0
        self.rollbacks = 0
        self._calls_without_progress = 0

    def after_step(self, loss: Any, bar: _console.Progress) -> str | None:
        """Takes in a completed call of the train op, which returned `loss`: reads the global
        step, updates `bar`, runs the hooks due and saves when a checkpoint is due.

        Returns:
          Why training stops now (a hook raised `StopTraining`), or None.

        Raises:
          RuntimeError: if the global step has not moved in `_MAX_CALLS_WITHOUT_PROGRESS`
            calls.
        """
        self.loss = loss
        self.steps_run += 1
        previous, self.step = self.step, self._read_step()
        if self.step == previous:
            self._calls_without_progress += 1
            if self._calls_without_progress >= _MAX_CALLS_WITHOUT_PROGRESS:
                raise RuntimeError(
                    f"The global step stayed at {self.step} for "
                    f"{self._calls_without_progress} calls of the train op: does it count "
                    "steps in `global_step`?"
                )
        else:
            self._calls_without_progress = 0
        metrics = self._step_metrics
        bar.update(
            self.step,
            lambda value=loss: as_float(first_loss(value)),
            metrics.result if metrics is not None and metrics.applied is not None else None,
        )
        writer = self._hooks_writer
        try:
            with writer.as_default() if writer is not None else contextlib.nullcontext():
                for hook in self._hooks:
                    if self.step // hook.every_n_steps > previous // hook.every_n_steps:
                        hook.fn(self.step, as_float(first_loss(loss)))
        except StopTraining as request:
            stopped_by = f"StopTraining: {request}"
            logger.info("%s at global step %d.", stopped_by, self.step)
            return stopped_by
        if self.step // self._save_every_n_steps > previous // self._save_every_n_steps:
            self.save()
        return None

    def rolled_back_to(self, path: str, bar: _console.Progress) -> None:
        """Takes in a roll back to the checkpoint `path` (see `trainop.Rollback`)."""
        self.rollbacks += 1
        self.step = self._read_step()
        self.last_checkpoint = path
        self._saved_step = self.step
        self._calls_without_progress = 0
        bar.update(self.step, lambda: None)

    def read_step(self) -> None:
        """Reads the global step again, after the loop changed it (a partial window applied)."""
        self.step = self._read_step()

    def save(self, again: bool = False) -> None:
        """Saves a checkpoint, unless there is no saver or this step is saved already (and not
        `again`: the calls of an accumulation window changed its sums, not the step)."""
        if self._saver is not None and (self._saved_step != self.step or again):
            self.last_checkpoint = self._saver.save(self.step)
            self._saved_step = self.step

    def result(self, stopped_by: str) -> TrainResult:
        return TrainResult(
            global_step=self.step,
            loss=as_float(first_loss(self.loss)),
            steps_run=self.steps_run,
            stopped_by=stopped_by,
            resumed_from=self.resumed_from,
            last_checkpoint=self.last_checkpoint,
            rollbacks=self.rollbacks,
        )


def run(
    run_step: Callable[[], Any],
    *,
    read_step: Callable[[], int],
    saver: _checkpoints.Checkpoints | None,
    resumed_from: str | None,
    max_steps: int | None,
    save_every_n_steps: int,
    hooks: list[Hook],
    progress: bool | None,
    rollback: Any = None,
    hooks_writer: Any = None,
    window: Any = None,
    step_metrics: Any = None,
) -> TrainResult:
    """Calls `run_step` until `max_steps`, the end of the data, a hook or a signal stops it;
    saves at the cadence and at the end. With a `trainop.Rollback` (and `saver`), saves after
    the first call too, and answers the numerics guard's errors by rolling back. With an
    accumulation `window` (`PartialWindow`), the end of the data applies or drops the calls it
    holds, as it says, and a stop inside one saves its sums."""
    run = Run(read_step, saver, resumed_from, hooks, save_every_n_steps, hooks_writer, step_metrics)
    bar = _console.Progress(progress, run.step, max_steps)
    stop = _console.StopRequest()
    stopped_by = None
    try:
        with stop.installed():
            while stop.signal_name is None and (max_steps is None or run.step < max_steps):
                try:
                    loss = run_step()
                except (StopIteration, tf.errors.OutOfRangeError):
                    # The end of the data, as a MonitoredSession takes an OutOfRangeError.
                    stopped_by = END_OF_DATA
                    break
                except tf.errors.InvalidArgumentError as error:
                    if rollback is None or not numerics.is_guard_error(error):
                        raise
                    path = rollback.roll_back(saver, error, run.rollbacks)
                    if path is None:
                        raise
                    run.rolled_back_to(path, bar)
                    continue
                if rollback is not None and run.last_checkpoint is None:
                    # A checkpoint to go back to, once the first call has built what the step
                    # makes (the optimizer's slots, a model built on its first call).
                    run.save()
                stopped_by = run.after_step(loss, bar)
                if stopped_by is not None:
                    break
            if window is not None and stopped_by == END_OF_DATA:
                window.at_end_of_data()
                run.read_step()
                bar.update(run.step, lambda: None)
            run.save(again=window is not None and window.pending() > 0)
    finally:
        bar.close()
    return run.result(why_stopped(run, stop.signal_name, stopped_by, max_steps))


def why_stopped(
    run: Run, signal_name: str | None, stopped_by: str | None, max_steps: int | None
) -> str:
    """`TrainResult.stopped_by`, logged when the user may not expect it."""
    step = run.step
    if signal_name is not None:
        logger.warning("Stopped by %s at global step %d.", signal_name, step)
        return signal_name
    if stopped_by == END_OF_DATA and max_steps is not None:
        logger.warning(
            "The data ran out at global step %d, before max_steps=%d: training stopped there.",
            step,
            max_steps,
        )
    elif stopped_by == END_OF_DATA:
        logger.info("The data ran out at global step %d: training stopped there.", step)
    elif stopped_by is None:
        if run.resumed_from is not None and run.steps_run == 0:
            logger.warning(
                "Resumed from %s at global step %d, which is max_steps: nothing to train. "
                "Raise max_steps to train on, or use a new logdir to start over.",
                run.resumed_from,
                step,
            )
        return MAX_STEPS
    return stopped_by
