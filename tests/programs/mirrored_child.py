"""MirroredStrategy over two logical CPUs against one device on the whole batch.

Run as its own process (the logical devices must be set before TensorFlow starts). Prints, per
case and optimizer family, `<case> <family> <max weight difference> <max relative loss
difference> <global steps> <global steps on one device>`, then one `refused <argument>` line
per setting a strategy does not take yet. The cases: `plain`; `skip`, with
`check_numerics="skip"` and a NaN in the second replica's half of the second batch;
`overflow`, with a LossScaleOptimizer whose scaled gradients overflow on that half only (its
line ends with both loss scales).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import trainop  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
rng = np.random.default_rng(0)
X = rng.normal(size=(64, 5)).astype(np.float32)
Y = rng.normal(size=(64, 1)).astype(np.float32)
# Batches of 16 rows: the second replica has rows 24 to 31 of the second batch.
X_NAN = X.copy()
X_NAN[27, 2] = np.nan
X_HUGE = X.copy()
X_HUGE[27] = 1e12  # a finite loss whose gradients, scaled by 2**15, overflow float32
OPTIMIZERS = {
    "keras": lambda: keras.optimizers.Adam(0.05),
    "v1": lambda: tf.compat.v1.train.AdamOptimizer(0.05),
    "tf_keras": lambda: tf_keras.optimizers.Adam(0.05),
    "tf_keras_legacy": lambda: tf_keras.optimizers.legacy.Adam(0.05),
}


def model_and_loss(strategy):
    with strategy.scope():
        w1 = tf.Variable(np.linspace(-0.5, 0.5, 20, dtype=np.float32).reshape(5, 4), name="w1")
        w2 = tf.Variable(np.linspace(-1, 1, 4, dtype=np.float32).reshape(4, 1), name="w2")

    def loss_fn(x, y):
        return tf.reduce_mean((tf.nn.relu(x @ w1) @ w2 - y) ** 2)

    return [w1, w2], loss_fn


def train(strategy, make_optimizer, x=X, check_numerics=True):
    variables, loss_fn = model_and_loss(strategy)
    with strategy.scope():
        step = tf.Variable(0, dtype=tf.int64)
        optimizer = make_optimizer()
        train_op = trainop.create_train_op(
            loss_fn,
            optimizer,
            step,
            variables_to_train=variables,
            check_numerics=check_numerics,
        )
    data = tf.data.Dataset.from_tensor_slices((x, Y)).batch(16)
    losses = [float(train_op(x, y)) for x, y in strategy.experimental_distribute_dataset(data)]
    weights = np.concatenate([v.numpy().ravel() for v in variables])
    return weights, np.array(losses), int(step.numpy()), optimizer


def compare(case, family, make_optimizer, **kwargs):
    weights, losses, steps, optimizer = train(two, make_optimizer, **kwargs)
    one_weights, one_losses, one_steps, one_optimizer = train(one, make_optimizer, **kwargs)
    assert np.array_equal(np.isnan(losses), np.isnan(one_losses)), (losses, one_losses)
    scales = [
        float(o.dynamic_scale.numpy()) for o in (optimizer, one_optimizer) if case == "overflow"
    ]
    print(
        case,
        family,
        float(np.max(np.abs(weights - one_weights))),
        float(np.nanmax(np.abs(losses - one_losses) / np.maximum(np.abs(one_losses), 1.0))),
        steps,
        one_steps,
        *scales,
        flush=True,
    )


two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
one = tf.distribute.OneDeviceStrategy("/cpu:0")
for family, make_optimizer in OPTIMIZERS.items():
    compare("plain", family, make_optimizer)
    compare("skip", family, make_optimizer, x=X_NAN, check_numerics="skip")
compare(
    "overflow",
    "keras",
    lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.05)),
    x=X_HUGE,
)

variables, loss_fn = model_and_loss(two)
outside_step = tf.Variable(0, dtype=tf.int64)
for name, value in [
    ("accumulation_steps", 2),
    ("jit_compile", True),
    ("steps_per_call", 2),
    ("variables_to_train", None),
    ("transform_grads_fn", trainop.clip_by_global_norm_fn(1.0)),
    ("global_step", outside_step),
]:
    with two.scope():
        kwargs = {"variables_to_train": variables, name: value}
        kwargs.setdefault("optimizer", keras.optimizers.SGD(0.1))
        try:
            trainop.create_train_op(loss_fn, **kwargs)
        except ValueError as error:
            if f"`{name}" in str(error):
                print("refused", name, flush=True)

with two.scope():
    step = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(
        loss_fn, keras.optimizers.SGD(0.1), step, variables_to_train=variables
    )
    try:
        trainop.create_train_step(lambda: loss_fn(X, Y), keras.optimizers.SGD(0.1))
    except ValueError as error:
        if "create_train_step is not supported inside" in str(error):
            print("refused create_train_step", flush=True)
writer = tf.summary.create_file_writer(os.path.join(os.environ.get("TMPDIR", "/tmp"), "mirrored"))
with writer.as_default():
    try:
        train_op(tf.constant(X[:16]), tf.constant(Y[:16]))
    except ValueError as error:
        if "Summaries are not supported under a tf.distribute strategy" in str(error):
            print("refused summaries", flush=True)


@tf.function
def build_with_a_loss_tensor():
    x, y = tf.constant(X[:4]), tf.constant(Y[:4])
    return trainop.create_train_op(
        loss_fn(x, y), keras.optimizers.SGD(0.1), variables_to_train=variables
    )


with two.scope():
    try:
        build_with_a_loss_tensor()
    except ValueError as error:
        if "with a loss Tensor inside a tf.distribute strategy's scope" in str(error):
            print("refused graph", flush=True)
