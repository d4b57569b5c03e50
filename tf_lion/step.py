"""One optimizer step on one device: everything around the update rules.

`tf_lion.update` holds the formula; `tf_lion.optimizer.Lion` resolves
hyperparameters and slots. In between, this module holds what a step does to
the variables of one device, as plain functions the optimizer hands to
`strategy.extended.update`:

* `variable_step`: the rule for one variable, with the `tf.cond`s of
  `skip_nonfinite` and gradient accumulation and the EMA update after it;
* `device_step`: `variable_step` for a list of variables, which the optimizer
  compiles as one XLA program for each group of up to `FUSION_GROUP_SIZE`
  variables of a device (`fusable` says when, `fusion_groups` how) or one per
  variable;
* `pad_to_bucket`: sparse rows of unknown count padded for XLA's compile cache;
* small helpers: index checks, unscaling, the non-finite test, seeds.
"""

import collections
import functools
import math
import os
import re
import zlib

import numpy as np
import tensorflow as tf
from tensorflow.python.distribute import sharded_variable

from tf_lion import update as update_lib

def check_indices(variable, indices):
    """Eager/graph check of sparse indices; XLA ignores Assert ops (see README)."""
    rows = variable.shape[0]
    if rows is None:  # never read the variable for its shape: that would copy it
        rows = tf.raw_ops.VariableShape(input=variable.handle, out_type=indices.dtype)[0]
    rows = tf.cast(rows, indices.dtype)
    message = (
        f"Sparse gradient for variable '{variable.name}' has indices outside "
        f"[0, {variable.shape[0]})."
    )
    return tf.group(
        tf.debugging.assert_non_negative(indices, message=message),
        tf.debugging.assert_less(indices, rows, message=message),
    )


def _assert_shape(shape, expected, message):
    """An Assert that the int64 vector `shape` equals the list `expected`."""
    rank = tf.debugging.assert_equal(tf.size(shape, out_type=tf.int64),
                                     tf.constant(len(expected), tf.int64), message=message)
    with tf.control_dependencies([rank]):  # compared only once the ranks agree
        return tf.debugging.assert_equal(shape, tf.constant(expected, tf.int64), message=message)


def gradient_checks(variable, gradient):
    """The run-time checks of one variable's gradient on one device: Assert ops.

    For what its static shape leaves open. The optimizer makes every update
    and counter of a step wait for them. Graph optimizations fold an Assert
    away when shape inference has decided it (an `EnsureShape` of
    `checked_gradient` next to it does), so they back up `checked_gradient`:
    they cover per-replica values applied in a cross-replica context, which
    it does not. Dense: the variable's shape (a wrong one would broadcast). Sparse: the indices lie inside the table (`check_indices`),
    the value rows have the variable's trailing shape, and there are as many
    rows as indices. Eagerly, shapes are known and nothing is added.
    """
    name = variable.name
    if isinstance(gradient, tf.IndexedSlices):
        checks = [check_indices(variable, gradient.indices)]
        values, indices = gradient.values, gradient.indices
        if not values.shape[1:].is_fully_defined():
            checks.append(_assert_shape(
                tf.shape(values, out_type=tf.int64)[1:], variable.shape[1:].as_list(),
                f"The sparse gradient of variable '{name}' has value rows of another shape "
                f"than the variable's rows {variable.shape[1:]}."))
        if not (values.shape[:1].is_fully_defined() and indices.shape[:1].is_fully_defined()):
            checks.append(tf.debugging.assert_equal(
                tf.shape(indices, out_type=tf.int64)[0], tf.shape(values, out_type=tf.int64)[0],
                message=(f"The sparse gradient of variable '{name}' has a different number of "
                         f"indices and value rows.")))
        return checks
    if isinstance(gradient, tf.Tensor) and not gradient.shape.is_fully_defined():
        return [_assert_shape(
            tf.shape(gradient, out_type=tf.int64), variable.shape.as_list(),
            f"The gradient of variable '{name}' does not have its shape {variable.shape}.")]
    return []


