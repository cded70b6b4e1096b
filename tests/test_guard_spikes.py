"""The skip guard's spike option: a finite step whose loss or gradient norm is far above its
recent history changes nothing, as if its batch had not been there.

Reference: the same run without the spiking batches. The guard's statistics are updated by
applied steps only, so with the spikes skipped the two runs must end bit-identical: weights,
statistics and counters.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
import trainop.keras

STEPS = 30
# Step -> factor on the loss, after the warm-up; an even count (steps_per_call=2 runs).
SPIKES = {14: 1e3, 22: 50.0, 23: 400.0, 27: 200.0}
WARMUP = 10
X = np.random.default_rng(0).normal(size=(STEPS, 2)).astype(np.float32)
W0 = np.array([1.0, 2.0], np.float32)


def _guard(**settings):
    return trainop.SkipNonFiniteSteps(spike_threshold=4.0, spike_warmup_steps=WARMUP, **settings)


def _batches(factors):
    """(x, factor) per step: the loss is `factor * ||w - x||^2`."""
    return [(X[i], np.float32(factors.get(i, 1.0))) for i in range(STEPS)]


def _without_spikes(batches):
    return [b for i, b in enumerate(batches) if i not in SPIKES]


def _run_eager(batches, guard, jit_compile=False, steps_per_call=1, accumulation_steps=1):
    w = tf.Variable(W0)
    train_op = trainop.create_train_op(
        lambda x, factor: factor * tf.reduce_sum((w - x) ** 2),
        keras.optimizers.Adam(0.05),
        global_step=None,
        check_numerics=guard,
        jit_compile=jit_compile,
        steps_per_call=steps_per_call,
        accumulation_steps=accumulation_steps,
    )
    for i in range(0, len(batches) - len(batches) % steps_per_call, steps_per_call):
        xs, factors = zip(*batches[i : i + steps_per_call])
        if steps_per_call == 1:
            train_op(tf.constant(xs[0]), tf.constant(factors[0]))
        else:
            train_op(tf.constant(np.stack(xs)), tf.constant(np.stack(factors)))
    return w.numpy()


def _run_graph(batches, make_guard):
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        w = tf.Variable(W0)
        x = tf.compat.v1.placeholder(tf.float32, [2])
        factor = tf.compat.v1.placeholder(tf.float32, [])
        guard = make_guard()
        train_op = trainop.create_train_op(
            factor * tf.reduce_sum((w - x) ** 2),
            tf.compat.v1.train.AdamOptimizer(0.05),
            check_numerics=guard,
        )
        session.run(tf.compat.v1.global_variables_initializer())
        for x_value, factor_value in batches:
            session.run(train_op, {x: x_value, factor: factor_value})
        counts = [guard.skipped_steps, guard.spike_skipped_steps, guard.consecutive_skipped_steps]
        return session.run(w), session.run(guard.spike_statistics), session.run(counts)


EAGER = [
    dict(),
    dict(jit_compile=True),
    dict(steps_per_call=2),
    dict(jit_compile=True, steps_per_call=2),
    dict(accumulation_steps=2),
]


@pytest.mark.parametrize("execution", EAGER, ids=lambda e: ",".join(e) or "eager")
def test_spikes_are_skipped_and_the_run_equals_one_without_them(execution):
    batches = _batches(SPIKES)
    spiky_guard, clean_guard = _guard(), _guard()
    weights = _run_eager(batches, spiky_guard, **execution)
    reference = _run_eager(_without_spikes(batches), clean_guard, **execution)

    np.testing.assert_array_equal(weights, reference)
    np.testing.assert_array_equal(
        spiky_guard.spike_statistics.numpy(), clean_guard.spike_statistics.numpy()
    )
    assert int(spiky_guard.spike_skipped_steps) == len(SPIKES)
    assert int(spiky_guard.skipped_steps) == int(spiky_guard.consecutive_skipped_steps) == 0
    assert int(clean_guard.spike_skipped_steps) == 0
    # And the spikes were big enough to matter: applied, they move the weights far.
    unguarded = _run_eager(batches, trainop.SkipNonFiniteSteps(), **execution)
    assert np.abs(unguarded - reference).max() > 0.05


def test_spikes_are_skipped_in_a_graph_and_the_run_equals_one_without_them():
    batches = _batches(SPIKES)
    weights, statistics, counts = _run_graph(batches, _guard)
    reference, reference_statistics, reference_counts = _run_graph(_without_spikes(batches), _guard)
    np.testing.assert_array_equal(weights, reference)
    np.testing.assert_array_equal(statistics, reference_statistics)
    assert list(counts) == [0, len(SPIKES), 0] and list(reference_counts) == [0, 0, 0]


def test_the_statistics_are_the_mean_and_variance_of_the_applied_steps():
    """Before 1 / (1 - decay) steps, the plain mean and (population) variance of the losses
    and gradient norms seen; then each new value weighs 1 - decay."""
    w = tf.Variable(W0)
    guard = trainop.SkipNonFiniteSteps(spike_threshold=3.0, spike_decay=0.75)
    train_op = trainop.create_train_op(
        lambda x: tf.reduce_sum((w - x) ** 2),
        keras.optimizers.SGD(0.1),
        global_step=None,
        check_numerics=guard,
    )
    losses, norms = [], []
    for x in X[:8]:
        residual = w.numpy().astype(np.float64) - x
        losses.append(np.sum(residual**2))
        norms.append(np.linalg.norm(2 * residual))
        train_op(tf.constant(x))
    expected = []
    for values in (losses, norms):
        mean, variance = 0.0, 0.0
        for n, value in enumerate(values):
            past = min(0.75, n / (n + 1))
            delta = value - mean
            mean, variance = mean + (1 - past) * delta, past * (variance + (1 - past) * delta**2)
        expected.append([mean, variance])
    # The first 4 values: their plain mean and variance.
    assert np.isclose(np.var(losses[:4]), _plain_variance(losses[:4]))
    np.testing.assert_allclose(guard.spike_statistics.numpy(), expected, rtol=1e-5)


def _plain_variance(values):
    mean, variance = 0.0, 0.0
    for n, value in enumerate(values):
        past = n / (n + 1)
        delta = value - mean
        mean, variance = mean + (1 - past) * delta, past * (variance + (1 - past) * delta**2)
    return variance


def test_a_large_value_within_the_warm_up_is_applied():
    batches = _batches({3: 1e3})
    guard = _guard()
    weights = _run_eager(batches, guard)
    reference = _run_eager(_batches({}), _guard())
    assert int(guard.spike_skipped_steps) == 0
    assert np.abs(weights - reference).max() > 0.05


def test_a_non_finite_step_is_counted_as_such_not_as_a_spike():
    guard = _guard()
    weights = _run_eager(_batches({14: math.nan, 22: math.inf}), guard)
    reference = _run_eager([b for i, b in enumerate(_batches({})) if i not in (14, 22)], _guard())
    assert int(guard.skipped_steps) == 2 and int(guard.spike_skipped_steps) == 0
    np.testing.assert_array_equal(weights, reference)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_lasting_rise_ends_in_the_error_after_max_consecutive_skips(jit_compile):
    """Every step after 20 is 1000 times larger: skipped as spikes until the limit, then the
    error, nothing changed by the step that raises."""
    guard = _guard(max_consecutive=3)
    w = tf.Variable(W0)
    train_op = trainop.create_train_op(
        lambda x, factor: factor * tf.reduce_sum((w - x) ** 2),
        keras.optimizers.SGD(0.05),
        global_step=None,
        check_numerics=guard,
        jit_compile=jit_compile,
    )
    for i in range(20):
        train_op(tf.constant(X[i]), tf.constant(1.0))
    before = w.numpy()
    for i in range(20, 23):
        train_op(tf.constant(X[i]), tf.constant(1e3))
    with pytest.raises(tf.errors.InvalidArgumentError, match="or spiked, at|a compiled step"):
        train_op(tf.constant(X[23]), tf.constant(1e3))
    np.testing.assert_array_equal(w.numpy(), before)
    assert int(guard.spike_skipped_steps) == int(guard.consecutive_skipped_steps) == 3


def test_a_skipped_spike_says_so_from_the_device(capfd):
    _run_eager(_batches({14: 1e3}), _guard())
    line = [x for x in capfd.readouterr().err.splitlines() if x.startswith("trainop:")]
    assert len(line) == 1
    assert line[0].startswith(
        "trainop: a step not applied at optimizer step 14 - a spike: standard deviations "
        "above the recent mean: loss "
    )


def test_the_statistics_are_checkpointed_with_the_guard(tmp_path):
    guard = _guard()
    _run_eager(_batches({}), guard)
    path = tf.train.Checkpoint(guard=guard).save(str(tmp_path / "ckpt"))
    restored = _guard()
    tf.train.Checkpoint(guard=restored).restore(path).assert_consumed()
    np.testing.assert_array_equal(restored.spike_statistics.numpy(), guard.spike_statistics.numpy())
    assert int(restored._observed_steps) == STEPS


def test_fit_skips_the_spiking_batches_as_a_fit_without_them():
    def fit(batches):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        guard = _guard()
        trainop.keras.compile(
            model, optimizer=keras.optimizers.SGD(0.05), loss="mse", check_numerics=guard
        )
        x = np.stack([b[0] for b in batches])
        y = np.stack([b[1] for b in batches]).reshape(-1, 1)
        model.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0)
        return model.get_weights(), guard

    # The target is 1, or the factor: a spiking loss and gradient.
    batches = _batches(SPIKES)
    (weights, guard), (reference, _) = fit(batches), fit(_without_spikes(batches))
    for got, expected in zip(weights, reference):
        np.testing.assert_array_equal(got, expected)
    assert int(guard.spike_skipped_steps) == len(SPIKES)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(spike_threshold=0), "`spike_threshold` must be a positive number"),
        (dict(spike_threshold=-1.0), "`spike_threshold` must be a positive number"),
        (dict(spike_threshold=math.nan), "`spike_threshold` must be a positive number"),
        (dict(spike_threshold=math.inf), "`spike_threshold` must be a positive number"),
        (dict(spike_threshold=True), "`spike_threshold` must be a positive number"),
        (dict(spike_threshold="6"), "`spike_threshold` must be a positive number"),
        (dict(spike_threshold=6, spike_warmup_steps=1), "`spike_warmup_steps` must be an"),
        (dict(spike_threshold=6, spike_decay=0.0), "`spike_decay` must be in \\(0, 1\\)"),
        (dict(spike_threshold=6, spike_decay=1), "`spike_decay` must be in \\(0, 1\\)"),
    ],
)
def test_bad_spike_settings_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        trainop.SkipNonFiniteSteps(**settings)


def test_the_guard_without_spikes_holds_only_its_counters():
    guard = trainop.SkipNonFiniteSteps()
    assert guard.spike_skipped_steps is None and guard.spike_statistics is None
    assert len(guard.variables) == 2
    assert repr(_guard()) == (
        "SkipNonFiniteSteps(max_consecutive=10, spike_threshold=4.0, spike_warmup_steps=10, "
        "spike_decay=0.99)"
    )


def test_a_quantity_that_has_not_varied_does_not_make_every_rise_a_spike():
    """The loss constant through the warm-up (variance 0): a rise of a ten-thousandth is not a
    spike (the deviation is taken as at least a thousandth of the mean); a doubling is."""
    w = tf.Variable(0.0)
    guard = trainop.SkipNonFiniteSteps(spike_threshold=4.0, spike_warmup_steps=10)
    train_op = trainop.create_train_op(
        lambda level: level + 0.0 * w,
        keras.optimizers.SGD(0.1),
        global_step=None,
        check_numerics=guard,
    )
    for _ in range(12):
        train_op(tf.constant(1.0))
    train_op(tf.constant(1.0001))
    assert int(guard.spike_skipped_steps) == 0
    train_op(tf.constant(2.0))
    assert int(guard.spike_skipped_steps) == 1
