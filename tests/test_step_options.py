"""Gradient accumulation, loss scaling, LossScaleOptimizer and skip_nonfinite.

Most comparisons use `exact_problem`: its gradients are exact in float32, so
runs that are mathematically equal must agree bit for bit.
"""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import exact_problem as ep
import tf_lion
from conftest import fresh_collective_keys

B = 8  # micro-batch


def _schedule(decay_steps):
    return tf_keras.optimizers.schedules.ExponentialDecay(
        0.01, decay_steps=decay_steps, decay_rate=0.5, staircase=True)


def _run(opt, batches, denominator, step_fn=None, params=None, scale=None):
    params = params or [tf.Variable(p) for p in ep.initial_params()]

    def step(batch):
        grads = ep.gradients(params, batch, denominator, scale)
        opt.apply_gradients(zip(grads, params))

    step = step_fn or tf.function(step)
    for batch in batches:
        step({k: tf.constant(v) for k, v in batch.items()})
    return params


# --------------------------------------------------------------------------- #
# Gradient accumulation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_accumulating_4_micro_batches_equals_the_4x_batch(sparse_mode, jit_compile):
    micro = ep.batches(12, B)
    big = [ep.concat(micro[i:i + 4]) for i in range(0, 12, 4)]
    # Every call counts for the schedule: the applying call of big step k sees
    # iterations 4k + 3, which decay_steps=4 maps to the big run's k.
    acc_opt = tf_lion.Lion(_schedule(4), weight_decay=0.25, sparse_mode=sparse_mode,
                           jit_compile=jit_compile, gradient_accumulation_steps=4, use_ema=True)
    ref_opt = tf_lion.Lion(_schedule(1), weight_decay=0.25, sparse_mode=sparse_mode,
                           jit_compile=jit_compile, use_ema=True)
    acc = _run(acc_opt, micro, B)  # mean over each micro-batch, averaged over 4 calls
    ref = _run(ref_opt, big, 4 * B)  # mean over the 4x batch
    got, expected = (ep.state(acc, acc_opt, ("m", "average")),
                     ep.state(ref, ref_opt, ("m", "average")))
    if jit_compile:
        # Two different XLA programs (the accumulated one applies the dense
        # rule to the averaged table; the reference applies the sparse rule)
        # contract multiply-adds differently: one rounding per operation and
        # step, see numpy_lion.assert_fused_step_close. Signs agree here.
        for key in got:
            np.testing.assert_allclose(got[key], expected[key], rtol=4e-7 * 3, atol=1e-9,
                                       err_msg=key)
    else:
        ep.assert_same(got, expected)
    assert acc_opt.iterations.numpy() == 12 and ref_opt.iterations.numpy() == 3
    for i in range(3):  # accumulators are reset after the applying call
        assert not np.any(acc_opt.get_slot(acc[i], "accumulator").numpy())


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
@pytest.mark.parametrize("clip", [dict(clipnorm=0.5), dict(global_clipnorm=0.7),
                                  dict(clipvalue=0.05)])
def test_accumulation_clips_the_average_as_the_4x_batch_is_clipped(clip, sparse_mode,
                                                                    jit_compile):
    """Clipping applies to the applied average (as Keras 3 does), so 4 micro-batches
    equal the 4x batch with clipping on. The reference's gradients are densified:
    tf-keras clips a `tf.IndexedSlices` by its entries, not by its summed rows."""
    micro = ep.batches(12, B)
    big = [ep.concat(micro[i:i + 4]) for i in range(0, 12, 4)]
    acc_opt = tf_lion.Lion(0.01, weight_decay=0.25, sparse_mode=sparse_mode,
                           jit_compile=jit_compile, gradient_accumulation_steps=4, **clip)
    ref_opt = tf_lion.Lion(0.01, weight_decay=0.25, sparse_mode="exact",
                           jit_compile=jit_compile, **clip)
    acc = _run(acc_opt, micro, B)
    ref_params = [tf.Variable(p) for p in ep.initial_params()]

    @tf.function
    def ref_step(batch):
        grads = [tf.convert_to_tensor(g) for g in ep.gradients(ref_params, batch, 4 * B)]
        ref_opt.apply_gradients(zip(grads, ref_params))
    for batch in big:
        ref_step({k: tf.constant(v) for k, v in batch.items()})
    # Lazy mode steps only the rows the window touched; exact mode every row.
    got, expected = ep.state(acc, acc_opt), ep.state(ref_params, ref_opt)
    if sparse_mode == "lazy":
        touched = np.unique(np.concatenate([b["ids"].ravel() for b in micro]))
        for key in ("param0", "m0"):
            got[key], expected[key] = got[key][touched], expected[key][touched]
    if jit_compile:  # two XLA programs contract multiply-adds differently
        for key in got:
            np.testing.assert_allclose(got[key], expected[key], rtol=4e-7 * 3, atol=1e-9,
                                       err_msg=key)
    else:
        ep.assert_same(got, expected)
    # The clipping is active on the first big step.
    first = [tf.convert_to_tensor(g).numpy() for g in ep.gradients(
        [tf.Variable(p) for p in ep.initial_params()], big[0], 4 * B)]
    norms = [np.linalg.norm(g) for g in first]
    if "clipnorm" in clip:
        assert max(norms) > clip["clipnorm"]
    elif "global_clipnorm" in clip:
        assert np.linalg.norm(norms) > clip["global_clipnorm"]
    else:
        assert max(np.abs(g).max() for g in first) > clip["clipvalue"]


