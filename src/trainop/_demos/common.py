"""What the demos share: their result, where a run resumes, and the plot of its events."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import tensorflow as tf

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


def latest_checkpoint(outdir: str) -> tuple[str, int] | None:
    """The newest checkpoint in `outdir` and its global step, or None."""
    latest = tf.train.latest_checkpoint(outdir)
    if latest is None:
        return None
    return latest, int(tf.train.load_checkpoint(latest).get_tensor(_STEP_KEY))


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every numeric scalar in the event files of `logdir`, by tag, as (step, value) sorted by
    step (text, such as the model's configuration that Keras's TensorBoard callback writes, is
    left out)."""
    series: dict[str, dict[int, float]] = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.HasField("tensor") and not value.tensor.tensor_shape.dim:
                    array = tf.make_ndarray(value.tensor)
                    if array.dtype.kind not in "biuf":
                        continue
                    number = float(array)
                elif value.HasField("simple_value"):
                    number = value.simple_value
                else:
                    continue
                # A resumed run writes some steps again: the later value wins.
                series.setdefault(value.tag, {})[event.step] = number
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_training(
    logdir: str,
    metric_tag: str,
    metric_label: str,
    *,
    percent: bool = False,
    directory: str | None = None,
) -> str:
    """Plots `train/loss` and `metric_tag` from the events of `logdir`; returns the PNG path.

    Args:
      logdir: the directory of the event files.
      metric_tag: the tag of the metric, plotted beside the loss.
      metric_label: the metric's title.
      percent: the metric is a fraction, plotted in percent.
      directory: where the plot goes; by default `logdir`.

    Returns:
      The path of the PNG file.
    """
    figure = training_figure(read_scalars(logdir), metric_tag, metric_label, percent=percent)
    from matplotlib import pyplot as plt

    path = os.path.join(directory or logdir, PLOT_FILE)
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
