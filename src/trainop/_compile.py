"""Turning a step into the callable returned: the K-steps loop and XLA, with the wrapper
that raises the numerics guard's errors after a compiled call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from trainop import _global_step, numerics, summaries

if TYPE_CHECKING:
    from trainop._config import StepConfig

logger = logging.getLogger("trainop")


def unless_stopped(
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


def steps_in_a_loop(
    step_at: Callable[[tf.Tensor, tuple, dict], tf.Tensor], steps: int
) -> Callable[..., Any]:
    """`step_at(i, args, kwargs)` for i in range(`steps`), in a `tf.while_loop`.

    `step_at` runs the step on the i-th batch of the arguments (see `batch_at`); the losses of
    the steps come back stacked, as float32.
    """

    def run_steps(*args: Any, **kwargs: Any) -> tf.Tensor:
        args, kwargs = tf.nest.map_structure(as_tensor_if_array, (args, kwargs))
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


def marking_call_start(
    step_fn: Callable[..., Any], call_start: tf.Variable, config: StepConfig
) -> Callable[..., Any]:
    """`step_fn`, after setting `call_start` to the step counter (read before any step of the
    call counts: automatic control dependencies keep a variable's read before its write)."""

    def marked(*args: Any, **kwargs: Any) -> Any:
        counter, _ = _global_step.counter(config.global_step, config.adapter.iterations)
        call_start.assign(tf.cast(counter, tf.int64), read_value=False)
        return step_fn(*args, **kwargs)

    return marked


def batch_at(i: tf.Tensor, steps: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
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


def as_tensor_if_array(value: Any) -> Any:
    return tf.convert_to_tensor(value) if isinstance(value, np.ndarray) else value


# What a compiled guarded call returns as its status: every step applied, a step skipped, or
# the guard stopped (the call raises).
_APPLIED, _SKIPPED, _STOPPED = 0, 1, 2


class CompiledTrainOp:
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
        result, status, consecutive, step = self._call(*args, **kwargs)
        status = int(status)  # the one value read to the host on a healthy call
        if status == _STOPPED:
            # A step of -1: there is no counter.
            raise guard.stopped_error(
                int(consecutive), self._step_name, int(step) if int(step) >= 0 else None
            )
        if status == _SKIPPED:
            # What the uncompiled step prints from the device, XLA cannot: said from here.
            logger.warning("trainop: a step not applied %s", guard.last_rejected(self._step_name))
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


def compiled(
    step: Callable[..., Any],
    config: StepConfig,
    jit_compile: bool,
    steps_per_call: int,
    call_start: tf.Variable | None = None,
) -> Callable[..., Any]:
    """`step` (one step on the batch given) as the train op returned: a `tf.function`, running
    `steps_per_call` steps per call in a loop, compiled with XLA if `jit_compile`.

    Under XLA, which compiles Assert away, a step that would raise sets the guard's stop flag
    instead (changing nothing), and the call raises once it returns (`CompiledTrainOp`).

    With `call_start` (an int64 variable), each call first sets it to the step counter, so that
    after a failed call the failing step's place in it is known (`DiagnosedTrainOp`).
    """
    global_step, adapter, guard = config.global_step, config.adapter, config.check_numerics
    step_fn = step
    skips = isinstance(guard, numerics.SkipNonFiniteSteps)
    stop = guard.stop_flag() if jit_compile and skips else None
    if steps_per_call > 1:

        def step_at(i: tf.Tensor, args: tuple, kwargs: dict) -> tf.Tensor:
            step_args, step_kwargs = batch_at(i, steps_per_call, args, kwargs)
            return step(*step_args, **step_kwargs)

        step_fn = steps_in_a_loop(
            step_at if stop is None else unless_stopped(step_at, stop), steps_per_call
        )
    if call_start is not None:
        step_fn = marking_call_start(step_fn, call_start, config)
    if not jit_compile:
        return tf.function(step_fn)
    if stop is None:
        return CompiledTrainOp(tf.function(step_fn, jit_compile=True), None)

    def step_and_counts(*args: Any, **kwargs: Any) -> Any:
        skipped_before = guard.skipped_steps.read_value()
        with guard.stopping_on_device():
            result = step_fn(*args, **kwargs)
        # Read after the step's updates (automatic control dependencies keep the order), and
        # returned: Python reads them from the outputs, not with more ops. The flag is cleared
        # in the call that set it: between calls it is always False.
        stopped = stop.read_value()
        with tf.control_dependencies([stopped]):
            stop.assign(False, read_value=False)
        skipped = guard.skipped_steps.read_value() > skipped_before
        status = tf.where(stopped, _STOPPED, tf.where(skipped, _SKIPPED, _APPLIED))
        counter, _ = _global_step.counter(global_step, adapter.iterations)
        return (
            result,
            status,
            guard.consecutive_skipped_steps.read_value(),
            # The step the stopped step was at (neither it nor the ones after it counted).
            tf.cast(counter, tf.int64) if counter is not None else tf.constant(-1, tf.int64),
        )

    _, step_name = _global_step.counter(global_step, adapter.iterations)
    return CompiledTrainOp(tf.function(step_and_counts, jit_compile=True), guard, step_name)
