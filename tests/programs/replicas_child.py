"""Checks that create_train_op refuses a strategy's scope plainly (in its own process: the
logical CPU devices must be set before TensorFlow starts)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import trainop  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
for strategy in [
    tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
    tf.distribute.OneDeviceStrategy("/cpu:0"),
]:
    with strategy.scope():
        w = tf.Variable(1.0)
        try:
            trainop.create_train_op(lambda w=w: w * w, keras.optimizers.SGD(0.1))
        except ValueError as error:
            print("refused:", error)
