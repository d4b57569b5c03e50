"""`tf.distribute` plumbing for tf_lion: gradient aggregation and strategy checks.

Nothing here knows Lion's formula. In `apply_gradients` the optimizer calls
`check_strategy` and `check_variables` first, then `aggregate_gradients` in
the replica context, before it updates anything.

Sparse gradients stay sparse. tf-keras sums gradients with
`ReplicaContext.all_reduce`, which concatenates `tf.IndexedSlices` under
MirroredStrategy but densifies them on TPU (`cross_replica_sum` of a
table-sized tensor). `all_gather_indexed_slices` gathers the indices and the
values of every replica instead: the result has `replicas x rows` rows, a
static shape, and costs what the batch costs, whatever the table's size.
Duplicate indices (within or across replicas) are summed later by the
update's static-shape deduplication.
"""

import tensorflow as tf

__all__ = [
    "all_gather_indexed_slices",
    "aggregate_gradients",
    "check_replica_context",
    "check_strategy",
    "check_variables",
]


def _collective_dtype(dtype):
    """bfloat16 travels as float32 except on TPUs (CPU/GPU collectives lack bfloat16)."""
    if dtype == tf.bfloat16 and not _on_tpu():
        return tf.float32
    return dtype


def _on_tpu():
    strategy = tf.distribute.get_strategy()
    return type(strategy).__name__.startswith("TPUStrategy")


def all_gather_indexed_slices(grad, replica_context):
    """The `tf.IndexedSlices` of all replicas, concatenated in replica order.

    Args:
      grad: this replica's `tf.IndexedSlices`.
      replica_context: the current `tf.distribute.ReplicaContext`.

    Returns:
      `tf.IndexedSlices` with the indices and values of replica 0, then
      replica 1, ..., and `grad`'s `dense_shape`. Every replica gets the same.
    """
    indices = replica_context.all_gather(_own(grad.indices), axis=0)
    values = grad.values
    values = replica_context.all_gather(
        _own(tf.cast(values, _collective_dtype(values.dtype))), axis=0)
    return tf.IndexedSlices(values, indices, grad.dense_shape)


def _own(tensor):
    """This replica's own tensor object for a collective.

    When every replica passes the same tensor (one captured from outside
    `strategy.run`, such as a step input), TensorFlow takes it for a value
    the replicas already agree on and returns it ungathered (MirroredStrategy,
    CentralStorageStrategy): indices of one replica next to the values of all,
    or one replica's gradient dropped. An identity per replica keeps them apart.
    """
    return tf.identity(tensor)


def aggregate_gradients(grads_and_vars):
    """Sums gradients over the replicas in sync; sparse ones by gathering.

    A no-op outside a replica context with more than one replica in sync (the
    default strategy, OneDeviceStrategy, each ParameterServerStrategy worker).
    Dense gradients are summed with one batched `all_reduce` per dtype (a
    batch is packed into one tensor: float16 next to float32 would not
    pack); `None` gradients are kept as they are. bfloat16 gradients are
    summed (gathered) in float32 except on TPUs: TensorFlow's CPU/GPU
    collectives have no bfloat16, and the update computes in float32 anyway.
    """
    grads_and_vars = list(grads_and_vars)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return grads_and_vars
    grads = [g for g, _ in grads_and_vars]
    by_dtype = {}
    for i, g in enumerate(grads):
        if g is not None and not isinstance(g, tf.IndexedSlices):
            by_dtype.setdefault(_collective_dtype(g.dtype), []).append(i)
    for dtype, dense in by_dtype.items():
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                    [tf.cast(grads[i], dtype) for i in dense])
        for i, g in zip(dense, summed):
            grads[i] = g
    for i, g in enumerate(grads):
        if isinstance(g, tf.IndexedSlices):
            grads[i] = all_gather_indexed_slices(g, context)
    return list(zip(grads, [v for _, v in grads_and_vars]))


def check_replica_context(optimizer_name):
    """RuntimeError unless gradients may be applied here.

    Inside `strategy.scope()` but outside `strategy.run` there is no replica
    context: each replica's gradients must be applied from its own replica.
    """
    if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
        strategy = tf.distribute.get_strategy()
        raise RuntimeError(
            f"Optimizer '{optimizer_name}': `apply_gradients` was called in a cross-replica "
            f"context of {type(strategy).__name__} (inside `strategy.scope()` but outside "
            "`strategy.run`). Call it in the function you pass to `strategy.run`, with each "
            "replica's gradients; the optimizer aggregates them across replicas. (Gradients "
            "already aggregated may be applied here with skip_gradients_aggregation=True.)"
        )


def _owner(variable):
    """The strategy a (possibly distributed) variable was created under, if any."""
    return getattr(variable, "_distribute_strategy", None)


def _describe(strategy):
    name = type(strategy).__name__
    return "no strategy (outside any scope)" if name.startswith("_Default") else name


def check_strategy(bound, optimizer_name):
    """The current strategy, or ValueError if the optimizer belongs to another.

    An optimizer belongs to the strategy it was created under, or, if it was
    created outside any scope, to the one it first applies gradients under.
    Its slots were created as that strategy's variables.
    """
    current = tf.distribute.get_strategy()
    if bound is not None and bound is not current:
        raise ValueError(
            f"Optimizer '{optimizer_name}' was created or first used under "
            f"{_describe(bound)}, but is now applying gradients under "
            f"{_describe(current)}. An optimizer's state belongs to one strategy: create a "
            "new optimizer (restore it from a checkpoint to carry the momentum over)."
        )
    return current


def check_variables(variables, optimizer_name):
    """ValueError naming the first variable that does not belong to the current strategy.

    Under a strategy, every variable must have been created in its scope (a
    variable created outside it exists on one device only, and replicas would
    update it once each); outside any strategy, a distributed variable cannot
    be updated either.
    """
    current = tf.distribute.get_strategy()
    in_scope = tf.distribute.has_strategy()
    for variable in variables:
        owner = _owner(variable)
        if in_scope and owner is None and current.num_replicas_in_sync > 1:
            raise ValueError(
                f"Optimizer '{optimizer_name}': variable '{variable.name}' was created outside "
                f"the scope of the current {type(current).__name__}, so it is not replicated. "
                "Create the model (and its variables) inside `strategy.scope()`."
            )
        if owner is not None and owner is not current and in_scope:
            other = "another " if type(owner) is type(current) else ""
            raise ValueError(
                f"Optimizer '{optimizer_name}': variable '{variable.name}' belongs to "
                f"{_describe(owner)}, but gradients are being applied under "
                f"{other}{_describe(current)}. Train a model under the strategy that created it."
            )
        if owner is not None and not in_scope and owner.num_replicas_in_sync > 1:
            raise ValueError(
                f"Optimizer '{optimizer_name}': variable '{variable.name}' belongs to "
                f"{type(owner).__name__}; apply its gradients inside `strategy.run` under "
                "`strategy.scope()`."
            )