def checked_gradient(variable, gradient):
    """`gradient`, through ops that fail (naming the variable) if it does not fit.

    Only for a gradient whose static shape leaves it open, in a graph. Dense:
    an `EnsureShape` named `gradient_of_<variable>`. Sparse: the values pass
    an `EnsureShape` to the variable's row shape, then a reshape to as many
    rows as indices, named `gradient_of_<variable>_rows`. Unlike Assert ops
    (`gradient_checks`), these stay in the gradient's own path: graph
    optimizations cannot fold them away, and XLA, which drops Assert ops,
    fails on them when it compiles the step, before anything runs.
    """
    if not shape_left_open(gradient):
        return gradient
    op_name = "gradient_of_" + re.sub(r"[^A-Za-z0-9_.]", "_", variable.name)
    if isinstance(gradient, tf.IndexedSlices):
        rows = variable.shape[1:].as_list()
        values = tf.ensure_shape(gradient.values, [None] + rows, name=op_name)
        values = tf.reshape(values, tf.concat([tf.shape(gradient.indices)[:1], rows], 0),
                            name=op_name + "_rows")
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return tf.ensure_shape(gradient, variable.shape, name=op_name)


def shape_left_open(gradient):
    """Whether a gradient's static shape leaves room for one that does not fit."""
    if isinstance(gradient, tf.IndexedSlices):
        return not (gradient.values.shape.is_fully_defined()
                    and gradient.indices.shape[:1].is_fully_defined())
    return isinstance(gradient, tf.Tensor) and not gradient.shape.is_fully_defined()


def apply_rule(variable, gradient, momentum, lr, beta_1, beta_2, weight_decay, sparse_mode,
                seed=None, mask=None, momentum_first=False):
    """Dispatches one variable's update to the rule for its gradient type."""
    if mask is not None:
        return update_lib.masked_update(variable, momentum, gradient, mask,
                                        lr, beta_1, beta_2, weight_decay, seed, momentum_first)
    if isinstance(gradient, tf.IndexedSlices):
        rule = (
            update_lib.exact_sparse_update if sparse_mode == "exact"
            else update_lib.lazy_sparse_update
        )
        return rule(variable, momentum, gradient.indices, gradient.values,
                    lr, beta_1, beta_2, weight_decay, seed, momentum_first)
    return update_lib.dense_update(variable, momentum, gradient, lr, beta_1, beta_2,
                                   weight_decay, seed, momentum_first)


def no_op():
    return tf.constant(False)


def when(condition, fn):
    """`fn()`, under `tf.cond(condition)` unless `condition` is None."""
    if condition is None:
        return fn()
    return tf.cond(condition, lambda: (fn(), tf.constant(True))[1], no_op)


def variable_step(variable, gradient, slots, hypers, finite, apply_now, seed, options):
    """Everything one step does to one variable (on one device).

    Args:
      variable, gradient: the variable and its (aggregated) gradient.
      slots: dict with "m" and, when in use, "average", "accumulator", "touched".
      hypers: (lr, beta_1, beta_2, weight_decay or None, ema_momentum,
        clip_scale): `clip_scale` is None, or (accumulation with
        `global_clipnorm`) the factor that clips this step's averages.
      finite: None, or a boolean scalar: False skips the step entirely.
      apply_now: None, or (with accumulation) True on the calls that apply.
      seed: None, or the stochastic-rounding seed of this variable and step.
      options: (sparse_mode, accumulation_steps or None, momentum_first,
        clip), plain Python; `clip` is None or, with accumulation, `("norm",
        c)`, `("value", c)` or `("global", c)`: the average is clipped when
        it is applied (`clip_average`), not each call's gradient.

    All branches are `tf.cond`s on tensors, so the step compiles with XLA.
    """
    sparse_mode, accumulation_steps, momentum_first, clip = options
    lr, beta_1, beta_2, weight_decay, ema_momentum, clip_scale = hypers
    momentum, average = slots["m"], slots.get("average")

    def apply(grad, mask=None):
        op = apply_rule(variable, grad, momentum, lr, beta_1, beta_2, weight_decay,
                         sparse_mode, seed, mask, momentum_first)
        if average is not None:
            with tf.control_dependencies([op]):
                op = update_lib.ema_update(average, variable.read_value(), ema_momentum)
        return op

    if not accumulation_steps:
        return when(finite, lambda: apply(gradient))

    accumulator, touched = slots["accumulator"], slots.get("touched")

    def apply_accumulated():
        grad = accumulator.read_value() / tf.cast(accumulation_steps, accumulator.dtype)
        grad = clip_average(grad, clip, clip_scale)
        mask = None if touched is None else touched.read_value()
        op = apply(grad, mask)
        with tf.control_dependencies([op]):
            resets = [accumulator.assign(tf.zeros_like(accumulator))]
            if touched is not None:
                resets.append(touched.assign(tf.zeros_like(touched)))
            return tf.group(*resets)

    added = when(finite, lambda: update_lib.accumulate(accumulator, gradient, touched))
    with tf.control_dependencies([added]):
        condition = apply_now if finite is None else tf.logical_and(apply_now, finite)
        return when(condition, apply_accumulated)


