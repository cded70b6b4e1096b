"""The training step, built on symbolic tensors inside a graph.

A `tf.function` body is a graph, just as a `tf.compat.v1` graph is, so both front-ends
(`_graph`, `_eager`) and the cross-replica step (`_distribute`) call `build_step` with a loss
tensor of the current graph, its gradients (`step_gradients`) and the train op's
`_config.StepConfig`:

  loss -> gradients -> numerics guard -> transform -> summaries -> apply + global step -> loss

Nothing here knows which optimizer family it is talking to (that is `_optimizers`), whether it
runs in a `tf.function` or in a replica: the caller hands it an `Applier` that knows. The two
halves of the numerics guard, `checked_loss` and `apply_if_finite`, are the one place where
the raise or skip decision is made, for one device and across replicas alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import tensorflow as tf

from trainop import (
    _global_step,
    _gradients,
    _learning_rates,
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


# The front-ends call it from the step that tf.function traces: not converted by AutoGraph,
# whose per-call wrapping costs about a second in a trace of 1,000 variables.
@tf.autograph.experimental.do_not_convert
def step_gradients(
    total_loss: tf.Tensor,
    variables: Sequence[Any],
    config: StepConfig,
    reported_missing: set[str],
) -> list[tuple[Any, Any]]:
    """The (gradient, variable) pairs of a step, unscaled if the optimizer scales the loss.

    Raises, or logs once per train op (the names logged go into `reported_missing`), for the
    variables the loss gives no gradient, as `config.missing_gradients` says.
    """
    check_loss(total_loss)
    adapter = config.adapter
    adapter.build(variables)
    scale = adapter.gradient_scale()
    if scale is None:
        grads_and_vars = compute_gradients(
            total_loss, variables, config.gate_gradients, config.aggregation_method, adapter
        )
    else:
        # Mixed precision: the gradients of the scaled loss, unscaled, so that the numerics
        # guard, transforms and summaries see true values; scaled again for the optimizer,
        # which skips (and counts down its scale for) the steps that overflowed.
        scaled_loss = total_loss * tf.cast(scale, total_loss.dtype)
        grads_and_vars = [
            (_gradients.scale(g, scale, divide=True), v)
            for g, v in compute_gradients(
                scaled_loss, variables, config.gate_gradients, config.aggregation_method, adapter
            )
        ]
    report_missing_gradients(grads_and_vars, reported_missing, config.missing_gradients)
    return grads_and_vars


class StepGradients(NamedTuple):
    """What an update is made from."""

    # The step's loss (a mean); with accumulation, the mean loss of the window.
    loss: tf.Tensor
    # The (gradient, variable) pairs as the loss gives them (their means, with accumulation).
    raw: list[tuple[Any, Any]]
    # The pairs as they are applied: `raw` after `transform_grads_fn`.
    pairs: list[tuple[Any, Any]]
    # What the loss counts, when it gives its sum and count (see `counted_loss`), else None:
    # the weight of this call's gradients in an accumulation window.
    count: tf.Tensor | None = None


# An update: adds the ops that make it from `StepGradients` (running the caller's update ops
# if the flag says so), and returns those to wait for.
Update = Callable[[StepGradients, bool], list[Any]]
# What hands gradients to the optimizer: called with (gradient, variable) pairs, true values
# and none None, and the loss scale of a loss-scale optimizer (a float32 scalar, or None);
# applies them, counts the step, and returns the ops to wait for.
Applier = Callable[[list[tuple[Any, Any]], "tf.Tensor | None"], list[Any]]


@tf.autograph.experimental.do_not_convert
def optimizer_applier(config: StepConfig, in_function: bool) -> Applier:
    """The plain `Applier`: the optimizer applies the pairs here (a loss-scale optimizer, the
    pairs multiplied by its scale, as it expects them) and the global step counts the update.

    Args:
      config: the train op's settings: its optimizer adapter and global step.
      in_function: whether the step is built in a `tf.function`, decided before any `tf.cond`
        (see `_optimizers.OptimizerAdapter.apply`).
    """

    def apply(pairs: list[tuple[Any, Any]], loss_scale: tf.Tensor | None) -> list[Any]:
        if loss_scale is not None:
            pairs = scaled(pairs, loss_scale)
        return [
            config.adapter.apply(
                pairs, config.global_step, in_function, may_skip=loss_scale is not None
            )
        ]

    return apply


def scaling_learning_rates(
    multipliers: _learning_rates.LearningRateMultipliers, apply: Applier
) -> Applier:
    """`apply`, each chosen variable's update then scaled by its learning-rate factor."""

    def apply_scaled(pairs: list[tuple[Any, Any]], loss_scale: tf.Tensor | None) -> list[Any]:
        return multipliers.scaled_update(
            [v for _, v in pairs], lambda: as_ops(apply(pairs, loss_scale))
        )

    return apply_scaled


