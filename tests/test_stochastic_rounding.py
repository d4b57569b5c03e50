"""Stochastic rounding of float16/bfloat16 variables and momenta."""

import numpy as np
import pytest
import tensorflow as tf

import tf_lion
from conftest import fresh_collective_keys
from tf_lion import update as update_lib


@pytest.mark.parametrize("dtype", [tf.bfloat16, tf.float16])
def test_stochastic_round_is_unbiased(dtype):
    """Between neighbours lo < x < hi, P(hi) = (x - lo) / (hi - lo): mean = x."""
    lo = tf.constant(1.0, dtype)
    ulp = float(tf.cast(tf.bitcast(tf.bitcast(lo, tf.int16) + 1, dtype), tf.float32)) - 1.0
    n = 200_000
    for fraction in (0.1, 0.3, 0.5, 0.9):
        for sign in (1.0, -1.0):
            x = tf.fill([n], np.float32(sign * (1.0 + fraction * ulp)))
            rounded = tf.cast(update_lib.stochastic_round(x, dtype, tf.constant([3, 7], tf.int64)),
                              tf.float32).numpy()
            assert set(np.unique(np.abs(rounded))) <= {1.0, 1.0 + ulp}
            p_hi = np.mean(np.abs(rounded) > 1.0)
            sigma = np.sqrt(fraction * (1 - fraction) / n)
            assert abs(p_hi - fraction) < 5 * sigma, (fraction, p_hi)
            assert np.all(np.sign(rounded) == sign)


def test_stochastic_round_keeps_representable_values_and_specials():
    x = tf.constant([0.0, -0.0, 1.0, -2.5, np.inf, -np.inf, np.nan, 3.0e38], tf.float32)
    y = tf.cast(update_lib.stochastic_round(x, tf.bfloat16, tf.constant([1, 2], tf.int64)),
                tf.float32).numpy()
    np.testing.assert_array_equal(y[:6], [0.0, -0.0, 1.0, -2.5, np.inf, -np.inf])
    assert np.isnan(y[6]) and np.isfinite(y[7])


