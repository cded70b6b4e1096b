"""`learning_rate_multipliers`: a chosen variable is trained at a multiple of the rate, whatever
the optimizer, against a plain reference: the same family's optimizer, one per variable, made
at that multiple of the rate and applied with a `tf.GradientTape`.

Every optimizer here updates each variable on its own, so one optimizer per variable makes the
same updates as one for all of them; only its learning rate differs.
"""

from __future__ import annotations

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from hypothesis import given, settings
from hypothesis import strategies as st

import trainop
from conftest import FAMILIES, GraphRunner

LR = 0.05
KINDS = {
    "v1": {
        "momentum": lambda lr: tf.compat.v1.train.MomentumOptimizer(lr, 0.9),
        "adam": lambda lr: tf.compat.v1.train.AdamOptimizer(lr),
        "rmsprop": lambda lr: tf.compat.v1.train.RMSPropOptimizer(lr),
        "adagrad": lambda lr: tf.compat.v1.train.AdagradOptimizer(lr),
    },
    "keras": {
        "momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
        "adam": lambda lr: keras.optimizers.Adam(lr),
        "rmsprop": lambda lr: keras.optimizers.RMSprop(lr),
        "adagrad": lambda lr: keras.optimizers.Adagrad(lr),
        "adamw": lambda lr: keras.optimizers.AdamW(lr, weight_decay=0.1),
    },
    "tf_keras": {
        "momentum": lambda lr: tf_keras.optimizers.SGD(lr, momentum=0.9),
        "adam": lambda lr: tf_keras.optimizers.Adam(lr),
        "rmsprop": lambda lr: tf_keras.optimizers.RMSprop(lr),
        "adagrad": lambda lr: tf_keras.optimizers.Adagrad(lr),
    },
    "tf_keras_legacy": {
        "momentum": lambda lr: tf_keras.optimizers.legacy.SGD(lr, momentum=0.9),
        "adam": lambda lr: tf_keras.optimizers.legacy.Adam(lr),
        "rmsprop": lambda lr: tf_keras.optimizers.legacy.RMSprop(lr),
        "adagrad": lambda lr: tf_keras.optimizers.legacy.Adagrad(lr),
    },
}
CASES = [(family, kind) for family in FAMILIES for kind in KINDS[family]]

INITIAL = {
    "dense/kernel": np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(3, 2),
    "dense/bias": np.array([0.5, -0.25], np.float32),
    "head": np.array([[1.0], [-2.0]], np.float32),
}
BATCHES = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)


def loss_of(weights, x):
    hidden = tf.tanh(x @ weights["dense/kernel"] + weights["dense/bias"])
    return tf.reduce_mean((hidden @ weights["head"] - 1.0) ** 2)


def reference(family, kind, factors, batches):
    """The weights after one tape step per batch, each variable with its own optimizer at
    `factors[name]` times the rate (1 if absent); a batch holding inf or NaN is skipped, as the
    guard skips it."""
    weights = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    optimizers = {name: KINDS[family][kind](LR * factors.get(name, 1.0)) for name in weights}
    for x in batches:
        if not np.isfinite(x).all():
            continue
        with tf.GradientTape() as tape:
            loss = loss_of(weights, tf.constant(x))
        grads = tape.gradient(loss, list(weights.values()))
        for (name, variable), grad in zip(weights.items(), grads):
            optimizers[name].apply_gradients([(grad, variable)])
    return {name: v.numpy() for name, v in weights.items()}


def trained(family, kind, multipliers, batches, keyed=lambda weights, name: name, **kwargs):
    """The weights after the eager train op's steps, one call per batch."""
    weights = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    train_op = trainop.create_train_op(
        lambda x: loss_of(weights, x),
        KINDS[family][kind](LR),
        global_step=None,
        learning_rate_multipliers=[(keyed(weights, k), m) for k, m in multipliers.items()],
        **kwargs,
    )
    for x in batches:
        train_op(tf.constant(x))
    return {name: v.numpy() for name, v in weights.items()}


