"""trainop's public surface, compared with a snapshot: what a refactoring must leave unchanged.

`tests/snapshots/surface.json` holds, as data: `trainop.__all__` and every public name's kind and
signature; the error of each of a table of bad inputs (type, message, and whether it is raised
when the train op is built or when its step is first traced); the graph op names
and name scopes that `create_train_op` and `create_train_step` add, the `TRAIN_OP` collection and
the TF1 summaries' tags; the summary tags and steps written in eager and graph mode; and how
many times the eager train op traces. Each section is compared with its snapshot; a failure
shows the unified diff of the section's JSON.

Only the public API is used (`import trainop`, `trainop.NAME`), so that the test keeps passing
while the internal modules move.

To change the snapshot deliberately, after checking that the diff is what was meant:

    python tests/test_surface.py --update            # every section
    TRAINOP_UPDATE_SNAPSHOT=1 pytest tests/test_surface.py   # the sections that run
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import difflib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import trainop  # noqa: E402

SNAPSHOT = Path(__file__).parent / "snapshots" / "surface.json"
UPDATE_VARIABLE = "TRAINOP_UPDATE_SNAPSHOT"

# TF-Agents' and TF-Slim's `_USE_GLOBAL_STEP` (tf_agents/utils/eager_utils.py,
# tf_slim/learning.py): trainop.USE_GLOBAL_STEP must keep their value.
PEERS_USE_GLOBAL_STEP = 0

# Full op names that trainop itself gives, kept whole in the graph section.
OWN_OP_NAMES = ("update_barrier", "train_op", "loss_pre_train", "loss_post_train")

# A tiny regression model: y = x @ w + b, on a batch of four.
X = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], np.float32)
Y = np.array([[1.0], [2.0], [3.0], [4.0]], np.float32)


# --- Helpers ----------------------------------------------------------------------------------


def normalize(message: str) -> str:
    """`message` without what changes between runs and installations: addresses, temporary
    paths, and the modules of other libraries' classes in default reprs."""
    message = re.sub(r"<(?:\w+\.)*(\w+) object at 0x[0-9a-fA-F]+>", r"<\1 object>", message)
    message = re.sub(r"0x[0-9a-fA-F]+", "0x?", message)
    message = re.sub(re.escape(tempfile.gettempdir()) + r"/[^\s'\",\]]+", "<tmp>", message)
    return message


def own_classes(cls: type) -> list[type]:
    """`cls` and the classes it inherits from trainop (not TensorFlow's or Python's)."""
    return [c for c in cls.__mro__ if c.__module__.split(".")[0] == "trainop"]


def model_variables(in_graph: bool = False) -> tuple[Any, Any]:
    if in_graph:
        return (
            tf.compat.v1.get_variable("w", initializer=tf.constant([[0.1], [0.2]])),
            tf.compat.v1.get_variable("b", initializer=tf.constant([0.0])),
        )
    return tf.Variable([[0.1], [0.2]], name="w"), tf.Variable([0.0], name="b")


def model_loss(w: Any, b: Any) -> Callable[..., tf.Tensor]:
    def loss(x: Any = X, y: Any = Y) -> tf.Tensor:
        return tf.reduce_mean((tf.matmul(x, w) + b - y) ** 2)

    return loss


