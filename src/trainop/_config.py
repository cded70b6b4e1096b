"""The settings of a train op, checked: every build-time argument check of the two
front-ends, and the settings they resolve to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from trainop import (
    _accumulation,
    _core,
    _global_step,
    _learning_rates,
    _optimizers,
    _step_metrics,
    _variables,
    averaging,
    numerics,
)
from trainop._checks import check_count

GATE_VALUES = (_core.GATE_NONE, _core.GATE_OP, _core.GATE_GRAPH)


AGGREGATION_VALUES = (
    tf.AggregationMethod.ADD_N,  # also tf.AggregationMethod.DEFAULT
    tf.AggregationMethod.EXPERIMENTAL_TREE,
    tf.AggregationMethod.EXPERIMENTAL_ACCUMULATE_N,
)


def check_choices(
    gate_gradients: Any, aggregation_method: Any, summarize_every_n_steps: Any
) -> None:
    if type(gate_gradients) is not int or gate_gradients not in GATE_VALUES:
        raise ValueError(
            "`gate_gradients` must be tf.compat.v1.train.Optimizer.GATE_NONE (0), GATE_OP (1) or "
            f"GATE_GRAPH (2). Received: gate_gradients={gate_gradients!r}"
        )
    if aggregation_method is not None and (
        type(aggregation_method) is not int or aggregation_method not in AGGREGATION_VALUES
    ):
        raise ValueError(
            "`aggregation_method` must be None or a tf.AggregationMethod value (ADD_N, "
            "EXPERIMENTAL_TREE, EXPERIMENTAL_ACCUMULATE_N). "
            f"Received: aggregation_method={aggregation_method!r}"
        )
    check_count("summarize_every_n_steps", summarize_every_n_steps, allow_none=True)


def refuse_replicas() -> None:
    """Raises inside a `tf.distribute` strategy's scope (cross-replica) in graph mode."""
    if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
        # Without strategy.run, optimizers fail deep inside (no replica context) or, worse, the
        # step would run once on unsplit inputs with the global step and loss scaling wrong.
        raise ValueError(
            "create_train_op with a loss Tensor inside a tf.distribute strategy's scope "
            f"({type(tf.distribute.get_strategy()).__name__}) is not supported: pass the loss "
            "as a callable in eager mode (the train op then runs it with strategy.run), or "
            "call create_train_op inside the function you pass to strategy.run."
        )


