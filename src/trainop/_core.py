"""The training step, built on symbolic tensors inside a graph.

A `tf.function` body is a graph, just as a `tf.compat.v1` graph is, so both front-ends
(`_graph`, `_eager`) and the cross-replica step (`_distribute`) call `build_step` with a loss
tensor of the current graph and the train op's `_config.StepConfig`:

  loss -> gradients -> numerics guard -> transform -> summaries -> apply + global step -> loss

Nothing here knows which optimizer family it is talking to (that is `_optimizers`). It still
asks whether it runs in a `tf.function` (a cond branch's update ordering) and in a replica (a
loss-scale optimizer's verdict across replicas), which the distributed path could hand it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from trainop import (
    _global_step,
    _gradients,
    _optimizers,
    _variables,
    numerics,
    summaries,
)

logger = logging.getLogger("trainop")

if TYPE_CHECKING:
    from trainop._config import StepConfig

GATE_NONE = tf.compat.v1.train.Optimizer.GATE_NONE
GATE_OP = tf.compat.v1.train.Optimizer.GATE_OP
GATE_GRAPH = tf.compat.v1.train.Optimizer.GATE_GRAPH


def check_loss(total_loss: tf.Tensor) -> None:
    """Raises if `total_loss` cannot be minimized: it must be a floating-point scalar."""
    if not total_loss.dtype.is_floating:
        raise TypeError(
            "`total_loss` must be a floating-point tensor. "
            f"Received: total_loss with dtype {total_loss.dtype.name}"
        )
    if total_loss.shape.rank not in (None, 0):
        raise ValueError(
            "`total_loss` must be a scalar; reduce it first (for example with tf.reduce_mean). "
            f"Received: total_loss with shape {total_loss.shape}"
        )


def compute_gradients(
    total_loss: tf.Tensor,
    variables: Sequence[Any],
    gate_gradients: int,
    aggregation_method: int | None,
    adapter: _optimizers.OptimizerAdapter | None = None,
) -> list[tuple[Any, Any]]:
    """Returns (gradient, variable) pairs, as `tf.compat.v1.train.Optimizer` computes them.

    With `adapter`, a `tf.compat.v1` optimizer that overrides `compute_gradients` computes them
    itself, as its `minimize` would.
    """
    if adapter is not None and adapter.computes_gradients:
        return adapter.compute_gradients(
            total_loss, list(variables), gate_gradients, aggregation_method
        )
    grads = tf.gradients(
        total_loss,
        [_variables.as_tf_variable(v) for v in variables],
        gate_gradients=(gate_gradients == GATE_OP),
        aggregation_method=aggregation_method,
    )
    if gate_gradients == GATE_GRAPH:
        # No gradient is returned before all of them are computed.
        grads = tf.tuple(grads)
    return list(zip(grads, variables))


def check_transformed(
    transformed: Any, grads_and_vars: list[tuple[Any, Any]]
) -> list[tuple[Any, Any]]:
    """`transformed`, what `transform_grads_fn` returned for `grads_and_vars`, once checked.

    Raises:
      TypeError: if it is not a list of (gradient, variable) pairs.
      ValueError: if it holds other variables, or a gradient that does not fit its variable.
    """
    if not isinstance(transformed, (list, tuple)) or not all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in transformed
    ):
        raise TypeError(
            "`transform_grads_fn` must return a list of (gradient, variable) pairs. "
            f"Received: {type(transformed).__name__} {transformed!r:.200}"
        )
    expected = sorted(_variables.variable_key(v) for _, v in grads_and_vars)
    received = sorted(_variables.variable_key(v) for _, v in transformed)
    if expected != received:
        names = [_variables.variable_name(v) for _, v in transformed]
        raise ValueError(
            "`transform_grads_fn` must return a pair for each variable it was given, and no "
            "other. Expected variables: "
            f"{[_variables.variable_name(v) for _, v in grads_and_vars]}. Received: {names}"
        )
    for grad, var in transformed:
        if grad is None:
            continue
        shape = grad.dense_shape if isinstance(grad, tf.IndexedSlices) else grad.shape
        shape = (
            tf.TensorShape(tf.get_static_value(shape)) if isinstance(shape, tf.Tensor) else shape
        )
        if not shape.is_compatible_with(var.shape) or grad.dtype != var.dtype:
            raise ValueError(
                "`transform_grads_fn` returned a gradient that does not fit its variable "
                f"{_variables.variable_name(var)} ({var.dtype.name} {var.shape}): "
                f"{grad.dtype.name} {shape}"
            )
    return [tuple(pair) for pair in transformed]


def report_missing_gradients(
    grads_and_vars: list[tuple[Any, Any]], reported: set[str], policy: str
) -> None:
    """Logs, once per train op, or raises for, the variables the loss gives no gradient."""
    missing = [_variables.variable_name(v) for g, v in grads_and_vars if g is None]
    if missing and policy == "raise":
        raise ValueError(
            "`total_loss` gives no gradient to these `variables_to_train` "
            f"(missing_gradients='raise'): {missing}"
        )
    if len(missing) == len(grads_and_vars):
        raise ValueError(
            "`total_loss` has no gradient with respect to any of `variables_to_train`: "
            f"{missing}. Does the loss depend on them?"
        )
    # A tf.function may trace more than once (a second time when its first call made
    # variables): each name is logged once per train op.
    unreported = [name for name in missing if name not in reported]
    if unreported:
        logger.warning(
            "These variables get no gradient from the loss and are not trained: %s",
            ", ".join(unreported),
        )
        reported.update(unreported)


def _present_gradients(grads_and_vars: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """The pairs to apply: a None gradient (none from the loss, or frozen) is not applied."""
    present = [(g, v) for g, v in grads_and_vars if g is not None]
    if not present:
        raise ValueError(
            "`transform_grads_fn` left no gradient to apply: every variable is frozen."
        )
    return present


def step_gradients(
    total_loss: tf.Tensor,
    adapter: _optimizers.OptimizerAdapter,
    variables: Sequence[Any],
    gate_gradients: int,
    aggregation_method: int | None,
    reported_missing: set[str] | None = None,
    missing_gradients: str = "log",
) -> list[tuple[Any, Any]]:
    """The (gradient, variable) pairs of a step, unscaled if the optimizer scales the loss.

    Raises, or logs once, for the variables the loss gives no gradient (see `build_step`).
    """
    check_loss(total_loss)
    adapter.build(variables)
    scale = adapter.gradient_scale()
    if scale is None:
        grads_and_vars = compute_gradients(
            total_loss, variables, gate_gradients, aggregation_method, adapter
        )
    else:
        # Mixed precision: the gradients of the scaled loss, unscaled, so that the numerics
        # guard, transforms and summaries see true values; scaled again for the optimizer,
        # which skips (and counts down its scale for) the steps that overflowed.
        scaled_loss = total_loss * tf.cast(scale, total_loss.dtype)
        grads_and_vars = [
            (_gradients.scale(g, scale, divide=True), v)
            for g, v in compute_gradients(
                scaled_loss, variables, gate_gradients, aggregation_method, adapter
            )
        ]
    report_missing_gradients(
        grads_and_vars,
        reported_missing if reported_missing is not None else set(),
        missing_gradients,
    )
    return grads_and_vars


@tf.autograph.experimental.do_not_convert
def build_step(
    total_loss: tf.Tensor,
    config: StepConfig,
    variables: Sequence[Any],
    *,
    before_update: Callable[[], Sequence[Any]] | None = None,
    reported_missing: set[str] | None = None,
    grads_and_vars: list[tuple[Any, Any]] | None = None,
    all_replicas_finite: tf.Tensor | None = None,
    apply_gradients: Callable[[list[tuple[Any, Any]], bool], list[Any]] | None = None,
) -> tf.Tensor:
    """Adds the training step to the current graph.

    Args:
      total_loss: the scalar loss, a tensor of the current graph.
      config: the train op's settings (`_config.StepConfig`): the optimizer's adapter, the
        global step, the transform, summaries, numerics check and accumulation.
      variables: the variables to train (non-empty).
      before_update: called, after the numerics check and before the gradients are applied,
        to add the caller's update ops; returns them.
      reported_missing: names of variables without gradient already logged for this train op;
        names logged now are added.
      grads_and_vars: the gradients, from `step_gradients`, if they are computed already.
      all_replicas_finite: under a `tf.distribute` strategy, whether the gradients of every
        replica are finite: a loss-scale optimizer, which decides on the first replica's
        alone, is made to skip the step when they are not.
      apply_gradients: applies the pairs and counts the step, given whether the optimizer may
        skip the update itself; returns the ops to wait for. By default `adapter.apply`.

    Returns:
      `total_loss`, which once evaluated has run the whole step.
    """
    adapter, global_step = config.adapter, config.global_step
    # Decided before any tf.cond: a cond branch is a function graph even in a v1 graph.
    in_function = tf.inside_function()
    if grads_and_vars is None:
        grads_and_vars = step_gradients(
            total_loss,
            adapter,
            variables,
            config.gate_gradients,
            config.aggregation_method,
            reported_missing,
            config.missing_gradients,
        )
    loss_scale = adapter.loss_scale()
    step = _global_step.summary_step(global_step, adapter.iterations)
    in_outer_scope = summaries.reentrant_name_scope()
    # In a tf.compat.v1 graph without a v2 writer, gradient summaries are TF1 summaries that the
    # caller's loop fetches from the SUMMARIES collection: built beside the step, not in it.
    tf1_summaries = (
        config.summarize_gradients and not in_function and not summaries.writes_v2_summaries()
    )

    def transform(pairs: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        if config.transform_grads_fn is None:
            return pairs
        return check_transformed(config.transform_grads_fn(pairs), pairs)

    def accumulate() -> list[Any]:
        # The update, its transform and its summaries see the means of the window.
        return [
            config.accumulator.add_and_maybe_apply(
                grads_and_vars,
                total_loss,
                lambda means, mean_loss: update(transform(means), means, mean_loss),
            )
        ]

    def update(
        transformed: list[tuple[Any, Any]],
        raw: list[tuple[Any, Any]] | None = None,
        loss: tf.Tensor | None = None,
    ) -> list[Any]:
        with in_outer_scope():
            summary_ops = []
            if not tf1_summaries:
                summary_ops = summaries.add_train_summaries(
                    total_loss if loss is None else loss,
                    grads_and_vars if raw is None else raw,
                    transformed,
                    step,
                    learning_rate=adapter.learning_rate,
                    summarize_gradients=config.summarize_gradients,
                    every_n_steps=config.summarize_every_n_steps,
                )
            update_ops = list(before_update()) if before_update is not None else []
            present = _present_gradients(transformed)
            if loss_scale is not None:
                finite_everywhere = all_replicas_finite
                if finite_everywhere is None and in_a_replica():
                    finite_everywhere = _finite_on_every_replica(present)
                if finite_everywhere is not None:
                    present = not_finite_unless(finite_everywhere, present)
                present = [(_gradients.scale(g, loss_scale), v) for g, v in present]
            # The summaries read the step before the update counts it.
            with tf.control_dependencies(as_ops(update_ops + summary_ops)):
                if apply_gradients is not None:
                    return apply_gradients(present, loss_scale is not None)
                return [
                    adapter.apply(
                        present, global_step, in_function, may_skip=loss_scale is not None
                    )
                ]

    # This call's transformed gradients, when the update is on them (not on accumulated means).
    transformed = None

    def transform_and_update() -> list[Any]:
        nonlocal transformed
        transformed = transform(grads_and_vars)
        return update(transformed)

    if isinstance(config.check_numerics, numerics.SkipNonFiniteSteps):
        config.check_numerics.check_context()
        _, step_name = _global_step.counter(global_step, adapter.iterations)
        if not numerics.gradients_count(config.check_numerics, loss_scale is not None):
            # An overflow of the scaled gradients is the loss-scale optimizer's to skip; the
            # guard looks at the loss.
            finite = tf.math.is_finite(total_loss)
            run_update = accumulate if config.accumulator is not None else transform_and_update
        elif config.accumulator is not None:
            # Each call's own gradients: a bad call adds nothing to the sums.
            finite = numerics.all_finite(total_loss, [g for g, _ in grads_and_vars])
            run_update = accumulate
        else:
            # The gradients as they would be applied: a transform's NaN counts, a frozen
            # variable's gradient does not.
            transformed = transform(grads_and_vars)
            finite = numerics.all_finite(total_loss, [g for g, _ in transformed])
            run_update = lambda: update(transformed)  # noqa: E731
        done = [
            config.check_numerics.update_if_finite(finite, run_update, step, step_name=step_name)
        ]
    elif config.check_numerics:
        total_loss = numerics.check_loss_is_finite(total_loss)
        # Everything that changes state waits for the check: a failed check changes nothing.
        with tf.control_dependencies([total_loss]):
            done = accumulate() if config.accumulator is not None else transform_and_update()
    else:
        done = accumulate() if config.accumulator is not None else transform_and_update()
    if tf1_summaries:
        # Beside the step, for the caller's loop to fetch; named as TF-Slim's train op names
        # them.
        with tf.name_scope("summarize_grads"):
            summaries.add_gradients_summaries(
                transformed if transformed is not None else grads_and_vars, step
            )

    with tf.control_dependencies(done):
        return tf.identity(total_loss, name="train_op")


def in_a_replica() -> bool:
    """Whether the step is being built inside `strategy.run` of a `tf.distribute` strategy."""
    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


def elements_finite(grads: Sequence[Any]) -> tf.Tensor:
    """Whether every element of `grads` is finite, as a loss-scale optimizer tests them."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(_gradients.values(g))) for g in grads])


