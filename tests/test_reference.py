"""trainop's step against a plain reference step, property-tested (DESIGN.md, invariant 6).

The reference (`reference`) is written without trainop, in float64 NumPy, from the
definitions:

* Model: a sum of per-variable losses whose gradients are known in closed form. A dense
  variable `w` given `(a, b, c)` adds `0.5 * ||a * w - b||^2 + sum(where(isfinite(c), c * w,
  0))`, gradient `a * (a * w - b) + c`, NaN where `c` is not finite (the gradient of a `tf.where`
  whose other branch is not finite: a finite loss with a NaN gradient). An embedding table given
  `(ids, t)` adds `0.5 * ||table[ids] - t||^2`: an `IndexedSlices` gradient, the slices of a
  repeated id adding up. A variable the loss does not read gets no gradient (None). Each term
  is computed in its variable's dtype and cast to the loss dtype (float32 or float64). A complex
  dense variable adds the real `0.5 * real(sum((a * w - b) * conj(a * w - b))) + sum(real(where(
  isfinite(c), c * w, 0)))`, `c` real: TensorFlow's gradient (the conjugate Wirtinger
  convention, `2z` for `|z|^2`) is `conj(a) * (a * w - b) + c`. The
  reference rounds to a variable's dtype wherever trainop holds a value in it (inputs, each
  operation of the forward pass, each gradient a transform returns, the weights), so that a
  float16 overflow is an inf in both.
* Transforms, on the dense gradient: `clip_gradient_norms` (each to norm <= c; an
  `IndexedSlices` one by the norm of the dense gradient it adds up to), `clip_by_global_norm`
  (all together), `clip_by_value` (element-wise), `multiply_gradients` (by name; 0 freezes: no
  gradient), and chains of them. An inf bound changes nothing; a norm that is not finite makes
  the clipped gradients NaN (an `IndexedSlices` one in the rows it names). A complex gradient
  is measured by its moduli, `sqrt(sum |g|^2)`.
* A Keras 3 SGD's own clipping (`clipnorm`, `global_clipnorm`, `clipvalue`), applied by the
  optimizer to what trainop hands it, after trainop's transforms (`keras_clip`, which models
  base_optimizer.py's `_clip_gradients`); its `loss_scale_factor` changes nothing.
* Update: plain SGD, `w <- w - lr * g`, exact; the global step counts applied updates.
  (`tf_keras.optimizers.SGD` keeps a momentum buffer even at momentum 0, `m <- 0 * m - lr * g,
  w <- w + m`, so an inf it applied once turns NaN at the next update: the reference does so.)
* Checks: `check_numerics=True`: a step whose loss is not finite raises and changes nothing.
  A `SkipNonFiniteSteps`: a step whose loss or transformed gradients are not finite changes
  nothing and is counted; when `max_consecutive` steps in a row were, the next bad step raises
  instead, changing nothing, counters included. `False`: applied as it is.
* Accumulation (`accumulation_steps=2`): each call, checked as above on its own loss and
  gradients (one that fails adds nothing), adds its gradients; every second call that adds
  applies the mean, transformed, and the summaries see the update of one step on the batch
  twice as large (the mean gradient's norm, the mean loss).
* Several steps a call (`steps_per_call=2`): the steps in order, the losses returned as a
  float32 vector; a step that raises ends its call, compiled (`jit_compile=True`) or not.
* Summaries: `train/loss` and `train/global_gradient_norm` (of the gradients before the
  transform) at the global step before each applied update (0, 1, ..., an int32 global step's
  too).

What is drawn (`configs`, a `Config` that prints readably): 1 to 3 variables, each dense, an
embedding looked up with or without repeated ids, or unused, each float16, bfloat16, float32 or
float64, a dense one also complex64 or complex128 (its a and b complex, NaN or inf put in
either part); the loss dtype; no transform, one, or a chain of 2 or 3, with edge parameters (1e-6,
1e6, inf, 0, negative multipliers); the check mode and `max_consecutive` (None, 0, 1, 3); 1 to
4 batches on a grid of quarters (exact in every dtype), about half of them holding a NaN, inf
or -inf (in the loss, or in a gradient only); the execution: a `tf.compat.v1` Graph and
Session (the loss a tensor of placeholders), eager (a callable loss, the batch passed as
arguments), `jit_compile=True`, `steps_per_call=2`, both, and `accumulation_steps=2` with any
of them; the optimizer family, SGD in each, where the reference is exact:
`tf.compat.v1.train.GradientDescentOptimizer`, `keras.optimizers.SGD`, `tf_keras.optimizers.SGD`
and `tf_keras.optimizers.legacy.SGD` (each applies to all four dtypes); the learning rate (a
power of two, exact in every dtype); for `keras.optimizers.SGD`, `clipnorm`, `global_clipnorm`
or `clipvalue` (0.3, 2 or 50) and `loss_scale_factor` (None or 128); the global step: trainop's
default (int64) or a `tf.Variable(0, dtype=tf.int64 or tf.int32)` passed as `global_step`.
Each example builds its train op afresh.

Compared: the weights (within 1e-2 of the variable's scale for float16, 2e-2 for bfloat16, 1e-5 for
float32 and complex64, 1e-10 for float64 and complex128; the least precise of them all after a
global-norm clip, whose factor they share), the loss each call returns (or that it raises), the
global step and the guard's counters; in `test_summaries_match_the_reference` also the summaries,
read back from the event files.

Refused by design, drawn, and the refusal asserted (a ValueError or TypeError saying why, nothing
changed): a multiplier naming a variable that has no gradient, a transform freezing every variable,
`jit_compile=True` with a summary writer, `clip_by_value` of a complex gradient. With a complex
variable, the losses and norms are compared as complex numbers are: not finite in the same places
(which of inf or NaN a product with an inf part makes is NumPy's or Eigen's own). Not drawn, Keras's
own limits (Keras 3.15): Keras's clipping with a complex variable (a TypeError: its clip ops take no
complex dtype), `global_clipnorm` with variables of different dtypes (a ValueError stacking their
norms), Keras's clipping of an embedding whose ids repeat unless accumulated (Keras clips the slices
apart; accumulated gradients are dense), `loss_scale_factor` with Keras's clipping of an embedding
(Keras divides the gradients with `/`, which IndexedSlices lack, so trainop hands them over dense,
and Keras then clips the dense gradient). Not drawn either: `clip_by_value` bounds on one side of 0
(an `IndexedSlices` gradient is clipped in the rows it names, where the dense gradient's other
rows, 0, would become the bound: no plain reference for both), and `jit_compile` or
`steps_per_call` in graph mode (refused: the Session runs the graph it is given).

`test_mirrored_matches_one_device`: `MirroredStrategy` over two logical CPUs, in a child process
(`tests/programs/reference_mirrored_child.py`), for each loss spelling (a Keras 3 loss object,
`keras.ops.mean`, `tf.reduce_mean`, `tf.nn.compute_average_loss` with `global_batch_size`),
even and uneven shares (a replica given none included), with and without a clip: the weights,
losses and global step of one device on the whole batch, itself checked against NumPy.

Examples: 100 and 25 under the "ci" Hypothesis profile (the default; about 0.2 s each);
HYPOTHESIS_PROFILE=thorough draws the profile's count, TRAINOP_REFERENCE_EXAMPLES=n draws n.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from hypothesis import given, note, settings
from hypothesis import strategies as st

import trainop
from conftest import read_summaries


def _max_examples(ci_examples: int) -> int:
    """How many examples a property test draws: `ci_examples` under the "ci" profile (the
    default: about 0.2 s an example here); the profile's own count under another
    (HYPOTHESIS_PROFILE=thorough); TRAINOP_REFERENCE_EXAMPLES, if set, under any."""
    asked = os.environ.get("TRAINOP_REFERENCE_EXAMPLES")
    if asked:
        return int(asked)
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci":
        return settings.default.max_examples
    return ci_examples


DTYPES = ("float16", "bfloat16", "float32", "float64")
# A dense variable may also be complex (an embedding or an unused variable is not).
COMPLEX_DTYPES = ("complex64", "complex128")
NUMPY_DTYPES = {
    "float16": np.float16,
    "bfloat16": tf.bfloat16.as_numpy_dtype,
    "float32": np.float32,
    "float64": np.float64,
    "complex64": np.complex64,
    "complex128": np.complex128,
}
# The dtype of a complex dtype's parts (and of a complex variable's real loss term).
REAL_PART = {"complex64": "float32", "complex128": "float64"}
# Per dtype: the largest difference from the reference, relative to the variable's scale.
TOLERANCE = {
    "float16": 1e-2,
    "bfloat16": 2e-2,
    "float32": 1e-5,
    "float64": 1e-10,
    "complex64": 1e-5,
    "complex128": 1e-10,
}
FAMILIES = ("v1", "keras", "tf_keras", "tf_keras_legacy")
TABLE_ROWS = 4
TABLE_WIDTH = 2


def make_sgd(
    family: str,
    learning_rate: float,
    keras_clip: tuple[str, float] | None = None,
    loss_scale_factor: float | None = None,
) -> Any:
    """SGD of `family`; a Keras 3 one with its clipping option `keras_clip` ((name, value):
    clipnorm, global_clipnorm or clipvalue) and its `loss_scale_factor`."""
    keras_options: dict[str, Any] = dict([keras_clip]) if keras_clip else {}
    if loss_scale_factor is not None:
        keras_options["loss_scale_factor"] = loss_scale_factor
    assert family == "keras" or not keras_options
    return {
        "v1": lambda: tf.compat.v1.train.GradientDescentOptimizer(learning_rate),
        "keras": lambda: keras.optimizers.SGD(learning_rate, **keras_options),
        "tf_keras": lambda: tf_keras.optimizers.SGD(learning_rate),
        "tf_keras_legacy": lambda: tf_keras.optimizers.legacy.SGD(learning_rate),
    }[family]()


def rounded(x: Any, dtype: str) -> np.ndarray:
    """`x` rounded to `dtype` (inf where it overflows), as float64 (complex128 if complex)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype in COMPLEX_DTYPES:
            return np.asarray(x, np.complex128).astype(NUMPY_DTYPES[dtype]).astype(np.complex128)
        return np.asarray(x, np.float64).astype(NUMPY_DTYPES[dtype]).astype(np.float64)


