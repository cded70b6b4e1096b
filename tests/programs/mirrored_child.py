"""MirroredStrategy over two logical CPUs against one device on the whole batch.

Run as its own process (the logical devices must be set before TensorFlow starts). Prints, per
case and optimizer family, `<case> <family> <max weight difference> <max relative loss
difference> <global steps> <global steps on one device>`, then one `refused <argument>` line
per setting a strategy does not take yet, a `loop` line for `trainop.train` stopped and
resumed, `raise` lines for the default check, `sparse` lines for an embedding,
`steps_per_call` lines for 2 steps a call and `inside_run` lines for a train step built inside
`strategy.run` (see there). The weights include a target
variable that an update op moves towards the second layer. The cases:

* `plain`; `clip`, with a transform clipping the global norm; `accumulate`, over 2 calls;
* `skip` and `skip_clip`, with `check_numerics="skip"` and a NaN in the second replica's half
  of the second batch;
* `overflow` and `overflow_clip`, with a LossScaleOptimizer whose scaled gradients overflow on
  that half only (the line ends with both loss scales); `large`, where they are large but
  finite;
* `jit`, `jit_skip` and `jit_clip`, with `jit_compile=True`;
* `summaries`, written to a default writer (the line ends with the number of scalars written
  and their largest relative difference).
"""

import glob
import os
import tempfile

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
X_HUGE[27] = 1e18  # a finite loss (near 1e35) whose scaled gradients overflow float32
X_LARGE = X.copy()
X_LARGE[27] = 3e10  # gradients near 1e20, finite scaled, though their squares are not
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


def train(strategy, make_optimizer, x=X, logdir=None, batches=4, **kwargs):
    variables, loss_fn = model_and_loss(strategy)
    with strategy.scope():
        step = tf.Variable(0, dtype=tf.int64)
        optimizer = make_optimizer()
        # An eager update op: a soft copy of w2, as a target network's.
        target = tf.Variable(tf.zeros_like(variables[1]))
        kwargs.setdefault("update_ops", [lambda: target.assign(0.5 * target + 0.5 * variables[1])])
        train_op = trainop.create_train_op(
            loss_fn, optimizer, step, variables_to_train=variables, **kwargs
        )
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, Y)).batch(16).take(batches)
    )
    writer = tf.summary.create_file_writer(logdir) if logdir else tf.summary.create_noop_writer()
    losses = []
    with writer.as_default():
        try:
            for batch_x, batch_y in data:
                losses.append(float(train_op(batch_x, batch_y)))
        except tf.errors.InvalidArgumentError:
            losses.append(np.nan)  # stops training, as the default check does
    writer.close()
    weights = np.concatenate([v.numpy().ravel() for v in [*variables, target]])
    return weights, np.array(losses), int(step.numpy()), optimizer


def scalar_summaries(logdir):
    """{(tag, step): value} of the scalars written to `logdir`."""
    values = {}
    for path in glob.glob(os.path.join(logdir, "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    key = (value.tag, event.step)
                    assert key not in values, f"{key} written twice"
                    values[key] = float(tf.make_ndarray(value.tensor))
    return values


def compare(case, family, make_optimizer, **kwargs):
    logdirs = [None, None]
    if case == "summaries":
        logdirs = [tempfile.mkdtemp(), tempfile.mkdtemp()]
    weights, losses, steps, optimizer = train(two, make_optimizer, logdir=logdirs[0], **kwargs)
    one_weights, one_losses, one_steps, one_optimizer = train(
        one, make_optimizer, logdir=logdirs[1], **kwargs
    )
    assert np.array_equal(np.isnan(losses), np.isnan(one_losses)), (losses, one_losses)
    extra = []
    if case.startswith(("overflow", "large")):
        extra = [float(o.dynamic_scale.numpy()) for o in (optimizer, one_optimizer)]
    if case == "summaries":
        written, one_written = (scalar_summaries(d) for d in logdirs)
        assert set(written) == set(one_written), (sorted(written), sorted(one_written))
        extra = [
            len(written),
            max(abs(written[k] - one_written[k]) / max(abs(one_written[k]), 1.0) for k in written),
        ]
    report(case, family, (weights, losses, steps), (one_weights, one_losses, one_steps), *extra)


def report(case, name, run, one_device_run, *extra):
    """Prints a case's line: weight and relative loss differences, both global steps, extras."""
    (weights, losses, steps), (one_weights, one_losses, one_steps) = run, one_device_run
    print(
        case,
        name,
        float(np.max(np.abs(weights - one_weights))),
        float(np.nanmax(np.abs(losses - one_losses) / np.maximum(np.abs(one_losses), 1.0))),
        steps,
        one_steps,
        *extra,
        flush=True,
    )


two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
one = tf.distribute.OneDeviceStrategy("/cpu:0")
clip = trainop.clip_by_global_norm_fn(0.05)  # below every step's gradient norm here
for family, make_optimizer in OPTIMIZERS.items():
    compare("plain", family, make_optimizer)
    compare("skip", family, make_optimizer, x=X_NAN, check_numerics="skip")
    compare("clip", family, make_optimizer, transform_grads_fn=clip)
    compare("skip_clip", family, make_optimizer, x=X_NAN, check_numerics="skip",
            transform_grads_fn=clip)  # fmt: skip
    compare("accumulate", family, make_optimizer, accumulation_steps=2)
compare("jit", "keras", OPTIMIZERS["keras"], jit_compile=True)
compare("jit_skip", "keras", OPTIMIZERS["keras"], x=X_NAN, check_numerics="skip", jit_compile=True)
compare("jit_clip", "keras", OPTIMIZERS["keras"], transform_grads_fn=clip, jit_compile=True)
make_scaling = lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.05))  # noqa: E731
compare("overflow", "keras", make_scaling, x=X_HUGE)
compare("overflow_clip", "keras", make_scaling, x=X_HUGE, transform_grads_fn=clip)
compare(
    "large",
    "keras",
    lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1e-22)),
    x=X_LARGE,
)
compare("summaries", "keras", OPTIMIZERS["keras"], summarize_gradients=True)