def test_variables_change_only_on_every_nth_call():
    opt = tf_lion.Lion(0.01, gradient_accumulation_steps=3, sparse_mode="lazy")
    params = [tf.Variable(p) for p in ep.initial_params()]
    history = []
    for batch in ep.batches(6, B):
        _run(opt, [batch], B, params=params)
        history.append([p.numpy() for p in params] + [opt.get_slot(p, "m").numpy() for p in params])
    initial = ep.initial_params()
    for call, values in enumerate(history, start=1):
        changed = any(np.any(a != b) for a, b in zip(values[:3], initial))
        assert changed == (call >= 3), call
        if call in (4, 5):
            for a, b in zip(values, history[2]):
                np.testing.assert_array_equal(a, b)
    touched = opt.get_slot(params[0], "touched")
    assert touched.shape == (ep.VOCAB,) and not np.any(touched.numpy())  # reset after applying


def test_lazy_accumulation_updates_exactly_the_rows_touched_in_the_window():
    table = tf.Variable(tf.ones([6, 2]))
    opt = tf_lion.Lion(0.1, weight_decay=0.5, sparse_mode="lazy", gradient_accumulation_steps=2,
                       jit_compile=False)
    grads = [tf.IndexedSlices(tf.constant([[1.0, -1.0]]), tf.constant([1]), tf.constant([6, 2])),
             tf.IndexedSlices(tf.constant([[-1.0, 1.0], [2.0, 0.0]]), tf.constant([1, 4]),
                              tf.constant([6, 2]))]
    for g in grads:
        opt.apply_gradients([(g, table)])
    # Row 1's gradients cancel (mean 0) but it was touched: weight decay only.
    # Row 4: mean gradient [1, 0]: sign step [-0.1, 0] plus decay. Others: untouched.
    expected = np.ones([6, 2], np.float32)
    lr, wd = np.float32(0.1), np.float32(0.5)
    expected[1] = np.float32(1) - lr * (np.float32(0) + wd * np.float32(1))
    expected[4] = [np.float32(1) - lr * (np.float32(1) + wd), np.float32(1) - lr * wd]
    np.testing.assert_array_equal(table.numpy(), expected)
    m = opt.get_slot(table, "m").numpy()
    assert np.all(m[[0, 2, 3, 5]] == 0) and m[4, 0] > 0 and np.all(m[1] == 0)


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_checkpoint_mid_accumulation_resumes_identically(tmp_path, sparse_mode):
    micro = ep.batches(8, B)

    def make():
        params = [tf.Variable(p) for p in ep.initial_params()]
        opt = tf_lion.Lion(_schedule(4), weight_decay=0.25, sparse_mode=sparse_mode,
                           gradient_accumulation_steps=4)
        return params, opt

    params, opt = make()
    _run(opt, micro, B, params=params)
    expected = ep.state(params, opt, ("m", "accumulator"))

    params, opt = make()
    _run(opt, micro[:6], B, params=params)  # stop in the middle of the 2nd window
    assert np.any(opt.get_slot(params[1], "accumulator").numpy())
    path = tf.train.Checkpoint(params=params, optimizer=opt).save(str(tmp_path / "ckpt"))

    params, opt = make()
    opt.build(params)  # slots exist before the restore: every value is consumed
    tf.train.Checkpoint(params=params, optimizer=opt).restore(path).assert_consumed()
    assert opt.iterations.numpy() == 6
    _run(opt, micro[6:], B, params=params)
    ep.assert_same(ep.state(params, opt, ("m", "accumulator")), expected)


