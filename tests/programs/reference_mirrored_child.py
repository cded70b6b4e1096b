"""The train op under MirroredStrategy over two logical CPUs, one device and NumPy, per case.

Run as its own process (the logical devices must be set before TensorFlow starts) by
`tests/test_reference.py`, with the cases as a JSON list in the first argument, each a dict:

* `name`: how the case is reported;
* `spelling`: how the loss averages its batch: `keras_loss` (`keras.losses.MeanSquaredError()`),
  `keras_ops_mean` (`keras.ops.mean`), `reduce_mean` (`tf.reduce_mean`) or
  `compute_average_loss` (`tf.nn.compute_average_loss(per_example, global_batch_size=batch)`);
* `batch`, `rows`: the dataset of `rows` examples batched by `batch` without drop_remainder, so
  that a batch of 3 gives the replicas 2 and 1 examples, the last one of 1 gives them 1 and 0;
* `family`: the optimizer family, each with SGD;
* `clip`: None, or a `clip_by_global_norm` bound (the train op then sums the replicas'
  gradients before the transform).

Prints one JSON line per case: its name and, for each of `two` (the train op built in the
strategy's scope, called on `strategy.experimental_distribute_dataset`), `one` (built without a
strategy, called on the whole batches) and `numpy` (plain SGD written out in float64), the
weights, the losses the calls returned and the global step; or `error`, the traceback of what
failed.
"""

import contextlib
import json
import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import trainop  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

LEARNING_RATE = 0.125
FEATURES = 3
# Quarters, exact in float32.
X = (np.arange(8 * FEATURES).reshape(8, FEATURES) % 7 - 3).astype(np.float32) / 4
Y = (np.arange(8).reshape(8, 1) % 5 - 2).astype(np.float32) / 2
W0 = np.array([[0.5], [-0.25], [0.75]], np.float32)
B0 = np.array([0.25], np.float32)

OPTIMIZERS = {
    "v1": lambda: tf.compat.v1.train.GradientDescentOptimizer(LEARNING_RATE),
    "keras": lambda: keras.optimizers.SGD(LEARNING_RATE),
    "tf_keras": lambda: tf_keras.optimizers.SGD(LEARNING_RATE),
    "tf_keras_legacy": lambda: tf_keras.optimizers.legacy.SGD(LEARNING_RATE),
}


def loss_function(spelling, batch, w, b):
    """The mean squared error of the linear model, averaged as `spelling` says."""

    def loss_fn(x, y):
        prediction = tf.matmul(x, w) + b
        if spelling == "keras_loss":
            return keras.losses.MeanSquaredError()(y, prediction)
        if spelling == "keras_ops_mean":
            return keras.ops.mean(keras.ops.square(prediction - y))
        if spelling == "reduce_mean":
            return tf.reduce_mean(tf.square(prediction - y))
        per_example = tf.reduce_sum(tf.square(prediction - y), axis=1)
        return tf.nn.compute_average_loss(per_example, global_batch_size=batch)

    return loss_fn


def run_trainop(case, strategy):
    """Trains on the case's batches; returns the weights, the losses and the global step."""
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        w = tf.Variable(W0, name="w")
        b = tf.Variable(B0, name="b")
        step = tf.Variable(0, dtype=tf.int64, name="global_step")
        train_op = trainop.create_train_op(
            loss_function(case["spelling"], case["batch"], w, b),
            OPTIMIZERS[case["family"]](),
            step,
            variables_to_train=[w, b],
            transform_grads_fn=(
                trainop.clip_by_global_norm_fn(case["clip"]) if case["clip"] else None
            ),
        )
    dataset = tf.data.Dataset.from_tensor_slices((X[: case["rows"]], Y[: case["rows"]]))
    dataset = dataset.batch(case["batch"])
    if strategy is not None:
        dataset = strategy.experimental_distribute_dataset(dataset)
    losses = [float(train_op(x, y)) for x, y in dataset]
    weights = np.concatenate([w.numpy().ravel(), b.numpy().ravel()])
    return {"weights": weights.tolist(), "losses": losses, "step": int(step.numpy())}


def run_numpy(case):
    """Plain SGD on the same batches, in float64, the gradients written out by hand."""
    w, b = W0.astype(np.float64), B0.astype(np.float64)
    losses = []
    xs, ys = X[: case["rows"]].astype(np.float64), Y[: case["rows"]].astype(np.float64)
    for start in range(0, case["rows"], case["batch"]):
        x, y = xs[start : start + case["batch"]], ys[start : start + case["batch"]]
        # compute_average_loss divides by the global batch size it is given; the others by
        # the number of examples (and outputs: one) the batch holds.
        divisor = case["batch"] if case["spelling"] == "compute_average_loss" else len(x)
        error = x @ w + b - y
        losses.append(float(np.sum(error**2) / divisor))
        grad_w, grad_b = 2 * x.T @ error / divisor, 2 * np.sum(error, axis=0) / divisor
        if case["clip"]:
            norm = np.sqrt(np.sum(grad_w**2) + np.sum(grad_b**2))
            scale = min(1.0, case["clip"] / norm)
            grad_w, grad_b = grad_w * scale, grad_b * scale
        w, b = w - LEARNING_RATE * grad_w, b - LEARNING_RATE * grad_b
    weights = np.concatenate([w.ravel(), b.ravel()])
    return {"weights": weights.tolist(), "losses": losses, "step": len(losses)}


def main():
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for case in json.loads(sys.argv[1]):
        result = {"name": case["name"]}
        try:
            result["numpy"] = run_numpy(case)
            result["one"] = run_trainop(case, None)
            result["two"] = run_trainop(case, two)
        except Exception:  # noqa: BLE001 - reported for the parent's test of this case
            result["error"] = traceback.format_exc()[-3000:]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
