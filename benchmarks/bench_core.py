"""Speed of trainop's eager train op against a hand-written `tf.function` training step.

Three step functions train three identical copies of a Keras 3 MLP (784-256-256-10, ReLU, batch
64, Adam, sparse categorical cross-entropy from logits) on the same fixed batches, in one
process:

* ``baseline``: the usual hand-written step, a `tf.function` around `tf.GradientTape`,
  `tape.gradient` and `optimizer.apply_gradients`.
* ``trainop``: `trainop.create_train_op(loss_fn, optimizer)` with its defaults (global step
  counted, numerics check on, the variables to train discovered from the loss).
* ``trainop_vars``: the same with ``variables_to_train=model.trainable_variables``, for
  information.

Each function is warmed up, then the functions run in short alternating blocks (the order
rotates every round) so that a slow patch of a noisy machine hits all of them alike. The figure
of merit is the time ratio median(candidate) / median(baseline) of the per-step block times.

Run it from the repository root::

    python -m benchmarks.bench_core [--blocks N] [--steps-per-block N] [--threads N] [--json PATH]
"""

from __future__ import annotations

import os

# Set before TensorFlow is imported, or its C++ start-up messages are already out.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import trainop  # noqa: E402

BATCH_SIZE = 64
INPUT_DIM = 784
HIDDEN_UNITS = (256, 256)
NUM_CLASSES = 10
NUM_BATCHES = 4
LEARNING_RATE = 1e-3
DEFAULT_BLOCKS = 150
DEFAULT_STEPS_PER_BLOCK = 10
DEFAULT_THREADS = 1
DEFAULT_WARMUP_STEPS = 50

BASELINE = "baseline"
CANDIDATES = ("trainop", "trainop_vars")
DESCRIPTIONS = {
    "baseline": "hand-written tf.function (GradientTape + apply_gradients)",
    "trainop": "create_train_op(loss_fn, Adam) defaults",
    "trainop_vars": "create_train_op(..., variables_to_train=model.trainable_variables)",
}


@dataclass
class Variant:
    """A step function under test and what it trains.

    Attributes:
      name: the name it is reported under.
      step: called as ``step(x, y)``; runs one training step and returns the loss tensor.
      model: the model copy it trains.
      optimizer: its own optimizer, whose `iterations` is read to sync after each block.
    """

    name: str
    step: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
    model: keras.Model
    optimizer: keras.optimizers.Optimizer


