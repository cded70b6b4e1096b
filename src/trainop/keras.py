"""trainop's step inside Keras's `model.fit`: `compile` a Keras 3 model with trainop's settings.

`trainop.keras.compile(model, ...)` replaces `model.compile(...)`: it compiles the model as
Keras does and gives it trainop's training step, which `fit` then runs in place of Keras's own
`train_step`. Everything else is `fit`'s: callbacks, validation, `steps_per_execution`,
`jit_compile`, the progress bar and `History`.

The step keeps what Keras's `train_step` does (the model called with `training=True` on the
`(x, y, sample_weight)` of each batch, `compute_loss` with the model's losses and
regularizers, the optimizer's loss scaling, the loss tracker and `compute_metrics`), and adds
trainop's: the numerics guard that changes nothing on a bad batch, gradient transforms,
accumulation, the check for variables without gradient, and the train summaries.

A design note: the model keeps its class, its `call`, its saving format; `compile` sets four
methods on the model object: `train_step`; `make_train_function`, to raise the errors of a
compiled step after the call; `fit`, to write the summaries where the
`keras.callbacks.TensorBoard` callback writes and to hear SIGTERM for
`trainop.keras.BackupAndRestore`; and `compile`, so that a later `model.compile(...)` gives the
model back Keras's step. A model saved and loaded, or cloned, has Keras's step: compile it
with `trainop.keras.compile` again.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from trainop import (
    _checkpoints,
    _config,
    _console,
    _core,
    _data,
    _fit,
    _variables,
    averaging,
    numerics,
)
from trainop._checks import check_count
from trainop._fit import SKIPPED_STEPS_LOG

logger = logging.getLogger("trainop")

__all__ = ["SKIPPED_STEPS_LOG", "BackupAndRestore", "compile"]


def compile(  # noqa: A001 - as `model.compile`, which it stands for
    model: keras.Model,
    *args: Any,
    check_numerics: bool | str | numerics.SkipNonFiniteSteps = True,
    transform_grads_fn: Callable[[list], list] | None = None,
    accumulation_steps: int = 1,
    missing_gradients: str = "log",
    summarize_gradients: bool = False,
    summarize_every_n_steps: int | None = None,
    learning_rate_multipliers: Mapping[Any, Any] | Sequence[tuple[Any, Any]] | None = None,
    moving_average: averaging.ExponentialMovingAverage | None = None,
    step_metrics: bool = False,
    **kwargs: Any,
) -> None:
    """Compiles `model` as `model.compile(*args, **kwargs)` does, with trainop's training step.

    `model.fit` then trains each batch with trainop's step (see the module's documentation):

    * `check_numerics=True` (the default): a batch whose loss is inf or NaN raises
      `tf.errors.InvalidArgumentError` ("LossTensor is inf or nan") before anything changes,
      where Keras's `TerminateOnNaN` stops only after the NaN is in the weights.
    * `check_numerics="skip"` or a `trainop.SkipNonFiniteSteps`: such a batch (or one with an
      inf or NaN gradient) is skipped: no variable, optimizer slot or counter changes, and the
      loss tracker and metrics do not count it. The logs carry `skipped_steps`.
    * `transform_grads_fn`, `accumulation_steps`, `missing_gradients`, `summarize_gradients`,
      `summarize_every_n_steps`, `learning_rate_multipliers` and `moving_average`: as for
      `trainop.create_train_op`. With `moving_average`, evaluate or save the averaged weights
      inside `moving_average.swap_weights()` (`fit`'s validation uses the weights as
      trained). With `step_metrics=True`, the logs also carry the last batch's
      `gradient_norm`, `applied_gradient_norm` and `applied` (see `trainop.StepMetrics`).
      The summaries are written, at `optimizer.iterations`, to the `train`
      directory of the `keras.callbacks.TensorBoard` callback passed to `fit`, if there is
      one.

    Under `jit_compile=True` (which compiles `CheckNumerics` and `Assert` away), the guard
    decides on the device, changing nothing on a bad batch, and `fit` raises once the compiled
    call returns; the batches after it in the same call (`steps_per_execution`) run nothing.

    Args:
      model: a Keras 3 `keras.Model` (Sequential, functional or subclassed) whose
        `train_step` is Keras's own.
      *args: passed to `model.compile` (`optimizer`, `loss`, ...).
      check_numerics, transform_grads_fn, accumulation_steps, missing_gradients,
      summarize_gradients, summarize_every_n_steps, learning_rate_multipliers,
      moving_average, step_metrics: trainop's settings, as for `trainop.create_train_op`.
      **kwargs: passed to `model.compile` (`metrics`, `steps_per_execution`, `jit_compile`,
        `auto_scale_loss`, ...).

    Raises:
      TypeError: `model` is not a Keras 3 model (a `tf_keras` one is refused: its `fit`
        differs), or a trainop setting is of the wrong type.
      ValueError: a trainop setting is bad; `model` overrides `train_step` (trainop's step
        would silently replace it); `run_eagerly=True` (the step is built in a
        `tf.function`); or `jit_compile=True` under a `tf.distribute` strategy of more than
        one replica, which this step does not support yet. Nothing is compiled then: the
        model is left as it was.

    Example:
      >>> import keras, numpy as np, trainop
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
      >>> trainop.keras.compile(model, optimizer=keras.optimizers.SGD(0.1), loss="mse",
      ...                       check_numerics="skip")
      >>> x = np.ones((8, 3), np.float32)
      >>> y = np.zeros((8, 1), np.float32)
      >>> y[4:] = np.nan  # the second batch of 4 is bad
      >>> history = model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
      >>> history.history["skipped_steps"], int(model.optimizer.iterations)
      ([1.0], 1)
    """
    _check_model(model)
    # Everything is checked before the model is compiled: a refused setting leaves it as it was.
    arguments = inspect.signature(keras.Model.compile).bind(model, *args, **kwargs)
    arguments.apply_defaults()
    if arguments.arguments["run_eagerly"]:
        raise ValueError(
            "trainop.keras.compile does not support run_eagerly=True: trainop's step is built "
            "in a tf.function. Debug with model.compile, or with trainop.create_train_op."
        )
    strategy = model.distribute_strategy
    if strategy.num_replicas_in_sync > 1 and arguments.arguments["jit_compile"] is True:
        raise ValueError(
            "trainop.keras.compile does not support jit_compile=True under a tf.distribute "
            f"strategy of more than one replica ({type(strategy).__name__}, "
            f"{strategy.num_replicas_in_sync} replicas): compile with jit_compile=False."
        )
    with strategy.scope():
        # The optimizer model.compile would make of a name, made here to check it first.
        optimizer = keras.optimizers.get(arguments.arguments["optimizer"])
    settings = (
        transform_grads_fn,
        summarize_gradients,
        _core.GATE_NONE,  # as Keras's GradientTape
        None,
        check_numerics,
        missing_gradients,
        summarize_every_n_steps,
        accumulation_steps,
    )
    # The step is counted by optimizer.iterations, as in Keras: no global step.
    extras = {
        "learning_rate_multipliers": learning_rate_multipliers,
        "moving_average": moving_average,
        "step_metrics": step_metrics,
    }
    config = _config.resolve(optimizer, None, *settings, **extras)
    arguments.arguments["optimizer"] = optimizer
    _fit.uninstall(model)
    # The model's own compile (a subclass may extend it), with every argument by name.
    model.compile(**{name: value for name, value in arguments.arguments.items() if name != "self"})
    if model.optimizer is not optimizer:
        # auto_scale_loss wrapped it in a LossScaleOptimizer.
        config = _config.resolve(model.optimizer, None, *settings, **extras)
    step = _fit.FitStep(model, config)
    _fit.install(model, step)


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.Model):
        module = type(model).__module__
        kind = "a tf_keras model, whose fit differs" if module.startswith("tf_keras") else None
        raise TypeError(
            "`model` must be a Keras 3 keras.Model"
            + (f" (received {kind}: use trainop.create_train_op)" if kind else "")
            + f". Received: {type(model).__name__}"
        )
    own = type(model).train_step
    if own is not keras.Model.train_step and _fit.installed_step(model) is None:
        raise ValueError(
            f"`model` ({type(model).__name__}) overrides train_step, which trainop's step "
            "would replace: use trainop.create_train_op inside it instead."
        )


class BackupAndRestore(keras.callbacks.Callback):
    """Keras's `BackupAndRestore` for a model compiled by `trainop.keras.compile`, made safe.

    As `keras.callbacks.BackupAndRestore`, it backs up the training state in `backup_dir` and,
    when `fit` starts again after an interruption, restores it and goes on where it stopped;
    once `fit` completes, the backups are deleted (unless `delete_checkpoint=False`). Beyond
    Keras's:

    * The state is the model, the optimizer, trainop's guard counters, the metrics' running
      means and the position (epoch and batch), in a `tf.train.CheckpointManager` keeping
      `max_to_keep` backups, as `trainop.train` keeps its checkpoints.
    * A backup holding inf or NaN is never written: `fit` stops instead (as `TerminateOnNaN`
      would), and the last healthy backup is kept for the next run; a restore takes the
      newest backup that is all finite.
    * SIGTERM or Ctrl-C finishes the batch under way, writes a backup and stops `fit`
      cleanly (`fit` returns); a second Ctrl-C raises `KeyboardInterrupt` at once.
    * A rerun resumes at the epoch and the batch where the backup was written: the batches of
      that epoch trained on before it are read and passed over, and the epoch's metrics go on
      from their saved running means, so that the rerun's losses are those of an
      uninterrupted run. That holds when `fit` reads the same batches in the same order in
      every run: arrays or a dataset without shuffling, or shuffled with a fixed seed per
      epoch. A dataset shuffled differently in each run (Keras's `shuffle=True` without a
      fixed seed) resumes at the right epoch and batch count on other batches, and an
      iterator or generator that does not start again from its beginning is not skipped
      into: pass `steps_per_epoch` so that its epochs are counted.

    Args:
      backup_dir: the directory of the backups, for this training run only.
      save_freq: `"epoch"` (at the end of every epoch) or a number of batches.
      delete_checkpoint: whether the backups are deleted once `fit` completes, as Keras's.
      max_to_keep: how many backups are kept, newest first.

    Raises:
      ValueError: `save_freq` or `max_to_keep` is bad; or, when `fit` starts, the model was
        not compiled by `trainop.keras.compile`.

    Example:
      >>> import keras, numpy as np, tempfile, trainop
      >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
      >>> trainop.keras.compile(model, optimizer="sgd", loss="mse")
      >>> backup = trainop.keras.BackupAndRestore(tempfile.mkdtemp(), delete_checkpoint=False)
      >>> x, y = np.ones((8, 3), np.float32), np.zeros((8, 1), np.float32)
      >>> _ = model.fit(x, y, batch_size=4, epochs=2, callbacks=[backup], verbose=0)
      >>> history = model.fit(x, y, batch_size=4, epochs=3, callbacks=[backup], verbose=0)
      >>> len(history.history["loss"])  # epochs 0 and 1 were backed up: only epoch 2 runs
      1
    """

    def __init__(
        self,
        backup_dir: str,
        save_freq: str | int = "epoch",
        delete_checkpoint: bool = True,
        max_to_keep: int = 2,
    ):
        super().__init__()
        if save_freq != "epoch" and not (type(save_freq) is int and save_freq >= 1):
            raise ValueError(
                "`save_freq` must be 'epoch' or a number of batches >= 1. "
                f"Received: save_freq={save_freq!r}"
            )
        check_count("max_to_keep", max_to_keep)
        self.backup_dir = backup_dir
        self.save_freq = save_freq
        self.delete_checkpoint = delete_checkpoint
        self.max_to_keep = max_to_keep
        self._stop = _console.StopRequest()

    @property
    def stopped_by(self) -> str | None:
        """'SIGTERM' or 'SIGINT' if a signal stopped the last `fit`, else None."""
        return self._stop.signal_name

    def stop_requests(self) -> Any:
        """A context manager within which SIGTERM and a first Ctrl-C ask this callback to stop
        `fit` after the batch under way (entered by the `fit` of `trainop.keras.compile`)."""
        self._stop = _console.StopRequest()
        return self._stop.installed()

    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        step = _fit.installed_step(model)
        if step is None:
            raise ValueError(
                "trainop.keras.BackupAndRestore needs a model compiled by "
                "trainop.keras.compile (it resumes inside an epoch through trainop's step); "
                "use keras.callbacks.BackupAndRestore with model.compile."
            )
        with tf.init_scope():
            # Epochs completed; batches consumed in the epoch under way; in all (the number of
            # the backup).
            self._epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self._batch = tf.Variable(0, dtype=tf.int64, trainable=False, name="batch")
            self._seen = tf.Variable(0, dtype=tf.int64, trainable=False, name="batches")
            # The metrics' running sums (`_fit.metric_state`).
            self._metrics = tf.Variable(b"", dtype=tf.string, trainable=False, name="metrics")
        objects = {
            "model": model,
            # Its non-trainable state too (the random state of Dropout's seed generators,
            # which the model's own checkpoint leaves out), by position.
            "state": [_variables.as_tf_variable(v) for v in model.non_trainable_variables],
            "optimizer": model.optimizer,
            "position": tf.train.Checkpoint(epoch=self._epoch, batch=self._batch),
            "metrics": self._metrics,
        }
        if step.guard is not None:
            objects["guard"] = step.guard
        objects.update(step.state)
        self._checkpoints = _checkpoints.Checkpoints(
            objects, self._seen, _data.Batches(None), self.backup_dir, self.max_to_keep, None
        )
        self._stopped = False
        self._last_batch_end = 0
        self._since_save = 0
        if model.built and model.optimizer is not None and not model.optimizer.built:
            # As Keras's own BackupAndRestore: restored now, not deferred to the first step
            # (none runs when the backup's fit had finished, and its values would go unused).
            model.optimizer.build(model.trainable_variables)
        restored = self._checkpoints.restore_latest_finite()
        if restored is None:
            return
        epoch, consumed = int(self._epoch.numpy()), int(self._batch.numpy())
        logger.info("Resuming fit from %s at epoch %d, batch %d.", restored, epoch, consumed)
        model._initial_epoch = epoch
        if consumed:
            # fit resets the metrics as the epoch begins: the step sets them to the backup's
            # after passing over the batches trained on.
            step.skip_batches(consumed, _fit.metric_values(self._metrics.numpy()))

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if epoch != self._epoch.numpy():
            self._batch.assign(0)
        self._epoch.assign(epoch)
        self._last_batch_end = int(self._batch.numpy())

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # With steps_per_execution, `batch` is the last batch of the call. The batches of a
        # resumed epoch that are passed over were counted before the backup.
        done = max(0, batch + 1 - self._last_batch_end)
        if done:
            self._last_batch_end = batch + 1
            self._batch.assign(batch + 1)
            self._seen.assign_add(done)
            self._since_save += done
        if self._stop.signal_name is not None:
            self._save()
            self._stopped = True
            self.model.stop_training = True
        elif self.save_freq != "epoch" and self._since_save >= self.save_freq:
            self._save()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._stopped:
            return
        self._epoch.assign(epoch + 1)
        self._batch.assign(0)
        if self.save_freq == "epoch":
            self._save()

    def on_train_end(self, logs: dict | None = None) -> None:
        # A later fit starts at its own initial_epoch again.
        self.model._initial_epoch = None
        if not self._stopped and self.delete_checkpoint and tf.io.gfile.exists(self.backup_dir):
            tf.io.gfile.rmtree(self.backup_dir)

    def _save(self) -> None:
        self._since_save = 0
        self._metrics.assign(_fit.metric_state(self.model))
        try:
            self._checkpoints.save(int(self._seen.numpy()))
        except FloatingPointError as error:
            logger.error("Stopping fit: %s", error)
            self._stopped = True
            self.model.stop_training = True
