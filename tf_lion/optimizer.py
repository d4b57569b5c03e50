"""`tf_lion.Lion`: the Keras wiring around the update rules in `update.py`.

This class resolves hyperparameters, creates slots, validates inputs, spreads
the work over `tf.distribute` replicas and speaks Keras's optimizer contract.
The math is in `tf_lion.update`; nothing here writes the formula.
"""

import numbers
import warnings
import weakref

import numpy as np
import tensorflow as tf
import tf_keras
from tensorflow.python.distribute import ps_values
from tensorflow.python.distribute import sharded_variable
from tensorflow.python.saved_model import save_context
from tf_keras.src.optimizers import optimizer as keras_optimizer
from tf_keras.src.optimizers import utils as optimizer_utils
from tf_keras.src.optimizers.schedules import learning_rate_schedule

from tf_lion import distribute as distribute_lib
from tf_lion import keras_compat
from tf_lion import slots as slots_lib
from tf_lion import step as step_lib
from tf_lion import update as update_lib

__all__ = ["Lion", "SPARSE_MODES"]

keras_compat.install()  # LossScaleOptimizer(Lion(...)) checkpoints the momentum

SPARSE_MODES = ("exact", "lazy")
_Schedule = learning_rate_schedule.LearningRateSchedule


def _is_plain_callable(value):
    """A zero-argument callable hyperparameter (not a schedule or variable)."""
    return callable(value) and not isinstance(value, (tf.Variable, tf.Tensor, _Schedule))


def _check_hyperparameter(name, value, low, high=None):
    """ValueError naming `name` unless `value` is in [low, high].

    Callables and learning-rate schedules are evaluated at every step and are
    not checked here; symbolic tensors cannot be read at construction and are
    not either. Only `learning_rate` may be a schedule.
    """
    if isinstance(value, _Schedule) and name != "learning_rate":
        raise ValueError(
            f"`{name}` cannot be a `LearningRateSchedule` (only `learning_rate` can); pass a "
            f"float, a scalar tensor or variable, or a zero-argument callable. "
            f"Received: {name}={value!r}")
    if _is_plain_callable(value) or isinstance(value, _Schedule):
        return
    if isinstance(value, (str, bytes)):  # float("0.1") would pass, and fail at the first step
        raise ValueError(
            f"`{name}` must be a float, a scalar tensor or variable, or a callable. "
            f"Received: {name}={value!r}")
    if isinstance(value, (tf.Variable, tf.Tensor)):
        if isinstance(value, tf.Tensor) and not hasattr(value, "numpy"):
            return
        number = value.numpy()
    else:
        number = value
    try:
        number = float(np.asarray(number).item())
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a float, a scalar tensor or variable, or a callable. "
            f"Received: {name}={value!r}"
        ) from None
    upper = "" if high is None else f" and <= {high}"
    if not (np.isfinite(number) and number >= low and (high is None or number <= high)):
        raise ValueError(
            f"`{name}` must be finite, >= {low}{upper}. Received: {name}={value!r}")


def _python_number(value):
    """A NumPy scalar as the Python number it holds; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _as_momentum_dtype(momentum_dtype):
    if momentum_dtype is None:
        return None
    try:
        dtype = tf.as_dtype(momentum_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not dtype.is_floating:
        raise ValueError(
            "`momentum_dtype` must be None or a floating dtype such as 'float32' or "
            f"'bfloat16'. Received: momentum_dtype={momentum_dtype!r}"
        )
    return dtype


def _true_dtype(variable):
    """A variable's storage dtype (mixed-precision AutoCastVariables report their cast one)."""
    return tf.as_dtype(getattr(variable, "true_dtype", variable.dtype))


def _shards(variables):
    """`variables` with each `ShardedVariable` replaced by its shards, unwrapped."""
    for variable in variables:
        if isinstance(variable, sharded_variable.ShardedVariable):
            yield from (_unwrap(shard) for shard in variable.variables)
        else:
            yield _unwrap(variable)


def _unwrap(variable):
    """The plain variable behind a mixed-precision AutoCastVariable."""
    from tf_keras.src.mixed_precision import autocast_variable

    if isinstance(variable, autocast_variable.AutoCastVariable):
        return variable._variable
    return variable


_TF_KERAS_MOMENTA = (
    "Optimizer '{name}': the checkpoint being restored holds the momenta of a tf-keras "
    "optimizer (a 'momentums' list: tf_keras.optimizers.Lion, or SGD), which tf.train.Checkpoint "
    "cannot restore into tf_lion's per-variable slots: they are NOT restored, and the momentum "
    "of the restored variables starts at zero. To resume a tf-keras Lion's momenta, restore it "
    "with tf_lion.checkpoint.restore_from_tf_keras_lion(path, model, optimizer) (or convert it "
    "once with convert_tf_keras_lion_checkpoint).")


def _can_create_slots_now():
    """Whether a checkpoint restore may create slots at once (under
    `tf.init_scope()`, as `build` does): outside a replica context, in a
    program whose outermost context is eager. A deferred restore can reach
    the optimizer while Keras builds a model in a graph of its own
    (`model.build(shape)`), or inside a traced step that creates variables."""
    if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
        return False
    with tf.init_scope():
        return tf.executing_eagerly()


def _assign_everywhere(variable, value):
    """Assigns `value` to every local copy of `variable`.

    The slot values of a Keras file can wait for the first step, whose
    `build` runs in a replica's context: there, assigning a mirrored variable
    would change that replica's copy only.
    """
    strategy = getattr(variable, "_distribute_strategy", None)
    components = strategy.experimental_local_results(variable) if strategy else (variable,)
    for component in components:
        # A central-storage/parameter-server variable is one variable behind
        # a wrapper that refuses assignments in a replica's context.
        if isinstance(component, ps_values.AggregatingVariable):
            component = component._v  # pylint: disable=protected-access
        component.assign(value)


_FRESH_SLOT = {
    "m": "momentum starts at zero",
    "average": "EMA average starts at the restored weights",
    "accumulator": "gradient accumulator starts at zero",
    "touched": "row mask of the accumulation window starts from the restored accumulator's "
               "non-zero rows",
}


_MASKED_ACCUMULATORS = weakref.WeakKeyDictionary()  # checkpoint -> accumulator node ids


def _checkpoint_has_row_mask(slot_position):
    """Whether the checkpoint holding this accumulator slot holds a row mask
    ("touched") for the same variable (slot references live on the
    optimizer's node of the object graph; read once per checkpoint)."""
    checkpoint = slot_position.checkpoint
    masked = _MASKED_ACCUMULATORS.get(checkpoint)
    if masked is None:
        masked = set()
        for node in checkpoint.object_graph_proto.nodes:
            with_mask = {ref.original_variable_node_id for ref in node.slot_variables
                         if ref.slot_name == "touched"}
            masked.update(ref.slot_variable_node_id for ref in node.slot_variables
                          if ref.slot_name == "accumulator"
                          and ref.original_variable_node_id in with_mask)
        _MASKED_ACCUMULATORS[checkpoint] = masked
    return slot_position.proto_id in masked


def _warn_fresh_slots(optimizer_name, without_state):
    """Warns which slots of restored variables start fresh, by slot name."""
    parts = [f"{_FRESH_SLOT[slot]} for {len(names)} variable(s) "
             f"{names[:5]}{' ...' if len(names) > 5 else ''}"
             for slot, names in without_state.items()]
    warnings.warn(
        f"Optimizer '{optimizer_name}': variables were restored from a checkpoint that holds no "
        f"Lion state for some of their slots: {'; '.join(parts)}. To resume that state, restore "
        "the optimizer in the same tf.train.Checkpoint as the model (with the same use_ema and "
        "gradient accumulation settings).",
        stacklevel=3,
    )