def following_update(
    config: StepConfig, variables: list[Any], raw_norm: tf.Tensor | None, apply: Applier
) -> Applier:
    """`apply`, then what follows an applied update: `config.moving_average` updated on
    `variables` (every variable to train, with a gradient this step or not) and
    `config.step_metrics` told the applied gradients' norm (`raw_norm`, the step's own, when
    they are its gradients untransformed), unless a loss-scale optimizer skipped the update
    (its counter did not move). `apply` itself without either."""
    average, metrics = config.moving_average, config.step_metrics
    if average is None and metrics is None:
        return apply
    if average is not None:
        average.build(variables)
    counter = config.adapter.iterations
    same = config.transform_grads_fn is None and config.accumulator is None

    def apply_then(pairs: list[tuple[Any, Any]], loss_scale: tf.Tensor | None) -> list[Any]:
        # A loss-scale optimizer may skip the update itself: its counter then stays.
        before = counter.read_value() if loss_scale is not None and counter is not None else None
        # Explicit dependencies: a tf.cond branch of a tf.compat.v1 graph has no automatic ones.
        with tf.control_dependencies([before] if before is not None else []):
            done = as_ops(apply(pairs, loss_scale))
        with tf.control_dependencies(done):
            applied = counter.read_value() > before if before is not None else None
            following = []
            if average is not None:
                following.append(average.update(variables, applied))
            if metrics is not None:
                following += metrics.record_applied(
                    [g for g, _ in pairs], applied, raw_norm if same else None
                )
        return done + following

    return apply_then


def scaled(pairs: list[tuple[Any, Any]], loss_scale: tf.Tensor) -> list[tuple[Any, Any]]:
    """`pairs` with each gradient multiplied by `loss_scale`, as a loss-scale optimizer
    expects them."""
    return [(_gradients.scale(g, loss_scale), v) for g, v in pairs]


def transformed(config: StepConfig, gradients: StepGradients) -> StepGradients:
    """`gradients` with `pairs` put through `config.transform_grads_fn`, checked."""
    if config.transform_grads_fn is None:
        return gradients
    pairs = check_transformed(config.transform_grads_fn(gradients.pairs), gradients.pairs)
    return gradients._replace(pairs=pairs)


def accumulating(
    config: StepConfig, update: Update, overflowed: Callable[[list], list[Any]] | None
) -> Update:
    """`update`, made on the window's mean gradients and loss every `accumulation_steps` calls
    (as optax's `MultiSteps` wraps an inner transformation), each call weighted by its count;
    the transform runs on the means. Each call adds its own `pairs`.

    With `overflowed` (a loss-scale optimizer), a call whose gradients are not finite adds
    nothing and does not count: `overflowed(pairs)` hands them to the optimizer, which skips
    them and lowers its scale; the window's other calls are kept.
    """

    def on_the_means(means: list, mean_loss: tf.Tensor, run_update_ops: bool) -> list[Any]:
        return update(transformed(config, StepGradients(mean_loss, means, means)), run_update_ops)

    def accumulate(gradients: StepGradients, run_update_ops: bool = True) -> list[Any]:
        accumulator = config.accumulator

        def add() -> tf.Tensor:
            return accumulator.add_and_maybe_apply(
                gradients.pairs, gradients.loss, gradients.count, on_the_means
            )

        if overflowed is None:
            return [add()]
        present = [(g, v) for g, v in gradients.pairs if g is not None]

        def hand_over() -> tf.Tensor:
            with tf.control_dependencies(overflowed(present)):
                return tf.constant(False)

        return [tf.cond(_gradients.all_finite([g for g, _ in present]), add, hand_over)]

    return accumulate


