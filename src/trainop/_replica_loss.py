"""A replica's loss under a `tf.distribute` strategy, read as one device would compute it.

Under a strategy the train op calls the loss on every replica, on that replica's share of the
global batch, and weights each replica's loss by its share (its number of examples over the
global number): the weighted sum is the mean loss of one device on the whole batch, and its
gradient that device's gradient, however the batch was split (an uneven last batch, a replica
given no example at all). The counts are read where the arguments are when every replica is on
this worker, else summed by one all-reduce.

That weight is right for a loss that is the mean over its replica's examples, as one device
computes it on that share. Some loss helpers scale for the replicas themselves, assuming equal
shares: Keras 3's loss objects and `tf.nn.compute_average_loss` without
`global_batch_size` divide the replica's mean by the number of replicas, and
`tf.nn.scale_regularization_loss` divides its whole value. While the train op calls the loss on
a replica (`one_device_scaling`), each of them computes what it computes on one device instead,
so that it is not scaled twice. `tf.nn.compute_average_loss(..., global_batch_size=G)` is the
replica's part of one device's value already (its sum over the replica's examples, divided by
the fixed `G`): it is counted once, not weighted by the share.

Those helpers are replaced, in their modules, by wrappers that do exactly what they did unless
the current thread is calling a loss for the train op; they are installed when a train op is
first traced on several replicas, for the libraries imported by then.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import tensorflow as tf

from trainop import _gradients

# The share of the replica whose loss the current thread is computing for the train op, if it
# is (MirroredStrategy runs each replica's function in a thread of its own).
_current = threading.local()
_install_lock = threading.Lock()


class Share(NamedTuple):
    """A replica's number of examples (`count`) and the global batch's (`total`), float32.

    A named tuple, so that a compiled function takes it as two tensor arguments.
    """

    count: tf.Tensor
    total: tf.Tensor

    def weight(self, dtype: tf.DType) -> tf.Tensor:
        """count / total: the weight of the replica's mean loss (0 for an empty batch)."""
        return tf.cast(tf.math.divide_no_nan(self.count, self.total), dtype)

    def inverse_weight(self, dtype: tf.DType) -> tf.Tensor:
        """total / count: undoes `weight` (0 for a replica given no example)."""
        return tf.cast(tf.math.divide_no_nan(self.total, self.count), dtype)


def _batch_size(value: Any) -> tf.Tensor | None:
    """The number of rows of a tensor with a batch axis, else None."""
    if isinstance(value, tf.RaggedTensor):
        return value.nrows()
    if isinstance(value, tf.SparseTensor):
        rank = value.shape.rank
        return value.dense_shape[0] if rank is None or rank >= 1 else None
    if isinstance(value, tf.Tensor) and value.shape.rank is not None and value.shape.rank >= 1:
        return tf.shape(value, out_type=tf.int64)[0]
    return None


def _count(replica_args: Any, distributed: Any, num_replicas: int) -> tf.Tensor:
    """A replica's number of examples, float32: the first dimension of the first argument
    with one that was given per replica (the order of `tf.nest.flatten`), else of the first
    argument with one (every replica then has the same arguments, so equal weights).

    Raises:
      ValueError: no argument has a first dimension, so the replica's share cannot be known.
    """
    # A per-replica value may hold a structure, which the replica receives unpacked. (TensorFlow
    # has no public `flatten_up_to`.)
    from tensorflow.python.util import nest

    per_leaf = nest.flatten_up_to(distributed, replica_args)
    flags = tf.nest.flatten(distributed)
    sizes = [
        (flag, size)
        for flag, leaf in zip(flags, per_leaf)
        for size in map(_batch_size, tf.nest.flatten(leaf))
        if size is not None
    ]
    if not sizes:
        raise ValueError(
            "`total_loss` must be given the batch as arguments under a tf.distribute strategy "
            f"of {num_replicas} replicas: the train op weights each replica's loss by its "
            "share of the global batch, the first dimension of the tensors it passes to the "
            "loss, and none of them has one. Pass the batch to the train op, e.g. "
            "`train_op(x, y)` with `x, y` from `strategy.experimental_distribute_dataset`, "
            "rather than reading it inside the loss. "
            f"Received: args and kwargs {replica_args!r:.200}"
        )
    return tf.cast(next((s for flag, s in sizes if flag), sizes[0][1]), tf.float32)


def local_counts(
    strategy: Any, select: Callable[..., Any], arguments: Any, distributed: Any
) -> list[tf.Tensor] | None:
    """Every replica's number of examples, counted in the cross-replica context, or None.

    When every replica's arguments are on this worker (MirroredStrategy), the counts need no
    all-reduce inside the replicas. Elsewhere (several workers), None.

    Args:
      strategy: the strategy.
      select: maps a replica's `(args, kwargs)` to those of its loss, `(args, kwargs)` too.
      arguments: `(args, kwargs)` as the train op received them.
      distributed: as for `replica_share`.
    """
    replicas = strategy.num_replicas_in_sync
    per_replica = [
        v for v in tf.nest.flatten(arguments) if isinstance(v, tf.distribute.DistributedValues)
    ]
    devices = getattr(strategy.extended, "worker_devices", ())
    if len(devices) != replicas or any(
        len(strategy.experimental_local_results(v)) != replicas for v in per_replica
    ):
        return None

    def replica_arguments(replica: int) -> Any:
        return tf.nest.map_structure(
            lambda v: (
                strategy.experimental_local_results(v)[replica]
                if isinstance(v, tf.distribute.DistributedValues)
                else v
            ),
            arguments,
        )

    return [
        _count(select(*replica_arguments(replica)), distributed, replicas)
        for replica in range(replicas)
    ]


