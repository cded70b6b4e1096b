"""`train`: runs a train op with checkpoints, resume, TensorBoard, progress and a clean stop.

The loop owns what a train op does not: where the data comes from, when state is saved and
restored, what the user sees, and what happens on Ctrl-C or SIGTERM. It works with the eager
train op of `create_train_op` (or any callable step) and with a `tf.compat.v1` graph train op
run in a `Session`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from trainop import _checkpoints, _data, _global_step, _run, numerics
from trainop._checks import check_count
from trainop._global_step import USE_GLOBAL_STEP
from trainop._rollback import Rollback
from trainop._run import END_OF_DATA, MAX_STEPS, Hook, StopTraining, TrainResult

# The loop's public names; `Hook`, `StopTraining` and `TrainResult` are defined with its body.
__all__ = ["END_OF_DATA", "MAX_STEPS", "Hook", "StopTraining", "TrainResult", "train"]

logger = logging.getLogger("trainop")

# One writer per log directory for the whole process: a traced train op keeps writing to the
# writer it was traced with, and fails once that writer is deleted, so a second `train` call
# with the same train op and directory must find the same writer alive.
_WRITERS: dict[str, Any] = {}


def _writer(logdir: str) -> Any:
    logdir = os.path.abspath(logdir)
    if logdir not in _WRITERS or not tf.io.gfile.exists(logdir):
        _WRITERS[logdir] = tf.summary.create_file_writer(logdir)
    return _WRITERS[logdir]


def train(
    train_op: Callable[..., Any] | tf.Tensor | tf.Operation,
    dataset: Any = None,
    *,
    max_steps: int | None = None,
    logdir: str | None = None,
    checkpoint: Mapping[str, Any] | None = None,
    save_every_n_steps: int = 1000,
    max_checkpoints_to_keep: int = 5,
    hooks: Sequence[Hook] = (),
    progress: bool | None = None,
    global_step: Any = USE_GLOBAL_STEP,
    session: Any = None,
    restore_data_position: bool = True,
    rollback: Rollback | None = None,
    save_bad_batch: bool = False,
    partial_window: str = "apply",
) -> TrainResult:
    """Runs a train op until `max_steps` or the end of `dataset`, saving and resuming.

    Each batch of `dataset` is passed to the train op: a tuple as positional arguments, a dict as
    keyword arguments, anything else as one argument (no dataset: no arguments). With `logdir`
    and `checkpoint`, the loop restores the newest checkpoint in `logdir` whose variables are
    all finite, so that a restarted run continues at the saved global step on the batches that
    come next; it saves every `save_every_n_steps` global steps and at the end. With `logdir`,
    it is the default `tf.summary` writer around the train op's first call (when it is traced):
    the train op's summaries (`create_train_op`'s loss, gradient norm, learning rate) go there
    (for a train op compiled by XLA, `jit_compile=True`, which writes none, it is the default
    writer around the hooks only).

    On SIGTERM or a first Ctrl-C the loop finishes the step under way, saves a checkpoint and
    returns (`stopped_by` says which); a second Ctrl-C raises `KeyboardInterrupt` at once.
    The loop's parts follow its peers: TF-Slim's `learning.train` (graph train ops, a `Session`,
    the `SUMMARIES` collection written at the checkpoint cadence), Keras's `fit` with
    `BackupAndRestore` (resume where the run stopped) and `tf.train.CheckpointManager`.

    In graph mode, the loop initializes the variables the session has not initialized yet and
    writes the TF1 summaries of the `SUMMARIES` collection to `logdir` every
    `save_every_n_steps` global steps.

    Args:
      train_op: the eager train op (a callable returning the loss), or a graph train op (a
        `Tensor` or `Operation` of a `tf.compat.v1` graph), run in `session`.
      dataset: a `tf.data.Dataset`, any iterable of batches, or None (eager mode: the train op
        takes no argument; graph mode: the graph reads its own input).
      max_steps: stop when the global step reaches it (an absolute step, so a resumed run stops
        where the uninterrupted one would). None: at the end of `dataset`.
      logdir: the directory of checkpoints and TensorBoard events.
      checkpoint: what to save, as names and trackable objects: `{"model": model,
        "optimizer": optimizer}`. The loop adds the global step and the data position.
      save_every_n_steps: the checkpoint cadence, in global steps.
      max_checkpoints_to_keep: how many checkpoints `logdir` keeps, newest first.
      hooks: `Hook`s, called after the steps they ask for.
      progress: show a tqdm progress bar (step, loss, steps/s; for a train op made with
        `step_metrics=True`, also the gradient norm and the skipped steps, read when the bar
        refreshes, at most twice a second); None: when stderr is a terminal.
      global_step: the integer variable the train op counts in, which the loop reads after
        every call; `USE_GLOBAL_STEP` (the default): the global step (of the train op's
        graph in graph mode), which must exist already, as `create_train_op` makes it.
      session: graph mode: the `Session` to run in; by default a new one, whose variables the
        loop initializes (or restores).
      restore_data_position: on resume, also restore where the data was (the `tf.data`
        iterator's state, or the count of batches consumed, which are then skipped). False:
        resume everything else, and read `dataset` from its start, for a run whose input
        pipeline changed since the checkpoint was written.
      rollback: a `trainop.Rollback`: when the numerics guard gives up, restore the newest
        healthy checkpoint, lower the learning rate and go on (eager train ops, with `logdir`
        and `checkpoint`); None (the default): the guard's error ends the run.
      save_bad_batch: when the numerics guard raises on a batch, save that batch in `logdir`
        (`bad_batch-K.npz`, K its index in the data; one array per element of the batch,
        named by its place in the batch: `0`, `1` for a tuple, its keys for a dict), to load
        with `numpy.load` and inspect. The path is added to the error and to the roll back's
        log line.
      partial_window: for a train op with `accumulation_steps`, what the end of the data does
        with the calls of a window it ends inside: 'apply' (the default; their update, on
        their weighted mean, as a last short window), 'drop' them, or 'keep' them in the
        accumulation sums for a run that goes on (resumed on more data). Logged whichever it
        is. A stop inside a window (by a signal: `max_steps` and `StopTraining` stop where
        the global step moves, at a window's end) keeps them: the loop checkpoints the sums
        with the train op's `accumulator` (under the name 'accumulation'), and a resumed run
        completes the window.

    Returns:
      A `TrainResult`; its `stopped_by` says why the run ended (also logged, on the `trainop`
      logger, when the data ran out before `max_steps`).

    Raises:
      TypeError: `train_op`, `dataset`, `checkpoint`, `global_step`,
        `restore_data_position` or a hook is of the wrong type.
      ValueError: `max_steps`, `save_every_n_steps` or `max_checkpoints_to_keep` is not a
        positive integer, `partial_window` is not one of its values, there is neither
        `dataset` nor `max_steps`, `checkpoint` comes without `logdir` or uses a name the
        loop saves its own state under ('global_step', 'accumulation' with an accumulating
        train op, and 'data' with a dataset), a graph train op comes with a `dataset` or
        without `max_steps`, `global_step` is `USE_GLOBAL_STEP` and there is no global step,
        or, on resume, the checkpoint's data position cannot be restored into `dataset` (a
        changed input pipeline: see `restore_data_position`).
      FloatingPointError: a checkpoint was due and a variable holds inf or NaN: nothing is
        written, and the checkpoints already written are kept; or, on resume, every
        checkpoint in `logdir` holds inf or NaN.
      RuntimeError: the global step did not move in 1,000 calls of the train op.
      KeyboardInterrupt: a second Ctrl-C.

    Errors of the train op itself (a `tf.errors.InvalidArgumentError` of its numerics check,
    to whose message the loop adds the index of the batch in the data, counted from 0 since the
    start of the run, resumed runs included) and of a hook pass through, after the progress
    bar is closed; no checkpoint is written for them.

    Example:
      >>> import keras, tensorflow as tf, trainop
      >>> w = tf.Variable(1.0)
      >>> train_op = trainop.create_train_op(lambda: (w - 3.0) ** 2, keras.optimizers.SGD(0.1))
      >>> result = trainop.train(train_op, max_steps=50, progress=False)
      >>> result.global_step, round(float(w.numpy()), 3)
      (50, 3.0)
    """
    graph = _graph_of(train_op)
    hooks = list(hooks)
    _check_arguments(
        graph,
        dataset,
        max_steps=max_steps,
        save_every_n_steps=save_every_n_steps,
        max_checkpoints_to_keep=max_checkpoints_to_keep,
        restore_data_position=restore_data_position,
        hooks=hooks,
        checkpoint=checkpoint,
        logdir=logdir,
        rollback=rollback,
        save_bad_batch=save_bad_batch,
    )
    if partial_window not in ("apply", "drop", "keep"):
        raise ValueError(
            "`partial_window` must be 'apply', 'drop' or 'keep'. "
            f"Received: partial_window={partial_window!r}"
        )
    accumulator = getattr(train_op, "accumulator", None)
    if graph is not None:
        return _train_graph(
            train_op,
            graph,
            max_steps=max_steps,
            logdir=logdir,
            checkpoint=checkpoint,
            save_every_n_steps=save_every_n_steps,
            max_checkpoints_to_keep=max_checkpoints_to_keep,
            hooks=hooks,
            progress=progress,
            global_step=global_step,
            session=session,
            accumulator=accumulator,
            partial_window=partial_window,
        )
    step_variable = _global_step.counted_by(global_step, None)
    batches = _data.Batches(dataset)
    saver = None
    if checkpoint is not None:
        saver = _checkpoints.Checkpoints(
            checkpoint,
            step_variable,
            batches,
            logdir,
            max_checkpoints_to_keep,
            None,
            restore_data_position=restore_data_position,
            accumulator=accumulator,
        )
    resumed_from = saver.restore_latest_finite() if saver is not None else None
    if resumed_from is not None:
        batches.resumed()
        logger.info("Resumed from %s at global step %d.", resumed_from, int(step_variable.numpy()))
    writer = _writer(logdir) if logdir is not None else None
    # XLA compiles no summary write: a compiled train op refuses a default writer when traced,
    # so the writer is the default one around the hooks only.
    compiled = getattr(train_op, "_jit_compile", None) is True
    around_all = writer if writer is not None and not compiled else None
    with around_all.as_default() if around_all is not None else contextlib.nullcontext():
        return _run.run(
            lambda: _step_on_next_batch(train_op, batches, logdir if save_bad_batch else None),
            read_step=lambda: int(step_variable.numpy()),
            saver=saver,
            resumed_from=resumed_from,
            max_steps=max_steps,
            save_every_n_steps=save_every_n_steps,
            hooks=hooks,
            progress=progress,
            rollback=rollback,
            hooks_writer=writer if compiled else None,
            window=(
                _run.PartialWindow(accumulator, partial_window) if accumulator is not None else None
            ),
            step_metrics=getattr(train_op, "step_metrics", None),
        )


def _step_on_next_batch(
    train_op: Callable[..., Any], batches: _data.Batches, bad_batch_dir: str | None = None
) -> Any:
    """The train op on the next batch; its numerics error names the batch's index (and where
    the batch was saved, with `bad_batch_dir`)."""
    batch = next(batches)
    try:
        return _data.call_with_batch(train_op, batch)
    except tf.errors.InvalidArgumentError as error:
        index = batches.consumed - 1
        where = f"batch {index} of the data"
        if bad_batch_dir is not None and numerics.is_guard_error(error):
            where += f", saved in {_data.save_batch(batch, bad_batch_dir, index)}"
        raise type(error)(error.node_def, error.op, f"{error.message} ({where})") from error


def _graph_of(train_op: Any) -> tf.Graph | None:
    """The `tf.compat.v1` graph of a graph train op; None for an eager (callable) one.

    Raises:
      TypeError: if `train_op` is neither.
    """
    graph_parts = [t for t in tf.nest.flatten(train_op) if isinstance(t, (tf.Tensor, tf.Operation))]
    # (An eager tensor has no graph.)
    if graph_parts and all(hasattr(t, "graph") for t in graph_parts):
        return graph_parts[0].graph
    if not callable(train_op):
        raise TypeError(
            "`train_op` must be a callable train op (eager mode), or a Tensor, Operation or "
            "structure of tensors of a tf.compat.v1 graph (what create_train_op and "
            "create_train_step return there). An eager tensor is a value already computed: "
            f"pass the train op from create_train_op instead. Received: {train_op!r:.200}"
        )
    return None


def _check_arguments(
    graph: tf.Graph | None,
    dataset: Any,
    *,
    max_steps: Any,
    save_every_n_steps: Any,
    max_checkpoints_to_keep: Any,
    restore_data_position: Any,
    hooks: list[Any],
    checkpoint: Any,
    logdir: Any,
    rollback: Any,
    save_bad_batch: Any,
) -> None:
    """Raises, before anything runs, for the arguments of `train` that cannot work together
    or are of the wrong type (see `train`'s Raises)."""
    if max_steps is not None:
        check_count("max_steps", max_steps)
    check_count("save_every_n_steps", save_every_n_steps)
    check_count("max_checkpoints_to_keep", max_checkpoints_to_keep)
    if not isinstance(restore_data_position, bool):
        raise TypeError(
            "`restore_data_position` must be True or False. "
            f"Received: restore_data_position={restore_data_position!r:.200}"
        )
    for hook in hooks:
        if not isinstance(hook, Hook):
            raise TypeError(f"`hooks` must hold trainop.Hook objects. Received: {hook!r:.200}")
    if dataset is not None and not isinstance(dataset, (tf.data.Dataset, Iterable)):
        raise TypeError(
            "`dataset` must be a tf.data.Dataset, an iterable of batches or None. "
            f"Received: dataset of type {type(dataset).__name__}"
        )
    if checkpoint is not None:
        if not isinstance(checkpoint, Mapping):
            raise TypeError(
                "`checkpoint` must map names to trackable objects, such as "
                "{'model': model, 'optimizer': optimizer}. "
                f"Received: checkpoint of type {type(checkpoint).__name__}"
            )
        if logdir is None:
            raise ValueError("`checkpoint` needs `logdir`, the directory to save it in.")
    if graph is not None:
        if dataset is not None:
            raise ValueError(
                "`dataset` must be None for a graph train op: the graph reads its own input."
            )
        if max_steps is None:
            raise ValueError("A graph train op needs `max_steps`: it has no end of data.")
    elif dataset is None and max_steps is None:
        raise ValueError("Pass `dataset`, `max_steps` or both: there is nothing to stop the loop.")
    if not isinstance(save_bad_batch, bool):
        raise TypeError(
            f"`save_bad_batch` must be True or False. Received: save_bad_batch={save_bad_batch!r}"
        )
    if save_bad_batch and (logdir is None or graph is not None):
        raise ValueError(
            "`save_bad_batch` needs `logdir`, where the batch is saved, and an eager train op "
            "(a graph train op reads its own input)."
        )
    if rollback is not None:
        if not isinstance(rollback, Rollback):
            raise TypeError(
                f"`rollback` must be a trainop.Rollback or None. Received: {rollback!r:.200}"
            )
        if graph is not None:
            raise ValueError(
                "`rollback` needs an eager train op (a callable): a graph train op has none."
            )
        if checkpoint is None:
            raise ValueError(
                "`rollback` needs `logdir` and `checkpoint`: it goes back to the newest healthy "
                "checkpoint there."
            )
        rollback.check_saved_in(checkpoint)


def _train_graph(
    train_op: Any,
    graph: tf.Graph,
    *,
    max_steps: int,
    logdir: str | None,
    checkpoint: Mapping[str, Any] | None,
    save_every_n_steps: int,
    max_checkpoints_to_keep: int,
    hooks: list[Hook],
    progress: bool | None,
    global_step: Any,
    session: Any,
    accumulator: Any,
    partial_window: str,
) -> TrainResult:
    with graph.as_default():
        step_variable = _global_step.counted_by(global_step, graph)
        read_step_tensor = step_variable.read_value()
        batches = _data.Batches(None)
        owns_session = session is None
        if owns_session:
            session = tf.compat.v1.Session(graph=graph)
        saver = (
            _checkpoints.Checkpoints(
                checkpoint,
                step_variable,
                batches,
                logdir,
                max_checkpoints_to_keep,
                session,
                accumulator=accumulator,
            )
            if checkpoint is not None
            else None
        )
        # What the session has not initialized yet (all of it in a new session), as
        # MonitoredSession does; a restored checkpoint then overwrites what it holds.
        variables = tf.compat.v1.global_variables() + tf.compat.v1.local_variables()
        uninitialized = set(session.run(tf.compat.v1.report_uninitialized_variables(variables)))
        session.run(
            tf.compat.v1.variables_initializer(
                [v for v in variables if v.op.name.encode() in uninitialized]
            )
        )
        # TF1 summaries (the SUMMARIES collection) are written at the checkpoint cadence.
        summary_op = tf.compat.v1.summary.merge_all()
        summary_writer = (
            tf.compat.v1.summary.FileWriter(logdir, graph)
            if logdir is not None and summary_op is not None
            else None
        )

    def write_summaries(step: int) -> None:
        if summary_writer is not None:
            summary_writer.add_summary(session.run(summary_op), step)

    try:
        # Checkpoint restores and saves add ops to the default graph and run them in the
        # default session.
        with graph.as_default(), session.as_default():
            resumed_from = saver.restore_latest_finite() if saver is not None else None
            result = _run.run(
                lambda: session.run(train_op),
                read_step=lambda: int(session.run(read_step_tensor)),
                saver=saver,
                resumed_from=resumed_from,
                max_steps=max_steps,
                save_every_n_steps=save_every_n_steps,
                hooks=[*hooks, Hook(lambda step, loss: write_summaries(step), save_every_n_steps)],
                progress=progress,
                window=(
                    _run.PartialWindow(accumulator, partial_window, session)
                    if accumulator is not None
                    else None
                ),
            )
    finally:
        if summary_writer is not None:
            summary_writer.close()
        if owns_session:
            session.close()
    return result