def clip_average(grad, clip, clip_scale=None):
    """Clips an accumulated average as tf-keras clips a gradient.

    `("norm", c)`: `tf.clip_by_norm`; `("value", c)`: `tf.clip_by_value`;
    `("global", c)`: times `clip_scale`, the factor `tf.clip_by_global_norm`
    takes for all averages of the step (`global_clip_scale`).
    """
    if clip is None:
        return grad
    kind, value = clip
    if kind == "norm":
        return tf.clip_by_norm(grad, value)
    if kind == "value":
        return tf.clip_by_value(grad, -value, value)
    return grad * tf.cast(clip_scale, grad.dtype)


def global_clip_scale(accumulators, grads, accumulation_steps, clip_norm):
    """`tf.clip_by_global_norm`'s factor for the averages `(accumulator + grad) / N`.

    Computed on an applying call before this call's gradients are added: a
    sparse gradient's rows are summed (`update.deduplicate_indices`) and
    only the rows it names are gathered, never a table-sized temporary.
    """
    n = float(accumulation_steps)
    squares = []
    for accumulator, grad in zip(accumulators, grads):
        total = tf.cast(accumulator, tf.float32)
        if isinstance(grad, tf.IndexedSlices):
            indices, summed = update_lib.deduplicate_indices(grad.indices, grad.values)
            first = update_lib.first_of_each_index(indices)
            rows = tf.gather(total, indices)
            new_rows = rows + tf.cast(summed, tf.float32)
            change = tf.reduce_sum(tf.square(new_rows / n) - tf.square(rows / n), axis=list(
                range(1, new_rows.shape.rank)))
            squares.append(tf.reduce_sum(tf.square(total / n))
                           + tf.reduce_sum(tf.where(first, change, tf.zeros_like(change))))
        else:
            squares.append(tf.reduce_sum(tf.square((total + tf.cast(grad, tf.float32)) / n)))
    norm = tf.sqrt(tf.add_n(squares))
    return clip_norm * tf.minimum(1.0 / norm, 1.0 / clip_norm)


def unscale(grad, factor):
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values / tf.cast(factor, grad.values.dtype), grad.indices,
                                grad.dense_shape)
    return grad / tf.cast(factor, grad.dtype)


def all_finite(strategy, grads):
    """One boolean: no gradient holds NaN or Inf (on any replica, if cross-replica).

    A sparse gradient is tested after its duplicates are summed, as the
    update sums them (`update.deduplicate_indices`, in the values' dtype):
    finite float16 values can add up to Inf.
    """
    checks = []
    for grad in grads:
        parts = (strategy.experimental_local_results(grad)
                 if isinstance(grad, tf.distribute.DistributedValues) else [grad])
        for g in parts:
            if isinstance(g, tf.IndexedSlices):
                values = update_lib.deduplicate_indices(g.indices, g.values)[1]
            else:
                values = g
            checks.append(tf.reduce_all(tf.math.is_finite(values)))
    return tf.reduce_all(tf.stack(checks))


def first_local(distribution, value):
    """In a cross-replica context, one replica's copy of an agreed value."""
    if isinstance(value, tf.distribute.DistributedValues):
        return distribution.experimental_local_results(value)[0]
    return value


