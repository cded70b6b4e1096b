"""`create_train_op` and `create_train_step`: argument checks and the two front-ends.

* Graph front-end: `total_loss` is a `Tensor` of a `tf.compat.v1` graph (or of a `tf.function`
  being traced); the step is added to that graph and the loss tensor that runs it is returned.
* Eager front-end: `total_loss` is a callable; "call the loss, then build the step" is wrapped in
  one `tf.function`, which is returned. `create_train_step`, which runs one step per call on what
  the loss reads then, calls the loss eagerly and compiles only the step after the gradients.

Everything that differs between the two modes lives here; the step itself is `_core.build_step`.
"""

from __future__ import annotations

import collections
import gc
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from trainop import (
    _accumulation,
    _core,
    _global_step,
    _gradients,
    _optimizers,
    _replica_loss,
    _variables,
    numerics,
    summaries,
)
from trainop._checks import check_count
from trainop._global_step import USE_GLOBAL_STEP

logger = logging.getLogger("trainop")


_GATE_VALUES = (_core.GATE_NONE, _core.GATE_OP, _core.GATE_GRAPH)
_AGGREGATION_VALUES = (
    tf.AggregationMethod.ADD_N,  # also tf.AggregationMethod.DEFAULT
    tf.AggregationMethod.EXPERIMENTAL_TREE,
    tf.AggregationMethod.EXPERIMENTAL_ACCUMULATE_N,
)


# --- Argument checks, shared by both front-ends ------------------------------------------------


def _check_choices(
    gate_gradients: Any, aggregation_method: Any, summarize_every_n_steps: Any
) -> None:
    if type(gate_gradients) is not int or gate_gradients not in _GATE_VALUES:
        raise ValueError(
            "`gate_gradients` must be tf.compat.v1.train.Optimizer.GATE_NONE (0), GATE_OP (1) or "
            f"GATE_GRAPH (2). Received: gate_gradients={gate_gradients!r}"
        )
    if aggregation_method is not None and (
        type(aggregation_method) is not int or aggregation_method not in _AGGREGATION_VALUES
    ):
        raise ValueError(
            "`aggregation_method` must be None or a tf.AggregationMethod value (ADD_N, "
            "EXPERIMENTAL_TREE, EXPERIMENTAL_ACCUMULATE_N). "
            f"Received: aggregation_method={aggregation_method!r}"
        )
    check_count("summarize_every_n_steps", summarize_every_n_steps, allow_none=True)


def _refuse_replicas() -> None:
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


def _check_in_a_replica(settings: dict[str, Any]) -> None:
    """Raises for what a train op built or called inside `strategy.run` cannot do on every
    replica."""
    if not _core.in_a_replica() or tf.distribute.get_strategy().num_replicas_in_sync == 1:
        return
    for name, asked in [
        ("check_numerics", isinstance(settings["check_numerics"], numerics.SkipNonFiniteSteps)),
        ("accumulation_steps", settings["accumulator"] is not None),
    ]:
        if asked:
            # Both apply the update in a tf.cond, which replicas cannot synchronize inside.
            raise ValueError(
                f"`{name}`: a train op built or called inside strategy.run cannot skip or "
                "delay the update on every replica at once. Build it in the strategy's scope "
                "with the loss as a callable, and call it outside strategy.run: it then runs "
                "strategy.run itself, and decides for all replicas."
            )