def check_callable_or_none(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be a callable or None. Received: {name}={value!r:.200}")


@tf.autograph.experimental.do_not_convert
def check_variables_to_train(variables: Any, in_graph: bool) -> list[Any]:
    """Returns `variables` as a list, each once, after checking that each is trainable.

    A variable listed twice (`actor.trainable_variables + critic.trainable_variables` with a
    shared encoder) is trained once.
    """
    if _variables.is_variable(variables):
        variables = [variables]
    variables = tf.nest.flatten(variables)
    if not variables:
        raise ValueError("`variables_to_train` is empty: there is nothing to train.")
    graph_trainable = {id(v) for v in tf.compat.v1.trainable_variables()} if in_graph else set()
    for v in variables:
        if not _variables.is_variable(v):
            raise TypeError(
                "`variables_to_train` must hold variables. "
                f"Received an element of type {type(v).__name__}: {v!r:.200}"
            )
    # The `tf.Variable` inside a Keras 3 variable (`variable.value`, or what a tape watched)
    # stands for its Keras variable, whose `trainable` follows its layer's and whose
    # constraint must be applied.
    variables = _variables.keras_owners(variables, {})
    for v in variables:
        if not (v.trainable or id(v) in graph_trainable):
            raise ValueError(
                "`variables_to_train` holds a variable that is not trainable: "
                f"{_variables.variable_name(v)}. Create it with trainable=True (a Keras "
                "layer's: set layer.trainable = True) or leave it out."
            )
    seen: set[int] = set()
    unique = []
    for v in variables:
        if _variables.variable_key(v) not in seen:
            seen.add(_variables.variable_key(v))
            unique.append(v)
    return unique


def check_eager_update_ops(update_ops: Any) -> list[Callable[[], Any]]:
    if update_ops is None:
        return []
    if callable(update_ops):
        update_ops = [update_ops]
    if not isinstance(update_ops, (list, tuple)) or not all(callable(op) for op in update_ops):
        raise TypeError(
            "`update_ops` must be a list of zero-argument callables in eager mode (there is no "
            "UPDATE_OPS collection to run). "
            f"Received: update_ops={update_ops!r:.200}"
        )
    return list(update_ops)


def check_loss_tensor(total_loss: Any, through_total_loss_fn: bool) -> None:
    if not isinstance(total_loss, tf.Tensor):
        raise TypeError(
            "`total_loss` must return a scalar loss tensor"
            + (
                " (through `total_loss_fn`)"
                if through_total_loss_fn
                else " or a pair (loss_sum, count)"
            )
            + f". Received: {type(total_loss).__name__} {total_loss!r:.200}"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class StepConfig:
    """The settings of a train op, checked and resolved once, when it is built (`resolve`).

    Attributes:
      adapter: applies the gradients with the caller's optimizer.
      global_step: the integer variable counted once per applied update, or None.
      transform_grads_fn: maps the (gradient, variable) pairs before they are applied, or None.
      summarize_gradients: whether to write a histogram and a norm per gradient.
      gate_gradients: `GATE_NONE`, `GATE_OP` or `GATE_GRAPH`.
      aggregation_method: a `tf.AggregationMethod` value, or None.
      check_numerics: True (an inf or NaN loss raises before anything changes), False, or the
        `SkipNonFiniteSteps` guard that skips a step whose loss or gradients are not finite.
      missing_gradients: 'log' or 'raise', for a variable without gradient.
      summarize_every_n_steps: the train summaries are written at its multiples only; None:
        at every step.
      accumulator: sums the gradients of `accumulator.steps` calls and applies their mean, or
        None.
    """

    adapter: _optimizers.OptimizerAdapter
    global_step: tf.Variable | None
    transform_grads_fn: Callable[[list], list] | None
    summarize_gradients: bool
    gate_gradients: int
    aggregation_method: int | None
    check_numerics: bool | numerics.SkipNonFiniteSteps
    missing_gradients: str
    summarize_every_n_steps: int | None
    accumulator: _accumulation.GradientAccumulator | None
    learning_rate_multipliers: _learning_rates.LearningRateMultipliers | None = None
    moving_average: averaging.ExponentialMovingAverage | None = None
    step_metrics: _step_metrics.StepMetrics | None = None


def resolve(
    optimizer: Any,
    global_step: Any,
    transform_grads_fn: Any,
    summarize_gradients: Any,
    gate_gradients: Any,
    aggregation_method: Any,
    check_numerics: Any,
    missing_gradients: Any,
    summarize_every_n_steps: Any,
    accumulation_steps: Any = 1,
    *,
    learning_rate_multipliers: Any = None,
    moving_average: Any = None,
    step_metrics: Any = False,
) -> StepConfig:
    """Checks the arguments shared by `create_train_op` and `create_train_step`, and resolves
    them: the optimizer's adapter, the global step variable, the numerics guard.

    Raises:
      ValueError, TypeError: an argument is bad; the error names it.
    """
    adapter = _optimizers.OptimizerAdapter(optimizer)
    check_choices(gate_gradients, aggregation_method, summarize_every_n_steps)
    check_count("accumulation_steps", accumulation_steps)
    check_callable_or_none("transform_grads_fn", transform_grads_fn)
    if missing_gradients not in ("log", "raise"):
        raise ValueError(
            "`missing_gradients` must be 'log' or 'raise'. "
            f"Received: missing_gradients={missing_gradients!r}"
        )
    check_ops_apart(
        adapter,
        check_numerics,
        accumulation_steps,
        learning_rate_multipliers=learning_rate_multipliers,
        moving_average=moving_average,
        step_metrics=step_metrics,
    )
    averaging.check_moving_average(moving_average)
    if not isinstance(step_metrics, (bool, np.bool_)):
        raise TypeError(
            f"`step_metrics` must be True or False. Received: step_metrics={step_metrics!r:.200}"
        )
    guard = numerics.resolve_check_numerics(check_numerics, optimizer)
    return StepConfig(
        adapter=adapter,
        global_step=_global_step.resolve(global_step),
        transform_grads_fn=transform_grads_fn,
        summarize_gradients=bool(summarize_gradients),
        gate_gradients=gate_gradients,
        aggregation_method=aggregation_method,
        check_numerics=guard,
        missing_gradients=missing_gradients,
        summarize_every_n_steps=(
            None if summarize_every_n_steps is None else int(summarize_every_n_steps)
        ),
        accumulator=(
            _accumulation.GradientAccumulator(int(accumulation_steps))
            if accumulation_steps > 1
            else None
        ),
        learning_rate_multipliers=_learning_rates.resolve(learning_rate_multipliers),
        moving_average=moving_average,
        step_metrics=(
            _step_metrics.StepMetrics(
                guard if isinstance(guard, numerics.SkipNonFiniteSteps) else None
            )
            if step_metrics
            else None
        ),
    )


def check_ops_apart(
    adapter: _optimizers.OptimizerAdapter,
    check_numerics: Any,
    accumulation_steps: Any,
    **after_update: Any,
) -> None:
    """Refuses what would put the ops a `SyncReplicasOptimizer` builds apart from the step
    (see `OptimizerAdapter.builds_ops_apart`) in a `tf.cond` branch: the skip guard and
    accumulation, which apply the update in one; and what reads the variables after the update
    (`after_update`: learning-rate factors, averages, step metrics), which its chief applies
    later, from its queue."""
    if not adapter.builds_ops_apart:
        return
    conditional = {
        "check_numerics": isinstance(check_numerics, (numerics.SkipNonFiniteSteps, str)),
        "accumulation_steps": accumulation_steps != 1,
    }
    for name, refused in conditional.items():
        if refused:
            raise ValueError(
                f"`{name}` cannot be used with a SyncReplicasOptimizer: it applies the update in "
                "a tf.cond branch, where the optimizer's token queue and chief update (run by "
                "its session hook) cannot be built. Use check_numerics=True and "
                "accumulation_steps=1 with it, or tf.distribute's MultiWorkerMirroredStrategy "
                "(SyncReplicasOptimizer is deprecated)."
            )
    for name, value in after_update.items():
        if value is not None and value is not False:
            raise ValueError(
                f"`{name}` cannot be used with a SyncReplicasOptimizer: it reads the variables "
                "once the update is applied, which its chief does later, from its queue. Use "
                "tf.distribute's MultiWorkerMirroredStrategy (SyncReplicasOptimizer is "
                "deprecated)."
            )


def is_loss_callable(total_loss: Any) -> bool:
    return callable(total_loss) and not isinstance(total_loss, (tf.Tensor, tf.Variable))