def pad_to_bucket(variable, grad):
    """Pads sparse rows of unknown count to a power of two, for XLA's compile cache.

    XLA compiles once per input shape. When the number of rows changes from
    step to step (a parameter-server shard sees a different number of lookups
    each step) every new count would compile again; padded to the next power
    of two there are at most log2(rows) programs. Padding rows carry index
    `variable.shape[0]`, one past the end, with zero values: XLA skips
    scatters out of range, so they change nothing (indices are checked before
    padding). Counts known when tracing are left as they are.
    """
    if grad.indices.shape.rank != 1 or grad.indices.shape[0] is not None:
        return grad
    count = tf.size(grad.indices)
    exponent = tf.math.ceil(tf.math.log(tf.cast(tf.maximum(count, 1), tf.float64)) / np.log(2.0))
    bucket = tf.maximum(tf.cast(tf.pow(tf.constant(2.0, tf.float64), exponent), tf.int32), count)
    pad = bucket - count
    rows = variable.shape[0]
    if rows is None:
        rows = tf.raw_ops.VariableShape(input=variable.handle, out_type=grad.indices.dtype)[0]
    indices = tf.concat([grad.indices, tf.fill([pad], tf.cast(rows, grad.indices.dtype))], 0)
    zeros = tf.zeros(tf.concat([[pad], tf.shape(grad.values)[1:]], 0), grad.values.dtype)
    return tf.IndexedSlices(tf.concat([grad.values, zeros], 0), indices, grad.dense_shape)


def device_step(key, variables, grads, slots, hypers, decayed, finite, apply_now, seeds,
                options, chains=None):
    """`variable_step` for a list of variables on one device.

    The optimizer compiles it with `tf.function(jit_compile=True)` as one XLA
    program: for a group of up to `FUSION_GROUP_SIZE` variables of a device
    when they share it (`fusable`), so the cost of launching a compiled
    computation is shared, else for one variable at a time. `key`
    (`trace_key`) says which sets of variables may share a trace. `hypers` is
    `(lr, beta_1, beta_2, weight_decay, ema_momentum)`, passed once (each
    argument of the program costs time at every call); `decayed[i]` says
    whether variable i takes weight decay. Without XLA, the small dense
    variables are updated in packs (`packs`) and `chains` (`UpdateChains`)
    orders the updates of the others.
    """
    del key
    lr, beta_1, beta_2, weight_decay, ema_momentum, clip_scale = hypers
    momentum_first = options[2]
    packed = set()
    for members in packs(variables, grads, slots, decayed, seeds, options):
        decay = weight_decay if decayed[members[0]] else None
        when(finite, lambda members=members, decay=decay: update_lib.packed_dense_update(
            [variables[i] for i in members], [slots[i]["m"] for i in members],
            [grads[i] for i in members], lr, beta_1, beta_2, decay, momentum_first))
        packed.update(members)
    for i, (var, grad, var_slots, decay, seed) in enumerate(
            zip(variables, grads, slots, decayed, seeds)):
        if i in packed:
            continue
        var_hypers = (lr, beta_1, beta_2, weight_decay if decay else None, ema_momentum,
                      clip_scale)

        def step(var=var, grad=grad, var_slots=var_slots, var_hypers=var_hypers, seed=seed):
            return variable_step(var, grad, var_slots, var_hypers, finite, apply_now, seed,
                                 options)
        if chains is None:
            step()
        else:
            chains.add(var, step)


# Without XLA, the step of a small variable costs per op (a dozen ops of a few
# microseconds each), not per element: `device_step` updates the small dense
# variables of a device together (`packs`, `update.packed_dense_update`),
# with the same bits. Measured, 300 float32 variables, one process, one update
# each -> packed: [4] 7.98 -> 4.59 ms, [64] 10.4 -> 5.23, [256] 6.93 -> 4.20,
# [1024] 6.71 -> 5.71, but [64, 64] 8.50 -> 9.67 ms (the concatenation and
# split cost more there than the ops they save).
PACK_MAX_ELEMENTS = 1024
PACK_MAX_TOTAL = 2**18  # elements in one pack: bounds its temporaries


