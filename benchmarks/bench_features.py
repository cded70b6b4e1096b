"""The cost of trainop's optional features, against the same train op without them.

On the core benchmark's Keras 3 MLP (784-256-256-10, batch 64, Adam; `bench_core`), in one
process, each variant trains its own identical copy of the model on the same batches:

* ``trainop``: `create_train_op(loss_fn, optimizer)` with its defaults: the reference.
* ``skip``: `check_numerics="skip"`: the finiteness of the loss and every gradient decided on
  the device, the update in a `tf.cond`.
* ``summaries``: `summarize_gradients=True, summarize_every_n_steps=100` with a default
  `tf.summary` file writer: loss, global gradient norm, learning rate and a histogram and norm
  per gradient, written every 100th step.
* ``skip_summaries``: both.
* ``skip_spikes``: a `SkipNonFiniteSteps(spike_threshold=6.0)`: the skip guard that also judges
  the loss and the global gradient norm against their running statistics.
* ``skip_updates``: a `SkipNonFiniteSteps(check_updates=True)`: the skip guard that also checks
  the updated weights, and undoes an update that made them inf or NaN.
* ``agc``: `transform_grads_fn=adaptive_gradient_clipping_fn(clipping=0.01)`.
* ``centralization``: `transform_grads_fn=gradient_centralization_fn()`.
* ``lr_multipliers``: `learning_rate_multipliers={re.compile(".*"): 0.5}`: every variable's
  update scaled after Adam made it (the most it can cost: every variable chosen).
* ``ema``: `moving_average=ExponentialMovingAverage(0.999)`: every variable averaged after
  each update; ``keras_use_ema``: the peer's own, `keras.optimizers.Adam(use_ema=True,
  ema_momentum=0.999)` (Keras 3 optimizers only), for comparison.
* ``metrics``: `step_metrics=True`: the gradient norms and the applied flag written each step.
* ``accumulate``: `accumulation_steps=2` with the mean loss; ``accumulate_counted``: the same
  with the loss given as `(loss_sum, count)`, each call weighed by its count. Their cost is
  the one against the other (both apply half as many updates as the reference).

The variants run in short alternating blocks (`bench_core.time_interleaved`). The time ratio is
of the medians of the per-step block times; the mean ratio also counts the blocks in which a
summary was written (one block in ten with the defaults), the amortized cost.

With ``--jit-compile`` every train op is compiled by XLA (``jit_compile=True``), which fuses
the element-wise work of the features into the step's kernels; the variants that write
summaries are left out.

Run it from the repository root::

    python -m benchmarks.bench_features [--blocks N] [--steps-per-block N] [--threads N]
                                        [--json PATH] [--jit-compile]
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import trainop  # noqa: E402
from benchmarks.bench_core import (  # noqa: E402
    DEFAULT_BLOCKS,
    DEFAULT_STEPS_PER_BLOCK,
    DEFAULT_THREADS,
    DEFAULT_WARMUP_STEPS,
    LEARNING_RATE,
    Variant,
    copy_model,
    interleaved_results,
    machine_info,
    make_loss_fn,
    make_model,
    prepare,
    time_interleaved,
    write_json,
)

SUMMARY_EVERY_N_STEPS = 100


class _Made:
    """Makes `factory(**settings)` for each variant that uses it (a guard's counters are its
    own); shown in the table as the call."""

    def __init__(self, factory: Callable[..., Any], **settings: Any):
        self.factory, self.settings = factory, settings

    def __call__(self) -> Any:
        return self.factory(**self.settings)

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in self.settings.items())
        return f"{self.factory.__name__}({shown})"


REFERENCE = "trainop"
# Settings of the benchmark, not of the train op: the loss given with its count; arguments of
# the Adam optimizer.
COUNTED = "counted_loss"
OPTIMIZER_ARGUMENTS = "optimizer"
FEATURES: dict[str, dict[str, Any]] = {
    "trainop": {},
    "skip": {"check_numerics": "skip"},
    "summaries": {"summarize_gradients": True, "summarize_every_n_steps": SUMMARY_EVERY_N_STEPS},
    "skip_summaries": {
        "check_numerics": "skip",
        "summarize_gradients": True,
        "summarize_every_n_steps": SUMMARY_EVERY_N_STEPS,
    },
    "skip_spikes": {
        "check_numerics": _Made(trainop.SkipNonFiniteSteps, spike_threshold=6.0),
    },
    "skip_updates": {"check_numerics": _Made(trainop.SkipNonFiniteSteps, check_updates=True)},
    "agc": {"transform_grads_fn": _Made(trainop.adaptive_gradient_clipping_fn, clipping=0.01)},
    "centralization": {"transform_grads_fn": _Made(trainop.gradient_centralization_fn)},
    "lr_multipliers": {"learning_rate_multipliers": {re.compile(".*"): 0.5}},
    "ema": {"moving_average": _Made(trainop.ExponentialMovingAverage, decay=0.999)},
    "keras_use_ema": {OPTIMIZER_ARGUMENTS: {"use_ema": True, "ema_momentum": 0.999}},
    "metrics": {"step_metrics": True},
    "accumulate": {"accumulation_steps": 2},
    "accumulate_counted": {"accumulation_steps": 2, COUNTED: True},
}


def counted_loss_fn(model: keras.Model) -> Callable[[tf.Tensor, tf.Tensor], Any]:
    """The same loss as `make_loss_fn`'s, given as its sum over the batch and the batch's size."""
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")

    def loss_fn(x: tf.Tensor, y: tf.Tensor) -> Any:
        return loss_object(y, model(x, training=True)), tf.shape(x)[0]

    return loss_fn


def features(jit_compile: bool) -> dict[str, dict[str, Any]]:
    """The variants to run: under XLA, those that write no summaries (XLA compiles none)."""
    if not jit_compile:
        return FEATURES
    return {k: v for k, v in FEATURES.items() if not v.get("summarize_gradients")}


def make_variants(
    writer: Any, first_batch: tuple[tf.Tensor, tf.Tensor], jit_compile: bool = False
) -> list[Variant]:
    """One train op per entry of `FEATURES`, each with its own model, optimizer, global step.

    A summarizing train op writes to the default writer of the moment it is traced, and keeps
    writing there: it is traced here, with the writer as default (without running a step, so
    that every variant trains on the same batches), and then timed like the others. (Entering
    `writer.as_default()` around every call would time a flush per call.)
    """
    base_model = make_model()
    variants = []
    for name, settings in features(jit_compile).items():
        kwargs = {
            key: value() if isinstance(value, _Made) else value for key, value in settings.items()
        }
        counted = kwargs.pop(COUNTED, False)
        model = copy_model(base_model)
        optimizer = keras.optimizers.Adam(LEARNING_RATE, **kwargs.pop(OPTIMIZER_ARGUMENTS, {}))
        step = trainop.create_train_op(
            counted_loss_fn(model) if counted else make_loss_fn(model),
            optimizer,
            global_step=tf.Variable(0, dtype=tf.int64, trainable=False),
            jit_compile=jit_compile,
            **kwargs,
        )
        if kwargs.get("summarize_gradients"):
            with writer.as_default():
                step.get_concrete_function(*first_batch)  # traces, trains nothing
        variants.append(Variant(name, step, model, optimizer))
    return variants


def run(
    blocks: int = DEFAULT_BLOCKS,
    steps_per_block: int = DEFAULT_STEPS_PER_BLOCK,
    threads: int = DEFAULT_THREADS,
    *,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    seed: int = 0,
    jit_compile: bool = False,
) -> dict[str, Any]:
    """Runs the benchmark; returns per variant its timings, and its ratios to `trainop`
    (every train op compiled by XLA with `jit_compile`)."""
    batches = prepare(blocks, steps_per_block, threads, warmup_steps, seed)
    with tempfile.TemporaryDirectory(prefix="trainop-bench-") as logdir:
        # Kept alive by this scope: a traced train op holds the writer's resource, not the
        # writer, which deletes the resource when it goes.
        writer = tf.summary.create_file_writer(logdir)
        variants = make_variants(writer, batches[0], jit_compile)
        times = time_interleaved(variants, batches, blocks, steps_per_block, warmup_steps)
    candidates = [name for name in features(jit_compile) if name != REFERENCE]
    return {
        "config": {
            "blocks": blocks,
            "steps_per_block": steps_per_block,
            "threads": threads,
            "warmup_steps": warmup_steps,
            "summary_every_n_steps": SUMMARY_EVERY_N_STEPS,
            "jit_compile": jit_compile,
        },
        # max_weight_diff: none of the features may change what healthy batches train.
        **interleaved_results(times, variants, REFERENCE, candidates),
    }


def format_table(results: dict[str, Any]) -> str:
    """The results as a markdown table, one row per variant."""
    lines = [
        "| variant | ms/step | IQR % | time ratio | paired ratio | mean ratio | arguments |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, summary in results["variants"].items():
        ratio = results["ratios"].get(
            name, {"time_ratio": 1.0, "paired_median_ratio": 1.0, "mean_ratio": 1.0}
        )
        arguments = ", ".join(f"{k}={v!r}" for k, v in FEATURES[name].items()) or "defaults"
        lines.append(
            f"| {name} | {1e3 * summary['median_s_per_step']:.3f} "
            f"| {summary['iqr_pct_of_median']:.0f} | {ratio['time_ratio']:.3f} "
            f"| {ratio['paired_median_ratio']:.3f} | {ratio['mean_ratio']:.3f} | {arguments} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the command line, runs the benchmark and prints its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=DEFAULT_BLOCKS)
    parser.add_argument("--steps-per-block", type=int, default=DEFAULT_STEPS_PER_BLOCK)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--json", metavar="PATH", help="also write the results to this file")
    parser.add_argument(
        "--jit-compile",
        action="store_true",
        help="compile every train op with XLA (the variants that write summaries left out)",
    )
    args = parser.parse_args(argv)
    results = run(args.blocks, args.steps_per_block, args.threads, jit_compile=args.jit_compile)
    info = machine_info()
    config = results["config"]
    print(
        f"{config['blocks']} blocks x {config['steps_per_block']} steps per variant, "
        f"{config['threads']} thread(s), {info['cpu_count']} CPUs ({info['cpu_model']}), "
        f"TensorFlow {info['tensorflow']}, Keras {info['keras']}"
        + (", every train op compiled by XLA" if config["jit_compile"] else "")
    )
    print()
    print(format_table(results))
    if args.json:
        write_json(args.json, results, info)


if __name__ == "__main__":
    main()
