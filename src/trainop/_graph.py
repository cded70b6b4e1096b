"""The graph front-end: the step added to the `tf.compat.v1` graph (or `tf.function`)
that holds the loss tensor; the loss tensor that runs it is returned.
"""

from __future__ import annotations

import logging
from typing import Any

import tensorflow as tf

from trainop import (
    _config,
    _core,
    _distribute,
    summaries,
)

logger = logging.getLogger("trainop")


def graph_update_ops(update_ops: Any) -> list[Any]:
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


def create_graph_train_op(
    total_loss: tf.Tensor,
    config: _config.StepConfig,
    update_ops: Any,
    variables_to_train: Any,
    count: tf.Tensor | None = None,
) -> tf.Tensor:
    _distribute.check_in_a_replica(config)
    update_ops = graph_update_ops(update_ops)
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
    variables = _config.check_variables_to_train(variables_to_train, in_graph=True)

    in_function = tf.inside_function()
    grads_and_vars = _core.step_gradients(total_loss, variables, config, set())
    train_op = _core.build_step(
        total_loss,
        grads_and_vars,
        config,
        apply=_distribute.optimizer_applier(config, in_function),
        # In a tf.compat.v1 graph without a v2 writer, TF1 summaries, fetched by the caller.
        v1_summaries=(
            config.summarize_gradients and not in_function and not summaries.writes_v2_summaries()
        ),
        # The default check's error says what was not finite: the graph's Session raises it.
        diagnose_loss=True,
        count=count,
    )
    if not in_function:
        if config.accumulator is not None:
            # Made now, before a Session finalizes the graph: what `trainop.train` runs for a
            # partial window at the end of the data.
            config.accumulator.build_graph_ops()
        # TF-Slim's loop finds the train op here. (Compared by identity: `==` on tensors is
        # element-wise.)
        train_ops = tf.compat.v1.get_collection_ref(tf.compat.v1.GraphKeys.TRAIN_OP)
        if not any(op is train_op for op in train_ops):
            train_ops.append(train_op)
    return train_op
