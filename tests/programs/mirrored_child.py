"""MirroredStrategy over two logical CPUs against one device on the whole batch.

Run as its own process (the logical devices must be set before TensorFlow starts):
`mirrored_child.py [GROUP ...]` runs the named groups of cases (all by default) and prints one
line per case, `<group> <case> <values...>`, which tests/test_distribute.py checks as a test of
its own. The groups:

* `step`: `<case>/<family>` for each optimizer family (plain SGD, where a wrong gradient scale
  shows in the weights), against the train op on one device: `<max weight difference> <max
  relative loss difference> <global steps> <global steps on one device>`, then extras. The
  weights include a target variable that an update op moves towards the second layer. Cases:
  `plain`; `clip`, with a transform clipping the global norm; `accumulate`, over 2 calls;
  `skip` and `skip_clip`, with `check_numerics="skip"` and a NaN in the second replica's half
  of the second batch; `overflow` and `overflow_clip`, with a LossScaleOptimizer whose scaled
  gradients overflow on that half only (the line ends with both loss scales); `large`, where
  they are large but finite; `jit`, `jit_skip` and `jit_clip`, with `jit_compile=True`;
  `summaries`, written to a default writer (the line ends with the number of scalars written
  and their largest relative difference).
* `loss`: each way of writing the loss (see `SPELLINGS`) on batches that two replicas share
  unevenly (2+1, 3+2 and 1+0 examples), against plain SGD on one device in float64 on each
  whole batch, with no strategy and no trainop: `<max weight difference> <max relative
  loss difference> <global steps> <batches>`; `*_summaries` cases end with the largest
  relative difference of the `train/loss` and `train/global_gradient_norm` summaries.
* `steps_per_call`: 2 steps a call, each replica given its share of both batches.
* `inside_run`: a train step built inside the user's `strategy.run` (see there).
* `sparse`: an embedding, whose gradients are IndexedSlices.
* `raise`: the default check on a NaN: `<max weight difference from the weights after one
  batch> <calls> <global steps>`.
* `loop`: `trainop.train` stopped and resumed.
* `refused`: `<argument> yes` for each setting refused with its own error message (`no` and
  the message on stderr otherwise).
"""

import contextlib
import glob
import os
import sys
import tempfile
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import trainop  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
one = tf.distribute.OneDeviceStrategy("/cpu:0")

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
    "keras": lambda: keras.optimizers.SGD(0.1),
    "v1": lambda: tf.compat.v1.train.GradientDescentOptimizer(0.1),
    "tf_keras": lambda: tf_keras.optimizers.SGD(0.1),
    "tf_keras_legacy": lambda: tf_keras.optimizers.legacy.SGD(0.1),
}
clip = trainop.clip_by_global_norm_fn(0.05)  # below every step's gradient norm here


def report(group, case, *values):
    print(group, case, *values, flush=True)


@contextlib.contextmanager
def case_of(group, case):
    """Within: a case that raises is reported as `<group> <case> error:<type>` (its traceback
    on stderr), and the next case runs."""
    try:
        yield
    except Exception as error:
        traceback.print_exc()
        report(group, case, f"error:{type(error).__name__}")


def refused(name, attempt, message):
    """Reports whether `attempt()` raised a ValueError (or TypeError) containing `message`."""
    try:
        attempt()
    except (ValueError, TypeError) as error:
        if message in str(error):
            report("refused", name, "yes")
            return
        print(f"refused {name}: {error}", file=sys.stderr)
    report("refused", name, "no")


def model_and_loss(strategy):
    with strategy.scope():
        w1 = tf.Variable(np.linspace(-0.5, 0.5, 20, dtype=np.float32).reshape(5, 4), name="w1")
        w2 = tf.Variable(np.linspace(-1, 1, 4, dtype=np.float32).reshape(4, 1), name="w2")

    def loss_fn(x, y):
        return tf.reduce_mean((tf.nn.relu(x @ w1) @ w2 - y) ** 2)

    return [w1, w2], loss_fn


