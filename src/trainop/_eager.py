"""The eager front-end: the per-replica step (the loss called under a tape, the variables
it reads found, the eager update ops), composed with the layers of `_distribute` and
`_compile`; and the step cache of `create_train_step`, which calls the loss eagerly and
compiles only what follows the gradients.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from trainop import (
    _compile,
    _config,
    _core,
    _distribute,
    _global_step,
    _gradients,
    _learning_rates,
    _variables,
    averaging,
    numerics,
    summaries,
)


@tf.autograph.experimental.do_not_convert
def variables_given_or_read(
    variables_to_train: Any, tape: tf.GradientTape, reads: dict[int, Any]
) -> list[Any]:
    """`variables_to_train` (called and checked, if a callable), else the trainable variables
    that `tape` saw the loss read (of a Keras 3 variable, the Keras variable, which `reads`
    recorded: see `_variables.recording_reads`).

    Raises:
      ValueError: if none is given and the loss read none.
    """
    if callable(variables_to_train):
        return _config.check_variables_to_train(variables_to_train(), in_graph=False)
    if variables_to_train is not None:
        return variables_to_train
    watched = list(tape.watched_variables())
    # The tape sees the `tf.Variable` inside each Keras 3 variable, whose own `trainable` flag
    # Keras never updates (`layer.trainable = False` sets the Keras variable's only): the
    # Keras variable, with its flag and its constraint, is the one to train.
    variables = [v for v in _variables.keras_owners(watched, reads) if v.trainable]
    if not variables:
        raise ValueError(
            "`variables_to_train` is None and the loss reads no trainable variable: there is "
            "nothing to train."
            + (" (The variables it reads belong to frozen Keras layers.)" if watched else "")
        )
    return variables


def _reads_if(discovering: bool) -> Any:
    """`_variables.recording_reads()` when the variables to train are found from what the loss
    reads; else nothing recorded."""
    return _variables.recording_reads() if discovering else contextlib.nullcontext({})


def create_eager_train_op(
    loss_fn: Callable[..., Any],
    config: _config.StepConfig,
    update_ops: Any,
    variables_to_train: Any,
    total_loss_fn: Callable[[Any], Any] | None = None,
    jit_compile: bool = False,
    steps_per_call: int = 1,
) -> Callable[..., Any]:
    """The eager train op: the step of one replica, then (in a strategy's scope) across the
    replicas, then in a loop of `steps_per_call` steps, then compiled, as Keras's trainer
    stacks `train_step`, `strategy.run`, `steps_per_execution` and XLA."""
    update_fns = _config.check_eager_update_ops(update_ops)
    strategy = _distribute.replicated_strategy(config.global_step)
    if variables_to_train is not None and not callable(variables_to_train):
        variables_to_train = _config.check_variables_to_train(variables_to_train, in_graph=False)
        config.adapter.build(variables_to_train)
    elif strategy is not None:
        raise ValueError(
            "`variables_to_train` must be a list of variables under a tf.distribute strategy: "
            "the optimizer's state is made before the first step, in the strategy's scope. "
            "Pass model.trainable_variables."
        )
    step = ReplicaStep(
        loss_fn,
        config,
        update_fns,
        variables_to_train,
        total_loss_fn,
        xla_without_strategy=jit_compile and strategy is None,
    )
    if strategy is None:
        # (Under XLA, the default check is a LossCheckUnderXLA, raised after the call.)
        default_check = config.check_numerics is True or isinstance(
            config.check_numerics, numerics.LossCheckUnderXLA
        )
        counter, _ = _global_step.counter(config.global_step, config.adapter.iterations)
        call_start = None
        if default_check and steps_per_call > 1 and counter is not None:
            with tf.init_scope():
                call_start = tf.Variable(-1, dtype=tf.int64, trainable=False, name="call_start")
        train_op = _compile.compiled(
            step.train_step, config, jit_compile, steps_per_call, call_start
        )
        if default_check and (steps_per_call == 1 or call_start is not None):
            # The default check's error, which says only that the loss is inf or NaN, told
            # what else was not finite: worked out after the failure, costing a healthy step
            # nothing (with several steps a call, one assignment a call).
            return DiagnosedTrainOp(train_op, step, steps_per_call, call_start)
        return train_op
    step_fn = _distribute.across_replicas(
        step.loss_and_variables,
        strategy,
        config,
        step.run_update_ops,
        step.reported_missing,
        jit_compile,
        steps_per_call,
    )
    # Only each replica's loss and gradients are compiled: errors need naming, no more.
    return (
        _compile.CompiledTrainOp(tf.function(step_fn), None)
        if jit_compile
        else tf.function(step_fn)
    )


class DiagnosedTrainOp:
    """An eager train op with the default check, whose error says what was not finite.

    The check raises `tf.errors.InvalidArgumentError` (`numerics.LOSS_NOT_FINITE_MESSAGE`)
    when the loss is inf or NaN, with nothing changed (what the forward pass wrote, written
    back). This then computes, in a second function traced on the first failure only, the
    loss and the gradients of the same arguments, and raises the same error type with the
    step, the loss and the variables whose gradients hold inf or NaN (the first
    `_core.REPORTED_NAMES`, and how many). Everything else is the train op's
    (`get_concrete_function`, `experimental_get_tracing_count`, ...).
    """

    def __init__(
        self,
        train_op: Any,
        step: ReplicaStep,
        steps_per_call: int = 1,
        call_start: tf.Variable | None = None,
    ):
        self._train_op = train_op
        self._step = step
        self._diagnosis: Any = None
        # With several steps a call: the step counter at the start of each call, so that the
        # failing step's batch is known.
        self._steps_per_call = steps_per_call
        self._call_start = call_start

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._train_op(*args, **kwargs)
        except tf.errors.InvalidArgumentError as error:
            if numerics.LOSS_NOT_FINITE_MESSAGE not in str(error):
                raise
            described = self._describe(*args, **kwargs)
            raise tf.errors.InvalidArgumentError(
                error.node_def, error.op, f"{numerics.LOSS_NOT_FINITE_MESSAGE} {described}"
            ) from error

    def _describe(self, *args: Any, **kwargs: Any) -> str:
        """What was not finite in the step on these arguments, as words."""
        if self._diagnosis is None:
            self._diagnosis = tf.function(self._step.not_finite)
        config = self._step.config
        counter, step_name = _global_step.counter(config.global_step, config.adapter.iterations)
        at = f"at {step_name} {int(counter.numpy())}" if counter is not None else "at a step"
        if self._call_start is not None:
            # The steps of the call before the failing one counted; it did not.
            k = int(counter.numpy()) - int(self._call_start.numpy())
            args, kwargs = tf.nest.map_structure(_compile.as_tensor_if_array, (args, kwargs))
            args, kwargs = _compile.batch_at(k, self._steps_per_call, args, kwargs)
            at += f" (step {k + 1} of the call's {self._steps_per_call})"
        loss, names, finite = self._diagnosis(*args, **kwargs)
        bad = [name.decode() for name, ok in zip(names.numpy(), finite.numpy()) if not ok]
        shown = ", ".join(bad[: _core.REPORTED_NAMES])
        if len(bad) > _core.REPORTED_NAMES:
            shown += " ..."
        return (
            f"{at}: the loss is {float(loss.numpy())}; gradients not finite: {len(bad)} of "
            f"{len(names)}" + (f" ({shown})" if bad else "")
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._train_op, name)


class ReplicaStep:
    """The step of one replica, which knows no strategy, loop or compiler: the loss called
    under a tape, the variables it reads (unless given), and `_core.build_step`.

    `train_step` runs one step on the batch it is given (the train op's arguments) and returns
    the loss (or, with `total_loss_fn`, the loss structure as computed, before the update).
    """

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        config: _config.StepConfig,
        update_fns: list[Callable[[], Any]],
        variables_to_train: Any,
        total_loss_fn: Callable[[Any], Any] | None,
        xla_without_strategy: bool,
    ):
        self._loss_fn = loss_fn
        self._config = config
        self._update_fns = update_fns
        self._variables_to_train = variables_to_train
        self._total_loss_fn = total_loss_fn
        self._xla_without_strategy = xla_without_strategy
        # Names of variables without gradient already logged: once per train op, across traces.
        self.reported_missing: set[str] = set()

    @property
    def config(self) -> _config.StepConfig:
        return self._config

    def run_update_ops(self) -> list[Any]:
        return [fn() for fn in self._update_fns]

    def not_finite(self, *args: Any, **kwargs: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """The loss of the step on these arguments, the names of the variables it trains and
        whether each one's gradient is finite; what the forward pass writes is written back.
        For `DiagnosedTrainOp`, after a failed check."""
        with _variables.recording_writes() as writes:
            _, total_loss, _, variables = self.loss_and_variables(*args, **kwargs)
        grads = tf.gradients(total_loss, [_variables.as_tf_variable(v) for v in variables])
        finite = tf.stack(
            [
                _gradients.every_element_finite(g) if g is not None else tf.constant(True)
                for g in grads
            ]
        )
        with tf.control_dependencies([total_loss, finite]):
            undone = _variables.undo_writes(writes)
        with tf.control_dependencies(undone):
            names = tf.constant([_variables.variable_name(v) for v in variables])
            return tf.identity(total_loss), names, tf.identity(finite)

    def loss_and_variables(
        self, *args: Any, **kwargs: Any
    ) -> tuple[Any, tf.Tensor, tf.Tensor | None, list[Any]]:
        """The loss structure, the loss to minimize (a loss given as `(loss_sum, count)`: their
        quotient), its count (or None) and the variables to train."""
        if self._xla_without_strategy and summaries.writes_v2_summaries():
            raise ValueError(
                "`jit_compile=True` and a default tf.summary writer: XLA does not compile "
                "summary writes. Build and first call the train op without a default writer, "
                "or with jit_compile=False."
            )
        # The trainable variables that the loss reads, should none be given.
        with tf.GradientTape() as tape, _reads_if(self._variables_to_train is None) as reads:
            loss = self._loss_fn(*args, **kwargs)
            total_loss = loss if self._total_loss_fn is None else self._total_loss_fn(loss)
            if self._total_loss_fn is None:
                total_loss, count = _core.counted_loss(total_loss)
            else:
                count = None
        _config.check_loss_tensor(total_loss, self._total_loss_fn is not None)
        variables = variables_given_or_read(self._variables_to_train, tape, reads)
        return loss, total_loss, count, variables

    def train_step(self, *args: Any, **kwargs: Any) -> Any:
        # Built outside a strategy's scope, the train op may still be called in strategy.run.
        _distribute.check_in_a_replica(self._config)
        # What the forward pass writes (batch normalization's statistics) is undone on a step
        # the guard rejects; not inside a strategy's replica, whose variables are mirrored.
        watching = not _distribute.in_a_replica()
        with _variables.recording_writes() if watching else contextlib.nullcontext({}) as writes:
            loss, total_loss, count, variables = self.loss_and_variables(*args, **kwargs)
        trained_loss = _core.build_step(
            total_loss,
            _core.step_gradients(total_loss, variables, self._config, self.reported_missing),
            self._config,
            apply=_distribute.optimizer_applier(self._config, in_function=True),
            before_update=self.run_update_ops,
            undo=(lambda keep: _variables.undo_writes(writes, keep)) if writes else None,
            count=count,
        )
        if self._total_loss_fn is None:
            return trained_loss
        # Every stateful op in a tf.function runs before it returns: the structure is
        # returned as computed, before the update.
        return loss


# What `create_train_step` keeps between its calls in eager mode: per optimizer and settings,
# the prepared step (the numerics guard it counts in, the optimizer state it built) and its
# compiled updates, one per set of variables. Never the loss: it is called afresh every time.
# An entry holds its optimizer and variables, so a weakly keyed cache would never let them go;
# this one keeps the most recently used few.
STEP_CACHE: collections.OrderedDict = collections.OrderedDict()


STEP_CACHE_SIZE = 8


def identity_key(value: Any, referents: list[Any]) -> Any:
    """A hashable key for `value`: scalars by type and value, anything else by identity.

    Each object keyed by identity is appended to `referents`, for the cache entry to keep: an
    object kept alive cannot lend its id to a newer one, which would find a stale entry.
    """
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(identity_key(v, referents) for v in value))
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        # The type too: True == 1, but they are not the same setting.
        return (type(value).__name__, value)
    referents.append(value)
    return ("id", id(value))


def cached_eager_step(
    cache: collections.OrderedDict,
    key: Any,
    referents: list[Any],
    build: Callable[[], Any],
    size: int = STEP_CACHE_SIZE,
) -> Any:
    """`cache[key]`, built and kept with `referents` if missing; the least recent goes."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key][0]
    value = build()
    cache[key] = (value, tuple(referents))
    if len(cache) > size:
        cache.popitem(last=False)
    return value


def summary_state_key(referents: list[Any], reads_default_step: bool) -> Any:
    """What a traced step reads of the `tf.summary` state when a default writer is set: the
    writer, the recording condition and, if `reads_default_step` (the step has neither a
    global step nor an optimizer counter to write at), the default step; a Python value among
    them is traced in as a constant."""
    if not summaries.writes_v2_summaries():
        return None
    # TensorFlow has no public way to read them.
    from tensorflow.python.ops import summary_ops_v2

    state = summary_ops_v2._summary_state
    step = state.step if reads_default_step else None
    return identity_key((state.writer, state.is_recording, step), referents)


class PreparedStep:
    """What `create_train_step` keeps for one optimizer and one set of settings."""

    def __init__(self, config: _config.StepConfig):
        self.config = config
        self.adapter = config.adapter
        self.reported_missing: set[str] = set()
        # The variables the optimizer's state was built for, by `_variables.variable_key`; kept,
        # so that no other variable is given the key of one gone.
        self.built: dict[int, Any] = {}
        self.updates: collections.OrderedDict = collections.OrderedDict()

    def build(self, variables: list[Any]) -> None:
        if any(_variables.variable_key(v) not in self.built for v in variables):
            self.adapter.build(variables)
            self.built.update((_variables.variable_key(v), v) for v in variables)

    def compiled_update(
        self,
        variables: list[Any],
        transformed_variables: list[Any] | None,
        update_fns: list[Callable[[], Any]],
    ) -> Callable[..., Any]:
        """The rest of the step, compiled: `update(total_loss, grads, transformed_grads)`.

        It runs the numerics guard, the summaries, the update ops and the update on the
        gradients of `variables` (and, after `transform_grads_fn`, of `transformed_variables`)
        that it is given, and counts the step. With update ops, which are the caller's code
        traced into it, it is traced afresh on every call.
        """

        def update(total_loss: tf.Tensor, grads: list[Any], transformed_grads: Any) -> tf.Tensor:
            # Transformed already, eagerly, on this call's gradients: the step takes them.
            config = dataclasses.replace(
                self.config,
                transform_grads_fn=(
                    None
                    if transformed_variables is None
                    else lambda pairs: list(zip(transformed_grads, transformed_variables))
                ),
            )
            return _core.build_step(
                total_loss,
                list(zip(grads, variables)),
                config,
                apply=_distribute.optimizer_applier(config, in_function=True),
                before_update=lambda: [fn() for fn in update_fns],
            )

        def build() -> Callable[..., Any]:
            # The gradients of an embedding are IndexedSlices whose row count varies.
            return tf.function(update, reduce_retracing=True)

        if update_fns:
            return build()
        referents: list[Any] = []
        key = (
            identity_key(variables, referents),
            identity_key(transformed_variables, referents),
            summary_state_key(
                referents, self.config.global_step is None and self.adapter.iterations is None
            ),
        )
        return cached_eager_step(self.updates, key, referents, build)


def eager_loss_and_gradients(
    loss: Callable[[], Any],
    total_loss_fn: Callable[[Any], Any],
    prepared: PreparedStep,
    variables_to_train: Any,
) -> tuple[Any, tf.Tensor, list[tuple[Any, Any]]]:
    """Calls `loss()` now and takes the gradients, with a `tf.GradientTape`, as TF-Agents does.

    Returns the loss structure, the loss to minimize and the (gradient, variable) pairs, the
    gradients unscaled if the optimizer scales the loss. Nothing has changed yet.
    """
    adapter = prepared.adapter
    if adapter.computes_gradients:
        # Its minimize calls it; a GradientTape would silently bypass it.
        raise ValueError(
            "`optimizer` overrides compute_gradients, which create_train_step in eager mode "
            "does not call: it takes the gradients with a GradientTape, as TF-Agents does. Use "
            "create_train_op with the loss as a callable, whose step calls the optimizer's "
            f"compute_gradients. Received: optimizer={adapter.optimizer!r:.200}"
        )
    with tf.GradientTape() as tape, _reads_if(variables_to_train is None) as reads:
        loss_value = loss()
        total_loss = total_loss_fn(loss_value)
        with tape.stop_recording():
            _config.check_loss_tensor(total_loss, through_total_loss_fn=True)
            _core.check_loss(total_loss)
            variables = variables_given_or_read(variables_to_train, tape, reads)
            variables = _config.check_variables_to_train(variables, in_graph=False)
            prepared.build(variables)
            loss_scale = adapter.gradient_scale()
        if loss_scale is not None:
            # Mixed precision, or a loss_scale_factor: the gradients of the scaled loss,
            # unscaled (as in the core).
            minimized = total_loss * tf.cast(loss_scale, total_loss.dtype)
        else:
            minimized = total_loss
    grads = tape.gradient(minimized, [_variables.as_tf_variable(v) for v in variables])
    if loss_scale is not None:
        grads = [_gradients.scale(g, loss_scale, divide=True) for g in grads]
    return loss_value, total_loss, list(zip(grads, variables))


def identity(x: Any) -> Any:
    return x


def run_train_step(
    loss: Any,
    optimizer: Any,
    *,
    global_step: Any,
    total_loss_fn: Callable[[Any], Any],
    update_ops: Any,
    variables_to_train: Any,
    transform_grads_fn: Any,
    summarize_gradients: Any,
    gate_gradients: Any,
    aggregation_method: Any,
    check_numerics: Any,
    missing_gradients: Any,
    summarize_every_n_steps: Any,
    learning_rate_multipliers: Any,
    moving_average: Any,
) -> Any:
    """`create_train_step` in eager mode: one step now, on what `loss()` reads now; returns the
    loss structure. The loss and its gradients are computed eagerly; what follows them is
    compiled once per optimizer, settings and set of variables (`STEP_CACHE`)."""
    if not _config.is_loss_callable(loss):
        raise ValueError(  # As TF-Agents raises.
            "`loss` must be a zero-argument callable in eager mode. "
            f"Received: loss of type {type(loss).__name__}"
        )

    # The settings are checked before the loss is called: a wrong one fails before anything
    # runs, and the loss's forward pass (which may write, as batch normalization does) too.
    _config.check_choices(gate_gradients, aggregation_method, summarize_every_n_steps)
    _config.check_callable_or_none("transform_grads_fn", transform_grads_fn)
    update_fns = _config.check_eager_update_ops(update_ops)
    # The settings the compiled part depends on: its cache key, and what it is prepared with.
    compiled_settings = dict(
        summarize_gradients=summarize_gradients,
        gate_gradients=gate_gradients,
        aggregation_method=aggregation_method,
        check_numerics=check_numerics,
        missing_gradients=missing_gradients,
        summarize_every_n_steps=summarize_every_n_steps,
    )
    referents: list[Any] = []
    multipliers = _learning_rates.resolve(learning_rate_multipliers)
    averaging.check_moving_average(moving_average)
    key = identity_key(
        # The variable: a new program global step is a new step to count in. The factors by
        # their keys and values: a dict made anew at each call is the same setting.
        (
            optimizer,
            _global_step.resolve(global_step),
            *compiled_settings.values(),
            None if multipliers is None else tuple(multipliers.items),
            moving_average,
        ),
        referents,
    )

    def prepare() -> PreparedStep:
        config = _config.resolve(optimizer, global_step, None, **compiled_settings)
        return PreparedStep(
            dataclasses.replace(
                config, learning_rate_multipliers=multipliers, moving_average=moving_average
            )
        )

    prepared = cached_eager_step(STEP_CACHE, key, referents, prepare)
    _distribute.check_in_a_replica(prepared.config)
    loss_value, total_loss, grads_and_vars = eager_loss_and_gradients(
        loss, total_loss_fn, prepared, variables_to_train
    )
    _core.report_missing_gradients(grads_and_vars, prepared.reported_missing, missing_gradients)
    transformed = None
    if transform_grads_fn is not None:
        transformed = _core.check_transformed(transform_grads_fn(grads_and_vars), grads_and_vars)
    update = prepared.compiled_update(
        [v for _, v in grads_and_vars],
        None if transformed is None else [v for _, v in transformed],
        update_fns,
    )
    update(
        total_loss,
        [g for g, _ in grads_and_vars],
        None if transformed is None else [g for g, _ in transformed],
    )
    return loss_value
