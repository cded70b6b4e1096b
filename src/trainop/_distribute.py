"""Everything `tf.distribute`: the strategy a train op is built in, and the step across
its replicas (each replica's loss and gradients, one decision for all of them, the update).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from trainop import (
    _compile,
    _config,
    _core,
    _gradients,
    _replica_loss,
    numerics,
    summaries,
)


def replicated_strategy(global_step: tf.Variable | None) -> Any:
    """The strategy whose scope the train op is built in, or None outside any.

    Raises:
      ValueError: for a global step made outside the scope, which the replicas could not
        count in.
    """
    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    if (
        global_step is not None
        and strategy.num_replicas_in_sync > 1
        and not isinstance(global_step, tf.distribute.DistributedValues)
    ):
        raise ValueError(
            "`global_step` must be created inside the strategy's scope (a tf.Variable, or "
            "tf.compat.v1.train.get_or_create_global_step() called first there): the replicas "
            f"count in it once per step. Received: {global_step!r:.200}"
        )
    return strategy


def in_a_replica() -> bool:
    """Whether the step is being built inside `strategy.run` of a `tf.distribute` strategy."""
    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


def check_in_a_replica(config: _config.StepConfig) -> None:
    """Raises for what a train op built or called inside `strategy.run` cannot do on every
    replica."""
    if not in_a_replica() or tf.distribute.get_strategy().num_replicas_in_sync == 1:
        return
    for name, asked in [
        ("check_numerics", isinstance(config.check_numerics, numerics.SkipNonFiniteSteps)),
        ("accumulation_steps", config.accumulator is not None),
        ("learning_rate_multipliers", config.learning_rate_multipliers is not None),
        ("moving_average", config.moving_average is not None),
        ("step_metrics", config.step_metrics is not None),
    ]:
        if asked:
            # The first two apply the update in a tf.cond, which replicas cannot synchronize
            # inside; the others write variables, which a replica cannot do alone.
            raise ValueError(
                f"`{name}`: a train op built or called inside strategy.run cannot skip, "
                "delay, scale or average the update on every replica at once. Build it in the "
                "strategy's scope with the loss as a callable, and call it outside "
                "strategy.run: it then runs strategy.run itself, and decides for all replicas."
            )


@tf.autograph.experimental.do_not_convert
def optimizer_applier(config: _config.StepConfig, in_function: bool) -> _core.Applier:
    """The `_core.Applier` of a step built where it runs, on one device or, called inside the
    user's `strategy.run`, on one replica: there a loss-scale optimizer, which decides on its
    own replica's gradients, is made to skip unless every replica's are finite."""
    apply = _core.optimizer_applier(config, in_function)
    if in_a_replica():
        return skipping_unless(lambda pairs: finite_on_every_replica(pairs), apply)
    return apply


def skipping_unless(
    finite_everywhere: Callable[[list[tuple[Any, Any]]], tf.Tensor], apply: _core.Applier
) -> _core.Applier:
    """`apply`, made to skip a loss-scale optimizer's update where `finite_everywhere(pairs)`
    is False: the optimizer is handed a NaN gradient, which it skips and counts down its scale
    for. Without a loss scale, `apply` unchanged."""

    def apply_or_skip(pairs: list[tuple[Any, Any]], loss_scale: tf.Tensor | None) -> list[Any]:
        if loss_scale is not None:
            pairs = not_finite_unless(finite_everywhere(pairs), pairs)
        return apply(pairs, loss_scale)

    return apply_or_skip


def elements_finite(grads: list[Any]) -> tf.Tensor:
    """Whether every element of `grads` is finite, as a loss-scale optimizer tests them."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(_gradients.values(g))) for g in grads])


def finite_on_every_replica(grads_and_vars: list[tuple[Any, Any]]) -> tf.Tensor:
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