def test_accumulation_compiles_for_tpu():
    opt = tf_lion.Lion(0.01, sparse_mode="lazy", gradient_accumulation_steps=4,
                       skip_nonfinite=True, loss_scale_factor=8.0, use_ema=True,
                       ema_overwrite_frequency=2)
    params = [tf.Variable(p) for p in ep.initial_params()]
    batch = {k: tf.constant(v) for k, v in ep.batches(1, B)[0].items()}

    def step(batch):
        grads = ep.gradients(params, batch, B, opt.scale_loss)
        opt.apply_gradients(zip(grads, params))

    report = tf_lion.tpu.check_compiles(step, batch)
    assert report.ok


# --------------------------------------------------------------------------- #
# Loss scaling
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("clip", [None, dict(clipnorm=0.5), dict(global_clipnorm=0.5)])
def test_loss_scale_factor_equals_unscaled_run(clip):
    clip = clip or {}
    batches = ep.batches(4, B)
    scaled_opt = tf_lion.Lion(0.01, weight_decay=0.1, loss_scale_factor=1024.0, **clip)
    plain_opt = tf_lion.Lion(0.01, weight_decay=0.1, **clip)
    # A power-of-two factor is exact: scaling and unscaling give the same bits.
    scaled = _run(scaled_opt, batches, B, scale=scaled_opt.scale_loss)
    plain = _run(plain_opt, batches, B)
    ep.assert_same(ep.state(scaled, scaled_opt), ep.state(plain, plain_opt))
    assert scaled_opt.scale_loss(tf.constant(2.0)).numpy() == 2048.0
    assert plain_opt.scale_loss(tf.constant(2.0)).numpy() == 2.0


def test_loss_scale_factor_divides_before_clipping():
    var = tf.Variable([0.0, 0.0])
    opt = tf_lion.Lion(1.0, beta_1=0.0, beta_2=0.0, loss_scale_factor=100.0, clipvalue=0.5,
                       jit_compile=False)
    opt.apply_gradients([(tf.constant([30.0, -100.0]), var)])  # unscaled: [0.3, -1] -> clip
    np.testing.assert_array_equal(opt.get_slot(var, "m").numpy(),
                                  [np.float32(30.0) / np.float32(100.0), -0.5])


def _lso_run(strategy, batches, inject_inf_at=None, use_ema=False, accumulation=None):
    with strategy.scope():
        params = [tf.Variable(p) for p in ep.initial_params()]
        inner = tf_lion.Lion(0.01, weight_decay=0.1, use_ema=use_ema,
                             gradient_accumulation_steps=accumulation)
        opt = tf_keras.mixed_precision.LossScaleOptimizer(inner, initial_scale=2.0 ** 10)

    @tf.function
    def step(batch, poison):
        def replica_fn(batch):
            with tf.GradientTape() as tape:
                scaled = opt.get_scaled_loss(ep.loss(params, batch, B) * poison)
            grads = opt.get_unscaled_gradients(tape.gradient(scaled, params))
            opt.apply_gradients(zip(grads, params))
        strategy.run(replica_fn, args=(batch,))

    for i, batch in enumerate(batches):
        def split(ctx, batch=batch):
            n = B // ctx.num_replicas_in_sync
            start = ctx.replica_id_in_sync_group * n
            return {k: tf.constant(v[start:start + n]) for k, v in batch.items()}
        poison = tf.constant(np.inf if i == inject_inf_at else 1.0)
        step(strategy.experimental_distribute_values_from_function(split), poison)
    return params, inner, opt


@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_loss_scale_optimizer_equals_unscaled_run_and_skips_infinite_steps(strategy_name):
    if strategy_name == "mirrored":
        fresh_collective_keys()
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = tf.distribute.get_strategy()
    batches = ep.batches(4, B)
    params, inner, opt = _lso_run(strategy, batches, inject_inf_at=2, use_ema=True)
    plain_opt = tf_lion.Lion(0.01, weight_decay=0.1, use_ema=True)
    plain = _run(plain_opt, batches[:2] + batches[3:], B)
    ep.assert_same(ep.state(params, inner, ("m", "average")),
                   ep.state(plain, plain_opt, ("m", "average")))
    # tf-keras's LossScaleOptimizer counts a skipped step in `iterations` (so
    # schedules move on); nothing else changed.
    assert inner.iterations.numpy() == 4
    assert opt.loss_scale.numpy() == 2.0 ** 9  # and the loss scale halved


