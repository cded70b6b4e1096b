"""The optimizer-family adapter.

Everything that differs between optimizer families lives here: how gradients are applied, who
increments the global step, which iteration counter an optimizer keeps, and which kind of
variable each family is handed (Keras 3's or the `tf.Variable` inside, see `_variables`). The
step pipeline in `_core` calls `OptimizerAdapter.apply` and never asks which family it is
talking to.

Families:
  * `tf.compat.v1.train.Optimizer` subclasses: `apply_gradients(..., global_step=)` counts the
    step itself.
  * Keras 3 optimizers (`keras.optimizers.*`): keep their own `iterations` counter; their
    updates are ordered only inside a `tf.function`, so in a `tf.compat.v1` graph they are
    applied through a small `tf.function`.
  * `tf_keras` optimizers (Keras 2), when installed: the current ones behave like Keras 3, the
    legacy ones (`tf_keras.optimizers.legacy.*`, `OptimizerV2`) return an op in a graph.

What an optimizer does while the gradients are computed is honoured too, as its own `minimize`
does it: a Keras 3 optimizer's `loss_scale_factor` (the loss scaled, the gradients divided by it
in `apply_gradients`) and a `tf.compat.v1` optimizer's overridden `compute_gradients` (loss
scaling, or averaging across workers as Horovod's `DistributedOptimizer` does).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import tensorflow as tf

from trainop import _global_step, _gradients
from trainop._variables import (
    as_tf_variable,
    keras3_variable_type,
    variable_key,
    variable_name,
)

FAMILY_V1 = "tf.compat.v1.train.Optimizer"
FAMILY_KERAS = "keras"
FAMILY_TF_KERAS = "tf_keras"
FAMILY_TF_KERAS_LEGACY = "tf_keras.optimizers.legacy"


def _optimizer_families() -> list[tuple[type, str]]:
    families: list[tuple[type, str]] = [(tf.compat.v1.train.Optimizer, FAMILY_V1)]
    keras = sys.modules.get("keras")
    keras_optimizer = getattr(getattr(keras, "optimizers", None), "Optimizer", None)
    if keras3_variable_type() is not None and isinstance(keras_optimizer, type):
        families.append((keras_optimizer, FAMILY_KERAS))
    # tf_keras is only ever in use if the caller imported it: never import it here.
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is not None:
        families.append((tf_keras.optimizers.legacy.Optimizer, FAMILY_TF_KERAS_LEGACY))
        families.append((tf_keras.optimizers.Optimizer, FAMILY_TF_KERAS))
    return families


def _keras_loss_scale_optimizer_type() -> type | None:
    keras = sys.modules.get("keras")
    keras_lso = getattr(getattr(keras, "optimizers", None), "LossScaleOptimizer", None)
    return keras_lso if isinstance(keras_lso, type) else None


def _unsupported_loss_scale_optimizer_types() -> tuple[type, ...]:
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is None:
        return ()
    return (tf_keras.mixed_precision.LossScaleOptimizer,)


def optimizer_family(optimizer: Any) -> str:
    """Names the family of `optimizer`.

    Raises:
      TypeError: if `optimizer` belongs to no known family, or scales the loss.
    """
    if isinstance(optimizer, _unsupported_loss_scale_optimizer_types()):
        # Its apply_gradients divides the gradients by the loss scale: applied to the gradients
        # of an unscaled loss, it would shrink every update without a word.
        raise TypeError(
            "`optimizer` is a tf_keras LossScaleOptimizer, which create_train_op does not "
            "support: use Keras 3's keras.optimizers.LossScaleOptimizer, or pass the inner "
            f"optimizer and a float32 loss. Received: optimizer={optimizer!r}"
        )
    if getattr(optimizer, "gradient_accumulation_steps", None):
        # Keras then applies one update every N calls: the global step would count calls.
        raise TypeError(
            "`optimizer` accumulates gradients (gradient_accumulation_steps="
            f"{optimizer.gradient_accumulation_steps}), which trainop's step does not support: "
            "the global step would count calls, not updates. Pass accumulation_steps= to "
            f"trainop instead. Received: optimizer={optimizer!r}"
        )
    for base, family in _optimizer_families():
        if isinstance(optimizer, base):
            return family
    raise TypeError(
        "`optimizer` must be a tf.compat.v1.train.Optimizer, a Keras 3 optimizer "
        "(keras.optimizers.*) or a tf_keras optimizer. "
        f"Received: optimizer={optimizer!r} of type {type(optimizer).__name__}"
    )


class OptimizerAdapter:
    """Applies gradients with an optimizer of any family, counting the global step once.

    Args:
      optimizer: the caller's optimizer.

    Raises:
      TypeError: if `optimizer` belongs to no known family.
    """

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self.family = optimizer_family(optimizer)

    def loss_scale(self) -> tf.Tensor | None:
        """The loss scale of a Keras 3 `LossScaleOptimizer` (float32), or None for the others."""
        if not self.scales_loss:
            return None
        scale = self.optimizer.dynamic_scale if self.optimizer.built else None
        if scale is None:
            return tf.constant(self.optimizer.initial_scale, tf.float32)
        return tf.cast(as_tf_variable(scale), tf.float32)

    @property
    def scales_loss(self) -> bool:
        """Whether the optimizer is a Keras 3 `LossScaleOptimizer` (`loss_scale` not None),
        known without adding an op."""
        lso = _keras_loss_scale_optimizer_type()
        return lso is not None and isinstance(self.optimizer, lso)

    def loss_scale_factor(self) -> float | None:
        """The fixed `loss_scale_factor` of a Keras 3 optimizer, or None if it has none.

        Keras 3 optimizers made with `loss_scale_factor=` expect the gradients of the loss
        multiplied by it (`optimizer.scale_loss`), and divide them by it in `apply_gradients`.
        The step takes the gradients of the scaled loss and divides them (`_core`), so that the
        numerics guard, transforms and summaries see true gradients; `apply` multiplies them
        again for the optimizer. A `LossScaleOptimizer` clears its inner optimizer's factor;
        one set there afterwards is counted too, as its `apply_gradients` divides by both.
        `tf_keras` optimizers have no such option.
        """
        if self.family != FAMILY_KERAS:
            return None
        factor = None
        optimizer = self.optimizer
        while optimizer is not None:
            own = getattr(optimizer, "loss_scale_factor", None)
            if own is not None:
                factor = own if factor is None else factor * own
            optimizer = getattr(optimizer, "inner_optimizer", None)
        return factor

    def gradient_scale(self) -> tf.Tensor | None:
        """What the loss is multiplied by before its gradients are taken (and the gradients
        divided by after): a `LossScaleOptimizer`'s scale times a `loss_scale_factor`, float32;
        None if the optimizer scales nothing."""
        scale = self.loss_scale()
        factor = self.loss_scale_factor()
        if factor is not None:
            # A fixed scale, which `apply` multiplies the gradients by again for the optimizer.
            scale = tf.constant(factor, tf.float32) if scale is None else scale * factor
        return scale

    @property
    def clips_gradients(self) -> bool:
        """Whether the optimizer clips the gradients it is given (Keras's `clipnorm`,
        `global_clipnorm` or `clipvalue`, of a `LossScaleOptimizer`'s inner optimizer too).

        Under a `tf.distribute` strategy it would clip each replica's share: the train op then
        sums the replicas' gradients first, so that it clips the sum, as on one device.
        """
        optimizer = self.optimizer
        while optimizer is not None:
            if any(
                getattr(optimizer, option, None) is not None
                for option in ("clipnorm", "global_clipnorm", "clipvalue")
            ):
                return True
            optimizer = getattr(optimizer, "inner_optimizer", None)
        return False

    @property
    def computes_gradients(self) -> bool:
        """Whether the gradients must come from the optimizer's own `compute_gradients`.

        True for a `tf.compat.v1.train.Optimizer` that overrides it (loss scaling, averaging
        across workers as Horovod's `DistributedOptimizer` does, a wrapper such as
        `SyncReplicasOptimizer`): its `minimize` and TF-Slim's `create_train_op` call it.
        """
        return (
            self.family == FAMILY_V1
            and type(self.optimizer).compute_gradients
            is not tf.compat.v1.train.Optimizer.compute_gradients
        )

    def compute_gradients(
        self,
        total_loss: tf.Tensor,
        variables: list[Any],
        gate_gradients: int,
        aggregation_method: int | None,
    ) -> list[tuple[Any, Any]]:
        """The optimizer's own `compute_gradients(total_loss, var_list=variables, ...)`.

        Called in a graph (a `tf.compat.v1` graph or a `tf.function`), where a v1 optimizer
        takes the gradients of a loss tensor. Returns a (gradient, variable) pair for each of
        `variables`, in their order, the gradient None where it gives none.

        Raises:
          ValueError: under a `tf.distribute` strategy with several replicas, where a v1
            optimizer's `compute_gradients` divides the loss by their number (trainop already
            weighs each replica's loss), or if it returns gradients for other variables.
        """
        strategy = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
        if strategy is not None and strategy.num_replicas_in_sync > 1:
            raise ValueError(
                f"`optimizer` is a {type(self.optimizer).__name__}, whose own "
                "compute_gradients create_train_op calls, and which it does not support under "
                "a tf.distribute strategy with several replicas: tf.compat.v1 optimizers "
                "divide the loss by the number of replicas there. Use a Keras optimizer, or "
                f"one replica. Received: optimizer={self.optimizer!r}"
            )
        tf_variables = [as_tf_variable(v) for v in variables]
        pairs = self.optimizer.compute_gradients(
            total_loss,
            var_list=tf_variables,
            gate_gradients=gate_gradients,
            aggregation_method=aggregation_method,
        )
        grads = {}
        for grad, variable in pairs:
            grads[variable_key(variable)] = grad
        asked = {variable_key(v) for v in variables}
        other = [variable_name(v) for _, v in pairs if variable_key(v) not in asked]
        if other:
            raise ValueError(
                f"`optimizer.compute_gradients` ({type(self.optimizer).__name__}) returned "
                f"gradients for variables it was not given: {other}. "
                f"Received: optimizer={self.optimizer!r}"
            )
        return [(grads.get(variable_key(v)), v) for v in variables]

    @property
    def iterations(self) -> tf.Variable | None:
        """The optimizer's own step counter as a `tf.Variable`, or None if it keeps none."""
        if self.family == FAMILY_V1:
            return None
        return as_tf_variable(self.optimizer.iterations)

    def _counts_global_step_itself(self, global_step: tf.Variable) -> bool:
        """Whether applying gradients already increments `global_step`."""
        if self.family == FAMILY_V1:
            return True
        # The caller may use the optimizer's own counter as the global step.
        return global_step is self.iterations

    def build(self, variables: list[Any]) -> None:
        """Creates the optimizer's state (slots, counters) for `variables`, outside any guard.

        Called when the train op is built and again, under `tf.init_scope`, before the step is
        added to a graph: state made inside the step would wait for the numerics check, so a
        bad first step would leave it uninitialized. Made before the first call, it also spares
        the eager train op the second trace that a `tf.function` creating variables needs.
        Building twice is harmless.

        Raises:
          ValueError: if the optimizer is a Keras 3 or current `tf_keras` one already built for
            other variables: it keeps state only for the variables it was first built with.
        """
        optimizer = self.optimizer
        tf_variables = [as_tf_variable(v) for v in variables]
        # Before anything is made: a refused optimizer is left as it was.
        self._check_known(variables)
        with tf.init_scope():
            if self.family == FAMILY_KERAS and not optimizer.built:
                optimizer.build(variables)
            elif self.family == FAMILY_TF_KERAS and not getattr(optimizer, "_built", False):
                optimizer.build(tf_variables)
            elif self.family == FAMILY_TF_KERAS_LEGACY:
                optimizer._create_all_weights(tf_variables)
            elif self.family == FAMILY_V1:
                # What apply_gradients does first; creating a slot twice returns the first.
                optimizer._create_slots(tf_variables)

    def _check_known(self, variables: list[Any]) -> None:
        """Raises if a built Keras optimizer keeps no state for some of `variables`.

        Keras 3 and current `tf_keras` optimizers index their slots by the variables they were
        first built with and build only once; any other variable fails deep inside
        `apply_gradients` (a `KeyError` telling to call `optimizer.build`, which changes
        nothing once built, or Keras 3's "Unknown variable"), only when the step first runs.
        `tf.compat.v1` and `tf_keras.optimizers.legacy` optimizers make slots per variable as
        it comes, and train any variable.
        """
        if self.family == FAMILY_KERAS:
            # A LossScaleOptimizer applies through its inner optimizer, built on its own.
            candidates = [self.optimizer, getattr(self.optimizer, "inner_optimizer", None)]
            built = [
                (o, o._trainable_variables_indices, variables)
                for o in candidates
                if o is not None and getattr(o, "built", False)
            ]
        elif self.family == FAMILY_TF_KERAS and getattr(self.optimizer, "_built", False):
            tf_variables = [as_tf_variable(v) for v in variables]
            built = [(self.optimizer, self.optimizer._index_dict, tf_variables)]
        else:
            return
        for optimizer, known, keyed in built:
            unknown = [
                variable_name(v)
                for v, k in zip(variables, keyed)
                if optimizer._var_key(k) not in known
            ]
            if unknown:
                raise ValueError(
                    "`optimizer` must be a new optimizer, or one built for the variables it "
                    f"trains: this {type(optimizer).__name__} was built for {len(known)} "
                    "variable(s), and keeps no state for these: "
                    f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}. A Keras "
                    "optimizer is built once, for the variables it first trains. Use one "
                    "optimizer per set of variables (create a new one for these), or build one "
                    "optimizer for all of them before its first step "
                    f"(optimizer.build(model_a_variables + model_b_variables)). "
                    f"Received: optimizer={self.optimizer!r}"
                )

    def state_variables(self, variables: list[Any]) -> list[tf.Variable]:
        """Every `tf.Variable` that applying gradients to `variables` may write, besides them:
        the optimizer's slots, counters, learning rate and loss scale. Builds the optimizer's
        state first (`build`), so that their values before the update can be read.
        """
        self.build(variables)
        found = self.optimizer.variables
        return [as_tf_variable(v) for v in (found() if callable(found) else found)]

    def learning_rate_variable(self) -> tf.Variable | None:
        """The `tf.Variable` that holds the learning rate, which the next updates read; None
        if it is not one (a schedule, a Python number a v1 optimizer bakes into its step).

        A tf_keras legacy optimizer made with a number makes the variable on its first update:
        None before.
        """
        optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        if self.family == FAMILY_V1:
            rate = getattr(optimizer, "_learning_rate", getattr(optimizer, "_lr", None))
        elif self.family == FAMILY_TF_KERAS_LEGACY:
            rate = optimizer._hyper.get("learning_rate")
        else:
            rate = optimizer._learning_rate
        rate = as_tf_variable(rate)
        return rate if isinstance(rate, tf.Variable) else None

    def learning_rate_is_a_number(self) -> bool:
        """Whether the learning rate is a plain value (a variable, or a number a tf_keras legacy
        optimizer turns into one), not a schedule nor a callable."""
        if self.learning_rate_variable() is not None:
            return True
        if self.family != FAMILY_TF_KERAS_LEGACY:
            return False
        rate = self.optimizer._hyper.get("learning_rate")
        return isinstance(rate, (int, float, np.integer, np.floating)) and not isinstance(
            rate, bool
        )

    def learning_rate(self) -> tf.Tensor | None:
        """The learning rate the next update uses, as a float32 tensor; None if unknown."""
        optimizer = self.optimizer
        if self.family == FAMILY_TF_KERAS_LEGACY:
            return optimizer._decayed_lr(tf.float32)
        if self.family == FAMILY_V1:
            # Each v1 optimizer keeps its own attribute: `_learning_rate`, or `_lr` (Adam).
            rate = getattr(optimizer, "_learning_rate", getattr(optimizer, "_lr", None))
        elif self.family == FAMILY_TF_KERAS:
            # Its `learning_rate` property gives a schedule's value of the previous update.
            rate = optimizer._learning_rate
        else:
            rate = optimizer.learning_rate
        if callable(rate) and not isinstance(rate, (tf.Tensor, tf.Variable)):
            # A schedule (of the iteration counter) or a zero-argument callable (v1).
            rate = rate(self.optimizer.iterations) if self.family != FAMILY_V1 else rate()
        if rate is None:
            return None
        return tf.cast(as_tf_variable(rate), tf.float32)

    @tf.autograph.experimental.do_not_convert
    def apply(
        self,
        grads_and_vars: list[tuple[Any, Any]],
        global_step: Any,
        in_function: bool,
        may_skip: bool = False,
    ) -> tf.Operation:
        """Adds, to the current graph, the ops that apply `grads_and_vars` and count the step.

        Args:
          grads_and_vars: (gradient, variable) pairs, no gradient None.
          global_step: a `tf.Variable` incremented by one when the update is applied, or None.
          in_function: whether the step is built in a `tf.function`, whose automatic control
            dependencies order stateful ops. (A `tf.cond` branch inside a `tf.compat.v1` graph
            is a function graph without them.)
          may_skip: whether the optimizer may skip the update itself (a loss-scale optimizer
            skips the overflowing ones): the global step then counts the update only if the
            optimizer's own counter moved.

        Returns:
          An op that, once run, has applied the update and incremented the global step.
        """
        if self.family != FAMILY_KERAS:
            constrained = [
                v
                for _, v in grads_and_vars
                if as_tf_variable(v) is not v and v.constraint is not None
            ]
            if constrained:
                # A Keras 3 variable's constraint, which only a Keras 3 optimizer applies, is
                # applied once the update is: in this branch of a skip guard, only if it is.
                applied = self.apply(
                    [(g, as_tf_variable(v)) for g, v in grads_and_vars],
                    global_step,
                    in_function,
                    may_skip,
                )
                with tf.control_dependencies([applied]):
                    return tf.group(
                        *[
                            as_tf_variable(v).assign(v.constraint(v), read_value=False)
                            for v in constrained
                        ]
                    )
            # Only Keras 3 optimizers know Keras 3 variables: a current tf_keras optimizer
            # skips, without a word, a variable it cannot key (it has no `_unique_id`).
            pairs = [(g, as_tf_variable(v)) for g, v in grads_and_vars]
        else:
            pairs = list(grads_and_vars)
        factor = self.loss_scale_factor()
        if factor is not None:
            # The optimizer divides them by its loss_scale_factor (see `loss_scale_factor`),
            # with `/`, which IndexedSlices lack: those are handed over dense.
            pairs = [
                (
                    _gradients.scale(
                        tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g, factor
                    ),
                    v,
                )
                for g, v in pairs
            ]

        if self.family == FAMILY_V1 and self.builds_ops_apart:
            return self._apply_apart(pairs, global_step)
        if self.family == FAMILY_V1:
            return self.optimizer.apply_gradients(pairs, global_step=global_step)

        counted = global_step is not None and not self._counts_global_step_itself(global_step)
        # Read before the update (in order: automatic control dependencies in a tf.function,
        # this one in a graph), to tell afterwards whether the optimizer applied it.
        before = self.iterations.read_value() if counted and may_skip else None
        with tf.control_dependencies([before] if before is not None and not in_function else []):
            if in_function:
                # A tf.function's automatic control dependencies run the update before the
                # global step increment and before the function returns.
                self.optimizer.apply_gradients(pairs)
                update = None
            elif self.family == FAMILY_TF_KERAS_LEGACY:
                update = self.optimizer.apply_gradients(pairs)
            else:
                update = self._apply_in_function(pairs)

        if not counted:
            return update if update is not None else tf.no_op()
        with tf.control_dependencies([update] if update is not None else []):
            if before is not None:
                return _global_step.count_once(global_step, self.iterations.read_value() > before)
            return _global_step.count_once(global_step)

    @property
    def builds_ops_apart(self) -> bool:
        """Whether `apply_gradients` also builds ops that run apart from the step.

        A `tf.compat.v1.train.SyncReplicasOptimizer` does: its token queue, its chief's update
        and its readiness check, run by its session hook when the session is made. They cannot
        wait for a step's inputs, nor live in a `tf.cond` branch.
        """
        return isinstance(self.optimizer, tf.compat.v1.train.SyncReplicasOptimizer)

    def _apply_apart(self, pairs: list[tuple[Any, Any]], global_step: Any) -> tf.Operation:
        # What the update waits for here (the loss check, the update ops, the summaries) gates
        # the gradients instead, and the optimizer builds its ops outside it: the gradients are
        # all its update reads from the step.
        gate = tf.no_op(name="gate")  # made under the control dependencies in force
        with tf.control_dependencies(None):
            with tf.control_dependencies([gate]):
                gated = [(_gradients.map_values(g, tf.identity), v) for g, v in pairs]
            return self.optimizer.apply_gradients(gated, global_step=global_step)

    def _apply_in_function(self, pairs: list[tuple[Any, Any]]) -> tf.Operation:
        # Keras 3 and current tf_keras optimizers chain their updates only through a
        # tf.function's automatic control dependencies; in a tf.compat.v1 graph their
        # assignments would float free. A tf.function call is a single op in that graph.
        grads = [g for g, _ in pairs]
        variables = [v for _, v in pairs]

        @tf.function(autograph=False)
        def apply_gradients(grads):
            self.optimizer.apply_gradients(zip(grads, variables))
            return tf.constant(True)

        return apply_gradients(grads).op
