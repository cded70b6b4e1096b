"""trainop's step inside `model.fit` (`FitStep`), which `trainop.keras.compile` installs.

What a resumed `fit` skips (`FitStep.skip_batches`) and what it saves of the metrics
(`metric_state`, `metric_values`) are here too, for `trainop.keras.BackupAndRestore`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import logging
import os
from typing import Any

import keras
import numpy as np
import tensorflow as tf

# As Keras's own train_step counts the loss of a replica; not exported by Keras.
from keras.src.losses.loss import unscale_loss_for_distribution

from trainop import _config, _core, _distribute, _global_step, _variables, numerics

logger = logging.getLogger("trainop")

# The key, in the logs of `fit` (the progress bar, `History`, callbacks), of the number of
# batches the skip guard has skipped since the guard was made.
SKIPPED_STEPS_LOG = "skipped_steps"

# The attribute of a model compiled by `trainop.keras.compile` that holds its `FitStep`.
INSTALLED = "_trainop_fit_step"


# What marks a train function that `FitStep.make_train_function` wrapped already.
_WRAPPED = "_trainop_raises_after_the_call"
# The methods that `install` sets on the model object, in front of its class's.
_METHODS = ("train_step", "make_train_function", "fit", "compile")


def installed_step(model: Any) -> FitStep | None:
    """The `FitStep` that `trainop.keras.compile` gave `model`, or None."""
    return getattr(model, INSTALLED, None)


def install(model: keras.Model, step: FitStep) -> None:
    """Gives `model` trainop's step: `train_step`, `make_train_function` and `fit` set on the
    object, and `compile`, which takes them away again (a later `model.compile` gives the
    model back Keras's step)."""
    setattr(model, INSTALLED, step)
    model.train_step = step.train_step
    model.make_train_function = step.make_train_function
    model.fit = step.fit

    @functools.wraps(type(model).compile)
    def compile_with_keras_step(*args: Any, **kwargs: Any) -> None:
        uninstall(model)
        model.compile(*args, **kwargs)

    model.compile = compile_with_keras_step


def uninstall(model: keras.Model) -> None:
    """Takes away what `install` set: the model's class's methods apply again."""
    for name in (INSTALLED, *_METHODS):
        # Set on the object, never found on its class: deleted from its __dict__.
        model.__dict__.pop(name, None)


def metric_state(model: keras.Model) -> bytes:
    """The values of the model's metric variables (the loss tracker's included), keyed by
    their position (two metrics may share a variable path), as the bytes of an `.npz` file: an
    epoch's running sums, which a resumed epoch goes on from.

    Bytes, for a string variable of a checkpoint: the metrics of `compile` have no variables
    until the step is first traced, so that no fixed set of variables can hold them then.
    """
    values = {key: np.asarray(v.numpy()) for key, v in _metric_variables(model)}
    buffer = io.BytesIO()
    np.savez(buffer, **values)
    return buffer.getvalue()


def metric_values(state: bytes) -> dict[str, np.ndarray]:
    """What `metric_state` saved, by key; empty for empty `state`."""
    if not state:
        return {}
    with np.load(io.BytesIO(state)) as values:
        return {key: values[key] for key in values.files}


def _metric_variables(model: keras.Model) -> list[tuple[str, Any]]:
    """The model's metric variables, each with its key: the metric's and its own position."""
    return [
        (f"{i}_{j}", variable)
        for i, metric in enumerate(model.metrics)
        for j, variable in enumerate(metric.variables)
    ]


class FitStep:
    """trainop's step for `fit` on one model, installed by `compile` (see there)."""

    def __init__(self, model: keras.Model, config: _config.StepConfig):
        self._model = model
        guard = config.check_numerics
        if model.jit_compile and guard is True:
            # XLA compiles CheckNumerics away: the loss check sets a flag that Python reads.
            guard = numerics.LossCheckUnderXLA()
            config = dataclasses.replace(config, check_numerics=guard)
        self._config = config
        self._guard = guard if isinstance(guard, numerics.SkipNonFiniteSteps) else None
        self._stop = (
            self._guard.stop_flag() if model.jit_compile and self._guard is not None else None
        )
        self._keras_make_train_function = type(model).make_train_function.__get__(model)
        self._keras_fit = type(model).fit.__get__(model)
        self._reported_missing: set[str] = set()
        self._to_skip: tf.Variable | None = None
        self._resumed_metrics: dict[str, np.ndarray] = {}
        self._replicated = None
        strategy = model.distribute_strategy
        if strategy.num_replicas_in_sync > 1:
            self._replicated = _distribute.ReplicatedStep(
                None, strategy, config, lambda: [], self._reported_missing, jit_compile=False
            )

    @property
    def state(self) -> dict[str, Any]:
        """What the step keeps besides the model and optimizer, for a backup: the accumulation
        window's sums and the weights' average, if there are any."""
        state = {}
        if self._config.accumulator is not None:
            state["accumulation"] = self._config.accumulator
        if self._config.moving_average is not None:
            state["average"] = self._config.moving_average
        return state

    @property
    def guard(self) -> numerics.SkipNonFiniteSteps | None:
        """The skip guard (or the loss check under XLA) whose counters the step keeps."""
        return self._guard

    def train_step(self, data: Any) -> dict[str, Any]:
        """One step on a batch, as Keras's `train_step` (the logs of the metrics) with
        trainop's guard, transform and accumulation; the logs also hold `skipped_steps`."""
        model = self._model
        compiled = getattr(model, "_compile_metrics", None)
        if compiled is not None and not compiled.built:
            # Built now, from the batch's shapes, outside any tf.cond or control dependency
            # of the step: Keras would build them inside, at their first update.
            model._symbolic_build(data_batch=data)
        if self._to_skip is None:
            return self._guarded_step(data)
        # The batches of a resumed epoch trained on before the backup run nothing.
        return tf.cond(self._to_skip <= 0, lambda: self._guarded_step(data), self._pass_over)

    def skip_batches(self, count: int, metrics: dict[str, np.ndarray]) -> None:
        """Makes the next `count` batches that `fit` reads run nothing: the batches of a
        resumed epoch that were trained on before the backup. With each of them, the metric
        variables are set to `metrics` (from `metric_values`): the epoch's running sums when
        the backup was written."""
        if self._to_skip is None:
            with tf.init_scope(), self._model.distribute_strategy.scope():
                self._to_skip = tf.Variable(
                    0,
                    dtype=tf.int64,
                    trainable=False,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                    name="batches_to_skip",
                )
        self._resumed_metrics = metrics
        # Traced again: with the skip, and these metric values.
        self.make_train_function(force=True)
        self._to_skip.assign(count)

    def _pass_over(self) -> dict[str, Any]:
        """A batch passed over: counted down, the metrics set to the backup's (fit reset them
        as the epoch began), so that the logs show the epoch's running values."""
        left = self._to_skip.assign_sub(1)
        with tf.control_dependencies([left, self._restore_metrics()]):
            return self._logs()

    def _restore_metrics(self) -> tf.Tensor:
        """Sets the metric variables to the values of the backup (each replica holding its
        share of a summed one, which is what a read adds up)."""
        replicas = self._model.distribute_strategy.num_replicas_in_sync
        assigned = []
        for key, variable in _metric_variables(self._model):
            value = self._resumed_metrics.get(key)
            if value is None:
                continue
            if replicas > 1 and variable.aggregation == "sum":
                value = value / replicas
            assigned.append(variable.assign(tf.cast(value, variable.dtype)))
        with tf.control_dependencies(assigned):
            return tf.constant(True)

    def _guarded_step(self, data: Any) -> dict[str, Any]:
        if self._stop is None:
            return self._step(data)
        with self._guard.stopping_on_device():
            # A batch after the one that stopped the call runs nothing.
            return tf.cond(tf.logical_not(self._stop), lambda: self._step(data), self._logs)

    def _step(self, data: Any) -> dict[str, Any]:
        model = self._model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # What the forward pass and the loss write (batch normalization's statistics, dropout's
        # seed state, the loss metrics of each output) is undone on a batch the guard rejects;
        # not under a strategy of several replicas, whose variables are mirrored.
        watching = self._replicated is None
        with _variables.recording_writes() if watching else contextlib.nullcontext({}) as writes:
            if getattr(model, "_call_has_training_arg", True):
                y_pred = model(x, training=True)
            else:
                y_pred = model(x)
            # Under a strategy, each replica's loss divided by the number of replicas, as
            # Keras makes it: the sum over the replicas is the batch's.
            loss = model._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
        variables = list(model.trainable_weights)
        if self._replicated is not None:
            trained = self._step_across_replicas(loss, variables, (x, y, y_pred, sample_weight))
        else:
            grads_and_vars = _core.step_gradients(
                loss, variables, self._config, self._reported_missing
            )
            trained = _core.build_step(
                loss,
                grads_and_vars,
                self._config,
                apply=_distribute.optimizer_applier(self._config, in_function=True),
                on_accepted=lambda: self._record_batch(loss, x, y, y_pred, sample_weight),
                undo=(lambda keep: _variables.undo_writes(writes, keep)) if writes else None,
                # The batch is gone once fit's call returns: the error says, from the device,
                # what was not finite.
                diagnose_loss=True,
                # Keras's loss is a mean over the batch's examples: a window of accumulated
                # batches weights each by its size (a short last batch counts less).
                count=tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0],
            )
        with tf.control_dependencies([trained]):
            return self._logs()

    def _record_batch(self, loss: tf.Tensor, x: Any, y: Any, y_pred: Any, sample_weight: Any):
        """Counts a batch in the loss tracker and the metrics, as Keras's `train_step` does:
        only a batch that the guard lets through."""
        model = self._model
        batch_size = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
        model._loss_tracker.update_state(
            unscale_loss_for_distribution(loss), sample_weight=batch_size
        )
        model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return []

    def _step_across_replicas(
        self, loss: tf.Tensor, variables: list[Any], batch: tuple[Any, ...]
    ) -> tf.Tensor:
        """In a replica (`fit` runs `train_step` in `strategy.run`): this replica's gradients,
        then one decision and update for all replicas, taken in the cross-replica context
        that `merge_call` enters, as `_distribute.ReplicatedStep` takes them."""
        replicated = self._replicated
        verdicts = replicated.needs_verdicts()
        computed = replicated.replica_gradients(loss, variables, verdicts)

        def across(strategy: Any, computed: tuple[Any, ...], batch: tuple[Any, ...]) -> Any:
            def on_accepted() -> list[Any]:
                strategy.run(self._record_batch, args=(computed[0], *batch))
                return []

            return replicated.across(
                computed[0], computed[1], computed[2] if verdicts else None, on_accepted
            )

        return tf.distribute.get_replica_context().merge_call(across, args=(computed, batch))

    def _logs(self) -> dict[str, Any]:
        logs = dict(self._model.get_metrics_result())
        if self._guard is not None and not isinstance(self._guard, numerics.LossCheckUnderXLA):
            logs[SKIPPED_STEPS_LOG] = self._guard.skipped_steps.read_value()
        if self._config.step_metrics is not None:
            for name, value in self._config.step_metrics.result().items():
                logs.setdefault(name, tf.cast(value, tf.float32))
        return logs

    def make_train_function(self, force: bool = False) -> Any:
        """Keras's train function, which under XLA raises the guard's error after the call."""
        self._keras_make_train_function(force)
        function = self._model.train_function
        if self._stop is None or getattr(function, _WRAPPED, False):
            return function

        @functools.wraps(function)
        def train_function(iterator: Any) -> Any:
            logs = function(iterator)
            if bool(self._stop.numpy()):
                self._stop.assign(False)
                counter, step_name = _global_step.counter(None, self._config.adapter.iterations)
                raise self._guard.stopped_error(
                    int(self._guard.consecutive_skipped_steps.numpy()),
                    step_name,
                    int(counter.numpy()) if counter is not None else None,
                )
            return logs

        setattr(train_function, _WRAPPED, True)
        self._model.train_function = train_function
        return train_function

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        """Keras's `fit`, with, while it runs, the default `tf.summary` writer set to the
        `train` directory of its `keras.callbacks.TensorBoard` callback, if any, and the signal
        handlers of its `trainop.keras.BackupAndRestore` callbacks installed."""
        bound = inspect.signature(self._keras_fit).bind_partial(*args, **kwargs)
        callbacks = list(bound.arguments.get("callbacks") or [])
        with contextlib.ExitStack() as stack:
            for callback in callbacks:
                if hasattr(callback, "stop_requests"):
                    stack.enter_context(callback.stop_requests())
            board = next((c for c in callbacks if isinstance(c, keras.callbacks.TensorBoard)), None)
            if board is not None and self._model.jit_compile:
                logger.warning(
                    "trainop's train summaries are not written under jit_compile=True: XLA "
                    "does not compile summary writes. Keras's TensorBoard callback writes its "
                    "own."
                )
            elif board is not None:
                writer = tf.summary.create_file_writer(os.path.join(board.log_dir, "train"))
                stack.callback(writer.close)
                stack.enter_context(writer.as_default())
            return self._keras_fit(*args, **kwargs)
