"""One worker of a two-process MultiWorkerMirroredStrategy: `multiworker_child.py INDEX PORT0
PORT1`.

Both workers train on the same global batches, each on its share; worker 0 then trains a copy
on one device on the whole batches, with the same loss and plain SGD (where a wrong gradient
scale shows in the weights), and prints one line per case: `<case> <max weight difference>
<max relative loss difference> <global steps> <global steps on one device>`. The cases:

* `plain`: 4 batches of 16 rows, each worker given 8 of each;
* `uneven_keras_object`: 3 batches (16, 16, 3), the last shared 2+1, with a Keras 3 loss object
  (which divides by the replica count itself);
* `empty_share`: 3 batches (16, 16, 1), the last shared 1+0;
* `skip`: `check_numerics="skip"` and a NaN in one worker's half of the second batch (the line
  ends with `<steps skipped> <steps skipped on one device>`);
* `clip`: a transform clipping the global norm of the gradients, summed across the workers;
* `overflow_clip`: that, with a LossScaleOptimizer whose scaled gradients overflow on one
  worker's half of the second batch.
"""

import json
import os
import sys
import traceback

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
LR = 0.1


def mean_squared_error(y, prediction):
    return tf.reduce_mean((prediction - y) ** 2)


def train(strategy, distribute, x=X, rows=64, optimizer=None, loss=mean_squared_error, **kwargs):
    with strategy.scope():
        w1 = tf.Variable(np.linspace(-0.5, 0.5, 20, dtype=np.float32).reshape(5, 4))
        w2 = tf.Variable(np.linspace(-1, 1, 4, dtype=np.float32).reshape(4, 1))
        step = tf.Variable(0, dtype=tf.int64)
        train_op = trainop.create_train_op(
            lambda x, y: loss(y, tf.nn.relu(x @ w1) @ w2),
            optimizer() if optimizer else keras.optimizers.SGD(LR),
            step,
            variables_to_train=[w1, w2],
            **kwargs,
        )
    data = tf.data.Dataset.from_tensor_slices((x[:rows], Y[:rows])).batch(16)
    if distribute:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        data = strategy.experimental_distribute_dataset(data.with_options(options))
    losses = [float(train_op(batch_x, batch_y)) for batch_x, batch_y in data]
    weights = np.concatenate([w1.numpy().ravel(), w2.numpy().ravel()])
    return weights, np.array(losses), int(step.numpy())


clip = trainop.clip_by_global_norm_fn(0.05)
CASES = {
    "plain": {},
    "uneven_keras_object": {"rows": 35, "loss": keras.losses.MeanSquaredError()},
    "empty_share": {"rows": 33},
    "skip": {"x": X_BAD, "check_numerics": "skip"},
    "clip": {"transform_grads_fn": clip},
    # A loss-scale optimizer, which decides on each worker here, with the summed gradients (a
    # clip) overflowing: every worker skips, none waits for the others in an all-reduce.
    "overflow_clip": {
        "optimizer": lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(LR)),
        "transform_grads_fn": clip,
        "x": X_HUGE,
    },
}


def with_guard(kwargs):
    """`kwargs` with a fresh guard of its own, whose skipped steps can be read."""
    if kwargs.get("check_numerics") == "skip":
        return dict(kwargs, check_numerics=trainop.SkipNonFiniteSteps())
    return kwargs


strategy = tf.distribute.MultiWorkerMirroredStrategy()
one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
runs = {}
for case, kwargs in CASES.items():
    kwargs = with_guard(kwargs)
    try:
        runs[case] = train(strategy, True, **kwargs), kwargs
    except Exception as error:  # on both workers: the step raised for all replicas
        traceback.print_exc()
        runs[case] = error, kwargs
if index == 0:
    for case, (run, kwargs) in runs.items():
        if isinstance(run, Exception):
            print(case, f"error:{type(run).__name__}", flush=True)
            continue
        weights, losses, steps = run
        one_kwargs = with_guard(CASES[case])
        one_weights, one_losses, one_steps = train(one_device, False, **one_kwargs)
        extra = []
        if "check_numerics" in kwargs:
            extra = [int(k["check_numerics"].skipped_steps) for k in (kwargs, one_kwargs)]
        loss_diff = np.inf  # where the losses are NaN at different steps
        if np.array_equal(np.isnan(losses), np.isnan(one_losses)):
            loss_diff = np.nanmax(np.abs(losses - one_losses) / np.maximum(np.abs(one_losses), 1))
        print(
            case,
            float(np.max(np.abs(weights - one_weights))),
            float(loss_diff),
            steps,
            one_steps,
            *extra,
            flush=True,
        )