def across_replicas(
    loss_and_variables: Callable[..., tuple[Any, tf.Tensor, Any, list[Any]]],
    strategy: Any,
    config: _config.StepConfig,
    before_update: Callable[[], list[Any]],
    reported_missing: set[str],
    jit_compile: bool,
    steps_per_call: int,
) -> Callable[..., Any]:
    """The step on every replica of `strategy`, returning the loss summed over them.

    `strategy.run` first computes each replica's loss and gradients, the loss weighted by the
    replica's share of the global batch (`_replica_loss`; counted here when every replica is
    on this worker, else with one all-reduce of the counts). What follows takes one
    decision for all replicas, in the cross-replica context, where a `tf.cond` may hold a
    `strategy.run` (replicas cannot synchronize inside a cond of their own):

    * By default the gradients stay on their replicas, and a second `strategy.run` applies
      them, the optimizer summing them (its one all-reduce). With the skip guard or a
      loss-scale optimizer, each replica also says whether its loss and gradients are finite,
      the verdicts are summed, and the update runs on every replica or on none. (Keras's
      `LossScaleOptimizer` alone looks at the first replica's gradients, and applies an inf
      coming from another.)
    * With `transform_grads_fn`, summaries, accumulation or an optimizer that clips (Keras's
      `clipnorm`, `global_clipnorm`, `clipvalue`), which must see the gradient of the whole
      batch, the gradients are summed first and the step goes on, once, on the sum; the
      first replica then applies it and the others apply zeros, so that the optimizer's own sum
      gives the update unchanged. That is a second all-reduce of the gradients.

    With `jit_compile`, XLA compiles each replica's loss and gradients, the bulk of the work:
    the rest holds the synchronizations that XLA compiles only on GPUs, and the numerics
    checks, which it drops.
    """
    step = ReplicatedStep(
        loss_and_variables, strategy, config, before_update, reported_missing, jit_compile
    )

    def step_at(i: tf.Tensor, args: tuple, kwargs: dict) -> tf.Tensor:
        return step(
            lambda args, kwargs: _compile.batch_at(i, steps_per_call, args, kwargs), args, kwargs
        )

    steps = _compile.steps_in_a_loop(step_at, steps_per_call) if steps_per_call > 1 else None

    def in_scope(*args: Any, **kwargs: Any) -> tf.Tensor:
        with strategy.scope():
            if steps is not None:
                return steps(*args, **kwargs)
            return step(lambda args, kwargs: (args, kwargs), args, kwargs)

    return in_scope