def train(strategy, make_optimizer, x=X, logdir=None, batches=4, make_average=None, **kwargs):
    variables, loss_fn = model_and_loss(strategy)
    if make_average is not None:
        kwargs["moving_average"] = make_average()  # each run its own
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
    kept = [*variables, target]
    if kwargs.get("moving_average") is not None:
        kept += [kwargs["moving_average"].average(v) for v in variables]
    if kwargs.get("step_metrics"):
        kept += [tf.cast(v, tf.float32) for v in train_op.step_metrics.result().values()]
    weights = np.concatenate([v.numpy().ravel() for v in kept])
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


def differences(run, one_device_run):
    """The largest weight difference and relative loss difference of two runs."""
    (weights, losses), (one_weights, one_losses) = run, one_device_run
    return (
        float(np.max(np.abs(weights - one_weights))),
        float(np.nanmax(np.abs(losses - one_losses) / np.maximum(np.abs(one_losses), 1.0))),
    )


def compare(case, family, make_optimizer, **kwargs):
    with case_of("step", f"{case}/{family}"):
        _compare(case, family, make_optimizer, **kwargs)


def _compare(case, family, make_optimizer, **kwargs):
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
    found = differences((weights, losses), (one_weights, one_losses))
    report("step", f"{case}/{family}", *found, steps, one_steps, *extra)


def step_cases():
    for family, make_optimizer in OPTIMIZERS.items():
        compare("plain", family, make_optimizer)
        compare("skip", family, make_optimizer, x=X_NAN, check_numerics="skip")
        compare("clip", family, make_optimizer, transform_grads_fn=clip)
        compare("skip_clip", family, make_optimizer, x=X_NAN, check_numerics="skip",
                transform_grads_fn=clip)  # fmt: skip
        compare("accumulate", family, make_optimizer, accumulation_steps=2)
        compare("lr_multipliers", family, make_optimizer, learning_rate_multipliers={"w1": 0.25})
        compare("ema", family, make_optimizer, x=X_NAN, check_numerics="skip",
                make_average=lambda: trainop.ExponentialMovingAverage(0.5))  # fmt: skip
        compare("metrics", family, make_optimizer, x=X_NAN, check_numerics="skip",
                transform_grads_fn=clip, step_metrics=True)  # fmt: skip
    keras_sgd = OPTIMIZERS["keras"]
    compare("jit", "keras", keras_sgd, jit_compile=True)
    compare("jit_skip", "keras", keras_sgd, x=X_NAN, check_numerics="skip", jit_compile=True)
    compare("jit_clip", "keras", keras_sgd, transform_grads_fn=clip, jit_compile=True)
    compare("overflow", "keras", make_scaling, x=X_HUGE)
    compare("overflow_clip", "keras", make_scaling, x=X_HUGE, transform_grads_fn=clip)
    compare(
        "large",
        "keras",
        lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1e-22)),
        x=X_LARGE,
    )
    compare("summaries", "keras", keras_sgd, summarize_gradients=True)
    # The optimizer's own clipping, below every step's gradient norm here: of the sum of the
    # replicas' gradients, as on one device, not of each replica's share.
    for family, clipping in OPTIMIZER_CLIPPING.items():
        for option, make_optimizer in clipping.items():
            compare(f"optimizer_{option}", family, make_optimizer)


OPTIMIZER_CLIPPING = {
    "keras": {
        "global_clipnorm": lambda: keras.optimizers.SGD(0.1, global_clipnorm=0.05),
        "clipnorm": lambda: keras.optimizers.SGD(0.1, clipnorm=0.02),
        "clipvalue": lambda: keras.optimizers.SGD(0.1, clipvalue=0.01),
    },
    "tf_keras": {"global_clipnorm": lambda: tf_keras.optimizers.SGD(0.1, global_clipnorm=0.05)},
    "tf_keras_legacy": {
        "global_clipnorm": lambda: tf_keras.optimizers.legacy.SGD(0.1, global_clipnorm=0.05)
    },
}


def make_scaling():
    return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))


# --- The loss, however written, on uneven shares -----------------------------------------------

SIZES = [3, 5, 1]  # two replicas get 2+1, 3+2 and 1+0 examples
XC = rng.normal(size=(19, 5))
YC = rng.integers(0, 3, size=19).astype(np.int32)
LOSS_LR = 0.5
GLOBAL_BATCH_SIZE = 8  # a user's constant, which the short batches do not reach


def per_example(y, logits):
    return tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)