# --- The drawn configuration ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Var:
    """A variable: `dense` (a vector), `sparse` (an embedding table) or `unused`."""

    name: str
    kind: str
    dtype: str
    initial: tuple
    lookups: int = 0  # ids per batch, for an embedding
    repeated: bool = False  # whether an embedding's ids repeat in every batch

    @property
    def shape(self) -> tuple[int, ...]:
        return np.shape(self.initial)

    def __repr__(self) -> str:
        extra = (
            f", {self.lookups} ids{' repeated' if self.repeated else ''}" if self.lookups else ""
        )
        return f"{self.name}: {self.kind} {self.dtype}{extra}, initial {self.initial}"


@dataclasses.dataclass(frozen=True)
class Transform:
    kind: str  # clip_gradient_norms, clip_by_global_norm, clip_by_value, multiply_gradients
    args: tuple

    def __repr__(self) -> str:
        if self.kind == "multiply_gradients":
            return f"multiply_gradients({dict(self.args)})"
        return f"{self.kind}({', '.join(map(repr, self.args))})"

    def build(self) -> Any:
        if self.kind == "multiply_gradients":
            return trainop.multiply_gradients_fn(dict(self.args))
        return getattr(trainop, self.kind + "_fn")(*self.args)


@dataclasses.dataclass(frozen=True)
class Config:
    variables: tuple[Var, ...]
    loss_dtype: str
    transforms: tuple[Transform, ...]
    check: str  # "True", "False" or "skip"
    max_consecutive: int | None
    mode: str  # "graph" or "eager"
    jit_compile: bool
    steps_per_call: int
    accumulation_steps: int
    family: str
    learning_rate: float
    summaries: bool
    # "default" (trainop finds or creates the graph's, int64), or the dtype of the
    # `tf.Variable(0, dtype=...)` passed as `global_step`: "int64" or "int32".
    global_step: str
    # A Keras 3 SGD's clipping option, (name, value): clipnorm, global_clipnorm or clipvalue.
    keras_clip: tuple[str, float] | None
    # A Keras 3 SGD's loss_scale_factor.
    loss_scale_factor: float | None
    # Per batch, per variable: (a, b, c) for a dense one, (ids, t) for an embedding, () unused.
    batches: tuple[tuple[tuple, ...], ...]

    def __repr__(self) -> str:
        check = self.check
        if check == "skip":
            check = f"SkipNonFiniteSteps(max_consecutive={self.max_consecutive})"
        execution = [self.mode, f"family={self.family}", f"learning_rate={self.learning_rate}"]
        execution += [
            f"{name}={getattr(self, name)}" for name in ("jit_compile",) if self.jit_compile
        ]
        execution += [
            f"{name}={getattr(self, name)}"
            for name in ("steps_per_call", "accumulation_steps")
            if getattr(self, name) != 1
        ]
        if self.keras_clip:
            execution.append(f"{self.keras_clip[0]}={self.keras_clip[1]}")
        if self.loss_scale_factor is not None:
            execution.append(f"loss_scale_factor={self.loss_scale_factor}")
        if self.global_step != "default":
            execution.append(f"global_step=tf.Variable(0, dtype=tf.{self.global_step})")
        if self.summaries:
            execution.append("summaries")
        lines = ["Config("]
        lines += [f"  {v!r}" for v in self.variables]
        lines.append(f"  loss dtype {self.loss_dtype}, check_numerics={check}")
        lines.append(f"  transforms {list(self.transforms)}")
        lines.append(f"  {', '.join(execution)}")
        for i, batch in enumerate(self.batches):
            lines.append(f"  batch {i}: {batch}")
        return "\n".join(lines) + "\n)"