class ReplicatedStep:
    """One step across the replicas of a strategy (see `across_replicas`), called in the
    cross-replica context with the arguments of the train op and `select(args, kwargs)`, which
    picks each replica's batch from them (the K-steps loop picks the i-th)."""

    def __init__(
        self,
        loss_and_variables: Callable[..., tuple[Any, tf.Tensor, Any, list[Any]]],
        strategy: Any,
        config: _config.StepConfig,
        before_update: Callable[[], list[Any]],
        reported_missing: set[str],
        jit_compile: bool,
    ):
        self._loss_and_variables = loss_and_variables
        self._strategy = strategy
        self._config = config
        self._before_update = before_update
        self._reported_missing = reported_missing
        self._skips = isinstance(config.check_numerics, numerics.SkipNonFiniteSteps)
        self._scaled = config.adapter.scales_loss
        # The variables that have a gradient: the same on every replica, known once traced.
        self._trained: list[Any] = []
        self._replica_gradients = (
            tf.function(self._gradients, jit_compile=True) if jit_compile else self._gradients
        )

    def __call__(self, select: Callable[..., tuple], args: tuple, kwargs: dict) -> tf.Tensor:
        """The step on the batches that `select(args, kwargs)` picks on each replica; returns
        the loss summed over the replicas."""
        verdicts = self.needs_verdicts()
        results = self._strategy.run(
            self._replica_part(select, verdicts, args, kwargs), args=args, kwargs=kwargs
        )
        return self.across(results[0], results[1], results[2] if verdicts else None)

    def summed_first(self) -> bool:
        """Whether the step goes on once, on the gradients summed over the replicas: what
        must see the gradient of the whole batch (see `across_replicas`)."""
        config = self._config
        return (
            config.transform_grads_fn is not None
            or config.accumulator is not None
            # They read and write the variables once, outside the replicas.
            or config.learning_rate_multipliers is not None
            or config.moving_average is not None
            or config.step_metrics is not None
            or summaries.writes_v2_summaries()
            or config.adapter.clips_gradients
        )

    def needs_verdicts(self) -> bool:
        """Whether each replica says what is not finite in its loss and gradients
        (`replica_gradients(..., verdicts=True)`): for one decision on all of them, taken on
        the gradients left on their replicas."""
        return (self._skips or self._scaled) and not self.summed_first()

    def across(
        self,
        losses: Any,
        grads: list[Any],
        not_finite: Any,
        on_accepted: Callable[[], list[Any]] | None = None,
    ) -> tf.Tensor:
        """The step's cross-replica part, in the cross-replica context, on what each replica
        computed (`replica_gradients`: its losses, gradients and, if `needs_verdicts()`, its
        verdicts; else None); `on_accepted` as for `_core.build_step`. Returns the loss summed
        over the replicas."""
        loss = self._strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)
        if self.summed_first():
            return self._step_on_the_sum(loss, grads, on_accepted)
        return self._step_on_every_replica(loss, losses, grads, not_finite, on_accepted)

    def _replica_part(
        self, select: Callable[..., tuple], verdicts: bool, args: tuple, kwargs: dict
    ) -> Callable[..., tuple[Any, ...]]:
        """What each replica runs: its loss weighted by its share of the batch, its gradients
        and, with `verdicts`, the counts of what is not finite in them."""
        strategy = self._strategy
        replicas = strategy.num_replicas_in_sync
        distributed = tf.nest.map_structure(
            lambda leaf: isinstance(leaf, tf.distribute.DistributedValues), (args, kwargs)
        )
        counts = None
        if replicas > 1:
            counts = _replica_loss.local_counts(strategy, select, (args, kwargs), distributed)

        def replica_part(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
            step_args, step_kwargs = select(args, kwargs)
            share = None
            if replicas > 1:
                # Outside the compiled part: XLA compiles an all-reduce only on GPUs.
                share = _replica_loss.replica_share(
                    (step_args, step_kwargs), distributed, replicas, counts
                )
            return self._replica_gradients(verdicts, share, *step_args, **step_kwargs)

        return replica_part

    def _gradients(
        self, verdicts: bool, share: _replica_loss.Share | None, *args: Any, **kwargs: Any
    ) -> tuple[Any, ...]:
        """A replica's weighted loss and present gradients; with `verdicts`, also the counts of
        what is not finite: [the loss, the gradients]."""
        with _replica_loss.one_device_scaling(share):
            _, total_loss, count, variables = self._loss_and_variables(*args, **kwargs)
        if count is not None:
            raise ValueError(
                "`total_loss` given as (loss_sum, count) is not supported under a "
                "tf.distribute strategy yet: return the replica's mean (the train op weights "
                "each replica by its share of the batch)."
            )
        total_loss = _replica_loss.weighted(total_loss, share)
        return self.replica_gradients(total_loss, variables, verdicts)

    def replica_gradients(
        self, total_loss: tf.Tensor, variables: list[Any], verdicts: bool
    ) -> tuple[Any, ...]:
        """In a replica: its loss `total_loss` (its share of the batch's), the gradients of the
        `variables` it trains that have one, and with `verdicts`, the counts of what is not
        finite: [the loss, the gradients]."""
        grads_and_vars = _core.step_gradients(
            total_loss, variables, self._config, self._reported_missing
        )
        present = [(g, v) for g, v in grads_and_vars if g is not None]
        self._trained = [v for _, v in present]
        grads = [g for g, _ in present]
        if not verdicts:
            return total_loss, grads
        # With a loss-scale optimizer, as it decides: every element finite.
        finite_of = elements_finite if self._scaled else _gradients.all_finite
        grads_finite = finite_of(grads)
        finite = [tf.math.is_finite(total_loss), grads_finite]
        return total_loss, grads, tf.cast(tf.logical_not(tf.stack(finite)), tf.int32)

    def _step_on_the_sum(
        self, loss: tf.Tensor, grads: list[Any], on_accepted: Callable[[], list[Any]] | None
    ) -> tf.Tensor:
        """The step, once, on the gradients summed over the replicas (one batched all-reduce, to
        the replicas' own devices), on the first replica's device, which holds a copy of the
        sums; `_apply_summed` then applies it on every replica."""
        strategy = self._strategy
        reduced = strategy.extended.batch_reduce_to(
            tf.distribute.ReduceOp.SUM, [(g, g) for g in grads]
        )
        summed = [
            (strategy.experimental_local_results(g)[0], v) for g, v in zip(reduced, self._trained)
        ]
        with tf.device(summed[0][0].device):
            return _core.build_step(
                loss,
                summed,
                self._config,
                apply=self._apply_summed,
                before_update=self._before_update,
                on_accepted=on_accepted,
            )

    def _apply_summed(
        self, pairs: list[tuple[Any, Any]], loss_scale: tf.Tensor | None
    ) -> list[Any]:
        """The `_core.Applier` of the summed gradients `pairs`: the first replica hands them to
        the optimizer and the others hand it zeros, so that the optimizer's own sum leaves them
        unchanged."""
        config = self._config
        may_skip = loss_scale is not None
        if may_skip:
            pairs = _core.scaled(pairs, loss_scale)
        variables = [v for _, v in pairs]
        grads = [g for g, _ in pairs]
        # A loss-scale optimizer that decides on each replica (where the strategy has no
        # merge_call) must see the sum's overflow on the replicas given zeros too.
        finite = elements_finite(grads) if may_skip else None

        def apply_on_replica(finite: Any, *grads: Any) -> tf.Tensor:
            replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
            own = [(first_replica_only(g, v, replica_id), v) for g, v in zip(grads, variables)]
            if finite is not None:
                own = not_finite_unless(finite, own)
            applied = config.adapter.apply(own, config.global_step, True, may_skip)
            with tf.control_dependencies([applied]):
                return tf.constant(True)

        applied = self._strategy.run(apply_on_replica, args=(finite, *grads))
        return list(self._strategy.experimental_local_results(applied))

    def _step_on_every_replica(
        self,
        loss: tf.Tensor,
        losses: Any,
        grads: Any,
        not_finite: Any,
        on_accepted: Callable[[], list[Any]] | None,
    ) -> tf.Tensor:
        """The step with the gradients left on their replicas: one decision for all of them
        (the summed loss checked, or the summed verdicts `not_finite` for the skip guard),
        then the update on every replica, the optimizer summing the gradients."""
        strategy = self._strategy
        grads_finite = None
        if not_finite is not None:
            not_finite = strategy.reduce(tf.distribute.ReduceOp.SUM, not_finite, axis=None)
            loss_finite, grads_finite = not_finite[0] == 0, not_finite[1] == 0
        # The sum is inf or NaN if a replica's loss is.
        loss, checked = _core.checked_loss(self._config, loss)

        def apply() -> list[tf.Tensor]:
            # The update ops run once, here, on the variables of every replica.
            with tf.control_dependencies(checked):
                update_ops = _core.as_ops(self._before_update())
                if on_accepted is not None:
                    update_ops += _core.as_ops(list(on_accepted()))
            with tf.control_dependencies(update_ops):
                applied = strategy.run(
                    self._update_on_replica, args=(losses, grads, grads_finite, checked)
                )
            return list(strategy.experimental_local_results(applied))

        done = _core.apply_if_finite(self._config, apply, lambda: loss_finite, lambda: grads_finite)
        with tf.control_dependencies(done):
            return tf.identity(loss)

    def _update_on_replica(
        self, total_loss: tf.Tensor, grads: list[Any], grads_finite: Any, checked: list[Any]
    ) -> Any:
        """The update on one replica, its own gradients applied (the optimizer sums them)."""
        apply = _core.optimizer_applier(self._config, in_function=True)
        if self._scaled:
            # The loss-scale optimizer skips unless every replica's gradients are finite.
            apply = skipping_unless(lambda pairs: grads_finite, apply)
        # After the check of the summed loss (`checked`), if any: a failed one changes nothing.
        with tf.control_dependencies(checked):
            return _core.build_step(
                total_loss,
                list(zip(grads, self._trained)),
                dataclasses.replace(self._config, check_numerics=False),
                apply=apply,
            )


def first_replica_only(grad: Any, variable: Any, replica_id: Any) -> Any:
    """`grad` on the first replica, zeros of its variable's shape on the others.

    Made on the replica's own device, where the optimizer's all-reduce expects them.
    """
    first = tf.get_static_value(replica_id)
    if isinstance(grad, tf.IndexedSlices):
        if first is None:
            values = tf.where(tf.equal(replica_id, 0), grad.values, tf.zeros_like(grad.values))
            return tf.IndexedSlices(values, grad.indices, grad.dense_shape)
        if first == 0:
            return tf.IndexedSlices(tf.identity(grad.values), grad.indices, grad.dense_shape)
        # No rows: the sum over the replicas is the first replica's rows.
        values = tf.zeros([0, *variable.shape[1:]], grad.values.dtype)
        return tf.IndexedSlices(values, tf.zeros([0], grad.indices.dtype), grad.dense_shape)
    if first is None:
        return tf.where(tf.equal(replica_id, 0), grad, tf.zeros(variable.shape, grad.dtype))
    return tf.identity(grad) if first == 0 else tf.zeros(variable.shape, grad.dtype)