def test_loss_scale_optimizer_skip_leaves_accumulators_unchanged():
    batches = ep.batches(2, B)
    params, inner, _ = _lso_run(tf.distribute.get_strategy(), batches, inject_inf_at=1,
                                accumulation=4)
    params2, inner2, _ = _lso_run(tf.distribute.get_strategy(), batches[:1], accumulation=4)
    ep.assert_same(ep.state(params, inner, ("m", "accumulator")),
                   ep.state(params2, inner2, ("m", "accumulator")))


def test_loss_scale_optimizer_checkpoint_keeps_slots_keyed(tmp_path):
    params, inner, opt = _lso_run(tf.distribute.get_strategy(), ep.batches(2, B))
    path = tf.train.Checkpoint(params=params, optimizer=opt).save(str(tmp_path / "ckpt"))
    fresh = [tf.Variable(tf.zeros_like(p)) for p in params]
    fresh_opt = tf_keras.mixed_precision.LossScaleOptimizer(tf_lion.Lion(0.01))
    # Restore in reversed variable order: slots follow their variables.
    tf.train.Checkpoint(params=fresh, optimizer=fresh_opt).restore(path)
    fresh_opt.build(fresh[::-1])
    for p, f in zip(params, fresh):
        np.testing.assert_array_equal(f.numpy(), p.numpy())
        np.testing.assert_array_equal(fresh_opt.inner_optimizer.get_slot(f, "m").numpy(),
                                      inner.get_slot(p, "m").numpy())
    assert fresh_opt.loss_scale.numpy() == opt.loss_scale.numpy()


def test_loss_scale_optimizer_in_fit_with_mixed_float16():
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        tf_keras.utils.set_random_seed(0)
        model = tf_keras.Sequential([tf_keras.layers.Embedding(50, 8),
                                     tf_keras.layers.GlobalAveragePooling1D(),
                                     tf_keras.layers.Dense(1, dtype="float32")])
        opt = tf_keras.mixed_precision.LossScaleOptimizer(tf_lion.Lion(3e-3))
        model.compile(optimizer=opt, loss="mse")
        rng = np.random.default_rng(0)
        x = rng.integers(0, 50, (256, 5))
        y = (x[:, :1] % 2).astype(np.float32)
        history = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history["loss"]
        assert history[-1] < 0.6 * history[0], history
        assert model.layers[0].embeddings.dtype == tf.float32  # AutoCast storage
        assert opt.inner_optimizer.get_slot(model.layers[0].embeddings, "m").dtype == tf.float32
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


# --------------------------------------------------------------------------- #
# skip_nonfinite
# --------------------------------------------------------------------------- #
def _poisoned(batch, value):
    batch = dict(batch)
    batch["a"] = batch["a"].copy()
    batch["a"][0, 0, 0] = value  # one element of one gradient row
    return batch


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("accumulation", [None, 2])
@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_skip_nonfinite_equals_run_without_the_step(sparse_mode, accumulation, bad):
    batches = ep.batches(5, B)
    poisoned = batches[:2] + [_poisoned(batches[2], bad)] + batches[3:]
    kwargs = dict(learning_rate=_schedule(2), weight_decay=0.1, sparse_mode=sparse_mode,
                  use_ema=True, ema_overwrite_frequency=3, skip_nonfinite=True,
                  gradient_accumulation_steps=accumulation)
    opt = tf_lion.Lion(**kwargs)
    got = _run(opt, poisoned, B)
    ref_opt = tf_lion.Lion(**kwargs)
    ref = _run(ref_opt, batches[:2] + batches[3:], B)
    slots = ("m", "average") + (("accumulator",) if accumulation else ())
    ep.assert_same(ep.state(got, opt, slots), ep.state(ref, ref_opt, slots))
    assert opt.iterations.numpy() == ref_opt.iterations.numpy() == 4
    assert opt.skipped_steps.numpy() == 1 and ref_opt.skipped_steps.numpy() == 0