# (mode, jit_compile, steps_per_call): jit_compile and steps_per_call are eager mode's.
EXECUTIONS = [
    ("eager", False, 1),
    ("graph", False, 1),
    ("eager", True, 1),
    ("eager", False, 2),
    ("eager", True, 2),
]
GRID = st.integers(-8, 8).map(lambda k: k / 4)  # quarters in [-2, 2]: exact in every dtype


def _grid_tuple(draw: Any, shape: tuple[int, ...]) -> tuple:
    if len(shape) == 1:
        return tuple(draw(GRID) for _ in range(shape[0]))
    return tuple(_grid_tuple(draw, shape[1:]) for _ in range(shape[0]))


COMPLEX_GRID = st.tuples(GRID, GRID).map(lambda parts: complex(*parts))


def _complex_tuple(draw: Any, size: int) -> tuple:
    return tuple(draw(COMPLEX_GRID) for _ in range(size))


def _draw_variable(
    draw: Any, index: int, kind: str, dtypes: tuple[str, ...], repeats: bool = True
) -> Var:
    """A variable of one of `dtypes` (complex ones only for a dense variable); an embedding's
    ids repeat only if `repeats`."""
    dtype = draw(
        st.sampled_from(dtypes if kind == "dense" else tuple(d for d in dtypes if d in DTYPES))
    )
    name = f"v{index}"
    if kind == "dense":
        size = draw(st.integers(1, 3))
        if dtype in COMPLEX_DTYPES:
            return Var(name, kind, dtype, _complex_tuple(draw, size))
        return Var(name, kind, dtype, _grid_tuple(draw, (size,)))
    if kind == "sparse":
        repeated = draw(st.booleans()) if repeats else False
        lookups = draw(st.integers(2, 4) if repeated else st.integers(1, 3))
        initial = _grid_tuple(draw, (TABLE_ROWS, TABLE_WIDTH))
        return Var(name, kind, dtype, initial, lookups, repeated)
    return Var(name, kind, dtype, _grid_tuple(draw, (2,)))


def _draw_inputs(draw: Any, var: Var) -> tuple:
    if var.kind == "dense" and var.dtype in COMPLEX_DTYPES:
        # a and b complex; c real (the loss's linear term is real(c * w)).
        size = var.shape[0]
        return _complex_tuple(draw, size), _complex_tuple(draw, size), _grid_tuple(draw, (size,))
    if var.kind == "dense":
        return tuple(_grid_tuple(draw, var.shape) for _ in range(3))
    if var.kind == "sparse":
        if var.repeated:
            ids = [draw(st.integers(0, TABLE_ROWS - 1)) for _ in range(var.lookups - 1)]
            ids.insert(draw(st.integers(0, len(ids))), ids[0])
        else:
            ids = draw(st.permutations(range(TABLE_ROWS)))[: var.lookups]
        return tuple(ids), _grid_tuple(draw, (var.lookups, TABLE_WIDTH))
    return ()


def _poisoned(draw: Any, variables: tuple[Var, ...], inputs: list[tuple]) -> list[tuple]:
    """`inputs` with one value made NaN, inf or -inf, about half the time."""
    poison = draw(st.sampled_from([None, None, None, math.nan, math.inf, -math.inf]))
    if poison is None:
        return inputs
    used = [i for i, v in enumerate(variables) if v.kind != "unused"]
    i = draw(st.sampled_from(used))
    # A dense variable's a, b or c (c: a finite loss with a NaN gradient); an embedding's t.
    which = draw(st.integers(0, 2)) if variables[i].kind == "dense" else 1
    values = np.array(inputs[i][which])
    values = values.astype(np.complex128 if np.iscomplexobj(values) else np.float64)
    k = draw(st.integers(0, values.size - 1))
    if np.iscomplexobj(values) and draw(st.booleans()):
        values.flat[k] = complex(values.flat[k].real, poison)  # in the imaginary part
    elif np.iscomplexobj(values):
        values.flat[k] = complex(poison, values.flat[k].imag)
    else:
        values.flat[k] = poison
    entry = list(inputs[i])
    entry[which] = (
        tuple(values.tolist()) if values.ndim == 1 else tuple(map(tuple, values.tolist()))
    )
    inputs = list(inputs)
    inputs[i] = tuple(entry)
    return inputs


def _draw_transform(draw: Any, variables: tuple[Var, ...]) -> Transform:
    kind = draw(
        st.sampled_from(
            ["clip_gradient_norms", "clip_by_global_norm", "clip_by_value", "multiply_gradients"]
        )
    )
    # Edge values, and values that float32 does not hold exactly (0.3, 0.1, 1e-6): a float64
    # gradient must be transformed in float64.
    if kind in ("clip_gradient_norms", "clip_by_global_norm"):
        return Transform(kind, (draw(st.sampled_from([1e-6, 0.3, 2.0, 1e6, math.inf])),))
    if kind == "clip_by_value":
        # Bounds on either side of 0 (see the module's docstring).
        low = draw(st.sampled_from([0.0, -1e-6, -0.3, -3.0, -1e6, -math.inf]))
        high = draw(st.sampled_from([0.0, 1e-6, 0.3, 3.0, 1e6, math.inf]))
        return Transform(kind, (low, high))
    names = draw(
        st.lists(st.sampled_from([v.name for v in variables]), min_size=1, max_size=2, unique=True)
    )
    multipliers = [draw(st.sampled_from([0.0, 1e-6, 0.1, -2.0, 1e6])) for _ in names]
    return Transform(kind, tuple(zip(names, multipliers)))


