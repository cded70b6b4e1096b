"""Runs a peer's own test classes with trainop's functions in place of the peer's.

Usage: python run_peer_tests.py {tf_slim,tf_agents} WHEEL_DIR CLASS [CLASS ...]

The peers' test files ship inside their wheels (`pip download --no-deps tf-slim==1.1.0
tf-agents==0.19.0`); they are imported from the wheel files themselves, without installing the
peers, which do not install cleanly on current TensorFlow. Each peer's functions are replaced by
trainop's before its tests run. Where the peer's *test harness* (not the function under test)
no longer runs on current TensorFlow or NumPy, this file supplies the smallest replacement and
says why. Prints one JSON line: tests run, failures and errors.
"""

from __future__ import annotations

import json
import pathlib
import sys
import types
import unittest

# The peers' loaders live with the benchmarks, which time the peers' own functions.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from benchmarks import peers  # noqa: E402


def _slim_layers():
    """`tf_slim.layers` needs `tf_keras.legacy_tf_layers`, gone from tf_keras 2.16+.

    These are the two layers the TF-Slim training tests build, with TF-Slim's variable names,
    collections and defaults (`batch_norm`: center, no scale, moving statistics updated through
    the UPDATE_OPS collection without zero-debiasing).
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    model_collections = [v1.GraphKeys.GLOBAL_VARIABLES, v1.GraphKeys.MODEL_VARIABLES]

    def fully_connected(inputs, num_outputs, activation_fn=tf.nn.relu, scope=None):
        with v1.variable_scope(scope, default_name="fully_connected"):
            weights = v1.get_variable(
                "weights",
                [inputs.shape[-1], num_outputs],
                collections=model_collections + [v1.GraphKeys.TRAINABLE_VARIABLES],
                initializer=v1.glorot_uniform_initializer(),
            )
            biases = v1.get_variable(
                "biases",
                [num_outputs],
                initializer=v1.zeros_initializer(),
                collections=model_collections + [v1.GraphKeys.TRAINABLE_VARIABLES],
            )
            outputs = tf.matmul(inputs, weights) + biases
            return activation_fn(outputs) if activation_fn is not None else outputs

    def batch_norm(inputs, decay=0.999, epsilon=0.001, fused=None, scope=None):
        del fused
        channels = inputs.shape[-1]
        with v1.variable_scope(scope, default_name="BatchNorm"):
            beta = v1.get_variable(
                "beta",
                [channels],
                initializer=v1.zeros_initializer(),
                collections=model_collections + [v1.GraphKeys.TRAINABLE_VARIABLES],
            )
            moving_mean = v1.get_variable(
                "moving_mean",
                [channels],
                trainable=False,
                initializer=v1.zeros_initializer(),
                collections=model_collections,
            )
            moving_variance = v1.get_variable(
                "moving_variance",
                [channels],
                trainable=False,
                initializer=v1.ones_initializer(),
                collections=model_collections,
            )
            mean, variance = tf.nn.moments(inputs, axes=[0])
            for moving, value in ((moving_mean, mean), (moving_variance, variance)):
                update = v1.assign_sub(moving, (1.0 - decay) * (moving - value))
                v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, update)
            return tf.nn.batch_normalization(inputs, mean, variance, beta, None, epsilon)

    return types.SimpleNamespace(fully_connected=fully_connected, batch_norm=batch_norm)


def _local_variable(initial_value, validate_shape=True, name=None, use_resource=None):
    """`tf_slim.ops.variables.local_variable` calls `variable_scope.variable`, gone in TF 2.16."""
    import tensorflow as tf

    return tf.compat.v1.Variable(
        initial_value,
        trainable=False,
        collections=[tf.compat.v1.GraphKeys.LOCAL_VARIABLES],
        validate_shape=validate_shape,
        name=name,
        use_resource=use_resource,
    )


def _easy_training_set(self) -> None:
    """TF-Slim's TrainTest.setUp, with `.item()`: NumPy 2 refuses int() of a 1-element array."""
    import numpy as np

    super(type(self), self).setUp()
    np.random.seed(0)
    self._inputs = np.zeros((16, 4))
    self._labels = np.random.randint(0, 2, size=(16, 1)).astype(np.float32)
    for i in range(16):
        j = int(2 * self._labels[i].item() + np.random.randint(0, 2))
        self._inputs[i, j] = 1


def load_tf_slim(wheel_dir: str) -> types.ModuleType:
    import trainop

    training = peers.import_tf_slim("training.training", pathlib.Path(wheel_dir))
    for name in (
        "create_train_op",
        "clip_gradient_norms",
        "clip_gradient_norms_fn",
        "multiply_gradients",
        "add_gradients_summaries",
    ):
        setattr(training, name, getattr(trainop, name))
    tests = peers.import_tf_slim("training.training_test")
    tests.layers = _slim_layers()
    tests.variables_lib.local_variable = _local_variable
    for name in ("TrainTest", "TrainBatchNormClassifierTest"):
        getattr(tests, name).setUp = _easy_training_set
    tests.setUpModule()
    return tests


def load_tf_agents(wheel_dir: str) -> types.ModuleType:
    import trainop

    eager_utils = peers.import_tf_agents_utils("eager_utils", pathlib.Path(wheel_dir))
    for name in (
        "create_train_op",
        "create_train_step",
        "clip_gradient_norms",
        "clip_gradient_norms_fn",
        "add_gradients_summaries",
        "add_variables_summaries",
    ):
        setattr(eager_utils, name, getattr(trainop, name))
    return peers.import_tf_agents_utils("eager_utils_test")


def main() -> None:
    peer, wheel_dir, *class_names = sys.argv[1:]
    tests = {"tf_slim": load_tf_slim, "tf_agents": load_tf_agents}[peer](wheel_dir)
    suite = unittest.TestSuite()
    for name in class_names:
        suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(getattr(tests, name)))
    result = unittest.TextTestRunner(stream=sys.stderr, verbosity=2).run(suite)
    print(
        json.dumps(
            {
                "run": result.testsRun,
                "skipped": [str(test) for test, _ in result.skipped],
                "failures": [str(test) for test, _ in result.failures + result.errors],
            }
        )
    )


if __name__ == "__main__":
    main()
