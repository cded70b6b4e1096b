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

A design note: the model keeps its class, its `call`, its saving format; `compile` sets two
methods on the model object (`train_step`, and `make_train_function` to raise the errors of
a compiled step after the call) and wraps its `fit` (to write the summaries where the
`keras.callbacks.TensorBoard` callback writes). A later `model.compile(...)` (Keras's own)
gives the model back Keras's step.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

# As Keras's own train_step counts the loss of a replica; not exported by Keras.
from keras.src.losses.loss import unscale_loss_for_distribution

from trainop import _config, _core, _distribute, _global_step, numerics

logger = logging.getLogger("trainop")

__all__ = ["compile", "SKIPPED_STEPS_LOG"]

# The key, in the logs of `fit` (the progress bar, `History`, callbacks), of the number of
# batches the skip guard has skipped since the guard was made.
SKIPPED_STEPS_LOG = "skipped_steps"

# What `compile` sets on the model, to tell its own methods from Keras's.
_INSTALLED = "_trainop_fit_step"


def compile(  # noqa: A001 - as `model.compile`, which it stands for
    model: keras.Model,
    *args: Any,
    check_numerics: bool | str | numerics.SkipNonFiniteSteps = True,
    transform_grads_fn: Callable[[list], list] | None = None,
    accumulation_steps: int = 1,
    missing_gradients: str = "log",
    summarize_gradients: bool = False,
    summarize_every_n_steps: int | None = None,
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
    * `transform_grads_fn`, `accumulation_steps`, `missing_gradients`, `summarize_gradients`
      and `summarize_every_n_steps`: as for `trainop.create_train_op`. The summaries are
      written, at `optimizer.iterations`, to the `train` directory of the
      `keras.callbacks.TensorBoard` callback passed to `fit`, if there is one.

    Under `jit_compile=True` (which compiles `CheckNumerics` and `Assert` away), the guard
    decides on the device, changing nothing on a bad batch, and `fit` raises once the compiled
    call returns; the batches after it in the same call (`steps_per_execution`) run nothing.

    Args:
      model: a Keras 3 `keras.Model` (Sequential, functional or subclassed) whose
        `train_step` is Keras's own.
      *args: passed to `model.compile` (`optimizer`, `loss`, ...).
      check_numerics, transform_grads_fn, accumulation_steps, missing_gradients,
      summarize_gradients, summarize_every_n_steps: trainop's settings, as for
        `trainop.create_train_op`.
      **kwargs: passed to `model.compile` (`metrics`, `steps_per_execution`, `jit_compile`,
        `auto_scale_loss`, ...).

    Raises:
      TypeError: `model` is not a Keras 3 model (a `tf_keras` one is refused: its `fit`
        differs), or a trainop setting is of the wrong type.
      ValueError: a trainop setting is bad; `model` overrides `train_step` (trainop's step
        would silently replace it); the model has no optimizer after `compile`; or
        `jit_compile=True` under a `tf.distribute` strategy of more than one replica, which
        this step does not support yet.

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
    model.compile(*args, **kwargs)
    if model.optimizer is None:
        raise ValueError("`trainop.keras.compile` needs an optimizer: pass `optimizer=`.")
    strategy = model.distribute_strategy
    if strategy.num_replicas_in_sync > 1 and model.jit_compile:
        raise ValueError(
            "trainop.keras.compile does not support jit_compile=True under a tf.distribute "
            f"strategy of more than one replica ({type(strategy).__name__}, "
            f"{strategy.num_replicas_in_sync} replicas): compile with jit_compile=False."
        )
    config = _config.resolve(
        model.optimizer,
        None,  # the step is counted by optimizer.iterations, as in Keras
        transform_grads_fn,
        summarize_gradients,
        _core.GATE_NONE,  # as Keras's GradientTape
        None,
        check_numerics,
        missing_gradients,
        summarize_every_n_steps,
        accumulation_steps,
    )
    step = FitStep(model, config)
    setattr(model, _INSTALLED, step)
    model.train_step = step.train_step
    model.make_train_function = step.make_train_function
    model.fit = step.fit


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
    if own is not keras.Model.train_step and getattr(model, _INSTALLED, None) is None:
        raise ValueError(
            f"`model` ({type(model).__name__}) overrides train_step, which trainop's step "
            "would replace: use trainop.create_train_op inside it instead."
        )


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
        self._replicated = None
        strategy = model.distribute_strategy
        if strategy.num_replicas_in_sync > 1:
            self._replicated = _distribute.ReplicatedStep(
                None, strategy, config, lambda: [], self._reported_missing, jit_compile=False
            )

    def train_step(self, data: Any) -> dict[str, Any]:
        """One step on a batch, as Keras's `train_step` (the logs of the metrics) with
        trainop's guard, transform and accumulation; the logs also hold `skipped_steps`."""
        if self._stop is None:
            return self._step(data)
        with self._guard.stopping_on_device():
            # A batch after the one that stopped the call runs nothing. (The step is traced
            # first: the compiled metrics are built by their first update.)
            return tf.cond(tf.logical_not(self._stop), lambda: self._step(data), self._logs)

    def _step(self, data: Any) -> dict[str, Any]:
        model = self._model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if getattr(model, "_call_has_training_arg", True):
            y_pred = model(x, training=True)
        else:
            y_pred = model(x)
        # Under a strategy, each replica's loss divided by the number of replicas, as Keras
        # makes it: the sum over the replicas is the batch's.
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
        return logs

    def make_train_function(self, force: bool = False) -> Any:
        """Keras's train function, which under XLA raises the guard's error after the call."""
        self._keras_make_train_function(force)
        function = self._model.train_function
        if self._stop is None or getattr(function, _INSTALLED, False):
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

        setattr(train_function, _INSTALLED, True)
        self._model.train_function = train_function
        return train_function

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        """Keras's `fit`, with the default `tf.summary` writer set to the `train` directory of
        its `keras.callbacks.TensorBoard` callback, if any, while it runs."""
        bound = inspect.signature(self._keras_fit).bind_partial(*args, **kwargs)
        callbacks = bound.arguments.get("callbacks") or []
        board = next((c for c in callbacks if isinstance(c, keras.callbacks.TensorBoard)), None)
        if board is None:
            return self._keras_fit(*args, **kwargs)
        if self._model.jit_compile:
            logger.warning(
                "trainop's train summaries are not written under jit_compile=True: XLA does "
                "not compile summary writes. Keras's TensorBoard callback writes its own."
            )
            return self._keras_fit(*args, **kwargs)
        writer = tf.summary.create_file_writer(os.path.join(board.log_dir, "train"))
        try:
            with writer.as_default():
                return self._keras_fit(*args, **kwargs)
        finally:
            writer.close()
