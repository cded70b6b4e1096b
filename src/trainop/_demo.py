"""The demos of the `trainop` command: real models trained end to end, with no download.

* `digits`: a small convolutional classifier on scikit-learn's bundled 8x8 digits (1,797
  images), trained with `create_train_op` and `train`, evaluated every 100 steps.
* `cartpole`: a DQN on Gymnasium's CartPole, its target network's soft update passed to
  `create_train_op` as an update op.

Each leaves in its output directory the TensorBoard events, the checkpoints and `training.png`,
a plot of the loss and of the accuracy (in percent) or return, drawn from the event files (so a
resumed run plots its whole history).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import trainop

DIGITS_TARGET_ACCURACY = 0.95
CARTPOLE_TARGET_RETURN = 195.0
PLOT_FILE = "training.png"
# A series of at most this many points is drawn with markers: the evaluations, a short run.
MARKED_POINTS = 50
# Where `trainop.train` saves the global step in a checkpoint.
_STEP_KEY = "global_step/.ATTRIBUTES/VARIABLE_VALUE"


@dataclasses.dataclass
class DemoResult:
    """What a demo reached, against what it promised.

    Attributes:
      metric: 'test accuracy' or 'average return'.
      value: what it reached.
      target: what it states it reaches.
      global_step: the global step at the end.
      outdir: the output directory.
      plot: the path of the plot.
      stopped_by: why training ended, as `trainop.TrainResult.stopped_by` says ('max_steps',
        'end_of_data', 'SIGINT', 'SIGTERM' or a hook's 'StopTraining: ...'); None if the
        demo trained no further (CartPole resumed at its target).
    """

    metric: str
    value: float
    target: float
    global_step: int
    outdir: str
    plot: str
    stopped_by: str | None

    @property
    def reached(self) -> bool:
        return self.value >= self.target


def digits(
    outdir: str,
    *,
    steps: int = 1500,
    seed: int = 0,
    progress: bool | None = None,
    say: Callable[[str], Any] = print,
) -> DemoResult:
    """Trains a small convolutional network on scikit-learn's 8x8 digits.

    Args:
      outdir: where the events, checkpoints and plot go; a run finding checkpoints there
        resumes.
      steps: the global step to train to (batches of 64).
      seed: the seed of the split, the weights and the shuffling.
      progress: as for `trainop.train`.
      say: prints a line for the user.

    Returns:
      A `DemoResult` with the test accuracy.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[..., None]
    labels = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:360], order[360:]
    say(
        f"Training a small convolutional network on scikit-learn's 8x8 digits "
        f"({len(train)} training and {len(test)} test images) to global step {steps}, "
        f"with trainop.create_train_op and trainop.train. Output: {outdir}"
    )
    resumed = _latest_checkpoint(outdir)
    if resumed is not None:
        path, step = resumed
        plan = (
            "already trained; evaluating"
            if step >= steps
            else f"training on to global step {steps}"
        )
        say(f"Resuming from {path} at global step {step}: {plan}.")

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    optimizer = keras.optimizers.Adam(1e-3)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    train_op = trainop.create_train_op(
        lambda x, y: cross_entropy(y, model(x, training=True)),
        optimizer,
        global_step=global_step,
        variables_to_train=model.trainable_variables,
        summarize_every_n_steps=10,
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((images[train], labels[train]))
        .shuffle(len(train), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(64)
    )
    test_images, test_labels = tf.constant(images[test]), labels[test]

    def accuracy() -> float:
        predictions = np.argmax(model(test_images, training=False).numpy(), axis=1)
        return float(np.mean(predictions == test_labels))

    def evaluate(step: int, loss: float | None) -> None:
        tf.summary.scalar("eval/accuracy", accuracy(), step=step)

    result = trainop.train(
        train_op,
        dataset,
        max_steps=steps,
        logdir=outdir,
        checkpoint={"model": model, "optimizer": optimizer},
        save_every_n_steps=500,
        hooks=[trainop.Hook(evaluate, every_n_steps=100)],
        progress=progress,
        global_step=global_step,
    )
    final = accuracy()
    plot = plot_training(outdir, "eval/accuracy", "test accuracy", percent=True)
    return DemoResult(
        "test accuracy",
        final,
        DIGITS_TARGET_ACCURACY,
        result.global_step,
        outdir,
        plot,
        result.stopped_by,
    )


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of `logdir`, by tag, as (step, value) sorted by step."""
    series: dict[str, dict[int, float]] = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.HasField("tensor") and not value.tensor.tensor_shape.dim:
                    number = float(tf.make_ndarray(value.tensor))
                elif value.HasField("simple_value"):
                    number = value.simple_value
                else:
                    continue
                # A resumed run writes some steps again: the later value wins.
                series.setdefault(value.tag, {})[event.step] = number
    return {tag: sorted(points.items()) for tag, points in series.items()}


def _latest_checkpoint(outdir: str) -> tuple[str, int] | None:
    """The newest checkpoint in `outdir` and its global step, or None."""
    latest = tf.train.latest_checkpoint(outdir)
    if latest is None:
        return None
    return latest, int(tf.train.load_checkpoint(latest).get_tensor(_STEP_KEY))


def plot_training(logdir: str, metric_tag: str, metric_label: str, *, percent: bool = False) -> str:
    """Plots `train/loss` and `metric_tag` from the events of `logdir`; returns the PNG path.

    Args:
      logdir: the directory of the event files, where the plot goes.
      metric_tag: the tag of the metric, plotted beside the loss.
      metric_label: the metric's title.
      percent: the metric is a fraction, plotted in percent.

    Returns:
      The path of the PNG file.
    """
    figure = training_figure(read_scalars(logdir), metric_tag, metric_label, percent=percent)
    from matplotlib import pyplot as plt

    path = os.path.join(logdir, PLOT_FILE)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def training_figure(
    series: dict[str, list[tuple[int, float]]],
    metric_tag: str,
    metric_label: str,
    *,
    percent: bool = False,
) -> Any:
    """The figure `plot_training` saves: the training loss and the metric, by global step.

    A series of at most `MARKED_POINTS` points is drawn with markers, so that a few evaluations
    (two, of a short CartPole run) are visible.

    Args:
      series: (step, value) points by tag, as `read_scalars` returns them.
      metric_tag: the tag of the metric, plotted beside `train/loss`.
      metric_label: the metric's title.
      percent: the metric is a fraction, plotted in percent ("(%)" is added to its title).

    Returns:
      A matplotlib `Figure` of two axes; close it with `matplotlib.pyplot.close`.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(10, 4))
    metric_scale = 100.0 if percent else 1.0
    for axes, tag, label, scale in [
        (loss_axes, "train/loss", "training loss", 1.0),
        (metric_axes, metric_tag, f"{metric_label} (%)" if percent else metric_label, metric_scale),
    ]:
        points = series.get(tag, [])
        if points:
            steps, values = zip(*points)
            marker = "o" if len(points) <= MARKED_POINTS else None
            axes.plot(steps, [scale * value for value in values], marker=marker)
        axes.set_xlabel("global step")
        axes.set_title(label)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def cartpole(
    outdir: str,
    *,
    steps: int = 25_000,
    seed: int = 0,
    progress: bool | None = None,
    say: Callable[[str], Any] = print,
) -> DemoResult:
    """Trains a DQN on Gymnasium's CartPole-v1: one environment step and one update a step.

    Double DQN with a Huber loss and gradients clipped to a global norm of 10. The target
    network follows the Q-network by a soft update (`target <- 0.995 target + 0.005 q`), passed
    to `create_train_op` as an update op, so that it runs inside the step. Every 1,000 steps
    the greedy policy plays 20 episodes; training stops once their average return reaches
    `CARTPOLE_TARGET_RETURN`, or at `steps`.

    Args:
      outdir: where the events, checkpoints and plot go.
      steps: the global step (updates) to train to.
      seed: the seed of the environment, the weights and the exploration.
      progress: as for `trainop.train`.
      say: prints a line for the user.

    Returns:
      A `DemoResult` with the greedy policy's average return over 20 evaluation episodes.
    """
    import gymnasium as gym

    say(
        f"Training a DQN on Gymnasium's CartPole-v1 to global step {steps} (one environment "
        f"step and one update per step), the target network's soft update passed to "
        f"trainop.create_train_op as an update op. Output: {outdir}"
    )
    keras.utils.set_random_seed(seed)

    def q_network() -> Any:
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(2),
            ]
        )

    q, target = q_network(), q_network()
    target.set_weights(q.get_weights())
    optimizer = keras.optimizers.Adam(1e-3)
    huber = keras.losses.Huber()
    gamma, tau = 0.99, 0.005

    def loss_fn(obs, actions, rewards, next_obs, terminated):
        # Double DQN: the Q-network picks the next action, the target network values it.
        next_actions = tf.argmax(q(next_obs), axis=1, output_type=tf.int32)
        next_values = tf.gather(target(next_obs), next_actions, batch_dims=1)
        targets = rewards + gamma * (1.0 - terminated) * next_values
        values = tf.gather(q(obs), actions, batch_dims=1)
        return huber(tf.stop_gradient(targets), values)

    def soft_update() -> Any:
        return tf.group(
            *[t.assign((1 - tau) * t + tau * s) for t, s in zip(target.weights, q.weights)]
        )

    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    train_op = trainop.create_train_op(
        loss_fn,
        optimizer,
        global_step=global_step,
        update_ops=[soft_update],
        variables_to_train=q.trainable_variables,
        transform_grads_fn=trainop.clip_by_global_norm_fn(10.0),
        summarize_every_n_steps=100,
    )
    greedy = tf.function(lambda obs: tf.argmax(q(obs), axis=1))

    def evaluate_return(episodes: int = 20) -> float:
        env = gym.make("CartPole-v1")
        total = 0.0
        for episode in range(episodes):
            obs, _ = env.reset(seed=10_000 + episode)
            done = False
            while not done:
                action = int(greedy(tf.constant(obs[None], tf.float32))[0])
                obs, reward, terminated, truncated, _ = env.step(action)
                total += reward
                done = terminated or truncated
        return total / episodes

    def evaluate(step: int, loss: float | None) -> None:
        average = evaluate_return()
        tf.summary.scalar("eval/return", average, step=step)
        if average >= CARTPOLE_TARGET_RETURN:
            # DQN's greedy policy swings: stop at a policy that does what was promised.
            raise trainop.StopTraining(f"average return {average:.1f}")

    resumed = _latest_checkpoint(outdir)
    if resumed is not None:
        # The experience cannot be replayed: a policy that already does what was promised is
        # not trained further, and another one goes on with fresh experience.
        path, step = resumed
        tf.train.Checkpoint(q=q).restore(path).expect_partial()
        average = evaluate_return()
        if average >= CARTPOLE_TARGET_RETURN:
            say(
                f"Resuming from {path} at global step {step}: its greedy policy already "
                f"averages a return of {average:.1f}, at least {CARTPOLE_TARGET_RETURN:.0f}: "
                "not training further."
            )
            plot = plot_training(outdir, "eval/return", "average return (greedy, 20 episodes)")
            return DemoResult(
                "average return", average, CARTPOLE_TARGET_RETURN, step, outdir, plot, None
            )
        say(
            f"Resuming from {path} at global step {step}: its greedy policy averages a return "
            f"of {average:.1f}, short of {CARTPOLE_TARGET_RETURN:.0f}: training on to global step "
            f"{steps}."
        )

    result = trainop.train(
        train_op,
        _experience(gym.make("CartPole-v1"), greedy, seed),
        max_steps=steps,
        logdir=outdir,
        checkpoint={"q": q, "target": target, "optimizer": optimizer},
        save_every_n_steps=5000,
        hooks=[trainop.Hook(evaluate, every_n_steps=1000)],
        progress=progress,
        global_step=global_step,
    )
    final = evaluate_return()
    plot = plot_training(outdir, "eval/return", "average return (greedy, 20 episodes)")
    return DemoResult(
        "average return",
        final,
        CARTPOLE_TARGET_RETURN,
        result.global_step,
        outdir,
        plot,
        result.stopped_by,
    )


