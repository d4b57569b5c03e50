"""Distribution in one process: default, OneDevice, Mirrored, CentralStorage.

The training problem (`exact_problem.py`) is built so that every gradient is
exact in float32 (small integers divided by a power of two): summing gradients
over replicas in any order gives the same bits as summing them on one device. So training
under a strategy must reproduce single-device training bit for bit, variables
and momenta, in both sparse modes, with and without XLA. (Multi-worker and
parameter-server strategies, which need other processes, are in
test_multiworker.py.)
"""

import platform

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import exact_problem as ep
import numpy_lion as ref
import tf_lion
from conftest import fresh_collective_keys
from tf_lion import distribute as distribute_lib
from tf_lion import step as step_lib
from tf_lion import update as update_lib

VOCAB, DIM, SEQ = ep.VOCAB, ep.DIM, ep.SEQ
BATCH, STEPS = 8, 4
CPUS = ["/cpu:0", "/cpu:1"]


def _strategy(name):
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/cpu:0")
    if name == "mirrored":
        fresh_collective_keys()  # see conftest.py
        return tf.distribute.MirroredStrategy(CPUS)
    if name == "central_storage":
        return tf.distribute.experimental.CentralStorageStrategy(CPUS)
    raise ValueError(name)


def _batches():
    return ep.batches(STEPS, BATCH)


def _loss(params, batch):
    return ep.loss(params, batch, BATCH)  # divided by the *global* batch on every replica


def _optimizer(**kwargs):
    schedule = tf_keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5)
    return tf_lion.Lion(learning_rate=schedule, beta_1=0.9, beta_2=0.99, weight_decay=0.25,
                        **kwargs)


def _initial_params():
    return ep.initial_params()


def _train(strategy, densify=False, **opt_kwargs):
    with strategy.scope():
        params = [tf.Variable(p) for p in _initial_params()]
        opt = _optimizer(**opt_kwargs)

    @tf.function
    def step(batch):
        def replica_fn(batch):
            with tf.GradientTape() as tape:
                loss = _loss(params, batch)
            grads = tape.gradient(loss, params)
            if densify:
                grads = [tf.convert_to_tensor(g) for g in grads]
            opt.apply_gradients(zip(grads, params))
        strategy.run(replica_fn, args=(batch,))

    for batch in _batches():
        def split(ctx, batch=batch):
            n = BATCH // ctx.num_replicas_in_sync
            start = ctx.replica_id_in_sync_group * n
            return {k: tf.constant(v[start:start + n]) for k, v in batch.items()}
        step(strategy.experimental_distribute_values_from_function(split))
    return params, opt