def set_threads(threads: int) -> None:
    """Pins TensorFlow's intra- and inter-op thread pools to `threads` threads each.

    TensorFlow fixes its thread pools when its context starts (the first op), so this must run
    before any op. Asking again for the same count later is harmless.

    Raises:
      RuntimeError: if TensorFlow has already started with another thread count.
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as error:
        raise RuntimeError(
            f"Cannot pin TensorFlow to {threads} thread(s): it has already started with "
            f"intra={tf.config.threading.get_intra_op_parallelism_threads()}, "
            f"inter={tf.config.threading.get_inter_op_parallelism_threads()}. "
            "Run the benchmark in a fresh process."
        ) from error


def make_batches(seed: int) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """Returns `NUM_BATCHES` fixed (inputs, labels) batches, already tensors.

    Converting once keeps input conversion out of the timed loop, for every variant alike.
    """
    batches = []
    for i in range(NUM_BATCHES):
        x = tf.random.stateless_normal((BATCH_SIZE, INPUT_DIM), seed=(seed, 2 * i))
        y = tf.random.stateless_uniform(
            (BATCH_SIZE,), seed=(seed, 2 * i + 1), maxval=NUM_CLASSES, dtype=tf.int32
        )
        batches.append((x, y))
    return batches


def make_model(hidden_units: Sequence[int] = HIDDEN_UNITS) -> keras.Model:
    """The 784-256-256-10 MLP (or other hidden layers), with ReLU hidden layers, logits out."""
    layers: list[Any] = [keras.Input((INPUT_DIM,))]
    layers += [keras.layers.Dense(units, activation="relu") for units in hidden_units]
    layers.append(keras.layers.Dense(NUM_CLASSES))
    return keras.Sequential(layers)


def copy_model(model: keras.Model) -> keras.Model:
    """A model of the same architecture and the same initial weights as `model`."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def make_loss_fn(model: keras.Model) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """The mean sparse categorical cross-entropy of `model`'s logits."""
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_fn(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        return loss_object(y, model(x, training=True))

    return loss_fn


def make_baseline_step(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, jit_compile: bool = False
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """The hand-written training step that the train op is compared with."""
    loss_fn = make_loss_fn(model)

    @tf.function(jit_compile=jit_compile or None)
    def step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(x, y)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def make_variants() -> list[Variant]:
    """The baseline and the two candidates, each with its own identical model and optimizer."""
    # The global step lives in a process-wide collection; a fresh one keeps repeated calls of
    # `run` (a smoke test after a full run) from sharing a counter.
    tf.compat.v1.get_default_graph().clear_collection(tf.compat.v1.GraphKeys.GLOBAL_STEP)

    base_model = make_model()
    variants = []
    for name in (BASELINE, *CANDIDATES):
        model = copy_model(base_model)
        optimizer = keras.optimizers.Adam(LEARNING_RATE)
        if name == BASELINE:
            step = make_baseline_step(model, optimizer)
        elif name == "trainop":
            step = trainop.create_train_op(make_loss_fn(model), optimizer)
        else:
            step = trainop.create_train_op(
                make_loss_fn(model), optimizer, variables_to_train=model.trainable_variables
            )
        variants.append(Variant(name, step, model, optimizer))
    return variants


def run_block(
    variant: Variant, batches: Sequence[tuple[tf.Tensor, tf.Tensor]], steps: int
) -> float:
    """Runs `steps` steps of `variant` and returns the seconds they took.

    The losses are kept as tensors (a `.numpy()` per step would time the host copy, not the
    step); one scalar read at the end waits for everything the block started.
    """
    start = time.perf_counter()
    loss = None
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = variant.step(x, y)
    variant.optimizer.iterations.numpy()
    elapsed = time.perf_counter() - start
    del loss
    return elapsed


def summarize(per_step: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and interquartile spread of per-step times (seconds)."""
    median = statistics.median(per_step)
    if len(per_step) > 1:
        q1, _, q3 = statistics.quantiles(per_step, n=4, method="inclusive")
    else:
        q1 = q3 = median
    return {
        "median_s_per_step": median,
        "steps_per_s": 1.0 / median,
        "q1_s_per_step": q1,
        "q3_s_per_step": q3,
        "iqr_pct_of_median": 100.0 * (q3 - q1) / median,
    }


def max_weight_difference(a: keras.Model, b: keras.Model) -> float:
    """The largest absolute difference between two models' weights."""
    return max(float(np.max(np.abs(wa - wb))) for wa, wb in zip(a.get_weights(), b.get_weights()))


def interleaved_results(
    times: dict[str, list[float]],
    variants: Sequence[Variant],
    reference: str,
    candidates: Sequence[str],
) -> dict[str, Any]:
    """Per variant its timing summary; per candidate its ratios to `reference` and the largest
    difference of its weights from the reference's."""
    models = {v.name: v.model for v in variants}
    return {
        "variants": {name: summarize(t) for name, t in times.items()},
        "ratios": compare(times, reference, candidates),
        "max_weight_diff": {
            name: max_weight_difference(models[reference], models[name]) for name in candidates
        },
    }


def time_interleaved(
    variants: Sequence[Variant],
    batches: Sequence[tuple[tf.Tensor, tf.Tensor]],
    blocks: int,
    steps_per_block: int,
    warmup_steps: int,
) -> dict[str, list[float]]:
    """Warms every variant up, then times them in alternating blocks.

    Returns:
      Per variant name, the seconds per step of each of its `blocks` blocks.
    """
    for variant in variants:
        # Warm-up also traces: the default candidate creates the Adam slots on its first call
        # and so traces twice; none of that belongs in the timings.
        run_block(variant, batches, warmup_steps)

    times: dict[str, list[float]] = {v.name: [] for v in variants}
    # A collection in the middle of a block would be charged to whichever variant runs then.
    gc.collect()
    gc.disable()
    try:
        for round_index in range(blocks):
            # Rotating the order gives every variant every position equally often, so none
            # always runs right after another one's cache traffic.
            shift = round_index % len(variants)
            for variant in [*variants[shift:], *variants[:shift]]:
                elapsed = run_block(variant, batches, steps_per_block)
                times[variant.name].append(elapsed / steps_per_block)
    finally:
        gc.enable()
    return times


def compare(
    times: dict[str, list[float]], reference: str, candidates: Sequence[str]
) -> dict[str, dict[str, float]]:
    """The time ratio of each candidate to `reference`: of the medians, and block by block."""
    reference_median = statistics.median(times[reference])
    ratios = {}
    for name in candidates:
        ratio = statistics.median(times[name]) / reference_median
        # The same ratio taken round by round (blocks that ran next to each other): less
        # sensitive to slow drifts of the machine's speed.
        paired = statistics.median(c / b for c, b in zip(times[name], times[reference]))
        ratios[name] = {
            "time_ratio": ratio,
            "overhead_pct": 100.0 * (ratio - 1.0),
            "paired_median_ratio": paired,
            # Includes the rare slow blocks (a summary written): the amortized cost.
            "mean_ratio": statistics.fmean(times[name]) / statistics.fmean(times[reference]),
        }
    return ratios


def prepare(
    blocks: int, steps_per_block: int, threads: int, warmup_steps: int, seed: int
) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """Checks a run's settings, pins the threads, seeds Keras; returns the batches.

    Raises:
      ValueError: if `blocks`, `steps_per_block` or `threads` is below 1.
      RuntimeError: if TensorFlow already runs with another thread count.
    """
    if min(blocks, steps_per_block, threads) < 1 or warmup_steps < 0:
        raise ValueError(
            "blocks, steps_per_block and threads must be at least 1 and warmup_steps at least "
            f"0. Received: {blocks=}, {steps_per_block=}, {threads=}, {warmup_steps=}"
        )
    set_threads(threads)
    keras.utils.set_random_seed(seed)
    return make_batches(seed)


def run(
    blocks: int = DEFAULT_BLOCKS,
    steps_per_block: int = DEFAULT_STEPS_PER_BLOCK,
    threads: int = DEFAULT_THREADS,
    *,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the benchmark and returns its results.

    Args:
      blocks: the rounds of timed blocks; each round runs one block of every variant.
      steps_per_block: the training steps in one block.
      threads: TensorFlow's intra- and inter-op thread counts.
      warmup_steps: untimed steps of each variant first (tracing, optimizer state, caches).
      seed: the seed of the weights and the data.

    Returns:
      A dict with ``config``; ``variants``, per name the summary of its per-step block times
      and the raw times; ``ratios``, per candidate the time ratio to the baseline; and
      ``max_weight_diff``, per candidate its largest weight difference from the baseline's
      model at the end (all saw the same batches, so this is rounding only).

    Raises:
      ValueError: if `blocks`, `steps_per_block` or `threads` is below 1.
      RuntimeError: if TensorFlow already runs with another thread count.
    """
    batches = prepare(blocks, steps_per_block, threads, warmup_steps, seed)
    variants = make_variants()
    times = time_interleaved(variants, batches, blocks, steps_per_block, warmup_steps)
    summaries = {name: {**summarize(t), "block_s_per_step": t} for name, t in times.items()}
    ratios = compare(times, BASELINE, CANDIDATES)

    by_name = {v.name: v for v in variants}
    return {
        "config": {
            "blocks": blocks,
            "steps_per_block": steps_per_block,
            "threads": threads,
            "warmup_steps": warmup_steps,
            "seed": seed,
            "batch_size": BATCH_SIZE,
            "layers": [INPUT_DIM, *HIDDEN_UNITS, NUM_CLASSES],
            "optimizer": f"keras.optimizers.Adam({LEARNING_RATE})",
        },
        "variants": summaries,
        "ratios": ratios,
        "max_weight_diff": {
            name: max_weight_difference(by_name[BASELINE].model, by_name[name].model)
            for name in CANDIDATES
        },
    }


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo, where there is one.

    `platform.processor()` is empty on many Linux machines, so it is not enough on its own.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def parse_blocks_threads_json(description: str, argv: Sequence[str] | None) -> Any:
    """The `--blocks`, `--threads` and `--json PATH` options of a benchmark's command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--blocks", type=int, default=DEFAULT_BLOCKS)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--json", metavar="PATH", help="also write the results to this file")
    args = parser.parse_args(argv)
    if min(args.blocks, args.threads) < 1:
        parser.error("--blocks and --threads must be at least 1")
    return args


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "uname": platform.uname()._asdict(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "trainop": getattr(trainop, "__version__", None),
    }


def write_json(path: str, results: dict[str, Any], info: dict[str, Any]) -> None:
    """Writes `results` and the machine's description `info` to `path`, as JSON."""
    with open(path, "w", encoding="utf-8") as file:
        json.dump({**results, "machine": info}, file, indent=2)
        file.write("\n")


def format_table(results: dict[str, Any]) -> str:
    """The results as a markdown table, one row per variant."""
    lines = [
        "| variant | ms/step (median) | steps/s | IQR ms/step | IQR % | time ratio | overhead |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, summary in results["variants"].items():
        if name == BASELINE:
            ratio_cells = "1.000 | -"
        else:
            ratio = results["ratios"][name]
            ratio_cells = f"{ratio['time_ratio']:.3f} | {ratio['overhead_pct']:+.1f} %"
        lines.append(
            f"| {name} | {1e3 * summary['median_s_per_step']:.3f} "
            f"| {summary['steps_per_s']:.1f} "
            f"| {1e3 * summary['q1_s_per_step']:.3f}-{1e3 * summary['q3_s_per_step']:.3f} "
            f"| {summary['iqr_pct_of_median']:.1f} | {ratio_cells} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the command line, runs the benchmark, prints the table, writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--blocks", type=int, default=DEFAULT_BLOCKS, help="rounds of timed blocks (default 150)"
    )
    parser.add_argument(
        "--steps-per-block",
        type=int,
        default=DEFAULT_STEPS_PER_BLOCK,
        help="training steps per block (default 10)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="TensorFlow intra- and inter-op threads (default 1)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results to this file")
    args = parser.parse_args(argv)

    results = run(args.blocks, args.steps_per_block, args.threads)
    info = machine_info()
    config = results["config"]
    print(
        f"{config['blocks']} blocks x {config['steps_per_block']} steps per variant, "
        f"{config['threads']} thread(s), {info['cpu_count']} CPUs, "
        f"TensorFlow {info['tensorflow']}, Keras {info['keras']}"
    )
    print()
    print(format_table(results))
    print()
    for name, ratio in results["ratios"].items():
        print(
            f"{name}: time ratio {ratio['time_ratio']:.3f} ({ratio['overhead_pct']:+.1f} %), "
            f"round-by-round median ratio {ratio['paired_median_ratio']:.3f}, "
            f"max weight difference from baseline {results['max_weight_diff'][name]:.2e}"
        )

    if args.json:
        write_json(args.json, results, info)


if __name__ == "__main__":
    main()