def _experience(env: Any, greedy: Callable[[tf.Tensor], tf.Tensor], seed: int) -> Any:
    """Acts in `env` epsilon-greedily and yields, after each step, a replay batch of 64."""
    capacity, batch_size, warmup, explore_steps = 50_000, 64, 1000, 10_000
    rng = np.random.default_rng(seed)
    buffer = {
        "obs": np.zeros((capacity, 4), np.float32),
        "actions": np.zeros(capacity, np.int32),
        "rewards": np.zeros(capacity, np.float32),
        "next_obs": np.zeros((capacity, 4), np.float32),
        "terminated": np.zeros(capacity, np.float32),
    }
    obs, _ = env.reset(seed=seed)
    episode_return, size = 0.0, 0
    env_step = 0
    while True:
        epsilon = max(0.05, 1.0 - env_step / explore_steps)
        if rng.random() < epsilon:
            action = int(rng.integers(2))
        else:
            action = int(greedy(tf.constant(obs[None], tf.float32))[0])
        next_obs, reward, terminated, truncated, _ = env.step(action)
        index = env_step % capacity
        for key, value in [
            ("obs", obs),
            ("actions", action),
            ("rewards", reward),
            ("next_obs", next_obs),
            ("terminated", float(terminated)),
        ]:
            buffer[key][index] = value
        size, env_step = min(size + 1, capacity), env_step + 1
        episode_return += reward
        obs = next_obs
        if terminated or truncated:
            tf.summary.scalar("train/episode_return", episode_return, step=env_step)
            obs, _ = env.reset()
            episode_return = 0.0
        if size >= warmup:
            picked = rng.integers(size, size=batch_size)
            yield tuple(
                tf.constant(buffer[key][picked])
                for key in ("obs", "actions", "rewards", "next_obs", "terminated")
            )
