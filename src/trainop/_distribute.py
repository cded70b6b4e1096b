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
    _global_step,
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


def across_replicas(
    loss_and_variables: Callable[..., tuple[Any, tf.Tensor, list[Any]]],
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
        loss_and_variables: Callable[..., tuple[Any, tf.Tensor, list[Any]]],
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
        self._scaled = config.adapter.loss_scale() is not None
        # The variables that have a gradient: the same on every replica, known once traced.
        self._trained: list[Any] = []
        self._replica_gradients = (
            tf.function(self._gradients, jit_compile=True) if jit_compile else self._gradients
        )

    def __call__(self, select: Callable[..., tuple], args: tuple, kwargs: dict) -> tf.Tensor:
        """The step on the batches that `select(args, kwargs)` picks on each replica; returns
        the loss summed over the replicas."""
        config = self._config
        summed_first = (
            config.transform_grads_fn is not None
            or config.accumulator is not None
            or summaries.writes_v2_summaries()
            or config.adapter.clips_gradients
        )
        verdicts = (self._skips or self._scaled) and not summed_first
        results = self._strategy.run(
            self._replica_part(select, verdicts, args, kwargs), args=args, kwargs=kwargs
        )
        losses, grads = results[:2]
        loss = self._strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)
        if summed_first:
            return self._step_on_the_sum(loss, grads)
        not_finite = results[2] if verdicts else None
        return self._step_on_every_replica(loss, losses, grads, not_finite)

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
        config = self._config
        with _replica_loss.one_device_scaling(share):
            _, total_loss, variables = self._loss_and_variables(*args, **kwargs)
        total_loss = _replica_loss.weighted(total_loss, share)
        grads_and_vars = _core.step_gradients(
            total_loss,
            config.adapter,
            variables,
            config.gate_gradients,
            config.aggregation_method,
            self._reported_missing,
            config.missing_gradients,
        )
        present = [(g, v) for g, v in grads_and_vars if g is not None]
        self._trained = [v for _, v in present]
        grads = [g for g, _ in present]
        if not verdicts:
            return total_loss, grads
        if self._scaled:
            # As the loss-scale optimizer decides: every element finite.
            grads_finite = _core.elements_finite(grads)
        else:
            grads_finite = numerics.all_finite(tf.constant(0.0), grads)
        finite = [tf.math.is_finite(total_loss), grads_finite]
        return total_loss, grads, tf.cast(tf.logical_not(tf.stack(finite)), tf.int32)

    def _step_on_the_sum(self, loss: tf.Tensor, grads: list[Any]) -> tf.Tensor:
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
                self._config,
                self._trained,
                grads_and_vars=summed,
                apply_gradients=self._apply_summed,
                before_update=self._before_update,
                reported_missing=self._reported_missing,
            )

    def _apply_summed(self, pairs: list[tuple[Any, Any]], may_skip: bool) -> list[Any]:
        """Applies the summed gradients `pairs`: the first replica hands them to the optimizer
        and the others hand it zeros, so that the optimizer's own sum leaves them unchanged."""
        config = self._config
        variables = [v for _, v in pairs]
        grads = [g for g, _ in pairs]
        # A loss-scale optimizer that decides on each replica (where the strategy has no
        # merge_call) must see the sum's overflow on the replicas given zeros too.
        finite = _core.elements_finite(grads) if may_skip else None

        def apply_on_replica(finite: Any, *grads: Any) -> tf.Tensor:
            replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
            own = [(first_replica_only(g, v, replica_id), v) for g, v in zip(grads, variables)]
            if finite is not None:
                own = _core.not_finite_unless(finite, own)
            applied = config.adapter.apply(own, config.global_step, True, may_skip)
            with tf.control_dependencies([applied]):
                return tf.constant(True)

        applied = self._strategy.run(apply_on_replica, args=(finite, *grads))
        return list(self._strategy.experimental_local_results(applied))

    def _step_on_every_replica(
        self, loss: tf.Tensor, losses: Any, grads: Any, not_finite: Any
    ) -> tf.Tensor:
        """The step with the gradients left on their replicas: one decision for all of them
        (the summed loss checked, or the summed verdicts `not_finite` for the skip guard),
        then the update on every replica, the optimizer summing the gradients."""
        strategy, guard = self._strategy, self._config.check_numerics
        grads_finite = None
        if not_finite is not None:
            not_finite = strategy.reduce(tf.distribute.ReduceOp.SUM, not_finite, axis=None)
            loss_finite, grads_finite = not_finite[0] == 0, not_finite[1] == 0
        checked = None
        if guard is True:
            # The sum is inf or NaN if a replica's loss is.
            loss = checked = numerics.check_loss_is_finite(loss)

        def apply() -> list[tf.Tensor]:
            # The update ops run once, here, on the variables of every replica.
            with tf.control_dependencies([checked] if checked is not None else []):
                update_ops = _core.as_ops(self._before_update())
            with tf.control_dependencies(update_ops):
                applied = strategy.run(
                    self._update_on_replica, args=(losses, grads, grads_finite, checked)
                )
            return list(strategy.experimental_local_results(applied))

        if self._skips:
            # An overflow of the scaled gradients is the loss-scale optimizer's to skip.
            finite = loss_finite
            if numerics.gradients_count(guard, self._scaled):
                finite = tf.logical_and(loss_finite, grads_finite)
            step, step_name = _global_step.counter(
                self._config.global_step, self._config.adapter.iterations
            )
            done = [guard.update_if_finite(finite, apply, step, step_name=step_name)]
        else:
            done = apply()
        with tf.control_dependencies(done):
            return tf.identity(loss)

    def _update_on_replica(
        self, total_loss: tf.Tensor, grads: list[Any], grads_finite: Any, checked: Any
    ) -> Any:
        """The update on one replica, its own gradients applied (the optimizer sums them)."""
        # After the check of the summed loss (`checked`), if any: a failed one changes nothing.
        with tf.control_dependencies([checked] if checked is not None else []):
            return _core.build_step(
                total_loss,
                dataclasses.replace(self._config, check_numerics=False),
                self._trained,
                grads_and_vars=list(zip(grads, self._trained)),
                all_replicas_finite=grads_finite if self._scaled else None,
                reported_missing=self._reported_missing,
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