def counted_loss(total_loss: Any) -> tuple[Any, tf.Tensor | None]:
    """`total_loss` as the step takes it: a loss given as its sum and count, `(loss_sum,
    count)`, as their quotient (0 for a count of 0) and the count; any other value as it is,
    without count. Called where the loss is computed (under the tape).

    Raises:
      TypeError: a pair whose count is not a real scalar.
      ValueError: a pair whose loss_sum is not a scalar, or whose count is known to be
        negative (a count known only when the step runs is checked then, and raises
        `tf.errors.InvalidArgumentError`).
    """
    # A plain tuple only: a namedtuple or a list is a loss structure (TF-Agents' LossInfo).
    if type(total_loss) is not tuple or len(total_loss) != 2:
        return total_loss, None
    loss_sum, count = total_loss
    count = tf.convert_to_tensor(count)
    if not (count.dtype.is_floating or count.dtype.is_integer) or count.shape.rank not in (None, 0):
        raise TypeError(
            "`total_loss` given as (loss_sum, count) must have a real scalar count (the "
            "examples or tokens the sum is over). "
            f"Received: count of dtype {count.dtype.name} and shape {count.shape}"
        )
    loss_sum = tf.convert_to_tensor(loss_sum)
    if loss_sum.shape.rank not in (None, 0):
        raise ValueError(
            "`total_loss` given as (loss_sum, count) must have a scalar loss_sum, the sum of "
            "the batch's losses (reduce it with tf.reduce_sum). "
            f"Received: loss_sum with shape {loss_sum.shape}"
        )
    known = tf.get_static_value(count)
    if known is not None and known < 0:
        raise ValueError(
            f"`total_loss` given as (loss_sum, count) must have a count >= 0. Received: {known}"
        )
    if known is None:
        # A negative count would turn the step uphill: checked when the step runs.
        checked = tf.debugging.assert_non_negative(
            count, message="`total_loss` given as (loss_sum, count) must have a count >= 0"
        )
        with tf.control_dependencies([checked]):
            count = tf.identity(count)
    # In float32 at least: a float16 count above 65504 would be inf, a bfloat16 one rounded.
    wide = _gradients.wide_dtype(loss_sum.dtype)
    mean = tf.math.divide_no_nan(tf.cast(loss_sum, wide), tf.cast(count, wide))
    return tf.cast(mean, loss_sum.dtype), count


