"""The demos of the `trainop` command: real models trained end to end, with no download.

* `digits.run`: a small convolutional classifier on scikit-learn's bundled 8x8 digits (1,797
  images), trained with `create_train_op` and `train`, evaluated every 100 steps.
* `cartpole.run`: a DQN on Gymnasium's CartPole, its target network's soft update passed to
  `create_train_op` as an update op.

Each leaves in its output directory the TensorBoard events, the checkpoints and `training.png`,
a plot of the loss and of the accuracy (in percent) or return, drawn from the event files (so a
resumed run plots its whole history): `common`.
"""
