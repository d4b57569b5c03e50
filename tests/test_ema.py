"""EMA (`use_ema`): numpy reference, sparse updates, MirroredStrategy, restore."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import exact_problem as ep
import tf_lion
from conftest import fresh_collective_keys

B, STEPS, EMA = 8, 5, 0.75


def _optimizer(**kwargs):
    return tf_lion.Lion(0.01, weight_decay=0.1, use_ema=True, ema_momentum=EMA,
                        jit_compile=False, **kwargs)


def _train(strategy, opt_kwargs, batches, params=None, opt=None, record=None):
    with strategy.scope():
        params = params or [tf.Variable(p) for p in ep.initial_params()]
        opt = opt or _optimizer(**opt_kwargs)

    @tf.function
    def step(batch):
        def replica_fn(batch):
            opt.apply_gradients(zip(ep.gradients(params, batch, B), params))
        strategy.run(replica_fn, args=(batch,))

    for batch in batches:
        def split(ctx, batch=batch):
            n = B // ctx.num_replicas_in_sync
            start = ctx.replica_id_in_sync_group * n
            return {k: tf.constant(v[start:start + n]) for k, v in batch.items()}
        step(strategy.experimental_distribute_values_from_function(split))
        if record is not None:
            record.append([p.numpy() for p in params])
    return params, opt


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_ema_matches_numpy_reference_with_sparse_updates(sparse_mode):
    """average_t = ema * average_{t-1} + (1 - ema) * theta_t, from theta_0."""
    history = []
    params, opt = _train(tf.distribute.get_strategy(), dict(sparse_mode=sparse_mode),
                         ep.batches(STEPS, B), record=history)
    ema = np.float32(EMA)
    for i, theta0 in enumerate(ep.initial_params()):
        average = theta0.copy()
        for values in history:
            average = ema * average + (np.float32(1) - ema) * values[i]
        np.testing.assert_array_equal(opt.get_slot(params[i], "average").numpy(), average)
    # In lazy mode the table's untouched rows keep their value, so their
    # average stays theta_0 (ids use only the first half of the vocabulary).
    if sparse_mode == "lazy":
        table_avg = opt.get_slot(params[0], "average").numpy()
        np.testing.assert_array_equal(table_avg[ep.VOCAB // 2:], ep.initial_params()[0][ep.VOCAB // 2:])


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_ema_under_mirrored_equals_single_device(sparse_mode):
    batches = ep.batches(STEPS, B)
    p1, o1 = _train(tf.distribute.get_strategy(), dict(sparse_mode=sparse_mode), batches)
    fresh_collective_keys()
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    p2, o2 = _train(mirrored, dict(sparse_mode=sparse_mode), batches)
    ep.assert_same(ep.state(p1, o1, ("m", "average")), ep.state(p2, o2, ("m", "average")))
    for p in p2:
        first, second = (v.numpy() for v in o2.get_slot(p, "average").values)
        np.testing.assert_array_equal(first, second)


def test_ema_survives_checkpoint_restore_and_finalize(tmp_path):
    batches = ep.batches(6, B)
    default = tf.distribute.get_strategy()
    kwargs = dict(sparse_mode="lazy", ema_overwrite_frequency=4)
    expected_params, expected_opt = _train(default, kwargs, batches)
    expected = ep.state(expected_params, expected_opt, ("m", "average"))

    params, opt = _train(default, kwargs, batches[:3])
    path = tf.train.Checkpoint(params=params, optimizer=opt).save(str(tmp_path / "c"))
    params = [tf.Variable(tf.zeros_like(p)) for p in params]
    opt = _optimizer(**kwargs)
    tf.train.Checkpoint(params=params, optimizer=opt).restore(path)
    params, opt = _train(default, kwargs, batches[3:], params=params, opt=opt)
    ep.assert_same(ep.state(params, opt, ("m", "average")), expected)

    opt.finalize_variable_values(params)
    for p in params:
        np.testing.assert_array_equal(p.numpy(), opt.get_slot(p, "average").numpy())


def test_ema_overwrite_frequency_counts_applied_steps_under_accumulation():
    """With N=2 and overwrite every 2 applied steps: overwritten at call 4 only."""
    var = tf.Variable([1.0, -1.0])
    opt = tf_lion.Lion(0.1, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2,
                       gradient_accumulation_steps=2, jit_compile=False)
    seen = []
    for _ in range(5):
        opt.apply_gradients([(tf.constant([1.0, -1.0]), var)])
        seen.append((var.numpy().copy(), opt.get_slot(var, "average").numpy().copy()))
    # Call 2 applies step 1: var = [0.9, -0.9], average = 0.5*1 + 0.5*0.9 = 0.95.
    np.testing.assert_allclose(seen[1][0], [0.9, -0.9], rtol=1e-6)
    np.testing.assert_allclose(seen[1][1], [0.95, -0.95], rtol=1e-6)
    # Call 4 applies step 2 (var 0.8, average 0.875) and overwrites var with it.
    np.testing.assert_array_equal(seen[3][0], seen[3][1])
    np.testing.assert_allclose(seen[3][0], [0.875, -0.875], rtol=1e-6)
    np.testing.assert_array_equal(seen[4][0], seen[3][0])  # call 5 only accumulates


def test_finalize_outside_the_strategy_scope_writes_every_replica():
    """A custom loop calls `finalize_variable_values` after training, outside the scope."""
    fresh_collective_keys()
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    params, opt = _train(mirrored, dict(sparse_mode="exact"), ep.batches(3, B))
    averages = [[v.numpy() for v in opt.get_slot(p, "average").values] for p in params]
    assert not all(np.array_equal(p.values[0].numpy(), a[0]) for p, a in zip(params, averages))
    opt.finalize_variable_values(params)
    for p, replicas in zip(params, averages):
        for value, average in zip(p.values, replicas):
            np.testing.assert_array_equal(value.numpy(), average)


def test_finalize_names_a_variable_without_an_average():
    var, stranger = tf.Variable([1.0, 2.0], name="seen"), tf.Variable([3.0], name="stranger")
    opt = _optimizer()
    opt.apply_gradients([(tf.constant([1.0, 1.0]), var)])
    before = var.numpy()
    assert not np.array_equal(before, opt.get_slot(var, "average").numpy())
    with pytest.raises(KeyError, match="stranger"):
        opt.finalize_variable_values([var, stranger])
    np.testing.assert_array_equal(var.numpy(), before)  # nothing overwritten
    np.testing.assert_array_equal(stranger.numpy(), [3.0])


def test_finalize_and_exclusion_take_a_partitioned_variable_as_its_shards():
    """A `ShardedVariable` (ParameterServerStrategy) stands for all its shards."""
    from tensorflow.python.distribute import sharded_variable
    shards = [tf.Variable([[1.0, 1.0]], name="table/part_0"),
              tf.Variable([[1.0, 1.0], [1.0, 1.0]], name="table/part_1")]
    table = sharded_variable.ShardedVariable(shards)
    other = tf.Variable([1.0], name="other")
    opt = _optimizer()  # weight_decay 0.1, learning rate 0.01
    opt.exclude_from_weight_decay(var_list=[table])
    opt.apply_gradients(zip([tf.zeros([1, 2]), tf.zeros([2, 2]), tf.zeros([1])],
                            shards + [other]))
    for shard in shards:  # zero gradient and no decay: unchanged
        np.testing.assert_array_equal(shard.numpy(), np.ones(shard.shape))
    # Decayed (the rounding of lr * wd * theta depends on the order of the product).
    np.testing.assert_allclose(other.numpy(), [1 - 0.01 * 0.1], rtol=1e-6)
    for shard in shards:
        opt.get_slot(shard, "average").assign(tf.fill(shard.shape, 5.0))
    opt.finalize_variable_values([table])
    for shard in shards:
        np.testing.assert_array_equal(shard.numpy(), np.full(shard.shape, 5.0))


def test_finalize_before_any_step_of_an_optimizer_created_outside_the_scope(tmp_path):
    """Built by `load_weights` + `build` under MirroredStrategy, never stepped (so
    not bound to the strategy yet): finalize works in and outside the scope."""
    fresh_collective_keys()
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x = np.arange(48, dtype=np.float32).reshape(16, 3) / 48
    y = np.ones((16, 2), np.float32)
    with mirrored.scope():
        model = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,))])
        model.compile(tf_lion.Lion(0.1, use_ema=True, ema_momentum=0.5, jit_compile=False), "mse")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    for v in model.trainable_variables:
        v.assign(v + 1.0)  # away from the averages
    model.save_weights(str(tmp_path / "w"))
    averages = [model.optimizer.get_slot(v, "average").numpy() for v in model.trainable_variables]

    for inside in (True, False):
        opt = tf_lion.Lion(0.1, use_ema=True, ema_momentum=0.5, jit_compile=False)
        with mirrored.scope():
            fresh = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,))])
            fresh.compile(opt, "mse")
            fresh.load_weights(str(tmp_path / "w"))
            opt.build(fresh.trainable_variables)
        if inside:
            with mirrored.scope():
                opt.finalize_variable_values(fresh.trainable_variables)
        else:
            opt.finalize_variable_values(fresh.trainable_variables)
        for v, average in zip(fresh.trainable_variables, averages):
            for replica in v.values:
                np.testing.assert_array_equal(replica.numpy(), average)
