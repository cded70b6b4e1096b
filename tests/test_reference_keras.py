"""The step on Keras 3 layers, property-tested against a plain NumPy reference.

Drawn: Dense layers, each frozen or not (`layer.trainable = False`) and each with or without a
kernel and a bias constraint; every optimizer family (SGD); `variables_to_train` left to the
train op or given as the layers' trainable variables; the default check, the skip guard or no
check, with a NaN target poisoning a batch; a global-norm clip or a gradient multiplier;
eager, XLA and two steps per call; accumulation over two calls.

The reference: a frozen layer never changes; the others take the SGD update of the
(transformed) gradient of `sum_i 0.5 * |x_i W_i + b_i - t_i|^2`, then their constraint, as
Keras 3's own optimizer applies it after each update. Eager only: Keras 3 builds no layer in
a `tf.compat.v1` graph.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from hypothesis import given, note, settings
from hypothesis import strategies as st

import trainop
from test_reference import FAMILIES, GRID, _max_examples, make_sgd

BATCH = 2
# Keras's fuzz factor, which its norm constraints add to the norm they divide by.
EPSILON = keras.config.epsilon()
# float32 arithmetic on values of order 1, relative to the largest weight.
TOLERANCE = 1e-5

# A constraint by name: the Keras object, and the same arithmetic in NumPy (on a kernel of
# shape (inputs, units) the norms are per unit, over axis 0, as Keras's default is).
CONSTRAINTS = {
    "non_neg": (
        keras.constraints.NonNeg,
        lambda w: w * (w >= 0.0),
    ),
    "max_norm": (
        lambda: keras.constraints.MaxNorm(0.5),
        lambda w: w * (np.clip(_norms(w), 0.0, 0.5) / (EPSILON + _norms(w))),
    ),
    "unit_norm": (
        keras.constraints.UnitNorm,
        lambda w: w / (EPSILON + _norms(w)),
    ),
    "min_max_norm": (
        lambda: keras.constraints.MinMaxNorm(0.5, 1.0, rate=0.5),
        lambda w: (
            w * ((0.5 * np.clip(_norms(w), 0.5, 1.0) + 0.5 * _norms(w)) / (EPSILON + _norms(w)))
        ),
    ),
}


def _norms(w: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(np.square(w), axis=0, keepdims=True))


@dataclasses.dataclass(frozen=True)
class Layer:
    inputs: int
    units: int
    use_bias: bool
    frozen: bool
    kernel_constraint: str | None
    bias_constraint: str | None
    kernel: tuple  # rows of the initial kernel
    bias: tuple

    def initial(self) -> list[np.ndarray]:
        weights = [np.array(self.kernel, np.float64)]
        return weights + [np.array(self.bias, np.float64)] if self.use_bias else weights


@dataclasses.dataclass(frozen=True)
class Config:
    layers: tuple[Layer, ...]
    family: str
    given_variables: bool  # variables_to_train=the trainable variables, or None
    check: str  # "True", "False" or "skip"
    transform: tuple | None  # ("clip_by_global_norm", c) or ("multiply", layer index, m)
    jit_compile: bool
    steps_per_call: int
    accumulation_steps: int
    learning_rate: float
    batches: tuple  # per batch, per layer: (x, t) as nested tuples

    def __repr__(self) -> str:
        lines = ["Config("]
        lines += [f"  {layer}" for layer in self.layers]
        lines.append(
            f"  {self.family}, variables_to_train given: {self.given_variables}, "
            f"check_numerics={self.check}, transform {self.transform}, "
            f"jit_compile={self.jit_compile}, steps_per_call={self.steps_per_call}, "
            f"accumulation_steps={self.accumulation_steps}, lr {self.learning_rate}"
        )
        lines += [f"  batch {i}: {batch}" for i, batch in enumerate(self.batches)]
        return "\n".join(lines) + "\n)"


def _matrix(draw: Any, rows: int, columns: int) -> tuple:
    return tuple(tuple(draw(GRID) for _ in range(columns)) for _ in range(rows))


@st.composite
def _layers(draw: Any) -> Layer:
    inputs, units = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    constraint = st.sampled_from([None, None, *CONSTRAINTS])
    return Layer(
        inputs=inputs,
        units=units,
        use_bias=draw(st.booleans()),
        frozen=draw(st.booleans()),
        kernel_constraint=draw(constraint),
        bias_constraint=draw(st.sampled_from([None, "non_neg", "max_norm"])),
        kernel=_matrix(draw, inputs, units),
        bias=tuple(draw(GRID) for _ in range(units)),
    )


@st.composite
def configs(draw: Any) -> Config:
    layers = tuple(
        draw(
            st.lists(_layers(), min_size=1, max_size=3).filter(
                lambda layers: not all(layer.frozen for layer in layers)
            )
        )
    )
    jit_compile, steps_per_call = draw(st.sampled_from([(False, 1), (True, 1), (False, 2)]))
    n_batches = draw(st.sampled_from([2, 4]) if steps_per_call == 2 else st.integers(1, 3))
    batches = []
    for _ in range(n_batches):
        batch = [(_matrix(draw, BATCH, a.inputs), _matrix(draw, BATCH, a.units)) for a in layers]
        if draw(st.integers(0, 3)) == 0:  # a NaN target in one layer's term
            i = draw(st.integers(0, len(layers) - 1))
            x, t = batch[i]
            batch[i] = (x, ((math.nan,) + t[0][1:],) + t[1:])
        batches.append(tuple(batch))
    transform = draw(
        st.one_of(
            st.none(),
            st.tuples(st.just("clip_by_global_norm"), st.sampled_from([0.3, 2.0])),
            st.tuples(
                st.just("multiply"),
                st.integers(0, len(layers) - 1),
                st.sampled_from([0.0, 0.5]),
            ),
        )
    )
    return Config(
        layers=layers,
        family=draw(st.sampled_from(FAMILIES)),
        given_variables=draw(st.booleans()),
        check=draw(st.sampled_from(["True", "False", "skip"])),
        transform=transform,
        jit_compile=jit_compile,
        steps_per_call=steps_per_call,
        accumulation_steps=draw(st.sampled_from([1, 2])),
        learning_rate=draw(st.sampled_from([0.0625, 0.125])),
        batches=tuple(batches),
    )


# --- The reference ----------------------------------------------------------------------------


def _gradients(config: Config, weights: list[list[np.ndarray]], batch: tuple) -> tuple:
    """The loss and, per layer, the gradients of its weights (kernel, then bias)."""
    loss, grads = 0.0, []
    for layer, w, (x, t) in zip(config.layers, weights, batch):
        x, t = np.array(x), np.array(t)
        residual = x @ w[0] + (w[1] if layer.use_bias else 0.0) - t
        loss += 0.5 * float(np.sum(residual**2))
        grads.append([x.T @ residual] + ([residual.sum(axis=0)] if layer.use_bias else []))
    return loss, grads


def _transform(config: Config, grads: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    trained = [i for i, layer in enumerate(config.layers) if not layer.frozen]
    if config.transform is None:
        return grads
    if config.transform[0] == "clip_by_global_norm":
        norm = math.sqrt(sum(float(np.sum(g**2)) for i in trained for g in grads[i]))
        if not np.isfinite(norm):
            scale = math.nan
        else:
            scale = 1.0 if norm <= config.transform[1] else config.transform[1] / norm
        return [[g * scale for g in layer_grads] for layer_grads in grads]
    _, index, multiplier = config.transform
    grads = [list(layer_grads) for layer_grads in grads]
    # A multiplier of zero freezes: no gradient, so no update and no constraint (Keras 3's
    # optimizer constrains only the variables it updates).
    grads[index][0] = None if multiplier == 0 else grads[index][0] * multiplier
    return grads


def _finite(config: Config, grads: list[list[np.ndarray]]) -> bool:
    return all(
        np.isfinite(g).all()
        for layer, layer_grads in zip(config.layers, grads)
        if not layer.frozen
        for g in layer_grads
        if g is not None
    )


def refuses(config: Config) -> bool:
    """Whether the train op must refuse to run: a multiplier of zero leaves no gradient."""
    if config.transform is None or config.transform[0] != "multiply":
        return False
    _, index, multiplier = config.transform
    others = [layer for i, layer in enumerate(config.layers) if i != index and not layer.frozen]
    return multiplier == 0 and not others and not config.layers[index].use_bias


def reference(config: Config) -> tuple[list[list[np.ndarray]], list[np.ndarray | None]]:
    """The weights after the batches, and each call's losses (None if the call raised)."""
    weights = [layer.initial() for layer in config.layers]
    if refuses(config):
        return weights, []
    sums: list[list[np.ndarray]] | None = None
    added = 0

    def update(grads: list[list[np.ndarray]]) -> None:
        for layer, w, g in zip(config.layers, weights, _transform(config, grads)):
            if layer.frozen:
                continue
            for k, constraint in enumerate([layer.kernel_constraint, layer.bias_constraint]):
                if k < len(w) and g[k] is not None:
                    w[k] = w[k] - config.learning_rate * g[k]
                    if constraint:
                        w[k] = CONSTRAINTS[constraint][1](w[k])

    losses: list[np.ndarray | None] = []
    spc = config.steps_per_call
    for start in range(0, len(config.batches), spc):
        call_losses: list[float] = []
        raised = False
        for batch in config.batches[start : start + spc]:
            with np.errstate(invalid="ignore"):
                loss, grads = _gradients(config, weights, batch)
            finite = np.isfinite(loss)
            if config.check == "True" and not finite:
                raised = True
                break  # the error ends the call; its earlier steps stay applied
            call_losses.append(loss)
            if config.check == "skip":
                own = grads if config.accumulation_steps > 1 else _transform(config, grads)
                if not (finite and _finite(config, own)):
                    continue
            if config.accumulation_steps == 1:
                update(grads)
                continue
            if sums is None:
                sums = grads
            else:
                sums = [[s + g for s, g in zip(ss, gs)] for ss, gs in zip(sums, grads)]
            added += 1
            if added == config.accumulation_steps:
                update([[s / added for s in ss] for ss in sums])
                sums, added = None, 0
        losses.append(None if raised else np.array(call_losses))
    return weights, losses