@st.composite
def configs(draw: Any, summaries: bool = False) -> Config:
    kinds = draw(
        st.lists(st.sampled_from(["dense", "sparse", "unused"]), min_size=1, max_size=3).filter(
            lambda kinds: any(k != "unused" for k in kinds)
        )
    )
    # Every family applies SGD to complex variables (checked: tf.compat.v1's
    # GradientDescentOptimizer, keras.optimizers.SGD, tf_keras.optimizers.SGD and its legacy
    # one all update w <- w - lr * g with complex64 and complex128).
    family = draw(st.sampled_from(FAMILIES))
    accumulation_steps = draw(st.sampled_from([1, 2]))
    keras_clip, loss_scale_factor = None, None
    if family == "keras":
        keras_clip = draw(
            st.sampled_from([None, None, "clipnorm", "global_clipnorm", "clipvalue"]).flatmap(
                lambda name: (
                    st.just(None)
                    if name is None
                    else st.tuples(st.just(name), st.sampled_from([0.3, 2.0, 50.0]))
                )
            )
        )
    # With an embedding too: Keras 3.15's apply divides each gradient by loss_scale_factor with
    # `/`, which IndexedSlices lack, so trainop hands them over dense; Keras then clips the
    # dense gradient, where the reference models its clipping of slices: not both.
    if family == "keras" and ("sparse" not in kinds or accumulation_steps > 1 or not keras_clip):
        loss_scale_factor = draw(st.sampled_from([None, 128.0]))
    # Keras's clipping refuses complex gradients (tf.clip_by_norm, tf.minimum, tf.clip_by_value
    # take no complex dtype: a TypeError from Keras, not trainop's), so none is drawn with it.
    dtypes = DTYPES if keras_clip else DTYPES + COMPLEX_DTYPES
    # Keras clips an IndexedSlices gradient slice by slice (a repeated id's slices clipped
    # apart, the norm of all the slices, not of the rows they add up to): the reference, on
    # the dense gradient, models Keras's clipping only of ids that do not repeat, unless the
    # gradients are accumulated (then dense).
    repeats = not keras_clip or accumulation_steps > 1
    variables: list[Var] = []
    for i, kind in enumerate(kinds):
        variables.append(_draw_variable(draw, i, kind, dtypes, repeats))
        if keras_clip and keras_clip[0] == "global_clipnorm":
            # Keras measures the global norm by stacking the gradients' norms, each in its
            # own dtype: a ValueError from Keras when they differ. One dtype for all.
            dtypes = (variables[0].dtype,)
    variables = tuple(variables)
    mode, jit_compile, steps_per_call = draw(st.sampled_from(EXECUTIONS))
    check = draw(st.sampled_from(["True", "skip", "False"]))
    n_batches = draw(st.sampled_from([2, 4]) if steps_per_call == 2 else st.integers(1, 4))
    batches = []
    for _ in range(n_batches):
        inputs = [_draw_inputs(draw, v) for v in variables]
        batches.append(tuple(_poisoned(draw, variables, inputs)))
    return Config(
        variables=variables,
        loss_dtype=draw(st.sampled_from(["float32", "float64"])),
        transforms=tuple(_draw_transform(draw, variables) for _ in range(draw(st.integers(0, 3)))),
        check=check,
        max_consecutive=draw(st.sampled_from([None, 0, 1, 3])) if check == "skip" else None,
        mode=mode,
        jit_compile=jit_compile,
        steps_per_call=steps_per_call,
        accumulation_steps=accumulation_steps,
        family=family,
        learning_rate=draw(st.sampled_from([0.125, 0.25, 0.5])),
        summaries=summaries,
        global_step=draw(st.sampled_from(["default", "int64", "int32"])),
        keras_clip=keras_clip,
        loss_scale_factor=loss_scale_factor,
        batches=tuple(batches),
    )


# --- The reference ----------------------------------------------------------------------------


@dataclasses.dataclass
class Grad:
    """A gradient as the dense array it adds up to, and the rows it names (all, if dense)."""

    dense: np.ndarray
    rows: np.ndarray  # bool, one per row

    def map(self, fn: Any, dtype: str) -> Grad:
        return Grad(rounded(fn(self.dense), dtype), self.rows)

    def scaled(self, factor: float, dtype: str) -> Grad:
        """Times `factor` (a clip's scale): NaN makes the named rows NaN, the others stay 0."""
        mask = self.rows.reshape((-1,) + (1,) * (self.dense.ndim - 1))
        with np.errstate(invalid="ignore"):
            return Grad(rounded(np.where(mask, self.dense * factor, self.dense), dtype), self.rows)


class Refused(Exception):
    """The configuration is refused by design: trainop raises a ValueError saying this."""


@dataclasses.dataclass
class Outcome:
    weights: list[np.ndarray]
    global_step: int
    losses: list[np.ndarray | None]  # per call; None if the call raised
    skipped: tuple[int, int] | None = None  # the guard's skipped and consecutive counts
    summaries: dict[str, list[tuple[int, float]]] | None = None
    # Per variable, the largest magnitude the reference met: weights and lr * gradient.
    scales: list[float] | None = None
    # Per call, the tolerance of its losses.
    loss_tolerances: list[float] | None = None
    # The ValueError that refused the configuration, when the train op was built or called.
    refused: str | None = None


def forward(config: Config, weights: list[np.ndarray], batch: tuple) -> tuple:
    """The loss, its tolerance and the gradients (Grad or None), in float64 rounded to dtypes."""
    total, tolerance, grads = 0.0, 0.0, []
    with np.errstate(over="ignore", invalid="ignore"):
        for var, w, inputs in zip(config.variables, weights, batch):

            def r(x: Any, var: Var = var) -> np.ndarray:
                return rounded(x, var.dtype)

            if var.kind == "dense" and var.dtype in COMPLEX_DTYPES:
                # 0.5 * real(sum(r * conj(r))) + sum(real(where(isfinite(c), c * w, 0))), c
                # real: TensorFlow's gradient (the conjugate Wirtinger derivative, twice
                # dL/d conj(w): 2z for |z|^2) is conj(a) * r + c.
                part = REAL_PART[var.dtype]
                a, b = r(inputs[0]), r(inputs[1])
                c = rounded(inputs[2], part)
                residual = r(r(a * w) - b)
                finite = np.isfinite(c)
                linear = rounded(np.real(np.where(finite, r(c * w), 0.0)), part)
                squares = rounded(np.real(r(residual * np.conj(residual))), part)
                term = rounded(
                    rounded(0.5 * rounded(np.sum(squares), part), part)
                    + rounded(np.sum(linear), part),
                    part,
                )
                grad = r(r(np.conj(a) * residual) + np.where(finite, c, np.nan))
                grads.append(Grad(grad, np.ones(w.shape[0], bool)))
            elif var.kind == "dense":
                a, b, c = (r(x) for x in inputs)
                residual = r(r(a * w) - b)
                finite = np.isfinite(c)
                linear = r(np.where(finite, r(c * w), 0.0))
                term = r(r(0.5 * r(np.sum(r(residual * residual)))) + r(np.sum(linear)))
                grad = r(r(a * residual) + np.where(finite, c, np.nan))
                grads.append(Grad(grad, np.ones(w.shape[0], bool)))
            elif var.kind == "sparse":
                ids, targets = np.array(inputs[0]), r(inputs[1])
                residual = r(w[ids] - targets)
                term = r(0.5 * r(np.sum(r(residual * residual))))
                dense = np.zeros_like(w)
                np.add.at(dense, ids, residual)
                rows = np.zeros(w.shape[0], bool)
                rows[ids] = True
                grads.append(Grad(r(dense), rows))
            else:
                grads.append(None)
                continue
            total += float(rounded(term, config.loss_dtype))
            if np.isfinite(term):
                tolerance += TOLERANCE[var.dtype] * abs(float(term))
    loss = rounded(total, config.loss_dtype)
    if np.isfinite(loss):
        tolerance += TOLERANCE[config.loss_dtype] * abs(float(loss))
    return float(loss), tolerance + 1e-12, grads