keras_crossentropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
keras_squared_error = keras.losses.MeanSquaredError()
tf_keras_per_example = tf_keras.losses.SparseCategoricalCrossentropy(
    from_logits=True, reduction="none"
)

# Each spelling maps (labels, logits, variables) to the loss, as a user writes it for one
# device; Keras's loss objects compute in float32 (the reference casts back to float64).
SPELLINGS = {
    "reduce_mean": lambda y, logits, _: tf.reduce_mean(per_example(y, logits)),
    "keras_ops_mean": lambda y, logits, _: keras.ops.mean(
        keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    ),
    # The README's example: Keras divides by the replica count itself.
    "keras_object": lambda y, logits, _: keras_crossentropy(y, logits),
    "keras_mse_object": lambda y, logits, _: keras_squared_error(
        tf.one_hot(y, 3, dtype=logits.dtype), logits
    ),
    # Divided by the replica's batch size times the replica count.
    "compute_average_loss": lambda y, logits, _: tf.nn.compute_average_loss(per_example(y, logits)),
    # Divided by a fixed global batch size: one device's value on the short batches too.
    "compute_average_loss_global": lambda y, logits, _: tf.nn.compute_average_loss(
        per_example(y, logits), global_batch_size=GLOBAL_BATCH_SIZE
    ),
    # A Keras mean plus a regularization term scaled for the replicas by TensorFlow.
    "keras_object_regularized": lambda y, logits, variables: (
        tf.cast(keras_crossentropy(y, logits), logits.dtype)
        + tf.nn.scale_regularization_loss(0.1 * tf.reduce_sum(variables[0] ** 2))
    ),
    # tf_keras's objects refuse their default reduction under a strategy; unreduced, they work.
    "tf_keras_object_unreduced": lambda y, logits, _: tf.reduce_mean(
        tf_keras_per_example(y, logits)
    ),
}


def classifier(dtype):
    """A 5-4-3 network's variables and logits function."""
    w1 = tf.Variable(np.linspace(-0.5, 0.5, 20).reshape(5, 4), dtype=dtype)
    w2 = tf.Variable(np.linspace(-1, 1, 12).reshape(4, 3), dtype=dtype)
    return [w1, w2], lambda x: tf.nn.relu(x @ w1) @ w2


def uneven_batches(dtype, sizes=SIZES):
    """The rows of XC and YC in batches of `sizes`, no batch dropped or padded."""
    data, start = None, 0
    for size in sizes:
        rows = slice(start, start + size)
        piece = tf.data.Dataset.from_tensor_slices((XC[rows].astype(dtype), YC[rows])).batch(size)
        data = piece if data is None else data.concatenate(piece)
        start += size
    return data


def one_device_reference(spelling, data, clip_norm=None):
    """Plain SGD in float64 on one device, each batch whole: no strategy, no trainop.

    Returns the weights, and each step's loss and global gradient norm before its update.
    With `clip_norm`, the gradients are scaled together to a global norm of at most that.
    """
    variables, logits = classifier(tf.float64)
    losses, norms = [], []
    for x, y in data:
        with tf.GradientTape() as tape:
            loss = tf.cast(spelling(y, logits(x), variables), tf.float64)
        grads = [tf.cast(grad, tf.float64) for grad in tape.gradient(loss, variables)]
        norm = float(tf.linalg.global_norm(grads))
        if clip_norm is not None and norm > clip_norm:
            grads = [grad * (clip_norm / norm) for grad in grads]
        for variable, grad in zip(variables, grads):
            variable.assign_sub(LOSS_LR * grad)
        losses.append(float(loss))
        norms.append(norm)
    return np.concatenate([v.numpy().ravel() for v in variables]), np.array(losses), norms


def on_two_replicas(spelling, data, logdir=None, **kwargs):
    with two.scope():
        variables, logits = classifier(tf.float32)
        step = tf.Variable(0, dtype=tf.int64)
        train_op = trainop.create_train_op(
            lambda x, y: spelling(y, logits(x), variables),
            keras.optimizers.SGD(LOSS_LR),
            step,
            variables_to_train=variables,
            **kwargs,
        )
    writer = tf.summary.create_file_writer(logdir) if logdir else tf.summary.create_noop_writer()
    with writer.as_default():
        losses = [float(train_op(x, y)) for x, y in two.experimental_distribute_dataset(data)]
    writer.close()
    return (
        np.concatenate([v.numpy().ravel() for v in variables]),
        np.array(losses),
        int(step.numpy()),
    )


