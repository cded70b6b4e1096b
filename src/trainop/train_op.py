"""`create_train_op` and `create_train_step`: the public functions, their documentation, and
the dispatch to a front-end.

* Graph front-end (`_graph`): `total_loss` is a `Tensor` of a `tf.compat.v1` graph (or of a
  `tf.function` being traced); the step is added to that graph and the loss tensor that runs it
  is returned.
* Eager front-end (`_eager`): `total_loss` is a callable; "call the loss, then build the step"
  is wrapped in one `tf.function` (across replicas by `_distribute`, in a loop or under XLA by
  `_compile`), which is returned. `create_train_step`, which runs one step per call on what the
  loss reads then, calls the loss eagerly and compiles only the step after the gradients.

The arguments are checked and resolved by `_config`; the step itself is `_core.build_step`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from trainop import (
    _config,
    _core,
    _eager,
    _graph,
    averaging,
    numerics,
)
from trainop._checks import check_count

# `trainop.USE_GLOBAL_STEP` (0, TF-Agents' and TF-Slim's `_USE_GLOBAL_STEP`): the default
# `global_step`, meaning the program's global step, created if there is none.
from trainop._global_step import USE_GLOBAL_STEP

logger = logging.getLogger("trainop")

# The arguments that `create_train_op` and `create_train_step` share, described once. Each
# function's docstring has an `Args:` entry `name: {name}` for them, which `_with_shared_args`
# fills in when the module is imported: `help()`, `inspect.getdoc` and the doctests then show
# both functions' arguments in full, and the two descriptions cannot drift apart. What applies
# to one function only follows on the entry's next lines.
_SHARED_ARGS = {
    "optimizer": """
        a `tf.compat.v1.train.Optimizer`, a Keras 3 optimizer or a `tf_keras` (Keras 2) one.
        A Keras 3 `LossScaleOptimizer` scales the loss, and the gradients are unscaled before
        the numerics guard and `transform_grads_fn` see them; a `tf_keras` `LossScaleOptimizer`
        and a Keras optimizer with `gradient_accumulation_steps` are refused. A Keras optimizer
        that has already been built must have been built for the variables it is to train.""",
    "global_step": """
        the integer `tf.Variable` incremented once per applied update (a skipped step does
        not count). `USE_GLOBAL_STEP` (the default) means
        the program's global step, `tf.compat.v1.train.get_or_create_global_step()`, created
        if there is none; None means no step is counted. The optimizer's own `iterations` may
        be passed: it is then not counted twice. The summaries are written at this step, read
        before the update (with None: at the optimizer's `iterations`, else at
        `tf.summary.experimental.get_step()`).""",
    "update_ops": """
        graph mode: ops or tensors that run before the loss is returned, by default the
        `UPDATE_OPS` collection (batch normalization's moving statistics), as in TF-Slim; a
        list that leaves some of the collection's ops out logs a warning naming them. Eager
        mode: a zero-argument callable or a list of them, run inside the step after the
        numerics check and before the update (a skipped step runs none of them).""",
    "variables_to_train": """
        the variables to train (each must be trainable; one listed twice is trained once), or
        a zero-argument callable returning them. None means all trainable variables of the
        graph (graph mode) or the trainable variables the loss reads (eager mode; those of a
        Keras layer set `trainable = False` are left out).""",
    "transform_grads_fn": """
        a callable that maps the list of (gradient, variable) pairs to a new list of the same
        variables, each gradient of its variable's shape and dtype, before the update: a
        clip, a multiplier, or several in `trainop.chain`. A None gradient leaves its variable
        unchanged for this step. It sees the gradients unscaled (with a `LossScaleOptimizer`);
        with `check_numerics='skip'` the guard checks the gradients it returns.""",
    "summarize_gradients": """
        whether to write a histogram and the norm of each gradient, after
        `transform_grads_fn`, tagged as `add_gradients_summaries` tags them: to the default
        `tf.summary` writer at the summary step (see `global_step`) or, in a `tf.compat.v1`
        graph with no writer, as TF1 summaries in the `SUMMARIES` collection, as TF-Slim
        does.""",
    "gate_gradients": """
        how far the gradient computation is serialized, as for
        `tf.compat.v1.train.Optimizer.compute_gradients`: `GATE_NONE` (0), `GATE_OP` (1, the
        default: an op's gradients are all computed before they are used) or `GATE_GRAPH` (2:
        no gradient is used before all of them are computed). An `int`, exactly.""",
    "aggregation_method": """
        how the gradient terms of one tensor are summed, as for `tf.gradients`: a
        `tf.AggregationMethod` value (`ADD_N`, `EXPERIMENTAL_TREE`,
        `EXPERIMENTAL_ACCUMULATE_N`), or None for TensorFlow's default.""",
    "check_numerics": """
        what a step whose loss or gradients hold inf or NaN does. True (the default, as in
        TF-Slim and TF-Agents): an inf or NaN loss raises `tf.errors.InvalidArgumentError`
        (`LOSS_NOT_FINITE_MESSAGE`) when the step runs, before anything changes. False: no
        check. 'skip' or a `trainop.SkipNonFiniteSteps(max_consecutive=...)`: a step whose
        loss or any gradient is inf or NaN changes nothing and is counted; more than
        `max_consecutive` (by default 10) such steps in a row raise. 'skip' makes one guard
        per optimizer and program: pass your own `SkipNonFiniteSteps` to read its
        `skipped_steps` counter.""",
    "missing_gradients": """
        what a variable to train that gets no gradient from the loss does: 'log' (the
        default) names it once on the `trainop` logger and trains the others; 'raise' raises
        a ValueError naming all of them when the step is built.""",
    "summarize_every_n_steps": """
        write the `tf.summary` summaries only at summary steps that are multiples of it (0, n,
        2n, ...), and only when `tf.summary.record_if` allows; None (the default): whenever
        `tf.summary.record_if` allows. The steps that do not write compute none of them.""",
    "learning_rate_multipliers": """
        a dict (or a list of pairs) from variables (or `v.ref()`), variable names or
        compiled regular expressions over names, keyed as `multiply_gradients` keys its
        multipliers, to the factor of their learning rate: a number >= 0, or a scalar float
        `tf.Variable` read at every step. A chosen variable's update is scaled by its factor
        after the optimizer made it (its constraint applied again), which for every
        TensorFlow and Keras optimizer is the update at that multiple of the learning rate,
        adaptive ones included, where multiplying the gradient changes nothing; the
        optimizer's slots move as without it. None (the default): every variable at the
        optimizer's rate.""",
    "moving_average": """
        a `trainop.ExponentialMovingAverage`, which then averages every variable to train
        after each update the optimizer applies (not after a skipped step), for every
        optimizer family; its `swap_weights()` puts the averages in the variables for
        evaluation or export. Put it in the checkpoint beside the model. None (the default):
        no average.""",
    "step_metrics": """
        keep the last step's numbers on the device, in `train_op.step_metrics` (a
        `trainop.StepMetrics`): the global gradient norm before and after
        `transform_grads_fn`, whether the update was applied, and the skip guard's counts.
        The step only writes them; the caller reads them when it likes (`trainop.train`'s
        progress bar shows them). False (the default): no `step_metrics` (None).""",
}


