"""trainop.keras: trainop's step inside `model.fit`, compared with Keras's own `fit`."""

from __future__ import annotations

import gc
import logging
import os
import pathlib
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
import trainop.keras
from conftest import read_summaries

BATCH = 4
RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 5)).astype(np.float32)
Y = RNG.normal(size=(32, 1)).astype(np.float32)
BATCHES = len(X) // BATCH


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.out(self.hidden(x))


def make_model(kind: str) -> keras.Model:
    keras.utils.set_random_seed(1)
    if kind == "sequential":
        return keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)]
        )
    if kind == "functional":
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(8, activation="tanh")(inputs)
        return keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model = Subclassed()
    model(X[:1])
    return model


def with_bad_batches(bad: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Y with NaN targets in the batches `bad` (of `BATCH` rows each)."""
    y = Y.copy()
    for b in bad:
        y[b * BATCH : (b + 1) * BATCH] = np.nan
    return X, y


def without_batches(bad: list[int]) -> tuple[np.ndarray, np.ndarray]:
    keep = [i for i in range(len(X)) if i // BATCH not in bad]
    return X[keep], Y[keep]


def state(model: keras.Model) -> list[np.ndarray]:
    """The weights and the optimizer's variables (slots and iterations)."""
    return [w.numpy() for w in model.weights] + [
        np.asarray(v.numpy()) for v in model.optimizer.variables
    ]


def assert_same_state(model: keras.Model, reference: keras.Model) -> None:
    got, expected = state(model), state(reference)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kind, steps_per_execution, jit_compile",
    [
        ("sequential", 1, False),
        ("functional", 8, False),
        ("subclassed", 1, True),
        ("sequential", 8, True),
    ],
)
def test_skipped_batches_leave_the_state_metrics_and_history_of_a_fit_without_them(
    kind, steps_per_execution, jit_compile
):
    bad = [2, 5]
    settings = dict(
        loss="mse",
        metrics=["mae"],
        steps_per_execution=steps_per_execution,
        jit_compile=jit_compile,
    )
    model = make_model(kind)
    trainop.keras.compile(
        model, optimizer=keras.optimizers.Adam(0.01), check_numerics="skip", **settings
    )
    reference = make_model(kind)
    reference.compile(optimizer=keras.optimizers.Adam(0.01), **settings)

    history = model.fit(
        *with_bad_batches(bad), batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    )
    expected = reference.fit(
        *without_batches(bad), batch_size=BATCH, epochs=2, shuffle=False, verbose=0
    )

    assert_same_state(model, reference)
    assert int(model.optimizer.iterations) == 2 * (BATCHES - len(bad))
    for key in ("loss", "mae"):
        np.testing.assert_allclose(history.history[key], expected.history[key], rtol=1e-5)
    assert history.history["skipped_steps"] == [2.0, 4.0]
    # The metrics hold the accepted batches only (an epoch mean with a NaN would be NaN).
    assert all(np.isfinite(history.history["loss"]))


