"""One worker of a two-process MultiWorkerMirroredStrategy: `multiworker_child.py INDEX PORT0
PORT1`. Both train on the same global batches (each gets its half); worker 0 then trains a copy
on one device on the whole batches and prints `<max weight difference> <global steps> <global
steps on one device>`: once as they are, once with `check_numerics="skip"` and a NaN in one
worker's half of the second batch (then also `<steps skipped> <steps skipped on one device>`),
once with a transform clipping the global norm of the gradients, once with that and a
LossScaleOptimizer whose scaled gradients overflow on one worker's half of the second batch.
"""

import json
import os
import sys

index, ports = int(sys.argv[1]), sys.argv[2:4]
os.environ["TF_CONFIG"] = json.dumps(
    {
        "cluster": {"worker": [f"localhost:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    }
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import trainop  # noqa: E402

rng = np.random.default_rng(0)
X = rng.normal(size=(64, 5)).astype(np.float32)
Y = rng.normal(size=(64, 1)).astype(np.float32)
X_BAD = X.copy()
X_BAD[27, 2] = np.nan
X_HUGE = X.copy()
X_HUGE[27] = 1e18  # a finite loss whose scaled gradients overflow float32


def train(strategy, distribute, x=X, optimizer=None, **kwargs):
    with strategy.scope():
        w1 = tf.Variable(np.linspace(-0.5, 0.5, 20, dtype=np.float32).reshape(5, 4))
        w2 = tf.Variable(np.linspace(-1, 1, 4, dtype=np.float32).reshape(4, 1))
        step = tf.Variable(0, dtype=tf.int64)
        train_op = trainop.create_train_op(
            lambda x, y: tf.reduce_mean((tf.nn.relu(x @ w1) @ w2 - y) ** 2),
            optimizer() if optimizer else keras.optimizers.Adam(0.05),
            step,
            variables_to_train=[w1, w2],
            **kwargs,
        )
    data = tf.data.Dataset.from_tensor_slices((x, Y)).batch(16)
    if distribute:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        data = strategy.experimental_distribute_dataset(data.with_options(options))
    for batch_x, batch_y in data:
        train_op(batch_x, batch_y)
    weights = np.concatenate([w1.numpy().ravel(), w2.numpy().ravel()])
    return weights, int(step.numpy())


strategy = tf.distribute.MultiWorkerMirroredStrategy()
one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
weights, steps = train(strategy, distribute=True)
guard = trainop.SkipNonFiniteSteps()
skip_weights, skip_steps = train(strategy, distribute=True, x=X_BAD, check_numerics=guard)
clip = trainop.clip_by_global_norm_fn(0.05)
clip_weights, clip_steps = train(strategy, distribute=True, transform_grads_fn=clip)
# A loss-scale optimizer, which decides on each worker here, with the summed gradients (a
# clip) overflowing: every worker skips, none waits for the others in an all-reduce.
scaling = {
    "optimizer": lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.05)),
    "transform_grads_fn": clip,
    "x": X_HUGE,
}
lso_weights, lso_steps = train(strategy, distribute=True, **scaling)
if index == 0:
    one_weights, one_steps = train(one_device, distribute=False)
    print(float(np.max(np.abs(weights - one_weights))), steps, one_steps, flush=True)
    one_guard = trainop.SkipNonFiniteSteps()
    one_weights, one_steps = train(one_device, False, x=X_BAD, check_numerics=one_guard)
    print(
        float(np.max(np.abs(skip_weights - one_weights))),
        skip_steps,
        one_steps,
        int(guard.skipped_steps),
        int(one_guard.skipped_steps),
        flush=True,
    )
    one_weights, one_steps = train(one_device, distribute=False, transform_grads_fn=clip)
    print(float(np.max(np.abs(clip_weights - one_weights))), clip_steps, one_steps, flush=True)
    one_weights, one_steps = train(one_device, distribute=False, **scaling)
    print(float(np.max(np.abs(lso_weights - one_weights))), lso_steps, one_steps, flush=True)
