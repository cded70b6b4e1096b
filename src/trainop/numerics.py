"""The numerics guard: what a step with an inf or NaN loss or gradient does.

* `check_numerics=True` (the default): the step raises `tf.errors.InvalidArgumentError` before
  anything changes.
* `check_numerics=False`: no check.
* `check_numerics="skip"` or a `SkipNonFiniteSteps`: the step is skipped. The decision is taken
  on the device, by one `tf.cond` around the whole update, so a healthy step pays for one fused
  finiteness test and nothing is read back to the host.

Under XLA (`jit_compile=True`), which compiles `Assert` and `CheckNumerics` away, a step that
would raise instead sets the guard's stop flag (`SkipNonFiniteSteps.stop_flag`), changing
nothing else; the compiled train op runs no step after it and raises once the call returns.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from trainop._checks import check_count, is_number

# The message that begins the `tf.errors.InvalidArgumentError` of `check_numerics=True` when the
# loss is inf or NaN: TF-Slim's and TF-Agents' own text, so that code matching their error
# keeps working.
LOSS_NOT_FINITE_MESSAGE = "LossTensor is inf or nan"
# The text of the `tf.errors.InvalidArgumentError` that a `SkipNonFiniteSteps` guard raises when
# a bad step comes after `max_consecutive` skipped ones, followed by the step and the count:
# inside TensorFlow's "assertion failed: [...]" in an uncompiled step, at the start of the
# message under `jit_compile=True`.
NOT_FINITE_MESSAGE = "The loss or a gradient is inf or nan"
# `SkipNonFiniteSteps`'s default `max_consecutive`, also what `check_numerics="skip"` uses.
DEFAULT_MAX_CONSECUTIVE_SKIPS = 10


def is_guard_error(error: BaseException) -> bool:
    """Whether `error` is the numerics guard's (the default check's, or a `SkipNonFiniteSteps`
    past its limit, compiled or not), not another `InvalidArgumentError`."""
    return isinstance(error, tf.errors.InvalidArgumentError) and any(
        message in error.message for message in (LOSS_NOT_FINITE_MESSAGE, NOT_FINITE_MESSAGE)
    )


def check_loss_is_finite(total_loss: tf.Tensor) -> tf.Tensor:
    """`total_loss`, once checked: raises on evaluation if it is inf or NaN."""
    return tf.debugging.check_numerics(total_loss, LOSS_NOT_FINITE_MESSAGE)


class SkipNonFiniteSteps(tf.Module):
    """A numerics guard that skips the steps whose loss or gradients hold inf or NaN.

    Pass it as `check_numerics` to `create_train_op` or `create_train_step`. On a step whose loss
    or any gradient (as `transform_grads_fn` returns it) is not finite, the train op changes no
    variable, no optimizer slot or counter and not the global step, writes no summary, runs none
    of the eager update ops (graph update ops run before the loss, as always), and counts the
    step in `skipped_steps`. After `max_consecutive` skipped steps in a row, the next bad
    step raises `tf.errors.InvalidArgumentError` (`NOT_FINITE_MESSAGE`) naming the global step,
    still without changing anything: a rare bad batch is passed over, a model that has gone bad
    stops training. As optax's `apply_if_finite`, which skips and counts in the same way,
    except that past `max_consecutive_errors` optax applies the update and this guard raises.

    With a Keras `LossScaleOptimizer`, the guard checks the loss only: an overflow of the
    scaled gradients is the optimizer's to skip (it lowers its scale), and is not counted here.
    With `accumulation_steps`, a bad call adds nothing to the sums.

    The decision is taken on the device: nothing is read back to the host. The counters are
    variables, read them with `int(guard.skipped_steps)` (eager) or `session.run` (graph). The
    guard is a `tf.Module`: put it in a `tf.train.Checkpoint` to keep its counts across
    restarts. Its variables belong to the graph it was created in (in eager mode, to the eager
    context): create it where the train op is built.

    With `spike_threshold`, the guard also skips a step whose loss or global gradient norm
    (of the gradients before `transform_grads_fn`, as the `global_gradient_norm` summary) is
    more than `spike_threshold` standard deviations above its recent mean: a running mean and
    variance of each, kept on the device (exponentially weighted, `spike_decay`), updated by
    applied steps only, and judged once `spike_warmup_steps` steps were applied. Such a step
    changes nothing, as a non-finite one, and is counted in `spike_skipped_steps` (not in
    `skipped_steps`); it counts in `consecutive_skipped_steps`, so that a lasting change that
    every step exceeds ends in the error rather than in skipping for ever. This is how large
    model trainers survive loss spikes: OLMo-core's `SkipStepOptimizer` (a rolling window of
    the loss and the gradient norm, 6 standard deviations) and ZClip (an exponentially
    weighted mean and variance of the gradient norm). With a loss-scale optimizer, only the
    loss is judged. A spike that holds inf or NaN is counted as not finite. A quantity that has
    not varied is taken to vary by at least a thousandth of its mean, so that a loss stuck at a
    value does not make every rise a spike. Use one such guard per train op: two train ops
    sharing it would mix their losses' statistics. Not under a
    `tf.distribute` strategy with several replicas (a `ValueError` when the train op is
    built). Costs one global norm a step (the summaries' norm, if they are on, is another).

    Args:
      max_consecutive: how many steps in a row may be skipped before a bad step raises; None
        for no limit. With 0 no step is skipped: the first bad step raises, which extends the
        default check (the loss only) to the gradients.
      name: the module's name.
      spike_threshold: a positive number of standard deviations, or None (the default) to
        skip non-finite steps only.
      spike_warmup_steps: how many applied steps the statistics see before a step is judged
        (an integer >= 2).
      spike_decay: the weight of the past in the running statistics, in (0, 1): 0.99 averages
        over about the last 100 applied steps. Until 1 / (1 - decay) steps were applied, the
        statistics are the plain mean and variance of all of them.
      check_updates: also check the trained variables after the update: an optimizer can make
        inf or NaN weights out of finite gradients (a float16 Adam whose epsilon underflows, a
        huge learning rate). Such an update is undone (the trained variables, the optimizer's
        slots and counters and the global step written back, and what the forward pass
        wrote) and the step counted in `skipped_steps`, said as the others; the eager
        `update_ops`, `fit`'s metrics and the summaries of that step, which ran with the
        update, are not undone. It reads every variable the update writes (weights, slots,
        counters) before it and the floating ones after it: with an embedding, a copy of the
        table and its slots every step. Eager mode
        (`tf.function`, compiled by XLA or not) on one device, without `accumulation_steps`;
        elsewhere a `ValueError` when the train op is built or first called.

    Attributes:
      max_consecutive: the limit given, as an `int`, or None.
      skipped_steps: an int64 `tf.Variable`: how many steps were skipped in all for a loss or
        gradient that was not finite.
      consecutive_skipped_steps: an int64 `tf.Variable`: how many steps in a row were skipped
        up to the last step (spikes included); an applied step resets it to 0.
      spike_skipped_steps: an int64 `tf.Variable`: how many finite steps were skipped as
        spikes; None without `spike_threshold`.
      spike_statistics: a float32 `tf.Variable` of shape [2, 2]: the running mean (column 0)
        and variance (column 1) of the loss (row 0) and of the global gradient norm (row 1);
        None without `spike_threshold`.
      check_updates: as given.
      checks_gradients: whether the gradients are checked besides the loss (True).

    Raises:
      ValueError: if `max_consecutive` is not an integer >= 0 or None, `spike_threshold` not a
        positive finite number or None, `spike_warmup_steps` not an integer >= 2, or
        `spike_decay` not in (0, 1).
      TypeError: if `check_updates` is not a bool.

    Example:
      >>> import keras, numpy as np, tensorflow as tf, trainop
      >>> w = tf.Variable(1.0)
      >>> guard = trainop.SkipNonFiniteSteps(max_consecutive=3)
      >>> train_op = trainop.create_train_op(lambda x: (w * x) ** 2, keras.optimizers.SGD(0.1),
      ...                                    global_step=None, check_numerics=guard)
      >>> _ = train_op(tf.constant(np.nan))  # skipped
      >>> float(w.numpy()), int(guard.skipped_steps)
      (1.0, 1)
      >>> _ = train_op(tf.constant(1.0))  # applied: w - 0.1 * 2 * w
      >>> round(float(w.numpy()), 6), int(guard.consecutive_skipped_steps)
      (0.8, 0)
    """

    def __init__(
        self,
        max_consecutive: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
        name: str | None = None,
        *,
        spike_threshold: float | None = None,
        spike_warmup_steps: int = 100,
        spike_decay: float = 0.99,
        check_updates: bool = False,
    ):
        super().__init__(name=name)
        check_count("max_consecutive", max_consecutive, minimum=0, allow_none=True)
        self.max_consecutive = None if max_consecutive is None else int(max_consecutive)
        _check_spike_settings(spike_threshold, spike_warmup_steps, spike_decay)
        self.spike_threshold = None if spike_threshold is None else float(spike_threshold)
        self.spike_warmup_steps = int(spike_warmup_steps)
        self.spike_decay = float(spike_decay)
        if not isinstance(check_updates, (bool, np.bool_)):
            raise TypeError(
                f"`check_updates` must be True or False. Received: check_updates={check_updates!r}"
            )
        self.check_updates = bool(check_updates)
        with tf.init_scope():
            self._graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
            self.skipped_steps = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="skipped_steps"
            )
            self.consecutive_skipped_steps = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="consecutive_skipped_steps"
            )
            self.spike_skipped_steps = None
            self.spike_statistics = None
            self._observed_steps = None
            if self.spike_threshold is not None:
                self.spike_skipped_steps = tf.Variable(
                    0, dtype=tf.int64, trainable=False, name="spike_skipped_steps"
                )
                self.spike_statistics = tf.Variable(
                    tf.zeros([2, 2]), trainable=False, name="spike_statistics"
                )
                self._observed_steps = tf.Variable(
                    0, dtype=tf.int64, trainable=False, name="observed_steps"
                )
        # A plain object: what it holds is neither checkpointed nor in `self.variables`.
        self._stop = _StopFlag()

    # Whether the gradients are checked, besides the loss.
    checks_gradients = True

    def __repr__(self) -> str:
        """`SkipNonFiniteSteps(max_consecutive=N)`, as it would be created."""
        spikes = ""
        if self.spike_threshold is not None:
            spikes = (
                f", spike_threshold={self.spike_threshold}, "
                f"spike_warmup_steps={self.spike_warmup_steps}, spike_decay={self.spike_decay}"
            )
        if self.check_updates:
            spikes += ", check_updates=True"
        return f"SkipNonFiniteSteps(max_consecutive={self.max_consecutive}{spikes})"

    # The methods below are what the train op calls to build its guarded step; a user needs
    # none of them.

    def check_context(self) -> None:
        """Checks that the train op being built can update the guard's counters.

        Raises:
          ValueError: if the train op is being built in another graph (or, for a guard made
            in a graph, in eager mode) than the one the guard's variables belong to.
        """
        with tf.init_scope():
            graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
        if graph is not self._graph:
            raise ValueError(
                "`check_numerics` is a SkipNonFiniteSteps created in another "
                f"{'graph' if self._graph is not None else 'context (eager)'} than the train "
                "op: its counters could not be updated. Create it where the train op is built."
            )

    def update_if_finite(
        self,
        finite: tf.Tensor,
        update: Callable[[], Sequence[Any]],
        step: Any,
        step_name: str = "global step",
        undo: Callable[[], Sequence[Any]] | None = None,
        report: Callable[[], list[Any]] | None = None,
        spike_values: Callable[[], tuple[tf.Tensor, tf.Tensor]] | None = None,
        updated: Callable[[], tuple[list[Any], list[Any]]] | None = None,
    ) -> tf.Tensor:
        """Adds to the current graph: `update()` if `finite` (and not a spike), else the skip.

        The skip counts the step in `skipped_steps` (a spike: in `spike_skipped_steps`) and
        `consecutive_skipped_steps`, or, after `max_consecutive` skipped steps in a row, fails
        an assertion (inside `stopping_on_device`, sets the stop flag instead, counting
        nothing). One `tf.cond`: the decision is taken on the device. An applied step resets
        `consecutive_skipped_steps` to 0 (and adds its values to `spike_statistics`). With
        `check_updates`, an applied step whose updated variables are not all finite is undone
        (every variable of `updated` written back) and then skipped as a bad one.

        Args:
          finite: a boolean scalar, from `all_finite`.
          update: adds the ops of the update to the current graph; returns the ops and tensors
            to wait for.
          step: the step named in the error; or None.
          step_name: what `step` is, for the error.
          undo: adds, to a bad step's branch, the ops that undo what the step wrote before the
            decision (what the forward pass assigned); returns them. They run before the
            branch counts, raises or stops.
          report: returns, built in a bad step's branch only, what says what was not finite
            (strings and tensors, see `_core.NotFiniteReport`): printed to stderr by the
            device for every bad step, and added to the error of the one that raises.
          spike_values: returns the step's loss and global gradient norm (a scalar 0 when the
            norm is not judged); required with `spike_threshold`, ignored without.
          updated: returns the `tf.Variable`s the update trains, and the others it may write
            (the optimizer's slots and counters, the global step); required with
            `check_updates`, ignored without.

        Returns:
          A boolean tensor, whether the step passed the checks made before the update (an
          update undone by `check_updates` is not told by it), that, once evaluated, has run
          the chosen branch.

        Raises:
          tf.errors.InvalidArgumentError: when the tensor is evaluated (not when it is built),
            for a bad step after `max_consecutive` skipped ones in a row.
          ValueError: with `spike_threshold` or `check_updates`, if `spike_values` or
            `updated` is None (the caller cannot give them: under several replicas).
        """
        # Read and computed here, outside the tf.cond: its branches only assign.
        spike, deviations, statistics = self._spike_verdict(finite, spike_values)
        accepted = finite if spike is None else tf.logical_and(finite, tf.logical_not(spike))
        written, before = self._values_before_update(updated)
        stop = self._stop.variable if self._stop.in_use() else None

        def recorded() -> list[Any]:
            # Under XLA: what a rejected step held, kept for the host to say.
            values = getattr(report, "values", None)
            return self._stop.record(*values(), step) if values is not None else []

        def undone() -> list[Any]:
            return list(undo()) if undo is not None else []

        def kept() -> tf.Tensor:
            done = [self.consecutive_skipped_steps.assign(0, read_value=False)]
            if spike is not None:
                done += [
                    self.spike_statistics.assign(statistics, read_value=False),
                    self._observed_steps.assign_add(1, read_value=False),
                ]
            with tf.control_dependencies(done):
                return tf.constant(True)

        def rejected(
            describe: Callable[[], list[Any]], spiked: tf.Tensor | None, say: bool = True
        ) -> tf.Tensor:
            """The bad step's end: said (unless `say` is False: said already), then counted, or
            the error, or the stop flag (which says nothing: XLA compiles no print, nor
            `describe`'s string ops)."""
            if stop is not None:
                return self._skip_or_stop(stop, spiked, recorded)
            described = describe()
            checks = [_said(step_name, step, described)] if described and say else []
            if self.max_consecutive is not None:
                with tf.control_dependencies(checks):
                    assertion = tf.debugging.Assert(
                        self.consecutive_skipped_steps < self.max_consecutive,
                        [
                            f"{self._what()} at {step_name}",
                            step if step is not None else "(none)",
                            f"after {self.max_consecutive} skipped steps in a row: stopping "
                            f"({self!r})",
                            *described,
                        ],
                    )
                checks.append(assertion)
            with tf.control_dependencies(checks):
                counted = self._count(spiked)
            with tf.control_dependencies(counted):
                return tf.constant(False)

        def apply() -> tf.Tensor:
            with tf.control_dependencies(update()):
                if not self.check_updates:
                    return kept()
                # The weights, and the slots (a float16 Adam's second moment can overflow while
                # the weights stay finite, and poison every later step).
                values = [v.read_value() for v in written]

            def update_undone() -> tf.Tensor:
                restored = [v.assign(b, read_value=False) for v, b in zip(written, before)]
                with tf.control_dependencies(restored + undone()):
                    return rejected(lambda: _update_report(written, values), None)

            return tf.cond(_all_values_finite(values), kept, update_undone)

        def skip() -> tf.Tensor:
            with tf.control_dependencies(undone()):
                if spike is None or stop is not None:
                    return rejected(report or list, spike)
                described = report() if report is not None else []
                spiked = [
                    "a spike: standard deviations above the recent mean: loss",
                    deviations[0],
                    "gradient norm",
                    deviations[1],
                ]
                # Said as a spike or as not finite; the error at the limit holds both.
                said = tf.cond(
                    spike,
                    lambda: _said(step_name, step, spiked),
                    lambda: _said(step_name, step, described),
                )
                with tf.control_dependencies([said]):
                    return rejected(lambda: [*described, "-", *spiked], spike, say=False)

        return tf.cond(accepted, apply, skip)

    def _spike_verdict(
        self, finite: tf.Tensor, spike_values: Callable[[], tuple[tf.Tensor, tf.Tensor]] | None
    ) -> tuple[tf.Tensor | None, tf.Tensor | None, tf.Tensor | None]:
        """Whether the step is a finite spike (None without `spike_threshold`), how many
        standard deviations its loss and norm are above their means, and the statistics an
        applied step keeps (see `_judge`).

        Raises:
          ValueError: with `spike_threshold`, if `spike_values` is None (several replicas).
        """
        if self.spike_threshold is None:
            return None, None, None
        if spike_values is None:
            raise ValueError(
                "SkipNonFiniteSteps(spike_threshold=...) cannot judge spikes under a "
                "tf.distribute strategy with several replicas: use it on one device, or "
                "leave spike_threshold out."
            )
        spike, deviations, statistics = self._judge(*spike_values())
        # A spike holding inf or NaN is counted as not finite.
        return tf.logical_and(finite, spike), deviations, statistics

    def _values_before_update(
        self, updated: Callable[[], tuple[list[Any], list[Any]]] | None
    ) -> tuple[list[Any], list[tf.Tensor]]:
        """With `check_updates`: every variable the update writes (`updated`'s two lists) and
        its value now, read before the tf.cond that updates them (its inputs); else two empty
        lists.

        Raises:
          ValueError: with `check_updates`, if `updated` is None (several replicas,
            accumulation) or the step is built in a `tf.compat.v1` graph.
        """
        if not self.check_updates:
            return [], []
        if updated is None:
            raise ValueError(
                "SkipNonFiniteSteps(check_updates=True) cannot undo an update under a "
                "tf.distribute strategy with several replicas, nor with accumulation_steps: "
                "use it on one device without accumulation, or leave check_updates out."
            )
        if not tf.inside_function():
            raise ValueError(
                "SkipNonFiniteSteps(check_updates=True) works in eager mode (the train op is a "
                "tf.function), not in a tf.compat.v1 graph: there its tf.cond is run as Switch "
                "and Merge ops, which cannot order the values read back after the update. "
                "Leave check_updates out in graph mode."
            )
        trained, others = updated()
        written = trained + others
        return written, [v.read_value() for v in written]

    def _count(self, spike: tf.Tensor | None) -> list[Any]:
        """The ops that count a skipped step: as a spike where `spike` holds."""
        if spike is None:
            skipped = [self.skipped_steps.assign_add(1, read_value=False)]
        else:
            as_spike = tf.cast(spike, tf.int64)
            skipped = [
                self.skipped_steps.assign_add(1 - as_spike, read_value=False),
                self.spike_skipped_steps.assign_add(as_spike, read_value=False),
            ]
        return [*skipped, self.consecutive_skipped_steps.assign_add(1, read_value=False)]

    def _judge(self, loss: tf.Tensor, norm: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Whether `loss` or `norm` is a spike, how many standard deviations each is above its
        running mean, and the statistics once they are added (for an applied step to keep).

        The exponentially weighted mean and variance (West's incremental form), with the
        weight of the past `min(spike_decay, n / (n + 1))` after n values: the plain mean and
        variance while n < 1 / (1 - spike_decay).
        """
        values = tf.stack([tf.cast(loss, tf.float32), tf.cast(norm, tf.float32)])
        statistics = self.spike_statistics.read_value()
        observed = self._observed_steps.read_value()
        mean, variance = statistics[:, 0], statistics[:, 1]
        # At least a thousandth of the mean: a quantity that has not varied (a loss stuck at a
        # value) does not make every rise a spike.
        deviation = tf.maximum(tf.sqrt(variance), 1e-3 * tf.abs(mean))
        deviations = tf.math.divide_no_nan(values - mean, deviation)
        spike = tf.logical_and(
            observed >= self.spike_warmup_steps,
            tf.reduce_any(values > mean + self.spike_threshold * deviation),
        )
        n = tf.cast(observed, tf.float32)
        past = tf.minimum(self.spike_decay, n / (n + 1.0))
        delta = values - mean
        updated = tf.stack(
            [mean + (1.0 - past) * delta, past * (variance + (1.0 - past) * tf.square(delta))],
            axis=1,
        )
        # An applied step whose norm overflowed float32 (finite gradients, an inf sum of
        # squares) leaves the statistics as they were.
        updated = tf.where(tf.reduce_all(tf.math.is_finite(updated)), updated, statistics)
        return spike, deviations, updated

    # --- Under XLA, which compiles `Assert` away ------------------------------------------------

    def stop_flag(self) -> tf.Variable:
        """The boolean variable that a bad step sets, under `stopping_on_device`, where it would
        raise; made on the first call, in the guard's context.

        It is not part of the guard's state: not checkpointed (a checkpoint of the guard holds
        its counters and spike statistics, as before the flag existed), not in `variables`. The
        compiled train op that reads it clears it in the same call (see
        `_compile.CompiledTrainOp`).

        Returns:
          The scalar `tf.bool` variable, the same one at every call.
        """
        if self._stop.variable is None:
            with tf.init_scope():
                self._stop.variable = tf.Variable(
                    False, trainable=False, name="stop", dtype=tf.bool
                )
        return self._stop.variable

    @contextlib.contextmanager
    def stopping_on_device(self) -> Iterator[tf.Variable]:
        """While entered, the steps traced with this guard stop instead of raising.

        A bad step that would raise (see `update_if_finite`) counts nothing and sets
        `stop_flag()`, and nothing else. For a caller that compiles the step with XLA, which
        compiles `Assert` away, and raises after the call (`stopped_error`). Only the steps
        traced on this thread while it is entered are affected.

        Yields:
          The stop flag, `stop_flag()`.
        """
        flag = self.stop_flag()
        self._stop.depth.value = self._stop.in_use() + 1
        try:
            yield flag
        finally:
            self._stop.depth.value -= 1

    def _stops_now(self) -> tf.Tensor | bool:
        """Whether a bad step now stops training (uncompiled: raises), as a boolean tensor or a
        Python bool."""
        if self.max_consecutive is None:
            return False
        return self.consecutive_skipped_steps >= self.max_consecutive

    def _skip_or_stop(
        self,
        stop: tf.Variable,
        spike: tf.Tensor | None = None,
        recorded: Callable[[], list[Any]] | None = None,
    ) -> tf.Tensor:
        """The bad step's branch under `stopping_on_device`: counted as skipped (as a spike
        where `spike` holds), or, where the uncompiled step raises, not counted and `stop`
        set; either way after `recorded()` kept what the step held, for the host."""

        def count() -> tf.Tensor:
            with tf.control_dependencies(self._count(spike) + (recorded() if recorded else [])):
                return tf.constant(False)

        def stop_here() -> tf.Tensor:
            marked = [stop.assign(True, read_value=False)] + (recorded() if recorded else [])
            with tf.control_dependencies(marked):
                return tf.constant(False)

        stops = self._stops_now()
        if isinstance(stops, bool):
            return stop_here() if stops else count()
        return tf.cond(stops, stop_here, count)

    def stopped_error(
        self, consecutive: int, step_name: str, step: int | None
    ) -> tf.errors.InvalidArgumentError:
        """The error that a compiled train op raises when `stop_flag()` was set.

        What the uncompiled step's assertion says, with `consecutive_skipped_steps` and the
        step it read after the call (which the stopped step and those after it did not change).

        Args:
          consecutive: `consecutive_skipped_steps`, read after the call.
          step_name: what `step` counts ("global step" or "optimizer step"), for the message.
          step: the step the stopped step was at, or None if there is no counter.

        Returns:
          The `tf.errors.InvalidArgumentError` to raise (not raised here), its message
          beginning with `NOT_FINITE_MESSAGE` and ending with "(a compiled step)".
        """
        at = f" at {step_name} {step}" if step is not None else ""
        described = self._stop.described(step_name).split(" - ", 1)[-1]
        return tf.errors.InvalidArgumentError(
            None,
            None,
            f"{self._what()}{at} after {consecutive} skipped steps in a row: stopping "
            f"({self!r}) (a compiled step)" + (f" - {described}" if described else ""),
        )

    def _what(self) -> str:
        """What the error at the limit says was wrong: `NOT_FINITE_MESSAGE`, and what else the
        guard skips."""
        also = ["spiked"] if self.spike_threshold is not None else []
        if self.check_updates:
            also.append("the update made a variable so")
        return NOT_FINITE_MESSAGE + (f", or {' or '.join(also)}," if also else "")

    def last_rejected(self, step_name: str = "global step") -> str:
        """Under XLA, what the last rejected step held, in words (see `stopping_on_device`):
        `at global step N - loss L - gradients not finite: K of M (names)`; "" if none was
        recorded."""
        return self._stop.described(step_name)


def _said(step_name: str, step: Any, described: list[Any]) -> tf.Tensor:
    """Prints, from the device to stderr, that a step was not applied and why."""
    printed = tf.print(
        f"trainop: a step not applied at {step_name}",
        step if step is not None else "(none)",
        "-",
        *described,
        output_stream=sys.stderr,
    )
    with tf.control_dependencies([printed]):
        return tf.constant(True)


def _floating(values: list[tf.Tensor]) -> list[tf.Tensor]:
    return [v for v in values if v.dtype.is_floating or v.dtype.is_complex]


def _all_values_finite(values: list[tf.Tensor]) -> tf.Tensor:
    """Whether every element of the floating (or complex) `values` is finite."""
    from trainop import _gradients

    return _gradients.all_finite(_floating(values))


def _update_report(variables: list[Any], values: list[tf.Tensor]) -> list[Any]:
    """What an update that made values inf or NaN says: how many of the floating variables
    it wrote (weights and slots), and the first 5."""
    from trainop import _gradients, _variables

    floating = [
        (v, x) for v, x in zip(variables, values) if x.dtype.is_floating or x.dtype.is_complex
    ]
    names = tf.constant([_variables.variable_name(v) for v, _ in floating])
    finite = tf.stack([_gradients.every_element_finite(x) for _, x in floating])
    bad = tf.boolean_mask(names, tf.logical_not(finite))
    return [
        "the update made variables not finite (from finite gradients):",
        tf.size(bad),
        f"of {len(floating)}",
        bad[:5],
    ]


def _check_spike_settings(threshold: Any, warmup_steps: Any, decay: Any) -> None:
    if threshold is not None and not (is_number(threshold) and 0 < threshold < np.inf):
        raise ValueError(
            "`spike_threshold` must be a positive number of standard deviations, or None. "
            f"Received: spike_threshold={threshold!r}"
        )
    check_count("spike_warmup_steps", warmup_steps, minimum=2)
    if not (is_number(decay) and 0 < decay < 1):
        raise ValueError(f"`spike_decay` must be in (0, 1). Received: spike_decay={decay!r}")


class _StopFlag:
    """Where a guard keeps its stop flag, and whether a step being traced on this thread uses
    it (inside `stopping_on_device`)."""

    def __init__(self):
        self.variable: tf.Variable | None = None
        # How many `stopping_on_device` are entered, on each thread.
        self.depth = threading.local()
        # The last rejected step's loss and per-gradient finiteness, by gradient count, and
        # the names of those gradients' variables (see `record`).
        self._recorded: dict[int, tuple[tf.Variable, tf.Variable]] = {}
        self._names: list[str] = []
        self._step: tf.Variable | None = None

    def in_use(self) -> int:
        return getattr(self.depth, "value", 0)

    def record(self, loss: tf.Tensor, finite: tf.Tensor, names: list[str], step: Any) -> list[Any]:
        """The ops that keep a rejected step's loss, gradient finiteness and step in variables
        (a step compiled by XLA can neither print nor hold strings), for `described`."""
        with tf.init_scope():
            if len(names) not in self._recorded:
                self._recorded[len(names)] = (
                    tf.Variable(0.0, trainable=False, name="rejected_loss"),
                    tf.Variable(tf.ones([len(names)], tf.bool), trainable=False, name="finite"),
                )
            if self._step is None:
                self._step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="step")
        self._names = list(names)
        loss_variable, finite_variable = self._recorded[len(names)]
        kept = [
            loss_variable.assign(loss, read_value=False),
            finite_variable.assign(finite, read_value=False),
        ]
        if step is not None:
            kept.append(self._step.assign(tf.cast(step, tf.int64), read_value=False))
        return kept

    def described(self, step_name: str = "global step") -> str:
        """What the last recorded rejected step held, in words (read from the device)."""
        if len(self._names) not in self._recorded:
            return ""
        loss_variable, finite_variable = self._recorded[len(self._names)]
        bad = [n for n, ok in zip(self._names, finite_variable.numpy()) if not ok]
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        step = int(self._step.numpy()) if self._step is not None else -1
        return (
            (f"at {step_name} {step} - " if step >= 0 else "")
            + f"loss {float(loss_variable.numpy()):.6g} - gradients not finite: {len(bad)} of "
            f"{len(self._names)}" + (f" ({shown})" if bad else "")
        )


class LossCheckUnderXLA(SkipNonFiniteSteps):
    """`check_numerics=True` under `jit_compile=True`, where XLA compiles `CheckNumerics` and
    `Assert` away: a step whose loss is not finite sets the stop flag on the device, changing
    nothing else, and the compiled train op raises after the call (see
    `_compile.CompiledTrainOp`)."""

    checks_gradients = False

    def __init__(self):
        super().__init__(max_consecutive=None, name="loss_check")

    def _stops_now(self) -> bool:
        return True

    def stopped_error(
        self, consecutive: int, step_name: str, step: int | None
    ) -> tf.errors.InvalidArgumentError:
        at = f" at {step_name} {step}" if step is not None else ""
        return tf.errors.InvalidArgumentError(
            None, None, f"{LOSS_NOT_FINITE_MESSAGE}{at} (a compiled step)"
        )


# The guard that `check_numerics="skip"` stands for, one per optimizer and program (graph or
# eager context): a user's tf.function that builds the train op traces it more than once, and
# must find the same counters each time.
_SKIP_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# The guards of the train ops built with each optimizer, held weakly both ways: what a roll back
# (`trainop.Rollback`, given the optimizer) resets.
_GUARDS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _register(optimizer: Any, guard: SkipNonFiniteSteps) -> None:
    with contextlib.suppress(TypeError):  # an optimizer that cannot be weakly referenced
        _GUARDS_OF.setdefault(optimizer, weakref.WeakSet()).add(guard)


def guards_of(optimizer: Any) -> list[SkipNonFiniteSteps]:
    """The skip guards of the train ops built with `optimizer` that are still alive."""
    try:
        return list(_GUARDS_OF.get(optimizer, ()))
    except TypeError:
        return []


def gradients_count(guard: SkipNonFiniteSteps, loss_scaled: bool) -> bool:
    """Whether a step's gradients count in the guard's verdict besides its loss: not with a
    loss-scale optimizer, whose overflowing steps are its own to skip (it cannot tell an
    overflow from a NaN), and not for a guard that checks the loss only."""
    return guard.checks_gradients and not loss_scaled


def resolve_check_numerics(check_numerics: Any, optimizer: Any) -> bool | SkipNonFiniteSteps:
    """Returns True, False or the guard that `check_numerics` stands for.

    Raises:
      TypeError: if `check_numerics` is none of True, False, a string or a SkipNonFiniteSteps.
      ValueError: if it is a string other than 'skip'.
    """
    if isinstance(check_numerics, SkipNonFiniteSteps):
        _register(optimizer, check_numerics)
        return check_numerics
    # np.bool_ too: a flag read from a config array.
    if isinstance(check_numerics, (bool, np.bool_)):
        return bool(check_numerics)
    if isinstance(check_numerics, str):
        if check_numerics != "skip":
            raise ValueError(
                "`check_numerics` must be True, False, 'skip' or a trainop.SkipNonFiniteSteps. "
                f"Received: check_numerics={check_numerics!r}"
            )
        with tf.init_scope():
            context = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
        try:
            guards = _SKIP_GUARDS.setdefault(optimizer, {})
        except TypeError:  # an optimizer that cannot be weakly referenced
            guards = {}
        if context not in guards:
            guards[context] = SkipNonFiniteSteps()
        _register(optimizer, guards[context])
        return guards[context]
    raise TypeError(
        "`check_numerics` must be True, False, 'skip' or a trainop.SkipNonFiniteSteps. "
        f"Received: check_numerics={check_numerics!r}"
    )
