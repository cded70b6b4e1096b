"""Gradient and variable summaries for TensorBoard.

Summaries go to the default `tf.summary` writer (`writer.as_default()`) at the given step. In a
`tf.compat.v1` graph with no default writer, the gradient summaries are TF1 summaries instead,
added to the `SUMMARIES` collection that TF-Slim's loop and `MonitoredTrainingSession` write out.
Otherwise, with no writer, they write nothing and cost nothing.

The train op's own summaries (`add_train_summaries`) sit in one `tf.cond` on the recording
condition, so that the steps that do not write compute none of their norms.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from trainop import _global_step, _gradients, _variables

logger = logging.getLogger("trainop")


def writes_v2_summaries() -> bool:
    """Whether a default `tf.summary` writer is set."""
    # TensorFlow has no public way to ask.
    from tensorflow.python.ops import summary_ops_v2

    return summary_ops_v2.has_default_writer()


def _summary_fns() -> tuple[Any, Any, bool]:
    """The histogram and scalar functions to use, and whether they take a step."""
    if not writes_v2_summaries() and not tf.executing_eagerly() and not tf.inside_function():
        return tf.compat.v1.summary.histogram, tf.compat.v1.summary.scalar, False
    return histogram, tf.summary.scalar, True


HISTOGRAM_BUCKETS = 30


def histogram(name: str, data: Any, step: Any = None) -> Any:
    """Writes the histogram summary that `tf.summary.histogram` writes, counted in one pass.

    TensorBoard's `tf.summary.histogram` counts through a one-hot float64 matrix with a column
    per bucket: for a 784 x 256 gradient that is 48 MB and about 15 ms a write, where one
    segment sum of the bucket indices reads the values once. The summary is the same, bucket by
    bucket (the indices are computed with TensorBoard's arithmetic): 30 rows of
    (left edge, right edge, count), with the same edge cases (no values: zeros; one distinct
    value: all edges at it, all the count in the last bucket). Inf and NaN values are left out
    of the counts, where TensorBoard's edges would turn NaN.

    Args:
      name: the summary's name, prefixed by the current name scope.
      data: a tensor of any shape.
      step: the step to write at; by default `tf.summary.experimental.get_step()`.

    Returns:
      True if written (eager), or a boolean tensor.
    """
    from tensorboard.plugins.histogram import metadata

    data = tf.reshape(tf.stop_gradient(data), [-1])
    with tf.summary.experimental.summary_scope(name, "histogram_summary", values=[data, step]) as (
        tag,
        _,
    ):
        return tf.summary.write(
            tag=tag,
            tensor=lambda: _buckets(data),
            step=step,
            metadata=metadata.create_summary_metadata(display_name=None, description=None),
        )


def _buckets(data: tf.Tensor) -> tf.Tensor:
    """`HISTOGRAM_BUCKETS` rows of (left edge, right edge, count), float64.

    In float64, as TensorBoard counts, so that no float32 range overflows. Inf and NaN values
    are left out: a histogram of a broken gradient shows its finite part, and a step writing
    it does not fail.
    """
    data = tf.cast(data, tf.float64)
    data = tf.boolean_mask(data, tf.math.is_finite(data))
    size = tf.size(data)
    low, high = tf.reduce_min(data), tf.reduce_max(data)
    spread = high > low
    # Bucket i holds floor((x - low) / width) == i, the last one also the maximum: the same
    # arithmetic as TensorBoard's, so that a value on an inner edge lands in the same bucket.
    width = (high - low) / HISTOGRAM_BUCKETS
    index = tf.cast(tf.floor((data - low) / tf.where(spread, width, 1.0)), tf.int32)
    index = tf.clip_by_value(index, 0, HISTOGRAM_BUCKETS - 1)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(data), index, HISTOGRAM_BUCKETS)
    edges = tf.concat([tf.linspace(low, high, HISTOGRAM_BUCKETS + 1)[:-1], [high]], 0)
    spread_buckets = tf.stack([edges[:-1], edges[1:], counts], axis=1)
    one_value = tf.fill([HISTOGRAM_BUCKETS], high)
    one_value_counts = tf.concat(
        [tf.zeros([HISTOGRAM_BUCKETS - 1], tf.float64), [tf.cast(size, tf.float64)]], 0
    )
    one_value_buckets = tf.stack([one_value, one_value, one_value_counts], axis=1)
    buckets = tf.where(spread, spread_buckets, one_value_buckets)
    return tf.where(size > 0, buckets, tf.zeros_like(buckets))


def _write(name: str, values: tf.Tensor, step: Any) -> list[Any]:
    """A histogram of `values` and their norm (of a complex tensor: of its moduli)."""
    histogram, scalar, takes_step = _summary_fns()
    if values.dtype.is_complex:
        values = tf.abs(values)
    norm = _gradients.global_norm([values])
    if not takes_step:
        # TF1's histogram fails the whole run on an inf or NaN ("Nan in summary histogram"):
        # it gets the finite values, as the v2 one counts them; the step's guard decides.
        flat = tf.reshape(values, [-1])
        finite = tf.boolean_mask(flat, tf.math.is_finite(flat))
        return [histogram(name, finite), scalar(name + "_norm", norm)]
    return [histogram(name, values, step=step), scalar(name + "_norm", norm, step=step)]


def _summary_name(variable: Any, tf1: bool) -> str:
    """The name a variable's summaries are tagged with, as the peer a program migrates from.

    TF1 summaries: TF-Slim's `var.op.name` (`dense/kernel`). `tf.summary` (TensorFlow 2):
    TF-Agents' `var.name` with ':' made '_' (`dense/kernel_0`). A Keras 3 variable, whose
    `name` is not unique (`kernel`), is named by its `path` (`dense/kernel`) in both.
    """
    if not tf1 and isinstance(variable, tf.Variable):
        return variable.name.replace(":", "_")
    return _variables.variable_name(variable)


def _scope(name: str, tf1: bool) -> Any:
    # TF-Agents' functions open a scope of their own; TF-Slim's do not.
    return contextlib.nullcontext() if tf1 else tf.name_scope(name)


def _writes_tf1() -> bool:
    return not _summary_fns()[2]


def add_gradients_summaries(
    grads_and_vars: Sequence[tuple[Any, Any]], step: Any = None
) -> list[Any]:
    """Writes a histogram and the norm of each gradient.

    Tagged as the peers tag them, so that a migrating program's dashboards keep working: with
    a default `tf.summary` writer (TensorFlow 2), as TF-Agents' `eager_utils` function,
    `summarize_grads/<var.name with ':' made '_'>_gradient` and `..._gradient_norm`
    (`summarize_grads/dense/kernel_0_gradient`); as TF1 summaries in a `tf.compat.v1` graph
    with no writer, as TF-Slim's, `<var.op.name>_gradient` (`dense/kernel_gradient`), in the
    caller's name scope. A Keras 3 variable is named by its path.

    An `IndexedSlices` gradient is summarized by its rows, the slices of a repeated row summed
    (the gradient they add up to; the peers summarize the slices as they come). Inf and NaN
    values are left out of the histograms (a TF1 histogram would fail the run) and make the
    norm inf or NaN. A variable with no gradient is logged and skipped. The histogram is
    TensorBoard's (30 buckets), counted in one pass; the norm is the L2 norm in float32 (float64
    for a float64 gradient), of the moduli for a complex gradient. With no default writer
    outside a `tf.compat.v1` graph, nothing is written.

    Args:
      grads_and_vars: a list of (gradient, variable) pairs; a gradient is a dense tensor, an
        `IndexedSlices` or None.
      step: the step to write at (an integer, or an integer tensor or variable); by default
        `tf.summary.experimental.get_step()`, else the global step. TF1 summaries take none.

    Returns:
      A list of two summary results per gradient (histogram, norm): in eager mode, whether
      each was written (False without a writer); in a graph or `tf.function`, the ops or
      tensors to run (TF1 summaries: the serialized summaries, also added to the `SUMMARIES`
      collection).

    Raises:
      ValueError: if a default `tf.summary` writer is set and there is no step (no `step`, no
        `tf.summary.experimental.set_step()`, no global step): `tf.summary`'s error.

    Example:
      >>> import tempfile, tensorflow as tf, trainop
      >>> v = tf.Variable([3.0, 4.0])
      >>> trainop.add_gradients_summaries([(tf.constant([0.6, 0.8]), v)], step=0)  # no writer
      [False, False]
      >>> with tf.summary.create_file_writer(tempfile.mkdtemp()).as_default():
      ...     trainop.add_gradients_summaries([(tf.constant([0.6, 0.8]), v)], step=0)
      [True, True]
    """
    step = _global_step.summary_step_or_default(step)
    tf1 = _writes_tf1()
    results = []
    with _scope("summarize_grads", tf1):
        for grad, var in grads_and_vars:
            if grad is None:
                logger.info("Variable %s has no gradient", _variables.variable_name(var))
                continue
            rows = _gradients.values(_gradients.summed_rows(grad))
            results += _write(_summary_name(var, tf1) + "_gradient", rows, step)
    return [_unwrap_eager(r) for r in results]


def add_variables_summaries(
    grads_and_vars: Sequence[tuple[Any, Any]], step: Any = None
) -> list[Any]:
    """Writes a histogram and the norm of each variable's value.

    Tagged as TF-Agents' `eager_utils` function tags them with a default `tf.summary` writer,
    `summarize_vars/<var.name with ':' made '_'>_value` and `..._value_norm`; as TF1 summaries
    (in a `tf.compat.v1` graph with no writer), `<var.op.name>_value` in the caller's name
    scope, as TF-Slim names its gradients'. A Keras 3 variable is named by its path. The
    histogram and norm are as in `add_gradients_summaries`; a variable is summarized whether
    its gradient is None or not.

    Args:
      grads_and_vars: a list of (gradient, variable) pairs, as TF-Agents' function takes
        them; the gradients are not read.
      step: the step to write at (an integer, or an integer tensor or variable); by default
        `tf.summary.experimental.get_step()`, else the global step. TF1 summaries take none.

    Returns:
      A list of two summary results per variable (histogram, norm): in eager mode, whether
      each was written (False without a writer); in a graph or `tf.function`, the ops or
      tensors to run.

    Raises:
      ValueError: if a default `tf.summary` writer is set and there is no step (no `step`, no
        `tf.summary.experimental.set_step()`, no global step): `tf.summary`'s error.

    Example:
      >>> import tensorflow as tf, trainop
      >>> v = tf.Variable([3.0, 4.0])
      >>> trainop.add_variables_summaries([(None, v)], step=0)
      [False, False]
    """
    step = _global_step.summary_step_or_default(step)
    tf1 = _writes_tf1()
    results = []
    with _scope("summarize_vars", tf1):
        for _, var in grads_and_vars:
            values = tf.convert_to_tensor(_variables.as_tf_variable(var))
            results += _write(_summary_name(var, tf1) + "_value", values, step)
    return [_unwrap_eager(r) for r in results]


def _unwrap_eager(result: Any) -> Any:
    if isinstance(result, bool) or not tf.executing_eagerly():
        return result
    return bool(result)


def reentrant_name_scope() -> Callable[[], Any]:
    """Returns a function that re-enters the current name scope, from inside a `tf.cond` too.

    A cond branch opens a name scope of its own ("cond/"), which would prefix summary tags.
    """
    scope = tf.get_current_name_scope()
    # "" is the root scope; "a/" is the absolute scope "a".
    scope = scope + "/" if scope else ""
    return lambda: tf.compat.v1.get_default_graph().name_scope(scope)


def add_train_summaries(
    total_loss: tf.Tensor,
    raw_grads_and_vars: Sequence[tuple[Any, Any]],
    grads_and_vars: Sequence[tuple[Any, Any]],
    step: Any,
    *,
    learning_rate: Callable[[], Any],
    summarize_gradients: bool,
    every_n_steps: int | None,
) -> list[Any]:
    """Adds the train op's summaries to the current graph, written at `step` when recording.

    With a default `tf.summary` writer: `train/loss`, `train/global_gradient_norm` (of the
    gradients before `transform_grads_fn`) and `train/learning_rate`, and with
    `summarize_gradients` a histogram and norm per (transformed) gradient. They are written when
    `tf.summary.should_record_summaries()` holds and, with `every_n_steps`, `step` is a
    multiple of it. Without a writer, nothing.

    Args:
      total_loss: the loss of this step.
      raw_grads_and_vars: the (gradient, variable) pairs as computed.
      grads_and_vars: the pairs after `transform_grads_fn`.
      step: the step to write at (read before the update), or None if there is none.
      learning_rate: returns the optimizer's learning rate, or None.
      summarize_gradients: whether to write a histogram and a norm per gradient.
      every_n_steps: write only at the steps that are multiples of it; None for every step.

    Returns:
      The ops to wait for (empty when nothing is written).

    Raises:
      ValueError: if summaries need a step and there is none.
    """
    if not writes_v2_summaries():
        return []
    if step is None:
        if summarize_gradients or every_n_steps is not None:
            argument = (
                "`summarize_gradients=True`"
                if summarize_gradients
                else f"`summarize_every_n_steps={every_n_steps}`"
            )
            raise ValueError(
                f"{argument} needs a step to write at, and there is none: `global_step` is "
                "None, the optimizer keeps no iteration counter and no "
                "tf.summary.experimental.set_step() was called."
            )
        logger.warning(
            "A default tf.summary writer is set but the train op has no step to write at "
            "(global_step=None and the optimizer keeps no iteration counter): it writes no "
            "summaries."
        )
        return []

    in_outer_scope = reentrant_name_scope()
    step = _global_step.int64_step(step)

    def write() -> tf.Tensor:
        # The condition is decided once, by the cond: the summaries need not decide it again.
        with tf.summary.record_if(True), in_outer_scope(), tf.name_scope("train"):
            written = [
                tf.summary.scalar("loss", total_loss, step=step),
                tf.summary.scalar(
                    "global_gradient_norm",
                    _gradients.global_norm([g for g, _ in raw_grads_and_vars]),
                    step=step,
                ),
            ]
            rate = learning_rate()
            if rate is not None:
                written.append(tf.summary.scalar("learning_rate", rate, step=step))
        if summarize_gradients:
            with tf.summary.record_if(True), in_outer_scope():
                written += add_gradients_summaries(grads_and_vars, step)
        with tf.control_dependencies(written):
            return tf.constant(True)

    # One call op in the branch, not the branch's dozens of ops: on the steps that do not
    # write, a lowered tf.cond still walks every op of the branch not taken.
    write_in_function = tf.function(
        write, autograph=False, experimental_attributes={"_noinline": True}
    )

    should_record = tf.summary.should_record_summaries()
    if every_n_steps is not None:
        step_value = tf.convert_to_tensor(step)
        should_record = tf.logical_and(
            should_record, tf.equal(step_value % tf.cast(every_n_steps, step_value.dtype), 0)
        )
    return [tf.cond(should_record, write_in_function, lambda: tf.constant(False))]
