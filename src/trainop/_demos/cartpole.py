"""A DQN on Gymnasium's CartPole-v1, its target network's soft update an update op."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import trainop
from trainop._demos import common

TARGET_RETURN = 195.0
# What the greedy policy's average return is measured over.
EVALUATION_EPISODES = 20
RETURN_LABEL = f"average return (greedy, {EVALUATION_EPISODES} episodes)"


def q_network() -> keras.Model:
    """Two hidden layers of 64: a value per action (2) for an observation (4)."""
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(2),
        ]
    )


class DoubleDQN:
    """Double DQN (van Hasselt et al., 2016) with a Huber loss and a target network that
    follows the Q-network by a soft update, `target <- (1 - tau) target + tau q`."""

    def __init__(self, gamma: float = 0.99, tau: float = 0.005):
        self.q, self.target = q_network(), q_network()
        self.target.set_weights(self.q.get_weights())
        self.optimizer = keras.optimizers.Adam(1e-3)
        self.gamma, self.tau = gamma, tau
        self._huber = keras.losses.Huber()
        self.greedy = tf.function(lambda obs: tf.argmax(self.q(obs), axis=1))

    def loss(self, obs, actions, rewards, next_obs, terminated) -> tf.Tensor:
        """The Huber loss of a replay batch: observations (B, 4) float32, actions (B,) int32,
        rewards and terminated (B,) float32."""
        # The Q-network picks the next action, the target network values it.
        next_actions = tf.argmax(self.q(next_obs), axis=1, output_type=tf.int32)
        next_values = tf.gather(self.target(next_obs), next_actions, batch_dims=1)
        targets = rewards + self.gamma * (1.0 - terminated) * next_values
        values = tf.gather(self.q(obs), actions, batch_dims=1)
        return self._huber(tf.stop_gradient(targets), values)

    def soft_update(self) -> tf.Operation:
        return tf.group(
            *[
                t.assign((1 - self.tau) * t + self.tau * s)
                for t, s in zip(self.target.weights, self.q.weights)
            ]
        )

    def checkpoint(self) -> dict[str, Any]:
        return {"q": self.q, "target": self.target, "optimizer": self.optimizer}

    def average_return(self, episodes: int = EVALUATION_EPISODES) -> float:
        """The greedy policy's average return over `episodes` episodes of fixed seeds."""
        import gymnasium as gym

        env = gym.make("CartPole-v1")
        total = 0.0
        for episode in range(episodes):
            obs, _ = env.reset(seed=10_000 + episode)
            done = False
            while not done:
                action = int(self.greedy(tf.constant(obs[None], tf.float32))[0])
                obs, reward, terminated, truncated, _ = env.step(action)
                total += reward
                done = terminated or truncated
        return total / episodes


def _resumed_at_target(
    agent: DoubleDQN, outdir: str, steps: int, say: Callable[[str], Any]
) -> common.DemoResult | None:
    """On resume, the result of the saved policy if it reaches the target already, else None
    (the run trains on). The experience cannot be replayed: a policy that does what was
    promised is not trained further, and another one goes on with fresh experience."""
    resumed = common.latest_checkpoint(outdir)
    if resumed is None:
        return None
    path, step = resumed
    tf.train.Checkpoint(q=agent.q).restore(path).expect_partial()
    average = agent.average_return()
    if average < TARGET_RETURN:
        say(
            f"Resuming from {path} at global step {step}: its greedy policy averages a return "
            f"of {average:.1f}, short of {TARGET_RETURN:.0f}: training on to global step "
            f"{steps}."
        )
        return None
    say(
        f"Resuming from {path} at global step {step}: its greedy policy already averages a "
        f"return of {average:.1f}, at least {TARGET_RETURN:.0f}: not training further."
    )
    plot = common.plot_training(outdir, "eval/return", RETURN_LABEL)
    return common.DemoResult("average return", average, TARGET_RETURN, step, outdir, plot, None)


def run(
    outdir: str,
    *,
    steps: int = 25_000,
    seed: int = 0,
    progress: bool | None = None,
    say: Callable[[str], Any] = print,
) -> common.DemoResult:
    """Trains a `DoubleDQN` on CartPole-v1: one environment step and one update a step.

    The gradients are clipped to a global norm of 10; the soft update of the target network is
    passed to `create_train_op` as an update op, so that it runs inside the step. Every 1,000
    steps the greedy policy plays 20 episodes; training stops once their average return
    reaches `TARGET_RETURN`, or at `steps`.

    Args:
      outdir: where the events, checkpoints and plot go.
      steps: the global step (updates) to train to.
      seed: the seed of the environment, the weights and the exploration.
      progress: as for `trainop.train`.
      say: prints a line for the user.

    Returns:
      A `common.DemoResult` with the greedy policy's average return over 20 evaluation
      episodes.
    """
    import gymnasium as gym

    say(
        f"Training a DQN on Gymnasium's CartPole-v1 to global step {steps} (one environment "
        f"step and one update per step), the target network's soft update passed to "
        f"trainop.create_train_op as an update op. Output: {outdir}"
    )
    keras.utils.set_random_seed(seed)
    agent = DoubleDQN()
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    train_op = trainop.create_train_op(
        agent.loss,
        agent.optimizer,
        global_step=global_step,
        update_ops=[agent.soft_update],
        variables_to_train=agent.q.trainable_variables,
        transform_grads_fn=trainop.clip_by_global_norm_fn(10.0),
        summarize_every_n_steps=100,
    )
    at_target = _resumed_at_target(agent, outdir, steps, say)
    if at_target is not None:
        return at_target

    def evaluate(step: int, loss: float | None) -> None:
        average = agent.average_return()
        tf.summary.scalar("eval/return", average, step=step)
        if average >= TARGET_RETURN:
            # DQN's greedy policy swings: stop at a policy that does what was promised.
            raise trainop.StopTraining(f"average return {average:.1f}")

    result = trainop.train(
        train_op,
        experience(gym.make("CartPole-v1"), agent.greedy, seed),
        max_steps=steps,
        logdir=outdir,
        checkpoint=agent.checkpoint(),
        save_every_n_steps=5000,
        hooks=[trainop.Hook(evaluate, every_n_steps=1000)],
        progress=progress,
        global_step=global_step,
    )
    return common.DemoResult(
        "average return",
        agent.average_return(),
        TARGET_RETURN,
        result.global_step,
        outdir,
        common.plot_training(outdir, "eval/return", RETURN_LABEL),
        result.stopped_by,
    )


def experience(env: Any, greedy: Callable[[tf.Tensor], tf.Tensor], seed: int) -> Any:
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