def _with_shared_args(function: Callable[..., Any]) -> Callable[..., Any]:
    """Writes the `_SHARED_ARGS` descriptions into `function`'s docstring, at each `Args:` entry
    that reads `name: {name}`, wrapped to the docstring's width; returns `function` itself, its
    signature unchanged."""
    if function.__doc__ is None:  # `python -OO` drops docstrings.
        return function

    def describe(entry: re.Match) -> str:
        indent, name = entry.group(1), entry.group(2)
        return textwrap.fill(
            " ".join(_SHARED_ARGS[name].split()),
            width=100,
            initial_indent=f"{indent}{name}: ",
            subsequent_indent=indent + "  ",
            break_long_words=False,
            break_on_hyphens=False,
        )

    function.__doc__ = re.sub(r"(?m)^( *)(\w+): \{\2\}$", describe, function.__doc__)
    return function


@_with_shared_args
def create_train_op(
    total_loss: tf.Tensor | Callable[..., tf.Tensor],
    optimizer: Any,
    global_step: Any = USE_GLOBAL_STEP,
    update_ops: Sequence[Any] | None = None,
    variables_to_train: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    transform_grads_fn: Callable[[list], list] | None = None,
    summarize_gradients: bool = False,
    gate_gradients: int = tf.compat.v1.train.Optimizer.GATE_OP,
    aggregation_method: int | None = None,
    check_numerics: bool | str | numerics.SkipNonFiniteSteps = True,
    *,
    colocate_gradients_with_ops: bool = False,
    missing_gradients: str = "log",
    summarize_every_n_steps: int | None = None,
    jit_compile: bool = False,
    steps_per_call: int = 1,
    accumulation_steps: int = 1,
    learning_rate_multipliers: Mapping[Any, Any] | Sequence[tuple[Any, Any]] | None = None,
    moving_average: averaging.ExponentialMovingAverage | None = None,
    step_metrics: bool = False,
) -> tf.Tensor | Callable[..., tf.Tensor]:
    """Creates the training step: gradients, transforms, numerics check, update, global step.

    The signature is TF-Agents' `create_train_op` (and TF-Slim's, `colocate_gradients_with_ops`
    being accepted as a keyword), so that their programs switch with one changed import.

    In a `tf.compat.v1` graph, `total_loss` is a `Tensor` and the result is a `Tensor` that, when
    evaluated, runs the update ops, computes the gradients, applies them, increments the global
    step and returns the loss (the train op is also added to the `TRAIN_OP` collection, where
    TF-Slim's loop finds it). In eager mode (TensorFlow 2's default), `total_loss` is a callable
    and the result is a `tf.function` `train_op(*args, **kwargs)` that passes its arguments to
    `total_loss` and runs one whole step per call; it traces once for inputs of one shape. What
    the loss reads other than through its arguments (a NumPy array, a Python number) is taken
    as a constant when the step is traced: pass the batch as arguments.

    With `check_numerics`, an inf or NaN loss raises `tf.errors.InvalidArgumentError` ("LossTensor
    is inf or nan") before anything changes: the variables, the optimizer's slots and iteration
    counter and the global step keep their values. With `check_numerics="skip"` (or a
    `SkipNonFiniteSteps`), a step whose loss or any gradient is inf or NaN is skipped instead,
    with the same guarantee, and counted. What the forward pass writes itself (Keras
    BatchNormalization's moving statistics, graph update ops) is outside that guarantee.

    In eager mode inside a `tf.distribute` strategy's scope, the train op runs the step on every
    replica with `strategy.run` and weights each replica's loss by its share of the global batch
    (its number of examples, the first dimension of the first argument given per replica, over
    their sum), so that the optimizer's sum of the gradients and the returned sum of the losses
    are one device's on the whole batch, however it was split. The loss is written as for one
    device: Keras 3's loss objects, `tf.nn.compute_average_loss` and
    `tf.nn.scale_regularization_loss` do not divide by the number of replicas while the train op
    calls it, and `tf.nn.compute_average_loss(..., global_batch_size=G)` counts as it is (the
    README has the rule for each way of writing a loss). The skip
    guard and a `LossScaleOptimizer` then skip a step on every replica when any replica's loss or
    gradients are not finite; `transform_grads_fn`, the summaries and accumulation see the sum
    of the replicas' gradients (see the README for what that costs). `variables_to_train` must
    then be a list, and `global_step` a variable created in the strategy's scope.

    With a default `tf.summary` writer set when the step is built (traced), the step writes
    `train/loss`, `train/global_gradient_norm` (of the gradients before `transform_grads_fn`)
    and `train/learning_rate` at the global step (read before the update), on the steps that
    `tf.summary.record_if` and `summarize_every_n_steps` select; the other steps compute none of
    it.

    Args:
      total_loss: graph mode: a scalar floating-point `Tensor` (a zero-argument callable is
        called once, to make it). Eager mode: a callable returning one, called with the train
        op's arguments. In both, it may instead be the pair `(loss_sum, count)`: the sum of the
        batch's losses and what it is over (examples, unmasked tokens; a real scalar), of which
        the step minimizes the quotient (0 for a count of 0), and which weighs the call in an
        accumulation window (see `accumulation_steps`; not under a `tf.distribute` strategy).
      optimizer: {optimizer}
      global_step: {global_step}
      update_ops: {update_ops}
      variables_to_train: {variables_to_train}
        Eager mode: a list is checked when the train op is built, a callable is called when
        the step is traced.
      transform_grads_fn: {transform_grads_fn}
        With `accumulation_steps`, it sees the mean gradients. Eager mode: it is called when
        the step is traced, and the ops it makes run at every step.
      summarize_gradients: {summarize_gradients}
      gate_gradients: {gate_gradients}
      aggregation_method: {aggregation_method}
      check_numerics: {check_numerics}
      colocate_gradients_with_ops: accepted for TF-Slim's programs, and ignored: TensorFlow 2's
        `tf.gradients` always colocates the gradients with their ops.
      missing_gradients: {missing_gradients}
      summarize_every_n_steps: {summarize_every_n_steps}
      jit_compile: eager mode: compile the whole step with XLA (`tf.function(jit_compile=
        True)`). An op without an XLA kernel raises a ValueError on the first call; summaries
        cannot be compiled. `check_numerics` still holds: a bad step changes nothing and the
        call raises once the compiled function returns.
      steps_per_call: eager mode: run this many steps per call, in one compiled loop, so that
        a small model stops paying Python's per-call cost (as Keras's `steps_per_execution`).
        Every tensor argument then holds that many batches along a new first axis (under a
        `tf.distribute` strategy, each replica's share does), and the call returns the steps'
        losses as a vector.
      accumulation_steps: sum the gradients of this many calls and apply their mean once, as
        Keras's `gradient_accumulation_steps` and optax's `MultiSteps` do. With a loss averaged
        over its batch each call weighs the same: the update of one step on the batch that
        many times larger when the calls hold as many examples. A loss given as `(loss_sum,
        count)` weighs each call by its count, and the window's sum is divided once by the
        window's total count: one step on the concatenated batch, whatever each call holds
        (examples, unmasked tokens). Each call returns its own (mean) loss.
        `transform_grads_fn`, the summaries and the update ops see the mean; the global step
        counts applied updates. A call the numerics guard skips, or whose gradients overflow
        a loss-scale optimizer (which then lowers its scale), adds nothing and the window
        goes on. The sums are the train op's `accumulator`, a `tf.Module` that `trainop.train`
        checkpoints.
      learning_rate_multipliers: {learning_rate_multipliers}
      moving_average: {moving_average}
      step_metrics: {step_metrics}

    Returns:
      Graph mode: the loss `Tensor` (float, scalar) whose evaluation runs the step and returns
      the loss computed before the update. Eager mode: the step, a callable that passes its
      arguments to `total_loss`, runs one step (`steps_per_call` steps) and returns the loss
      computed before the update (a vector of `steps_per_call` losses); it also has the
      `tf.function`'s methods (`get_concrete_function`, `experimental_get_tracing_count`).
      In both modes it has two attributes: `accumulator`, with `accumulation_steps`, the
      `tf.Module` of the window's sums (which `trainop.train` checkpoints; its
      `pending_calls()`, `apply_partial_window()` and `drop_partial_window()` serve a custom
      loop), else None; and `step_metrics`, a `trainop.StepMetrics` with `step_metrics=True`,
      else None.

    Raises:
      TypeError: when the train op is built: `total_loss` is a Tensor in eager mode or not a
        Tensor in graph mode; `optimizer` is of no known family, a `tf_keras`
        `LossScaleOptimizer`, or accumulates gradients itself; `global_step` is not an integer
        variable, `USE_GLOBAL_STEP` or None; `transform_grads_fn` is not callable; a key or
        factor of `learning_rate_multipliers` is of the wrong type; `moving_average` is not an
        `ExponentialMovingAverage`; `step_metrics` is not a bool;
        `update_ops` are not ops (graph mode) or callables (eager mode); `variables_to_train`
        holds something other than variables; `check_numerics` or `jit_compile` has the wrong
        type. When the step is built (graph mode) or first traced (eager mode): the loss is not
        a floating-point tensor, or `transform_grads_fn` does not return a list of pairs.
      ValueError: when the train op is built: `gate_gradients`, `aggregation_method`,
        `check_numerics` (a string other than 'skip'), `missing_gradients`,
        `summarize_every_n_steps`, `steps_per_call` or `accumulation_steps` is not one of its
        values; `learning_rate_multipliers` is empty or holds a negative or NaN factor; a
        `SyncReplicasOptimizer` comes with `learning_rate_multipliers`, `moving_average` or
        `step_metrics`; `jit_compile` or `steps_per_call` is given in graph mode; `total_loss` is a
        Tensor inside a `tf.distribute` strategy's scope; `variables_to_train` is empty, holds
        a variable that is not trainable, or (under a strategy) is not a list; there is no
        trainable variable (graph mode); `global_step` was made outside the strategy's scope.
        When the step is built (graph mode) or first traced (eager mode): the loss is not a
        scalar; it reads no trainable variable, gives no gradient to any variable to train, or
        none to some with `missing_gradients='raise'`; `transform_grads_fn` returns other
        variables, a gradient that does not fit its variable, or no gradient at all; a Keras
        optimizer built for other variables; summaries that need a step find none; a
        `SkipNonFiniteSteps` made in another graph; `jit_compile=True` with a default
        `tf.summary` writer; a tensor argument that does not hold `steps_per_call` batches;
        under a strategy of several replicas, a loss given no argument with a first dimension
        to read the replicas' shares from, a `tf.compat.v1` optimizer that overrides
        `compute_gradients`, or a skip guard or accumulation in a train op built inside
        `strategy.run`. On the first call with `jit_compile=True`: an op that XLA cannot
        compile.
      tf.errors.InvalidArgumentError: raised by the train op when a step runs (graph mode: by
        `Session.run`), with nothing changed: with `check_numerics=True`, the loss is inf or
        NaN (`LOSS_NOT_FINITE_MESSAGE`); with a `SkipNonFiniteSteps`, a step is bad after
        `max_consecutive` skipped in a row (`NOT_FINITE_MESSAGE`).

    Example:
      >>> import keras, tensorflow as tf, trainop
      >>> w = tf.Variable(1.0)
      >>> train_op = trainop.create_train_op(lambda x: (w * x - 2.0) ** 2,
      ...                                    keras.optimizers.SGD(0.1), global_step=None)
      >>> float(train_op(tf.constant(1.0)))  # the loss before the update
      1.0
      >>> round(float(w.numpy()), 6)  # w - 0.1 * 2 * (w - 2)
      1.2

      In a `tf.compat.v1` graph, as a TF-Slim program runs it:

      >>> with tf.Graph().as_default():
      ...     v = tf.Variable(1.0)
      ...     sgd = tf.compat.v1.train.GradientDescentOptimizer(0.1)
      ...     loss = trainop.create_train_op((v - 2.0) ** 2, sgd)
      ...     with tf.compat.v1.Session() as session:
      ...         session.run(tf.compat.v1.global_variables_initializer())
      ...         print(session.run(loss), session.run(v))
      1.0 1.2
    """
    del colocate_gradients_with_ops  # Ignored by tf.gradients since TensorFlow 2.
    if not tf.executing_eagerly():
        _config.refuse_replicas()
    if not isinstance(jit_compile, (bool, np.bool_)):
        raise TypeError(f"`jit_compile` must be True or False. Received: {jit_compile!r}")
    check_count("steps_per_call", steps_per_call)
    config = _config.resolve(
        optimizer,
        global_step,
        transform_grads_fn,
        summarize_gradients,
        gate_gradients,
        aggregation_method,
        check_numerics,
        missing_gradients,
        summarize_every_n_steps,
        accumulation_steps,
        learning_rate_multipliers=learning_rate_multipliers,
        moving_average=moving_average,
        step_metrics=step_metrics,
    )
    if tf.executing_eagerly():
        if jit_compile and config.check_numerics is True and not tf.distribute.has_strategy():
            config = dataclasses.replace(config, check_numerics=numerics.LossCheckUnderXLA())
        if not _config.is_loss_callable(total_loss):
            raise TypeError(
                "`total_loss` must be a callable that returns the loss in eager mode (a Tensor "
                "is a value already computed, with no gradient to take): pass "
                "`lambda: loss_fn(...)` or the loss function itself. "
                f"Received: total_loss of type {type(total_loss).__name__}"
            )
        train_op = _eager.create_eager_train_op(
            total_loss,
            config,
            update_ops,
            variables_to_train,
            jit_compile=bool(jit_compile),
            steps_per_call=int(steps_per_call),
        )
        train_op.accumulator = config.accumulator
        train_op.step_metrics = config.step_metrics
        return train_op
    if jit_compile or steps_per_call != 1:
        raise ValueError(
            "`jit_compile` and `steps_per_call` apply to the eager train op: in a "
            "tf.compat.v1 graph, the Session runs the graph it is given."
        )
    if _config.is_loss_callable(total_loss):
        total_loss = total_loss()
    total_loss, count = _core.counted_loss(total_loss)
    if not isinstance(total_loss, tf.Tensor):
        raise TypeError(
            "`total_loss` must be a scalar loss Tensor (or a pair (loss_sum, count)) in graph "
            f"mode. Received: total_loss of type {type(total_loss).__name__}"
        )
    train_op = _graph.create_graph_train_op(
        total_loss, config, update_ops, variables_to_train, count
    )
    train_op.accumulator = config.accumulator
    train_op.step_metrics = config.step_metrics
    return train_op