def compare_loss(case, spelling, **kwargs):
    with case_of("loss", case):
        _compare_loss(case, spelling, **kwargs)


def _compare_loss(case, spelling, data=None, summaries=False, clip_norm=None, **kwargs):
    data = data or uneven_batches
    weights, losses, norms = one_device_reference(spelling, data(np.float64), clip_norm)
    if clip_norm is not None:
        kwargs["transform_grads_fn"] = trainop.clip_by_global_norm_fn(clip_norm)
    logdir = tempfile.mkdtemp() if summaries else None
    two_weights, two_losses, steps = on_two_replicas(spelling, data(np.float32), logdir, **kwargs)
    extra = []
    if summaries:
        written = scalar_summaries(logdir)
        expected = {("train/loss", i): loss for i, loss in enumerate(losses)}
        expected.update({("train/global_gradient_norm", i): n for i, n in enumerate(norms)})
        missing = set(expected) - set(written)
        extra = [
            max(abs(written[k] - v) / max(abs(v), 1.0) for k, v in expected.items())
            if not missing
            else f"missing:{sorted(missing)}"
        ]
    found = differences((two_weights, two_losses), (weights, losses))
    report("loss", case, *found, steps, len(losses), *extra)


def loss_cases():
    for name, spelling in SPELLINGS.items():
        compare_loss(name, spelling)
    mean = SPELLINGS["reduce_mean"]
    keras_object = SPELLINGS["keras_object"]
    # `dataset.batch(8)` of 19 rows, its last batch short: 4+4, 4+4, 2+1.
    compare_loss(
        "reduce_mean_batch_remainder",
        mean,
        data=lambda dtype: tf.data.Dataset.from_tensor_slices(
            (XC[:19].astype(dtype), YC[:19])
        ).batch(8),
    )
    # Each replica's verdict on its loss and gradients (the empty one's too), summed.
    compare_loss("reduce_mean_skip", mean, check_numerics="skip")
    # The gradients summed before the step goes on: the clip sees one device's.
    compare_loss("keras_object_clip", keras_object, clip_norm=0.2)
    compare_loss("keras_object_jit", keras_object, jit_compile=True)
    compare_loss("keras_object_summaries", keras_object, summaries=True)

    def tf_keras_default_reduction():
        loss_object = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        on_two_replicas(lambda y, logits, _: loss_object(y, logits), uneven_batches(np.float32))

    # tf_keras's own refusal, which names its way out (reduction SUM or NONE).
    refused(
        "tf_keras_default_reduction",
        tf_keras_default_reduction,
        "Please use `tf.keras.losses.Reduction.SUM` or `tf.keras.losses.Reduction.NONE`",
    )

    def zero_argument_loss():
        with two.scope():
            variables, logits = classifier(tf.float32)
            train_op = trainop.create_train_op(
                lambda: tf.reduce_mean(per_example(YC[:8], logits(XC[:8].astype(np.float32)))),
                keras.optimizers.SGD(LOSS_LR),
                None,
                variables_to_train=variables,
            )
        train_op()

    refused(
        "zero_argument_loss",
        zero_argument_loss,
        "`total_loss` must be given the batch as arguments under a tf.distribute strategy",
    )


# --- Several steps a call, inside the user's strategy.run, IndexedSlices -----------------------