def _regression(dtype, stochastic_rounding, steps=300, seed=0, jit_compile=True):
    """Linear regression with weights of order 1 at Lion's usual lr = 1e-4."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((16, 1)).astype(np.float32)
    w_star = w0 - 0.02 * np.sign(rng.standard_normal((16, 1))).astype(np.float32)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    y = x @ w_star
    w = tf.Variable(tf.cast(w0, dtype))
    opt = tf_lion.Lion(1e-4, stochastic_rounding=stochastic_rounding, seed=seed,
                       jit_compile=jit_compile)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((tf.matmul(x, tf.cast(w, tf.float32)) - y) ** 2)
        opt.apply_gradients([(tape.gradient(loss, w), w)])
        return loss

    losses = [float(step()) for _ in range(steps)]
    return np.array(losses), tf.cast(w, tf.float32).numpy(), tf.cast(w0, dtype).numpy()


def test_bfloat16_weights_move_only_with_stochastic_rounding():
    f32, _, _ = _regression(tf.float32, False)
    nearest, w_nearest, w0 = _regression(tf.bfloat16, False)
    stochastic, w_sr, _ = _regression(tf.bfloat16, True)
    # Round-to-nearest: 1e-4 is below half a bf16 ulp (2**-8 near 1): no weight moves.
    np.testing.assert_array_equal(w_nearest, w0.astype(np.float32))
    assert nearest[-1] == nearest[0]
    # Stochastic rounding tracks float32 while the loss falls (float32 reaches
    # its optimum near step 200); then it stays at bf16's own floor: weights
    # near 1 live on a grid of 2**-7, so they hover within a grid step of the
    # optimum (loss ~1e-3 here, measured 8.9e-4 at step 400).
    for k in (49, 99):
        assert abs(stochastic[k] - f32[k]) <= 0.2 * f32[0], (k, stochastic[k], f32[k])
    assert stochastic[-1] < 0.25 * stochastic[0]
    print("loss at steps 0/100/200/300: f32", f32[[0, 99, 199, 299]],
          "bf16 nearest", nearest[[0, 99, 199, 299]], "bf16 stochastic", stochastic[[0, 99, 199, 299]])


def test_stochastic_rounding_is_deterministic_per_seed_and_compiles():
    a = _regression(tf.bfloat16, True, steps=40, seed=1)[1]
    b = _regression(tf.bfloat16, True, steps=40, seed=1)[1]
    c = _regression(tf.bfloat16, True, steps=40, seed=2)[1]
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)
    opt = tf_lion.Lion(1e-4, stochastic_rounding=True, sparse_mode="lazy",
                       momentum_dtype="bfloat16")
    table = tf.Variable(tf.ones([50, 8], tf.bfloat16))
    dense = tf.Variable(tf.ones([8], tf.bfloat16))

    def step(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(tf.gather(table, ids), tf.float32) *
                                 tf.cast(dense, tf.float32))
        grads = tape.gradient(loss, [table, dense])
        opt.apply_gradients(zip(grads, [table, dense]))

    assert tf_lion.tpu.check_compiles(step, tf.constant([1, 2, 2, 7])).ok


def test_bfloat16_momentum_with_stochastic_rounding_does_not_stall():
    """Round-to-nearest stalls a bf16 momentum at 0.8047 (test_optimizer); SR does not."""
    var = tf.Variable(tf.zeros([4096]))
    opt = tf_lion.Lion(1e-4, beta_2=0.99, momentum_dtype="bfloat16", stochastic_rounding=True)
    step = tf.function(lambda: opt.apply_gradients([(tf.ones([4096]), var)]))
    for _ in range(1000):
        step()
    m = tf.cast(opt.get_slot(var, "m"), tf.float32).numpy()
    assert abs(np.mean(m) - 1.0) < 0.01, np.mean(m)  # float32 reaches 0.99996


def test_sparse_duplicates_round_alike_and_untouched_rows_keep_bits():
    table = tf.Variable(tf.ones([10, 64], tf.bfloat16))
    opt = tf_lion.Lion(1e-3, sparse_mode="lazy", stochastic_rounding=True)
    grad = tf.IndexedSlices(tf.ones([4, 64], tf.bfloat16), tf.constant([3, 3, 5, 3]),
                            tf.constant([10, 64]))
    opt.apply_gradients([(grad, table)])
    values = tf.cast(table, tf.float32).numpy()
    assert np.all(values[[0, 1, 2, 4, 6, 7, 8, 9]] == 1.0)
    moved = values[[3, 5]]
    assert np.all((moved == 1.0) | (moved == np.float32(1.0 - 2.0 ** -8)))
    assert 0 < np.sum(moved < 1.0) < moved.size  # some rounded down, some not


def test_mirrored_replicas_stay_bitwise_identical():
    fresh_collective_keys()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        w = tf.Variable(tf.ones([256], tf.bfloat16))
        table = tf.Variable(tf.ones([32, 16], tf.bfloat16))
        opt = tf_lion.Lion(1e-4, stochastic_rounding=True, sparse_mode="exact",
                           momentum_dtype="bfloat16")

    @tf.function
    def step(ids):
        def replica_fn(ids):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.cast(w, tf.float32) ** 2) + tf.reduce_sum(
                    tf.cast(tf.gather(table, ids), tf.float32))
            opt.apply_gradients(zip(tape.gradient(loss, [w, table]), [w, table]))
        strategy.run(replica_fn, args=(ids,))

    for i in range(30):
        ids = strategy.experimental_distribute_values_from_function(
            lambda ctx, i=i: tf.constant([i % 32, 3 + ctx.replica_id_in_sync_group]))
        step(ids)
    for var in (w, table, opt.get_slot(w, "m"), opt.get_slot(table, "m")):
        first, second = (v.numpy() for v in var.values)
        np.testing.assert_array_equal(first, second)
    assert np.any(tf.cast(w.values[0], tf.float32).numpy() != 1.0)  # it did move


@pytest.mark.parametrize("sparse", [False, True])
def test_each_rounding_of_each_step_draws_its_own_stream(monkeypatch, sparse):
    """The momentum of step t and the parameters of step t + 1 shared their draws."""
    seeds = []
    original = update_lib.stochastic_round

    def spy(x, dtype, seed=None, uniform=None):
        if seed is not None:
            seeds.append(tuple(seed.numpy()))
        return original(x, dtype, seed, uniform)
    monkeypatch.setattr(update_lib, "stochastic_round", spy)
    opt = tf_lion.Lion(1e-3, stochastic_rounding=True, sparse_mode="exact", jit_compile=False)
    var = tf.Variable(tf.ones([4, 2], tf.bfloat16), name="w")
    for _ in range(3):
        grad = tf.ones([4, 2], tf.bfloat16)
        if sparse:
            grad = tf.IndexedSlices(tf.ones([2, 2], tf.bfloat16), tf.constant([0, 2]))
        opt.apply_gradients([(grad, var)])
    assert len(seeds) == 6 and len(set(seeds)) == 6, seeds


@pytest.mark.parametrize("jit_compile", [False, True])
def test_rounding_of_the_parameters_is_unbiased_after_a_rounded_momentum(jit_compile):
    """Step 1 rounds a bfloat16 momentum up with probability 0.9; at step 2 the sign
    of c depends on it, and every parameter moves by lr = 2**-12 (a sixteenth of
    its bfloat16 spacing at 1.0): unbiased rounding moves down 1/16 of those whose
    momentum rounded up. With the draws shared (before), none moved."""
    n = 1 << 14
    beta_1, beta_2 = np.float32(0.9), np.float32(0.99)
    spacing = 2.0 ** -8  # bfloat16 spacing in [0.5, 1)
    g0 = np.float32((0.5 + 0.9 * spacing) / (1 - beta_2))
    g1 = np.float32(-beta_1 * (0.5 + 0.5 * spacing) / (1 - beta_1))  # c > 0 iff m rounded up
    lr = tf.Variable(0.0)
    opt = tf_lion.Lion(lr, beta_1=0.9, beta_2=0.99, stochastic_rounding=True, seed=123,
                       jit_compile=jit_compile)
    var = tf.Variable(tf.ones([n], tf.bfloat16), name="w")
    opt.apply_gradients([(tf.fill([n], tf.constant(g0, tf.bfloat16)), var)])
    up = opt.get_slot(var, "m").numpy().astype(np.float64) > 0.5 + 0.5 * spacing
    lr.assign(2.0 ** -12)
    opt.apply_gradients([(tf.fill([n], tf.constant(g1, tf.bfloat16)), var)])
    moved_down = var.numpy().astype(np.float64)[up] < 1.0
    # Binomial(~0.9 n, 1/16): the standard error of the fraction is 0.002.
    assert abs(moved_down.mean() - 1 / 16) < 0.01, moved_down.mean()