def _state(params, opt):
    return ([p.numpy() for p in params]
            + [opt.get_slot(p, "m").numpy() for p in params]
            + [opt.iterations.numpy()])


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
@pytest.mark.parametrize("name", ["one_device", "mirrored", "central_storage"])
def test_strategy_equals_single_device_bitwise(name, sparse_mode, jit_compile):
    kwargs = dict(sparse_mode=sparse_mode, jit_compile=jit_compile)
    expected = _state(*_train(_strategy("default"), **kwargs))
    got = _state(*_train(_strategy(name), **kwargs))
    _assert_same(got, expected)
    # The run did something: every variable moved, the step count is STEPS.
    initial = _initial_params()
    for p0, p in zip(initial, got[:3]):
        assert np.all(p0 != p) if sparse_mode == "exact" else np.any(p0 != p)
    assert got[-1] == STEPS


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("name", ["mirrored", "central_storage"])
def test_accumulation_with_global_clipnorm_equals_single_device_bitwise(name, jit_compile):
    """The global norm of the averages is taken from one replica's copies (they
    are equal) and the factor reaches every replica."""
    kwargs = dict(sparse_mode="exact", jit_compile=jit_compile, gradient_accumulation_steps=2,
                  global_clipnorm=0.05)
    expected = _state(*_train(_strategy("default"), **kwargs))
    got = _state(*_train(_strategy(name), **kwargs))
    _assert_same(got, expected)
    unclipped = _state(*_train(_strategy("default"), sparse_mode="exact",
                               jit_compile=jit_compile, gradient_accumulation_steps=2))
    # The clipping was active: it scales the momenta (Lion's signs may not change).
    assert any(not np.array_equal(a, b) for a, b in zip(unclipped[:-1], expected[:-1]))


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
@pytest.mark.parametrize("name", ["default", "mirrored", "central_storage"])
def test_ordered_and_fused_updates_without_xla_change_no_bits(name, sparse_mode, monkeypatch):
    """Without XLA, updates of variables of >= CHAIN_MIN_ELEMENTS elements are
    ordered into chains per device (tf_lion/step.py), and those of >=
    FUSED_MIN_ELEMENTS take the fused arithmetic (tf_lion/update.py). Here
    every variable does both (the problem's variables are small): the same
    bits as the plain unordered update, with the fused ops on the variable's
    own device."""
    kwargs = dict(sparse_mode=sparse_mode, jit_compile=False)
    monkeypatch.setattr(step_lib, "PACK_MAX_ELEMENTS", 0)  # see the next test
    expected = _state(*_train(_strategy("default"), **kwargs))
    chained, fused = [], []
    add = step_lib.UpdateChains.add
    monkeypatch.setattr(step_lib, "CHAIN_MIN_ELEMENTS", 1)
    monkeypatch.setattr(update_lib, "FUSED_MIN_ELEMENTS", 1)
    monkeypatch.setattr(step_lib.UpdateChains, "add",
                        lambda self, v, fn: (chained.append(v.device), add(self, v, fn))[1])
    fused_add_scaled = update_lib._fused_add_scaled

    def spy(x, a, y):
        out = fused_add_scaled(x, a, y)
        fused.append(out.op.device)
        return out
    monkeypatch.setattr(update_lib, "_fused_add_scaled", spy)
    got = _state(*_train(_strategy(name), **kwargs))
    _assert_same(got, expected)
    # Each trace orders the 3 variables on each device (mirrored: 2 devices).
    devices = set(chained)
    assert len(devices) == (2 if name == "mirrored" else 1)
    assert all(chained.count(d) % 3 == 0 and chained.count(d) > 0 for d in devices)
    # The temporaries are put where the variables live (x86-64 CPUs only).
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert fused and {tf.DeviceSpec.from_string(d) for d in fused} == \
            {tf.DeviceSpec.from_string(d) for d in devices}
    else:
        assert not fused


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
@pytest.mark.parametrize("name", ["default", "mirrored", "central_storage"])
def test_packed_small_variables_without_xla_change_no_bits(name, sparse_mode, monkeypatch):
    """Without XLA the small dense variables of a device (here the kernel and
    the bias) are updated together (`step.packs`): the same bits as one
    update each. Central storage spreads the update over devices: no packs."""
    kwargs = dict(sparse_mode=sparse_mode, jit_compile=False)
    monkeypatch.setattr(step_lib, "PACK_MAX_ELEMENTS", 0)
    expected = _state(*_train(_strategy("default"), **kwargs))
    monkeypatch.undo()
    packed = []
    packed_dense_update = update_lib.packed_dense_update

    def spy(variables, *args, **kwargs):
        packed.append(([v.shape.as_list() for v in variables], variables[0].device))
        return packed_dense_update(variables, *args, **kwargs)
    monkeypatch.setattr(update_lib, "packed_dense_update", spy)
    got = _state(*_train(_strategy(name), **kwargs))
    _assert_same(got, expected)
    if name == "central_storage":
        assert packed == []
    else:  # traced once per device (mirrored: 2)
        assert {tuple(map(tuple, shapes)) for shapes, _ in packed} == {((DIM, ep.OUT), (ep.OUT,))}
        assert len({device for _, device in packed}) == (2 if name == "mirrored" else 1)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_mirrored_sparse_exact_equals_dense_path(jit_compile):
    """Gathered IndexedSlices in exact mode == the same gradients densified."""
    mirrored = _strategy("mirrored")
    sparse = _state(*_train(mirrored, sparse_mode="exact", jit_compile=jit_compile))
    dense = _state(*_train(mirrored, densify=True, jit_compile=jit_compile))
    _assert_same(sparse, dense)


def test_mirrored_replicas_stay_identical():
    params, opt = _train(_strategy("mirrored"), sparse_mode="lazy")
    for var in params + [opt.get_slot(p, "m") for p in params]:
        first, second = [v.numpy() for v in var.values]
        np.testing.assert_array_equal(first, second)


