"""Speed of `jit_compile=True` and of several steps per call, against the hand-written step.

Two Keras 3 MLPs with Adam (learning rate 1e-3), softmax cross-entropy over 10 classes:

* ``mlp``: the core benchmark's 784-256-256-10, batch 64;
* ``small``: 784-64-64-10, batch 8, where Python's per-call cost dominates a step.

Variants, each training its own copy of the model on the same 16 batches:

* ``baseline``: the hand-written `tf.function` step (`GradientTape`, `apply_gradients`);
* ``baseline_jit``: the same with `jit_compile=True`, what XLA gives a hand-written step;
* ``trainop``: `create_train_op(loss_fn, optimizer)`;
* ``jit``: the same with `jit_compile=True` (the numerics check then gates the update with a
  `tf.cond`, since XLA drops `CheckNumerics`);
* ``jit_unchecked``: `jit_compile=True, check_numerics=False`, the hand-written step's work;
* ``k16``: `steps_per_call=16`: one call runs the 16 steps;
* ``k16_jit``: both.

A block is 16 steps (16 calls, or one call of 16); the blocks of all variants alternate, the
order rotating every round. The figure is the speed-up per step, median baseline block time over
median variant block time (above 1: faster than the hand-written step).

Run it from the repository root::

    python -m benchmarks.bench_scale [--blocks N] [--threads N] [--json PATH]
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import trainop  # noqa: E402
from benchmarks.bench_core import (  # noqa: E402
    LEARNING_RATE,
    machine_info,
    make_baseline_step,
    make_loss_fn,
    make_model,
    parse_blocks_threads_json,
    set_threads,
    write_json,
)

STEPS_PER_CALL = 16
MODELS = {"mlp": (64, (256, 256)), "small": (8, (64, 64))}
VARIANTS = ("baseline", "baseline_jit", "trainop", "jit", "jit_unchecked", "k16", "k16_jit")


def _block_function(
    name: str, model: keras.Model, batches: tuple[tf.Tensor, tf.Tensor]
) -> Callable[[], Any]:
    """A function running one block (16 steps) of variant `name`; returns its last result."""
    optimizer = keras.optimizers.Adam(LEARNING_RATE)
    loss_fn = make_loss_fn(model)

    xs, ys = batches
    slices = [(xs[i], ys[i]) for i in range(STEPS_PER_CALL)]
    if name.startswith("baseline"):
        step = make_baseline_step(model, optimizer, jit_compile=name == "baseline_jit")
    else:
        step = trainop.create_train_op(
            loss_fn,
            optimizer,
            global_step=tf.Variable(0, dtype=tf.int64, trainable=False),
            variables_to_train=model.trainable_variables,
            jit_compile="jit" in name,
            check_numerics=name != "jit_unchecked",
            steps_per_call=STEPS_PER_CALL if name.startswith("k16") else 1,
        )
    if name.startswith("k16"):
        return lambda: step(xs, ys)

    def block() -> Any:
        loss = None
        for x, y in slices:
            loss = step(x, y)
        return loss

    return block


def run(blocks: int = 150, threads: int = 1, warmup_blocks: int = 5) -> dict[str, Any]:
    """Times every variant on every model; returns per model the timings and speed-ups."""
    set_threads(threads)
    results: dict[str, Any] = {}
    for model_name, (batch_size, hidden) in MODELS.items():
        keras.utils.set_random_seed(0)
        xs = tf.random.stateless_normal((STEPS_PER_CALL, batch_size, 784), seed=(0, 1))
        ys = tf.random.stateless_uniform(
            (STEPS_PER_CALL, batch_size), seed=(0, 2), maxval=10, dtype=tf.int32
        )
        base = make_model(hidden)
        models = {name: keras.models.clone_model(base) for name in VARIANTS}
        for model in models.values():
            model.set_weights(base.get_weights())
        blocks_of = {name: _block_function(name, models[name], (xs, ys)) for name in VARIANTS}
        for block in blocks_of.values():
            for _ in range(warmup_blocks):
                float(tf.reduce_sum(block()))
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        gc.collect()
        gc.disable()
        try:
            for round_index in range(blocks):
                shift = round_index % len(VARIANTS)
                for name in [*VARIANTS[shift:], *VARIANTS[:shift]]:
                    start = time.perf_counter()
                    # Reading the result waits for the whole block.
                    float(tf.reduce_sum(blocks_of[name]()))
                    times[name].append((time.perf_counter() - start) / STEPS_PER_CALL)
        finally:
            gc.enable()
        baseline = statistics.median(times["baseline"])
        reference = models["baseline"].get_weights()
        results[model_name] = {
            name: {
                "median_s_per_step": statistics.median(t),
                "speedup_vs_baseline": baseline / statistics.median(t),
                "paired_speedup": statistics.median(b / v for b, v in zip(times["baseline"], t)),
                "max_weight_diff_vs_baseline": max(
                    float(np.max(np.abs(a - b)))
                    for a, b in zip(models[name].get_weights(), reference)
                ),
            }
            for name, t in times.items()
        }
    return results


def format_table(results: dict[str, Any]) -> str:
    """One markdown table per model."""
    lines = []
    for model_name, variants in results.items():
        batch_size, hidden = MODELS[model_name]
        lines += [
            f"### {model_name}: 784-{'-'.join(map(str, hidden))}-10, batch {batch_size}",
            "",
            "| variant | ms/step | speed-up vs baseline | paired | max weight diff |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in variants.items():
            lines.append(
                f"| {name} | {1e3 * r['median_s_per_step']:.3f} "
                f"| {r['speedup_vs_baseline']:.2f}x | {r['paired_speedup']:.2f}x "
                f"| {r['max_weight_diff_vs_baseline']:.1e} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the command line, runs the benchmark and prints its tables."""
    args = parse_blocks_threads_json(__doc__.splitlines()[0], argv)
    results = run(args.blocks, args.threads)
    info = machine_info()
    print(
        f"{args.blocks} blocks of {STEPS_PER_CALL} steps, {args.threads} thread(s), "
        f"{info['cpu_count']} CPUs ({info['cpu_model']}), TensorFlow {info['tensorflow']}, "
        f"Keras {info['keras']}\n"
    )
    print(format_table(results))
    if args.json:
        write_json(args.json, {"results": results}, info)


if __name__ == "__main__":
    main()
