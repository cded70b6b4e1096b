"""trainop.train: cadence, checkpoints, resume across processes, SIGTERM, progress, bad input."""

from __future__ import annotations

import logging
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainop
from conftest import make_optimizer, read_summaries

CHILD = pathlib.Path(__file__).parent / "programs" / "train_child.py"


def _child(logdir, max_steps, *extra):
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(logdir), str(max_steps), *map(str, extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


CHILD_TIMEOUT = 300  # seconds: far beyond a healthy run, so that a hung child fails the test


def _communicate(child, timeout=CHILD_TIMEOUT):
    """The child's (stdout, stderr) once it ends; killed, and the test failed, if it hangs."""
    try:
        return child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        _, err = child.communicate()
        pytest.fail(f"the child did not end within {timeout} s; its stderr: {err[-2000:]}")


def _losses(stdout):
    """{global step: loss} from the child's `step N LOSS` lines."""
    lines = [line.split() for line in stdout.splitlines() if line.startswith("step ")]
    return {int(step): float(loss) for _, step, loss in lines}


def _checkpointed_step(logdir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(logdir)))
    return int(reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE"))


def test_a_killed_run_resumes_and_reproduces_the_uninterrupted_losses(tmp_path):
    whole = _child(tmp_path / "whole", 60)
    crashed = _child(tmp_path / "crashed", 60, "--crash-at", 35)
    whole_out, whole_err = _communicate(whole)
    crashed_out, _ = _communicate(crashed)
    assert whole.returncode == 0, whole_err[-2000:]
    assert crashed.returncode == -signal.SIGKILL
    assert max(_losses(crashed_out)) == 35
    assert _checkpointed_step(tmp_path / "crashed") == 30  # steps 31-35 were never saved

    resumed = _child(tmp_path / "crashed", 60)
    resumed_out, resumed_err = _communicate(resumed)
    assert resumed.returncode == 0, resumed_err[-2000:]
    expected = _losses(whole_out)
    assert sorted(_losses(resumed_out)) == list(range(31, 61))
    # The same batches, in the same order, on the same weights and optimizer state.
    assert _losses(resumed_out) == {step: expected[step] for step in range(31, 61)}
    assert "result 60 max_steps" in resumed_out


def _pump(stream, lines):
    """Puts each line of `stream` on the queue `lines`, then None at its end."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def test_sigterm_stops_after_the_step_under_way_and_loses_no_finished_step(tmp_path):
    child = _child(tmp_path, 1_000_000)
    # Both pipes are read by threads: the test waits for lines with a deadline, and a child
    # writing much to stderr never blocks on a full pipe.
    lines = queue.Queue()
    errors = []
    threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True).start()
    threading.Thread(target=lambda: errors.append(child.stderr.read()), daemon=True).start()
    deadline = time.monotonic() + CHILD_TIMEOUT
    finished, result_line = [], None
    try:
        while (line := lines.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
            if line.startswith("step "):
                finished.append(int(line.split()[1]))
                if finished[-1] == 25:
                    child.send_signal(signal.SIGTERM)
            elif line.startswith("result "):
                result_line = line
        child.wait(timeout=max(1.0, deadline - time.monotonic()))
    except (queue.Empty, subprocess.TimeoutExpired):
        pytest.fail(f"the child did not end within {CHILD_TIMEOUT} s; last steps: {finished[-3:]}")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0 and result_line is not None, "".join(errors)[-2000:]
    assert result_line.split()[2] == "SIGTERM"
    last = finished[-1]
    assert 25 <= last < 1_000_000
    assert int(result_line.split()[1]) == last
    assert _checkpointed_step(tmp_path) == last


def _linear(seed=0):
    w = tf.Variable(np.random.default_rng(seed).normal(size=(3,)).astype(np.float32), name="w")
    target = tf.constant([1.0, -2.0, 0.5])
    return w, lambda: tf.reduce_sum((w - target) ** 2)


def test_hooks_run_at_their_cadence_with_the_loss_of_that_step():
    w, loss_fn = _linear()
    step = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(loss_fn, make_optimizer("keras", "sgd", 0.1), step)
    seen = []
    result = trainop.train(
        train_op,
        max_steps=30,
        hooks=[trainop.Hook(lambda s, loss: seen.append((s, loss)), every_n_steps=10)],
        global_step=step,
        progress=False,
    )
    assert [s for s, _ in seen] == [10, 20, 30]
    # Each step multiplies the distance to the target by 1 - 2 * 0.1.
    initial = float(np.sum((w.numpy() - [1.0, -2.0, 0.5]) ** 2)) / 0.8 ** (2 * 30)
    np.testing.assert_allclose(
        [loss for _, loss in seen], [initial * 0.8 ** (2 * (s - 1)) for s, _ in seen], 1e-4
    )
    assert (result.global_step, result.steps_run, result.stopped_by) == (30, 30, "max_steps")


def test_a_hook_can_stop_training_and_the_stop_is_saved(tmp_path):
    w, loss_fn = _linear()
    step = tf.Variable(0, dtype=tf.int64)
    optimizer = make_optimizer("keras", "sgd", 0.1)
    train_op = trainop.create_train_op(loss_fn, optimizer, step)

    def stop_at_7(s, loss):
        if s == 7:
            raise trainop.StopTraining("enough")

    result = trainop.train(
        train_op,
        max_steps=100,
        logdir=str(tmp_path),
        checkpoint={"w": w, "optimizer": optimizer},
        hooks=[trainop.Hook(stop_at_7)],
        global_step=step,
        progress=False,
    )
    assert (result.global_step, result.stopped_by) == (7, "StopTraining: enough")
    assert _checkpointed_step(tmp_path) == 7


def test_a_plain_iterable_resumes_after_the_batches_it_consumed(tmp_path):
    def run(max_steps):
        w = tf.Variable(0.0)
        step = tf.Variable(0, dtype=tf.int64)
        train_op = trainop.create_train_op(
            lambda x: (w - x) ** 2, make_optimizer("keras", "sgd", 0.1), step
        )
        batches = [tf.constant(float(i)) for i in range(40)]
        trainop.train(
            train_op,
            batches,
            max_steps=max_steps,
            logdir=str(tmp_path),
            checkpoint={"w": w},
            save_every_n_steps=5,
            global_step=step,
            progress=False,
        )
        return w.numpy(), int(step.numpy())

    run(12)
    resumed_w, resumed_step = run(30)
    tf.io.gfile.rmtree(str(tmp_path))
    whole_w, whole_step = run(30)
    assert resumed_step == whole_step == 30
    assert resumed_w == whole_w


def _nan_at_step(step_of_nan, tmp_path, **train_kwargs):
    """Trains w with an unchecked train op whose data turns the weights NaN at a step."""
    w = tf.Variable([1.0, 2.0], name="w")
    step = tf.Variable(0, dtype=tf.int64)
    data = [tf.constant(np.nan if i + 1 == step_of_nan else 1.0) for i in range(100)]
    train_op = trainop.create_train_op(
        lambda x: tf.reduce_sum(x * w * w),
        make_optimizer("keras", "sgd", 0.01),
        step,
        check_numerics=False,
    )
    return (
        w,
        step,
        lambda: trainop.train(
            train_op,
            data,
            logdir=str(tmp_path),
            checkpoint={"w": w},
            global_step=step,
            progress=False,
            **train_kwargs,
        ),
    )


def test_no_checkpoint_with_nan_weights_is_written_and_the_healthy_one_is_kept(tmp_path):
    w, step, run = _nan_at_step(15, tmp_path, save_every_n_steps=10, max_checkpoints_to_keep=1)
    with pytest.raises(FloatingPointError, match=r"global step 20: .*\['w'\]"):
        run()
    assert np.isnan(w.numpy()).all()
    assert tf.train.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths == [
        str(tmp_path / "ckpt-10")
    ]
    assert _checkpointed_step(tmp_path) == 10


def test_resume_skips_a_checkpoint_holding_nan(tmp_path):
    w = tf.Variable([1.0, 2.0], name="w")
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(w=w, global_step=step), str(tmp_path), 5
    )
    step.assign(10)
    manager.save(10)
    w.assign([np.nan, 0.0])
    step.assign(20)
    manager.save(20)  # written by some other program

    w.assign([5.0, 5.0])
    step.assign(0)
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(w * w), make_optimizer("keras", "sgd", 0.1), step
    )
    result = trainop.train(
        train_op,
        max_steps=12,
        logdir=str(tmp_path),
        checkpoint={"w": w},
        global_step=step,
        progress=False,
    )
    assert result.resumed_from == str(tmp_path / "ckpt-10")
    np.testing.assert_allclose(w.numpy(), np.array([1.0, 2.0]) * 0.8**2, rtol=1e-6)
    assert result.global_step == 12


def test_the_progress_bar_turns_itself_off_without_a_terminal(capsys):
    w, loss_fn = _linear()
    step = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(loss_fn, make_optimizer("keras", "sgd", 0.1), step)
    trainop.train(train_op, max_steps=5, global_step=step)  # progress=None, stderr captured
    assert capsys.readouterr().err == ""
    trainop.train(train_op, max_steps=10, global_step=step, progress=True)
    final_bar = re.split(r"[\r\n]", capsys.readouterr().err.strip())[-1]
    # tqdm gives the rate as steps a second, or below one step a second as seconds a step
    # ("?step/s" before it can tell): a slow machine prints the latter.
    assert re.search(r"\b10/10 \[.*(\?step/s|[\d.]+step/s|[\d.]+s/step), loss=", final_bar), (
        final_bar
    )


def test_a_log_line_during_the_progress_bar_starts_a_line_of_its_own(capsys):
    """A hook's (or a signal's) warning while the bar is drawn is written above the bar, not
    glued to the end of its line."""
    w, loss_fn = _linear()
    step = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(loss_fn, make_optimizer("keras", "sgd", 0.1), step)

    def warn(step, loss):
        if step == 3:
            logging.getLogger("trainop").warning("a warning at step 3")

    hooks = [trainop.Hook(warn)]
    trainop.train(train_op, max_steps=5, global_step=step, progress=True, hooks=hooks)
    lines = re.split(r"[\r\n]", capsys.readouterr().err)
    assert "a warning at step 3" in lines


def test_graph_train_op_trains_saves_and_resumes(tmp_path):
    def run(max_steps):
        with tf.Graph().as_default():
            w = tf.compat.v1.get_variable("w", initializer=[3.0, 4.0], use_resource=True)
            train_op = trainop.create_train_op(
                tf.reduce_sum(w * w), tf.compat.v1.train.GradientDescentOptimizer(0.1)
            )
            with tf.compat.v1.Session() as session:
                result = trainop.train(
                    train_op,
                    max_steps=max_steps,
                    logdir=str(tmp_path),
                    checkpoint={"w": w},
                    save_every_n_steps=4,
                    progress=False,
                    session=session,
                )
                return result, session.run(w)

    first, _ = run(6)
    second, w = run(10)
    assert (first.global_step, second.global_step, second.steps_run) == (6, 10, 4)
    assert second.resumed_from == str(tmp_path / "ckpt-6")
    np.testing.assert_allclose(w, np.array([3.0, 4.0]) * 0.8**10, rtol=1e-5)


def test_a_train_op_that_does_not_count_the_step_is_stopped():
    w, loss_fn = _linear()
    unrelated = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(loss_fn, make_optimizer("keras"), global_step=None)
    with pytest.raises(RuntimeError, match="stayed at 0 for 1000 calls"):
        trainop.train(train_op, max_steps=5, global_step=unrelated, progress=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_steps": 0}, ValueError, "`max_steps` must be a positive integer"),
        ({}, ValueError, "Pass `dataset`, `max_steps` or both"),
        ({"max_steps": 5, "checkpoint": {"w": 1}}, ValueError, "`checkpoint` needs `logdir`"),
        ({"max_steps": 5, "logdir": "x", "checkpoint": [1]}, TypeError, "`checkpoint` must map"),
        ({"max_steps": 5, "hooks": [print]}, TypeError, "`hooks` must hold trainop.Hook"),
        ({"max_steps": 5, "save_every_n_steps": 1.5}, ValueError, "`save_every_n_steps`"),
        ({"dataset": 3}, TypeError, "`dataset` must be a tf.data.Dataset"),
        ({"max_steps": 5, "global_step": 1.0}, TypeError, "`global_step` must be"),
        ({"max_steps": 5, "restore_data_position": "no"}, TypeError, "`restore_data_position`"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    w, loss_fn = _linear()
    train_op = trainop.create_train_op(loss_fn, make_optimizer("keras"), global_step=None)
    with pytest.raises(error, match=match):
        trainop.train(train_op, progress=False, **kwargs)


def test_bad_train_op_and_hook():
    with pytest.raises(TypeError, match="`train_op` must be a callable"):
        trainop.train(3, max_steps=1)
    with pytest.raises(ValueError, match="`every_n_steps` must be a positive integer"):
        trainop.Hook(print, every_n_steps=0)
    with pytest.raises(TypeError, match="`fn` must be callable"):
        trainop.Hook(3)


def test_keras_model_checkpoint_restores_into_a_fresh_model(tmp_path):
    def build():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        optimizer = keras.optimizers.Adam(0.1)
        step = tf.Variable(0, dtype=tf.int64)
        train_op = trainop.create_train_op(
            lambda: tf.reduce_mean(model(tf.ones((4, 2))) ** 2),
            optimizer,
            step,
            variables_to_train=model.trainable_variables,
        )
        return model, optimizer, step, train_op

    model, optimizer, step, train_op = build()
    trainop.train(
        train_op,
        max_steps=5,
        logdir=str(tmp_path),
        checkpoint={"model": model, "optimizer": optimizer},
        global_step=step,
        progress=False,
    )
    fresh, fresh_optimizer, fresh_step, fresh_op = build()
    result = trainop.train(
        fresh_op,
        max_steps=5,
        logdir=str(tmp_path),
        checkpoint={"model": fresh, "optimizer": fresh_optimizer},
        global_step=fresh_step,
        progress=False,
    )
    assert result.steps_run == 0 and int(fresh_step.numpy()) == 5
    for a, b in zip(model.weights + optimizer.variables, fresh.weights + fresh_optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("family", ["v1", "keras", "tf_keras", "tf_keras_legacy"])
def test_the_nan_check_covers_models_built_late_and_optimizer_slots(tmp_path, family):
    # No keras.Input: the model's weights appear on its first call. With a huge batch, Adam's
    # second moment overflows to inf in a slot while the weights stay finite.
    model = keras.Sequential([keras.layers.Dense(1, name="dense")])
    optimizer = make_optimizer(family, "adam", 0.001)
    step = tf.Variable(0, dtype=tf.int64)
    data = [tf.fill((2, 3), 1.0)] * 3 + [tf.fill((2, 3), 1e30)] * 5
    train_op = trainop.create_train_op(
        lambda x: tf.reduce_mean(model(x) ** 2), optimizer, step, check_numerics=False
    )
    with pytest.raises(FloatingPointError, match="global step 4"):
        trainop.train(
            train_op,
            data,
            logdir=str(tmp_path),
            checkpoint={"model": model, "optimizer": optimizer},
            save_every_n_steps=1,
            global_step=step,
            progress=False,
        )
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-3")


def test_every_checkpoint_holding_nan_is_an_error_not_a_start(tmp_path):
    w = tf.Variable([np.nan, 1.0], name="w")
    step = tf.Variable(20, dtype=tf.int64)
    tf.train.CheckpointManager(tf.train.Checkpoint(w=w, global_step=step), str(tmp_path), 3).save(
        20
    )
    w.assign([1.0, 1.0])
    step.assign(0)
    train_op = trainop.create_train_op(lambda: tf.reduce_sum(w * w), make_optimizer("keras"), step)
    with pytest.raises(FloatingPointError, match="Every checkpoint in .* holds inf or NaN"):
        trainop.train(
            train_op, max_steps=30, logdir=str(tmp_path), checkpoint={"w": w}, global_step=step
        )


@pytest.mark.parametrize("session_kind", ["none", "not_default"])
def test_graph_mode_saves_without_a_default_session(tmp_path, session_kind):
    graph = tf.Graph()
    with graph.as_default():
        w = tf.compat.v1.get_variable("w", initializer=[3.0, 4.0], use_resource=True)
        train_op = trainop.create_train_op(
            tf.reduce_sum(w * w), tf.compat.v1.train.GradientDescentOptimizer(0.1)
        )
    session = None if session_kind == "none" else tf.compat.v1.Session(graph=graph)
    result = trainop.train(
        train_op,
        max_steps=5,
        logdir=str(tmp_path),
        checkpoint={"w": w},
        session=session,
        progress=False,
    )
    assert result.global_step == 5 and _checkpointed_step(tmp_path) == 5
    reader = tf.train.load_checkpoint(str(tmp_path / "ckpt-5"))
    np.testing.assert_allclose(
        reader.get_tensor("w/.ATTRIBUTES/VARIABLE_VALUE"), np.array([3.0, 4.0]) * 0.8**5, 1e-5
    )


def test_a_generator_dataset_is_counted_and_a_plain_generator_is_not_replayed(tmp_path):
    def numbers():
        yield from (float(i) for i in range(100))

    def run(dataset, max_steps):
        w = tf.Variable(0.0, name="w")
        step = tf.Variable(0, dtype=tf.int64)
        seen = []
        train_op = trainop.create_train_op(
            lambda x: (w - x) ** 2, make_optimizer("keras", "sgd", 0.0), step
        )
        trainop.train(
            lambda x: (seen.append(float(x)), train_op(x))[1],
            dataset,
            max_steps=max_steps,
            logdir=str(tmp_path / type(dataset).__name__),
            checkpoint={"w": w},
            global_step=step,
            progress=False,
        )
        return seen

    from_generator = lambda: tf.data.Dataset.from_generator(  # noqa: E731
        numbers, output_signature=tf.TensorSpec((), tf.float32)
    )
    assert run(from_generator(), 3) == [0.0, 1.0, 2.0]
    # Its state cannot be saved: the resumed run skips the 3 batches consumed.
    assert run(from_generator(), 5) == [3.0, 4.0]
    assert run(numbers(), 3) == [0.0, 1.0, 2.0]
    # A generator is taken where it is: a fresh one starts at its start.
    assert run(numbers(), 5) == [0.0, 1.0]


def test_batches_as_dicts_and_losses_as_structures():
    w = tf.Variable(0.0)
    step = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(
        lambda x, target: (w * x - target) ** 2, make_optimizer("keras", "sgd", 0.1), step
    )
    seen = []
    result = trainop.train(
        lambda **batch: {"aux": 123.0, "loss": train_op(**batch)},
        [{"x": tf.constant(1.0), "target": tf.constant(2.0)}] * 2,
        hooks=[trainop.Hook(lambda s, loss: seen.append(loss))],
        global_step=step,
        progress=False,
    )
    assert seen == [4.0, pytest.approx(2.56)]  # the 'loss' entry, not the first key
    assert result.loss == pytest.approx(2.56)


def test_an_eager_tensor_is_not_a_train_op():
    with pytest.raises(TypeError, match="An eager tensor is a value already computed"):
        trainop.train(tf.constant(1.0), max_steps=1)


# --- Why the loop stopped, and resuming with another input pipeline ----------------------------


def _counting_step():
    """A train op adding each batch (a float) to `total`, its global step, and `total`."""
    total = tf.Variable(0.0)
    step = tf.Variable(0, dtype=tf.int64)
    w = tf.Variable(0.0)

    def loss_fn(x):
        total.assign_add(x)
        return (w - x) ** 2

    train_op = trainop.create_train_op(loss_fn, make_optimizer("keras", "sgd", 0.1), step)
    return train_op, step, total, w


@pytest.mark.parametrize("max_steps", [None, 10_000])
def test_the_end_of_the_data_is_a_reason_to_stop_and_is_logged(caplog, max_steps):
    train_op, step, total, _ = _counting_step()
    dataset = tf.data.Dataset.range(8).map(lambda i: tf.cast(i, tf.float32))
    with caplog.at_level("INFO", logger="trainop"):
        result = trainop.train(
            train_op, dataset, max_steps=max_steps, global_step=step, progress=False
        )
    assert (result.stopped_by, result.global_step, result.steps_run) == ("end_of_data", 8, 8)
    assert float(total.numpy()) == sum(range(8))
    lines = [r for r in caplog.records if "ran out" in r.getMessage()]
    assert len(lines) == 1
    # Short of max_steps, a warning (shown by default); the expected end, a note.
    assert lines[0].levelname == ("INFO" if max_steps is None else "WARNING")
    assert "global step 8" in lines[0].getMessage()


def test_reaching_max_steps_is_the_reason_even_when_resumed_there(tmp_path, caplog):
    train_op, step, _, w = _counting_step()
    kwargs = dict(logdir=str(tmp_path), checkpoint={"w": w}, global_step=step, progress=False)
    first = trainop.train(train_op, [1.0] * 20, max_steps=5, **kwargs)
    with caplog.at_level("WARNING", logger="trainop"):
        again = trainop.train(train_op, [1.0] * 20, max_steps=5, **kwargs)
    assert (first.stopped_by, again.stopped_by, again.steps_run) == ("max_steps", "max_steps", 0)
    # A run that resumes with nothing left to do says so (a silent return looks like a hang
    # that ended, or a run that did not resume).
    [record] = [r for r in caplog.records if r.name == "trainop" and "Resumed" in r.getMessage()]
    assert record.getMessage().startswith(f"Resumed from {tmp_path / 'ckpt-5'} at global step 5")


def test_a_graph_input_running_out_ends_the_loop():
    with tf.Graph().as_default():
        x = tf.compat.v1.data.make_one_shot_iterator(
            tf.data.Dataset.from_tensor_slices([1.0, 2.0, 3.0])
        ).get_next()
        w = tf.compat.v1.get_variable("w", initializer=0.0, use_resource=True)
        train_op = trainop.create_train_op(
            (w - x) ** 2, tf.compat.v1.train.GradientDescentOptimizer(0.5)
        )
        with tf.compat.v1.Session() as session:
            result = trainop.train(train_op, max_steps=100, progress=False, session=session)
            # Each step moves w to the batch: w - 0.5 * 2 (w - x) = x.
            assert session.run(w) == 3.0
    assert (result.stopped_by, result.global_step, result.steps_run) == ("end_of_data", 3, 3)


def _pipeline(changed):
    dataset = tf.data.Dataset.range(100).map(lambda i: tf.cast(i, tf.float32))
    if changed:
        dataset = dataset.shuffle(4, seed=1)
    return dataset


def test_resuming_with_a_changed_pipeline_says_what_to_do_and_keeps_the_checkpoint(tmp_path):
    train_op, step, total, w = _counting_step()
    kwargs = dict(logdir=str(tmp_path), checkpoint={"w": w}, global_step=step, progress=False)
    trainop.train(train_op, _pipeline(changed=False), max_steps=4, **kwargs)
    saved = sorted(os.listdir(tmp_path))
    w_saved = float(w.numpy())

    with pytest.raises(ValueError) as raised:
        trainop.train(train_op, _pipeline(changed=True), max_steps=8, **kwargs)
    message = str(raised.value)
    assert message.startswith("`dataset` is not the input pipeline that saved")
    assert "start a new `logdir`" in message and "restore_data_position=False" in message
    assert sorted(os.listdir(tmp_path)) == saved
    assert int(step.numpy()) == 4 and float(w.numpy()) == w_saved

    # Without the data position: the rest resumes, and the new pipeline is read from its start
    # (0 + 1 + 2 + 3 of the first run, then the first four of the shuffled one).
    shuffled = [float(x) for x in _pipeline(changed=True).take(4)]
    result = trainop.train(
        train_op, _pipeline(changed=True), max_steps=8, restore_data_position=False, **kwargs
    )
    assert result.resumed_from == str(tmp_path / "ckpt-4")
    assert (result.global_step, result.steps_run) == (8, 4)
    assert float(total.numpy()) == 0 + 1 + 2 + 3 + sum(shuffled)


def test_a_counted_position_is_not_skipped_without_restore_data_position(tmp_path):
    train_op, step, total, w = _counting_step()
    kwargs = dict(logdir=str(tmp_path), checkpoint={"w": w}, global_step=step, progress=False)
    batches = [float(i) for i in range(10)]
    trainop.train(train_op, batches, max_steps=3, **kwargs)
    total.assign(0.0)
    trainop.train(train_op, batches, max_steps=5, restore_data_position=False, **kwargs)
    assert float(total.numpy()) == 0 + 1  # from the start, not from batch 3
    total.assign(0.0)
    trainop.train(train_op, batches, max_steps=7, **kwargs)
    assert float(total.numpy()) == 2 + 3  # the position saved at step 5 (two batches read)


def test_a_compiled_train_op_trains_in_a_logdir_and_its_hooks_write_there(tmp_path):
    """XLA compiles no summary write: the loop's writer is not the default one when the
    compiled train op is traced (it would refuse it), but is around the hooks."""
    w = tf.Variable(1.0)
    step = tf.Variable(0, dtype=tf.int64)
    train_op = trainop.create_train_op(
        lambda: (w - 3.0) ** 2, make_optimizer("keras", "sgd", 0.1), step, jit_compile=True
    )

    def write(global_step, loss):
        tf.summary.scalar("hook/loss", loss, step=global_step)

    result = trainop.train(
        train_op,
        max_steps=4,
        logdir=str(tmp_path),
        global_step=step,
        progress=False,
        hooks=[trainop.Hook(write, every_n_steps=2)],
    )
    assert result.global_step == 4
    assert [s for s, _ in read_summaries(str(tmp_path))["hook/loss"]] == [2, 4]