@pytest.mark.parametrize("steps_per_execution", [1, 8])
def test_the_default_check_raises_with_nothing_changed_where_terminate_on_nan_keeps_nan(
    steps_per_execution,
):
    bad = [3]
    model = make_model("sequential")
    trainop.keras.compile(
        model,
        optimizer=keras.optimizers.Adam(0.01),
        loss="mse",
        steps_per_execution=steps_per_execution,
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="LossTensor is inf or nan") as raised:
        model.fit(*with_bad_batches(bad), batch_size=BATCH, shuffle=False, verbose=0)
    # Said from the device: the step (the optimizer's, 3 batches applied), the loss and the
    # variables whose gradients are not finite (all of them: the input is NaN).
    n = len(model.trainable_weights)
    message = " ".join(str(raised.value).split())
    assert "[LossTensor is inf or nan at optimizer step] [3] [-] [loss] [nan]" in message
    assert f"[- gradients not finite:] [{n}] [of {n}]" in message
    # What the three batches before the bad one made, and nothing else.
    reference = make_model("sequential")
    reference.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    reference.fit(X[: 3 * BATCH], Y[: 3 * BATCH], batch_size=BATCH, shuffle=False, verbose=0)
    assert_same_state(model, reference)

    # Keras's own fit, stopped by TerminateOnNaN, has the NaN in its weights already.
    plain = make_model("sequential")
    plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    plain.fit(
        *with_bad_batches(bad),
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    assert not all(np.isfinite(w).all() for w in plain.get_weights())


@pytest.mark.parametrize("steps_per_execution", [1, 8])
def test_the_default_check_under_xla_raises_after_the_call_with_nothing_changed(
    steps_per_execution,
):
    bad = [3]
    settings = dict(loss="mse", steps_per_execution=steps_per_execution, jit_compile=True)
    model = make_model("functional")
    trainop.keras.compile(model, optimizer=keras.optimizers.Adam(0.01), **settings)
    with pytest.raises(tf.errors.InvalidArgumentError, match="LossTensor is inf or nan"):
        model.fit(*with_bad_batches(bad), batch_size=BATCH, shuffle=False, verbose=0)
    # The batches after the bad one, in the same compiled call, ran nothing either.
    reference = make_model("functional")
    reference.compile(optimizer=keras.optimizers.Adam(0.01), **settings)
    reference.fit(X[: 3 * BATCH], Y[: 3 * BATCH], batch_size=BATCH, shuffle=False, verbose=0)
    assert_same_state(model, reference)
    assert int(model.optimizer.iterations) == 3


def test_the_skip_guard_raises_past_its_limit_with_nothing_changed():
    model = make_model("sequential")
    guard = trainop.SkipNonFiniteSteps(max_consecutive=1)
    trainop.keras.compile(model, optimizer="sgd", loss="mse", check_numerics=guard)
    with pytest.raises(tf.errors.InvalidArgumentError, match="after 1 skipped steps in a row"):
        model.fit(*with_bad_batches([1, 2]), batch_size=BATCH, shuffle=False, verbose=0)
    assert int(guard.skipped_steps) == 1 and int(model.optimizer.iterations) == 1


def test_a_loss_scale_optimizer_skips_the_bad_batches_and_trains_as_without_them():
    bad = [1, 6]
    model = make_model("sequential")
    trainop.keras.compile(
        model,
        optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)),
        loss="mse",
        check_numerics="skip",
    )
    reference = make_model("sequential")
    reference.compile(
        optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(0.01)), loss="mse"
    )
    model.fit(*with_bad_batches(bad), batch_size=BATCH, shuffle=False, verbose=0)
    reference.fit(*without_batches(bad), batch_size=BATCH, shuffle=False, verbose=0)
    assert_same_state(model, reference)


def test_accumulated_batches_make_the_step_of_the_batch_they_add_up_to():
    model = make_model("sequential")
    trainop.keras.compile(model, optimizer="sgd", loss="mse", accumulation_steps=4)
    reference = make_model("sequential")
    reference.compile(optimizer="sgd", loss="mse")
    model.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0)
    reference.fit(X, Y, batch_size=4 * BATCH, shuffle=False, verbose=0)
    for got, expected in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert int(model.optimizer.iterations) == int(reference.optimizer.iterations) == 2


def test_a_short_last_batch_counts_by_its_size_in_its_window():
    # 4 batches, the last 3 examples short: one window, the step of the 4 * BATCH - 3 examples.
    x, y = X[: 4 * BATCH - 3], Y[: 4 * BATCH - 3]
    model = make_model("sequential")
    trainop.keras.compile(model, optimizer="sgd", loss="mse", accumulation_steps=4)
    reference = make_model("sequential")
    reference.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    reference.fit(x, y, batch_size=len(x), shuffle=False, verbose=0)
    for got, expected in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert int(model.optimizer.iterations) == 1


def test_transforms_apply_in_fit():
    # A multiplier of 0 on the output layer's kernel: it stays; the rest trains.
    model = make_model("sequential")
    kernel = model.layers[1].kernel
    before = kernel.numpy()
    trainop.keras.compile(
        model,
        optimizer="sgd",
        loss="mse",
        transform_grads_fn=trainop.multiply_gradients_fn({kernel.path: 0.0}),
    )
    hidden = model.layers[0].kernel.numpy()
    model.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0)
    np.testing.assert_array_equal(kernel.numpy(), before)
    assert not np.allclose(model.layers[0].kernel.numpy(), hidden)