# --- trainop's step ---------------------------------------------------------------------------


def _keras_layers(config: Config) -> list[keras.layers.Dense]:
    layers = []
    for i, spec in enumerate(config.layers):
        kernel_constraint, bias_constraint = (
            CONSTRAINTS[name][0]() if name else None
            for name in (spec.kernel_constraint, spec.bias_constraint)
        )
        layer = keras.layers.Dense(
            spec.units,
            use_bias=spec.use_bias,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            name=f"dense{i}",
        )
        layer.build((None, spec.inputs))
        layer.set_weights([w.astype(np.float32) for w in spec.initial()])
        layer.trainable = not spec.frozen
        layers.append(layer)
    return layers


def run_trainop(config: Config) -> tuple[list[list[np.ndarray]], list[np.ndarray | None]]:
    layers = _keras_layers(config)

    def loss_fn(*flat: tf.Tensor) -> tf.Tensor:
        terms = []
        for i, layer in enumerate(layers):
            x, t = flat[2 * i], flat[2 * i + 1]
            terms.append(0.5 * tf.reduce_sum(tf.square(layer(x) - t)))
        return tf.add_n(terms)

    transform_grads_fn = None
    if config.transform and config.transform[0] == "clip_by_global_norm":
        transform_grads_fn = trainop.clip_by_global_norm_fn(config.transform[1])
    elif config.transform:
        _, index, multiplier = config.transform
        transform_grads_fn = trainop.multiply_gradients_fn([(layers[index].kernel, multiplier)])
    trainable = [v for layer in layers for v in layer.trainable_variables]
    train_op = trainop.create_train_op(
        loss_fn,
        make_sgd(config.family, config.learning_rate),
        global_step=tf.Variable(0, dtype=tf.int64),
        variables_to_train=trainable if config.given_variables else None,
        transform_grads_fn=transform_grads_fn,
        check_numerics={"True": True, "False": False, "skip": "skip"}[config.check],
        accumulation_steps=config.accumulation_steps,
        jit_compile=config.jit_compile,
        steps_per_call=config.steps_per_call,
    )
    spc = config.steps_per_call
    losses: list[np.ndarray | None] = []
    for start in range(0, len(config.batches), spc):
        call = config.batches[start : start + spc]
        flat = []
        for i in range(len(layers)):
            for j in range(2):
                arrays = [np.array(batch[i][j], np.float32) for batch in call]
                flat.append(arrays[0] if spc == 1 else np.stack(arrays))
        try:
            losses.append(np.atleast_1d(np.asarray(train_op(*flat), np.float64)))
        except tf.errors.InvalidArgumentError:
            losses.append(None)
        except ValueError as error:
            assert "left no gradient to apply" in str(error), error
            break  # refused, at the first call (when the step is traced)
    return [[w.astype(np.float64) for w in layer.get_weights()] for layer in layers], losses


@settings(max_examples=_max_examples(40))
@given(configs())
def test_keras_layers_match_the_reference(config: Config) -> None:
    note(repr(config))
    want_weights, want_losses = reference(config)
    got_weights, got_losses = run_trainop(config)
    scale = max([1.0] + [float(np.max(np.abs(w), initial=0.0)) for ws in want_weights for w in ws])
    for i, (layer, got, want) in enumerate(zip(config.layers, got_weights, want_weights)):
        for name, g, w in zip(["kernel", "bias"], got, want):
            if layer.frozen:
                np.testing.assert_array_equal(g, w, err_msg=f"frozen dense{i}/{name} moved")
            else:
                np.testing.assert_allclose(
                    g, w, rtol=0, atol=TOLERANCE * scale, err_msg=f"dense{i}/{name}"
                )
    assert [g is None for g in got_losses] == [w is None for w in want_losses], (
        f"calls that raised: expected {want_losses}, got {got_losses}"
    )
    for g, w in zip(got_losses, want_losses):
        if w is not None:
            np.testing.assert_allclose(g, w, rtol=TOLERANCE, atol=TOLERANCE, err_msg="losses")
