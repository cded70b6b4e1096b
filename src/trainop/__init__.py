"""trainop: the training step of a TensorFlow model, built in one call.

`trainop.create_train_op` has the signature of TF-Agents' `create_train_op`, so that TF-Agents
and TF-Slim programs move to current TensorFlow with one changed import. Every public name is
importable from `trainop` itself, except those of `trainop.keras`, the step inside Keras 3's
`model.fit`, which is imported when first used (Keras 3 is not needed otherwise); the other
submodules are internal.
"""

import sys as _sys

if _sys.argv[:1] == ["-m"]:
    # Python is locating a module to run with -m. For `python -m trainop`, the command checks its
    # command line and what it needs before TensorFlow is imported, as `trainop` does.
    from trainop_cli import check_python_dash_m as _check_python_dash_m

    _check_python_dash_m()

try:
    import tensorflow as _tf
except ImportError:
    raise ImportError(
        "trainop needs TensorFlow 2.16 or newer, which is not installed: run "
        "`pip install 'trainop[cpu]'` (or `trainop[tensorflow]`, `trainop[gpu]`), or install "
        "tensorflow, tensorflow-cpu or your own GPU build yourself."
    ) from None

if tuple(int(part) for part in _tf.__version__.split(".")[:2]) < (2, 16):
    raise ImportError(
        f"trainop needs TensorFlow 2.16 or newer; TensorFlow {_tf.__version__} is installed: run "
        "`pip install --upgrade tensorflow` (or tensorflow-cpu)."
    )

from trainop._step_metrics import StepMetrics
from trainop.averaging import ExponentialMovingAverage
from trainop.loop import Hook, Rollback, StopTraining, TrainResult, train
from trainop.numerics import LOSS_NOT_FINITE_MESSAGE, NOT_FINITE_MESSAGE, SkipNonFiniteSteps
from trainop.summaries import add_gradients_summaries, add_variables_summaries
from trainop.train_op import USE_GLOBAL_STEP, create_train_op, create_train_step
from trainop.transforms import (
    adaptive_gradient_clipping,
    adaptive_gradient_clipping_fn,
    add_gradient_noise,
    add_gradient_noise_fn,
    chain,
    clip_by_global_norm,
    clip_by_global_norm_fn,
    clip_by_value,
    clip_by_value_fn,
    clip_gradient_norms,
    clip_gradient_norms_fn,
    global_norm,
    gradient_centralization,
    gradient_centralization_fn,
    multiply_gradients,
    multiply_gradients_fn,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # `trainop.keras`, imported when first used: a tf_keras program need not have Keras 3.
    if name == "keras":
        import importlib

        return importlib.import_module("trainop.keras")
    raise AttributeError(f"module 'trainop' has no attribute {name!r}")


__all__ = [
    "LOSS_NOT_FINITE_MESSAGE",
    "NOT_FINITE_MESSAGE",
    "ExponentialMovingAverage",
    "Hook",
    "Rollback",
    "SkipNonFiniteSteps",
    "StepMetrics",
    "StopTraining",
    "TrainResult",
    "USE_GLOBAL_STEP",
    "adaptive_gradient_clipping",
    "adaptive_gradient_clipping_fn",
    "add_gradient_noise",
    "add_gradient_noise_fn",
    "add_gradients_summaries",
    "add_variables_summaries",
    "chain",
    "clip_by_global_norm",
    "clip_by_global_norm_fn",
    "clip_by_value",
    "clip_by_value_fn",
    "clip_gradient_norms",
    "clip_gradient_norms_fn",
    "create_train_op",
    "create_train_step",
    "global_norm",
    "gradient_centralization",
    "gradient_centralization_fn",
    "multiply_gradients",
    "multiply_gradients_fn",
    "train",
]