def test_train_summaries_go_to_the_tensorboard_callbacks_train_directory(tmp_path):
    model = make_model("sequential")
    trainop.keras.compile(model, optimizer="sgd", loss="mse", summarize_every_n_steps=2)
    model.fit(
        X,
        Y,
        batch_size=BATCH,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.TensorBoard(str(tmp_path))],
    )
    written = read_summaries(str(tmp_path / "train"))
    losses = dict(written["train/loss"])
    # At the optimizer's iterations before each counted step: 0, 2, 4, 6.
    assert sorted(losses) == [0, 2, 4, 6]
    reference = make_model("sequential")
    expected = float(keras.losses.MeanSquaredError()(Y[:BATCH], reference(X[:BATCH])))
    assert losses[0] == pytest.approx(expected, rel=1e-5)


def test_models_and_settings_it_cannot_train_are_refused_by_name():
    class OwnStep(keras.Sequential):
        def train_step(self, data):
            return super().train_step(data)

    with pytest.raises(ValueError, match="overrides train_step"):
        trainop.keras.compile(OwnStep([keras.Input((5,)), keras.layers.Dense(1)]), loss="mse")
    with pytest.raises(TypeError, match="must be a Keras 3 keras.Model"):
        trainop.keras.compile(object(), loss="mse")
    with pytest.raises(ValueError, match="accumulation_steps"):
        trainop.keras.compile(make_model("sequential"), loss="mse", accumulation_steps=0)


# --- MirroredStrategy over two logical CPUs (programs/fit_mirrored_child.py) -------------------

# Per case: the iterations and skipped steps (or, for `raise`, 1 if fit raised) of 2 epochs of
# 4 batches, on two replicas and on one device alike.
_MIRRORED_CASES = {
    "default": (8, 0),
    "skip": (6, 2),
    "clip_accumulate": (3, 2),
    "loss_scale": (6, 2),
    "raise": (2, 1),
}


@pytest.mark.parametrize("case", sorted(_MIRRORED_CASES))
def test_two_replicas_train_as_one_device(case):
    program = pathlib.Path(__file__).parent / "programs" / "fit_mirrored_child.py"
    result = subprocess.run(
        [sys.executable, str(program), case],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith(case + " ")]
    assert lines, f"exit code {result.returncode}; stderr ends: {result.stderr[-3000:]}"
    _, state_difference, loss_difference, iterations, one_iterations, skipped, one_skipped = lines[
        -1
    ]
    assert float(state_difference) < 1e-5
    assert float(loss_difference) < 1e-5
    expected_iterations, expected_skipped = _MIRRORED_CASES[case]
    assert int(iterations) == int(one_iterations) == expected_iterations
    assert int(skipped) == int(one_skipped) == expected_skipped


# --- trainop.keras.BackupAndRestore ------------------------------------------------------------


class SignalAt(keras.callbacks.Callback):
    """Sends this process `signum` at the end of batch `batch` of epoch `epoch`."""

    def __init__(self, epoch: int, batch: int, signum: int = signal.SIGTERM):
        super().__init__()
        self.at, self.signum, self.epoch = (epoch, batch), signum, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            signal.raise_signal(self.signum)


