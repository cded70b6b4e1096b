"""`model.fit` with trainop's step under MirroredStrategy over two logical CPUs, against the same
`fit` on one device.

Run as its own process (the logical devices must be set before TensorFlow starts):
`fit_mirrored_child.py CASE` trains a small Keras 3 model with `trainop.keras.compile` twice, in
the strategy's scope and without a strategy, on the same batches of 8 (4 a replica), and prints
one line, `<case> <max state difference> <max loss difference> <iterations> <iterations on one
device> <skipped steps> <skipped on one device>`, where the state is the weights and the
optimizer's variables and the losses are those of `History`. Cases:

* `default`: the default check, no bad batch.
* `skip`: `check_numerics="skip"`, a NaN target in the second replica's half of batch 2.
* `clip_accumulate`: also a transform clipping the global norm, and 2 batches per update
  (the gradients are summed over the replicas first).
* `loss_scale`: a LossScaleOptimizer, `check_numerics="skip"`.
* `raise`: the default check on that NaN batch: the line's losses are 0 and the skipped steps
  say whether each `fit` raised InvalidArgumentError (1) or not (0).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import trainop  # noqa: E402
import trainop.keras  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 5)).astype(np.float32)
Y = RNG.normal(size=(32, 1)).astype(np.float32)
BATCH = 8


def settings(case):
    guard = {"default": True, "raise": True}.get(case, "skip")
    optimizer = keras.optimizers.Adam(0.01)
    if case == "loss_scale":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    extra = {}
    if case == "clip_accumulate":
        extra = dict(transform_grads_fn=trainop.clip_by_global_norm_fn(0.5), accumulation_steps=2)
    return dict(optimizer=optimizer, loss="mse", check_numerics=guard, **extra)


def train(case, strategy):
    y = Y.copy()
    if case in ("skip", "clip_accumulate", "loss_scale", "raise"):
        # The second replica's half of batch 2.
        y[2 * BATCH + BATCH // 2 : 3 * BATCH] = np.nan
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
        )
        trainop.keras.compile(model, **settings(case))
    raised = 0
    losses = [0.0]
    try:
        history = model.fit(X, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        losses = history.history["loss"]
    except tf.errors.InvalidArgumentError:
        raised = 1
    state = [np.asarray(v.numpy(), np.float64) for v in model.weights + model.optimizer.variables]
    guard = model._trainop_fit_step._guard
    skipped = int(guard.skipped_steps.numpy()) if guard is not None else raised
    return state, np.asarray(losses), int(model.optimizer.iterations.numpy()), skipped


def main(case):
    mirrored = train(case, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    one = train(case, tf.distribute.get_strategy())
    state_difference = max(float(np.max(np.abs(a - b))) for a, b in zip(mirrored[0], one[0]))
    loss_difference = float(np.max(np.abs(mirrored[1] - one[1])))
    print(case, state_difference, loss_difference, mirrored[2], one[2], mirrored[3], one[3])


if __name__ == "__main__":
    main(sys.argv[1])
