"""The benchmark suite: trainop's train ops against hand-written steps, the peers and XLA.

Run it with `python -m benchmarks` from the repository root (`--help` for the options). In one
process, with TensorFlow pinned to one thread, it reports:

1. Speed, on three models (tiny 784-64-64-10 at batch 8; the MLP 784-256-256-10 at batch 64;
   a small convolutional network on 32x32x3 images at batch 128), of each variant below,
   timed in short interleaved blocks (the order rotates every round), as the median time per
   step and its ratio to the hand-written step.
2. `fit`: the step of Keras's `model.fit` on the MLP with trainop's step (`trainop.keras`)
   and without, with `steps_per_execution` 1 and 16 (`benchmarks.bench_fit`).
3. Build time: how long building (and, in eager mode, tracing) a train op takes for a model of
   1,000 variables.
4. Steady state: over 10,000 steps of the eager train op, the growth of the process's memory
   (RSS) and the number of traces.

The models are plain functions of their variables, so that every variant, eager or
`tf.compat.v1` graph, trains the very same computation from the same initial values.

Each table is printed as soon as its section is done, with a progress bar on stderr when it is
a terminal. Ctrl-C prints the rows measured so far of the section under way and exits with
status 130 (`--sections` and `--models` choose what runs).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import functools  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import trainop  # noqa: E402
from benchmarks import options, peers, progress  # noqa: E402
from benchmarks.bench_core import (  # noqa: E402
    machine_info,
    set_threads,
    summarize,
    write_json,
)
from benchmarks.command import EXIT_INTERRUPTED  # noqa: E402

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

    summaries_dir = tempfile.mkdtemp(prefix="trainop-bench-")
    writer = tf.summary.create_file_writer(summaries_dir)
    # Removed once the writer is gone (or at exit): the train ops write there while timed.
    weakref.finalize(writer, shutil.rmtree, summaries_dir, ignore_errors=True)

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
        notes.append(f"tf_slim skipped: {peers.missing_wheel('tf_slim')}")
    if not peers.find_wheel("tf_agents"):
        notes.append(f"tf_agents skipped: {peers.missing_wheel('tf_agents')}")
    return variants, notes


# --- Sections ----------------------------------------------------------------------------------
#
# Each section fills its record as it goes (speed: the rounds of blocks done, summarized when
# the timing ends or is stopped; build time: one train op at a time; steady state: every 100
# steps), so that a run stopped by Ctrl-C can still print the rows measured so far.


def _run_block(variant: Variant, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        variant.step()
    variant.sync()
    return time.perf_counter() - start


def speed_summaries(
    variants: list[Variant], times: dict[str, list[float]], rounds: int
) -> dict[str, Any]:
    """Per variant, the summary of its first `rounds` block times and its ratios to the baseline.

    Returns:
      Variant name to summary (see `bench_core.summarize`) with `time_ratio`,
      `paired_median_ratio` and `description`; empty if `rounds` is 0.
    """
    if rounds == 0:
        return {}
    baseline = times[BASELINE][:rounds]
    baseline_median = statistics.median(baseline)
    summaries = {}
    for variant in variants:
        per_step = times[variant.name][:rounds]
        summary = summarize(per_step)
        summary["time_ratio"] = summary["median_s_per_step"] / baseline_median
        summary["paired_median_ratio"] = statistics.median(
            c / b for c, b in zip(per_step, baseline)
        )
        summary["description"] = variant.description
        summaries[variant.name] = summary
    return summaries


def speed(
    model: Model,
    blocks: int,
    steps_per_block: int,
    seed: int,
    record: dict[str, Any],
    bar: Any,
    variants_of: Callable[[Model, int], tuple[list[Variant], list[str]]] | None = None,
) -> None:
    """Times every variant of `model` in interleaved blocks, the order rotating every round.

    The variants are `variants_of(model, seed)` (default `make_variants`), with notes.
    `record["rounds_done"]` counts the rounds of blocks as they finish; `record["variants"]`
    gets the summaries of the rounds done when the timing ends, or is interrupted.
    """
    bar.set_postfix_str("building the variants")
    variants, record["notes"] = (variants_of or make_variants)(model, seed)
    bar.reset(total=len(variants) + blocks)
    for variant in variants:
        bar.set_postfix_str(f"warm-up: {variant.name}")
        _run_block(variant, max(3, blocks // 10))
        bar.update()
    bar.set_postfix_str("timed rounds")
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    try:
        for round_index in range(blocks):
            shift = round_index % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                times[variant.name].append(_run_block(variant, steps_per_block) / steps_per_block)
            record["rounds_done"] = round_index + 1
            bar.update()
    finally:
        # Summarized once, and not between the rounds: less garbage for the collector to
        # collect during a timed block.
        record["variants"] = speed_summaries(variants, times, record["rounds_done"])


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


STEADY_STATE_STEPS_PER_READING = 100


def steady_state(steps: int, seed: int, record: dict[str, Any], bar: Any) -> None:
    """Memory and traces of the eager train op over `steps` steps of the tiny model.

    Every `STEADY_STATE_STEPS_PER_READING` steps, `record` gets the steps done, the global step,
    the RSS and the trace count at that point (the `_at_end` keys); after the first
    `record["warmup_steps"]` steps, also the RSS and trace count then (`_after_warmup`).
    """
    model = MODELS["tiny"]
    params = [tf.Variable(v) for v in model.initial_values(seed)]
    x, y = (tf.constant(t) for t in model.batch(seed))
    tf.compat.v1.get_default_graph().clear_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP)
    train_op = trainop.create_train_op(
        lambda x, y: model.loss(params, x, y),
        keras.optimizers.Adam(LEARNING_RATE),
        variables_to_train=params,
    )
    global_step = tf.compat.v1.train.get_global_step()
    bar.reset(total=steps)

    def train_until(step: int) -> None:
        while record["steps_done"] < step:
            n = min(STEADY_STATE_STEPS_PER_READING, step - record["steps_done"])
            for _ in range(n):
                train_op(x, y)
            record.update(
                steps_done=record["steps_done"] + n,
                global_step=int(global_step),  # reading it waits for the steps
                rss_mb_at_end=_rss_mb(),
                traces_at_end=train_op.experimental_get_tracing_count(),
            )
            bar.update(n)

    bar.set_postfix_str("warm-up")
    train_until(record["warmup_steps"])
    record["rss_mb_after_warmup"] = record["rss_mb_at_end"]
    record["traces_after_warmup"] = record["traces_at_end"]
    bar.set_postfix_str("")
    train_until(steps)
    record["rss_growth_mb"] = record["rss_mb_at_end"] - record["rss_mb_after_warmup"]


def build_time(num_variables: int, record: dict[str, Any], bar: Any) -> None:
    """Seconds to build (and in eager mode trace and run once) a train op of many variables.

    `record` gets one entry per train op, its name to its seconds, as each is built.
    """
    shapes = [(16,)] * num_variables

    def loss_of(params):
        return tf.add_n([tf.reduce_sum(p * p) for p in params])

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def eager(make: Callable[[list], Callable[[], Any]]) -> Callable[[], float]:
        def build() -> float:
            params = [tf.Variable(tf.ones(s)) for s in shapes]
            tf.compat.v1.get_default_graph().clear_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP)
            return timed(lambda: make(params)())

        return build

    def hand_written(params):
        optimizer = tf.compat.v1.train.AdamOptimizer(LEARNING_RATE)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = loss_of(params)
            optimizer.apply_gradients(zip(tape.gradient(loss, params), params))
            return loss

        return step

    def graph(create: Callable) -> Callable[[], float]:
        def build() -> float:
            with tf.Graph().as_default():
                params = [tf.compat.v1.get_variable(f"v{i}", s) for i, s in enumerate(shapes)]
                loss = loss_of(params)
                return timed(lambda: create(loss, tf.compat.v1.train.AdamOptimizer(LEARNING_RATE)))

        return build

    builds = {
        "baseline (tf.function, first call)": eager(hand_written),
        "trainop eager (build + first call)": eager(
            lambda params: trainop.create_train_op(
                lambda: loss_of(params), tf.compat.v1.train.AdamOptimizer(LEARNING_RATE)
            )
        ),
    }
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

        builds["tf_agents create_train_step (tf.function, first call)"] = eager(tf_agents)
    builds["trainop graph (build)"] = graph(trainop.create_train_op)
    if peers.find_wheel("tf_slim"):
        builds["tf_slim graph (build)"] = graph(
            peers.import_tf_slim("training.training").create_train_op
        )
    bar.reset(total=len(builds))
    for name, build in builds.items():
        bar.set_postfix_str(name)
        record[name] = build()
        bar.update()


# --- Report ------------------------------------------------------------------------------------


def speed_table(
    model: Model, record: dict[str, Any], interrupted: bool, title: str | None = None
) -> str:
    """The speed section's `record` for `model` as markdown: one row per variant, under
    `title` (by default the model's name)."""
    heading = (
        f"### {title or model.name}: batch {model.batch_size}, "
        f"{record['blocks']} blocks x {record['steps_per_block']} steps"
    )
    if interrupted:
        heading += f" (interrupted: {record['rounds_done']} of them measured)"
    lines = [
        heading,
        "",
        "| variant | ms/step | steps/s | IQR % | time ratio | paired ratio | what |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in record["variants"].items():
        lines.append(
            f"| {name} | {1e3 * r['median_s_per_step']:.3f} | {r['steps_per_s']:.0f} "
            f"| {r['iqr_pct_of_median']:.0f} | {r['time_ratio']:.3f} "
            f"| {r['paired_median_ratio']:.3f} | {r['description']} |"
        )
    return "\n".join(lines + [f"- {note}" for note in record["notes"]])


def build_time_table(num_variables: int, record: dict[str, Any], interrupted: bool) -> str:
    """The build-time section's `record` as markdown: one row per train op built."""
    heading = f"### Build time, {num_variables} variables"
    if interrupted:
        heading += " (interrupted: the train ops built so far)"
    lines = [heading, "", "| train op | seconds |", "|---|---:|"]
    return "\n".join(lines + [f"| {name} | {seconds:.2f} |" for name, seconds in record.items()])


def steady_state_table(record: dict[str, Any], interrupted: bool) -> str:
    """The steady-state section's `record` as a heading and one sentence."""
    heading = f"### Steady state, {record['steps']} steps of the eager train op (tiny model)"
    done = record["steps_done"]
    if interrupted:
        heading += f" (interrupted after {done} steps)"
    if "traces_after_warmup" not in record:
        return f"{heading}\n\nInterrupted during the warm-up of {record['warmup_steps']} steps."
    now = f"after {done} steps" if interrupted else "at the end"
    growth = record["rss_mb_at_end"] - record["rss_mb_after_warmup"]
    return (
        f"{heading}\n\n"
        f"RSS {record['rss_mb_after_warmup']:.1f} MB after warm-up, "
        f"{record['rss_mb_at_end']:.1f} MB {now} (growth {growth:+.1f} MB); "
        f"traces {record['traces_after_warmup']} after warm-up, {record['traces_at_end']} {now}; "
        f"global step {record['global_step']}."
    )


# --- The suite ---------------------------------------------------------------------------------


@dataclass
class Section:
    """One table of the report.

    Attributes:
      title: what the progress bar and an interruption call it.
      key: where `record` goes in the results: `("speed", "tiny")`, `("build_time",)`...
      record: the section's results, filled in place by `measure(record, bar)` as it goes;
        what is known beforehand (the number of blocks, of steps) is there from the start.
      measure: measures, updating the progress bar `bar` (see `benchmarks.progress.bar`).
      table: `table(record, interrupted)`, the record as markdown, however far it got.
    """

    title: str
    key: tuple[str, ...]
    record: dict[str, Any]
    measure: Callable[[dict[str, Any], Any], None]
    table: Callable[[dict[str, Any], bool], str]


def plan(args: argparse.Namespace, seed: int = 0) -> list[Section]:
    """The sections that the options `args` (see `benchmarks.options`) ask for, in order."""
    sections = []
    if "speed" in args.sections:
        for name in args.models:
            model = MODELS[name]
            blocks = max(2, round(model.blocks * args.blocks_scale))
            steps = max(2, round(model.steps_per_block * min(1.0, args.blocks_scale * 10)))
            sections.append(
                Section(
                    f"speed, {name}",
                    ("speed", name),
                    {
                        "blocks": blocks,
                        "steps_per_block": steps,
                        "rounds_done": 0,
                        "variants": {},
                        "notes": [],
                    },
                    functools.partial(speed, model, blocks, steps, seed),
                    functools.partial(speed_table, model),
                )
            )
    if "fit" in args.sections:
        from benchmarks import bench_fit

        model = MODELS["mlp"]
        blocks = max(2, round(model.blocks * args.blocks_scale))
        steps = max(2, round(model.steps_per_block * min(1.0, args.blocks_scale * 10)))
        for per_call in (1, 16):
            title = f"fit, {model.name}, steps_per_execution={per_call}"
            if per_call > 1:
                title += f" (a step: one call of {per_call} batches)"
            sections.append(
                Section(
                    f"fit, steps_per_execution={per_call}",
                    ("fit", f"steps_per_execution_{per_call}"),
                    {
                        "blocks": blocks,
                        "steps_per_block": steps if per_call == 1 else 1,
                        "rounds_done": 0,
                        "variants": {},
                        "notes": [],
                    },
                    functools.partial(
                        speed,
                        model,
                        blocks,
                        steps if per_call == 1 else 1,
                        seed,
                        variants_of=functools.partial(
                            bench_fit.fit_variants, steps_per_execution=per_call
                        ),
                    ),
                    functools.partial(speed_table, model, title=title),
                )
            )
    if "build" in args.sections:
        sections.append(
            Section(
                "build time",
                ("build_time",),
                {},
                functools.partial(build_time, args.build_variables),
                functools.partial(build_time_table, args.build_variables),
            )
        )
    if "steady" in args.sections:
        steps = args.steady_steps
        sections.append(
            Section(
                "steady state",
                ("steady_state",),
                {"steps": steps, "warmup_steps": max(1, steps // 10), "steps_done": 0},
                functools.partial(steady_state, steps, seed),
                steady_state_table,
            )
        )
    return sections


def _store(results: dict[str, Any], section: Section) -> None:
    *path, last = section.key
    place = results
    for key in path:
        place = place.setdefault(key, {})
    place[last] = section.record


def run_sections(sections: Sequence[Section], results: dict[str, Any]) -> Section | None:
    """Measures each section in turn, printing its table as soon as it is done.

    Each section's record goes into `results` (at its `key`) when the section starts. Ctrl-C
    stops the run: the section under way prints the rows it has, marked as interrupted.

    Returns:
      The section that Ctrl-C interrupted, or None if all of them ran.
    """
    pending = list(sections)
    try:
        with progress.interrupts_recorded() as interrupted:
            while pending:
                section = pending[0]
                _store(results, section)
                index = len(sections) - len(pending) + 1
                with progress.bar(f"[{index}/{len(sections)}] {section.title}") as bar:
                    section.measure(section.record, progress.InterruptCheckedBar(bar, interrupted))
                # Done before printing: from here on, Ctrl-C interrupts the next section.
                pending.pop(0)
                print(section.table(section.record, False) + "\n", flush=True)
    except KeyboardInterrupt:
        if not pending:  # after the last table: everything was measured and printed
            return None
        section = pending[0]
        _store(results, section)
        print(section.table(section.record, True) + "\n", flush=True)
        return section
    return None


def main(argv: Sequence[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """Runs the suite and prints its report: on the command line `argv`, or parsed `args`.

    Each table is printed when its section is done. Ctrl-C (SIGINT) stops the run: the tables
    so far, the rows of the section under way, a line saying so, and `--json` still written.

    Returns:
      The exit status: 0, or 130 when interrupted.
    """
    if args is None:
        args = options.parse(argv)
    seed = 0
    set_threads(args.threads)
    keras.utils.set_random_seed(seed)
    info = machine_info()
    print(
        f"trainop benchmarks: {info['cpu_model'] or info['processor']}, {info['cpu_count']} "
        f"CPUs, TensorFlow {info['tensorflow']} pinned to {args.threads} thread(s), "
        f"Keras {info['keras']}\n",
        flush=True,
    )
    results: dict[str, Any] = {
        "config": {
            "models": args.models,
            "sections": args.sections,
            "blocks_scale": args.blocks_scale,
            "threads": args.threads,
            "build_variables": args.build_variables,
            "learning_rate": LEARNING_RATE,
        },
    }
    interrupted = run_sections(plan(args, seed), results)
    if interrupted:
        results["interrupted_during"] = interrupted.title
        print(
            f"Interrupted (Ctrl-C) during {interrupted.title}: the tables above are what was "
            "measured.",
            flush=True,
        )
    if args.json:
        write_json(args.json, results, info)
    return EXIT_INTERRUPTED if interrupted else 0