def test_optimizer_receives_gathered_indexed_slices(monkeypatch):
    """Under Mirrored the update sees replicas x rows indices, in replica order."""
    seen = []
    original = update_lib.lazy_sparse_update

    def spy(variable, momentum, indices, values, *args):
        seen.append((indices.shape.as_list(), values.shape.as_list(), indices))
        return original(variable, momentum, indices, values, *args)

    monkeypatch.setattr(update_lib, "lazy_sparse_update", spy)
    strategy = _strategy("mirrored")
    with strategy.scope():
        table = tf.Variable(tf.zeros([VOCAB, DIM]))
        opt = tf_lion.Lion(learning_rate=0.1, sparse_mode="lazy", jit_compile=False)

    def replica_fn():
        r = tf.distribute.get_replica_context().replica_id_in_sync_group
        grad = tf.IndexedSlices(tf.ones([3, DIM]) * tf.cast(r + 1, tf.float32),
                                tf.constant([1, 2, 2]) + 3 * r, tf.constant([VOCAB, DIM]))
        opt.apply_gradients([(grad, table)])

    tf.function(lambda: strategy.run(replica_fn))()
    assert len(seen) >= 2  # (traced) once per replica's copy of the table
    for indices_shape, values_shape, _ in seen:  # gathered (replicas x 3 rows), never densified
        assert tf.TensorShape(indices_shape).is_compatible_with([6])
        assert tf.TensorShape(values_shape).is_compatible_with([6, DIM])
    # Rows 1, 2 (replica 0) and 4, 5 (replica 1) moved by lr * sign(+): -0.1 each.
    expected = np.zeros([VOCAB, DIM], np.float32)
    expected[[1, 2, 4, 5]] = -0.1
    for copy in table.values:
        np.testing.assert_array_equal(copy.numpy(), expected)


def test_all_gather_indexed_slices_order_and_shape():
    strategy = _strategy("mirrored")

    def replica_fn():
        r = tf.distribute.get_replica_context().replica_id_in_sync_group
        grad = tf.IndexedSlices(tf.fill([2, 1], tf.cast(r, tf.float32)),
                                tf.constant([7, 8]) + r, tf.constant([10, 1]))
        out = distribute_lib.all_gather_indexed_slices(grad, tf.distribute.get_replica_context())
        return out.indices, out.values, out.dense_shape

    indices, values, shape = tf.function(lambda: strategy.run(replica_fn))()
    for i in range(2):
        np.testing.assert_array_equal(indices.values[i].numpy(), [7, 8, 8, 9])
        np.testing.assert_array_equal(values.values[i].numpy()[:, 0], [0, 0, 1, 1])
        np.testing.assert_array_equal(shape.values[i].numpy(), [10, 1])


@pytest.mark.parametrize("name", ["mirrored", "central_storage", "one_device"])
def test_slots_are_the_strategys_variables_next_to_their_variable(name):
    strategy = _strategy(name)
    params, opt = _train(strategy, sparse_mode="lazy", jit_compile=False)
    for var in params:
        slot = opt.get_slot(var, "m")
        if name == "mirrored":
            assert type(slot) is type(var)
            assert isinstance(slot, tf.distribute.DistributedValues)
            assert [v.device for v in slot.values] == [v.device for v in var.values]
        else:
            assert not isinstance(slot, tf.distribute.DistributedValues) or name == "central_storage"
            assert slot.device == var.device


