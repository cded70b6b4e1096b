"""Speed of the train op under `tf.distribute.MirroredStrategy`, against the hand-written step.

`MirroredStrategy` over two logical CPU devices of this machine, the core benchmark's Keras 3
MLP (784-256-256-10, Adam, softmax cross-entropy), global batch 64 (32 per replica). Variants,
each training its own copy of the model on the same batches, already distributed:

* ``baseline``: the hand-written step, `strategy.run` of a `GradientTape` step whose loss (a
  Keras loss object, which divides by the replica count itself) is taken as it is, the
  optimizer summing the gradients; the losses summed;
* ``trainop``: `create_train_op(loss_fn, optimizer, variables_to_train=...)` built in the scope;
* ``skip``: the same with `check_numerics="skip"` (each replica's verdict, summed);
* ``clip``: the same with `transform_grads_fn=trainop.clip_by_global_norm_fn(1.0)`, which sums
  the gradients before the optimizer sums them again.

Two logical devices share this machine's cores, so the figures measure what the train op adds
to a step, not how a step scales. Blocks of 10 steps alternate, the order rotating every round;
the figure is the time ratio to the baseline (below 1: faster).

Run it from the repository root, in a process of its own (the logical devices must be made
before TensorFlow starts)::

    python -m benchmarks.bench_strategy [--blocks N] [--threads N] [--json PATH]
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import trainop  # noqa: E402
from benchmarks.bench_core import (  # noqa: E402
    LEARNING_RATE,
    Variant,
    copy_model,
    interleaved_results,
    machine_info,
    make_loss_fn,
    make_model,
    parse_blocks_threads_json,
    prepare,
    time_interleaved,
    write_json,
)

REPLICAS = 2
VARIANTS = {
    "trainop": {},
    "skip": {"check_numerics": "skip"},
    "clip": {"transform_grads_fn": trainop.clip_by_global_norm_fn(1.0)},
}


def make_baseline_step(strategy: Any, model: keras.Model, optimizer: Any) -> Any:
    """The hand-written distributed step."""
    loss_fn = make_loss_fn(model)

    def replica_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            # Keras's loss object has divided by the replica count already (equal shares).
            loss = loss_fn(x, y)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def step(x: Any, y: Any) -> tf.Tensor:
        losses = strategy.run(replica_step, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    return step


def run(blocks: int = 150, threads: int = 1, steps_per_block: int = 10) -> dict[str, Any]:
    """Times the variants; returns their timings, ratios and weight differences."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS
    )
    batches = prepare(blocks, steps_per_block, threads, warmup_steps=20, seed=0)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(REPLICAS)])
    dataset = tf.data.Dataset.from_tensor_slices(
        tuple(tf.concat(parts, axis=0) for parts in zip(*batches))
    ).batch(batches[0][0].shape[0])
    distributed = list(strategy.experimental_distribute_dataset(dataset))

    variants = []
    with strategy.scope():
        base_model = make_model()
        for name in ("baseline", *VARIANTS):
            model = copy_model(base_model)
            optimizer = keras.optimizers.Adam(LEARNING_RATE)
            if name == "baseline":
                # Its state made in the scope, as a distributed program must.
                optimizer.build(model.trainable_variables)
                step = make_baseline_step(strategy, model, optimizer)
            else:
                step = trainop.create_train_op(
                    make_loss_fn(model),
                    optimizer,
                    tf.Variable(0, dtype=tf.int64),
                    variables_to_train=model.trainable_variables,
                    **VARIANTS[name],
                )
            variants.append(Variant(name, step, model, optimizer))

    times = time_interleaved(variants, distributed, blocks, steps_per_block, warmup_steps=20)
    return interleaved_results(times, variants, "baseline", list(VARIANTS))


def format_table(results: dict[str, Any]) -> str:
    """The results as a markdown table, one row per variant."""
    lines = [
        "| variant | ms/step | IQR % | time ratio | paired ratio | max weight diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, summary in results["variants"].items():
        ratio = results["ratios"].get(name, {"time_ratio": 1.0, "paired_median_ratio": 1.0})
        diff = results["max_weight_diff"].get(name, 0.0)
        lines.append(
            f"| {name} | {1e3 * summary['median_s_per_step']:.3f} "
            f"| {summary['iqr_pct_of_median']:.0f} | {ratio['time_ratio']:.3f} "
            f"| {ratio['paired_median_ratio']:.3f} | {diff:.1e} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the command line, runs the benchmark and prints its table."""
    args = parse_blocks_threads_json(__doc__.splitlines()[0], argv)
    results = run(args.blocks, args.threads)
    info = machine_info()
    print(
        f"MirroredStrategy over {REPLICAS} logical CPUs, {args.blocks} blocks of 10 steps, "
        f"{args.threads} thread(s), {info['cpu_count']} CPUs ({info['cpu_model']}), "
        f"TensorFlow {info['tensorflow']}, Keras {info['keras']}\n"
    )
    print(format_table(results))
    if args.json:
        write_json(args.json, results, info)


if __name__ == "__main__":
    main()