def compiled_for_backup(**settings) -> keras.Model:
    model = make_model("sequential")
    trainop.keras.compile(
        model,
        optimizer=keras.optimizers.Adam(0.01),
        loss="mse",
        metrics=["mae"],
        check_numerics="skip",
        **settings,
    )
    return model


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_a_fit_stopped_by_sigterm_mid_epoch_resumes_with_the_losses_of_an_uninterrupted_one(
    tmp_path, steps_per_execution
):
    data = with_bad_batches([1, 6])
    fit = dict(batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    uninterrupted = compiled_for_backup(steps_per_execution=steps_per_execution)
    expected = uninterrupted.fit(*data, **fit).history

    stopped = compiled_for_backup(steps_per_execution=steps_per_execution)
    backup = trainop.keras.BackupAndRestore(str(tmp_path))
    handler = signal.getsignal(signal.SIGTERM)
    first = stopped.fit(*data, callbacks=[SignalAt(1, 3), backup], **fit).history
    # Epoch 0, then epoch 1 up to its 4th batch: fit returned, as for a stop by a callback.
    assert len(first["loss"]) == 2
    assert int(stopped.optimizer.iterations) == (BATCHES - 2) + 3
    assert signal.getsignal(signal.SIGTERM) is handler

    # A new process: a new model, its state restored from the backup.
    rerun = compiled_for_backup(steps_per_execution=steps_per_execution)
    history = rerun.fit(*data, callbacks=[trainop.keras.BackupAndRestore(str(tmp_path))], **fit)
    for key in ("loss", "mae", "skipped_steps"):
        np.testing.assert_allclose(history.history[key], expected[key][1:], rtol=1e-5)
    assert_same_state(rerun, uninterrupted)
    # Completed: the backups are deleted, as Keras's.
    assert not tmp_path.exists()


def test_a_backup_inside_an_accumulation_window_keeps_its_sums_and_the_average(tmp_path):
    """Stopped after batch 3 of epoch 1 (11 batches in: windows of 3 hold 2 of their calls),
    the rerun completes the window and the average as the uninterrupted fit does."""
    data = with_bad_batches([])
    fit = dict(batch_size=BATCH, epochs=3, shuffle=False, verbose=0)

    def compiled():
        average = trainop.ExponentialMovingAverage(0.5)
        return compiled_for_backup(accumulation_steps=3, moving_average=average), average

    uninterrupted, expected_average = compiled()
    uninterrupted.fit(*data, **fit)
    stopped, _ = compiled()
    stopped.fit(
        *data, callbacks=[SignalAt(1, 3), trainop.keras.BackupAndRestore(str(tmp_path))], **fit
    )
    assert int(stopped.optimizer.iterations) == (BATCHES + 4) // 3
    rerun, average = compiled()
    rerun.fit(*data, callbacks=[trainop.keras.BackupAndRestore(str(tmp_path))], **fit)
    assert_same_state(rerun, uninterrupted)
    for v, expected in zip(rerun.trainable_variables, uninterrupted.trainable_variables):
        np.testing.assert_allclose(
            average.average(v).numpy(), expected_average.average(expected).numpy(), rtol=1e-5
        )


def test_a_rerun_of_a_finished_fit_restores_the_optimizer_at_once(tmp_path, caplog):
    """With nothing left to train, no step builds the optimizer: it is built before the
    backup is restored (as by Keras's own BackupAndRestore), so its state is restored, not
    left unused with a warning per value."""
    data = with_bad_batches([])
    fit = dict(batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    first = compiled_for_backup()
    first.fit(
        *data,
        callbacks=[trainop.keras.BackupAndRestore(str(tmp_path), delete_checkpoint=False)],
        **fit,
    )

    rerun = compiled_for_backup()
    with caplog.at_level(logging.WARNING):
        history = rerun.fit(
            *data,
            callbacks=[trainop.keras.BackupAndRestore(str(tmp_path), delete_checkpoint=False)],
            **fit,
        )
        del history
        gc.collect()  # an unused restore warns when it is collected
    assert int(rerun.optimizer.iterations) == int(first.optimizer.iterations) == 2 * BATCHES
    assert_same_state(rerun, first)
    assert not [r for r in caplog.records if "could not be found" in r.getMessage()]


def test_a_backup_holding_nan_is_never_written_and_fit_stops(tmp_path):
    # No check at all: the NaN batch 2 of epoch 1 puts NaN in the weights.
    model = make_model("sequential")
    trainop.keras.compile(model, optimizer="sgd", loss="mse", check_numerics=False)
    reference = make_model("sequential")
    reference.compile(optimizer="sgd", loss="mse")
    reference.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    backup = trainop.keras.BackupAndRestore(str(tmp_path), save_freq=BATCHES)
    x, y = with_bad_batches([])
    y = np.concatenate([y, y])
    y[BATCHES * BATCH + 2 * BATCH :] = np.nan
    history = model.fit(
        np.concatenate([x, x]),
        y,
        batch_size=BATCH,
        epochs=3,
        shuffle=False,
        verbose=0,
        callbacks=[backup],
    )
    assert len(history.history["loss"]) == 1  # stopped at the first backup due after the NaN
    assert not all(np.isfinite(w).all() for w in model.get_weights())

    # The backup kept is the healthy one, after the first 8 batches.
    restored = make_model("sequential")
    trainop.keras.compile(restored, optimizer="sgd", loss="mse", check_numerics=False)
    checkpoint = tf.train.Checkpoint(model=restored)
    checkpoint.restore(tf.train.latest_checkpoint(str(tmp_path))).expect_partial()
    for got, expected in zip(restored.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_backup_and_restore_needs_trainops_compile():
    model = make_model("sequential")
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="compiled by trainop.keras.compile"):
        model.fit(X, Y, verbose=0, callbacks=[trainop.keras.BackupAndRestore("/nonexistent/never")])
    with pytest.raises(ValueError, match="save_freq"):
        trainop.keras.BackupAndRestore("/tmp/x", save_freq=0)


def test_validation_data_and_callbacks_see_what_keras_fit_gives_them():
    model = make_model("functional")
    trainop.keras.compile(model, optimizer="adam", loss="mse", metrics=["mae"])
    reference = make_model("functional")
    reference.compile(optimizer="adam", loss="mse", metrics=["mae"])
    seen, expected_seen = [], []

    def recorder(into):
        return keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: into.append((batch, float(logs["loss"])))
        )

    fit = dict(batch_size=BATCH, epochs=2, shuffle=False, verbose=0, validation_data=(X, Y))
    history = model.fit(X, Y, callbacks=[recorder(seen)], **fit).history
    expected = reference.fit(X, Y, callbacks=[recorder(expected_seen)], **fit).history
    for key in ("loss", "mae", "val_loss", "val_mae"):
        np.testing.assert_allclose(history[key], expected[key], rtol=1e-5)
    assert [b for b, _ in seen] == [b for b, _ in expected_seen]
    np.testing.assert_allclose([v for _, v in seen], [v for _, v in expected_seen], rtol=1e-5)


def test_mixed_precision_skips_as_it_trains_without_the_bad_batches():
    bad = [2]
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = make_model("sequential")
        # auto_scale_loss wraps the optimizer in a LossScaleOptimizer, as in plain fit.
        trainop.keras.compile(model, optimizer="adam", loss="mse", check_numerics="skip")
        reference = make_model("sequential")
        reference.compile(optimizer="adam", loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        model.fit(*with_bad_batches(bad), batch_size=BATCH, shuffle=False, verbose=0)
        reference.fit(*without_batches(bad), batch_size=BATCH, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    for got, expected in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    # Both loss-scale optimizers skipped the same overflowing steps of their own.
    assert int(model.optimizer.iterations) == int(reference.optimizer.iterations)
    assert float(model.optimizer.dynamic_scale) == float(reference.optimizer.dynamic_scale)


def test_a_layer_the_loss_does_not_reach_is_reported_as_asked():
    inputs = keras.Input((5,))
    used = keras.layers.Dense(1, name="used")(inputs)
    unused = keras.layers.Dense(1, name="unused")(inputs)
    model = keras.Model(inputs, {"used": used, "unused": unused})
    trainop.keras.compile(model, optimizer="sgd", loss={"used": "mse"}, missing_gradients="raise")
    with pytest.raises(ValueError, match="unused"):
        model.fit(X, {"used": Y, "unused": Y}, batch_size=BATCH, verbose=0)


def test_a_tf_keras_model_is_refused_in_one_sentence():
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential([tf_keras.layers.Dense(1, input_shape=(5,))])
    with pytest.raises(TypeError, match="a tf_keras model, whose fit differs"):
        trainop.keras.compile(model, optimizer="sgd", loss="mse")


def test_a_later_model_compile_gives_the_model_back_keras_step():
    model = make_model("sequential")
    trainop.keras.compile(model, optimizer="sgd", loss="mse", check_numerics="skip")
    assert "skipped_steps" in model.fit(X, Y, batch_size=BATCH, verbose=0).history
    model.compile(optimizer="sgd", loss="mse")
    reference = make_model("sequential")
    reference.compile(optimizer="sgd", loss="mse")
    reference.set_weights(model.get_weights())
    history = model.fit(*with_bad_batches([2]), batch_size=BATCH, shuffle=False, verbose=0)
    expected = reference.fit(*with_bad_batches([2]), batch_size=BATCH, shuffle=False, verbose=0)
    # Keras's own step again: no skipped_steps, and the NaN batch is trained on as Keras does.
    assert set(history.history) == {"loss"}
    assert not all(np.isfinite(w).all() for w in model.get_weights())
    assert np.isnan(history.history["loss"][0]) and np.isnan(expected.history["loss"][0])


def two_outputs_with_dropout() -> keras.Model:
    keras.utils.set_random_seed(2)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dropout(0.3)(keras.layers.Dense(8, activation="tanh")(inputs))
    model = keras.Model(
        inputs, {"a": keras.layers.Dense(1, name="a")(hidden), "b": keras.layers.Dense(1)(hidden)}
    )
    # Both outputs' metrics are named mean_absolute_error: the same variable paths.
    trainop.keras.compile(
        model,
        optimizer=keras.optimizers.Adam(0.01),
        loss={"a": "mse", "b": "mse"},
        metrics={"a": ["mae"], "b": ["mae"]},
    )
    return model


def test_a_resumed_fit_with_dropout_and_metrics_sharing_names_equals_an_uninterrupted_one(
    tmp_path,
):
    data = (X, {"a": Y, "b": 2 * Y})
    fit = dict(batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    uninterrupted = two_outputs_with_dropout()
    expected = uninterrupted.fit(*data, **fit).history
    stopped = two_outputs_with_dropout()
    stopped.fit(
        *data, callbacks=[SignalAt(1, 2), trainop.keras.BackupAndRestore(str(tmp_path))], **fit
    )
    rerun = two_outputs_with_dropout()
    history = rerun.fit(
        *data, callbacks=[trainop.keras.BackupAndRestore(str(tmp_path))], **fit
    ).history
    assert set(history) == set(expected)
    for key, values in history.items():
        np.testing.assert_allclose(values, expected[key][1:], rtol=1e-5, err_msg=key)
    # The dropout masks after the resume were the uninterrupted run's: the same weights.
    assert_same_state(rerun, uninterrupted)
    # A later fit starts at its own first epoch again.
    assert len(rerun.fit(*data, **fit).history["loss"]) == 2


def test_a_refused_setting_leaves_the_model_as_it_was():
    model = make_model("sequential")
    trainop.keras.compile(model, optimizer="sgd", loss="mse", check_numerics="skip")
    step = model.train_step
    with pytest.raises(ValueError, match="run_eagerly=True"):
        trainop.keras.compile(model, optimizer="adam", loss="mae", run_eagerly=True)
    with pytest.raises(ValueError, match="missing_gradients"):
        trainop.keras.compile(model, optimizer="adam", loss="mae", missing_gradients="bogus")
    # Still compiled as before, with trainop's step.
    assert model.train_step == step
    assert isinstance(model.optimizer, keras.optimizers.SGD)


def with_batch_norm_and_dropout() -> keras.Model:
    keras.utils.set_random_seed(3)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1),
        ]
    )


@pytest.mark.parametrize("check_numerics", ["skip", True])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_rejected_batch_leaves_batch_norm_statistics_and_dropout_state_as_they_were(
    check_numerics, jit_compile
):
    # NaN inputs: the forward pass writes NaN into the moving statistics before any check.
    x = X.copy()
    x[2 * BATCH : 3 * BATCH] = np.nan
    model = with_batch_norm_and_dropout()
    # SGD: Adam would magnify the round-off by which XLA's gradient of the bias before the
    # normalization (zero, in exact arithmetic) differs between the two steps.
    trainop.keras.compile(
        model, optimizer="sgd", loss="mse", check_numerics=check_numerics, jit_compile=jit_compile
    )
    reference = with_batch_norm_and_dropout()
    reference.compile(optimizer="sgd", loss="mse", jit_compile=jit_compile)
    if check_numerics == "skip":
        model.fit(x, Y, batch_size=BATCH, shuffle=False, verbose=0)
        keep = [i for i in range(len(X)) if i // BATCH != 2]
        reference.fit(X[keep], Y[keep], batch_size=BATCH, shuffle=False, verbose=0)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="LossTensor is inf or nan"):
            model.fit(x, Y, batch_size=BATCH, shuffle=False, verbose=0)
        reference.fit(X[: 2 * BATCH], Y[: 2 * BATCH], batch_size=BATCH, shuffle=False, verbose=0)
    # Every variable the model holds (the seed generator's state too) and the optimizer's.
    tolerance = dict(rtol=1e-5, atol=1e-6) if jit_compile else dict(rtol=0, atol=0)
    for got, expected in zip(state(model), state(reference)):
        np.testing.assert_allclose(got, expected, **tolerance)