def test_keras_model_under_mirrored_matches_single_device_within_rounding():
    """A real Keras model: replicas sum partial gradients in another order.

    The gradient sums then differ by float32 rounding, which can flip sign(c)
    only where c is within rounding of zero; elsewhere the parameters agree to
    float32 rounding of `theta - lr * ...`. We require momenta equal to 1e-5
    relative and at most a handful of elements flipped by 2 * lr per step.
    """
    def run(strategy):
        with strategy.scope():
            tf_keras.utils.set_random_seed(1)
            model = tf_keras.Sequential([tf_keras.layers.Embedding(VOCAB, DIM),
                                         tf_keras.layers.GlobalAveragePooling1D(),
                                         tf_keras.layers.Dense(1)])
            model.build((None, SEQ))
            opt = tf_lion.Lion(learning_rate=1e-3, weight_decay=0.1)
            model.compile(optimizer=opt, loss="mse")
        rng = np.random.default_rng(7)
        x = rng.integers(0, VOCAB, (64, SEQ))
        y = rng.standard_normal((64, 1)).astype(np.float32)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        return [w.numpy() for w in model.trainable_weights], [
            opt.get_slot(w, "m").numpy() for w in model.trainable_weights]

    (w1, m1), (w2, m2) = run(_strategy("default")), run(_strategy("mirrored"))
    for a, b in zip(m1, m2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    flips = sum(int(np.sum(np.abs(a - b) > 1e-6)) for a, b in zip(w1, w2))
    total = sum(a.size for a in w1)
    assert flips <= max(1, total // 50), f"{flips} of {total} parameters differ beyond rounding"


# --------------------------------------------------------------------------- #
# Wrong use
# --------------------------------------------------------------------------- #
def test_apply_gradients_in_cross_replica_context_is_an_error():
    strategy = _strategy("mirrored")
    with strategy.scope():
        var = tf.Variable([1.0, 2.0])
        opt = tf_lion.Lion()
        with pytest.raises(RuntimeError, match="cross-replica context.*strategy.run"):
            opt.apply_gradients([(tf.ones([2]), var)])
    assert opt.iterations.numpy() == 0
    np.testing.assert_array_equal(var.numpy(), [1.0, 2.0])


@pytest.mark.parametrize("jit_compile", [True, False])
def test_per_replica_gradients_in_cross_replica_context(jit_compile):
    """Per-replica gradients (`strategy.run`'s result) applied outside `run`: the
    documented RuntimeError unless aggregation is skipped; skipped, each
    replica's variable takes its own replica's gradient (here all-reduced, so
    the same on both)."""
    strategy = _strategy("mirrored")
    with strategy.scope():
        var = tf.Variable([1.0, 2.0, 3.0])
        opt = tf_lion.Lion(0.1, jit_compile=jit_compile)

    def replica_grad():
        ctx = tf.distribute.get_replica_context()
        g = tf.constant([1.0, -1.0, 0.5]) * tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32)
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, g)

    grads = strategy.run(replica_grad)
    assert isinstance(grads, tf.distribute.DistributedValues)
    with strategy.scope():
        with pytest.raises(RuntimeError, match="cross-replica context"):
            opt.apply_gradients([(grads, var)])
        assert opt.iterations.numpy() == 0
        opt.apply_gradients([(grads, var)], skip_gradients_aggregation=True)
    assert opt.iterations.numpy() == 1
    for v in var.values:
        np.testing.assert_allclose(v.numpy(), [0.9, 2.1, 2.9], rtol=1e-6)


def test_per_replica_gradient_of_another_shape_on_one_replica_is_an_error():
    strategy = _strategy("mirrored")
    with strategy.scope():
        var = tf.Variable([1.0, 2.0, 3.0, 4.0], name="kernel")
        opt = tf_lion.Lion(0.1)
    grads = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.ones([4]) if ctx.replica_id_in_sync_group == 0 else tf.ones([1]))
    with strategy.scope():
        with pytest.raises(ValueError, match="kernel.*shape"):
            opt.apply_gradients([(grads, var)], skip_gradients_aggregation=True)
    assert opt.iterations.numpy() == 0
    for v in var.values:
        np.testing.assert_array_equal(v.numpy(), [1.0, 2.0, 3.0, 4.0])


def test_variable_created_outside_scope_is_an_error():
    strategy = _strategy("mirrored")
    outside = tf.Variable([1.0, 2.0], name="outside_var")
    with strategy.scope():
        opt = tf_lion.Lion()

    def replica_fn():
        opt.apply_gradients([(tf.ones([2]), outside)])

    with pytest.raises(ValueError, match="'outside_var.*outside the scope of the current "
                                         "MirroredStrategy"):
        strategy.run(replica_fn)
    np.testing.assert_array_equal(outside.numpy(), [1.0, 2.0])


