"""The loop's data: the batches to train on, and their position in a checkpoint."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf


class Batches:
    """The batches to train on, and their position in a checkpoint.

    * A `tf.data.Dataset`: its iterator is saved in the checkpoint (its position, shuffle
      buffers included). One whose state cannot be saved (`from_generator`, `py_function`) is
      counted instead, and a resumed run skips what was consumed.
    * An iterable that can be iterated again (a list, a `Sequence`): counted, and skipped on
      resume.
    * An iterator (a generator): counted, but never skipped: it is where its owner left it, and
      a fresh one cannot be replayed anyway (an environment's experience).
    """

    def __init__(self, dataset: Any):
        self.position = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_position")
        self.consumed = 0
        self._skip_on_resume = False
        self.trackable: Any = self.position
        if dataset is None:
            self._iterator: Iterator[Any] = itertools.repeat(())
            self.trackable = None
        elif isinstance(dataset, tf.data.Dataset):
            self._iterator = iter(dataset)
            if iterator_state_saves(self._iterator):
                self.trackable = self._iterator
            else:
                self._skip_on_resume = True
        else:
            self._iterator = iter(dataset)
            self._skip_on_resume = self._iterator is not dataset

    def resumed(self) -> None:
        """Skips the batches consumed before the checkpoint, where that replays them."""
        if self.trackable is self.position:
            self.consumed = int(self.position.numpy())
            if self._skip_on_resume:
                self._iterator = itertools.islice(self._iterator, self.consumed, None)

    def __next__(self) -> Any:
        batch = next(self._iterator)
        self.consumed += 1
        return batch

    def before_save(self) -> None:
        self.position.assign(self.consumed)


def iterator_state_saves(iterator: Any) -> bool:
    """Whether a `tf.data` iterator's state can go into a checkpoint."""
    try:
        iterator._serialize_to_tensors()  # What a checkpoint write calls.
    except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError):
        return False
    return True


def call_with_batch(train_op: Callable[..., Any], batch: Any) -> Any:
    if isinstance(batch, tuple):
        return train_op(*batch)
    if isinstance(batch, Mapping):
        return train_op(**batch)
    return train_op(batch)


def save_batch(batch: Any, directory: str, index: int) -> str:
    """Saves `batch` as `directory/bad_batch-<index>.npz`, one array per element, named by its
    place in the batch (`0`, `1` for a tuple; its keys for a dict; `batch` for one tensor; a
    nested element's leaves as `name.0`, `name.1`, ...). Returns the file's path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"bad_batch-{index}.npz")
    if isinstance(batch, Mapping):
        elements = [(str(key), value) for key, value in batch.items()]
    elif isinstance(batch, (tuple, list)):
        elements = [(str(i), value) for i, value in enumerate(batch)]
    else:
        elements = [("batch", batch)]
    arrays = {}
    for name, element in elements:
        leaves = tf.nest.flatten(element)
        for j, leaf in enumerate(leaves):
            arrays[name if len(leaves) == 1 else f"{name}.{j}"] = np.asarray(leaf)
    np.savez(path, **arrays)
    return path