def _norm(grads: list[Grad | None]) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        # A complex gradient by its moduli.
        return float(np.sqrt(sum(np.sum(np.abs(g.dense) ** 2) for g in grads if g is not None)))


def transform(config: Config, grads: list[Grad | None]) -> list[Grad | None]:
    """`config.transforms` applied in order, each result rounded to its variable's dtype."""
    dtypes = [v.dtype for v in config.variables]
    for t in config.transforms:
        if t.kind == "multiply_gradients":
            multipliers = dict(t.args)
            result = []
            for var, g in zip(config.variables, grads):
                m = multipliers.get(var.name)
                if m is not None and g is None:
                    raise Refused("names a variable that has no gradient")
                result.append(
                    g if m is None else None if m == 0 else g.map(lambda x, m=m: x * m, var.dtype)
                )
            grads = result
        elif t.kind == "clip_by_value":
            low, high = t.args
            if any(
                g is not None and v.dtype in COMPLEX_DTYPES for g, v in zip(grads, config.variables)
            ):
                raise Refused("`clip_by_value` cannot clip a complex gradient")
            grads = [
                None if g is None else g.map(lambda x: np.clip(x, low, high), dtype)  # noqa: B023
                for g, dtype in zip(grads, dtypes)
            ]
        else:
            (max_norm,) = t.args
            if math.isinf(max_norm):
                continue  # unchanged

            def scale(norm: float) -> float:
                if not np.isfinite(norm):
                    return math.nan
                return 1.0 if norm <= max_norm else max_norm / norm  # noqa: B023

            if t.kind == "clip_by_global_norm":
                factor = scale(_norm(grads))
                grads = [None if g is None else g.scaled(factor, d) for g, d in zip(grads, dtypes)]
            else:
                grads = [
                    None if g is None else g.scaled(scale(_norm([g])), d)
                    for g, d in zip(grads, dtypes)
                ]
    if all(g is None for g in grads):
        raise Refused("left no gradient to apply")
    return grads


def keras_clip(config: Config, grads: list[Grad | None]) -> list[Grad | None]:
    """What a Keras 3 SGD's clipping option does to the gradients trainop hands it (after
    trainop's transforms; base_optimizer.py's `_clip_gradients`), each in its dtype. An
    `IndexedSlices` gradient's values are clipped: the rows it names (ids that do not repeat,
    see `configs`). `clipnorm`: tf.clip_by_norm, `g * c / max(norm, c)` (an inf norm makes
    the finite values 0, the infinite NaN; a NaN norm makes them all NaN). `global_clipnorm`:
    `g * (c * min(1 / norm, 1 / c) + (norm - norm))`, NaN if the norm is not finite (one dtype
    for all, see `configs`). `clipvalue`: element-wise to [-c, c], NaN staying NaN."""
    if config.keras_clip is None:
        return grads
    name, c = config.keras_clip
    dtypes = [v.dtype for v in config.variables]

    def squares(g: Grad, dtype: str) -> float:
        return float(rounded(np.sum(rounded(g.dense * g.dense, dtype)), dtype))

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if name == "clipvalue":
            return [
                None if g is None else g.map(lambda x: np.clip(x, -c, c), d)
                for g, d in zip(grads, dtypes)
            ]
        if name == "clipnorm":
            result = []
            for g, d in zip(grads, dtypes):
                if g is None:
                    result.append(None)
                    continue
                l2sum = squares(g, d)
                norm = float(rounded(np.sqrt(l2sum), d)) if l2sum > 0 else l2sum
                bound = float(rounded(c, d))
                divisor = np.maximum(norm, bound)  # NaN if the norm is
                mask = g.rows.reshape((-1,) + (1,) * (g.dense.ndim - 1))
                clipped = rounded(rounded(g.dense * bound, d) / divisor, d)
                result.append(Grad(np.where(mask, clipped, g.dense), g.rows))
            return result
        present = [(g, d) for g, d in zip(grads, dtypes) if g is not None]
        d = present[0][1]
        norm = float(rounded(np.sqrt(rounded(sum(squares(g, d) for g, d in present), d)), d))
        norm = np.float64(norm)  # 1 / 0 = inf
        factor = float(c * np.minimum(1.0 / norm, 1.0 / c) + (norm - norm))
        # `v * scale` makes an IndexedSlices gradient dense: a NaN scale reaches every row.
        return [
            None if g is None else Grad(g.dense, np.ones_like(g.rows)).scaled(factor, d)
            for g, d in zip(grads, dtypes)
        ]


def _all_finite(grads: list[Grad | None]) -> bool:
    return all(np.all(np.isfinite(g.dense)) for g in grads if g is not None)


def reference(config: Config) -> Outcome:
    """What the step must do, written plainly."""
    try:
        return _reference(config)
    except Refused as refusal:
        return Outcome(
            weights=[rounded(v.initial, v.dtype) for v in config.variables],
            global_step=0,
            losses=[],
            refused=str(refusal),
        )