def test_variable_of_another_strategy_is_an_error():
    first, second = _strategy("mirrored"), _strategy("mirrored")
    with first.scope():
        var = tf.Variable([1.0, 2.0], name="first_var")
    with second.scope():
        opt = tf_lion.Lion()
    with pytest.raises(ValueError, match="'first_var:0' belongs to MirroredStrategy.*"
                                         "under another MirroredStrategy"):
        second.run(lambda: opt.apply_gradients([(tf.ones([2]), var)]))


def test_mirrored_variable_outside_any_scope_is_an_error():
    strategy = _strategy("mirrored")
    with strategy.scope():
        var = tf.Variable([1.0, 2.0], name="mirrored_var")
    opt = tf_lion.Lion()
    with pytest.raises(ValueError, match="'mirrored_var:0'.*inside `strategy.run`"):
        opt.apply_gradients([(tf.ones([2]), var)])


def test_optimizer_of_one_strategy_used_under_another_is_an_error():
    first, second = _strategy("mirrored"), _strategy("central_storage")
    with first.scope():
        opt = tf_lion.Lion()
    with second.scope():
        var = tf.Variable([1.0, 2.0])
    with pytest.raises(ValueError, match="created or first used under MirroredStrategy.*"
                                         "under CentralStorageStrategy"):
        second.run(lambda: opt.apply_gradients([(tf.ones([2]), var)]))


def test_optimizer_first_used_outside_any_scope_is_bound_to_it():
    opt = tf_lion.Lion()
    plain = tf.Variable([1.0])
    opt.apply_gradients([(tf.ones([1]), plain)])
    strategy = _strategy("mirrored")
    with strategy.scope():
        var = tf.Variable([1.0])
    with pytest.raises(ValueError, match="first used under no strategy.*under MirroredStrategy"):
        strategy.run(lambda: opt.apply_gradients([(tf.ones([1]), var)]))


def test_optimizer_created_outside_scope_binds_to_first_strategy():
    """The common Keras pattern: `Lion()` outside, `model.compile` inside the scope."""
    opt = tf_lion.Lion(learning_rate=0.5, jit_compile=False)
    strategy = _strategy("mirrored")
    with strategy.scope():
        var = tf.Variable([1.0, -1.0])
    tf.function(lambda: strategy.run(
        lambda: opt.apply_gradients([(tf.constant([1.0, -1.0]), var)])))()
    for copy in var.values:
        np.testing.assert_array_equal(copy.numpy(), [0.5, -0.5])  # summed gradient [2, -2]


@pytest.mark.parametrize("shared", ["indices", "values", "dense"])
@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("name", ["mirrored", "central_storage"])
def test_gradient_tensors_shared_by_all_replicas_are_summed(name, shared, jit_compile):
    """A tensor captured from outside `strategy.run` is the same object on every
    replica; TensorFlow's collectives take it for an agreed value and return it
    ungathered unless each replica passes its own (`distribute._own`). all_reduce
    (dense) sums it correctly; tested too."""
    strategy = _strategy(name)
    with strategy.scope():
        table = tf.Variable(tf.zeros([6, 2]), name="table")
        opt = tf_lion.Lion(0.1, beta_1=0.9, beta_2=0.99, jit_compile=jit_compile)
    ones = tf.ones([2, 2])

    @tf.function
    def step(indices, replica_indices):
        def replica_fn(replica_indices):
            if shared == "dense":
                grad = tf.scatter_nd(indices[:, None], ones, [6, 2])  # the same object
            elif shared == "indices":
                grad = tf.IndexedSlices(tf.ones([2, 2]), indices, tf.constant([6, 2]))
            else:
                grad = tf.IndexedSlices(ones, replica_indices, tf.constant([6, 2]))
            opt.apply_gradients([(grad, table)])
        strategy.run(replica_fn, args=(replica_indices,))

    def per_replica(ctx):
        return tf.constant([0, 5]) if ctx.replica_id_in_sync_group == 0 else tf.constant([5, 2])
    replica_indices = strategy.experimental_distribute_values_from_function(per_replica)
    step(tf.constant([0, 5]), replica_indices)
    rows = [0, 5, 0, 5] if shared != "values" else [0, 5, 5, 2]
    g = np.zeros([6, 2], np.float32)
    np.add.at(g, rows, 1.0)
    _, m, _ = ref.step(np.zeros([6, 2], np.float32), np.zeros([6, 2], np.float32), g,
                       0.1, 0.9, 0.99)
    np.testing.assert_array_equal(opt.get_slot(table, "m").numpy(), m)