def packs(variables, grads, slots, decayed, seeds, options):
    """Index lists of the variables `device_step` updates together, without XLA.

    A variable joins a pack when its size is known and at most
    `PACK_MAX_ELEMENTS`, its gradient is dense, it is given once, and its
    step has nothing of its own (no gradient accumulation, EMA or stochastic
    rounding). A pack holds variables of one dtype, one momentum dtype and
    one weight decay (on or off), at most `PACK_MAX_TOTAL` elements, and at
    least two variables.
    """
    accumulation_steps = options[1]
    if update_lib.in_xla_context() or accumulation_steps:
        return []
    # A variable given twice takes two steps in turn, so it is never packed.
    occurrences = collections.Counter(id(var) for var in variables)
    by_kind = {}
    for i, (var, grad, var_slots, seed) in enumerate(zip(variables, grads, slots, seeds)):
        size = var.shape.num_elements()
        if (size is None or size > PACK_MAX_ELEMENTS or not isinstance(grad, tf.Tensor)
                or seed is not None or "average" in var_slots or occurrences[id(var)] > 1):
            continue
        by_kind.setdefault((var.dtype, var_slots["m"].dtype, decayed[i]), []).append((i, size))
    out = []
    for members in by_kind.values():
        current, total = [], 0
        for i, size in members:
            if current and total + size > PACK_MAX_TOTAL:
                out.append(current)
                current, total = [], 0
            current.append(i)
            total += size
        out.append(current)
    return [p for p in out if len(p) > 1]


# Without XLA, each op of an update is one pass over the variable's memory.
# Left alone, TensorFlow's executor starts the first ops of every variable's
# update before it finishes any, so the data of all variables is in flight at
# once and every pass comes from DRAM. `UpdateChains` orders the updates of
# variables of at least CHAIN_MIN_ELEMENTS elements into one chain per core
# (an update starts when the previous one of its chain has finished), so the
# data of a few variables at a time stays in cache. Measured on 2 cores,
# float32, in one process against unordered: 10 x 1M elements 13.3 -> 12.1 ms,
# 300 x 33k 19.0 -> 12.6 ms, 300 x 4096 8.5 -> 6.7 ms, 300 x 256 3.3 -> 3.1 ms;
# 300 x 4 elements was slower ordered (3.5 -> 4.0 ms): there the cost is per
# op, not per byte, and the executor runs unordered ops side by side.
CHAIN_MIN_ELEMENTS = 256


@functools.lru_cache(maxsize=None)  # read once: `UpdateChains` is made every step
def _cores(cgroup_root="/sys/fs/cgroup"):
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota.

    In a container limited to 2 CPUs of a 64-core host, the affinity says
    64; one chain per core would then put 64 variables in flight at once.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cpu_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cpu_quota(root):
    """CPUs allowed by the cgroup CPU limit at `root` (quota / period), or None.

    Reads cgroup v2's `cpu.max` ("max 100000" means no limit), at `root` or
    at `root/unified` (hybrid hierarchy), or cgroup v1's
    `cpu/cpu.cfs_quota_us` over `cpu.cfs_period_us` (-1 means no limit).
    Inside a container the limit of the container is at the root; an
    unreadable or malformed file counts as no limit.
    """
    def read(*path):
        try:
            with open(os.path.join(root, *path)) as f:
                return f.read().split()
        except (OSError, UnicodeDecodeError):
            return None
    try:
        for v2 in (("cpu.max",), ("unified", "cpu.max")):
            fields = read(*v2)
            if fields:
                return None if fields[0] == "max" else int(fields[0]) / int(fields[1])
        quota, period = read("cpu", "cpu.cfs_quota_us"), read("cpu", "cpu.cfs_period_us")
        if quota and period and int(quota[0]) > 0:
            return int(quota[0]) / int(period[0])
    except (ValueError, IndexError, ZeroDivisionError):
        pass
    return None


