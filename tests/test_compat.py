"""What migrating programs rely on: TF_USE_LEGACY_KERAS=1, and a clear import error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

LEGACY_KERAS_PROGRAM = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    import tf_keras
    import trainop

    assert tf.keras is tf_keras or tf.keras.__name__.startswith("tf_keras"), tf.keras
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, input_shape=(2,))])
    x = tf.constant(np.random.RandomState(0).randn(32, 2), tf.float32)
    y = tf.reduce_sum(x, axis=1, keepdims=True)
    optimizer = tf.keras.optimizers.Adam(0.05)
    train_op = trainop.create_train_op(
        lambda: tf.reduce_mean(tf.keras.losses.mean_squared_error(y, model(x))), optimizer)
    losses = [float(train_op()) for _ in range(100)]

    graph = tf.Graph()
    with graph.as_default():
        w = tf.compat.v1.get_variable("w", initializer=1.0, use_resource=True)
        graph_op = trainop.create_train_op(w * w, tf.keras.optimizers.legacy.SGD(0.1))
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(graph_op)
            graph_w = float(session.run(w))
    print(json.dumps({
        "first": losses[0], "last": losses[-1],
        "global_step": int(tf.compat.v1.train.get_global_step()),
        "iterations": int(optimizer.iterations),
        "graph_w": graph_w,
    }))
""")


def _run(program: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
        timeout=300,
    )


def test_works_with_tf_use_legacy_keras():
    result = _run(LEGACY_KERAS_PROGRAM, TF_USE_LEGACY_KERAS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["last"] < 0.05 * report["first"]
    assert report["global_step"] == 100
    assert report["iterations"] == 100
    assert abs(report["graph_w"] - 0.8) < 1e-6


def test_import_without_tensorflow_says_what_to_install():
    program = textwrap.dedent("""
        import sys

        class NoTensorFlow:
            def find_spec(self, name, path=None, target=None):
                if name == "tensorflow" or name.startswith("tensorflow."):
                    raise ImportError("No module named 'tensorflow'")
                return None

        sys.meta_path.insert(0, NoTensorFlow())
        import trainop
    """)
    result = _run(program)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: trainop needs TensorFlow 2.16 or newer")
    assert "pip install 'trainop[cpu]'" in last_line