@_with_shared_args
def create_train_step(
    loss: Any,
    optimizer: Any,
    global_step: Any = USE_GLOBAL_STEP,
    total_loss_fn: Callable[[Any], tf.Tensor] | None = None,
    update_ops: Sequence[Any] | None = None,
    variables_to_train: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    transform_grads_fn: Callable[[list], list] | None = None,
    summarize_gradients: bool = False,
    gate_gradients: int = tf.compat.v1.train.Optimizer.GATE_OP,
    aggregation_method: int | None = None,
    check_numerics: bool | str | numerics.SkipNonFiniteSteps = True,
    *,
    missing_gradients: str = "log",
    summarize_every_n_steps: int | None = None,
    learning_rate_multipliers: Mapping[Any, Any] | Sequence[tuple[Any, Any]] | None = None,
    moving_average: averaging.ExponentialMovingAverage | None = None,
) -> Any:
    """Trains on a possibly nested loss structure, as TF-Agents' `create_train_step`.

    `total_loss_fn` picks from the loss structure the scalar to minimize; the whole structure is
    returned. In graph mode it returns the loss structure, to be evaluated after the update has
    run: the step is `create_train_op`'s, built on `total_loss_fn(loss)`.

    In eager mode this runs one step now, as TF-Agents' code does: it calls `loss()`, applies
    the gradients and returns the loss structure computed before the update. Every call trains
    on what the loss reads *now*: `loss()`, `total_loss_fn`, `variables_to_train` (a callable)
    and `transform_grads_fn` run eagerly on every call, and the gradients come from a
    `tf.GradientTape`, as in TF-Agents (`gate_gradients` and `aggregation_method`, which order
    and sum a graph's gradient ops, do not apply there). A compiled loss would be replayed: a
    trace takes in a NumPy batch, an eager tensor or a Python value that the loss reads (a
    global or closure variable rebound every step, a `Future`'s arguments, an attribute) as a
    constant, and trainop cannot tell, from the callable, whether the next call would read the
    same. What follows the gradients is compiled and reused, since its inputs are the loss and
    the gradients themselves: the numerics guard, summaries, update and global step, traced
    once per optimizer, settings, set of variables and `tf.summary` writer and recording
    condition (and `tf.summary.experimental.get_step()`, when there is neither a global step nor
    an optimizer counter to write at). With `update_ops` (the caller's code, traced into that
    part) it is traced afresh on every call. The optimizer's hyperparameters are read as the
    trace read them: assign to a Keras optimizer's `learning_rate` (a variable) to change it.
    Since `transform_grads_fn` runs before the numerics guard decides, a transform that keeps
    state of its own (a running norm) updates it on a skipped step too; `create_train_op` runs
    it inside the guarded step.

    For a step compiled whole, loss included, pass the batch as an argument:
    `train_op = create_train_op(lambda x, y: loss_fn(x, y), optimizer)`, then `train_op(x, y)`
    per step, traces once for batches of one shape and reads them on every call.

    Args:
      loss: graph mode: a (possibly nested) structure of loss tensors, or a zero-argument
        callable returning one (called once). Eager mode: a zero-argument callable returning
        one, called on every call.
      optimizer: {optimizer}
      global_step: {global_step}
      total_loss_fn: maps the loss structure to the scalar floating-point tensor to minimize
        (as TF-Agents' `total_loss_fn`, e.g. `lambda loss_info: loss_info.loss`); by default
        the loss itself, which must then be that scalar.
      update_ops: {update_ops}
        TF-Agents ignores them in eager mode; trainop runs them.
      variables_to_train: {variables_to_train}
        Eager mode: a callable is called on every call.
      transform_grads_fn: {transform_grads_fn}
        Eager mode: it runs eagerly on every call, before the numerics guard decides.
      summarize_gradients: {summarize_gradients}
      gate_gradients: {gate_gradients}
        Eager mode: checked, and unused (the gradients come from a `tf.GradientTape`).
      aggregation_method: {aggregation_method}
        Eager mode: checked, and unused.
      check_numerics: {check_numerics}
      missing_gradients: {missing_gradients}
      summarize_every_n_steps: {summarize_every_n_steps}
      learning_rate_multipliers: {learning_rate_multipliers}
      moving_average: {moving_average}

    Returns:
      Eager mode: the loss structure of this step, computed before the update. Graph mode: the
      loss structure as tensors (the same structure, each tensor renamed `loss_post_train`)
      that, when evaluated, run the step and hold the losses computed before the update.

    Raises:
      ValueError: `total_loss_fn` is not callable, or `loss` is not callable in eager mode
        (both ValueError, as in TF-Agents); called inside a `tf.distribute` strategy's scope;
        in eager mode, `optimizer` overrides `compute_gradients` (which a `tf.GradientTape`
        would bypass: use `create_train_op`); or an argument it shares with
        `create_train_op`, the loss, the gradients or `transform_grads_fn`'s result is bad as
        `create_train_op` raises for (graph mode: when the step is built; eager mode: on the
        call, before anything runs for the settings, after `loss()` for the rest).
      TypeError: an argument it shares with `create_train_op` has the wrong type, the loss
        that `total_loss_fn` picks is not a floating-point tensor, or `transform_grads_fn`
        does not return a list of pairs, as for `create_train_op`.
      tf.errors.InvalidArgumentError: the step's loss is inf or NaN with
        `check_numerics=True`, or a step is bad after `max_consecutive` skipped in a row with
        a `SkipNonFiniteSteps`, as for `create_train_op`: in eager mode raised by this call,
        in graph mode when the returned tensors are evaluated. Nothing has changed.

    Example:
      >>> import tensorflow as tf, trainop
      >>> w = tf.Variable(3.0)
      >>> sgd = tf.compat.v1.train.GradientDescentOptimizer(0.5)
      >>> losses = lambda: (w * w, 2.0 * w)
      >>> first, second = trainop.create_train_step(losses, sgd, global_step=None,
      ...                                           total_loss_fn=lambda l: l[0])
      >>> float(first), float(second), float(w.numpy())
      (9.0, 6.0, 0.0)
    """
    if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
        raise ValueError(
            "create_train_step is not supported inside a tf.distribute strategy's scope yet: "
            "use create_train_op with a callable loss, which runs it on every replica."
        )
    if total_loss_fn is None:
        total_loss_fn = _eager.identity
    if not callable(total_loss_fn):
        # ValueError, as TF-Agents raises.
        raise ValueError(f"`total_loss_fn` must be a callable. Received: {total_loss_fn!r:.200}")

    # What both halves pass on, as create_train_op takes it.
    step_settings = dict(
        global_step=global_step,
        update_ops=update_ops,
        variables_to_train=variables_to_train,
        transform_grads_fn=transform_grads_fn,
        summarize_gradients=summarize_gradients,
        gate_gradients=gate_gradients,
        aggregation_method=aggregation_method,
        check_numerics=check_numerics,
        missing_gradients=missing_gradients,
        summarize_every_n_steps=summarize_every_n_steps,
        learning_rate_multipliers=learning_rate_multipliers,
        moving_average=moving_average,
    )
    if not tf.executing_eagerly():
        if _config.is_loss_callable(loss):
            loss = loss()
        if callable(variables_to_train):
            step_settings["variables_to_train"] = variables_to_train()
        # The losses are computed first, the step is built on them, and they are returned
        # once the step has run.
        with tf.control_dependencies(tf.nest.flatten(loss)):
            loss = tf.nest.map_structure(lambda t: tf.identity(t, "loss_pre_train"), loss)
        total_loss = total_loss_fn(loss)
        if not isinstance(total_loss, tf.Tensor):
            # Not a (loss_sum, count) pair here: a loss structure is picked by total_loss_fn.
            _config.check_loss_tensor(total_loss, through_total_loss_fn=True)
        train_op = create_train_op(total_loss, optimizer, **step_settings)
        with tf.control_dependencies([train_op]):
            return tf.nest.map_structure(lambda t: tf.identity(t, "loss_post_train"), loss)

    return _eager.run_train_step(loss, optimizer, total_loss_fn=total_loss_fn, **step_settings)