def _as_gradient(grad):
    """A gradient given as a NumPy array, a number or a (nested) list, as a tensor.

    Anything else (tensors, `tf.IndexedSlices`, a strategy's per-replica
    values in a cross-replica context) is left as it is.
    """
    if isinstance(grad, (np.ndarray, np.generic, list, tuple, numbers.Number)):
        return tf.convert_to_tensor(grad)
    return grad


def _gradient_checks(distribution, grads_and_vars, variables):
    """`step.gradient_checks` of every gradient, on the devices of its variable.

    Run before any update: eagerly they raise before anything changes; in a
    graph every update and counter depends on them (without that, updates of
    other groups and the step counter ran before the failing check).
    """
    checks = []

    def check(var, grad):
        checks.extend(step_lib.gradient_checks(var, grad))
        # The updates wait for the check ops themselves: a constant made under
        # their control dependency did not hold them back (Grappler drops it).
        return tf.constant(True)

    for (grad, _), var in zip(grads_and_vars, variables):
        local = step_lib.first_local(distribution, grad)  # one replica's: all are checked
        if isinstance(local, tf.IndexedSlices) or isinstance(
                grad, tf.distribute.DistributedValues) or not local.shape.is_fully_defined():
            distribution.extended.update(var, check, args=(grad,), group=False)
    return [] if tf.executing_eagerly() else checks


def _check_defined_shape(variable):
    if not variable.shape.is_fully_defined():
        raise ValueError(
            f"Lion needs variables of fully defined shape (its slots have the variable's "
            f"shape); variable '{variable.name}' has shape {variable.shape}.")


def _check_gradient(grad, variable):
    """Errors that name the variable for gradients that cannot be applied to it.

    What is known when tracing, for each replica's value of per-replica
    values. What is not is checked at run time: by ops in the gradient's own
    path (`step.checked_gradient`: the returned gradient passes them; XLA
    fails on them when it compiles), and on each device by Assert ops
    (`step.gradient_checks`, which also cover per-replica values applied in
    a cross-replica context). Every update and counter of the step waits for
    both. Returns the gradient.
    """
    name = variable.name
    dtype = _true_dtype(variable)
    if not dtype.is_floating:
        raise TypeError(
            f"Lion can only update floating-point variables; variable '{name}' has dtype "
            f"{dtype.name}."
        )
    if grad is None:
        return grad
    _check_defined_shape(variable)
    if isinstance(grad, tf.distribute.DistributedValues):
        for local in grad.values:  # each replica's, whose shapes may differ
            _check_gradient(local, variable)
        return grad
    values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
    if values.dtype != dtype:
        raise TypeError(
            f"The gradient of variable '{name}' has dtype {values.dtype.name}, but the "
            f"variable has dtype {dtype.name}."
        )
    if isinstance(grad, tf.IndexedSlices):
        if variable.shape.rank == 0:
            raise ValueError(f"Variable '{name}' is a scalar and cannot take a sparse gradient.")
        rows_ok = (values.shape[1:].is_compatible_with(variable.shape[1:])
                   and values.shape[:1].is_compatible_with(grad.indices.shape[:1]))
        if not rows_ok or grad.indices.shape.rank not in (None, 1):
            raise ValueError(
                f"The sparse gradient of variable '{name}' has values of shape "
                f"{values.shape.as_list() if values.shape.rank is not None else None} and "
                f"indices of shape {grad.indices.shape}, which do not fit the variable's "
                f"shape {variable.shape.as_list()}."
            )
        if grad.indices.dtype not in (tf.int32, tf.int64):
            raise TypeError(
                f"The sparse gradient of variable '{name}' has indices of dtype "
                f"{grad.indices.dtype.name}; int32 or int64 is required."
            )
    elif not values.shape.is_compatible_with(variable.shape):
        raise ValueError(
            f"The gradient of variable '{name}' has shape {values.shape}, but the variable "
            f"has shape {variable.shape}."
        )
    return step_lib.checked_gradient(variable, grad)


