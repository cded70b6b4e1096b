"""The suite's `fit` section: Keras's `model.fit` step with trainop's step and without.

The MLP of the suite (784-256-256-10, batch 64, Adam) as a Keras 3 `Sequential`, compiled
three ways from the same initial values: `model.compile` (the baseline), and
`trainop.keras.compile` with the default check and with `check_numerics="skip"`. A step is
one call of the model's `train_function` on an iterator over the same batch, which is what
`fit` calls for each batch (or, with `steps_per_execution=N`, for each N batches, a step
here then being N batches); `fit`'s callbacks, the same for all variants, are left out.

Imported by `benchmarks.suite` when it plans the section (this module imports the suite's
models).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

import trainop
import trainop.keras
from benchmarks.suite import LEARNING_RATE, Model, Variant


def keras_mlp(model: Model, values: list[Any]) -> keras.Sequential:
    """`model` (an MLP of the suite) as a Keras `Sequential` holding `values`."""
    *hidden, _ = [shape[1] for shape in model.shapes[0::2]]
    layers = [keras.Input(model.input_shape)]
    layers += [keras.layers.Dense(units, activation="relu") for units in hidden]
    layers.append(keras.layers.Dense(model.shapes[-1][0]))
    network = keras.Sequential(layers)
    network.set_weights(values)
    return network


def fit_variants(
    model: Model, seed: int, steps_per_execution: int = 1
) -> tuple[list[Variant], list[str]]:
    """The variants of the `fit` section, and no notes."""
    values = model.initial_values(seed)
    x, y = model.batch(seed)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat()
    variants = []

    def add(name: str, description: str, compile_model: Callable[..., None]) -> None:
        network = keras_mlp(model, values)
        compile_model(
            network,
            optimizer=keras.optimizers.Adam(LEARNING_RATE),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            steps_per_execution=steps_per_execution,
            jit_compile=False,
        )
        function = network.make_train_function() or network.train_function
        iterator = iter(dataset)
        variants.append(
            Variant(
                name,
                description,
                lambda: function(iterator),
                network.optimizer.iterations.numpy,
            )
        )

    add("baseline", "model.compile: Keras's own train_step", keras.Model.compile)
    add(
        "trainop",
        "trainop.keras.compile, the default check",
        lambda network, **settings: trainop.keras.compile(network, **settings),
    )
    add(
        "trainop_skip",
        'trainop.keras.compile(check_numerics="skip")',
        lambda network, **settings: trainop.keras.compile(
            network, check_numerics="skip", **settings
        ),
    )
    return variants, []