class UpdateChains:
    """Orders the updates of one step without XLA: `chains` chains per device.

    `add(variable, fn)` builds `fn()` (the variable's update) with a control
    dependency on the last update of its chain. Chains are per device, so
    replicas and parameter servers never wait for each other. Variables
    smaller than `min_elements` (or of unknown size) are not ordered, nor
    anything eager or compiled by XLA (the compiler schedules its program).
    """

    def __init__(self, chains=None, min_elements=None):
        self._chains = max(1, chains or _cores())
        self._min_elements = CHAIN_MIN_ELEMENTS if min_elements is None else min_elements
        self._turn = {}  # device -> the chain the next update joins
        self._last = {}  # device -> the last update of each chain

    def add(self, variable, fn):
        elements = variable.shape.num_elements()
        if (elements is None or elements < self._min_elements or tf.executing_eagerly()
                or update_lib.in_xla_context()):
            return fn()
        device = variable.device
        turn = self._turn.get(device, 0)
        last = self._last.setdefault(device, [None] * self._chains)
        with tf.control_dependencies([] if last[turn] is None else [last[turn]]):
            last[turn] = fn()
        self._turn[device] = (turn + 1) % self._chains
        return last[turn]


# At most this many variables go into one compiled update program. One XLA
# launch costs time per variable it reads or writes, and that cost grows with
# the number of variables in the launch (the launch matches every argument
# against the program's input/output aliases); in groups of 16 it stays small.
# Measured with 300 variables of shape [4] per step: one program 29 us/var,
# groups of 100 24, of 20 20, of 10 19.8, of 5 20.7 (benchmark floor of the
# harness included, ~9 us/var on that run).
FUSION_GROUP_SIZE = 16
# Variables of at least this many elements get a program of their own: they
# are bound by memory bandwidth, and separate launches can run concurrently.
# Measured, 10 variables of 1000 x 1000 in one process: one program 8.1 ms,
# one per variable 6.9 ms (8.6 and 8.1 ms in a second, busier run; 9.0 and
# 8.2 ms in the run the README quotes).
LARGE_VARIABLE = 2 ** 18


def fusion_groups(variables, size=FUSION_GROUP_SIZE, large=LARGE_VARIABLE):
    """Indices of `variables` grouped for `device_step`, in order.

    Variables of `large` elements or more (or of unknown size) alone; the
    others in groups of at most `size`. Each group is one compiled program.
    """
    groups, current = [], []
    for i, var in enumerate(variables):
        elements = var.shape.num_elements()
        if elements is None or elements >= large:
            groups.append([i])
            continue
        current.append(i)
        if len(current) == size:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def trace_key(variables):
    """Which traces (and XLA programs) of `device_step` `variables` may share.

    Without a distribution strategy, variables are arguments of the trace:
    groups with the same shapes and dtypes share one trace and one compiled
    program (measured, 19 groups of 16 tiny variables: 6.3 ms per step with
    a program per group, 5.0 ms with one shared). The key holds the exact
    shapes, because `reduce_retracing` would otherwise relax a trace to
    variables of other shapes while the graph keeps the first one's static
    shapes (row counts of exact sparse masks, accumulator masks). Under a
    strategy, `tf.function` captures the per-device variables instead, so a
    trace belongs to the variables it was traced with; shared, it would keep
    updating those (tested). There the key is the variables' identities.
    """
    if not tf.distribute.has_strategy():
        return tuple((None if v.shape.rank is None else tuple(v.shape), v.dtype.name)
                     for v in variables)
    return tuple(getattr(v, "_unique_id", id(v)) for v in variables)


def fusable(distribution, variables):
    """Whether all variables live on the same device(s), so one program can update them.

    Parameter servers and central storage spread variables over devices, and
    a TPU compiles the whole step anyway: those keep one update per variable.
    """
    if type(distribution).__name__.startswith(("ParameterServer", "CentralStorage", "TPU")):
        return False
    placements = set()
    for var in variables:
        if isinstance(var, sharded_variable.ShardedVariable):
            return False
        placements.add(tuple(v.device for v in distribution.experimental_local_results(var)))
        if len(placements) > 1:
            return False
    return True


def seed_key(variable, seed):
    """A per-variable integer for stochastic rounding: the same on every replica.

    Derived from the variable's name (replicas of a mirrored variable share
    it) and the optimizer's `seed`, never from a replica or process id.
    """
    name = variable.name.split(":")[0]
    return (zlib.crc32(name.encode()) + 1_000_003 * seed) % (2 ** 31)
