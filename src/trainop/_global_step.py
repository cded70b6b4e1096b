"""Which step: the global step a train op counts in, and the step its summaries are written at.

`USE_GLOBAL_STEP` is TF-Agents' and TF-Slim's sentinel for "the program's global step"
(`tf.compat.v1.train.get_or_create_global_step()`); a step is counted once per update, also
when every replica of a strategy runs it.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from trainop._variables import as_tf_variable

# The same sentinel value as TF-Agents' and TF-Slim's `_USE_GLOBAL_STEP`, so that programs
# passing theirs (or a literal 0) keep their meaning.
USE_GLOBAL_STEP = 0


def program_global_step() -> tf.Variable:
    """`tf.compat.v1.train.get_or_create_global_step()`, also from inside a `tf.function`.

    The global step belongs to the program: to the graph a function is traced from (whose
    collection holds it), not to the function's own graph.
    """
    graph = tf.compat.v1.get_default_graph()
    while getattr(graph, "outer_graph", None) is not None:
        graph = graph.outer_graph
    global_step = tf.compat.v1.train.get_global_step(graph)
    if global_step is None:
        with tf.init_scope():
            global_step = tf.compat.v1.train.get_or_create_global_step()
        if tf.compat.v1.train.get_global_step(graph) is None:
            graph.add_to_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP, global_step)
    return global_step


def resolve(global_step: Any) -> tf.Variable | None:
    """Returns the `tf.Variable` to count steps in, or None for no counting."""
    if global_step is None:
        return None
    if is_use_global_step(global_step):
        global_step = program_global_step()
    return integer_variable(global_step, "an integer tf.Variable, trainop.USE_GLOBAL_STEP or None")


def is_use_global_step(value: Any) -> bool:
    """Whether `value` is `USE_GLOBAL_STEP` (0, but not False)."""
    return isinstance(value, int) and not isinstance(value, bool) and value == USE_GLOBAL_STEP


def integer_variable(global_step: Any, expected: str) -> tf.Variable:
    """`global_step` as an integer `tf.Variable`; a TypeError saying what was `expected` else."""
    variable = as_tf_variable(global_step)
    if not isinstance(variable, tf.Variable) or not variable.dtype.is_integer:
        raise TypeError(
            f"`global_step` must be {expected}. Received: global_step={global_step!r:.200}"
        )
    return variable


def counted_by(global_step: Any, graph: Any) -> tf.Variable:
    """The variable a train op counts in, for the loop to read: `global_step`, or the graph's
    global step for `USE_GLOBAL_STEP` (None: the default graph's)."""
    if is_use_global_step(global_step):
        variable = tf.compat.v1.train.get_global_step(graph)
        if variable is None:
            raise ValueError(
                "`global_step` is trainop.USE_GLOBAL_STEP but there is no global step: build "
                "the train op with its default global_step, or pass the variable it counts in."
            )
        return variable
    return integer_variable(
        global_step,
        "the integer variable the train op counts steps in, or trainop.USE_GLOBAL_STEP",
    )


def counter(global_step: Any, iterations: Any) -> tuple[Any, str]:
    """The variable a train op's steps are counted in, for the guard's errors: the global step,
    else the optimizer's `iterations`; and what to call it ('global step', 'optimizer step')."""
    if global_step is not None:
        return global_step, "global step"
    return iterations, "optimizer step"


def summary_step(global_step: Any, iterations: Any) -> Any:
    """The step a train op's summaries are written at: the global step, else the optimizer's
    counter `iterations`, else `tf.summary.experimental.get_step()`; None if there is none."""
    if global_step is not None:
        return global_step
    if iterations is not None:
        return iterations
    return tf.summary.experimental.get_step()


def summary_step_or_default(step: Any) -> Any:
    """`step` as a summary function takes it; None: `tf.summary.experimental.get_step()`, else
    the global step (TF-Slim's `add_gradients_summaries` takes no step)."""
    if step is None:
        step = tf.summary.experimental.get_step()
    if step is None:
        # TF-Slim's add_gradients_summaries(grads_and_vars) takes no step: use the global step.
        step = tf.compat.v1.train.get_global_step()
    return int64_step(step)


def int64_step(step: Any) -> Any:
    """`step` as `tf.summary` takes it: a tensor or variable of another integer type (an int32
    step counter, as TF-Agents' examples make theirs) is cast to int64."""
    dtype = getattr(step, "dtype", None)
    if isinstance(dtype, tf.DType) and dtype != tf.int64:
        return tf.cast(step, tf.int64)
    return step


def count_once(counter: tf.Variable, applied: tf.Tensor | None = None) -> Any:
    """`counter += 1` (if `applied`, a boolean tensor the same on every replica), once per step
    also when every replica of a strategy runs the step."""

    def increment(applied: tf.Tensor | None) -> Any:
        if applied is None:
            return counter.assign_add(1, read_value=False)
        return counter.assign_add(tf.cast(applied, counter.dtype), read_value=False)

    context = tf.distribute.get_replica_context()
    if tf.distribute.has_strategy() and context is not None:
        # In a replica: the increment happens once, in the cross-replica context, with the
        # first replica's `applied`.
        if applied is None:
            return context.merge_call(lambda _: increment(None))
        return context.merge_call(
            lambda strategy, applied: increment(strategy.experimental_local_results(applied)[0]),
            args=(applied,),
        )
    return increment(applied)