def _reference(config: Config) -> Outcome:
    if config.summaries and config.jit_compile:
        raise Refused("`jit_compile=True` and a default tf.summary writer")
    # What a transform refuses does not depend on the values: find it before any step.
    transform(
        config,
        [
            None if v.kind == "unused" else Grad(np.zeros(1), np.ones(1, bool))
            for v in config.variables
        ],
    )

    weights = [rounded(v.initial, v.dtype) for v in config.variables]
    scales = [float(np.max(np.abs(w))) for w in weights]  # a complex weight by its modulus
    lr = config.learning_rate
    step, skipped, consecutive = 0, 0, 0
    sums: list[Any] = [None] * len(weights)
    momentums = [np.zeros_like(w) for w in weights]
    window_losses: list[float] = []
    added = 0
    losses: list[np.ndarray | None] = []
    loss_tolerances = []
    summaries: dict[str, list[tuple[int, float]]] = {
        "train/loss": [],
        "train/global_gradient_norm": [],
    }

    def update(loss: float, grads: list[Grad | None], transformed: list[Grad | None]) -> None:
        nonlocal step
        summaries["train/loss"].append((step, loss))
        summaries["train/global_gradient_norm"].append((step, _norm(grads)))
        transformed = keras_clip(config, transformed)
        for i, (var, g) in enumerate(zip(config.variables, transformed)):
            if g is not None:
                with np.errstate(over="ignore", invalid="ignore"):
                    change = lr * g.dense
                    if config.family == "tf_keras":
                        # tf_keras's SGD keeps a momentum buffer even at momentum 0
                        # (m <- 0 * m - lr * g, w <- w + m): an inf it applied once turns NaN
                        # (0 * inf) at the variable's next update, in every row.
                        momentums[i] = rounded(0.0 * momentums[i] - change, var.dtype)
                        change = -momentums[i]
                    weights[i] = rounded(weights[i] - change, var.dtype)
                    finite = change[np.isfinite(change)]
                    scales[i] = max(scales[i], float(np.max(np.abs(finite), initial=0.0)))
                finite = weights[i][np.isfinite(weights[i])]
                scales[i] = max(scales[i], float(np.max(np.abs(finite), initial=0.0)))
        step += 1

    batches = list(config.batches)
    calls = [
        batches[i : i + config.steps_per_call]
        for i in range(0, len(batches), config.steps_per_call)
    ]
    for call in calls:
        raised = False
        call_losses, tolerance = [], 0.0
        for batch in call:
            if raised:
                break  # the error ends the call
            loss, loss_tolerance, grads = forward(config, weights, batch)
            if config.steps_per_call > 1:
                # The call returns its steps' losses as a float32 vector.
                call_losses.append(float(rounded(loss, "float32")))
                loss_tolerance += TOLERANCE["float32"] * abs(loss) if np.isfinite(loss) else 0.0
            else:
                call_losses.append(loss)
            tolerance = max(tolerance, loss_tolerance)
            finite_loss = bool(np.isfinite(loss))
            transformed = None
            if config.check == "True":
                if not finite_loss:
                    raised = True
                    continue
            elif config.check == "skip":
                if config.accumulation_steps > 1:
                    # Each call's own gradients: a bad call adds nothing to the sums.
                    finite = finite_loss and _all_finite(grads)
                else:
                    transformed = transform(config, grads)
                    finite = finite_loss and _all_finite(transformed)
                if not finite:
                    if config.max_consecutive is not None and consecutive >= config.max_consecutive:
                        raised = True
                    else:
                        skipped += 1
                        consecutive += 1
                    continue
                consecutive = 0
            if config.accumulation_steps == 1:
                update(loss, grads, transformed or transform(config, grads))
                continue
            for i, g in enumerate(grads):
                if g is not None:
                    sums[i] = g.dense if sums[i] is None else sums[i] + g.dense
            added += 1
            window_losses.append(loss)
            if added == config.accumulation_steps:
                means = [
                    None
                    if s is None
                    else Grad(rounded(s / added, v.dtype), np.ones(s.shape[0], bool))
                    for s, v in zip(sums, config.variables)
                ]
                # The summaries see the update of one step on the batch twice as large: the
                # mean gradient, and the mean loss (the weights did not change in between).
                update(float(np.mean(window_losses)), means, transform(config, means))
                sums, added, window_losses = [None] * len(weights), 0, []
        losses.append(None if raised else np.array(call_losses))
        loss_tolerances.append(tolerance)
    return Outcome(
        weights=weights,
        global_step=step,
        losses=losses,
        skipped=(skipped, consecutive) if config.check == "skip" else None,
        summaries=summaries if config.summaries else None,
        scales=[max(s, 1.0) for s in scales],
        loss_tolerances=loss_tolerances,
    )


# --- trainop's step ---------------------------------------------------------------------------


def _loss(config: Config, variables: list[Any], inputs: list[tuple]) -> tf.Tensor:
    """The model's loss, in TensorFlow: `inputs` per variable, float64 (ids int32)."""
    terms = []
    for var, v, x in zip(config.variables, variables, inputs):
        dtype = tf.as_dtype(var.dtype)
        if var.kind == "dense" and dtype.is_complex:
            a, b = (tf.cast(t, dtype) for t in x[:2])
            c = tf.cast(x[2], dtype.real_dtype)
            residual = a * v - b
            linear = tf.where(tf.math.is_finite(c), tf.cast(c, dtype) * v, tf.zeros_like(v))
            term = 0.5 * tf.reduce_sum(
                tf.math.real(residual * tf.math.conj(residual))
            ) + tf.reduce_sum(tf.math.real(linear))
        elif var.kind == "dense":
            a, b, c = (tf.cast(t, dtype) for t in x)
            residual = a * v - b
            linear = tf.where(tf.math.is_finite(c), c * v, tf.zeros_like(c))
            term = 0.5 * tf.reduce_sum(residual * residual) + tf.reduce_sum(linear)
        elif var.kind == "sparse":
            residual = tf.gather(v, x[0]) - tf.cast(x[1], dtype)
            term = 0.5 * tf.reduce_sum(residual * residual)
        else:
            continue
        terms.append(tf.cast(term, config.loss_dtype))
    return tf.add_n(terms)


def _arrays(config: Config, batches: list[tuple]) -> list[np.ndarray]:
    """The batches' inputs as the flat list of arrays the train op is called with, each
    stacked along a new first axis when there are several batches (steps_per_call)."""
    flat = []
    for i, var in enumerate(config.variables):
        if var.kind == "unused":
            continue
        for j in range(len(batches[0][i])):
            dtype = np.int32 if var.kind == "sparse" and j == 0 else np.float64
            if var.dtype in COMPLEX_DTYPES and j < 2:
                dtype = np.complex128
            values = [np.array(batch[i][j], dtype) for batch in batches]
            flat.append(values[0] if len(values) == 1 else np.stack(values))
    return flat


def _unflatten(config: Config, flat: list[Any]) -> list[tuple]:
    flat = list(flat)
    inputs = []
    for var in config.variables:
        n = {"dense": 3, "sparse": 2, "unused": 0}[var.kind]
        inputs.append(tuple(flat[:n]))
        flat = flat[n:]
    return inputs


def _create_kwargs(config: Config, variables: list[Any], guard: Any) -> dict[str, Any]:
    transforms = [t.build() for t in config.transforms]
    transform_grads_fn = None
    if len(transforms) == 1:
        transform_grads_fn = transforms[0]
    elif transforms:
        transform_grads_fn = trainop.chain(*transforms)
    kwargs = dict(
        variables_to_train=variables,
        transform_grads_fn=transform_grads_fn,
        check_numerics={"True": True, "False": False, "skip": guard}[config.check],
        accumulation_steps=config.accumulation_steps,
    )
    if config.mode == "eager":
        kwargs.update(jit_compile=config.jit_compile, steps_per_call=config.steps_per_call)
    return kwargs