def _finite_on_every_replica(grads_and_vars: list[tuple[Any, Any]]) -> tf.Tensor:
    """Whether every element of every replica's gradients is finite (an all-reduce)."""
    finite = elements_finite([g for g, _ in grads_and_vars])
    not_finite = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.int32)
    )
    return tf.equal(not_finite, 0)


def not_finite_unless(finite: tf.Tensor, grads_and_vars: list[tuple[Any, Any]]) -> list:
    """`grads_and_vars`, with the smallest gradient made NaN where `finite` is False."""
    sizes = [_gradients.values(g).shape.num_elements() for g, _ in grads_and_vars]
    index = min(range(len(sizes)), key=lambda i: sizes[i] if sizes[i] is not None else 2**62)
    grad, var = grads_and_vars[index]
    values = _gradients.values(grad)
    values = tf.where(finite, values, tf.constant(float("nan"), values.dtype))
    if isinstance(grad, tf.IndexedSlices):
        values = tf.IndexedSlices(values, grad.indices, grad.dense_shape)
    result = list(grads_and_vars)
    result[index] = (values, var)
    return result


def as_ops(values: Sequence[Any]) -> list[Any]:
    # TF1 summaries (strings) are fetched by the caller's loop from the SUMMARIES collection,
    # not computed on every step.
    return [
        v
        for v in values
        if isinstance(v, tf.Operation) or (isinstance(v, tf.Tensor) and v.dtype != tf.string)
    ]
