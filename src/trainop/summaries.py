"""Gradient and variable summaries for TensorBoard.

Summaries go to the default `tf.summary` writer (`writer.as_default()`) at the given step. In a
`tf.compat.v1` graph with no default writer they are TF1 summaries instead, added to the
`SUMMARIES` collection that TF-Slim's loop and `MonitoredTrainingSession` write out. Otherwise,
with no writer, they write nothing and cost nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from trainop import optimizers

logger = logging.getLogger("trainop")


def _values(tensor: Any) -> Any:
    return tensor.values if isinstance(tensor, tf.IndexedSlices) else tensor


def _resolve_step(step: Any) -> Any:
    if step is not None:
        return step
    step = tf.summary.experimental.get_step()
    if step is not None:
        return step
    # TF-Slim's add_gradients_summaries(grads_and_vars) takes no step: use the global step.
    return tf.compat.v1.train.get_global_step()


def writes_v2_summaries() -> bool:
    """Whether a default `tf.summary` writer is set."""
    # TensorFlow has no public way to ask.
    from tensorflow.python.ops import summary_ops_v2

    return summary_ops_v2.has_default_writer()


def _summary_fns() -> tuple[Any, Any, bool]:
    """The histogram and scalar functions to use, and whether they take a step."""
    if not tf.executing_eagerly() and not tf.inside_function() and not writes_v2_summaries():
        return tf.compat.v1.summary.histogram, tf.compat.v1.summary.scalar, False
    return tf.summary.histogram, tf.summary.scalar, True


def _write(name: str, values: Any, step: Any) -> list[Any]:
    """A histogram of `values` and their norm."""
    histogram, scalar, takes_step = _summary_fns()
    norm = tf.linalg.global_norm([values])
    if not takes_step:
        return [histogram(name, values), scalar(name + "_norm", norm)]
    return [histogram(name, values, step=step), scalar(name + "_norm", norm, step=step)]


def _summary_name(variable: Any) -> str:
    return optimizers.variable_name(variable).replace(":", "_")


def add_gradients_summaries(
    grads_and_vars: Sequence[tuple[Any, Any]], step: Any = None
) -> list[Any]:
    """Writes a histogram and the norm of each gradient.

    The summaries are named `<variable name>_gradient` and `<variable name>_gradient_norm`.
    `IndexedSlices` gradients are summarized by their values; a variable with no gradient is
    logged and skipped.

    Args:
      grads_and_vars: a list of (gradient, variable) pairs.
      step: the step to write at; by default `tf.summary.experimental.get_step()`, else the
        global step.

    Returns:
      The summary results: in a graph, tensors to run; in eager mode, whether each was written.

    Example:
      >>> import tensorflow as tf, trainop
      >>> v = tf.Variable([3.0, 4.0])
      >>> trainop.add_gradients_summaries([(tf.constant([0.6, 0.8]), v)], step=0)
      [False, False]
    """
    step = _resolve_step(step)
    results = []
    with tf.name_scope("summarize_grads"):
        for grad, var in grads_and_vars:
            if grad is None:
                logger.info("Variable %s has no gradient", optimizers.variable_name(var))
                continue
            results += _write(_summary_name(var) + "_gradient", _values(grad), step)
    return [_unwrap_eager(r) for r in results]


def add_variables_summaries(
    grads_and_vars: Sequence[tuple[Any, Any]], step: Any = None
) -> list[Any]:
    """Writes a histogram and the norm of each variable's value.

    The summaries are named `<variable name>_value` and `<variable name>_value_norm`.

    Args:
      grads_and_vars: a list of (gradient, variable) pairs; the gradients are not read.
      step: the step to write at; by default `tf.summary.experimental.get_step()`, else the
        global step.

    Returns:
      The summary results: in a graph, tensors to run; in eager mode, whether each was written.

    Example:
      >>> import tensorflow as tf, trainop
      >>> v = tf.Variable([3.0, 4.0])
      >>> trainop.add_variables_summaries([(None, v)], step=0)
      [False, False]
    """
    step = _resolve_step(step)
    results = []
    with tf.name_scope("summarize_vars"):
        for _, var in grads_and_vars:
            values = tf.convert_to_tensor(optimizers.as_tf_variable(var))
            results += _write(_summary_name(var) + "_value", values, step)
    return [_unwrap_eager(r) for r in results]


def _unwrap_eager(result: Any) -> Any:
    if isinstance(result, bool) or not tf.executing_eagerly():
        return result
    return bool(result)
