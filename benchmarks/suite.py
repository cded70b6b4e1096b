"""The benchmark suite: trainop's train ops against hand-written steps, the peers and XLA.

Run it with `python -m benchmarks` from the repository root (`--help` for the options). In one
process, with TensorFlow pinned to one thread, it reports:

1. Speed, on three models (tiny 784-64-64-10 at batch 8; the MLP 784-256-256-10 at batch 64;
   a small convolutional network on 32x32x3 images at batch 128), of each variant below,
   timed in short interleaved blocks (the order rotates every round), as the median time per
   step and its ratio to the hand-written step.
2. Build time: how long building (and, in eager mode, tracing) a train op takes for a model of
   1,000 variables.
3. Steady state: over 10,000 steps of the eager train op, the growth of the process's memory
   (RSS) and the number of traces.

The models are plain functions of their variables, so that every variant, eager or
`tf.compat.v1` graph, trains the very same computation from the same initial values.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import trainop  # noqa: E402
from benchmarks import options, peers  # noqa: E402
from benchmarks.bench_core import (  # noqa: E402
    machine_info,
    set_threads,
    summarize,
    write_json,
)

LEARNING_RATE = 1e-3
CLIP_NORM = 1.0
SUMMARY_EVERY_N_STEPS = 100
BASELINE = "baseline"


# --- Models ------------------------------------------------------------------------------------


@dataclass
class Model:
    """A model as a function of its parameters, with its batch and default timing."""

    name: str
    batch_size: int
    input_shape: tuple[int, ...]
    shapes: list[tuple[int, ...]]
    forward: Callable[[Sequence[Any], tf.Tensor], tf.Tensor]
    blocks: int
    steps_per_block: int

    def initial_values(self, seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [
            (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(np.float32)
            if len(shape) > 1
            else np.zeros(shape, np.float32)
            for shape in self.shapes
        ]

    def batch(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed + 1)
        x = rng.standard_normal((self.batch_size, *self.input_shape)).astype(np.float32)
        return x, rng.integers(0, 10, self.batch_size).astype(np.int32)

    def loss(self, params: Sequence[Any], x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        logits = self.forward(params, x)
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        )


def _mlp_forward(params: Sequence[Any], x: tf.Tensor) -> tf.Tensor:
    *hidden, w_out, b_out = params
    for w, b in zip(hidden[0::2], hidden[1::2]):
        x = tf.nn.relu(tf.matmul(x, w) + b)
    return tf.matmul(x, w_out) + b_out


def _mlp_shapes(sizes: Sequence[int]) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        shapes += [(fan_in, fan_out), (fan_out,)]
    return shapes


def _conv_forward(params: Sequence[Any], x: tf.Tensor) -> tf.Tensor:
    k1, b1, k2, b2, w, b = params
    x = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(x, k1, 1, "SAME") + b1), 2, 2, "VALID")
    x = tf.nn.max_pool2d(tf.nn.relu(tf.nn.conv2d(x, k2, 1, "SAME") + b2), 2, 2, "VALID")
    return tf.matmul(tf.reshape(x, (tf.shape(x)[0], -1)), w) + b


MODELS = {
    "tiny": Model("tiny", 8, (784,), _mlp_shapes([784, 64, 64, 10]), _mlp_forward, 150, 10),
    "mlp": Model("mlp", 64, (784,), _mlp_shapes([784, 256, 256, 10]), _mlp_forward, 150, 10),
    "conv": Model(
        "conv",
        128,
        (32, 32, 3),
        [(3, 3, 3, 16), (16,), (3, 3, 16, 32), (32,), (8 * 8 * 32, 10), (10,)],
        _conv_forward,
        40,
        3,
    ),
}


# --- Variants ----------------------------------------------------------------------------------


@dataclass
class Variant:
    """A training step under test: `step()` runs one step, `sync()` waits for all of them."""

    name: str
    description: str
    step: Callable[[], Any]
    sync: Callable[[], Any]


def _eager_variants(model: Model, values: list[np.ndarray], batch: tuple) -> list[Variant]:
    x, y = (tf.constant(t) for t in batch)
    variants = []

    def add(name: str, description: str, make_step: Callable[[list, Any], Callable]) -> None:
        params = [tf.Variable(v) for v in values]
        # Each variant counts its own global step, as a program would.
        tf.compat.v1.get_default_graph().clear_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP)
        step = make_step(params, lambda x, y: model.loss(params, x, y))
        variants.append(Variant(name, description, lambda: step(x, y), params[0].numpy))

    def hand_written(jit_compile: bool) -> Callable[[list, Any], Callable]:
        def make(params, loss_fn):
            optimizer = keras.optimizers.Adam(LEARNING_RATE)
            optimizer.build(params)

            @tf.function(jit_compile=jit_compile)
            def step(x, y):
                with tf.GradientTape() as tape:
                    loss = loss_fn(x, y)
                grads = tape.gradient(loss, params)
                optimizer.apply_gradients(zip(grads, params))
                return loss

            return step

        return make

    add(BASELINE, "hand-written tf.function: GradientTape + Keras Adam", hand_written(False))
    add("baseline_xla", "the same, jit_compile=True", hand_written(True))
    add(
        "trainop",
        "create_train_op(loss_fn, Keras Adam), defaults",
        lambda params, loss_fn: trainop.create_train_op(
            loss_fn, keras.optimizers.Adam(LEARNING_RATE)
        ),
    )

    writer = tf.summary.create_file_writer(tempfile.mkdtemp(prefix="trainop-bench-"))

    def all_features(params, loss_fn):
        train_op = trainop.create_train_op(
            loss_fn,
            keras.optimizers.Adam(LEARNING_RATE),
            transform_grads_fn=trainop.clip_by_global_norm_fn(CLIP_NORM),
            summarize_gradients=True,
            summarize_every_n_steps=SUMMARY_EVERY_N_STEPS,
            check_numerics="skip",
            variables_to_train=params,
        )
        traced = []

        def step(x, y):
            if not traced:
                # Traced with the writer as the default, it writes there from then on. (Entering
                # `writer.as_default()` at every call would flush the writer at every call.)
                traced.append(True)
                with writer.as_default():
                    return train_op(x, y)
            return train_op(x, y)

        return step

    add(
        "trainop_all",
        "+ clip by global norm, skip guard, gradient summaries every 100 steps",
        all_features,
    )
    add(
        "trainop_v1adam",
        "create_train_op(loss_fn, tf.compat.v1 Adam): same optimizer as the peers",
        lambda params, loss_fn: trainop.create_train_op(
            loss_fn, tf.compat.v1.train.AdamOptimizer(LEARNING_RATE), variables_to_train=params
        ),
    )
    if peers.find_wheel("tf_agents"):
        eager_utils = peers.import_tf_agents_utils("eager_utils")

        def tf_agents_step(params, loss_fn):
            optimizer = tf.compat.v1.train.AdamOptimizer(LEARNING_RATE)
            global_step = tf.compat.v1.train.get_or_create_global_step()

            # As TF-Agents' agents use it: inside their own tf.function.
            @tf.function
            def step(x, y):
                return eager_utils.create_train_step(
                    lambda: loss_fn(x, y),
                    optimizer,
                    global_step=global_step,
                    variables_to_train=params,
                )

            return step

        add("tf_agents", "TF-Agents create_train_step in tf.function, v1 Adam", tf_agents_step)
    return variants


def _graph_variant(
    name: str, description: str, create: Callable, model: Model, values: list, batch: tuple
) -> Variant:
    graph = tf.Graph()
    with graph.as_default():
        params = [tf.compat.v1.get_variable(f"p{i}", initializer=v) for i, v in enumerate(values)]
        loss = model.loss(params, tf.constant(batch[0]), tf.constant(batch[1]))
        train_op = create(loss, tf.compat.v1.train.AdamOptimizer(LEARNING_RATE))
        session = tf.compat.v1.Session(graph=graph)
        session.run(tf.compat.v1.global_variables_initializer())
    # session.run returns when the step is done: there is nothing left to wait for.
    return Variant(name, description, lambda: session.run(train_op), lambda: None)


def make_variants(model: Model, seed: int) -> tuple[list[Variant], list[str]]:
    """The variants for `model`, and a note for each peer left out."""
    values = model.initial_values(seed)
    batch = model.batch(seed)
    variants = _eager_variants(model, values, batch)
    variants.append(
        _graph_variant(
            "trainop_graph",
            "create_train_op in a tf.compat.v1 graph + Session, v1 Adam",
            trainop.create_train_op,
            model,
            values,
            batch,
        )
    )
    notes = []
    if peers.find_wheel("tf_slim"):
        training = peers.import_tf_slim("training.training")
        variants.append(
            _graph_variant(
                "tf_slim",
                "TF-Slim create_train_op, graph + Session, v1 Adam",
                training.create_train_op,
                model,
                values,
                batch,
            )
        )
    else:
        notes.append(f"tf_slim skipped: no wheel in {peers.wheel_dir()}")
    if not peers.find_wheel("tf_agents"):
        notes.append(f"tf_agents skipped: no wheel in {peers.wheel_dir()}")
    return variants, notes


# --- Timing ------------------------------------------------------------------------------------


def time_variants(
    variants: list[Variant], blocks: int, steps_per_block: int, warmup_steps: int
) -> dict[str, list[float]]:
    """Per variant, the time per step of each block, blocks interleaved round-robin."""

    def run_block(variant: Variant, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            variant.step()
        variant.sync()
        return time.perf_counter() - start

    for variant in variants:
        run_block(variant, warmup_steps)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for round_index in range(blocks):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            times[variant.name].append(run_block(variant, steps_per_block) / steps_per_block)
    return times


def speed(model: Model, blocks: int, steps_per_block: int, seed: int) -> dict[str, Any]:
    variants, notes = make_variants(model, seed)
    times = time_variants(variants, blocks, steps_per_block, warmup_steps=max(3, blocks // 10))
    results = {}
    for variant in variants:
        summary = summarize(times[variant.name])
        paired = statistics.median(c / b for c, b in zip(times[variant.name], times[BASELINE]))
        summary["time_ratio"] = (
            summary["median_s_per_step"] / summarize(times[BASELINE])["median_s_per_step"]
        )
        summary["paired_median_ratio"] = paired
        summary["description"] = variant.description
        results[variant.name] = summary
    return {
        "blocks": blocks,
        "steps_per_block": steps_per_block,
        "variants": results,
        "notes": notes,
    }


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def steady_state(steps: int, seed: int) -> dict[str, Any]:
    """Memory and traces of the eager train op over `steps` steps of the tiny model."""
    model = MODELS["tiny"]
    params = [tf.Variable(v) for v in model.initial_values(seed)]
    x, y = (tf.constant(t) for t in model.batch(seed))
    tf.compat.v1.get_default_graph().clear_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP)
    train_op = trainop.create_train_op(
        lambda x, y: model.loss(params, x, y),
        keras.optimizers.Adam(LEARNING_RATE),
        variables_to_train=params,
    )
    warmup = max(1, steps // 10)
    for _ in range(warmup):
        train_op(x, y)
    params[0].numpy()
    rss_start, traces_start = _rss_mb(), train_op.experimental_get_tracing_count()
    for _ in range(steps - warmup):
        train_op(x, y)
    params[0].numpy()
    return {
        "steps": steps,
        "rss_mb_after_warmup": rss_start,
        "rss_mb_at_end": _rss_mb(),
        "rss_growth_mb": _rss_mb() - rss_start,
        "traces_after_warmup": traces_start,
        "traces_at_end": train_op.experimental_get_tracing_count(),
        "global_step": int(tf.compat.v1.train.get_global_step()),
    }


def build_time(num_variables: int) -> dict[str, float]:
    """Seconds to build (and in eager mode trace and run once) a train op of many variables."""
    shapes = [(16,)] * num_variables

    def loss_of(params):
        return tf.add_n([tf.reduce_sum(p * p) for p in params])

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    results = {}

    def eager(make: Callable[[list], Callable[[], Any]]) -> float:
        params = [tf.Variable(tf.ones(s)) for s in shapes]
        tf.compat.v1.get_default_graph().clear_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP)
        return timed(lambda: make(params)())

    def hand_written(params):
        optimizer = tf.compat.v1.train.AdamOptimizer(LEARNING_RATE)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = loss_of(params)
            optimizer.apply_gradients(zip(tape.gradient(loss, params), params))
            return loss

        return step

    results["baseline (tf.function, first call)"] = eager(hand_written)
    results["trainop eager (build + first call)"] = eager(
        lambda params: trainop.create_train_op(
            lambda: loss_of(params), tf.compat.v1.train.AdamOptimizer(LEARNING_RATE)
        )
    )
    if peers.find_wheel("tf_agents"):
        eager_utils = peers.import_tf_agents_utils("eager_utils")

        def tf_agents(params):
            optimizer = tf.compat.v1.train.AdamOptimizer(LEARNING_RATE)
            global_step = tf.compat.v1.train.get_or_create_global_step()
            return tf.function(
                lambda: eager_utils.create_train_step(
                    lambda: loss_of(params),
                    optimizer,
                    global_step=global_step,
                    variables_to_train=params,
                )
            )

        results["tf_agents create_train_step (tf.function, first call)"] = eager(tf_agents)

    def graph(create: Callable) -> float:
        with tf.Graph().as_default():
            params = [tf.compat.v1.get_variable(f"v{i}", s) for i, s in enumerate(shapes)]
            loss = loss_of(params)
            return timed(lambda: create(loss, tf.compat.v1.train.AdamOptimizer(LEARNING_RATE)))

    results["trainop graph (build)"] = graph(trainop.create_train_op)
    if peers.find_wheel("tf_slim"):
        results["tf_slim graph (build)"] = graph(
            peers.import_tf_slim("training.training").create_train_op
        )
    return results


# --- Report ------------------------------------------------------------------------------------


def format_report(results: dict[str, Any]) -> str:
    lines = []
    for model_name, model_results in results["speed"].items():
        model = MODELS[model_name]
        lines += [
            f"### {model_name}: batch {model.batch_size}, "
            f"{model_results['blocks']} blocks x {model_results['steps_per_block']} steps",
            "",
            "| variant | ms/step | steps/s | IQR % | time ratio | paired ratio | what |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for name, r in model_results["variants"].items():
            lines.append(
                f"| {name} | {1e3 * r['median_s_per_step']:.3f} | {r['steps_per_s']:.0f} "
                f"| {r['iqr_pct_of_median']:.0f} | {r['time_ratio']:.3f} "
                f"| {r['paired_median_ratio']:.3f} | {r['description']} |"
            )
        lines += [f"- {note}" for note in model_results["notes"]] + [""]
    build = results["build_time"]
    lines += [
        f"### Build time, {results['config']['build_variables']} variables",
        "",
        "| train op | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in build.items()] + [""]
    steady = results["steady_state"]
    lines += [
        f"### Steady state, {steady['steps']} steps of the eager train op (tiny model)",
        "",
        f"RSS {steady['rss_mb_after_warmup']:.1f} MB after warm-up, "
        f"{steady['rss_mb_at_end']:.1f} MB at the end "
        f"(growth {steady['rss_growth_mb']:+.1f} MB); traces {steady['traces_after_warmup']} "
        f"after warm-up, {steady['traces_at_end']} at the end; "
        f"global step {steady['global_step']}.",
    ]
    return "\n".join(lines)


def run(
    models: Sequence[str],
    blocks_scale: float,
    steady_steps: int,
    build_variables: int,
    threads: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the whole suite and returns its results (see the module docstring)."""
    set_threads(threads)
    keras.utils.set_random_seed(seed)
    speeds = {}
    for name in models:
        model = MODELS[name]
        blocks = max(2, round(model.blocks * blocks_scale))
        steps = max(2, round(model.steps_per_block * min(1.0, blocks_scale * 10)))
        speeds[name] = speed(model, blocks, steps, seed)
    return {
        "config": {
            "models": list(models),
            "blocks_scale": blocks_scale,
            "threads": threads,
            "build_variables": build_variables,
            "learning_rate": LEARNING_RATE,
        },
        "speed": speeds,
        "build_time": build_time(build_variables),
        "steady_state": steady_state(steady_steps, seed),
    }


def main(argv: Sequence[str] | None = None, args: argparse.Namespace | None = None) -> None:
    """Runs the suite and prints its report: on the command line `argv`, or parsed `args`."""
    if args is None:
        args = options.parse(argv)
    results = run(
        args.models, args.blocks_scale, args.steady_steps, args.build_variables, args.threads
    )
    info = machine_info()
    print(
        f"trainop benchmarks: {info['cpu_model'] or info['processor']}, {info['cpu_count']} "
        f"CPUs, TensorFlow {info['tensorflow']} pinned to {args.threads} thread(s), "
        f"Keras {info['keras']}\n"
    )
    print(format_report(results))
    if args.json:
        write_json(args.json, results, info)