def _initial(var: Var) -> tf.Tensor:
    wide = tf.complex128 if var.dtype in COMPLEX_DTYPES else tf.float64
    return tf.cast(tf.constant(var.initial, wide), var.dtype)


def _global_step_kwargs(config: Config) -> dict[str, Any]:
    """`global_step=` a fresh `tf.Variable(0, dtype=...)`, or nothing (trainop's default)."""
    if config.global_step == "default":
        return {}
    return dict(global_step=tf.Variable(0, dtype=config.global_step, name="global_step"))


def _optimizer(config: Config) -> Any:
    return make_sgd(
        config.family, config.learning_rate, config.keras_clip, config.loss_scale_factor
    )


def _weights(values: Any) -> np.ndarray:
    values = np.asarray(values)
    return values.astype(np.complex128 if np.iscomplexobj(values) else np.float64)


def run_trainop(config: Config, logdir: str | None) -> Outcome:
    """Builds a fresh train op for `config` and runs it on the batches."""
    if config.mode == "graph":
        return _run_graph(config, logdir)
    return _run_eager(config, logdir)


def _run_eager(config: Config, logdir: str | None) -> Outcome:
    graph = tf.compat.v1.get_default_graph()
    graph.clear_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP)
    variables = [tf.Variable(_initial(v), name=v.name) for v in config.variables]
    guard = trainop.SkipNonFiniteSteps(config.max_consecutive) if config.check == "skip" else None
    writer = tf.summary.create_file_writer(logdir) if logdir else None
    losses: list[np.ndarray | None] = []
    refused = None
    step_kwargs: dict[str, Any] = {}
    with writer.as_default() if writer else contextlib.nullcontext():
        try:
            step_kwargs = _global_step_kwargs(config)
            train_op = trainop.create_train_op(
                lambda *flat: _loss(config, variables, _unflatten(config, flat)),
                _optimizer(config),
                **step_kwargs,
                **_create_kwargs(config, variables, guard),
            )
            spc = config.steps_per_call
            for i in range(0, len(config.batches), spc):
                arrays = _arrays(config, list(config.batches[i : i + spc]))
                try:
                    losses.append(np.atleast_1d(np.asarray(train_op(*arrays), np.float64)))
                except tf.errors.InvalidArgumentError:
                    losses.append(None)
        except (ValueError, TypeError) as error:
            refused = _last_line(error)
    if writer:
        writer.close()
    global_step = step_kwargs.get("global_step")
    if global_step is None:
        global_step = tf.compat.v1.train.get_global_step()
    return Outcome(
        weights=[_weights(v.numpy()) for v in variables],
        global_step=0 if global_step is None else int(global_step.numpy()),
        losses=losses,
        skipped=(
            (int(guard.skipped_steps.numpy()), int(guard.consecutive_skipped_steps.numpy()))
            if guard
            else None
        ),
        summaries=_read(logdir),
        refused=refused,
    )


def _run_graph(config: Config, logdir: str | None) -> Outcome:
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        variables = [tf.Variable(_initial(v), name=v.name) for v in config.variables]
        guard = (
            trainop.SkipNonFiniteSteps(config.max_consecutive) if config.check == "skip" else None
        )
        step_kwargs = _global_step_kwargs(config)
        global_step = step_kwargs.get("global_step")
        if global_step is None:
            global_step = tf.compat.v1.train.get_or_create_global_step()
        placeholders = [
            tf.compat.v1.placeholder(a.dtype, a.shape) for a in _arrays(config, [config.batches[0]])
        ]
        writer = tf.summary.create_file_writer(logdir) if logdir else None
        refused = None
        try:
            with writer.as_default() if writer else contextlib.nullcontext():
                train_op = trainop.create_train_op(
                    _loss(config, variables, _unflatten(config, placeholders)),
                    _optimizer(config),
                    **step_kwargs,
                    **_create_kwargs(config, variables, guard),
                )
        except (ValueError, TypeError) as error:
            refused = _last_line(error)
        session.run(tf.compat.v1.global_variables_initializer())
        if writer:
            session.run(writer.init())
        losses: list[np.ndarray | None] = []
        for batch in config.batches if refused is None else []:
            feed = dict(zip(placeholders, _arrays(config, [batch])))
            try:
                losses.append(np.atleast_1d(np.asarray(session.run(train_op, feed), np.float64)))
            except tf.errors.InvalidArgumentError:
                losses.append(None)
        if writer:
            session.run(writer.flush())
        counters = [guard.skipped_steps, guard.consecutive_skipped_steps] if guard else []
        weights, step, counts = session.run([variables, global_step, counters])
    return Outcome(
        weights=[_weights(w) for w in weights],
        global_step=int(step),
        losses=losses,
        skipped=tuple(int(c) for c in counts) if guard else None,
        summaries=_read(logdir),
        refused=refused,
    )


def _last_line(error: Exception) -> str:
    """An error's own message, without the traceback TensorFlow puts before it when traced."""
    return [line for line in str(error).splitlines() if line.strip()][-1].strip()


def _read(logdir: str | None) -> dict[str, list[tuple[int, float]]] | None:
    if logdir is None:
        return None
    series = read_summaries(logdir)
    return {
        tag: [(step, float(value)) for step, value in series.get(tag, [])]
        for tag in ("train/loss", "train/global_gradient_norm")
    }


# --- The comparison ---------------------------------------------------------------------------


def _close(got: Any, want: Any, tolerance: float) -> bool:
    """Whether `got` is within `tolerance` of `want`, with NaN and inf in the same places
    (complex: not finite, in either part, in the same places: which part turns inf or NaN is
    the complex arithmetic's own)."""
    if np.iscomplexobj(got) or np.iscomplexobj(want):
        got, want = np.asarray(got, np.complex128), np.asarray(want, np.complex128)
        if got.shape != want.shape:
            return False
        if not np.array_equal(np.isfinite(got), np.isfinite(want)):
            return False
        finite = np.isfinite(got)
        return bool(np.all(np.abs(got[finite] - want[finite]) <= tolerance))
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return False
    if not np.array_equal(np.isnan(got), np.isnan(want)):
        return False
    infinite = np.isinf(got) | np.isinf(want)
    if not np.array_equal(got[infinite], want[infinite]):
        return False
    finite = np.isfinite(got) & np.isfinite(want)
    return bool(np.all(np.abs(got[finite] - want[finite]) <= tolerance))