def train_in_calls_of_2(strategy, x=X, **kwargs):
    """The 4 batches in 2 calls of `steps_per_call=2`, each replica given its share of both."""
    variables, loss_fn = model_and_loss(strategy)
    with strategy.scope():
        step = tf.Variable(0, dtype=tf.int64)
        train_op = trainop.create_train_op(
            loss_fn,
            keras.optimizers.SGD(0.1),
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


def steps_per_call_cases():
    for case, kwargs in [
        ("plain", {}),
        ("skip", {"x": X_NAN, "check_numerics": "skip"}),
        ("clip", {"transform_grads_fn": clip}),
        ("jit", {"jit_compile": True}),
    ]:
        with case_of("steps_per_call", case):
            (*run, steps), (*one_device_run, one_steps) = (
                train_in_calls_of_2(s, **kwargs) for s in (two, one)
            )
            report("steps_per_call", case, *differences(run, one_device_run), steps, one_steps)


def train_inside_run(strategy, make_optimizer, x=X, build=trainop.create_train_step, **kwargs):
    """`create_train_step` inside the user's `strategy.run`, as TF-Agents' agents call it."""
    variables, loss_fn = model_and_loss(strategy)
    with strategy.scope():
        step = tf.Variable(0, dtype=tf.int64)
        optimizer = make_optimizer()

    @tf.function
    def train(x, y):
        def on_replica(x, y):
            # Inside the user's strategy.run, the loss is used as given: scaled by the user.
            loss = loss_fn(x, y) / strategy.num_replicas_in_sync
            return build(loss, optimizer, step, variables_to_train=variables, **kwargs)

        return strategy.reduce("SUM", strategy.run(on_replica, (x, y)), axis=None)

    data = tf.data.Dataset.from_tensor_slices((x, Y)).batch(16)
    losses = [float(train(*batch)) for batch in strategy.experimental_distribute_dataset(data)]
    weights = np.concatenate([v.numpy().ravel() for v in variables])
    return weights, np.array(losses), int(step.numpy()), optimizer


def inside_run_cases():
    for case, make_optimizer, x in [
        ("plain", OPTIMIZERS["keras"], X),
        ("overflow", make_scaling, X_HUGE),
    ]:
        with case_of("inside_run", case):
            *run, steps, optimizer = train_inside_run(two, make_optimizer, x=x)
            *one_device_run, one_steps, one_optimizer = train_inside_run(one, make_optimizer, x=x)
            scales = []
            if case == "overflow":
                scales = [float(o.dynamic_scale.numpy()) for o in (optimizer, one_optimizer)]
            report("inside_run", case, *differences(run, one_device_run), steps, one_steps, *scales)
    for name, value in [
        ("check_numerics", "skip"),
        ("accumulation_steps", 2),
        ("learning_rate_multipliers", {"w1": 0.5}),
        ("moving_average", trainop.ExponentialMovingAverage()),
        ("step_metrics", True),
    ]:
        refused(
            f"inside_run_{name}",
            lambda name=name, value=value: train_inside_run(
                two, OPTIMIZERS["keras"], build=trainop.create_train_op, **{name: value}
            ),
            f"`{name}`: a train op built or called inside strategy.run",
        )


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


def sparse_cases():
    for case, kwargs in [
        ("plain", {}),
        ("skip", {"check_numerics": "skip"}),
        ("clip", {"transform_grads_fn": trainop.clip_by_global_norm_fn(0.01)}),
        ("accumulate", {"accumulation_steps": 2}),
    ]:
        with case_of("sparse", case):
            (table, steps), (one_table, one_steps) = (
                train_embedding(s, **kwargs) for s in (two, one)
            )
            report("sparse", case, float(np.max(np.abs(table - one_table))), steps, one_steps)


def raise_cases():
    # The default check raises on the second batch, whose second half has a NaN, and changes
    # nothing, the update op's target included: the weights after the first batch.
    for family, make_optimizer in OPTIMIZERS.items():
        with case_of("raise", family):
            weights, losses, steps, _ = train(two, make_optimizer, x=X_NAN)
            first_weights, *_ = train(two, make_optimizer, batches=1)
            report(
                "raise", family, float(np.max(np.abs(weights - first_weights))), len(losses), steps
            )


def train_with_the_loop(logdir, max_steps):
    """`trainop.train` on the distributed dataset, with the skip guard, checkpoints, summaries."""
    variables, loss_fn = model_and_loss(two)
    with two.scope():
        step = tf.Variable(0, dtype=tf.int64)
        optimizer = keras.optimizers.SGD(0.1)
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


def loop_cases():
    with case_of("loop", "resumed"):
        # Stopped after 3 steps and resumed to 6 against 6 at once: the same weights and steps.
        weights, _ = train_with_the_loop(tempfile.mkdtemp(), 6)
        logdir = tempfile.mkdtemp()
        train_with_the_loop(logdir, 3)
        resumed_weights, result = train_with_the_loop(logdir, 6)
        report(
            "loop",
            "resumed",
            float(np.max(np.abs(weights - resumed_weights))),
            result.global_step,
            result.resumed_from is not None,
            # Global steps 0 to 5, each written once across the two runs.
            ",".join(
                str(step) for tag, step in sorted(scalar_summaries(logdir)) if tag == "train/loss"
            ),
        )


def refused_cases():
    variables, loss_fn = model_and_loss(two)
    # An eager train op built outside the scope, then called in the user's strategy.run.
    skipping = trainop.create_train_op(
        loss_fn,
        keras.optimizers.SGD(0.1),
        None,
        variables_to_train=variables,
        check_numerics="skip",
    )
    refused(
        "called_inside_run",
        lambda: two.run(tf.function(skipping), (tf.constant(X[:8]), tf.constant(Y[:8]))),
        "`check_numerics`: a train op built or called inside strategy.run",
    )

    outside_step = tf.Variable(0, dtype=tf.int64)
    for name, value in [("variables_to_train", None), ("global_step", outside_step)]:

        def build(name=name, value=value):
            with two.scope():
                kwargs = {"variables_to_train": variables, name: value}
                trainop.create_train_op(loss_fn, keras.optimizers.SGD(0.1), **kwargs)

        refused(name, build, f"`{name}")

    def call_compiled():
        with two.scope():
            # An op without an XLA kernel in a replica's loss: XLA compiles that part, and
            # says so.
            train_op = trainop.create_train_op(
                lambda x: loss_fn(tf.numpy_function(np.copy, [x], tf.float32), Y[:8]),
                keras.optimizers.SGD(0.1),
                variables_to_train=variables,
                jit_compile=True,
            )
        data = two.experimental_distribute_dataset(tf.data.Dataset.from_tensors(X[:16]))
        train_op(next(iter(data)))

    refused("xla", call_compiled, "XLA cannot compile this train step")

    # Options of the guard that one device only has: refused when the step is traced.
    for name, setting, message in [
        ("spike_threshold", 6.0, "cannot judge spikes under a tf.distribute"),
        ("check_updates", True, "cannot undo an update under a tf.distribute"),
    ]:

        def call_with_guard_option(name=name, setting=setting):
            with two.scope():
                train_op = trainop.create_train_op(
                    loss_fn,
                    keras.optimizers.SGD(0.1),
                    variables_to_train=variables,
                    check_numerics=trainop.SkipNonFiniteSteps(**{name: setting}),
                )
            batches = tf.data.Dataset.from_tensors((X[:16], Y[:16]))
            train_op(*next(iter(two.experimental_distribute_dataset(batches))))

        refused(name, call_with_guard_option, message)

    def call_with_a_counted_loss():
        with two.scope():
            train_op = trainop.create_train_op(
                lambda x, y: (loss_fn(x, y) * tf.cast(tf.shape(x)[0], tf.float32), tf.shape(x)[0]),
                keras.optimizers.SGD(0.1),
                variables_to_train=variables,
                accumulation_steps=2,
            )
        batches = tf.data.Dataset.from_tensors((X[:16], Y[:16]))
        train_op(*next(iter(two.experimental_distribute_dataset(batches))))

    refused("counted_loss", call_with_a_counted_loss, "(loss_sum, count) is not supported under")

    def build_train_step():
        with two.scope():
            trainop.create_train_step(lambda: loss_fn(X, Y), keras.optimizers.SGD(0.1))

    refused("create_train_step", build_train_step, "create_train_step is not supported inside")

    @tf.function
    def build_with_a_loss_tensor():
        x, y = tf.constant(X[:4]), tf.constant(Y[:4])
        return trainop.create_train_op(
            loss_fn(x, y), keras.optimizers.SGD(0.1), variables_to_train=variables
        )

    def build_graph():
        with two.scope():
            build_with_a_loss_tensor()

    refused("graph", build_graph, "with a loss Tensor inside a tf.distribute strategy's scope")


GROUPS = {
    "step": step_cases,
    "loss": loss_cases,
    "steps_per_call": steps_per_call_cases,
    "inside_run": inside_run_cases,
    "sparse": sparse_cases,
    "raise": raise_cases,
    "loop": loop_cases,
    "refused": refused_cases,
}

if __name__ == "__main__":
    for group in sys.argv[1:] or GROUPS:
        GROUPS[group]()