def assert_weights_close(found, expected, rtol=2e-5, atol=2e-6):
    for name in expected:
        np.testing.assert_allclose(found[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("family,kind", CASES)
def test_a_factor_scales_the_update_as_that_multiple_of_the_rate_would(family, kind):
    factors = {"dense/kernel": 0.1, "head": 3.0}
    found = trained(family, kind, factors, BATCHES[:3])
    assert_weights_close(found, reference(family, kind, factors, BATCHES[:3]))
    # The factors change the run: without them the kernel and head move otherwise.
    plain = reference(family, kind, {}, BATCHES[:3])
    assert not np.allclose(found["dense/kernel"], plain["dense/kernel"], rtol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_adam_with_a_factor_of_a_tenth_makes_a_tenth_of_the_update(family):
    weights = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    scaled = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    x = tf.constant(BATCHES[0])
    plain_op = trainop.create_train_op(
        lambda: loss_of(weights, x), KINDS[family]["adam"](LR), global_step=None
    )
    scaled_op = trainop.create_train_op(
        lambda: loss_of(scaled, x),
        KINDS[family]["adam"](LR),
        global_step=None,
        learning_rate_multipliers={"dense/kernel": 0.1},
    )
    plain_op()
    scaled_op()
    for name, initial in INITIAL.items():
        factor = 0.1 if name == "dense/kernel" else 1.0
        np.testing.assert_allclose(
            scaled[name].numpy() - initial,
            factor * (weights[name].numpy() - initial),
            rtol=1e-4,
            atol=1e-8,
        )
    # Under Adam, a gradient multiplier of 0.1 changes (almost) nothing: the reason the
    # factors exist.
    multiplied = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    trainop.create_train_op(
        lambda: loss_of(multiplied, x),
        KINDS[family]["adam"](LR),
        global_step=None,
        transform_grads_fn=trainop.multiply_gradients_fn({"dense/kernel": 0.1}),
    )()
    np.testing.assert_allclose(
        multiplied["dense/kernel"].numpy(), weights["dense/kernel"].numpy(), rtol=1e-3
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_skipped_steps_move_nothing_and_xla_compiles_the_scaling(family):
    batches = BATCHES.copy()
    batches[1, 0, 0] = np.nan
    factors = {"dense/bias": 0.5}
    kwargs = {"check_numerics": "skip"}
    if family == "keras":
        kwargs["jit_compile"] = True
    found = trained(family, "adam", factors, batches, **kwargs)
    assert_weights_close(found, reference(family, "adam", factors, batches))


@pytest.mark.parametrize("family", ["v1", "keras"])
def test_in_a_v1_graph_under_the_skip_guard(family):
    runner = GraphRunner()
    try:
        x = tf.compat.v1.placeholder(tf.float32, [4, 3])
        weights = {name: runner.variable(value, name) for name, value in INITIAL.items()}
        train_op = trainop.create_train_op(
            loss_of(weights, x),
            KINDS[family]["momentum"](LR),
            global_step=None,
            check_numerics="skip",
            learning_rate_multipliers={re.compile(r"dense/.*"): 0.2},
        )
        runner.initialize()
        batches = BATCHES[:4].copy()
        batches[2, 1, 1] = np.inf
        for batch in batches:
            runner.session.run(train_op, {x: batch})
        found = {name: runner.read(v) for name, v in weights.items()}
    finally:
        runner.close()
    factors = {"dense/kernel": 0.2, "dense/bias": 0.2}
    assert_weights_close(found, reference(family, "momentum", factors, batches))


def test_keys_are_variables_references_names_or_expressions_first_match_wins():
    factors = {"dense/kernel": 0.5, "dense/bias": 0.5, "head": 2.0}
    expected = reference("keras", "adam", factors, BATCHES[:2])
    for keyed in [
        lambda weights, name: name,
        lambda weights, name: weights[name],
        lambda weights, name: weights[name].ref(),
    ]:
        assert_weights_close(trained("keras", "adam", factors, BATCHES[:2], keyed), expected)
    weights = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    train_op = trainop.create_train_op(
        lambda x: loss_of(weights, x),
        keras.optimizers.Adam(LR),
        global_step=None,
        # "head" matches both: the first key gives its factor.
        learning_rate_multipliers=[
            (re.compile("head"), 2.0),
            (re.compile(".*"), 0.5),
            ("no/such/variable", 7.0),
        ],
    )
    for x in BATCHES[:2]:
        train_op(tf.constant(x))
    assert_weights_close({n: v.numpy() for n, v in weights.items()}, expected)


def test_a_factor_in_a_variable_is_read_at_every_step():
    factor = tf.Variable(1.0)
    weights = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    train_op = trainop.create_train_op(
        lambda x: loss_of(weights, x),
        keras.optimizers.SGD(LR),
        global_step=None,
        learning_rate_multipliers={"head": factor},
    )
    train_op(tf.constant(BATCHES[0]))
    factor.assign(0.0)
    before = weights["head"].numpy()
    train_op(tf.constant(BATCHES[1]))
    np.testing.assert_array_equal(weights["head"].numpy(), before)
    assert not np.array_equal(weights["dense/bias"].numpy(), INITIAL["dense/bias"])


def test_a_constraint_holds_after_the_scaled_update():
    layer = keras.layers.Dense(
        2, kernel_constraint=keras.constraints.NonNeg(), kernel_initializer="ones"
    )
    layer.build((None, 3))
    x = tf.constant(BATCHES[0])
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(layer(x)),
        tf.compat.v1.train.GradientDescentOptimizer(5.0),
        global_step=None,
        learning_rate_multipliers=[(layer.kernel, 0.5)],
    )
    before = layer.kernel.numpy()
    train_op()
    # The documented result: the constraint of before + 0.5 * (constrained after - before).
    gradient = np.sum(BATCHES[0], axis=0)[:, None] * np.ones((1, 2))
    after = np.maximum(before - 5.0 * gradient, 0.0)
    expected = np.maximum(before + 0.5 * (after - before), 0.0)
    np.testing.assert_allclose(layer.kernel.numpy(), expected, rtol=1e-6)
    assert (layer.kernel.numpy() >= 0).all()


def test_float16_variables_scale_in_float32():
    w = tf.Variable(np.array([1.0, 2.0], np.float16), name="w")
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(tf.cast(w, tf.float32) ** 2),
        keras.optimizers.SGD(0.25),
        global_step=None,
        learning_rate_multipliers={"w": 0.5},
    )
    train_op()
    # w - 0.5 * 0.25 * 2w = 0.75 w, exact in float16.
    np.testing.assert_array_equal(w.numpy(), np.array([0.75, 1.5], np.float16))


def test_embedding_rows_and_a_loss_scale_optimizer():
    table = tf.Variable(np.ones((5, 2), np.float32), name="table")
    dense = tf.Variable(np.ones((2, 1), np.float32), name="dense")
    ids = tf.constant([0, 2, 2, 4])

    def loss():
        return tf.reduce_sum(tf.nn.embedding_lookup(table, ids) @ dense)

    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    train_op = trainop.create_train_op(
        loss, optimizer, global_step=None, learning_rate_multipliers={"table": 0.5}
    )
    train_op()
    # Row 2 is looked up twice: gradient 2 per element; rows 0 and 4 once; 1 and 3 not at all.
    counts = np.array([1, 0, 2, 0, 1], np.float32)[:, None]
    np.testing.assert_allclose(table.numpy(), 1.0 - 0.5 * 0.1 * counts * np.ones((1, 2)))
    np.testing.assert_allclose(dense.numpy(), 1.0 - 0.1 * 4.0)


def test_create_train_step_in_eager_mode_and_in_a_graph():
    factors = {"dense/kernel": 0.25}
    expected = reference("v1", "adam", factors, BATCHES[:2])
    weights = {name: tf.Variable(value, name=name) for name, value in INITIAL.items()}
    optimizer = KINDS["v1"]["adam"](LR)
    traces = []
    for x in BATCHES[:2]:
        trainop.create_train_step(
            lambda x=x: loss_of(weights, tf.constant(x)),
            optimizer,
            global_step=None,
            # A dict made anew at each call is the same setting: traced once.
            learning_rate_multipliers=dict(factors),
        )
        traces.append(len(trainop._eager.STEP_CACHE))
    assert traces[0] == traces[1]
    assert_weights_close({n: v.numpy() for n, v in weights.items()}, expected)


def test_model_fit_trains_each_layer_at_its_rate():
    def model():
        keras.utils.set_random_seed(1)
        return keras.Sequential(
            [keras.Input((3,)), keras.layers.Dense(2, name="body"), keras.layers.Dense(1)]
        )

    x = BATCHES.reshape(-1, 3)
    y = np.ones((len(x), 1), np.float32)
    fitted = model()
    trainop.keras.compile(
        fitted,
        optimizer=keras.optimizers.Adam(LR),
        loss="mse",
        learning_rate_multipliers={re.compile(r".*body/.*"): 0.1},
    )
    fitted.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    # The reference: Keras's own step, the body with its own optimizer at a tenth of the rate.
    plain = model()
    body = plain.get_layer("body").trainable_variables
    rest = [v for v in plain.trainable_variables if all(v is not b for b in body)]
    slow, fast = keras.optimizers.Adam(LR * 0.1), keras.optimizers.Adam(LR)
    for i in range(0, len(x), 4):
        with tf.GradientTape() as tape:
            loss = keras.losses.MeanSquaredError()(y[i : i + 4], plain(x[i : i + 4]))
        grads = tape.gradient(loss, body + rest)
        slow.apply_gradients(zip(grads[: len(body)], body))
        fast.apply_gradients(zip(grads[len(body) :], rest))
    for found, expected in zip(fitted.trainable_variables, plain.trainable_variables):
        np.testing.assert_allclose(found.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "multipliers,error,message",
    [
        (0.5, ValueError, "`learning_rate_multipliers` must map variables"),
        ({}, ValueError, "`learning_rate_multipliers` is empty"),
        ({3: 0.5}, TypeError, "`learning_rate_multipliers` keys must be"),
        ({"w": -1.0}, ValueError, "must be finite and not negative"),
        ({"w": float("nan")}, ValueError, "must be finite and not negative"),
        ({"w": "fast"}, TypeError, "`learning_rate_multipliers` values must be numbers"),
        ({"w": True}, TypeError, "`learning_rate_multipliers` values must be numbers"),
        ({"w": tf.Variable([1.0, 2.0])}, TypeError, "scalar floating-point"),
        ({"w": tf.Variable(1)}, TypeError, "scalar floating-point"),
    ],
)
def test_bad_factors_are_refused_when_the_train_op_is_built(multipliers, error, message):
    w = tf.Variable(1.0, name="w")
    with pytest.raises(error, match=re.escape(message)):
        trainop.create_train_op(
            lambda: w * w, keras.optimizers.SGD(0.1), learning_rate_multipliers=multipliers
        )
    with pytest.raises(error, match=re.escape(message)):
        trainop.keras.compile(
            keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]),
            optimizer="sgd",
            loss="mse",
            learning_rate_multipliers=multipliers,
        )