def read_events(logdir: str) -> list[list[Any]]:
    """Every summary in the event files of `logdir` as [tag, step], sorted."""
    written = []
    for path in sorted(tf.io.gfile.glob(f"{logdir}/events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                written.append([value.tag, int(event.step)])
    return sorted(written)


@contextlib.contextmanager
def no_default_summary_step() -> Iterator[None]:
    """No `tf.summary.experimental.set_step()` step while inside (another test may set one)."""
    previous = tf.summary.experimental.get_step()
    tf.summary.experimental.set_step(None)
    try:
        yield
    finally:
        tf.summary.experimental.set_step(previous)


# --- 1. Public names and signatures -----------------------------------------------------------


def describe(value: Any) -> dict[str, Any]:
    if inspect.isclass(value):
        described: dict[str, Any] = {
            "kind": "class",
            "bases": [base.__name__ for base in value.__bases__],
            "init": str(inspect.signature(value.__init__)),
        }
        members: dict[str, Any] = {}
        for cls in reversed(own_classes(value)):
            for member, raw in vars(cls).items():
                if member.startswith("_"):
                    continue
                if isinstance(raw, property):
                    members[member] = {"kind": "property"}
                elif isinstance(raw, (staticmethod, classmethod)) or inspect.isfunction(raw):
                    kind = type(raw).__name__ if not inspect.isfunction(raw) else "method"
                    members[member] = {
                        "kind": kind,
                        "signature": str(inspect.signature(getattr(value, member))),
                    }
                elif not (dataclasses.is_dataclass(value) and member in value.__dataclass_fields__):
                    members[member] = {"kind": "attribute", "value": repr(raw)}
        described["members"] = members
        if dataclasses.is_dataclass(value):
            described["fields"] = [
                [
                    field.name,
                    str(field.type),
                    repr(field.default) if field.default is not dataclasses.MISSING else None,
                ]
                for field in dataclasses.fields(value)
            ]
            described["frozen"] = value.__dataclass_params__.frozen
        return described
    if callable(value):
        return {"kind": "function", "signature": str(inspect.signature(value))}
    return {"kind": "constant", "type": type(value).__name__, "repr": repr(value)}


def api_surface() -> dict[str, Any]:
    names = {name: describe(getattr(trainop, name)) for name in trainop.__all__}
    # What an instance of the guard offers besides its class: its counters and setting.
    guard = trainop.SkipNonFiniteSteps()
    names["SkipNonFiniteSteps"]["instance_attributes"] = {
        attribute: type(value).__name__
        for attribute, value in sorted(vars(guard).items())
        if not attribute.startswith("_")
    }
    names["SkipNonFiniteSteps"]["repr"] = repr(guard)
    names["USE_GLOBAL_STEP"]["equals_peers_sentinel"] = (
        trainop.USE_GLOBAL_STEP == PEERS_USE_GLOBAL_STEP
    )
    return {
        "all": list(trainop.__all__),
        "all_sorted": sorted(trainop.__all__),
        "all_unique": len(set(trainop.__all__)) == len(trainop.__all__),
        "names": names,
        # trainop.keras, the step inside model.fit, imported when first used.
        "keras": {name: describe(getattr(trainop.keras, name)) for name in trainop.keras.__all__},
    }


# --- 2. Error texts ---------------------------------------------------------------------------


class ComputesOwnGradients(tf.compat.v1.train.GradientDescentOptimizer):
    """A v1 optimizer that overrides compute_gradients, as Horovod's and loss-scale ones do."""

    def compute_gradients(self, *args: Any, **kwargs: Any) -> Any:
        return super().compute_gradients(*args, **kwargs)

    def __repr__(self) -> str:
        return "ComputesOwnGradients()"


def _v1() -> Any:
    return tf.compat.v1.train.GradientDescentOptimizer(0.1)


def _eager_op(**kwargs: Any) -> Callable[[], Any]:
    """Builds an eager train op of the tiny model with `kwargs` and calls it once."""
    w, b = model_variables()
    kwargs.setdefault("global_step", None)
    loss = kwargs.pop("loss", None) or model_loss(w, b)
    optimizer = kwargs.pop("optimizer", None) or keras.optimizers.SGD(0.1)

    def run() -> Any:
        train_op = trainop.create_train_op(loss, optimizer, **kwargs)
        return train_op()

    return run


def _in_graph(build: Callable[[Any, Any], Any]) -> Callable[[], Any]:
    """`build(w, b)` in a fresh graph holding the tiny model's variables."""

    def run() -> Any:
        with tf.Graph().as_default():
            w, b = model_variables(in_graph=True)
            return build(w, b)

    return run


def _graph_op(**kwargs: Any) -> Callable[[], Any]:
    def build(w: Any, b: Any) -> Any:
        settings = dict(kwargs)
        loss = settings.pop("loss", None)
        total_loss = loss(w, b) if loss is not None else model_loss(w, b)()
        optimizer = settings.pop("optimizer", None) or _v1()
        return trainop.create_train_op(total_loss, optimizer, **settings)

    return _in_graph(build)


def _with_writer(run: Callable[[], Any]) -> Callable[[], Any]:
    def with_writer() -> Any:
        with tempfile.TemporaryDirectory() as logdir, no_default_summary_step():
            writer = tf.summary.create_file_writer(logdir)
            try:
                with writer.as_default():
                    return run()
            finally:
                writer.close()

    return with_writer


def _pairs() -> list[tuple[Any, Any]]:
    return [(tf.constant([1.0, 2.0]), tf.Variable([0.0, 0.0], name="w"))]


def _guard_from_graph() -> Any:
    with tf.Graph().as_default():
        return trainop.SkipNonFiniteSteps()


def _graph_op_with_eager_guard() -> Callable[[], Any]:
    guard = trainop.SkipNonFiniteSteps()
    return _graph_op(check_numerics=guard)


def _train_step(loss: Any = None, **kwargs: Any) -> Callable[[], Any]:
    def run() -> Any:
        w, b = model_variables()
        settings = {"global_step": None, **kwargs}
        optimizer = settings.pop("optimizer", None) or keras.optimizers.SGD(0.1)
        return trainop.create_train_step(loss or model_loss(w, b), optimizer, **settings)

    return run


def _steps_per_call_unbatched() -> Any:
    w, b = model_variables()
    train_op = trainop.create_train_op(
        model_loss(w, b), keras.optimizers.SGD(0.1), global_step=None, steps_per_call=2
    )
    return train_op(tf.constant(X), tf.constant(Y))  # four rows, not two batches


def _keras_built_for_other_variables() -> Any:
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build([tf.Variable(1.0, name="other")])
    return _eager_op(optimizer=optimizer, variables_to_train=None)()


def _frozen_variable() -> Any:
    w, b = model_variables()
    frozen = tf.Variable(1.0, name="frozen", trainable=False)
    loss = lambda: model_loss(w, b)() * frozen  # noqa: E731
    train_op = trainop.create_train_op(
        loss, keras.optimizers.SGD(0.1), global_step=None, variables_to_train=[w, frozen]
    )
    return train_op()


def _one_missing_gradient(policy: str) -> Callable[[], Any]:
    def run() -> Any:
        w, b = model_variables()
        unused = tf.Variable(1.0, name="unused")
        train_op = trainop.create_train_op(
            model_loss(w, b),
            keras.optimizers.SGD(0.1),
            global_step=None,
            variables_to_train=[w, b, unused],
            missing_gradients=policy,
        )
        return train_op()

    return run


def _no_gradient_at_all() -> Any:
    w, _ = model_variables()
    unused = tf.Variable(1.0, name="unused")
    train_op = trainop.create_train_op(
        lambda: tf.reduce_sum(w), _v1(), global_step=None, variables_to_train=[unused]
    )
    return train_op()


def _train(train_op: Any = None, **kwargs: Any) -> Callable[[], Any]:
    def run() -> Any:
        op = train_op if train_op is not None else (lambda: tf.constant(1.0))
        settings = {"progress": False, **kwargs}
        settings.setdefault("global_step", tf.Variable(0, dtype=tf.int64, name="global_step"))
        return trainop.train(op, **settings)

    return run


def _train_graph_op(**kwargs: Any) -> Callable[[], Any]:
    def build(w: Any, b: Any) -> Any:
        train_op = trainop.create_train_op(model_loss(w, b)(), _v1())
        return trainop.train(train_op, progress=False, **kwargs)

    return _in_graph(build)


def _train_without_global_step() -> Any:
    # A fresh program: no global step anywhere (the eager one is process-wide).
    with tf.Graph().as_default():
        return trainop.train(lambda: 1.0, max_steps=1, progress=False)


def _train_with_clashing_checkpoint() -> Any:
    step = tf.Variable(0, dtype=tf.int64, name="global_step")
    with tempfile.TemporaryDirectory() as logdir:
        return trainop.train(
            lambda: 1.0,
            max_steps=1,
            logdir=logdir,
            checkpoint={"global_step": step},
            global_step=step,
            progress=False,
        )


def _train_nan_checkpoint() -> Any:
    step = tf.Variable(0, dtype=tf.int64, name="global_step")
    bad = tf.Variable(np.nan, name="bad")

    def train_op() -> float:
        step.assign_add(1)
        return 1.0

    with tempfile.TemporaryDirectory() as logdir:
        return trainop.train(
            train_op,
            max_steps=1,
            logdir=logdir,
            checkpoint={"model": tf.train.Checkpoint(bad=bad)},
            global_step=step,
            progress=False,
        )


def _train_global_step_stuck() -> Any:
    step = tf.Variable(0, dtype=tf.int64, name="global_step")
    return trainop.train(lambda: 1.0, max_steps=2, global_step=step, progress=False)


def _summaries_without_step() -> Any:
    # A fresh graph: no global step to fall back on.
    with (
        tf.Graph().as_default(),
        tempfile.TemporaryDirectory() as logdir,
        tf.summary.create_file_writer(logdir).as_default(),
        no_default_summary_step(),
    ):
        return trainop.add_gradients_summaries([(tf.constant([1.0]), tf.Variable([0.0], name="w"))])


def _in_strategy(run: Callable[[], Any]) -> Callable[[], Any]:
    def in_scope() -> Any:
        with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
            return run()

    return in_scope


def _graph_op_in_strategy() -> Any:
    with tf.Graph().as_default(), tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        w, b = model_variables(in_graph=True)
        return trainop.create_train_op(model_loss(w, b)(), _v1())


def _non_xla_loss() -> Any:
    w, b = model_variables()

    def loss() -> tf.Tensor:
        # String ops have no XLA kernel.
        length = tf.strings.length(tf.strings.as_string(tf.reduce_sum(w)))
        return model_loss(w, b)() * tf.cast(length, tf.float32)

    train_op = trainop.create_train_op(
        loss, keras.optimizers.SGD(0.1), global_step=None, jit_compile=True
    )
    return train_op()


class ComputesOtherGradients(tf.compat.v1.train.GradientDescentOptimizer):
    """A v1 optimizer whose compute_gradients also returns a variable it was not given."""

    def compute_gradients(self, loss: Any, var_list: Any = None, **kwargs: Any) -> Any:
        pairs = super().compute_gradients(loss, var_list=var_list, **kwargs)
        other = tf.compat.v1.get_variable("other", initializer=1.0)
        return [*pairs, (tf.zeros_like(other), other)]

    def __repr__(self) -> str:
        return "ComputesOtherGradients()"


def _not_finite_eager(**kwargs: Any) -> Callable[[], Any]:
    """A train op built with `kwargs`, called on a batch that makes the loss NaN."""

    def run() -> Any:
        w, b = model_variables()
        settings = {"global_step": tf.Variable(3, dtype=tf.int64, name="global_step"), **kwargs}
        guard = settings.pop("max_consecutive", None)
        if guard is not None:
            settings["check_numerics"] = trainop.SkipNonFiniteSteps(max_consecutive=guard)
        train_op = trainop.create_train_op(model_loss(w, b), keras.optimizers.SGD(0.1), **settings)
        return train_op(tf.constant(X * np.nan), tf.constant(Y))

    return run


def _not_finite_train_step() -> Any:
    w, b = model_variables()
    return trainop.create_train_step(
        lambda: model_loss(w, b)(X * np.nan), keras.optimizers.SGD(0.1), global_step=None
    )


def _not_finite_graph(check_numerics: Any) -> Callable[[], Any]:
    def run() -> Any:
        graph = tf.Graph()
        with graph.as_default():
            w, b = model_variables(in_graph=True)
            guard = (
                trainop.SkipNonFiniteSteps(max_consecutive=check_numerics)
                if isinstance(check_numerics, int) and not isinstance(check_numerics, bool)
                else check_numerics
            )
            train_op = trainop.create_train_op(
                model_loss(w, b)(X * np.nan), _v1(), check_numerics=guard
            )
            with tf.compat.v1.Session(graph=graph) as session:
                session.run(tf.compat.v1.global_variables_initializer())
                return session.run(train_op)

    return run


def _xla_message(message: str) -> str:
    # What follows is XLA's own text, which changes with TensorFlow's version.
    return message.split("XLA says:")[0] + "XLA says: ..."


def error_cases() -> dict[str, Callable[[], Any]]:
    """Bad inputs, each a call that raises: checked before anything trains."""
    return {
        # create_train_op, eager mode: checked when the train op is built.
        "create_train_op/eager/optimizer_unknown": _eager_op(optimizer="adam"),
        "create_train_op/eager/optimizer_tf_keras_loss_scale": _eager_op(
            optimizer=tf_keras.mixed_precision.LossScaleOptimizer(tf_keras.optimizers.SGD(0.1))
        ),
        "create_train_op/eager/optimizer_keras_accumulating": _eager_op(
            optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
        ),
        "create_train_op/eager/total_loss_tensor": _eager_op(loss=tf.constant(1.0)),
        "create_train_op/eager/gate_gradients": _eager_op(gate_gradients=3),
        "create_train_op/eager/gate_gradients_float": _eager_op(gate_gradients=1.0),
        "create_train_op/eager/aggregation_method": _eager_op(aggregation_method=7),
        "create_train_op/eager/summarize_every_n_steps": _eager_op(summarize_every_n_steps=0),
        "create_train_op/eager/accumulation_steps": _eager_op(accumulation_steps=0),
        "create_train_op/eager/steps_per_call": _eager_op(steps_per_call=0),
        "create_train_op/eager/steps_per_call_bool": _eager_op(steps_per_call=True),
        "create_train_op/eager/jit_compile": _eager_op(jit_compile="yes"),
        "create_train_op/eager/transform_grads_fn": _eager_op(transform_grads_fn=3),
        "create_train_op/eager/missing_gradients": _eager_op(missing_gradients="ignore"),
        "create_train_op/eager/check_numerics_string": _eager_op(check_numerics="no"),
        "create_train_op/eager/check_numerics_int": _eager_op(check_numerics=1),
        "create_train_op/eager/check_numerics_guard_of_a_graph": lambda: _eager_op(
            check_numerics=_guard_from_graph()
        )(),
        "create_train_op/eager/global_step_float": _eager_op(
            global_step=tf.Variable(1.0, name="gs")
        ),
        "create_train_op/eager/variables_to_train_empty": _eager_op(variables_to_train=[]),
        "create_train_op/eager/variables_to_train_not_variables": _eager_op(
            variables_to_train=[tf.Variable(1.0, name="v"), 3.0]
        ),
        "create_train_op/eager/variables_to_train_not_trainable": _frozen_variable,
        "create_train_op/eager/update_ops": _eager_op(update_ops=[1]),
        # create_train_op, eager mode: checked when the step is traced (its first call).
        "create_train_op/eager/loss_returns_float": _eager_op(loss=lambda: 1.5),
        "create_train_op/eager/loss_not_scalar": _eager_op(
            loss=lambda: tf.Variable([1.0, 2.0], name="v") * 1.0
        ),
        "create_train_op/eager/loss_integer": _eager_op(
            loss=lambda: tf.Variable(1, name="v") * 2, optimizer=_v1()
        ),
        "create_train_op/eager/loss_reads_no_variable": _eager_op(loss=lambda: tf.constant(1.0)),
        "create_train_op/eager/no_gradient_at_all": _no_gradient_at_all,
        "create_train_op/eager/missing_gradients_raise": _one_missing_gradient("raise"),
        "create_train_op/eager/transform_returns_no_list": _eager_op(
            transform_grads_fn=lambda pairs: 3
        ),
        "create_train_op/eager/transform_returns_other_variables": _eager_op(
            transform_grads_fn=lambda pairs: pairs[:1]
        ),
        "create_train_op/eager/transform_returns_wrong_shape": _eager_op(
            transform_grads_fn=lambda pairs: [(tf.reduce_sum(g), v) for g, v in pairs]
        ),
        "create_train_op/eager/transform_freezes_everything": _eager_op(
            transform_grads_fn=trainop.multiply_gradients_fn([(re.compile(".*"), 0.0)])
        ),
        "create_train_op/eager/steps_per_call_batch": _steps_per_call_unbatched,
        "create_train_op/eager/jit_compile_with_writer": _with_writer(_eager_op(jit_compile=True)),
        "create_train_op/eager/jit_compile_no_xla_kernel": _non_xla_loss,
        "create_train_op/eager/summarize_gradients_without_step": _with_writer(
            _eager_op(optimizer=_v1(), summarize_gradients=True)
        ),
        "create_train_op/eager/summarize_every_n_steps_without_step": _with_writer(
            _eager_op(optimizer=_v1(), summarize_every_n_steps=2)
        ),
        "create_train_op/eager/keras_optimizer_built_for_other_variables": (
            _keras_built_for_other_variables
        ),
        # create_train_op, graph mode.
        "create_train_op/graph/total_loss_not_tensor": _graph_op(loss=lambda w, b: 3.0),
        "create_train_op/graph/jit_compile": _graph_op(jit_compile=True),
        "create_train_op/graph/steps_per_call": _graph_op(steps_per_call=2),
        "create_train_op/graph/no_trainable_variables": lambda: _run_in_empty_graph(),
        "create_train_op/graph/update_ops": _graph_op(update_ops=[1]),
        "create_train_op/graph/loss_not_scalar": _graph_op(loss=lambda w, b: tf.matmul(X, w)),
        "create_train_op/graph/loss_integer": _graph_op(
            loss=lambda w, b: tf.compat.v1.get_variable("i", initializer=1) * 2
        ),
        "create_train_op/graph/variables_to_train_not_trainable": _graph_op(
            variables_to_train=lambda: [
                tf.compat.v1.get_variable("frozen", initializer=1.0, trainable=False)
            ]
        ),
        "create_train_op/graph/check_numerics_guard_of_eager": lambda: (
            _graph_op_with_eager_guard()()
        ),
        "create_train_op/graph/gate_gradients": _graph_op(gate_gradients=-1),
        "create_train_op/graph/global_step_float": _in_graph(
            lambda w, b: trainop.create_train_op(
                model_loss(w, b)(),
                _v1(),
                global_step=tf.compat.v1.get_variable("gs", initializer=1.0),
            )
        ),
        "create_train_op/graph/in_strategy_scope": _graph_op_in_strategy,
        "create_train_op/graph/optimizer_computes_other_gradients": _graph_op(
            optimizer=ComputesOtherGradients(0.1)
        ),
        "create_train_op/eager/in_strategy_scope_variables_to_train_none": _in_strategy(
            _eager_op(variables_to_train=None)
        ),
        # What a step whose loss is not finite raises (only the lines that say so are kept:
        # the rest is TensorFlow's traceback of the op).
        "numerics/eager/check_numerics_true": _not_finite_eager(),
        "numerics/eager/skip_max_consecutive_0": _not_finite_eager(max_consecutive=0),
        "numerics/eager/skip_max_consecutive_0_optimizer_step": _not_finite_eager(
            max_consecutive=0, global_step=None
        ),
        "numerics/eager/jit_compile_check_numerics_true": _not_finite_eager(jit_compile=True),
        "numerics/eager/jit_compile_skip_max_consecutive_0": _not_finite_eager(
            jit_compile=True, max_consecutive=0
        ),
        "numerics/eager/create_train_step": _not_finite_train_step,
        "numerics/graph/check_numerics_true": _not_finite_graph(True),
        "numerics/graph/skip_max_consecutive_0": _not_finite_graph(0),
        # create_train_step.
        "create_train_step/eager/total_loss_fn": _train_step(total_loss_fn=3),
        "create_train_step/eager/loss_not_callable": _train_step(loss=tf.constant(1.0)),
        "create_train_step/eager/transform_grads_fn": _train_step(transform_grads_fn=3),
        "create_train_step/eager/gate_gradients": _train_step(gate_gradients=5),
        "create_train_step/eager/update_ops": _train_step(update_ops=[1]),
        "create_train_step/eager/optimizer_computes_gradients": _train_step(
            optimizer=ComputesOwnGradients(0.1)
        ),
        "create_train_step/eager/in_strategy_scope": _in_strategy(_train_step()),
        "create_train_step/graph/total_loss_fn": _in_graph(
            lambda w, b: trainop.create_train_step(model_loss(w, b)(), _v1(), total_loss_fn=3)
        ),
        # Transforms.
        "clip_gradient_norms/max_norm_zero": lambda: trainop.clip_gradient_norms(_pairs(), 0.0),
        "clip_gradient_norms_fn/max_norm_string": lambda: trainop.clip_gradient_norms_fn("1"),
        "clip_gradient_norms_fn/max_norm_negative": lambda: trainop.clip_gradient_norms_fn(-1),
        "clip_by_global_norm/max_norm_bool": lambda: trainop.clip_by_global_norm(_pairs(), True),
        "clip_by_global_norm_fn/max_norm_nan": lambda: trainop.clip_by_global_norm_fn(float("nan")),
        "clip_by_value_fn/min_above_max": lambda: trainop.clip_by_value_fn(1.0, -1.0),
        "clip_by_value_fn/min_string": lambda: trainop.clip_by_value_fn("a", 1.0),
        "clip_by_value/complex_gradient": lambda: trainop.clip_by_value(
            [
                (
                    tf.constant([1 + 1j], tf.complex64),
                    tf.Variable([0j], dtype=tf.complex64, name="c"),
                )
            ],
            -1.0,
            1.0,
        ),
        "add_gradient_noise/stddev_negative": lambda: trainop.add_gradient_noise(_pairs(), -1.0),
        "add_gradient_noise/integer_gradient": lambda: trainop.add_gradient_noise(
            [(tf.constant([1]), tf.Variable([0], name="i"))], 1.0
        ),
        "add_gradient_noise_fn/stddev_inf": lambda: trainop.add_gradient_noise_fn(float("inf")),
        "add_gradient_noise_fn/decay_exponent_negative": lambda: trainop.add_gradient_noise_fn(
            1.0, decay_exponent=-0.5
        ),
        "multiply_gradients/grads_and_vars_not_list": lambda: trainop.multiply_gradients(
            iter(_pairs()), {"w": 2.0}
        ),
        "multiply_gradients/variable_without_gradient": lambda: trainop.multiply_gradients(
            [(None, tf.Variable(1.0, name="w"))], {"w": 2.0}
        ),
        "multiply_gradients_fn/not_a_mapping": lambda: trainop.multiply_gradients_fn(3),
        "multiply_gradients_fn/empty": lambda: trainop.multiply_gradients_fn({}),
        "multiply_gradients_fn/key_number": lambda: trainop.multiply_gradients_fn({3: 1.0}),
        "multiply_gradients_fn/value_string": lambda: trainop.multiply_gradients_fn({"w": "x"}),
        "multiply_gradients_fn/value_string_tensor": lambda: trainop.multiply_gradients_fn(
            {"w": tf.constant("x")}
        ),
        "multiply_gradients_fn/value_inf": lambda: trainop.multiply_gradients_fn({"w": np.inf}),
        # No argument check of its own: Python's error.
        "global_norm/not_a_list": lambda: trainop.global_norm(3),
        "chain/not_callable": lambda: trainop.chain(trainop.clip_by_value_fn(-1.0, 1.0), 3),
        # The numerics guard.
        "SkipNonFiniteSteps/max_consecutive_negative": lambda: trainop.SkipNonFiniteSteps(-1),
        "SkipNonFiniteSteps/max_consecutive_float": lambda: trainop.SkipNonFiniteSteps(1.5),
        # The loop.
        "Hook/fn_not_callable": lambda: trainop.Hook(3),
        "Hook/every_n_steps_zero": lambda: trainop.Hook(print, every_n_steps=0),
        "train/train_op_number": _train(train_op=3, max_steps=1),
        "train/train_op_eager_tensor": _train(train_op=tf.constant(1.0), max_steps=1),
        "train/max_steps_zero": _train(max_steps=0),
        "train/save_every_n_steps_zero": _train(max_steps=1, save_every_n_steps=0),
        "train/max_checkpoints_to_keep_zero": _train(max_steps=1, max_checkpoints_to_keep=0),
        "train/restore_data_position": _train(max_steps=1, restore_data_position="yes"),
        "train/hooks": _train(max_steps=1, hooks=[print]),
        "train/dataset_number": _train(dataset=3),
        "train/checkpoint_list": _train(max_steps=1, checkpoint=[1]),
        "train/checkpoint_without_logdir": _train(max_steps=1, checkpoint={}),
        "train/checkpoint_clashing_names": _train_with_clashing_checkpoint,
        "train/checkpoint_not_finite": _train_nan_checkpoint,
        "train/nothing_to_stop": _train(),
        "train/global_step_float": _train(max_steps=1, global_step=tf.Variable(1.0, name="gs")),
        "train/no_global_step": _train_without_global_step,
        "train/global_step_stuck": _train_global_step_stuck,
        "train/graph_with_dataset": _train_graph_op(dataset=[1], max_steps=1),
        "train/graph_without_max_steps": _train_graph_op(),
        # Summaries.
        "add_gradients_summaries/no_step": _summaries_without_step,  # TensorFlow's error
        "add_variables_summaries/not_a_list": lambda: trainop.add_variables_summaries(3, step=0),
    }


def _run_in_empty_graph() -> Any:
    with tf.Graph().as_default():
        loss = tf.constant(1.0)
        return trainop.create_train_op(loss, _v1())


def error_record(error: Exception) -> dict[str, Any]:
    """The error's type and message, and whether it was raised while a step was traced.

    An error raised inside a `tf.function` comes with autograph's "in user code:" traceback
    (file names and line numbers of the internal modules): only the message itself is kept.
    """
    name = type(error).__name__
    message = str(error)
    traced = message.startswith("in user code:")
    if traced:
        marker = f"\n    {name}: "
        message = message[message.rindex(marker) + len(marker) :]
        message = "\n".join(
            line[4:] if line.startswith("    ") else line for line in message.splitlines()
        ).rstrip()
    if isinstance(error, tf.errors.OpError) and "inf or nan" in message:
        # TensorFlow's text around it names files, lines and generated functions.
        message = "\n".join(line.strip() for line in message.splitlines() if "inf or nan" in line)
    message = normalize(message)
    if "XLA says:" in message:
        message = _xla_message(message)
    return {"type": name, "message": message, "raised_while_tracing": traced}


def error_surface() -> dict[str, Any]:
    errors: dict[str, Any] = {}
    for case, run in error_cases().items():
        try:
            run()
        except Exception as error:  # noqa: BLE001 - the error is what is recorded
            errors[case] = error_record(error)
        else:
            errors[case] = {"type": None, "message": "(no error)", "raised_while_tracing": False}
    return errors


# --- 3. Graph mode: op names, collections -----------------------------------------------------


def _graph_case(
    optimizer: Callable[[], Any],
    *,
    update_op: bool = False,
    writer: bool = False,
    train_step: bool = False,
    **kwargs: Any,
) -> Callable[[str], tf.Graph]:
    def build(logdir: str) -> tf.Graph:
        graph = tf.Graph()
        with graph.as_default(), contextlib.ExitStack() as stack:
            if writer:
                stack.enter_context(tf.summary.create_file_writer(logdir).as_default())
            w, b = model_variables(in_graph=True)
            if update_op:
                counter = tf.compat.v1.get_variable("batches_seen", initializer=0, trainable=False)
                tf.compat.v1.add_to_collection(
                    tf.compat.v1.GraphKeys.UPDATE_OPS, counter.assign_add(1)
                )
            loss = model_loss(w, b)()
            if train_step:
                trainop.create_train_step(
                    (loss, tf.reduce_sum(w)), optimizer(), total_loss_fn=lambda pair: pair[0]
                )
            else:
                trainop.create_train_op(loss, optimizer(), **kwargs)
        return graph

    return build


def _keras(kind: str = "SGD") -> Any:
    # Named: a Keras optimizer's default name is numbered by a counter of the whole process,
    # and names its scopes in the graph.
    return getattr(keras.optimizers, kind)(0.1, name=kind.lower())


def graph_cases() -> dict[str, Callable[[str], tf.Graph]]:
    """Small train ops built in graph mode, each in a graph of its own."""
    return {
        "v1_sgd_update_ops": _graph_case(_v1, update_op=True),
        "keras_sgd": _graph_case(_keras),
        "keras_adam_update_ops": _graph_case(lambda: _keras("Adam"), update_op=True),
        "v1_writer_summarize_gradients": _graph_case(_v1, writer=True, summarize_gradients=True),
        "keras_writer_summarize_gradients": _graph_case(
            _keras, writer=True, summarize_gradients=True
        ),
        "v1_tf1_summarize_gradients": _graph_case(_v1, summarize_gradients=True),
        "v1_check_numerics_skip": _graph_case(_v1, check_numerics="skip"),
        "keras_check_numerics_skip": _graph_case(_keras, check_numerics="skip"),
        "v1_check_numerics_false": _graph_case(_v1, check_numerics=False),
        "v1_clip_by_global_norm": _graph_case(
            _v1, transform_grads_fn=trainop.clip_by_global_norm_fn(1.0)
        ),
        "keras_clip_by_global_norm_skip_writer": _graph_case(
            _keras,
            writer=True,
            summarize_gradients=True,
            check_numerics="skip",
            transform_grads_fn=trainop.clip_by_global_norm_fn(1.0),
        ),
        "v1_accumulation_steps": _graph_case(_v1, accumulation_steps=2),
        "v1_create_train_step": _graph_case(_v1, train_step=True),
    }


def describe_graph(graph: tf.Graph) -> dict[str, Any]:
    names = [op.name for op in graph.get_operations()]
    summaries = []
    for summary in graph.get_collection(tf.compat.v1.GraphKeys.SUMMARIES):
        tag = np.asarray(tf.get_static_value(summary.op.inputs[0])).item()
        summaries.append([summary.op.type, tag.decode() if isinstance(tag, bytes) else str(tag)])
    return {
        "own_ops": sorted(n for n in names if any(own in n for own in OWN_OP_NAMES)),
        # First components of the names under a scope, and the names at the root.
        "scopes": sorted({n.split("/")[0] for n in names if "/" in n}),
        "root_ops": sorted({n for n in names if "/" not in n}),
        "train_op_collection": [
            t.name for t in graph.get_collection(tf.compat.v1.GraphKeys.TRAIN_OP)
        ],
        "tf1_summaries": sorted(summaries),
    }


def graph_surface() -> dict[str, Any]:
    result = {}
    with tempfile.TemporaryDirectory() as logdir:
        for case, build in graph_cases().items():
            result[case] = describe_graph(build(logdir))
    return result


# --- 4. Summary tags written -------------------------------------------------------------------


def _eager_summaries(optimizer: Any, global_step: bool) -> list[list[Any]]:
    with tempfile.TemporaryDirectory() as logdir, no_default_summary_step():
        w, b = model_variables()
        step = tf.Variable(0, dtype=tf.int64, name="global_step") if global_step else None
        writer = tf.summary.create_file_writer(logdir)
        with writer.as_default():
            train_op = trainop.create_train_op(
                model_loss(w, b),
                optimizer,
                global_step=step,
                summarize_gradients=True,
                summarize_every_n_steps=2,
            )
            for _ in range(4):
                train_op(X, Y)
        writer.close()
        return read_events(logdir)


def _graph_summaries(optimizer: Callable[[], Any]) -> list[list[Any]]:
    with tempfile.TemporaryDirectory() as logdir:
        graph = tf.Graph()
        with graph.as_default():
            writer = tf.summary.create_file_writer(logdir)
            with writer.as_default():
                w, b = model_variables(in_graph=True)
                train_op = trainop.create_train_op(
                    model_loss(w, b)(),
                    optimizer(),
                    summarize_gradients=True,
                    summarize_every_n_steps=2,
                )
            with tf.compat.v1.Session(graph=graph) as session:
                session.run(tf.compat.v1.global_variables_initializer())
                session.run(writer.init())
                for _ in range(4):
                    session.run(train_op)
                session.run(writer.flush())
        return read_events(logdir)


def summaries_surface() -> dict[str, Any]:
    return {
        "eager_v1_global_step": _eager_summaries(_v1(), global_step=True),
        "eager_keras_iterations": _eager_summaries(keras.optimizers.SGD(0.1), global_step=False),
        "graph_v1_global_step": _graph_summaries(_v1),
        "graph_keras_global_step": _graph_summaries(lambda: keras.optimizers.SGD(0.1)),
    }


# --- 5. Trace counts ---------------------------------------------------------------------------


def _traces(batch: int = 1, **kwargs: Any) -> dict[str, Any]:
    """The eager train op of the tiny model called three times on batches of one shape."""
    w, b = model_variables()
    loss_traces = []

    def loss(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        loss_traces.append(1)
        return tf.reduce_mean((tf.matmul(x, w) + b - y) ** 2)

    kwargs.setdefault("variables_to_train", [w, b])
    train_op = trainop.create_train_op(
        loss, keras.optimizers.Adam(0.01), global_step=None, **kwargs
    )
    x, y = (np.stack([X] * batch), np.stack([Y] * batch)) if batch > 1 else (X, Y)
    for _ in range(3):
        train_op(tf.constant(x), tf.constant(y))
    counter = getattr(train_op, "experimental_get_tracing_count", None)
    return {
        "tracing_count": counter() if counter is not None else None,
        "loss_traced": len(loss_traces),
    }


def _train_step_traces(optimizer_family: str, update_ops: bool = False) -> dict[str, Any]:
    """create_train_step called three times: the loss runs eagerly on every call, and the
    compiled update is traced once (each trace reads the learning rate, a callable)."""
    w, b = model_variables()
    loss_calls, rate_reads, update_op_traces = [], [], []

    def rate(*_: Any) -> float:
        rate_reads.append(1)
        return 0.01

    class Schedule(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step: Any) -> float:
            return rate()

    optimizer = (
        tf.compat.v1.train.GradientDescentOptimizer(rate)
        if optimizer_family == "v1"
        else keras.optimizers.SGD(Schedule())
    )

    def loss() -> tf.Tensor:
        loss_calls.append(1)
        return model_loss(w, b)()

    def update_op() -> Any:
        update_op_traces.append(1)
        return tf.constant(0)

    for _ in range(3):
        trainop.create_train_step(
            loss, optimizer, global_step=None, update_ops=[update_op] if update_ops else None
        )
    result = {"loss_calls": len(loss_calls), "learning_rate_reads": len(rate_reads)}
    if update_ops:
        result["update_op_traces"] = len(update_op_traces)
    return result


def traces_surface() -> dict[str, Any]:
    return {
        "create_train_op/variables_to_train_list": _traces(),
        "create_train_op/variables_to_train_none": _traces(variables_to_train=None),
        "create_train_op/jit_compile": _traces(jit_compile=True),
        "create_train_op/steps_per_call_2": _traces(batch=2, steps_per_call=2),
        "create_train_op/accumulation_steps_2": _traces(accumulation_steps=2),
        "create_train_op/check_numerics_skip": _traces(check_numerics="skip"),
        "create_train_op/jit_compile_check_numerics_skip": _traces(
            jit_compile=True, check_numerics="skip"
        ),
        "create_train_step/v1": _train_step_traces("v1"),
        "create_train_step/keras": _train_step_traces("keras"),
        "create_train_step/keras_update_ops": _train_step_traces("keras", update_ops=True),
    }


# --- The comparison ----------------------------------------------------------------------------

SECTIONS: dict[str, Callable[[], Any]] = {
    "api": api_surface,
    "errors": error_surface,
    "graph": graph_surface,
    "summaries": summaries_surface,
    "traces": traces_surface,
}


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


@contextlib.contextmanager
def _locked_snapshot() -> Iterator[dict[str, Any]]:
    """The snapshot's data, written back on exit; locked against other test workers."""
    import fcntl  # POSIX; only updating needs it

    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    directory = os.open(SNAPSHOT.parent, os.O_RDONLY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        data = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.exists() else {}
        yield data
        SNAPSHOT.write_text(_dump(data))
    finally:
        os.close(directory)


def check_section(section: str) -> None:
    actual = json.loads(_dump(SECTIONS[section]()))
    if os.environ.get(UPDATE_VARIABLE):
        with _locked_snapshot() as data:
            data[section] = actual
        return
    expected = json.loads(SNAPSHOT.read_text()).get(section)
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                _dump(expected).splitlines(keepends=True),
                _dump(actual).splitlines(keepends=True),
                f"snapshot: {section}",
                f"now: {section}",
            )
        )
        pytest.fail(
            f"trainop's public surface changed ({section}); if that is meant, update "
            f"{SNAPSHOT.name} with `python tests/test_surface.py --update`:\n{diff}",
            pytrace=False,
        )


def test_public_names_and_signatures() -> None:
    check_section("api")


def test_error_texts() -> None:
    check_section("errors")


def test_graph_op_names_and_collections() -> None:
    check_section("graph")


def test_summary_tags() -> None:
    check_section("summaries")


def test_trace_counts() -> None:
    check_section("traces")


def main(argv: list[str]) -> int:
    if argv != ["--update"]:
        print(f"usage: python {Path(__file__).name} --update", file=sys.stderr)
        return 2
    with _locked_snapshot() as data:
        for section, collect in SECTIONS.items():
            data[section] = json.loads(_dump(collect()))
            print(f"{section}: written")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