def _check_callable_or_none(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be a callable or None. Received: {name}={value!r:.200}")


def _check_variables_to_train(variables: Any, in_graph: bool) -> list[Any]:
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
        if not (v.trainable or id(v) in graph_trainable):
            raise ValueError(
                "`variables_to_train` holds a variable that is not trainable: "
                f"{_variables.variable_name(v)}. Create it with trainable=True or leave it out."
            )
    seen: set[int] = set()
    unique = []
    for v in variables:
        if _variables.variable_key(v) not in seen:
            seen.add(_variables.variable_key(v))
            unique.append(v)
    return unique


def _check_eager_update_ops(update_ops: Any) -> list[Callable[[], Any]]:
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


def _check_loss_tensor(total_loss: Any, through_total_loss_fn: bool) -> None:
    if not isinstance(total_loss, tf.Tensor):
        raise TypeError(
            "`total_loss` must return a scalar loss tensor"
            + (" (through `total_loss_fn`)" if through_total_loss_fn else "")
            + f". Received: {type(total_loss).__name__} {total_loss!r:.200}"
        )


@tf.autograph.experimental.do_not_convert
def _variables_given_or_read(variables_to_train: Any, tape: tf.GradientTape) -> list[Any]:
    """`variables_to_train` (called and checked, if a callable), else the trainable variables
    that `tape` saw the loss read.

    Raises:
      ValueError: if none is given and the loss read none.
    """
    if callable(variables_to_train):
        return _check_variables_to_train(variables_to_train(), in_graph=False)
    if variables_to_train is not None:
        return variables_to_train
    watched = list(tape.watched_variables())
    # The tape sees the `tf.Variable` inside each Keras 3 variable, whose own `trainable` flag
    # Keras never updates (`layer.trainable = False` sets the Keras variable's only): the
    # Keras variable, with its flag and its constraint, is the one to train.
    variables = [v for v in _keras_owners(watched) if v.trainable]
    if not variables:
        raise ValueError(
            "`variables_to_train` is None and the loss reads no trainable variable: there is "
            "nothing to train."
            + (" (The variables it reads belong to frozen Keras layers.)" if watched else "")
        )
    return variables


# id(tf.Variable) -> (the tf.Variable, the Keras 3 variable wrapping it), both weakly held.
_KERAS_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


# Plain Python, called while a step is traced: autograph must not convert it (on the objects
# that gc.get_referrers returns, its converted calls are unsafe).
@tf.autograph.experimental.do_not_convert
def _keras_owners(tf_variables: list[Any]) -> list[Any]:
    """Each of `tf_variables`, or the Keras 3 variable that wraps it (as `_value`) if any.

    A `tf.Variable` holds no reference to the Keras 3 variable that wraps it, and Keras keeps
    no registry of its variables, so the wrapper is found among the objects that refer to the
    `tf.Variable` (`gc.get_referrers`, one pass over the heap for all of them). Every live
    Keras variable is found, whoever holds it; a wrapper is taken only if its `_value` is the
    very `tf.Variable`. Found wrappers are remembered (weakly, checked again on each use), so
    a step that reads the same variables again scans nothing.
    """
    keras_variable = _variables.keras3_variable_type()
    if keras_variable is None or not tf_variables:
        return list(tf_variables)
    owners: dict[int, Any] = {}
    unknown = []
    for v in tf_variables:
        refs = _KERAS_OWNERS.get(id(v))
        owner = refs[1]() if refs is not None and refs[0]() is v else None
        if owner is not None and getattr(owner, "_value", None) is v:
            owners[id(v)] = owner
        else:
            unknown.append(v)
    if unknown:
        wanted = {id(v): v for v in unknown}
        dicts = []
        for referrer in gc.get_referrers(*unknown):
            if isinstance(referrer, keras_variable):
                found = getattr(referrer, "_value", None)
                if found is not None and wanted.get(id(found)) is found:
                    owners[id(found)] = referrer
            elif isinstance(referrer, dict):
                found = referrer.get("_value")
                if found is not None and wanted.get(id(found)) is found:
                    dicts.append(referrer)
        if dicts:
            # An instance whose `__dict__` has been made refers to its attributes through it.
            for referrer in gc.get_referrers(*dicts):
                if isinstance(referrer, keras_variable):
                    found = getattr(referrer, "_value", None)
                    if found is not None and wanted.get(id(found)) is found:
                        owners[id(found)] = referrer
        for v in unknown:
            if id(v) in owners:
                key = id(v)
                _KERAS_OWNERS[key] = (
                    weakref.ref(v, lambda _, key=key: _KERAS_OWNERS.pop(key, None)),
                    weakref.ref(owners[key]),
                )
    return [owners.get(id(v), v) for v in tf_variables]


# --- Graph front-end ---------------------------------------------------------------------------


def _graph_update_ops(update_ops: Any) -> list[Any]:
    collected = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
    if update_ops is None:
        return list(collected)
    if isinstance(update_ops, (tf.Operation, tf.Tensor)):
        update_ops = [update_ops]
    if not isinstance(update_ops, (list, tuple, set)) or not all(
        isinstance(op, tf.Operation) or isinstance(getattr(op, "op", None), tf.Operation)
        for op in update_ops
    ):
        raise TypeError(
            "`update_ops` must be a list of ops or tensors of the graph in graph mode. "
            f"Received: update_ops={update_ops!r:.200}"
        )
    update_ops = list(update_ops)
    given = {id(op) for op in update_ops}
    left_out = [op for op in collected if id(op) not in given]
    if left_out:
        logger.warning(
            "update_ops does not contain all the update ops in the UPDATE_OPS collection; "
            "these will not run: %s",
            ", ".join(op.name for op in left_out),
        )
    return update_ops


def _create_graph_train_op(
    total_loss: tf.Tensor,
    adapter: _optimizers.OptimizerAdapter,
    global_step: tf.Variable | None,
    update_ops: Any,
    variables_to_train: Any,
    settings: dict[str, Any],
) -> tf.Tensor:
    _check_in_a_replica(settings)
    update_ops = _graph_update_ops(update_ops)
    if update_ops:
        # The loss is returned only once the update ops (batch-norm statistics...) have run.
        with tf.control_dependencies(update_ops):
            barrier = tf.no_op(name="update_barrier")
        with tf.control_dependencies([barrier]):
            total_loss = tf.identity(total_loss)

    if callable(variables_to_train):
        variables_to_train = variables_to_train()
    if variables_to_train is None:
        variables_to_train = tf.compat.v1.trainable_variables()
        if not variables_to_train:
            raise ValueError(
                "`variables_to_train` is None and the graph has no trainable "
                "variables: there is nothing to train."
            )
    variables = _check_variables_to_train(variables_to_train, in_graph=True)

    train_op = _core.build_step(total_loss, adapter, variables, global_step=global_step, **settings)
    if not tf.inside_function():
        # TF-Slim's loop finds the train op here. (Compared by identity: `==` on tensors is
        # element-wise.)
        train_ops = tf.compat.v1.get_collection_ref(tf.compat.v1.GraphKeys.TRAIN_OP)
        if not any(op is train_op for op in train_ops):
            train_ops.append(train_op)
    return train_op


# --- Eager front-end ---------------------------------------------------------------------------


def _create_eager_train_op(
    loss_fn: Callable[..., Any],
    adapter: _optimizers.OptimizerAdapter,
    global_step: tf.Variable | None,
    update_ops: Any,
    variables_to_train: Any,
    settings: dict[str, Any],
    total_loss_fn: Callable[[Any], Any] | None = None,
    jit_compile: bool = False,
    steps_per_call: int = 1,
) -> Callable[..., Any]:
    update_fns = _check_eager_update_ops(update_ops)
    strategy = _replicated_strategy(global_step)
    if variables_to_train is not None and not callable(variables_to_train):
        variables_to_train = _check_variables_to_train(variables_to_train, in_graph=False)
        adapter.build(variables_to_train)
    elif strategy is not None:
        raise ValueError(
            "`variables_to_train` must be a list of variables under a tf.distribute strategy: "
            "the optimizer's state is made before the first step, in the strategy's scope. "
            "Pass model.trainable_variables."
        )
    reported_missing: set[str] = set()

    def run_update_ops() -> list[Any]:
        return [fn() for fn in update_fns]

    def loss_and_variables(*args: Any, **kwargs: Any) -> tuple[Any, tf.Tensor, list[Any]]:
        """The loss structure, the loss to minimize and the variables to train."""
        if jit_compile and strategy is None and summaries.writes_v2_summaries():
            raise ValueError(
                "`jit_compile=True` and a default tf.summary writer: XLA does not compile "
                "summary writes. Build and first call the train op without a default writer, "
                "or with jit_compile=False."
            )
        # The trainable variables that the loss reads, should none be given.
        with tf.GradientTape() as tape:
            loss = loss_fn(*args, **kwargs)
            total_loss = loss if total_loss_fn is None else total_loss_fn(loss)
        _check_loss_tensor(total_loss, total_loss_fn is not None)
        return loss, total_loss, _variables_given_or_read(variables_to_train, tape)

    def train_step(*args: Any, **kwargs: Any) -> Any:
        # Built outside a strategy's scope, the train op may still be called in strategy.run.
        _check_in_a_replica(settings)
        loss, total_loss, variables = loss_and_variables(*args, **kwargs)
        trained_loss = _core.build_step(
            total_loss,
            adapter,
            variables,
            global_step=global_step,
            before_update=run_update_ops,
            reported_missing=reported_missing,
            **settings,
        )
        if total_loss_fn is None:
            return trained_loss
        # Every stateful op in a tf.function runs before it returns: the structure is
        # returned as computed, before the update.
        return loss

    guard = settings["check_numerics"]
    if strategy is not None:
        step_fn = _across_replicas(
            loss_and_variables,
            strategy,
            adapter,
            global_step,
            settings,
            run_update_ops,
            reported_missing,
            jit_compile,
            steps_per_call,
        )
        # Only each replica's loss and gradients are compiled: errors need naming, no more.
        return _CompiledTrainOp(tf.function(step_fn), None) if jit_compile else tf.function(step_fn)
    step_fn = train_step
    # Under XLA, which compiles Assert away, a step that would raise sets the guard's stop flag
    # instead (changing nothing), and the call raises once it returns.
    skips = isinstance(guard, numerics.SkipNonFiniteSteps)
    stop = guard.stop_flag() if jit_compile and skips else None
    if steps_per_call > 1:

        def step_at(i: tf.Tensor, args: tuple, kwargs: dict) -> tf.Tensor:
            step_args, step_kwargs = _batch_at(i, steps_per_call, args, kwargs)
            return train_step(*step_args, **step_kwargs)

        step_fn = _steps_in_a_loop(
            step_at if stop is None else _unless_stopped(step_at, stop), steps_per_call
        )
    if not jit_compile:
        return tf.function(step_fn)
    if stop is None:
        return _CompiledTrainOp(tf.function(step_fn, jit_compile=True), None)

    def step_and_counts(*args: Any, **kwargs: Any) -> Any:
        with guard.stopping_on_device():
            result = step_fn(*args, **kwargs)
        # Read after the step's updates (automatic control dependencies keep the order), and
        # returned: Python reads them from the outputs, not with more ops. The flag is cleared
        # in the call that set it: between calls it is always False.
        stopped = stop.read_value()
        with tf.control_dependencies([stopped]):
            stop.assign(False, read_value=False)
        counter = global_step if global_step is not None else adapter.iterations
        return (
            result,
            stopped,
            guard.consecutive_skipped_steps.read_value(),
            # The step the stopped step was at (neither it nor the ones after it counted).
            tf.cast(counter, tf.int64) if counter is not None else tf.constant(-1, tf.int64),
        )

    step_name = "global step" if global_step is not None else "optimizer step"
    return _CompiledTrainOp(tf.function(step_and_counts, jit_compile=True), guard, step_name)


def _unless_stopped(
    step_at: Callable[[tf.Tensor, tuple, dict], tf.Tensor], stop: tf.Variable
) -> Callable[[tf.Tensor, tuple, dict], tf.Tensor]:
    """`step_at`, run only while `stop` is False: the steps of a call after the one that
    stopped it run nothing (not even the loss), as they never run uncompiled, where that step
    raises. Their losses are NaN, never returned: the call raises."""

    def step_unless_stopped(i: tf.Tensor, args: tuple, kwargs: dict) -> tf.Tensor:
        return tf.cond(
            stop,
            lambda: tf.constant(np.nan, tf.float32),
            lambda: tf.cast(step_at(i, args, kwargs), tf.float32),
        )

    return step_unless_stopped


def _replicated_strategy(global_step: tf.Variable | None) -> Any:
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


def _across_replicas(
    loss_and_variables: Callable[..., tuple[Any, tf.Tensor, list[Any]]],
    strategy: Any,
    adapter: _optimizers.OptimizerAdapter,
    global_step: tf.Variable | None,
    settings: dict[str, Any],
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
    guard = settings["check_numerics"]
    skips = isinstance(guard, numerics.SkipNonFiniteSteps)
    scaled = adapter.loss_scale() is not None
    # The variables that have a gradient: the same on every replica, known once traced.
    trained: list[Any] = []

    def gradients(
        verdicts: bool, share: _replica_loss.Share | None, *args: Any, **kwargs: Any
    ) -> tuple[Any, ...]:
        with _replica_loss.one_device_scaling(share):
            _, total_loss, variables = loss_and_variables(*args, **kwargs)
        total_loss = _replica_loss.weighted(total_loss, share)
        grads_and_vars = _core.step_gradients(
            total_loss,
            adapter,
            variables,
            settings["gate_gradients"],
            settings["aggregation_method"],
            reported_missing,
            settings["missing_gradients"],
        )
        present = [(g, v) for g, v in grads_and_vars if g is not None]
        trained[:] = [v for _, v in present]
        grads = [g for g, _ in present]
        if not verdicts:
            return total_loss, grads
        if scaled:
            # As the loss-scale optimizer decides: every element finite.
            grads_finite = _core.elements_finite(grads)
        else:
            grads_finite = numerics.all_finite(tf.constant(0.0), grads)
        # Counts of what is not finite: [the loss, the gradients].
        finite = [tf.math.is_finite(total_loss), grads_finite]
        return total_loss, grads, tf.cast(tf.logical_not(tf.stack(finite)), tf.int32)

    replica_gradients = tf.function(gradients, jit_compile=True) if jit_compile else gradients

    def update(total_loss: tf.Tensor, grads: list[Any], grads_finite: Any, checked: Any) -> Any:
        # After the check of the summed loss (`checked`), if any: a failed one changes nothing.
        with tf.control_dependencies([checked] if checked is not None else []):
            return _core.build_step(
                total_loss,
                adapter,
                trained,
                global_step=global_step,
                grads_and_vars=list(zip(grads, trained)),
                all_replicas_finite=grads_finite if scaled else None,
                reported_missing=reported_missing,
                **dict(settings, check_numerics=False),
            )

    def apply_summed(pairs: list[tuple[Any, Any]], may_skip: bool) -> list[Any]:
        variables = [v for _, v in pairs]
        grads = [g for g, _ in pairs]
        # A loss-scale optimizer that decides on each replica (where the strategy has no
        # merge_call) must see the sum's overflow on the replicas given zeros too.
        finite = _core.elements_finite(grads) if may_skip else None

        def apply_on_replica(finite: Any, *grads: Any) -> tf.Tensor:
            replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
            own = [(_first_replica_only(g, v, replica_id), v) for g, v in zip(grads, variables)]
            if finite is not None:
                own = _core.not_finite_unless(finite, own)
            applied = adapter.apply(own, global_step, True, may_skip)
            with tf.control_dependencies([applied]):
                return tf.constant(True)

        applied = strategy.run(apply_on_replica, args=(finite, *grads))
        return list(strategy.experimental_local_results(applied))

    def distributed_step(select: Callable[..., tuple], args: tuple, kwargs: dict) -> tf.Tensor:
        """The step on the batches that `select(args, kwargs)` picks on each replica."""
        summed_first = (
            settings["transform_grads_fn"] is not None
            or settings["accumulator"] is not None
            or summaries.writes_v2_summaries()
            or adapter.clips_gradients
        )
        verdicts = (skips or scaled) and not summed_first
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
            return replica_gradients(verdicts, share, *step_args, **step_kwargs)

        results = strategy.run(replica_part, args=args, kwargs=kwargs)
        losses, grads = results[:2]
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)
        if summed_first:
            # To the replicas' own devices: one batched all-reduce.
            reduced = strategy.extended.batch_reduce_to(
                tf.distribute.ReduceOp.SUM, [(g, g) for g in grads]
            )
            summed = [
                (strategy.experimental_local_results(g)[0], v) for g, v in zip(reduced, trained)
            ]
            # On the first replica's device, which holds a copy of the sums.
            with tf.device(summed[0][0].device):
                return _core.build_step(
                    loss,
                    adapter,
                    trained,
                    global_step=global_step,
                    grads_and_vars=summed,
                    apply_gradients=apply_summed,
                    before_update=before_update,
                    reported_missing=reported_missing,
                    **settings,
                )

        grads_finite = None
        if verdicts:
            not_finite = strategy.reduce(tf.distribute.ReduceOp.SUM, results[2], axis=None)
            loss_finite, grads_finite = not_finite[0] == 0, not_finite[1] == 0

        checked = None
        if guard is True:
            # The sum is inf or NaN if a replica's loss is.
            loss = checked = numerics.check_loss_is_finite(loss)

        def apply() -> list[tf.Tensor]:
            # The update ops run once, here, on the variables of every replica.
            with tf.control_dependencies([checked] if checked is not None else []):
                update_ops = _core.as_ops(before_update())
            with tf.control_dependencies(update_ops):
                applied = strategy.run(update, args=(losses, grads, grads_finite, checked))
            return list(strategy.experimental_local_results(applied))

        if skips:
            # An overflow of the scaled gradients is the loss-scale optimizer's to skip.
            finite = loss_finite
            if not scaled and guard.checks_gradients:
                finite = tf.logical_and(loss_finite, grads_finite)
            if global_step is not None:
                done = [guard.update_if_finite(finite, apply, global_step)]
            else:
                done = [
                    guard.update_if_finite(
                        finite, apply, adapter.iterations, step_name="optimizer step"
                    )
                ]
        else:
            done = apply()
        with tf.control_dependencies(done):
            return tf.identity(loss)

    def step_at(i: tf.Tensor, args: tuple, kwargs: dict) -> tf.Tensor:
        return distributed_step(
            lambda args, kwargs: _batch_at(i, steps_per_call, args, kwargs), args, kwargs
        )

    steps = _steps_in_a_loop(step_at, steps_per_call) if steps_per_call > 1 else None

    def in_scope(*args: Any, **kwargs: Any) -> tf.Tensor:
        with strategy.scope():
            if steps is not None:
                return steps(*args, **kwargs)
            return distributed_step(lambda args, kwargs: (args, kwargs), args, kwargs)

    return in_scope


def _first_replica_only(grad: Any, variable: Any, replica_id: Any) -> Any:
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


def _steps_in_a_loop(
    step_at: Callable[[tf.Tensor, tuple, dict], tf.Tensor], steps: int
) -> Callable[..., Any]:
    """`step_at(i, args, kwargs)` for i in range(`steps`), in a `tf.while_loop`.

    `step_at` runs the step on the i-th batch of the arguments (see `_batch_at`); the losses of
    the steps come back stacked, as float32.
    """

    def run_steps(*args: Any, **kwargs: Any) -> tf.Tensor:
        args, kwargs = tf.nest.map_structure(_as_tensor_if_array, (args, kwargs))
        # The loop body opens a name scope ("while/") that would prefix summary tags.
        in_outer_scope = summaries.reentrant_name_scope()

        def one_step(i: tf.Tensor, losses: tf.TensorArray) -> tuple[tf.Tensor, tf.TensorArray]:
            with in_outer_scope():
                loss = step_at(i, args, kwargs)
            return i + 1, losses.write(i, tf.cast(loss, tf.float32))

        _, losses = tf.while_loop(
            lambda i, _: i < steps,
            one_step,
            (tf.constant(0), tf.TensorArray(tf.float32, size=steps, element_shape=[])),
        )
        return losses.stack()

    return run_steps


def _batch_at(i: tf.Tensor, steps: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The i-th batch of each tensor argument, which holds `steps` along its first axis."""
    for leaf in tf.nest.flatten((args, kwargs)):
        rank = leaf.shape.rank if isinstance(leaf, tf.Tensor) else None
        if rank is not None and (rank == 0 or leaf.shape[0] not in (None, steps)):
            raise ValueError(
                f"`steps_per_call={steps}`: every tensor argument must hold {steps} "
                f"batches along its first axis (under a tf.distribute strategy, each "
                f"replica's share). Received a tensor of shape {leaf.shape}"
            )
    return tf.nest.map_structure(lambda t: t[i] if isinstance(t, tf.Tensor) else t, (args, kwargs))


def _as_tensor_if_array(value: Any) -> Any:
    return tf.convert_to_tensor(value) if isinstance(value, np.ndarray) else value


class _CompiledTrainOp:
    """A `jit_compile=True` train op: the `tf.function`, its numerics errors raised by Python.

    XLA compiles `CheckNumerics` and `Assert` away, so under it a step that the numerics guard
    would fail (a guard made from `check_numerics=True` checks the loss only) sets the guard's
    stop flag on the device instead, changing nothing, and no later step of the call runs
    (`SkipNonFiniteSteps.stopping_on_device`). The function returns the flag, read and cleared
    at its end, and this raises what the uncompiled step would: the steps before the failing
    one applied, the state otherwise unchanged, as there. It also names XLA's refusal of an op
    it cannot compile, which comes only when the function first runs. Everything else is the
    `tf.function`'s (`get_concrete_function`, `experimental_get_tracing_count`, ...).
    """

    def __init__(self, function: Any, guard: Any, step_name: str = "global step"):
        self._function = function
        self._guard = guard
        # What the step the function returns counts, for the error.
        self._step_name = step_name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        guard = self._guard
        if guard is None:
            return self._call(*args, **kwargs)
        result, stopped, consecutive, step = self._call(*args, **kwargs)
        if bool(stopped):
            # A step of -1: there is no counter.
            raise guard.stopped_error(
                int(consecutive), self._step_name, int(step) if int(step) >= 0 else None
            )
        return result

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._function(*args, **kwargs)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
            message = str(error)
            if "XLA" not in message or "compil" not in message.lower():
                raise
            cause = next((line.strip() for line in message.splitlines() if "XLA" in line), message)
            raise ValueError(
                "`jit_compile=True`: XLA cannot compile this train step (an op of the loss, "
                "a transform or an update op has no XLA kernel). Use jit_compile=False, or "
                f"move that op out of the step. XLA says: {cause[:500]}"
            ) from error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._function, name)


# --- Public API --------------------------------------------------------------------------------


def _prepare(
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
) -> tuple[_optimizers.OptimizerAdapter, tf.Variable | None, dict[str, Any]]:
    adapter = _optimizers.OptimizerAdapter(optimizer)
    _check_choices(gate_gradients, aggregation_method, summarize_every_n_steps)
    check_count("accumulation_steps", accumulation_steps)
    _check_callable_or_none("transform_grads_fn", transform_grads_fn)
    if missing_gradients not in ("log", "raise"):
        raise ValueError(
            "`missing_gradients` must be 'log' or 'raise'. "
            f"Received: missing_gradients={missing_gradients!r}"
        )
    settings = dict(
        transform_grads_fn=transform_grads_fn,
        summarize_gradients=bool(summarize_gradients),
        gate_gradients=gate_gradients,
        aggregation_method=aggregation_method,
        check_numerics=numerics.resolve_check_numerics(check_numerics, optimizer),
        missing_gradients=missing_gradients,
        summarize_every_n_steps=(
            None if summarize_every_n_steps is None else int(summarize_every_n_steps)
        ),
        accumulator=(
            _accumulation.GradientAccumulator(int(accumulation_steps))
            if accumulation_steps > 1
            else None
        ),
    )
    return adapter, _global_step.resolve(global_step), settings


def _is_loss_callable(total_loss: Any) -> bool:
    return callable(total_loss) and not isinstance(total_loss, (tf.Tensor, tf.Variable))


def create_train_op(
    total_loss: tf.Tensor | Callable[..., tf.Tensor],
    optimizer: Any,
    global_step: Any = USE_GLOBAL_STEP,
    update_ops: Sequence[Any] | None = None,
    variables_to_train: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    transform_grads_fn: Callable[[list], list] | None = None,
    summarize_gradients: bool = False,
    gate_gradients: int = tf.compat.v1.train.Optimizer.GATE_OP,
    aggregation_method: int | None = None,
    check_numerics: bool | str | numerics.SkipNonFiniteSteps = True,
    *,
    colocate_gradients_with_ops: bool = False,
    missing_gradients: str = "log",
    summarize_every_n_steps: int | None = None,
    jit_compile: bool = False,
    steps_per_call: int = 1,
    accumulation_steps: int = 1,
) -> tf.Tensor | Callable[..., tf.Tensor]:
    """Creates the training step: gradients, transforms, numerics check, update, global step.

    The signature is TF-Agents' `create_train_op` (and TF-Slim's, `colocate_gradients_with_ops`
    being accepted as a keyword), so that their programs switch with one changed import.

    In a `tf.compat.v1` graph, `total_loss` is a `Tensor` and the result is a `Tensor` that, when
    evaluated, runs the update ops, computes the gradients, applies them, increments the global
    step and returns the loss. In eager mode (TensorFlow 2's default), `total_loss` is a callable
    and the result is a `tf.function` `train_op(*args, **kwargs)` that passes its arguments to
    `total_loss` and runs one whole step per call; it traces once for inputs of one shape.

    With `check_numerics`, an inf or NaN loss raises `tf.errors.InvalidArgumentError` ("LossTensor
    is inf or nan") before anything changes: the variables, the optimizer's slots and iteration
    counter and the global step keep their values. With `check_numerics="skip"` (or a
    `SkipNonFiniteSteps`), a step whose loss or any gradient is inf or NaN is skipped instead,
    with the same guarantee, and counted. What the forward pass writes itself (Keras
    BatchNormalization's moving statistics, graph update ops) is outside that guarantee.

    In eager mode inside a `tf.distribute` strategy's scope, the train op runs the step on every
    replica with `strategy.run` and weights each replica's loss by its share of the global batch
    (its number of examples, the first dimension of the first argument given per replica, over
    their sum), so that the optimizer's sum of the gradients and the returned sum of the losses
    are one device's on the whole batch, however it was split. The loss is written as for one
    device: Keras 3's loss objects, `tf.nn.compute_average_loss` and
    `tf.nn.scale_regularization_loss` do not divide by the number of replicas while the train op
    calls it, and `tf.nn.compute_average_loss(..., global_batch_size=G)` counts as it is (the
    README has the rule for each way of writing a loss). The skip
    guard and a `LossScaleOptimizer` then skip a step on every replica when any replica's loss or
    gradients are not finite; `transform_grads_fn`, the summaries and accumulation see the sum
    of the replicas' gradients (see the README for what that costs).

    With a default `tf.summary` writer set when the step is built (traced), the step writes
    `train/loss`, `train/global_gradient_norm` and `train/learning_rate` at the global step
    (read before the update), on the steps that `tf.summary.record_if` and
    `summarize_every_n_steps` select; the other steps compute none of it.

    Args:
      total_loss: a scalar floating-point `Tensor` (graph mode), or a callable returning one
        (eager mode).
      optimizer: a `tf.compat.v1.train.Optimizer`, a Keras 3 optimizer (a
        `LossScaleOptimizer` too: the loss is scaled, and the gradients unscaled before the
        numerics guard and `transform_grads_fn`) or a `tf_keras` one.
      global_step: an integer variable incremented once per applied update; `USE_GLOBAL_STEP`
        means `tf.compat.v1.train.get_or_create_global_step()`, None means no step is counted.
        The optimizer's own `iterations` may be passed: it is then not counted twice.
      update_ops: graph mode: ops run before the loss is returned, by default the `UPDATE_OPS`
        collection (a list lacking some of its ops logs a warning). Eager mode: zero-argument
        callables run inside the step, after the numerics check and before the update.
      variables_to_train: the variables to train, or a zero-argument callable returning them.
        None means all trainable variables (graph mode) or the trainable variables the loss
        reads (eager mode).
      transform_grads_fn: maps the list of (gradient, variable) pairs to a new one of the same
        variables (clipping, multipliers) before it is applied.
      summarize_gradients: whether to write a histogram and a norm per gradient (after
        `transform_grads_fn`) to the default `tf.summary` writer at the global step.
      gate_gradients: `GATE_NONE`, `GATE_OP` or `GATE_GRAPH`, as for
        `tf.compat.v1.train.Optimizer.compute_gradients`.
      aggregation_method: a `tf.AggregationMethod` value combining gradient terms, or None.
      check_numerics: True: an inf or NaN loss raises before anything changes. False: no check.
        'skip' or a `trainop.SkipNonFiniteSteps(max_consecutive=...)`: a step whose loss or
        any gradient is inf or NaN changes nothing and is counted; more than `max_consecutive`
        (by default 10) such steps in a row raise. Pass your own `SkipNonFiniteSteps` to read
        its `skipped_steps` counter.
      colocate_gradients_with_ops: accepted for TF-Slim's programs; TensorFlow 2 ignores it.
      missing_gradients: what a variable to train that gets no gradient from the loss does:
        'log' (default) names it once on the `trainop` logger and trains the others; 'raise'
        raises a ValueError naming all of them when the step is built.
      summarize_every_n_steps: write the summaries only at global steps that are multiples of
        it (0, n, 2n...), and only when `tf.summary.record_if` allows; None (default): whenever
        `tf.summary.record_if` allows.
      jit_compile: eager mode: compile the whole step with XLA (`tf.function(jit_compile=
        True)`). An op without an XLA kernel raises a ValueError on the first call; summaries
        cannot be compiled.
      steps_per_call: eager mode: run this many steps per call, in one compiled loop, so that
        a small model stops paying Python's per-call cost (as Keras's `steps_per_execution`).
        Every tensor argument then holds that many batches along a new first axis (under a
        `tf.distribute` strategy, each replica's share does), and the call returns the steps'
        losses as a vector.
      accumulation_steps: sum the gradients of this many calls and apply their mean once
        (with a loss averaged over its batch: the update of one step on a batch that many times
        larger). `transform_grads_fn`, the summaries and the update ops see the mean; the global
        step counts applied updates.

    Returns:
      Graph mode: the loss `Tensor` whose evaluation runs the step. Eager mode: the callable step,
      which returns the loss.

    Raises:
      TypeError: `total_loss` is a Tensor in eager mode, the loss is not floating-point, the
        optimizer is of no known family, or an argument has the wrong type.
      ValueError: the loss is not a scalar, there is no variable to train, a variable to train
        is not trainable, `gate_gradients`, `aggregation_method` or `summarize_every_n_steps`
        is not one of its values, `transform_grads_fn` returns other variables, or (on the
        first call, under a strategy of several replicas) the loss is given no argument with
        a first dimension to read the replicas' shares from.

    Example:
      >>> import keras, tensorflow as tf, trainop
      >>> w = tf.Variable(1.0)
      >>> train_op = trainop.create_train_op(lambda x: (w * x - 2.0) ** 2,
      ...                                    keras.optimizers.SGD(0.1), global_step=None)
      >>> float(train_op(tf.constant(1.0)))  # the loss before the update
      1.0
      >>> round(float(w.numpy()), 6)  # w - 0.1 * 2 * (w - 2)
      1.2
    """
    del colocate_gradients_with_ops  # Ignored by tf.gradients since TensorFlow 2.
    if not tf.executing_eagerly():
        _refuse_replicas()
    if not isinstance(jit_compile, (bool, np.bool_)):
        raise TypeError(f"`jit_compile` must be True or False. Received: {jit_compile!r}")
    check_count("steps_per_call", steps_per_call)
    adapter, step, settings = _prepare(
        optimizer,
        global_step,
        transform_grads_fn,
        summarize_gradients,
        gate_gradients,
        aggregation_method,
        check_numerics,
        missing_gradients,
        summarize_every_n_steps,
        accumulation_steps,
    )
    if tf.executing_eagerly():
        if jit_compile and settings["check_numerics"] is True and not tf.distribute.has_strategy():
            settings["check_numerics"] = numerics.LossCheckUnderXLA()
        if not _is_loss_callable(total_loss):
            raise TypeError(
                "`total_loss` must be a callable that returns the loss in eager mode (a Tensor "
                "is a value already computed, with no gradient to take): pass "
                "`lambda: loss_fn(...)` or the loss function itself. "
                f"Received: total_loss of type {type(total_loss).__name__}"
            )
        return _create_eager_train_op(
            total_loss,
            adapter,
            step,
            update_ops,
            variables_to_train,
            settings,
            jit_compile=bool(jit_compile),
            steps_per_call=int(steps_per_call),
        )
    if jit_compile or steps_per_call != 1:
        raise ValueError(
            "`jit_compile` and `steps_per_call` apply to the eager train op: in a "
            "tf.compat.v1 graph, the Session runs the graph it is given."
        )
    if _is_loss_callable(total_loss):
        total_loss = total_loss()
    if not isinstance(total_loss, tf.Tensor):
        raise TypeError(
            "`total_loss` must be a scalar loss Tensor in graph mode. "
            f"Received: total_loss of type {type(total_loss).__name__}"
        )
    return _create_graph_train_op(
        total_loss, adapter, step, update_ops, variables_to_train, settings
    )


# What `create_train_step` keeps between its calls in eager mode: per optimizer and settings,
# the prepared step (the numerics guard it counts in, the optimizer state it built) and its
# compiled updates, one per set of variables. Never the loss: it is called afresh every time.
# An entry holds its optimizer and variables, so a weakly keyed cache would never let them go;
# this one keeps the most recently used few.
_STEP_CACHE: collections.OrderedDict = collections.OrderedDict()
_STEP_CACHE_SIZE = 8


def _identity_key(value: Any, referents: list[Any]) -> Any:
    """A hashable key for `value`: scalars by type and value, anything else by identity.

    Each object keyed by identity is appended to `referents`, for the cache entry to keep: an
    object kept alive cannot lend its id to a newer one, which would find a stale entry.
    """
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_identity_key(v, referents) for v in value))
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        # The type too: True == 1, but they are not the same setting.
        return (type(value).__name__, value)
    referents.append(value)
    return ("id", id(value))


def _cached_eager_step(
    cache: collections.OrderedDict,
    key: Any,
    referents: list[Any],
    build: Callable[[], Any],
    size: int = _STEP_CACHE_SIZE,
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


def _summary_state_key(referents: list[Any], reads_default_step: bool) -> Any:
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
    return _identity_key((state.writer, state.is_recording, step), referents)


class _PreparedStep:
    """What `create_train_step` keeps for one optimizer and one set of settings."""

    def __init__(
        self,
        adapter: _optimizers.OptimizerAdapter,
        global_step: tf.Variable | None,
        settings: dict[str, Any],
    ):
        self.adapter = adapter
        self.global_step = global_step
        self.settings = settings
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
            settings = dict(self.settings, transform_grads_fn=None)
            if transformed_variables is not None:
                # Transformed already, eagerly, on this call's gradients: the step takes them.
                settings["transform_grads_fn"] = lambda pairs: list(
                    zip(transformed_grads, transformed_variables)
                )
            return _core.build_step(
                total_loss,
                self.adapter,
                variables,
                global_step=self.global_step,
                grads_and_vars=list(zip(grads, variables)),
                before_update=lambda: [fn() for fn in update_fns],
                reported_missing=self.reported_missing,
                **settings,
            )

        def build() -> Callable[..., Any]:
            # The gradients of an embedding are IndexedSlices whose row count varies.
            return tf.function(update, reduce_retracing=True)

        if update_fns:
            return build()
        referents: list[Any] = []
        key = (
            _identity_key(variables, referents),
            _identity_key(transformed_variables, referents),
            _summary_state_key(
                referents, self.global_step is None and self.adapter.iterations is None
            ),
        )
        return _cached_eager_step(self.updates, key, referents, build)


def _eager_loss_and_gradients(
    loss: Callable[[], Any],
    total_loss_fn: Callable[[Any], Any],
    prepared: _PreparedStep,
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
    with tf.GradientTape() as tape:
        loss_value = loss()
        total_loss = total_loss_fn(loss_value)
        with tape.stop_recording():
            _check_loss_tensor(total_loss, through_total_loss_fn=True)
            _core.check_loss(total_loss)
            variables = _variables_given_or_read(variables_to_train, tape)
            variables = _check_variables_to_train(variables, in_graph=False)
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


def create_train_step(
    loss: Any,
    optimizer: Any,
    global_step: Any = USE_GLOBAL_STEP,
    total_loss_fn: Callable[[Any], tf.Tensor] | None = None,
    update_ops: Sequence[Any] | None = None,
    variables_to_train: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    transform_grads_fn: Callable[[list], list] | None = None,
    summarize_gradients: bool = False,
    gate_gradients: int = tf.compat.v1.train.Optimizer.GATE_OP,
    aggregation_method: int | None = None,
    check_numerics: bool | str | numerics.SkipNonFiniteSteps = True,
    *,
    missing_gradients: str = "log",
    summarize_every_n_steps: int | None = None,
) -> Any:
    """Trains on a possibly nested loss structure, as TF-Agents' `create_train_step`.

    `total_loss_fn` picks from the loss structure the scalar to minimize; the whole structure is
    returned. In graph mode it returns the loss structure, to be evaluated after the update has
    run.

    In eager mode this runs one step now, as TF-Agents' code does: it calls `loss()`, applies
    the gradients and returns the loss structure computed before the update. Every call trains
    on what the loss reads *now*: `loss()`, `total_loss_fn`, `variables_to_train` (a callable)
    and `transform_grads_fn` run eagerly on every call, and the gradients come from a
    `tf.GradientTape`, as in TF-Agents (`gate_gradients` and `aggregation_method`, which order
    and sum a graph's gradient ops, do not apply there). A compiled loss would be replayed: a
    trace takes in a NumPy batch, an eager tensor or a Python value that the loss reads (a
    global or closure variable rebound every step, a `Future`'s arguments, an attribute) as a
    constant, and trainop cannot tell, from the callable, whether the next call would read the
    same. What follows the gradients is compiled and reused, since its inputs are the loss and
    the gradients themselves: the numerics guard, summaries, update and global step, traced
    once per optimizer, settings, set of variables and `tf.summary` writer and recording
    condition (and `tf.summary.experimental.get_step()`, when there is neither a global step nor
    an optimizer counter to write at). With `update_ops` (the caller's code, traced into that
    part) it is traced afresh on every call. The optimizer's hyperparameters are read as the
    trace read them: assign to a Keras optimizer's `learning_rate` (a variable) to change it.
    Since `transform_grads_fn` runs before the numerics guard decides, a transform that keeps
    state of its own (a running norm) updates it on a skipped step too; `create_train_op` runs
    it inside the guarded step.

    For a step compiled whole, loss included, pass the batch as an argument:
    `train_op = create_train_op(lambda x, y: loss_fn(x, y), optimizer)`, then `train_op(x, y)`
    per step, traces once for batches of one shape and reads them on every call.

    Args:
      loss: a (possibly nested) structure of loss tensors (graph mode), or a zero-argument
        callable returning one (eager mode).
      optimizer: as for `create_train_op`.
      global_step: as for `create_train_op`.
      total_loss_fn: maps the loss structure to the scalar to minimize; by default the loss
        itself.
      update_ops: as for `create_train_op` (TF-Agents ignores them in eager mode; trainop runs
        them, after the numerics check and before the update).
      variables_to_train: as for `create_train_op`.
      transform_grads_fn: as for `create_train_op`.
      summarize_gradients: as for `create_train_op`.
      gate_gradients: as for `create_train_op`.
      aggregation_method: as for `create_train_op`.
      check_numerics: as for `create_train_op`.
      missing_gradients: as for `create_train_op`.
      summarize_every_n_steps: as for `create_train_op`.

    Returns:
      Eager mode: the loss structure of this step. Graph mode: the loss structure as tensors
      that, when evaluated, run the step.

    Raises:
      ValueError: `total_loss_fn` is not callable, `loss` is not callable in eager mode (both
        ValueError, as in TF-Agents), or as for `create_train_op`.
      TypeError: as for `create_train_op`.

    Example:
      >>> import tensorflow as tf, trainop
      >>> w = tf.Variable(3.0)
      >>> sgd = tf.compat.v1.train.GradientDescentOptimizer(0.5)
      >>> losses = lambda: (w * w, 2.0 * w)
      >>> first, second = trainop.create_train_step(losses, sgd, global_step=None,
      ...                                           total_loss_fn=lambda l: l[0])
      >>> float(first), float(second), float(w.numpy())
      (9.0, 6.0, 0.0)
    """
    if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
        raise ValueError(
            "create_train_step is not supported inside a tf.distribute strategy's scope yet: "
            "use create_train_op with a callable loss, which runs it on every replica."
        )
    if total_loss_fn is None:
        total_loss_fn = _identity
    if not callable(total_loss_fn):
        # ValueError, as TF-Agents raises.
        raise ValueError(f"`total_loss_fn` must be a callable. Received: {total_loss_fn!r:.200}")

    if not tf.executing_eagerly():
        if _is_loss_callable(loss):
            loss = loss()
        if callable(variables_to_train):
            variables_to_train = variables_to_train()
        # The losses are computed first, the step is built on them, and they are returned
        # once the step has run.
        with tf.control_dependencies(tf.nest.flatten(loss)):
            loss = tf.nest.map_structure(lambda t: tf.identity(t, "loss_pre_train"), loss)
        train_op = create_train_op(
            total_loss_fn(loss),
            optimizer,
            global_step=global_step,
            update_ops=update_ops,
            variables_to_train=variables_to_train,
            transform_grads_fn=transform_grads_fn,
            summarize_gradients=summarize_gradients,
            gate_gradients=gate_gradients,
            aggregation_method=aggregation_method,
            check_numerics=check_numerics,
            missing_gradients=missing_gradients,
            summarize_every_n_steps=summarize_every_n_steps,
        )
        with tf.control_dependencies([train_op]):
            return tf.nest.map_structure(lambda t: tf.identity(t, "loss_post_train"), loss)

    if not _is_loss_callable(loss):
        raise ValueError(  # As TF-Agents raises.
            "`loss` must be a zero-argument callable in eager mode. "
            f"Received: loss of type {type(loss).__name__}"
        )

    # The settings are checked before the loss is called: a wrong one fails before anything
    # runs, and the loss's forward pass (which may write, as batch normalization does) too.
    _check_choices(gate_gradients, aggregation_method, summarize_every_n_steps)
    _check_callable_or_none("transform_grads_fn", transform_grads_fn)
    update_fns = _check_eager_update_ops(update_ops)
    referents: list[Any] = []
    key = _identity_key(
        (
            optimizer,
            # The variable: a new program global step is a new step to count in.
            _global_step.resolve(global_step),
            summarize_gradients,
            gate_gradients,
            aggregation_method,
            check_numerics,
            missing_gradients,
            summarize_every_n_steps,
        ),
        referents,
    )

    def prepare() -> _PreparedStep:
        return _PreparedStep(
            *_prepare(
                optimizer,
                global_step,
                None,
                summarize_gradients,
                gate_gradients,
                aggregation_method,
                check_numerics,
                missing_gradients,
                summarize_every_n_steps,
            )
        )

    prepared = _cached_eager_step(_STEP_CACHE, key, referents, prepare)
    _check_in_a_replica(prepared.settings)
    loss_value, total_loss, grads_and_vars = _eager_loss_and_gradients(
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


def _identity(x: Any) -> Any:
    return x