@pytest.mark.parametrize("aggregation", ["NONE", "SUM", "MEAN", "ONLY_FIRST_REPLICA"])
def test_constraints_apply_once_whatever_the_variables_aggregation(aggregation):
    """The constraint runs on each local copy in a cross-replica context: run
    in a replica context, a SUM-aggregated variable summed the replicas'
    constrained values (tf-keras does)."""
    strategy = _strategy("mirrored")
    with strategy.scope():
        v = tf.Variable([1.0, -1.0, 0.25], name="v", constraint=lambda x: tf.minimum(x, 0.5),
                        aggregation=getattr(tf.VariableAggregation, aggregation))
        opt = tf_lion.Lion(0.25, beta_1=0.5, beta_2=0.75, jit_compile=False)

    @tf.function
    def step():
        strategy.run(lambda: opt.apply_gradients([(tf.constant([-1.0, 1.0, -1.0]), v)]))

    step()
    expected = np.minimum(np.float32([1.25, -1.25, 0.5]), 0.5)
    for local in strategy.experimental_local_results(v):
        np.testing.assert_array_equal(local.numpy(), expected)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_variables_of_different_float_dtypes_in_one_step(jit_compile):
    """One all_reduce batch per dtype: a batch is packed into one tensor, and
    float16 next to float32 crashed in TensorFlow's concat (tf-keras too)."""
    strategy = _strategy("mirrored")
    dtypes = [tf.float32, tf.float16, tf.float64, tf.bfloat16]
    with strategy.scope():
        variables = [tf.Variable([1.0, -1.0], dtype=d, name=d.name) for d in dtypes]
        # Betas whose every result is exact in each dtype: the same bits everywhere.
        opt = tf_lion.Lion(0.25, beta_1=0.5, beta_2=0.75, jit_compile=jit_compile)

    @tf.function
    def step():
        def replica_fn():
            grads = [tf.cast(tf.constant([0.5, -2.0]), d) for d in dtypes]
            opt.apply_gradients(zip(grads, variables))
        strategy.run(replica_fn)

    step()
    g = np.float32([1.0, -4.0])  # summed over the two replicas
    theta, m, _ = ref.step(np.float32([1.0, -1.0]), np.zeros(2, np.float32), g, 0.25, 0.5, 0.75)
    np.testing.assert_array_equal(m, [0.25, -1.0])
    for v in variables:
        np.testing.assert_array_equal(v.numpy().astype(np.float32), theta, err_msg=v.name)
        np.testing.assert_array_equal(opt.get_slot(v, "m").numpy().astype(np.float32), m,
                                      err_msg=v.name)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_cross_replica_sparse_gradient_stays_sparse(jit_compile):
    """Gradients already reduced in a merge_call (as LossScaleOptimizer does) are
    per-replica values: applied as they are, never converted to one dense tensor
    (lazy mode would then decay every row)."""
    strategy = _strategy("mirrored")
    with strategy.scope():
        table = tf.Variable(tf.ones([4, 2]))
        opt = tf_lion.Lion(0.1, sparse_mode="lazy", weight_decay=0.5, jit_compile=jit_compile)

    def merge_fn(strategy, grad):
        reduced = strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM, [(grad, table)])
        return opt.apply_gradients([(reduced[0], table)], skip_gradients_aggregation=True)

    @tf.function
    def step():
        def replica_fn():
            grad = tf.IndexedSlices(tf.ones([1, 2]), tf.constant([1]), tf.constant([4, 2]))
            return tf.distribute.get_replica_context().merge_call(merge_fn, args=(grad,))
        strategy.run(replica_fn)

    step()
    expected = np.ones([4, 2], np.float32)
    expected[1] = ref.step(np.ones([1, 2], np.float32), np.zeros([1, 2], np.float32),
                           np.full([1, 2], 2.0, np.float32), 0.1, 0.9, 0.99, 0.5)[0]
    for replica in table.values:
        np.testing.assert_array_equal(replica.numpy(), expected)