def compare(config: Config, got: Outcome, want: Outcome) -> list[str]:
    """What differs between trainop's outcome and the reference's, described."""
    if want.refused or got.refused:
        if not (want.refused and got.refused and want.refused in got.refused):
            return [f"refusal: expected {want.refused!r}, got {got.refused!r}"]
        changed = [
            v.name
            for v, g, w in zip(config.variables, got.weights, want.weights)
            if not np.array_equal(g, w)
        ]
        if changed or got.global_step != 0:
            return [f"refused, yet changed: {changed}, global step {got.global_step}"]
        return []
    problems = []
    # A clip of the global norm scales every gradient by a factor as precise as the least
    # precise of them.
    coupled = any(t.kind == "clip_by_global_norm" for t in config.transforms)
    least_precise = max(TOLERANCE[v.dtype] for v in config.variables if v.kind != "unused")
    for var, g, w, scale in zip(config.variables, got.weights, want.weights, want.scales):
        tolerance = max(TOLERANCE[var.dtype], least_precise if coupled else 0.0) * scale
        if not _close(g, w, tolerance):
            problems.append(
                f"weights of {var.name} ({var.dtype}): expected {w.tolist()}, got {g.tolist()} "
                f"(tolerance {tolerance:.3g})"
            )
    if got.global_step != want.global_step:
        problems.append(f"global step: expected {want.global_step}, got {got.global_step}")
    if got.skipped != want.skipped:
        problems.append(
            f"guard's (skipped_steps, consecutive_skipped_steps): expected {want.skipped}, "
            f"got {got.skipped}"
        )
    # Which of inf or NaN a complex product with an inf part makes is the arithmetic's own
    # (NumPy's plain formula, Eigen's C99 recovery): with a complex variable, the losses and
    # norms are compared as complex numbers, not finite in the same places (see `_close`).
    has_complex = any(v.dtype in COMPLEX_DTYPES for v in config.variables)

    def loose(x: Any) -> Any:
        return np.asarray(x, np.complex128) if has_complex else x

    for i, (g, w, tolerance) in enumerate(zip(got.losses, want.losses, want.loss_tolerances)):
        if (g is None) != (w is None) or (
            w is not None and not _close(loose(g), loose(w), tolerance)
        ):
            describe = lambda x: "an error" if x is None else x.tolist()  # noqa: E731
            problems.append(f"call {i}: expected {describe(w)}, got {describe(g)}")
    if want.summaries is not None:
        dtypes = [v.dtype for v in config.variables if v.kind != "unused"]
        # Written as float32.
        norm_tolerance = max(TOLERANCE[d] for d in [*dtypes, "float32"])
        for tag, expected in want.summaries.items():
            written = got.summaries[tag]
            steps_match = [s for s, _ in written] == [s for s, _ in expected]
            values_match = steps_match and all(
                _close(
                    loose(g), loose(w), norm_tolerance * max(1.0, abs(w)) if np.isfinite(w) else 0.0
                )
                for (_, g), (_, w) in zip(written, expected)
            )
            if not values_match:
                problems.append(f"summary {tag}: expected {expected}, got {written}")
    return problems


def check_against_reference(config: Config) -> None:
    note(repr(config))
    want = reference(config)
    with tempfile.TemporaryDirectory() if config.summaries else contextlib.nullcontext() as logdir:
        got = run_trainop(config, logdir)
    problems = compare(config, got, want)
    assert not problems, "trainop differs from the reference:\n" + "\n".join(problems)


@settings(max_examples=_max_examples(100))
@given(configs())
def test_step_matches_the_reference(config: Config) -> None:
    check_against_reference(config)


@settings(max_examples=_max_examples(25))
@given(configs(summaries=True))
def test_summaries_match_the_reference(config: Config) -> None:
    check_against_reference(config)


# --- Several replicas -------------------------------------------------------------------------

MIRRORED_SPELLINGS = ("keras_loss", "keras_ops_mean", "reduce_mean", "compute_average_loss")
# (global batch, examples): shares 2 and 2; 2 and 1, then 1 and 0 for the last batch; 3 and 2.
MIRRORED_BATCHES = ((4, 8), (3, 7), (5, 8))


def _mirrored_cases() -> list[dict[str, Any]]:
    cases = []
    for i, spelling in enumerate(MIRRORED_SPELLINGS):
        for j, (batch, rows) in enumerate(MIRRORED_BATCHES):
            for clip in (None, 0.5):
                family = FAMILIES[(i + j + (clip is not None)) % len(FAMILIES)]
                transform = f"-clip{clip}" if clip else ""
                name = f"{spelling}-batch{batch}of{rows}-{family}{transform}"
                cases.append(
                    dict(
                        name=name,
                        spelling=spelling,
                        batch=batch,
                        rows=rows,
                        family=family,
                        clip=clip,
                    )
                )
    return cases


MIRRORED_CASES = _mirrored_cases()


@pytest.fixture(scope="module")
def mirrored_results() -> dict[str, Any]:
    """Runs every case in one child process; its results by case name, and its stderr's end
    (under "stderr")."""
    program = pathlib.Path(__file__).parent / "programs" / "reference_mirrored_child.py"
    result = subprocess.run(
        [sys.executable, str(program), json.dumps(MIRRORED_CASES)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {"stderr": result.stderr[-3000:], **{line["name"]: line for line in lines}}


@pytest.mark.parametrize("case", MIRRORED_CASES, ids=lambda case: case["name"])
def test_mirrored_matches_one_device(case: dict[str, Any], mirrored_results: dict) -> None:
    """Two replicas, each given its share of the global batch (even, uneven or none), make
    the update of one device on the whole batch, whatever the loss spelling: weights, the loss
    each call returns and the global step. One device is checked against NumPy first."""
    assert case["name"] in mirrored_results, (
        f"the child program stopped before this case:\n{mirrored_results['stderr']}"
    )
    result = mirrored_results[case["name"]]
    assert "error" not in result, result["error"]
    numpy_run, one, two = result["numpy"], result["one"], result["two"]
    # float32 arithmetic on values near 1.
    tolerance = 1e-5
    np.testing.assert_allclose(one["weights"], numpy_run["weights"], rtol=0, atol=tolerance)
    np.testing.assert_allclose(one["losses"], numpy_run["losses"], rtol=tolerance, atol=tolerance)
    assert one["step"] == numpy_run["step"]
    np.testing.assert_allclose(
        two["weights"], one["weights"], rtol=0, atol=tolerance, err_msg="two replicas' weights"
    )
    np.testing.assert_allclose(
        two["losses"], one["losses"], rtol=tolerance, atol=tolerance, err_msg="losses returned"
    )
    assert two["step"] == one["step"], "global step"