def train_in_calls_of_2(strategy, x=X, **kwargs):
    """The 4 batches in 2 calls of `steps_per_call=2`, each replica given its share of both."""
    variables, loss_fn = model_and_loss(strategy)
    with strategy.scope():
        step = tf.Variable(0, dtype=tf.int64)
        train_op = trainop.create_train_op(
            loss_fn,
            keras.optimizers.Adam(0.05),
            step,
            variables_to_train=variables,
            steps_per_call=2,
            **kwargs,
        )
    size = 16 // strategy.num_replicas_in_sync

    def shares(data, call):
        def share(context):
            rows = [16 * (2 * call + k) + size * context.replica_id_in_sync_group for k in (0, 1)]
            return tf.constant(np.stack([data[row : row + size] for row in rows]))

        return strategy.experimental_distribute_values_from_function(share)

    losses = np.concatenate([train_op(shares(x, call), shares(Y, call)) for call in (0, 1)])
    return np.concatenate([v.numpy().ravel() for v in variables]), losses, int(step.numpy())


for case, kwargs in [
    ("plain", {}),
    ("skip", {"x": X_NAN, "check_numerics": "skip"}),
    ("clip", {"transform_grads_fn": clip}),
    ("jit", {"jit_compile": True}),
]:
    report("steps_per_call", case, *(train_in_calls_of_2(s, **kwargs) for s in (two, one)))


def train_inside_run(strategy, make_optimizer, x=X, build=trainop.create_train_step, **kwargs):
    """`create_train_step` inside the user's `strategy.run`, as TF-Agents' agents call it."""
    variables, loss_fn = model_and_loss(strategy)
    with strategy.scope():
        step = tf.Variable(0, dtype=tf.int64)
        optimizer = make_optimizer()

    @tf.function
    def train(x, y):
        def on_replica(x, y):
            loss = loss_fn(x, y) / strategy.num_replicas_in_sync
            return build(loss, optimizer, step, variables_to_train=variables, **kwargs)

        return strategy.reduce("SUM", strategy.run(on_replica, (x, y)), axis=None)

    data = tf.data.Dataset.from_tensor_slices((x, Y)).batch(16)
    losses = [float(train(*batch)) for batch in strategy.experimental_distribute_dataset(data)]
    weights = np.concatenate([v.numpy().ravel() for v in variables])
    return weights, np.array(losses), int(step.numpy()), optimizer


for case, make_optimizer, x in [
    ("plain", OPTIMIZERS["keras"], X),
    ("overflow", make_scaling, X_HUGE),
]:
    *run, optimizer = train_inside_run(two, make_optimizer, x=x)
    *one_device_run, one_optimizer = train_inside_run(one, make_optimizer, x=x)
    scales = []
    if case == "overflow":
        scales = [float(o.dynamic_scale.numpy()) for o in (optimizer, one_optimizer)]
    report("inside_run", case, run, one_device_run, *scales)
for name, value in [("check_numerics", "skip"), ("accumulation_steps", 2)]:
    try:
        train_inside_run(two, OPTIMIZERS["keras"], build=trainop.create_train_op, **{name: value})
    except ValueError as error:
        if f"`{name}`: a train op built or called inside strategy.run" in str(error):
            print("refused", f"inside_run_{name}", flush=True)