def test_skip_nonfinite_on_one_replica_skips_all_replicas():
    fresh_collective_keys()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    batches = ep.batches(4, B)
    # The bad element sits in the second half of the batch: replica 1 only.
    bad = dict(batches[1])
    bad["a"] = bad["a"].copy()
    bad["a"][B - 1, 0, 0] = np.nan
    with strategy.scope():
        params = [tf.Variable(p) for p in ep.initial_params()]
        opt = tf_lion.Lion(0.01, weight_decay=0.1, skip_nonfinite=True, use_ema=True)

    @tf.function
    def step(batch):
        def replica_fn(batch):
            opt.apply_gradients(zip(ep.gradients(params, batch, B), params))
        strategy.run(replica_fn, args=(batch,))

    for batch in [batches[0], bad] + batches[2:]:
        def split(ctx, batch=batch):
            start = ctx.replica_id_in_sync_group * (B // 2)
            return {k: tf.constant(v[start:start + B // 2]) for k, v in batch.items()}
        step(strategy.experimental_distribute_values_from_function(split))

    ref_opt = tf_lion.Lion(0.01, weight_decay=0.1, skip_nonfinite=True, use_ema=True)
    ref = _run(ref_opt, [batches[0]] + batches[2:], B)
    ep.assert_same(ep.state(params, opt, ("m", "average")), ep.state(ref, ref_opt, ("m", "average")))
    for var in params:
        first, second = (v.numpy() for v in var.values)
        np.testing.assert_array_equal(first, second)
    assert opt.skipped_steps.numpy() == 1 and opt.iterations.numpy() == 3


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_skip_nonfinite_sees_duplicates_that_sum_to_inf(sparse_mode, jit_compile):
    """Every value is finite, but the update sums duplicates in float16: 40000 + 40000
    overflows, as the densified gradient does. The step is skipped, like a dense Inf."""
    table = tf.Variable(tf.ones([3, 1], tf.float16))
    opt = tf_lion.Lion(0.01, skip_nonfinite=True, sparse_mode=sparse_mode,
                       jit_compile=jit_compile)
    grad = tf.IndexedSlices(tf.constant([[40000.0], [40000.0], [2.0]], tf.float16),
                            tf.constant([0, 0, 1]), tf.constant([3, 1]))
    assert not np.isfinite(tf.convert_to_tensor(grad).numpy()).all()
    opt.apply_gradients([(grad, table)])
    assert opt.skipped_steps.numpy() == 1 and opt.iterations.numpy() == 0
    np.testing.assert_array_equal(table.numpy(), np.ones([3, 1], np.float16))
    np.testing.assert_array_equal(opt.get_slot(table, "m").numpy(), np.zeros([3, 1], np.float16))


def test_skipped_steps_is_checkpointed(tmp_path):
    opt = tf_lion.Lion(0.01, skip_nonfinite=True)
    var = tf.Variable([1.0])
    opt.apply_gradients([(tf.constant([np.nan]), var)])
    opt.apply_gradients([(tf.constant([1.0]), var)])
    path = tf.train.Checkpoint(var=var, optimizer=opt).save(str(tmp_path / "c"))
    fresh = tf_lion.Lion(0.01, skip_nonfinite=True)
    tf.train.Checkpoint(var=tf.Variable([0.0]), optimizer=fresh).restore(path)
    assert fresh.skipped_steps.numpy() == 1 and fresh.iterations.numpy() == 1
    with pytest.raises(AttributeError, match="skip_nonfinite=True"):
        tf_lion.Lion().skipped_steps


def test_without_skip_nonfinite_nan_propagates():
    """Documented behaviour: as every Lion, a NaN gradient makes the weight NaN."""
    var = tf.Variable([1.0, 1.0])
    opt = tf_lion.Lion(0.01)
    opt.apply_gradients([(tf.constant([np.nan, 1.0]), var)])
    value = var.numpy()
    assert np.isnan(value[0]) and value[1] == np.float32(1.0) - np.float32(0.01)
    assert opt.iterations.numpy() == 1


def test_invalid_step_options_name_the_argument():
    for kwargs, name in [(dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
                         (dict(gradient_accumulation_steps=2.0), "gradient_accumulation_steps"),
                         (dict(loss_scale_factor=0.0), "loss_scale_factor"),
                         (dict(loss_scale_factor=float("inf")), "loss_scale_factor"),
                         (dict(skip_nonfinite="yes"), "skip_nonfinite"),
                         (dict(stochastic_rounding=1), "stochastic_rounding"),
                         (dict(seed=1.5), "seed")]:
        with pytest.raises(ValueError, match=name):
            tf_lion.Lion(**kwargs)


def test_config_round_trips_new_arguments():
    opt = tf_lion.Lion(gradient_accumulation_steps=4, loss_scale_factor=128.0,
                       skip_nonfinite=True, stochastic_rounding=True, seed=7)
    config = opt.get_config()
    clone = tf_lion.Lion.from_config(config)
    for key in ("gradient_accumulation_steps", "loss_scale_factor", "skip_nonfinite",
                "stochastic_rounding", "seed"):
        assert config[key] == getattr(clone, key) == getattr(opt, key)
