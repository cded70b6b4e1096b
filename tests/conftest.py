"""Fixtures that run one test in every execution mode and with every optimizer family.

A test writes its model once, against a `Runner`: the graph runner builds it in a fresh
`tf.compat.v1` graph and runs the train op in a `Session`; the eager runner passes the loss
callable to `create_train_op` and calls the `tf.function` it returns.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import hypothesis  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import trainop  # noqa: E402

# Hypothesis profiles. "ci", the default, tests the same examples on every run (derandomized:
# seeded from each test's own code, no example database), so that a failure is reproducible
# and a pass does not depend on luck; a failure prints the blob that replays it. "thorough"
# (HYPOTHESIS_PROFILE=thorough) draws many more random examples, to look for new failures.
# A test's own @settings(max_examples=...) takes precedence over the profile's.
hypothesis.settings.register_profile(
    "ci", derandomize=True, database=None, max_examples=30, deadline=None, print_blob=True
)
hypothesis.settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Programs that the tests run in subprocesses, not test modules.
collect_ignore = ["programs"]

FAMILIES = ["v1", "keras", "tf_keras", "tf_keras_legacy"]

_OPTIMIZERS = {
    ("v1", "sgd"): lambda lr: tf.compat.v1.train.GradientDescentOptimizer(lr),
    ("v1", "adam"): lambda lr: tf.compat.v1.train.AdamOptimizer(lr),
    ("keras", "sgd"): lambda lr: keras.optimizers.SGD(lr),
    ("keras", "adam"): lambda lr: keras.optimizers.Adam(lr),
    ("tf_keras", "sgd"): lambda lr: tf_keras.optimizers.SGD(lr),
    ("tf_keras", "adam"): lambda lr: tf_keras.optimizers.Adam(lr),
    ("tf_keras_legacy", "sgd"): lambda lr: tf_keras.optimizers.legacy.SGD(lr),
    ("tf_keras_legacy", "adam"): lambda lr: tf_keras.optimizers.legacy.Adam(lr),
}


def read_summaries(logdir: Any) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Every summary in the event files of `logdir`: per tag, its (step, value) in order."""
    series: dict[str, list[tuple[int, np.ndarray]]] = {}
    for path in sorted(tf.io.gfile.glob(f"{logdir}/events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                series.setdefault(value.tag, []).append((event.step, tf.make_ndarray(value.tensor)))
    return series


def make_optimizer(family: str, kind: str = "sgd", learning_rate: float = 0.1) -> Any:
    return _OPTIMIZERS[(family, kind)](learning_rate)


def optimizer_state(optimizer: Any, variables: list[Any], runner: Runner) -> list[np.ndarray]:
    """Every value the optimizer keeps: slots, moments, iteration counter."""
    if isinstance(optimizer, tf.compat.v1.train.Optimizer):
        state = [
            optimizer.get_slot(v, name) for v in variables for name in optimizer.get_slot_names()
        ]
        state += list(optimizer._non_slot_dict.values())
    else:
        variables_attr = optimizer.variables
        # OptimizerV2 (tf_keras.optimizers.legacy) has a `variables()` method.
        state = list(variables_attr() if callable(variables_attr) else variables_attr)
    return [runner.read(v) for v in state if v is not None]


class Runner:
    """Builds and runs a train op in one execution mode."""

    mode: str

    def variable(self, value: Any, name: str, trainable: bool = True, dtype: Any = None) -> Any:
        raise NotImplementedError

    def train_op(
        self, loss_fn: Callable[[], tf.Tensor], optimizer: Any, **kwargs: Any
    ) -> Callable[[], Any]:
        raise NotImplementedError

    def update_op(self, fn: Callable[[], Any]) -> Any:
        """An update op as `create_train_op` takes it in this mode."""
        raise NotImplementedError

    def read(self, variable: Any) -> np.ndarray:
        raise NotImplementedError

    def assign(self, variable: Any, value: Any) -> None:
        raise NotImplementedError

    def global_step(self) -> Any:
        return tf.compat.v1.train.get_global_step()


class GraphRunner(Runner):
    mode = "graph"

    def __init__(self) -> None:
        self.graph = tf.Graph()
        self._context = self.graph.as_default()
        self._context.__enter__()
        self.session = tf.compat.v1.Session(graph=self.graph)
        self._initialized = False
        self._assigns: dict[int, Any] = {}

    def close(self) -> None:
        self.session.close()
        self._context.__exit__(None, None, None)

    def initialize(self) -> None:
        if not self._initialized:
            self.session.run(tf.compat.v1.global_variables_initializer())
            self._initialized = True

    def variable(self, value, name, trainable=True, dtype=None):
        return tf.compat.v1.get_variable(
            name,
            initializer=tf.constant(value, dtype=dtype),
            trainable=trainable,
            use_resource=True,
        )

    def train_op(self, loss_fn, optimizer, **kwargs):
        op = trainop.create_train_op(loss_fn(), optimizer, **kwargs)

        def run(*fetches: Any) -> Any:
            self.initialize()
            return self.session.run(op)

        run.op = op
        return run

    def update_op(self, fn):
        return fn()

    def read(self, variable):
        self.initialize()
        return self.session.run(tf.convert_to_tensor(trainop._variables.as_tf_variable(variable)))

    def assign(self, variable, value):
        self.initialize()
        # One assign op per variable, fed: a test assigning every step keeps its graph small.
        if id(variable) not in self._assigns:
            placeholder = tf.compat.v1.placeholder(variable.dtype, variable.shape)
            self._assigns[id(variable)] = placeholder, variable.assign(placeholder)
        placeholder, assign = self._assigns[id(variable)]
        self.session.run(assign, {placeholder: value})


class EagerRunner(Runner):
    mode = "eager"

    def close(self) -> None:
        pass

    def variable(self, value, name, trainable=True, dtype=None):
        return tf.Variable(value, name=name, trainable=trainable, dtype=dtype)

    def train_op(self, loss_fn, optimizer, **kwargs):
        op = trainop.create_train_op(loss_fn, optimizer, **kwargs)
        run = lambda: op()  # noqa: E731
        run.op = op
        return run

    def update_op(self, fn):
        return fn

    def read(self, variable):
        return np.array(variable.numpy())

    def assign(self, variable, value):
        variable.assign(value)


@pytest.fixture(autouse=True)
def fresh_eager_global_step():
    """Each test starts without an eager global step (it lives in a process-wide collection)."""
    tf.compat.v1.get_default_graph().clear_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP)
    yield
    tf.compat.v1.get_default_graph().clear_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP)


@pytest.fixture(params=["graph", "eager"])
def runner(request):
    runner = GraphRunner() if request.param == "graph" else EagerRunner()
    yield runner
    runner.close()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