def train_embedding(strategy, **kwargs):
    """An embedding table, whose gradients are IndexedSlices, trained on 4 batches of ids."""
    ids = np.random.default_rng(1).integers(0, 10, size=(32,)).astype(np.int32)
    with strategy.scope():
        table = tf.Variable(np.linspace(0, 1, 30, dtype=np.float32).reshape(10, 3))
        step = tf.Variable(0, dtype=tf.int64)
        train_op = trainop.create_train_op(
            lambda i: tf.reduce_mean(tf.gather(table, i) ** 2),
            keras.optimizers.SGD(0.5),
            step,
            variables_to_train=[table],
            **kwargs,
        )
    for batch in strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(ids).batch(8)
    ):
        train_op(batch)
    return table.numpy(), int(step.numpy())


for case, kwargs in [
    ("plain", {}),
    ("skip", {"check_numerics": "skip"}),
    ("clip", {"transform_grads_fn": trainop.clip_by_global_norm_fn(0.01)}),
    ("accumulate", {"accumulation_steps": 2}),
]:
    (table, steps), (one_table, one_steps) = (train_embedding(s, **kwargs) for s in (two, one))
    print("sparse", case, float(np.max(np.abs(table - one_table))), steps, one_steps, flush=True)

# The default check raises on the second batch, whose second half has a NaN, and changes
# nothing, the update op's target included: the weights after the first batch.
for family, make_optimizer in OPTIMIZERS.items():
    weights, losses, steps, _ = train(two, make_optimizer, x=X_NAN)
    first_weights, *_ = train(two, make_optimizer, batches=1)
    print("raise", family, float(np.max(np.abs(weights - first_weights))), len(losses), steps)


def train_with_the_loop(logdir, max_steps):
    """`trainop.train` on the distributed dataset, with the skip guard, checkpoints, summaries."""
    variables, loss_fn = model_and_loss(two)
    with two.scope():
        step = tf.Variable(0, dtype=tf.int64)
        optimizer = keras.optimizers.Adam(0.05)
        train_op = trainop.create_train_op(
            loss_fn, optimizer, step, variables_to_train=variables, check_numerics="skip"
        )
    data = two.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((X_NAN, Y)).batch(16).repeat()
    )
    result = trainop.train(
        train_op,
        data,
        max_steps=max_steps,
        logdir=logdir,
        checkpoint={"variables": variables, "optimizer": optimizer},
        global_step=step,
        save_every_n_steps=3,
    )
    return np.concatenate([v.numpy().ravel() for v in variables]), result


# Stopped after 3 steps and resumed to 6 against 6 at once: the same weights and steps.
weights, _ = train_with_the_loop(tempfile.mkdtemp(), 6)
logdir = tempfile.mkdtemp()
train_with_the_loop(logdir, 3)
resumed_weights, result = train_with_the_loop(logdir, 6)
print(
    "loop",
    float(np.max(np.abs(weights - resumed_weights))),
    result.global_step,
    result.resumed_from is not None,
    # Global steps 0 to 5, each written once across the two runs.
    ",".join(str(step) for tag, step in sorted(scalar_summaries(logdir)) if tag == "train/loss"),
    flush=True,
)

variables, loss_fn = model_and_loss(two)
# An eager train op built outside the scope, then called in the user's strategy.run.
skipping = trainop.create_train_op(
    loss_fn, keras.optimizers.SGD(0.1), None, variables_to_train=variables, check_numerics="skip"
)
try:
    two.run(tf.function(skipping), (tf.constant(X[:8]), tf.constant(Y[:8])))
except ValueError as error:
    if "`check_numerics`: a train op built or called inside strategy.run" in str(error):
        print("refused called_inside_run", flush=True)

outside_step = tf.Variable(0, dtype=tf.int64)
for name, value in [
    ("variables_to_train", None),
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
    # An op without an XLA kernel in a replica's loss: XLA compiles that part, and says so.
    train_op = trainop.create_train_op(
        lambda x: loss_fn(tf.numpy_function(np.copy, [x], tf.float32), Y[:8]),
        keras.optimizers.SGD(0.1),
        variables_to_train=variables,
        jit_compile=True,
    )
try:
    train_op(next(iter(two.experimental_distribute_dataset(tf.data.Dataset.from_tensors(X[:16])))))
except ValueError as error:
    if "XLA cannot compile this train step" in str(error):
        print("refused xla", flush=True)

with two.scope():
    try:
        trainop.create_train_step(lambda: loss_fn(X, Y), keras.optimizers.SGD(0.1))
    except ValueError as error:
        if "create_train_step is not supported inside" in str(error):
            print("refused create_train_step", flush=True)


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