@settings(max_examples=12, deadline=None)
@given(
    case=st.sampled_from(CASES),
    factors=st.dictionaries(
        st.sampled_from(sorted(INITIAL)), st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0]), min_size=1
    ),
    steps=st.integers(1, 3),
    skip=st.booleans(),
)
def test_property_any_family_kind_and_factors_match_the_reference(case, factors, steps, skip):
    family, kind = case
    batches = BATCHES[:steps].copy()
    kwargs = {}
    if skip:
        batches[0, 0, 0] = np.nan
        kwargs["check_numerics"] = "skip"
    found = trained(family, kind, factors, batches, **kwargs)
    assert_weights_close(found, reference(family, kind, factors, batches))


def test_a_key_that_matches_no_variable_is_named_once(caplog):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="backbone")])
    train_op = trainop.create_train_op(
        lambda x: tf.reduce_mean(model(x) ** 2),
        keras.optimizers.SGD(0.1),
        global_step=None,
        # The path is sequential/backbone/kernel: "backbone/.*" matches nothing.
        learning_rate_multipliers=[(re.compile("backbone/.*"), 0.1), (re.compile(".*bias"), 0.5)],
    )
    with caplog.at_level("WARNING", logger="trainop"):
        train_op(tf.constant(BATCHES[0]))
        train_op(tf.constant(BATCHES[1]))
    messages = [r.getMessage() for r in caplog.records if "match no variable" in r.getMessage()]
    assert len(messages) == 1
    assert "'backbone/.*'" in messages[0] and ".*bias" not in messages[0]
    assert "'sequential" in messages[0]  # the names it could have matched