def _check_options(accumulation_steps, loss_scale_factor, skip_nonfinite, stochastic_rounding,
                   seed, jit_compile=True, use_ema=False, clipping=()):
    """ValueError naming the argument for invalid step options."""
    for name, value in clipping:  # 0 is "off", as in tf-keras
        # An infinite norm clips to inf / inf = NaN; an infinite clipvalue is no clipping.
        finite = name != "clipvalue"
        if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Real)
                or np.isnan(value) or value < 0 or (finite and np.isinf(value))):
            raise ValueError(
                f"`{name}` must be None, 0 (no clipping) or a {'finite ' if finite else ''}"
                f"float > 0. Received: {name}={value!r}")
    if accumulation_steps is not None and (
            isinstance(accumulation_steps, bool)
            or not isinstance(accumulation_steps, numbers.Integral)
            or accumulation_steps < 1):
        raise ValueError(
            "`gradient_accumulation_steps` must be None or an int >= 1. Received: "
            f"gradient_accumulation_steps={accumulation_steps!r}")
    if loss_scale_factor is not None and (
            isinstance(loss_scale_factor, bool) or not isinstance(loss_scale_factor, numbers.Real)
            or not np.isfinite(loss_scale_factor) or loss_scale_factor <= 0):
        raise ValueError(
            "`loss_scale_factor` must be None or a finite float > 0. Received: "
            f"loss_scale_factor={loss_scale_factor!r}")
    for name, value in (("skip_nonfinite", skip_nonfinite),
                        ("stochastic_rounding", stochastic_rounding)):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"`{name}` must be True or False. Received: {name}={value!r}")
    # tf-keras takes these as given (configs it saved may hold 0, 1 or None).
    for name, value in (("jit_compile", jit_compile), ("use_ema", use_ema)):
        if not (value is None or isinstance(value, (bool, np.bool_))
                or (isinstance(value, numbers.Integral) and value in (0, 1))):
            raise ValueError(
                f"`{name}` must be True or False (or 0, 1, None). Received: {name}={value!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"`seed` must be None or an int. Received: seed={seed!r}")


@tf_keras.saving.register_keras_serializable(package="tf_lion")
class Lion(keras_optimizer.Optimizer):
    r"""Lion: EvoLved Sign Momentum (Chen et al. 2023).

    For each variable `theta` with momentum `m` and gradient `g`:

        c     = beta_1 * m + (1 - beta_1) * g
        theta = theta - lr * (sign(c) + weight_decay * theta)
        m     = beta_2 * m + (1 - beta_2) * g

    with `sign(0) = 0`; `weight_decay` is multiplied by the (scheduled)
    learning rate. Use a learning rate 3-10x smaller than AdamW's and a weight
    decay 3-10x larger.

    Args:
      learning_rate: float, tensor, `tf.Variable`, zero-argument callable, or
        `LearningRateSchedule`. Defaults to 1e-4.
      beta_1: float, tensor, `tf.Variable` or callable in [0, 1]: the
        interpolation for the update direction. 0 is valid.
      beta_2: float, tensor, `tf.Variable` or callable in [0, 1]: the
        momentum's decay.
      weight_decay: float, tensor, `tf.Variable` or callable >= 0 (decoupled,
        scaled by the learning rate). See `exclude_from_weight_decay`.
      sparse_mode: `"exact"` (sparse gradients give exactly the dense result)
        or `"lazy"` (only the rows present in the gradient change).
      momentum_dtype: dtype to store the momentum in (e.g. `"bfloat16"`), or
        None for the variable's own dtype. Arithmetic runs in >= float32.
      clipnorm, clipvalue, global_clipnorm, use_ema, ema_momentum,
      ema_overwrite_frequency, name: as in every tf-keras optimizer.
      jit_compile: compile the update with XLA, on every device: one program
        per step for each group of up to 16 variables of a device, one for
        each variable of 2^18 elements or more (tf-keras turns XLA off
        without a GPU; tf_lion does not).
      gradient_accumulation_steps: None, or an int N >= 1: gradients are
        averaged over N calls of `apply_gradients`; variables, momentum and
        EMA change on every Nth call only. `iterations` counts every call.
      loss_scale_factor: None or a float > 0: `scale_loss(loss)` multiplies
        the loss by it and `apply_gradients` divides the gradients by it
        before anything else (clipping included).
      skip_nonfinite: if True, a step whose gradients hold NaN or Inf (any
        variable, any replica) changes nothing but `skipped_steps`.
      stochastic_rounding: if True, float16/bfloat16 variables (and momenta)
        are rounded to their dtype stochastically, without bias.
      seed: int, the seed of stochastic rounding (default 0).
      exclude_from_weight_decay_names: None, or a list of patterns: as
        `exclude_from_weight_decay(var_names=...)`, and kept in `get_config`.
    """

    def __init__(
        self,
        learning_rate=1e-4,
        beta_1=0.9,
        beta_2=0.99,
        weight_decay=0.0,
        sparse_mode="exact",
        momentum_dtype=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        jit_compile=True,
        gradient_accumulation_steps=None,
        loss_scale_factor=None,
        skip_nonfinite=False,
        stochastic_rounding=False,
        seed=None,
        name="Lion",
        exclude_from_weight_decay_names=None,
        **kwargs,
    ):
        _check_hyperparameter("learning_rate", learning_rate, 0.0)
        _check_hyperparameter("beta_1", beta_1, 0.0, 1.0)
        _check_hyperparameter("beta_2", beta_2, 0.0, 1.0)
        _check_hyperparameter("weight_decay", 0.0 if weight_decay is None else weight_decay, 0.0)
        if use_ema:
            _check_hyperparameter("ema_momentum", ema_momentum, 0.0, 1.0)
        if sparse_mode not in SPARSE_MODES:
            raise ValueError(
                f"`sparse_mode` must be one of {SPARSE_MODES}. Received: sparse_mode={sparse_mode!r}"
            )
        self._momentum_dtype = _as_momentum_dtype(momentum_dtype)
        _check_options(gradient_accumulation_steps, loss_scale_factor, skip_nonfinite,
                       stochastic_rounding, seed, jit_compile, use_ema,
                       clipping=(("clipnorm", clipnorm), ("clipvalue", clipvalue),
                                 ("global_clipnorm", global_clipnorm)))
        super().__init__(
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=bool(use_ema),
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            jit_compile=jit_compile,
            **kwargs,
        )
        # tf-keras turns XLA off unless a GPU is visible; we honour the flag.
        self.jit_compile = bool(jit_compile)
        self._learning_rate = self._build_learning_rate(learning_rate)
        # NumPy scalars become Python numbers: the step treats fixed numbers
        # as Python constants (`_momentum_first`, the accumulation count).
        self.beta_1 = _python_number(beta_1)
        self.beta_2 = _python_number(beta_2)
        self.sparse_mode = sparse_mode
        # The strategy this optimizer's state belongs to: the one it was created
        # under, or, if created outside any scope, the first it applies under.
        self._bound_strategy = (
            self._distribution_strategy if tf.distribute.has_strategy() else None)
        self._slots = self._no_dependency(slots_lib.SlotStore(self._var_key))
        self._sharded_slots = self._no_dependency({})
        self._deferred_sharded = self._no_dependency({})
        # Variables whose accumulator was restored without a row mask before
        # their mask existed: `build` marks the rows when it creates the mask.
        self._rows_to_mark = self._no_dependency(set())
        self._pending_keras_state = None  # (labels, values, step uid) of a Keras file, for build
        self._warned_unused_slots = self._no_dependency(set())
        # No Python control flow on tensors in tf_lion: AutoGraph has nothing
        # to convert, and skipping it makes tracing faster.
        self._compiled_step = self._no_dependency(tf.function(
            step_lib.device_step, jit_compile=True, reduce_retracing=True, autograph=False))
        # One trace per group of variable shapes (per set of variables under a
        # strategy) is by design (`step.trace_key`); TensorFlow's "N out of the
        # last N calls triggered retracing" warning, counted over every Lion
        # in the process, would point at a non-problem.
        self._compiled_step._omit_frequent_tracing_warning = True
        self.gradient_accumulation_steps = _python_number(gradient_accumulation_steps)
        self.loss_scale_factor = _python_number(loss_scale_factor)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.seed = _python_number(seed)
        if exclude_from_weight_decay_names is not None:
            names = exclude_from_weight_decay_names
            if not isinstance(names, (str, bytes)):
                names = list(names)  # once: a generator would be used up by the check
            if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in names):
                raise ValueError(
                    "`exclude_from_weight_decay_names` must be a list of strings (patterns "
                    "searched in variable names). Received: "
                    f"exclude_from_weight_decay_names={names!r}")
            self.exclude_from_weight_decay(var_names=names)
        if self.skip_nonfinite:
            self._skipped_steps = tf.Variable(
                0, name="skipped_steps", dtype=tf.int64, trainable=False,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    @property
    def skipped_steps(self):
        """How many steps `skip_nonfinite=True` skipped (a checkpointed int64 variable)."""
        if not self.skip_nonfinite:
            raise AttributeError("`skipped_steps` exists only with skip_nonfinite=True.")
        return self._skipped_steps

    @property
    def _momentum_first(self):
        """Use `lion_step`'s in-place formulation: when beta_2 is a fixed number
        >= 0.5 and beta_1 a fixed number below it.

        XLA (TPU, GPU, `jit_compile`) then updates the momentum in place
        instead of copying it every step. A beta_2 that may change (a tensor,
        variable or callable) or is below `update.MOMENTUM_FIRST_MIN_BETA_2`
        (where the rebuilt direction loses precision) keeps the textbook order,
        and so do beta_1 >= beta_2, beta_1 = 0 and beta_2 = 1: there
        `(beta_2 - beta_1) * g`, `beta_1 * m'` or `(1 - beta_2) * g` is
        `0 * inf` or `inf - inf` for an infinite gradient, NaN where the
        textbook `c` is inf.
        """
        beta_1, beta_2 = self.beta_1, self.beta_2
        fixed = all(isinstance(b, numbers.Real) and not isinstance(b, bool)
                    for b in (beta_1, beta_2))
        if not fixed:
            return False
        # As the step sees them (float32 for float32 and lower precision):
        # 0.99 and 0.990000001 are one number there.
        beta_1, beta_2 = np.float32(beta_1), np.float32(beta_2)
        return bool(update_lib.MOMENTUM_FIRST_MIN_BETA_2 <= beta_2 < 1 and 0 < beta_1 < beta_2)

    @property
    def _accumulating(self):
        return bool(self.gradient_accumulation_steps) and self.gradient_accumulation_steps > 1

    def scale_loss(self, loss):
        """`loss * loss_scale_factor` (the loss itself without a factor)."""
        if self.loss_scale_factor is None:
            return loss
        return loss * tf.cast(self.loss_scale_factor, loss.dtype)

    def compute_gradients(self, loss, var_list, tape=None):
        """tf-keras's `compute_gradients`, of `scale_loss(loss)`.

        `apply_gradients` divides every gradient by `loss_scale_factor`, so
        the gradients it is given must be those of the scaled loss. Custom
        loops call `scale_loss` under their tape; `minimize` and Keras's
        `fit` (which calls `minimize`) come here, and the loss is scaled under
        the tape that computed it. Pass them the loss itself.
        """
        if self.loss_scale_factor is not None:
            def scale(value):  # a loss or a structure of losses (their gradients add up)
                return tf.nest.map_structure(self.scale_loss, value)
            if callable(loss):
                unscaled = loss
                loss = lambda: scale(unscaled())  # noqa: E731
            elif tape is not None and getattr(tape, "_recording", False):
                loss = scale(loss)  # called inside the tape's own block: it records this
            elif tape is not None:
                with tape:
                    loss = scale(loss)
        return super().compute_gradients(loss, var_list, tape)

    # ------------------------------------------------------------------ #
    # Hyperparameters
    # ------------------------------------------------------------------ #
    def _build_learning_rate(self, learning_rate):
        # A variable is kept as given (the user may assign to it), a
        # zero-argument callable is called at every step (tf-keras reads it
        # once); floats, tensors and schedules are handled as in tf-keras.
        if isinstance(learning_rate, tf.Variable) or _is_plain_callable(learning_rate):
            return learning_rate
        if isinstance(learning_rate, _Schedule):
            # As in tf-keras, but assignable from a replica context under every
            # strategy (CentralStorageStrategy rejects an aggregation of NONE).
            current = tf.convert_to_tensor(learning_rate(self.iterations))
            self._current_learning_rate = tf.Variable(
                current, name="current_learning_rate", dtype=current.dtype, trainable=False,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            return learning_rate
        if tf.is_tensor(learning_rate) and learning_rate.dtype != tf_keras.backend.floatx():
            # tf-keras's floatx variable rejects other dtypes: cast (the config,
            # a plain float, rebuilds the same variable).
            learning_rate = tf.cast(learning_rate, tf_keras.backend.floatx())
        return super()._build_learning_rate(learning_rate)

    @property
    def learning_rate(self):
        lr = self._learning_rate
        if isinstance(lr, _Schedule):
            return self._current_learning_rate
        if _is_plain_callable(lr):
            return lr()
        return lr

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        if isinstance(self._learning_rate, _Schedule) and not isinstance(learning_rate, _Schedule):
            raise TypeError(
                "This optimizer was created with a `LearningRateSchedule`; its learning rate "
                "cannot be set to a fixed value."
            )
        _check_hyperparameter("learning_rate", learning_rate, 0.0)
        current = self._learning_rate
        if (isinstance(current, tf.Variable) and not isinstance(learning_rate, tf.Variable)
                and not callable(learning_rate)):
            current.assign(tf.cast(learning_rate, current.dtype))
            return
        if getattr(self, "_built", False) and learning_rate is not current:
            warnings.warn(
                f"Optimizer '{self.name}': the learning rate is now a new "
                f"{type(learning_rate).__name__}. Steps already traced by a `tf.function` "
                "(including `fit`'s) keep using the previous one until they are traced "
                "again. To change the rate of a traced step, assign to the learning-rate "
                "variable (`optimizer.learning_rate = 0.01` does that when the rate is a "
                "float, tensor or tf.Variable) or create the optimizer with a variable, "
                "callable or schedule that reads it.", stacklevel=2)
        self._learning_rate = self._build_learning_rate(learning_rate)

    @staticmethod
    def _resolve(value):
        """The current value of a hyperparameter as a float32 (or float64) scalar."""
        if _is_plain_callable(value):
            value = value()
        value = tf.convert_to_tensor(value)
        return value if value.dtype == tf.float64 else tf.cast(value, tf.float32)

    def _current_hyperparameters(self):
        wd = self.weight_decay
        if wd is None or (isinstance(wd, numbers.Number) and wd == 0):
            wd = None  # no decay term at all
        else:
            wd = self._resolve(wd)
        return (self._resolve(self.learning_rate), self._resolve(self.beta_1),
                self._resolve(self.beta_2), wd)

    # ------------------------------------------------------------------ #
    # Slots
    # ------------------------------------------------------------------ #
    def build(self, var_list):
        """Creates the slots (momentum; EMA, accumulators, masks) variables lack.

        Unlike tf-keras, variables first seen after the first step get their
        slots then; slots are keyed to variables, never to positions.
        """
        without_state = {}  # slot name -> names of restored variables it starts fresh for
        # Slots a checkpoint restore made (with a Keras file waiting, none were built).
        restored_before = self._pending_keras_state is not None and bool(self._slots.owners())
        for var in var_list:
            _check_defined_shape(var)
        for var in var_list:
            var = _unwrap(var)
            self._slots.adopt(var)  # slots a restore made take their place now
            created = []
            if not self._slots.has(var, "m"):
                created.append(("m", self._create_slot(var, "m")))
            if self.use_ema and not self._slots.has(var, "average"):
                created.append(("average", self._create_slot(var, "average")))
            if self._accumulating:
                unmasked = False  # an accumulator restored from a checkpoint without masks
                if not self._slots.has(var, "accumulator"):
                    created.append(("accumulator", self._create_slot(var, "accumulator")))
                    winner, self._slots.last_restored_from = self._slots.last_restored_from, None
                    unmasked = winner is not None and not _checkpoint_has_row_mask(winner)
                if self._uses_row_mask(var) and not self._slots.has(var, "touched"):
                    created.append(("touched", self._create_slot(var, "touched")))
                    unmasked |= self._var_key(var) in self._rows_to_mark
                    if unmasked:  # (an older restore's mask must not stay either)
                        self._mark_accumulated_rows(var)
                self._rows_to_mark.discard(self._var_key(var))
            for slot_name, (_, fresh) in created:
                if fresh:
                    without_state.setdefault(slot_name, []).append(var.name)
        self._slots.last_restored_from = None
        if self._deferred_sharded:
            self._restore_deferred_sharded()
        self._slots.follow_order([_unwrap(v) for v in var_list])
        if self._pending_keras_state is not None:
            self._assign_pending_keras_state(restored_before)
        elif without_state:
            _warn_fresh_slots(self.name, without_state)
        self._built = True

    def _create_slot(self, var, slot_name, ordered=True):
        """`SlotStore.create` with the slot's dtype and initial value; restores
        the checkpoint values queued for it. `ordered=False`: made by a
        restore, in no position of `variables` until the variable is built."""
        if slot_name == "m":
            dtype, initial_value = self._momentum_dtype or _true_dtype(var), None
        elif slot_name == "average":
            # From a restore: the checkpoint's value follows at once, and the
            # variable may not hold a value yet (created in a traced call).
            dtype, initial_value = _true_dtype(var), (var if ordered else None)
        elif slot_name == "accumulator":
            dtype, initial_value = update_lib.compute_dtype(_true_dtype(var)), None
        else:
            dtype, initial_value = tf.float32, None
        return self._slots.create(var, slot_name, dtype, initial_value, ordered=ordered)

    def get_slot_names(self):
        """Slot names, for the checkpoint slot-variable protocol.

        None while a SavedModel's object graph is built: a SavedModel that
        lists slot variables can only be loaded by an object with `add_slot`,
        which neither `tf.saved_model.load`'s revived objects nor tf-keras's
        `load_model` have. The SavedModel's variables checkpoint is written
        after that (outside the save context) and keeps every slot keyed to
        its variable, like `tf.train.Checkpoint`.
        """
        if save_context.in_save_context():
            return []
        # A checkpoint being written asks for the names, then for the slots of
        # every object in it, root first: the next `get_slot` call sees the root.
        self._checkpoint_root_probe = True
        return self._slot_names()

    def _slot_names(self):
        names = ["m", "average"] if self.use_ema else ["m"]
        if self._accumulating:
            names += ["accumulator", "touched"] if self.sparse_mode == "lazy" else ["accumulator"]
        return names

    def _uses_row_mask(self, var):
        """Lazy accumulation remembers which rows received gradients."""
        return self._accumulating and self.sparse_mode == "lazy" and var.shape.rank >= 1

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Excludes variables (`var_list`) or name patterns (`var_names`) from
        weight decay, before the first step.

        A call sets the exclusions of the kind it is given and keeps the other
        kind: names given to the constructor (`exclude_from_weight_decay_names`)
        survive a later `exclude_from_weight_decay(var_list=...)`, which in
        tf-keras would drop them. A call with neither clears both, as in
        tf-keras. A partitioned `ShardedVariable` stands for all its shards.
        """
        kept_list = getattr(self, "_exclude_from_weight_decay", None) or []
        kept_names = getattr(self, "_exclude_from_weight_decay_names", None) or []
        if var_list:
            var_list = list(_shards(var_list))
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        if var_list and not var_names:
            self._exclude_from_weight_decay_names = kept_names
        elif var_names and not var_list:
            self._exclude_from_weight_decay = kept_list

    def get_slot(self, var, slot_name):
        """The slot `slot_name` of variable `var` (one of `get_slot_names()`)."""
        if getattr(self, "_checkpoint_root_probe", False):
            self._checkpoint_root_probe = False
            if not isinstance(var, tf.Variable):  # a checkpoint's root: check what it holds
                slots_lib.warn_slots_not_in_checkpoint(
                    var, self._slots.owners(), self._var_key, self.name)
        if slot_name not in self._slot_names():
            raise KeyError(f"Lion has no slot '{slot_name}'; its slots are {self._slot_names()}.")
        if isinstance(var, sharded_variable.ShardedVariable):
            slot = self._sharded_slot(var, slot_name)
            if slot is None:
                raise KeyError(f"Variable '{var.name}' has no '{slot_name}' slot yet (not built).")
            return slot
        slot = self._slots.get(_unwrap(var), slot_name)
        if slot is None:
            raise KeyError(f"Variable '{var.name}' has no '{slot_name}' slot yet (not built).")
        return slot

    def _create_or_restore_slot_variable(self, slot_variable_position, slot_name, variable,
                                         slot_variable_shape=None):
        del slot_variable_shape  # the variable's own shape is checked instead
        if slot_name not in self._slot_names():
            self._drop_unused_slot(slot_variable_position, slot_name, variable)
            return None
        if isinstance(variable, sharded_variable.ShardedVariable):
            slots_lib.check_slot_shape(variable, slot_name, slot_variable_position.value_shape())
            if self._sharded_slot(variable, slot_name) is None and _can_create_slots_now():
                with tf.init_scope():
                    for shard in variable.variables:
                        if not self._slots.has(_unwrap(shard), slot_name):
                            self._create_slot(_unwrap(shard), slot_name, ordered=False)
                self._slots.last_restored_from = None
            slot = self._sharded_slot(variable, slot_name)
            if slot is None:  # restored once every shard has its slot (see `build`)
                key = self._sharded_key(variable, slot_name)
                self._deferred_sharded.setdefault(key, []).append(
                    (slot_variable_position, variable))
                return None
            slot_variable_position.restore(slot)
            if slot_name == "accumulator" and not _checkpoint_has_row_mask(slot_variable_position):
                for shard in variable.variables:
                    self._mark_accumulated_rows(_unwrap(shard))
            return slot
        variable = _unwrap(variable)
        slot = self._slots.create_or_restore(slot_variable_position, slot_name, variable)
        if slot is None and _can_create_slots_now():
            # Now, as OptimizerV2 does: a checkpoint written before the first
            # step then holds it, and it no longer depends on the file.
            with tf.init_scope():
                slot, _ = self._create_slot(variable, slot_name, ordered=False)  # and restores
            self._slots.last_restored_from = None
        if (slot_name == "accumulator" and slot is not None
                and not _checkpoint_has_row_mask(slot_variable_position)):
            self._mark_accumulated_rows(variable)
        return slot

    def _mark_accumulated_rows(self, var):
        """Lazy mode: the row mask is the rows the (restored) accumulator holds.

        For state restored without a row mask (an exact-mode checkpoint or
        Keras file taken in an accumulation window): without it, the applying
        call would zero those rows' accumulated gradients without applying
        them, and rows marked before the restore would move. A checkpoint with
        row masks restores them itself.
        """
        touched = self._slots.get(var, "touched")
        accumulator = self._slots.get(var, "accumulator")
        if touched is None and accumulator is not None and self._uses_row_mask(var):
            self._rows_to_mark.add(self._var_key(var))  # for `build`, which creates the mask
        if touched is None or accumulator is None:
            return
        with tf.init_scope():  # once, now: not part of a step being traced
            axes = list(range(1, accumulator.shape.rank))
            held = tf.reduce_any(tf.not_equal(accumulator, 0), axis=axes)
            _assign_everywhere(touched, tf.cast(held, touched.dtype))

    def _drop_unused_slot(self, position, slot_name, variable):
        """A checkpointed slot this optimizer does not keep (EMA or accumulation
        turned off, lazy accumulation's row mask in exact mode): not restored,
        and said once per slot name when it held anything."""
        warned = self._warned_unused_slots
        if slot_name in warned:
            return
        path = position.checkpoint.save_path_string
        key = next((a.checkpoint_key for a in position.object_proto.attributes
                    if a.name == "VARIABLE_VALUE"), None)
        if key is None or not np.any(tf.train.load_checkpoint(path).get_tensor(key)):
            return  # nothing lost (an accumulator between windows is zero)
        warned.add(slot_name)
        warnings.warn(
            f"Optimizer '{self.name}': the checkpoint holds '{slot_name}' slots, which this "
            f"optimizer does not keep (its slots: {self._slot_names()}); they are not restored. "
            f"'{slot_name}' of '{variable.name}' is not zero"
            + (": the gradients of an accumulation window in progress are dropped."
               if slot_name == "accumulator" else
               ": nothing is lost (exact mode applies the restored accumulator to every row)."
               if slot_name == "touched" else "."),
            stacklevel=2)

    # A partitioned variable (`ShardedVariable`, ParameterServerStrategy) has
    # one slot per shard, next to its shard. Checkpoints see one slot for the
    # whole variable: a `ShardedVariable` of the shards' slots, made once and
    # cached (checkpoints match objects by identity).
    def _sharded_key(self, variable, slot_name):
        return tuple(self._var_key(_unwrap(s)) for s in variable.variables), slot_name

    def _sharded_slot(self, variable, slot_name):
        key = self._sharded_key(variable, slot_name)
        slot = self._sharded_slots.get(key)
        if slot is None:
            shards = [self._slots.get(_unwrap(s), slot_name) for s in variable.variables]
            if any(shard is None for shard in shards):
                return None
            slot = sharded_variable.ShardedVariable(
                shards, name=f"{slot_name}/{variable.name.split(':')[0]}")
            self._sharded_slots[key] = slot
        return slot

    def _restore_deferred_sharded(self):
        # Row masks before accumulators: an accumulator from a checkpoint
        # without masks then sets the mask last.
        for key in sorted(self._deferred_sharded, key=lambda k: k[1] == "accumulator"):
            positions = self._deferred_sharded[key]
            slot = self._sharded_slot(positions[0][1], key[1])
            if slot is None:
                continue
            del self._deferred_sharded[key]
            # Highest restore UID first: later restores win, as for other slots.
            ordered = sorted(positions, key=lambda p: p[0].restore_uid, reverse=True)
            for position, _ in ordered:
                position.restore(slot)
            if key[1] == "accumulator" and not _checkpoint_has_row_mask(ordered[0][0]):
                for shard in positions[0][1].variables:
                    self._mark_accumulated_rows(_unwrap(shard))

    def _lookup_dependency(self, name, cached_dependencies=None):
        # OptimizerV2 checkpoints (legacy tf-keras, the paper's TF2 Lion) save the
        # step as "iter": restore it into `iterations`. Saving is unchanged.
        if name == "iter":
            return self._iterations
        if name == "momentums" and not getattr(self, "_migrating", False):
            # tf-keras Lion (and SGD) keep their momenta in a list, which
            # tf.train.Checkpoint cannot map onto slots keyed to variables.
            warnings.warn(_TF_KERAS_MOMENTA.format(name=self.name), stacklevel=2)
        return super()._lookup_dependency(name, cached_dependencies)

    @property
    def variables(self):
        """`[iterations, m(v_0), ..., m(v_n), average(v_0), ..., average(v_n)]`.

        With gradient accumulation the accumulators (and lazy row masks)
        follow, and with `skip_nonfinite` the skipped-step counter comes last.

        Variables in the order of the last `build` (each step builds) that
        covered all of them (for `model.fit`: `model.trainable_variables`), or
        else the order they were first built in. Keras's `.keras` and
        `save_weights` files store optimizer state in this order, with a label
        per position (`save_own_variables`).
        """
        return keras_optimizer.CallableList([v for _, v in self._labelled_variables()])

    def _labelled_variables(self):
        """`[(label, variable)]` in the order of `variables`: `"iterations"`,
        `"m:<variable name>"`, ..., `"skipped_steps"`."""
        slot_names = ["m"] + (["average"] if self.use_ema else [])
        if self._accumulating:
            slot_names += ["accumulator", "touched"]
        state = [("iterations", self._iterations)]
        for slot_name in slot_names:
            state += [(f"{slot_name}:{owner.name}", slot) for owner, slot in
                      zip(self._slots.ordered_owners(slot_name), self._slots.ordered(slot_name))]
        if self.skip_nonfinite:
            state.append(("skipped_steps", self._skipped_steps))
        return state

    def save_own_variables(self, store):
        """Keras file formats: `variables` by position ("0", "1", ...), as
        tf-keras stores them, and under "labels" what each position holds.
        Values loaded from a Keras file and still waiting for `build` are
        written as they were loaded, unless a `tf.train.Checkpoint` has
        restored the optimizer since (its state wins, see `load_own_variables`)."""
        pending = self._pending_keras_state
        if pending is not None and self._iterations._update_uid == pending[2]:  # pylint: disable=protected-access
            labels, values = pending[:2]
        else:
            state = self._labelled_variables()
            labels, values = [label for label, _ in state], [v.numpy() for _, v in state]
        for i, value in enumerate(values):
            store[str(i)] = slots_lib.file_value(value)
        if labels is not None:
            store["labels"] = np.array([label.encode("utf-8") for label in labels])

    def load_own_variables(self, store):
        """Loads a Keras file's optimizer state; see `slots.match_keras_state`.

        A file holding a kind of state this optimizer does not keep, or that
        does not fit it, raises `ValueError` saying what does not fit, and the
        optimizer's state (including values still waiting, see below) stays
        as it was.

        Before the optimizer has built its slots (`load_weights` on a model
        not trained yet), the step counters are assigned at once and the slot
        values wait for the slots (the first step, or `build`), unless a
        `tf.train.Checkpoint` restores the step counter in between (the later
        restore wins). If they do not fit the variables of that build, it
        warns, puts the counters back and drops them.
        """
        keys = [k for k in store.keys() if k.isdigit()]
        if not keys:  # a file saved without an optimizer: nothing to lose
            warnings.warn(f"Optimizer '{self.name}': the Keras file holds no optimizer state; "
                          "the optimizer keeps its own.", stacklevel=2)
            return
        values = [np.asarray(store[str(i)]) for i in range(len(keys))]
        labels = None
        if "labels" in store.keys():
            labels = [bytes(b).decode("utf-8") for b in np.asarray(store["labels"]).tolist()]
            kept = {"iterations", *self._slot_names()} | (
                {"skipped_steps"} if self.skip_nonfinite else set())
            unkept = [label for label in labels if slots_lib.kind(label) not in kept]
            if unkept:  # would be lost
                raise ValueError(
                    f"Optimizer '{self.name}': the Keras file holds {slots_lib.describe(unkept)}, "
                    f"which this optimizer does not keep (use_ema={self.use_ema}, "
                    f"gradient_accumulation_steps={self.gradient_accumulation_steps}, "
                    f"sparse_mode={self.sparse_mode!r}, skip_nonfinite={self.skip_nonfinite}). "
                    "Load it into an optimizer with the settings it was saved with. Nothing was "
                    "loaded into the optimizer.")
        holds_slots = (any(":" in label for label in labels) if labels is not None
                       else len(values) > 1)
        if self._slots.built() or not holds_slots:
            self._assign_keras_state(labels, values)
            self._pending_keras_state = None
            return
        # Slot values, and no slots yet: the counters now, the slots at `build`.
        counters = self._counters(labels, values)
        pending = self._pending_keras_state
        # The counters as before the first waiting file, unless a checkpoint
        # has restored them since.
        if pending is not None and self._iterations._update_uid == pending[2]:  # pylint: disable=protected-access
            before = pending[3]
        else:
            before = [(variable, variable.numpy()) for variable, _ in counters]
        for variable, value in counters:
            _assign_everywhere(variable, value)
        step = self._iterations._update_uid  # pylint: disable=protected-access
        self._pending_keras_state = self._no_dependency((labels, values, step, before))

    def _counters(self, labels, values):
        """`[(variable, value)]` of the step counters in a Keras file's state."""
        counters = [(self._iterations, values[0])]
        if labels is not None:
            counters = [(self._iterations if label == "iterations" else self._skipped_steps,
                         value) for label, value in zip(labels, values) if ":" not in label]
        for variable, value in counters:
            if np.shape(value) != ():
                raise ValueError(f"Optimizer '{self.name}': '{variable.name}' is a scalar, but "
                                 f"its value in the Keras file has shape {np.shape(value)}. "
                                 "Nothing was loaded into the optimizer.")
        return counters

    def _match_keras_state(self, labels, values):
        """`(pairs, fresh, partial)`: `slots.match_keras_state`, or for a file
        with slots for a subset of the names the counters and the warning."""
        state = self._labelled_variables()
        try:
            pairs, fresh = slots_lib.match_keras_state(
                self.name, [label for label, _ in state], [v for _, v in state], labels, values)
            return pairs, fresh, None
        except slots_lib.PartialKerasState as partial:
            return self._counters(labels, values), [], str(partial)

    def _assign_keras_state(self, labels, values, matched=None):
        pairs, fresh, partial = matched or self._match_keras_state(labels, values)
        if partial:
            warnings.warn(partial, stacklevel=3)
        for variable, value in pairs:
            _assign_everywhere(variable, value)
        # Accumulators loaded from a file without row masks: their rows are the mask.
        loaded = {label.split(":", 1)[1] for label in labels or ()
                  if label.startswith("accumulator:")}
        unmasked = {label.split(":", 1)[1] for label in fresh
                    if label.startswith("touched:")} & loaded
        for owner in self._slots.ordered_owners("touched"):
            if owner.name in unmasked:
                self._mark_accumulated_rows(owner)
        if fresh and labels is not None and any(":" in label for label in labels):
            warnings.warn(
                f"Optimizer '{self.name}': the Keras file holds no state for "
                f"{len(fresh)} of this optimizer's variables ({slots_lib.describe(fresh)}: "
                f"{fresh[:3]}{' ...' if len(fresh) > 3 else ''}); they keep their values.",
                stacklevel=3)

    def _assign_pending_keras_state(self, restored_before):
        """At `build`: the slot values of a Keras file loaded before the slots
        existed. `restored_before`: a checkpoint restore had made slots."""
        labels, values, step, before = self._pending_keras_state
        self._pending_keras_state = None
        if self._iterations._update_uid != step:  # pylint: disable=protected-access
            warnings.warn(
                f"Optimizer '{self.name}': a tf.train.Checkpoint restored this optimizer after "
                "a Keras file was loaded into it; the checkpoint's state is kept and the Keras "
                "file's optimizer state is dropped.", stacklevel=3)
            return
        try:
            matched = self._match_keras_state(labels, values)
        except ValueError as error:
            # Not raised: Keras's `load_weights(skip_mismatch=True)` has returned
            # long ago and cannot skip it, and a `fit` that failed here could
            # not be run again. The layers' weights were checked at loading.
            for variable, value in before:
                _assign_everywhere(variable, value)
            warnings.warn(
                f"{error} The Keras file was loaded before the optimizer built its slots, "
                "which it does now, for the variables of this first step: its optimizer state "
                "is dropped and this optimizer starts fresh"
                + (" (but for the state restored from a checkpoint before the file was "
                   "loaded, which it keeps)" if restored_before else "")
                + ". To load it, build the slots for "
                "all the model's trainable variables before loading "
                "(model.optimizer.build(model.trainable_variables)).", stacklevel=3)
            return
        self._assign_keras_state(labels, values, matched)

    def set_weights(self, weights):
        variables = self.variables
        if len(weights) != len(variables):
            raise ValueError(
                f"Optimizer '{self.name}' has {len(variables)} variables, got {len(weights)} weights."
            )
        values = []
        for variable, weight in zip(variables, weights):  # all checked before any assignment
            if tuple(variable.shape) != tuple(np.shape(weight)):
                raise ValueError(
                    f"Optimizer variable '{variable.name}' has shape {variable.shape}, "
                    f"the weight has shape {np.shape(weight)}."
                )
            values.append(slots_lib.keras_value(
                weight, variable.dtype, f"Optimizer variable '{variable.name}'"))
        for variable, value in zip(variables, values):
            variable.assign(value)

    # ------------------------------------------------------------------ #
    # Applying gradients
    # ------------------------------------------------------------------ #
    @tf.autograph.experimental.do_not_convert
    def apply_gradients(self, grads_and_vars, name=None, skip_gradients_aggregation=False,
                        **kwargs):
        """Applies gradients (dense or `tf.IndexedSlices`) to variables.

        Same contract as tf-keras's `apply_gradients`, except that sparse
        gradients are never deduplicated with `tf.unique` (duplicates are
        summed with static shapes inside the update) and are aggregated across
        replicas by gathering, never densified. In order: divide by
        `loss_scale_factor`, aggregate across replicas, test for non-finite
        values (`skip_nonfinite`), clip, update.
        """
        aggregate = kwargs.pop("experimental_aggregate_gradients", True)
        if kwargs:
            raise TypeError(f"Unexpected arguments to apply_gradients: {sorted(kwargs)}")
        grads_and_vars = [(_as_gradient(g), v) for g, v in grads_and_vars]
        if not grads_and_vars:
            return self._iterations
        aggregate = aggregate and not skip_gradients_aggregation
        if aggregate:
            distribute_lib.check_replica_context(self.name)
        # The steps of a gradient whose shape is checked at run time wait for
        # every gradient (and so for its checks): nothing changes if one fails.
        wait = any(step_lib.shape_left_open(g) for g, _ in grads_and_vars)
        grads_and_vars = [(_check_gradient(g, v), v) for g, v in grads_and_vars]
        strategy = distribute_lib.check_strategy(self._bound_strategy, self.name)
        distribute_lib.check_variables([_unwrap(v) for _, v in grads_and_vars], self.name)
        self._bound_strategy = self._distribution_strategy = strategy
        if self.loss_scale_factor is not None:
            grads_and_vars = [(step_lib.unscale(g, self.loss_scale_factor), v)
                              for g, v in grads_and_vars]
        if aggregate:
            grads_and_vars = self.aggregate_gradients(grads_and_vars)
        self._compute_current_learning_rate()
        with tf.name_scope(name or self.name or "optimizer"):
            with tf.init_scope():
                # A variable of unknown shape can have no slots; without a
                # gradient it is skipped, as tf-keras skips it.
                self.build([v for g, v in grads_and_vars
                            if g is not None or v.shape.is_fully_defined()])
            grads_and_vars = optimizer_utils.filter_empty_gradients(grads_and_vars)
            grads, variables = zip(*grads_and_vars)
            # Aggregated gradients are the same on every replica, so every
            # replica reaches the same verdict (a NaN on one skips all).
            finite = step_lib.all_finite(strategy, grads) if self.skip_nonfinite else None
            if not self._accumulating:  # else the average is clipped when applied
                grads = self._clip_gradients(list(grads))
            grads_and_vars = list(zip(grads, variables))
            if tf.distribute.in_cross_replica_context():
                # Already aggregated, e.g. by LossScaleOptimizer inside its merge_call.
                iteration = self._distributed_apply_gradients_fn(
                    strategy, grads_and_vars, finite=finite, wait_for_gradients=wait)
            else:
                iteration = tf.__internal__.distribute.interim.maybe_merge_call(
                    self._distributed_apply_gradients_fn, strategy, grads_and_vars,
                    finite=finite, wait_for_gradients=wait)
            return iteration

    def aggregate_gradients(self, grads_and_vars):
        """Sums gradients across replicas; `tf.IndexedSlices` by an all-gather.

        See `tf_lion.distribute.aggregate_gradients`: sparse gradients stay
        sparse on every strategy (tf-keras densifies them on TPU).
        """
        return distribute_lib.aggregate_gradients(grads_and_vars)

    def _update_fn(self):
        """Resolves this step's hyperparameters; returns `(update_fn, weight_decay)`.

        `update_fn(first_var, variables, grads, slots, weight_decays, finite,
        seeds)` does one step of `variables` (lists), which live on the device
        `strategy.extended.update` runs it for (`first_var` picks the device).
        With `jit_compile` they are one XLA program: a group of up to 16
        variables of a device when they share it, else one variable.
        """
        lr, beta_1, beta_2, weight_decay = self._current_hyperparameters()
        ema_momentum = self._resolve(self.ema_momentum) if self.use_ema else None
        step = tf.cast(self.iterations, tf.int64)
        apply_now = None
        if self._accumulating:
            apply_now = tf.equal((step + 1) % self.gradient_accumulation_steps, 0)
        accumulation_steps = self.gradient_accumulation_steps if self._accumulating else None
        clip = self._average_clip()
        options = (self.sparse_mode, accumulation_steps, self._momentum_first, clip)
        chains = None if self.jit_compile else step_lib.UpdateChains()

        def update_fn(first_var, variables, grads, slots, weight_decays, finite, seeds,
                      clip_scale=None):
            del first_var
            decayed = tuple(wd is not None for wd in weight_decays)
            if clip is not None and clip[0] == "global" and clip_scale is None:  # update_step
                clip_scale = self._global_clip_scale(
                    None, [s["accumulator"] for s in slots], grads, apply_now)
            hypers = (lr, beta_1, beta_2, weight_decay if any(decayed) else None, ema_momentum,
                      clip_scale)
            if not self.jit_compile:
                return step_lib.device_step(None, variables, grads, slots, hypers, decayed,
                                            finite, apply_now, seeds, options, chains)
            grads = [step_lib.pad_to_bucket(v, g) if isinstance(g, tf.IndexedSlices) else g
                     for v, g in zip(variables, grads)]
            key = step_lib.trace_key(variables)
            return self._compiled_step(key, variables, grads, slots, hypers, decayed, finite,
                                       apply_now, seeds, options)

        return update_fn, weight_decay

    def _average_clip(self):
        """With accumulation, how the applied average is clipped (`step.clip_average`)."""
        if not self._accumulating:
            return None
        if self.clipnorm:  # the precedence of tf-keras's `_clip_gradients`
            return ("norm", float(self.clipnorm))
        if self.global_clipnorm:
            return ("global", float(self.global_clipnorm))
        if self.clipvalue:
            return ("value", float(self.clipvalue))
        return None

    def _global_clip_scale(self, distribution, accumulators, grads, apply_now):
        """`global_clipnorm`'s factor for this step's averages (1 on calls that do not apply)."""
        if distribution is not None:
            accumulators = [step_lib.first_local(distribution, a) for a in accumulators]
            grads = [step_lib.first_local(distribution, g) for g in grads]
        return tf.cond(
            apply_now,
            lambda: step_lib.global_clip_scale(accumulators, grads,
                                               self.gradient_accumulation_steps,
                                               float(self.global_clipnorm)),
            lambda: tf.constant(1.0))

    def _variable_args(self, var, weight_decay, step):
        """`(slots, weight_decay or None, seed or None)` of one variable for `update_fn`."""
        names = [n for n in self._slot_names() if self._slots.has(var, n)]
        slots = {n: self._slots.get(var, n) for n in names}
        if weight_decay is None or not self._use_weight_decay(var):
            weight_decay = None
        seed = None
        low_precision = (tf.float16, tf.bfloat16)
        if self.stochastic_rounding and (_true_dtype(var) in low_precision
                                         or slots["m"].dtype in low_precision):
            key = step_lib.seed_key(var, self.seed or 0)
            seed = tf.stack([tf.constant(key, tf.int64), step])
        return slots, weight_decay, seed

    def update_step(self, gradient, variable):
        """Updates one variable (tf-keras API); `apply_gradients` is the usual entry."""
        variable = _unwrap(variable)
        self.build([variable])
        update_fn, weight_decay = self._update_fn()
        slots, weight_decay, seed = self._variable_args(
            variable, weight_decay, tf.cast(self.iterations, tf.int64))
        with tf.control_dependencies(step_lib.gradient_checks(variable, gradient)):
            return update_fn(variable, [variable], [gradient], [slots], [weight_decay], None,
                             [seed])

    def _distributed_apply_gradients_fn(self, distribution, grads_and_vars, finite=None,
                                        wait_for_gradients=False, **kwargs):
        update_fn, weight_decay = self._update_fn()
        step = tf.cast(self.iterations, tf.int64)
        variables = [_unwrap(v) for _, v in grads_and_vars]
        per_variable = [(grad, *self._variable_args(var, weight_decay, step))
                        for (grad, _), var in zip(grads_and_vars, variables)]
        if not step_lib.fusable(distribution, variables):
            groups = [[i] for i in range(len(variables))]
        elif self.jit_compile:
            groups = step_lib.fusion_groups(variables)  # they share the device(s)
        else:  # one call, which packs the small variables (`step.packs`)
            groups = [list(range(len(variables)))] if variables else []
        clip, clip_scale = self._average_clip(), None
        if clip is not None and clip[0] == "global":
            apply_now = tf.equal((step + 1) % self.gradient_accumulation_steps, 0)
            clip_scale = self._global_clip_scale(
                distribution, [slots["accumulator"] for _, slots, _, _ in per_variable],
                [grad for grad, _ in grads_and_vars], apply_now)
        # Nothing changes before every gradient's run-time checks have passed.
        checks = _gradient_checks(distribution, grads_and_vars, variables)
        if wait_for_gradients and not tf.executing_eagerly():
            checks += [t for grad, _ in grads_and_vars if grad is not None
                       for local in distribution.experimental_local_results(grad)
                       for t in tf.nest.flatten(local, expand_composites=True)]
        with tf.control_dependencies(checks):
            for group in groups:
                grads, slots, wds, seeds = (list(x) for x in zip(*[per_variable[i] for i in group]))
                members = [variables[i] for i in group]
                distribution.extended.update(
                    members[0], update_fn,
                    args=(members, grads, slots, wds, finite, seeds, clip_scale), group=False)
            # Cross-replica from here: one value for the counters.
            finite = step_lib.first_local(distribution, finite)
            if self.use_ema and self.ema_overwrite_frequency:
                self._maybe_overwrite_with_averages(variables, step, finite)
            self._apply_constraints(distribution, variables, grads_and_vars, step, finite)
            if finite is None:
                return self.iterations.assign_add(1)
            if self.skip_nonfinite:
                self._skipped_steps.assign_add(1 - tf.cast(finite, tf.int64))
            return self.iterations.assign_add(tf.cast(finite, self.iterations.dtype))

    # ------------------------------------------------------------------ #
    # EMA of the model variables (per-variable "average" slots, updated in
    # `_variable_step` right after their variable)
    # ------------------------------------------------------------------ #
    def _apply_constraints(self, distribution, variables, grads_and_vars, step, finite):
        """Variable constraints, last (after an EMA overwrite too, as tf-keras),
        on each local copy: run in a replica context, as tf-keras does, a
        variable with aggregation=SUM would get the replicas' sum.

        A constraint is a function of the whole variable and is applied to
        all of it, as in tf-keras, but only when the step changed the
        variable: not on a skipped step (`skip_nonfinite`), a call that only
        accumulates, or a lazy sparse step without rows (MaxNorm, UnitNorm
        rescale a little each time they run)."""
        applied = self._changes_variables(step, finite)
        for variable, (grad, original) in zip(variables, grads_and_vars):
            constraint = getattr(original, "constraint", None)
            if constraint is None:
                continue
            changed = applied
            local = distribution.experimental_local_results(grad)[0]
            if (isinstance(local, tf.IndexedSlices) and self.sparse_mode == "lazy"
                    and not self._accumulating):  # (aggregated: every copy has the same rows)
                has_rows = tf.size(local.indices) > 0
                changed = has_rows if changed is None else changed & has_rows
            distribution.extended.update(
                variable, lambda v, c=constraint, w=changed: step_lib.when(
                    w, lambda: v.assign(c(v))), group=False)

    def _changes_variables(self, step, finite):
        """None (every call does), or whether this call changes the variables:
        it is finite (`skip_nonfinite`) and, with accumulation, applies."""
        applied = None
        if self._accumulating:
            applied = tf.equal((step + 1) % self.gradient_accumulation_steps, 0)
        if finite is not None:
            applied = finite if applied is None else applied & finite
        return applied

    def _maybe_overwrite_with_averages(self, variables, step, finite):
        """Every `ema_overwrite_frequency` applied steps, variables = averages."""
        n = self.gradient_accumulation_steps if self._accumulating else 1
        applied_steps = (step + 1) // n  # counting this one, if it applies
        overwrite = tf.equal(applied_steps % self.ema_overwrite_frequency, 0)
        applied = self._changes_variables(step, finite)
        if applied is not None:
            overwrite = overwrite & applied
        tf.cond(overwrite,
                lambda: (self._overwrite_model_variables_with_average_value(variables),
                         tf.constant(True))[1],
                step_lib.no_op)

    def _overwrite_model_variables_with_average_value(self, var_list):
        # Every variable is checked before any is overwritten.
        # A variable of unknown shape has no slots: never updated, nothing to copy.
        pairs = [(var, self._slots.get(var, "average")) for var in _shards(var_list)
                 if var.shape.is_fully_defined() or self._slots.has(var, "average")]
        for var, average in pairs:
            if average is None:
                raise KeyError(
                    f"Optimizer '{self.name}' has no moving average of variable "
                    f"'{var.name}': it was never built or updated by this optimizer.")
        for var, average in pairs:
            # The variable's own strategy: this may run outside its scope (as
            # tf-keras allows), or before any step has bound the optimizer.
            strategy = (getattr(var, "_distribute_strategy", None) or self._bound_strategy
                        or tf.distribute.get_strategy())
            strategy.extended.update(var, lambda v, a: v.assign(a), args=(average,))

    # ------------------------------------------------------------------ #
    # Config
    # ------------------------------------------------------------------ #
    def get_config(self):
        config = super().get_config()

        def plain(value):
            value = self._serialize_hyperparameter(value)
            if isinstance(value, (np.generic, np.ndarray)) or tf.is_tensor(value):
                value = float(np.asarray(value))
            return value

        config.update(
            learning_rate=plain(self._learning_rate),
            beta_1=plain(self.beta_1),
            beta_2=plain(self.beta_2),
            weight_decay=plain(self.weight_decay),
            sparse_mode=self.sparse_mode,
            momentum_dtype=None if self._momentum_dtype is None else self._momentum_dtype.name,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            loss_scale_factor=self.loss_scale_factor,
            skip_nonfinite=self.skip_nonfinite,
            stochastic_rounding=self.stochastic_rounding,
            seed=self.seed,
        )
        names = list(getattr(self, "_exclude_from_weight_decay_names", None) or [])
        if names:  # `var_list` exclusions are variables: they cannot be written here
            config["exclude_from_weight_decay_names"] = names
        return config


keras_compat.register_saved_model_type(Lion)  # a SavedModel of a trained model loads