def replica_share(
    replica_args: Any, distributed: Any, num_replicas: int, counts: list[tf.Tensor] | None
) -> Share:
    """This replica's share of the global batch, in the replica's context.

    Args:
      replica_args: `(args, kwargs)` as the replica's loss receives them.
      distributed: `(args, kwargs)` as the train op received them, each leaf replaced by
        whether it was a per-replica value (`tf.distribute.DistributedValues`) or one value
        for every replica.
      num_replicas: the strategy's `num_replicas_in_sync`.
      counts: every replica's count (`local_counts`), or None: this replica counts, and one
        all-reduce sums the counts.

    Raises:
      ValueError: no argument has a first dimension, so the replica's share cannot be known.
    """
    context = tf.distribute.get_replica_context()
    replica = tf.get_static_value(context.replica_id_in_sync_group)
    if counts is not None and replica is not None:
        return Share(counts[int(replica)], tf.add_n(counts))
    count = _count(replica_args, distributed, num_replicas)
    return Share(count, context.all_reduce(tf.distribute.ReduceOp.SUM, count))


def weighted(loss: tf.Tensor, share: Share | None) -> tf.Tensor:
    """The replica's loss times its share of the global batch; 0 for a replica given none.

    A 16-bit loss is weighted, and returned, in float32.

    The mean over no example is NaN (or 0, for Keras's), and NaN * 0 is NaN: the empty
    replica's term is selected away instead. Its gradients are sums over no example: zeros.
    """
    if share is None:
        return loss
    if loss.shape.num_elements() == 0:
        # Keras's loss objects return their losses unreduced, an empty vector, for a batch
        # known to be empty when traced (an empty share iterated eagerly has that shape).
        loss = tf.reduce_sum(loss)
    # In float32 at least: a 16-bit weight would be rounded (1/3 in bfloat16 is 0.334), and the
    # replicas' weights would no longer add up to 1.
    loss = tf.cast(loss, _gradients.wide_dtype(loss.dtype))
    return tf.where(share.count > 0, loss * share.weight(loss.dtype), tf.zeros_like(loss))


@contextlib.contextmanager
def one_device_scaling(share: Share | None) -> Iterator[None]:
    """Within: the replica-scaling loss helpers compute what they compute on one device."""
    if share is None:
        yield
        return
    _install()
    outer = getattr(_current, "share", None)
    _current.share = share
    try:
        yield
    finally:
        _current.share = outer


def _share() -> Share | None:
    return getattr(_current, "share", None)


# --- The wrappers ------------------------------------------------------------------------------


def _unscaled(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Keras's `scale_loss_for_distribution` and `unscale_loss_for_distribution`: on one
    device both return the value as it is."""

    def scaling(value: Any) -> Any:
        if _share() is not None:
            return value
        return original(value)

    return scaling


def _compute_average_loss(original: Callable[..., Any]) -> Callable[..., Any]:
    def compute_average_loss(
        per_example_loss: Any, sample_weight: Any = None, global_batch_size: Any = None
    ) -> Any:
        share = _share()
        if share is None:
            return original(per_example_loss, sample_weight, global_batch_size)
        if global_batch_size is None:
            # One device divides by its own batch size: here, the replica's.
            per_example_loss = tf.convert_to_tensor(per_example_loss)
            return original(per_example_loss, sample_weight, tf.shape(per_example_loss)[0])
        # The replica's part of one device's value: the train op's weight is undone.
        value = original(per_example_loss, sample_weight, global_batch_size)
        return value * share.inverse_weight(value.dtype)

    return compute_average_loss


def _scale_regularization_loss(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def scale_regularization_loss(regularization_loss: Any) -> Any:
        if _share() is None:
            return original(regularization_loss)
        # One device's value, which the replicas' weights (summing to 1) count once.
        return tf.reduce_sum(regularization_loss)

    return scale_regularization_loss


def _wrap(owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(owner, name, None)
    if original is None or getattr(original, "_trainop_wraps", None) is not None:
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._trainop_wraps = original
    setattr(owner, name, wrapper)


def _install() -> None:
    """Wraps the replica-scaling helpers of TensorFlow and of the Keras versions imported."""
    with _install_lock:
        for module in (tf.nn, tf.compat.v1.nn, tf.compat.v2.nn):
            _wrap(module, "compute_average_loss", _compute_average_loss)
            _wrap(module, "scale_regularization_loss", _scale_regularization_loss)
        keras_loss = sys.modules.get("keras.src.losses.loss")  # Keras 3
        if keras_loss is not None:
            _wrap(keras_loss, "scale_loss_for_distribution", _unscaled)
            _wrap(keras_loss, "unscale_loss_for_distribution", _unscaled)
        tf_keras_losses = sys.modules.get("tf_keras.src.utils.losses_utils")  # model.compiled_loss
        if tf_keras_losses is not None:
            _wrap(tf_keras_losses, "scale_loss_for_distribution", _unscaled)