def checked_loss(
    config: StepConfig,
    loss: tf.Tensor,
    undo: Callable[[Any], list[Any]] | None = None,
    report: Callable[[], list[Any]] | None = None,
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """The raising half of the numerics guard: with `check_numerics=True`, `loss` checked (it
    raises when evaluated if inf or NaN) and [it], for everything that changes state to wait
    for, so that a failed check changes nothing; else `loss` and [].

    With `undo` (what undoes the writes of the forward pass, given a boolean tensor: keep
    them where True), the check waits for `undo(loss is finite)`. With `report` (see
    `NotFiniteReport`), the error also says the step and what was not finite, worked out in
    a `tf.cond` branch that only a failing step runs (a graph train op's check: an eager one is
    diagnosed after the failure, `_eager.DiagnosedTrainOp`).
    """
    if config.check_numerics is not True:
        return loss, []
    if undo is not None:
        with tf.control_dependencies(undo(tf.math.is_finite(loss))):
            loss = tf.identity(loss)
    if report is None:
        loss = numerics.check_loss_is_finite(loss)
        return loss, [loss]
    step, step_name = _global_step.counter(config.global_step, config.adapter.iterations)
    unchecked = loss

    def failed() -> tf.Tensor:
        said = tf.debugging.Assert(
            False,
            [
                f"{numerics.LOSS_NOT_FINITE_MESSAGE} at {step_name}",
                step if step is not None else "(none)",
                "-",
                *report(),
            ],
        )
        with tf.control_dependencies([said]):
            return tf.identity(unchecked)

    loss = tf.cond(tf.math.is_finite(loss), lambda: tf.identity(unchecked), failed)
    return loss, [loss]


def apply_if_finite(
    config: StepConfig,
    update: Callable[[], list[Any]],
    loss_finite: Callable[[], tf.Tensor],
    grads_finite: Callable[[], tf.Tensor],
    undo: Callable[[], list[Any]] | None = None,
    report: Callable[[], list[Any]] | None = None,
    spike_values: Callable[[], tuple[tf.Tensor, tf.Tensor]] | None = None,
    updated: Callable[[], tuple[list[Any], list[Any]]] | None = None,
) -> list[Any]:
    """The skipping half of the numerics guard, for one device and across replicas alike (as
    optax's `apply_if_finite`): with a `SkipNonFiniteSteps`, `update()` runs in a `tf.cond`
    on whether the loss (`loss_finite()`) and the gradients (`grads_finite()`) are finite, the
    guard counting what it skips; without one, `update()` runs. With a loss-scale optimizer
    only the loss counts: an overflow of the scaled gradients is the optimizer's to skip. A
    skipped step first runs `undo` (what undoes the writes of the forward pass), if given, and
    says what was not finite with `report` (see `NotFiniteReport`). A guard that judges
    spikes is given the step's loss and gradient norm by `spike_values` (see
    `loss_and_gradient_norm`),
    one that checks the updated values what the update writes by `updated` (see
    `updated_variables`); without them (across replicas), such a guard is refused.

    Returns:
      The ops to wait for.
    """
    guard = config.check_numerics
    if not isinstance(guard, numerics.SkipNonFiniteSteps):
        return update()
    guard.check_context()
    step, step_name = _global_step.counter(config.global_step, config.adapter.iterations)
    finite = loss_finite()
    if numerics.gradients_count(guard, config.adapter.scales_loss):
        finite = tf.logical_and(finite, grads_finite())
    return [
        guard.update_if_finite(
            finite,
            update,
            step,
            step_name=step_name,
            undo=undo,
            report=report,
            spike_values=spike_values,
            updated=updated,
        )
    ]


def updated_variables(
    config: StepConfig, pairs: list[tuple[Any, Any]]
) -> Callable[[], tuple[list[Any], list[Any]]]:
    """What a guard that checks the updated values is given: the `tf.Variable`s the update
    trains (those of `pairs` with a gradient), and the others it may write (the optimizer's
    state, built now for every variable of `pairs`, and the global step)."""

    def variables() -> tuple[list[Any], list[Any]]:
        trained = [_variables.as_tf_variable(v) for g, v in pairs if g is not None]
        candidates = config.adapter.state_variables([v for _, v in pairs])
        if config.moving_average is not None:
            candidates += config.moving_average.state_variables()
        if config.step_metrics is not None:
            # Written by the update: an undone update was not applied.
            candidates += config.step_metrics.written_by_update()
        if config.global_step is not None:
            candidates.append(_variables.as_tf_variable(config.global_step))
        # Each once (the global step may be the optimizer's own counter).
        others: list[Any] = []
        seen = {id(v) for v in trained}
        for v in candidates:
            if id(v) not in seen:
                seen.add(id(v))
                others.append(v)
        return trained, others

    return variables


def loss_and_gradient_norm(
    config: StepConfig, loss: tf.Tensor, pairs: list[tuple[Any, Any]]
) -> Callable[[], tuple[tf.Tensor, tf.Tensor]]:
    """What a guard that judges spikes is given: the loss, and the global norm of the
    gradients `pairs` (before any transform, as the `global_gradient_norm` summary), or 0 with
    a loss-scale optimizer, whose gradients may overflow."""

    def values() -> tuple[tf.Tensor, tf.Tensor]:
        grads = [g for g, _ in pairs if g is not None]
        counted = numerics.gradients_count(config.check_numerics, config.adapter.scales_loss)
        if not (grads and counted):
            return loss, tf.constant(0.0)
        return loss, _gradients.global_norm(grads)

    return values


class NotFiniteReport:
    """What a rejected step says was not finite, for `tf.print` and an `Assert`'s data: the
    loss, and how many of the gradients hold inf or NaN, with the names of the first
    `REPORTED_NAMES` of their variables. Built in the rejected branch only: a healthy step
    pays nothing for it.

    Called, it returns the strings and tensors to print; `values()` returns the same as numbers
    (the loss as float32, a boolean per gradient, and the variables' names), which a step
    compiled by XLA (no strings, no print) records for the host to say.
    """

    def __init__(self, loss: tf.Tensor, pairs: list[tuple[Any, Any]]):
        self._loss = loss
        self._pairs = pairs

    def __call__(self) -> list[Any]:
        present = [(g, v) for g, v in self._pairs if g is not None]
        described: list[Any] = ["loss", self._loss]
        if present:
            names = tf.constant([_variables.variable_name(v) for _, v in present])
            finite = tf.stack([_gradients.every_element_finite(g) for g, _ in present])
            bad = tf.boolean_mask(names, tf.logical_not(finite))
            described += [
                "- gradients not finite:",
                tf.size(bad),
                f"of {len(present)}",
                bad[:REPORTED_NAMES],
            ]
        return described

    def values(self) -> tuple[tf.Tensor, tf.Tensor, list[str]]:
        present = [(g, v) for g, v in self._pairs if g is not None]
        finite = [_gradients.every_element_finite(g) for g, _ in present]
        return (
            tf.cast(self._loss, tf.float32),
            tf.stack(finite) if finite else tf.zeros([0], tf.bool),
            [_variables.variable_name(v) for _, v in present],
        )


# How many names of variables with a gradient not finite a rejected step reports.
REPORTED_NAMES = 5


@tf.autograph.experimental.do_not_convert
def build_step(
    total_loss: tf.Tensor,
    grads_and_vars: list[tuple[Any, Any]],
    config: StepConfig,
    *,
    apply: Applier,
    before_update: Callable[[], Sequence[Any]] | None = None,
    on_accepted: Callable[[], Sequence[Any]] | None = None,
    undo: Callable[[Any], list[Any]] | None = None,
    v1_summaries: bool = False,
    diagnose_loss: bool = False,
    count: tf.Tensor | None = None,
) -> tf.Tensor:
    """Adds the training step on `grads_and_vars` to the current graph.

    The update is composed as optax composes gradient transformations. Without accumulation:

      check the loss -> transform -> skip unless finite -> summaries, update ops, apply

    so the skip guard and the summaries see the gradients as they are applied. With it, the
    guard looks at each call's own gradients, and what follows the accumulation sees the means:

      check the loss -> skip unless finite -> accumulate -> transform -> summaries, ... apply

    Args:
      total_loss: the scalar loss, a tensor of the current graph.
      grads_and_vars: its (gradient, variable) pairs, from `step_gradients`.
      config: the train op's settings (`_config.StepConfig`).
      apply: hands the gradients to the optimizer: `optimizer_applier`, or what the
        distributed step makes of it.
      before_update: called, after the numerics check and before the gradients are applied,
        to add the caller's update ops; returns them. With accumulation, only the calls that
        apply the window's update run them.
      on_accepted: called to add what every call that the numerics guard lets through runs,
        before any accumulation (the metrics of `model.fit`); returns the ops to wait for.
      undo: `undo(keep)` adds the ops that undo what the forward pass wrote (see
        `_variables.undo_writes`: unconditionally, or where the boolean tensor `keep` is
        False); returns them. Run where the numerics guard rejects the step (skips it, or
        raises).
      v1_summaries: whether the gradient summaries are TF1 summaries (in a `tf.compat.v1`
        graph without a v2 writer), which the caller's loop fetches from the SUMMARIES
        collection: built beside the step, not in it, on the gradients as applied.
      diagnose_loss: whether the default check's error says, from the device, the step and
        what was not finite (see `checked_loss`).
      count: what the loss counts (see `counted_loss`), or None: the weight of this call in an
        accumulation window.

    Returns:
      `total_loss`, which once evaluated has run the whole step.
    """
    metrics = config.step_metrics
    raw_norm = None
    if metrics is not None:
        metrics.build()
        recorded, raw_norm = metrics.record_gradients([g for g, _ in grads_and_vars])
    if config.learning_rate_multipliers is not None:
        apply = scaling_learning_rates(config.learning_rate_multipliers, apply)
    apply = following_update(config, [v for _, v in grads_and_vars], raw_norm, apply)
    step = _global_step.summary_step(config.global_step, config.adapter.iterations)
    in_outer_scope = summaries.reentrant_name_scope()

    # Made where it is used: a partial accumulation window's update is built in a function of
    # its own (`_accumulation.GradientAccumulator.apply_partial_window`).
    def update(gradients: StepGradients, run_update_ops: bool = True) -> list[Any]:
        loss_scale = config.adapter.loss_scale()
        with in_outer_scope():
            summary_ops = []
            if not v1_summaries:
                summary_ops = summaries.add_train_summaries(
                    gradients.loss,
                    gradients.raw,
                    gradients.pairs,
                    step,
                    learning_rate=config.adapter.learning_rate,
                    summarize_gradients=config.summarize_gradients,
                    every_n_steps=config.summarize_every_n_steps,
                )
            update_ops = []
            if before_update is not None and run_update_ops:
                update_ops = list(before_update())
            present = _present_gradients(gradients.pairs)
            # The summaries read the step before the update counts it.
            with tf.control_dependencies(as_ops(update_ops + summary_ops)):
                return apply(present, loss_scale)

    report = NotFiniteReport(total_loss, grads_and_vars) if diagnose_loss else None
    total_loss, checked = checked_loss(config, total_loss, undo, report)
    if metrics is not None:
        # Before the update (explicitly: a tf.compat.v1 graph orders nothing by itself).
        checked = [*checked, metrics.applied.assign(False, read_value=False), recorded]
    with tf.control_dependencies(checked):
        gradients = StepGradients(total_loss, grads_and_vars, grads_and_vars, count)
        if config.accumulator is None:
            gradients = transformed(config, gradients)
        else:
            overflowed = None
            if config.adapter.scales_loss:

                def overflowed(pairs: list[tuple[Any, Any]]) -> list[Any]:
                    return as_ops(apply(pairs, config.adapter.loss_scale()))

            update = accumulating(config, update, overflowed)

        def accepted_step() -> list[Any]:
            accepted = as_ops(list(on_accepted())) if on_accepted is not None else []
            return accepted + update(gradients)

        done = apply_if_finite(
            config,
            accepted_step,
            lambda: tf.math.is_finite(total_loss),
            # A frozen variable's None gradient does not count.
            lambda: _gradients.all_finite([g for g, _ in gradients.pairs]),
            (lambda: undo(None)) if undo is not None else None,
            NotFiniteReport(total_loss, gradients.pairs),
            loss_and_gradient_norm(config, total_loss, grads_and_vars),
            # Accumulation's update applies only every N calls: not undone as one step.
            updated_variables(config, gradients.pairs) if config.accumulator is None else None,
        )
    if v1_summaries:
        # Named as TF-Slim's train op names them.
        with tf.name_scope("summarize_grads"):
            summaries.add_gradients_summaries(gradients.pairs, step)

    with tf.control_dependencies(done):
        return tf.identity(total_loss, name="train_op")


def as_ops(values: Sequence[Any]) -> list[Any]:
    # TF1 summaries (strings) are fetched by the caller's loop from the SUMMARIES collection,
    # not computed on every step.
    return [
        v
        for v in values
        if isinstance(v, tf.Operation) or (isinstance(v, tf.Tensor) and v.dtype != tf.string)
    ]
