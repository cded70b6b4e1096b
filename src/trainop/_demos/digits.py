"""A small convolutional classifier on scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import trainop
import trainop.keras
from trainop._demos import common

TARGET_ACCURACY = 0.95
# Images held out for the test accuracy; the other 1,437 are trained on.
TEST_IMAGES = 360


def load(seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The (images, labels) to train on and to test on: float32 images of shape (N, 8, 8, 1)
    in [0, 1], int32 labels; split at random by `seed`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[..., None]
    labels = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:TEST_IMAGES], order[TEST_IMAGES:]
    return (images[train], labels[train]), (images[test], labels[test])


def small_convnet() -> keras.Model:
    """Two convolutions and two dense layers: 10 logits for an (8, 8, 1) image."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def test_accuracy(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of `images` whose most likely class under `model` is their label."""
    logits = model(tf.constant(images), training=False).numpy()
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def run(
    outdir: str,
    *,
    steps: int = 1500,
    seed: int = 0,
    progress: bool | None = None,
    say: Callable[[str], Any] = print,
) -> common.DemoResult:
    """Trains `small_convnet` on the digits with Adam, in batches of 64.

    Args:
      outdir: where the events, checkpoints and plot go; a run finding checkpoints there
        resumes.
      steps: the global step to train to.
      seed: the seed of the split, the weights and the shuffling.
      progress: as for `trainop.train`.
      say: prints a line for the user.

    Returns:
      A `common.DemoResult` with the test accuracy.
    """
    (train_images, train_labels), (test_images, test_labels) = load(seed)
    say(
        f"Training a small convolutional network on scikit-learn's 8x8 digits "
        f"({len(train_images)} training and {len(test_images)} test images) to global step "
        f"{steps}, with trainop.create_train_op and trainop.train. Output: {outdir}"
    )
    resumed = common.latest_checkpoint(outdir)
    if resumed is not None:
        path, step = resumed
        plan = (
            "already trained; evaluating"
            if step >= steps
            else f"training on to global step {steps}"
        )
        say(f"Resuming from {path} at global step {step}: {plan}.")

    keras.utils.set_random_seed(seed)
    model = small_convnet()
    optimizer = keras.optimizers.Adam(1e-3)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    train_op = trainop.create_train_op(
        lambda x, y: cross_entropy(y, model(x, training=True)),
        optimizer,
        global_step=global_step,
        variables_to_train=model.trainable_variables,
        summarize_every_n_steps=10,
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((train_images, train_labels))
        .shuffle(len(train_images), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(64)
    )

    def accuracy() -> float:
        return test_accuracy(model, test_images, test_labels)

    def evaluate(step: int, loss: float | None) -> None:
        tf.summary.scalar("eval/accuracy", accuracy(), step=step)

    result = trainop.train(
        train_op,
        dataset,
        max_steps=steps,
        logdir=outdir,
        checkpoint={"model": model, "optimizer": optimizer},
        save_every_n_steps=500,
        hooks=[trainop.Hook(evaluate, every_n_steps=100)],
        progress=progress,
        global_step=global_step,
    )
    return common.DemoResult(
        "test accuracy",
        accuracy(),
        TARGET_ACCURACY,
        result.global_step,
        outdir,
        common.plot_training(outdir, "eval/accuracy", "test accuracy", percent=True),
        result.stopped_by,
    )


# The batch of the fit demo whose images are made NaN, to show the guard skip it.
BAD_BATCH = 100
BATCHES_PER_EPOCH = 100


def run_fit(
    outdir: str,
    *,
    steps: int = 1500,
    seed: int = 0,
    progress: bool | None = None,
    say: Callable[[str], Any] = print,
) -> common.DemoResult:
    """Trains `small_convnet` with `model.fit` and trainop's step (`trainop.keras.compile`),
    with the images of one batch made NaN, which the skip guard passes over.

    `fit` runs epochs of `BATCHES_PER_EPOCH` batches of 64 to `steps` batches, the test
    accuracy evaluated at the end of each; `trainop.keras.BackupAndRestore` backs up every
    epoch (in `outdir/backup`, kept), so that a rerun resumes.

    Args:
      outdir: where the events (`outdir/train`, with Keras's TensorBoard callback), the backups
        and the plot go.
      steps: the batches to train on (rounded up to whole epochs), the bad one included.
      seed: the seed of the split, the weights and the shuffling.
      progress: Keras's progress bar: True, False, or None for when stdout is a terminal.
      say: prints a line for the user.

    Returns:
      A `common.DemoResult` with the test accuracy; its global step is the optimizer's
      iterations, which the skipped batch did not count.
    """
    (train_images, train_labels), (test_images, test_labels) = load(seed)
    epochs = -(-steps // BATCHES_PER_EPOCH)
    say(
        f"Training a small convolutional network on scikit-learn's 8x8 digits with model.fit "
        f"and trainop.keras.compile(check_numerics='skip'), {epochs} epochs of "
        f"{BATCHES_PER_EPOCH} batches, the images of batch {BAD_BATCH} made NaN. "
        f"Output: {outdir}"
    )
    keras.utils.set_random_seed(seed)
    model = small_convnet()
    guard = trainop.SkipNonFiniteSteps()
    trainop.keras.compile(
        model,
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        check_numerics=guard,
        summarize_every_n_steps=10,
    )

    def poisoned(index: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]) -> tuple:
        images, labels = batch
        nan = tf.fill(tf.shape(images), float("nan"))
        return tf.where(index == BAD_BATCH, nan, images), labels

    dataset = (
        tf.data.Dataset.from_tensor_slices((train_images, train_labels))
        .shuffle(len(train_images), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(64)
        .enumerate()
        .map(poisoned)
    )

    def accuracy() -> float:
        return test_accuracy(model, test_images, test_labels)

    def evaluate(epoch: int, logs: dict) -> None:
        # To the default writer: trainop's, in the TensorBoard callback's train directory.
        tf.summary.scalar("eval/accuracy", accuracy(), step=model.optimizer.iterations)

    backup_dir = os.path.join(outdir, "backup")
    backup = trainop.keras.BackupAndRestore(backup_dir, delete_checkpoint=False)
    if tf.train.latest_checkpoint(backup_dir):
        say(f"Resuming from the backup in {backup_dir}.")
    model.fit(
        dataset,
        epochs=epochs,
        steps_per_epoch=BATCHES_PER_EPOCH,
        callbacks=[
            keras.callbacks.TensorBoard(outdir),
            keras.callbacks.LambdaCallback(on_epoch_end=evaluate),
            backup,
        ],
        # Keras's "auto" draws its bar even into a file: one line an epoch there.
        verbose={True: 1, False: 0, None: 1 if sys.stdout.isatty() else 2}[progress],
    )
    # The guard's counts are backed up with the model: a resumed run counts on.
    reached_bad_batch = epochs * BATCHES_PER_EPOCH > BAD_BATCH
    say(
        f"Batches skipped by the guard: {int(guard.skipped_steps)}"
        f"{' (the NaN batch)' if reached_bad_batch else ''}; the weights are all finite: "
        f"{all(np.isfinite(w).all() for w in model.get_weights())}."
    )
    train_dir = os.path.join(outdir, "train")
    return common.DemoResult(
        "test accuracy",
        accuracy(),
        TARGET_ACCURACY,
        int(model.optimizer.iterations),
        outdir,
        common.plot_training(
            train_dir, "eval/accuracy", "test accuracy", percent=True, directory=outdir
        ),
        backup.stopped_by,
    )