@pytest.mark.parametrize("factor", [0.0, 0.3])
def test_a_factor_scales_exactly_near_zero_and_across_a_sign_change(factor):
    """`before + factor * (after - before)` computed as such: weights near 0, a step that
    crosses 0, and a factor of 0 that leaves them bit for bit."""
    before = np.array([1e-8, 3e-3, 0.1, -2e-7], np.float32)
    w = tf.Variable(before, name="frozen")
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(w * tf.constant([1e4, 1.0, 2.0, -1e3])),
        keras.optimizers.SGD(1.0),
        global_step=None,
        learning_rate_multipliers={"frozen": factor},
    )
    train_op()
    after = before - np.array([1e4, 1.0, 2.0, -1e3], np.float32)
    expected = (before + np.float32(factor) * (after - before)).astype(np.float32)
    if factor == 0.0:
        np.testing.assert_array_equal(w.numpy(), before)
    else:
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)


def test_reference_variables_of_a_v1_graph():
    """TF-Slim programs (`disable_v2_behavior`) train reference variables, which have no
    resource handle: factors and averages update them too."""
    with tf.Graph().as_default():
        w = tf.compat.v1.Variable([1.0, 2.0], name="w", use_resource=False)
        b = tf.compat.v1.Variable([0.5], name="b", use_resource=False)
        ema = trainop.ExponentialMovingAverage(0.5)
        train_op = trainop.create_train_op(
            tf.reduce_sum(w * w) + tf.reduce_sum(b),
            tf.compat.v1.train.GradientDescentOptimizer(0.1),
            learning_rate_multipliers={"w": 0.5},
            moving_average=ema,
        )
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(train_op)
            first = session.run(w)
            session.run(train_op)
            found, average = session.run([w, ema.average(w)])
    np.testing.assert_allclose(first, [1.0 - 0.05 * 2.0, 2.0 - 0.05 * 4.0], rtol=1e-6)
    np.testing.assert_allclose(found, first * (1 - 0.05 * 2.0), rtol=1e-6)
    np.testing.assert_allclose(average, 0.5 * first + 0.5 * found, rtol=1e-6)


def test_a_sync_replicas_optimizer_is_refused():
    with tf.Graph().as_default():
        w = tf.Variable([1.0], name="w")
        for name, value in [
            ("learning_rate_multipliers", {"w": 0.5}),
            ("moving_average", trainop.ExponentialMovingAverage()),
            ("step_metrics", True),
        ]:
            optimizer = tf.compat.v1.train.SyncReplicasOptimizer(
                tf.compat.v1.train.GradientDescentOptimizer(0.1), 1, 1
            )
            with pytest.raises(ValueError, match=f"`{name}` cannot be used with a SyncReplicas"):
                trainop.create_train_op(tf.reduce_sum(w * w), optimizer, **{name: value})
