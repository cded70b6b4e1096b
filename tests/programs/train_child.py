"""A training program for the loop's process tests: `python train_child.py LOGDIR MAX_STEPS`.

It trains a small Keras regression on seeded, shuffled data with `trainop.train`, saving every
10 steps, and prints `step <global step> <loss>` after every step (flushed), then
`result <global step> <stopped_by>`. `--crash-at N` kills the process (SIGKILL: no chance to
save) right after global step N.
"""

import argparse
import os
import signal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import trainop  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("logdir")
parser.add_argument("max_steps", type=int)
parser.add_argument("--crash-at", type=int, default=None)
args = parser.parse_args()

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 8)).astype(np.float32)
y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(256, 1))).astype(np.float32)
dataset = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(256, seed=1).repeat().batch(16)
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, "relu"), keras.layers.Dense(1)])
optimizer = keras.optimizers.Adam(0.01)
train_op = trainop.create_train_op(
    lambda x, y: tf.reduce_mean((model(x) - y) ** 2),
    optimizer,
    variables_to_train=model.trainable_variables,
)


def report(step, loss):
    print(f"step {step} {loss!r}", flush=True)
    if step == args.crash_at:
        os.kill(os.getpid(), signal.SIGKILL)


result = trainop.train(
    train_op,
    dataset,
    max_steps=args.max_steps,
    logdir=args.logdir,
    checkpoint={"model": model, "optimizer": optimizer},
    save_every_n_steps=10,
    hooks=[trainop.Hook(report)],
    progress=False,
)
print(f"result {result.global_step} {result.stopped_by}", flush=True)
