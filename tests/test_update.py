"""The update rules in tf_lion/update.py against the numpy reference (no Keras)."""

import numpy as np
import pytest
import tensorflow as tf

import numpy_lion as ref
from tf_lion import update

HYPERS = dict(lr=0.01, beta_1=0.9, beta_2=0.99)


def _random(rng, shape, zero_fraction=0.2):
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < zero_fraction] = 0.0  # exact zeros: sign(0) = 0
    return x


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(7,), (5, 3), (2, 3, 4)])
def test_dense_update_equals_reference(rng, shape, weight_decay):
    theta, m = _random(rng, shape), np.zeros(shape, np.float32)
    var, mom = tf.Variable(theta), tf.Variable(m)
    for _ in range(4):
        g = _random(rng, shape)
        update.dense_update(var, mom, g, weight_decay=weight_decay or None, **HYPERS)
        theta, m, _ = ref.step(theta, m, g, weight_decay=weight_decay, **HYPERS)
        np.testing.assert_array_equal(var.numpy(), theta)
        np.testing.assert_array_equal(mom.numpy(), m)


def test_sign_of_zero_is_zero():
    var, mom = tf.Variable([1.0, 1.0, 1.0]), tf.Variable([0.0, 0.0, 0.0])
    update.dense_update(var, mom, tf.constant([0.0, 2.0, -2.0]), 0.5, 0.9, 0.99)
    np.testing.assert_array_equal(var.numpy(), [1.0, 0.5, 1.5])


def test_beta_1_zero_is_signsgd_and_beta_extremes(rng):
    theta, g = _random(rng, (6,)), _random(rng, (6,))
    m = _random(rng, (6,))
    var, mom = tf.Variable(theta), tf.Variable(m)
    update.dense_update(var, mom, g, lr=0.1, beta_1=0.0, beta_2=1.0)
    np.testing.assert_array_equal(var.numpy(), theta - np.float32(0.1) * np.sign(g))
    np.testing.assert_array_equal(mom.numpy(), m)  # beta_2 = 1 keeps the momentum


def test_zero_gradient_shortcut_equals_explicit_zero(rng):
    theta, m = _random(rng, (4, 3)), _random(rng, (4, 3))
    a = update.lion_step(theta, m, None, 0.1, 0.9, 0.99, 0.01)
    b = update.lion_step(theta, m, np.zeros_like(m), 0.1, 0.9, 0.99, 0.01)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("index_dtype", [tf.int32, tf.int64])
def test_deduplicate_sums_in_original_order(index_dtype):
    indices = tf.constant([4, 1, 4, 0, 4, 1], index_dtype)
    values = tf.constant([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    idx, summed = update.deduplicate_indices(indices, values)
    assert idx.dtype == index_dtype
    np.testing.assert_array_equal(idx.numpy(), [0, 1, 1, 4, 4, 4])
    np.testing.assert_array_equal(summed.numpy()[:, 0], [4.0, 8.0, 8.0, 9.0, 9.0, 9.0])


def test_deduplicate_empty():
    idx, summed = update.deduplicate_indices(tf.zeros([0], tf.int32), tf.zeros([0, 3]))
    assert idx.shape == (0,) and summed.shape == (0, 3)


def _sparse_case(rng, rows=10, cols=3, n=12):
    indices = rng.integers(0, rows // 2, size=n).astype(np.int32)  # many duplicates
    return _random(rng, (rows, cols)), indices, _random(rng, (n, cols))


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_sparse_updates_equal_reference(rng, mode, weight_decay):
    theta, _, _ = _sparse_case(rng)
    m = np.zeros_like(theta)
    var, mom = tf.Variable(theta), tf.Variable(m)
    rule = update.exact_sparse_update if mode == "exact" else update.lazy_sparse_update
    for _ in range(4):
        _, indices, values = _sparse_case(rng)
        rule(var, mom, tf.constant(indices), tf.constant(values),
             weight_decay=weight_decay or None, **HYPERS)
        theta, m, _ = ref.sparse_step(theta, m, indices, values, weight_decay=weight_decay,
                                      mode=mode, **HYPERS)
        np.testing.assert_array_equal(var.numpy(), theta)
        np.testing.assert_array_equal(mom.numpy(), m)


def test_exact_sparse_equals_dense_with_densified_gradient(rng):
    theta, indices, values = _sparse_case(rng)
    m = _random(rng, theta.shape)
    a, am = tf.Variable(theta), tf.Variable(m)
    b, bm = tf.Variable(theta), tf.Variable(m)
    slices = tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant(theta.shape))
    update.exact_sparse_update(a, am, slices.indices, slices.values, 0.01, 0.9, 0.99, 0.1)
    update.dense_update(b, bm, tf.convert_to_tensor(slices), 0.01, 0.9, 0.99, 0.1)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(am.numpy(), bm.numpy())


def test_lazy_leaves_untouched_rows_bitwise(rng):
    theta, indices, values = _sparse_case(rng, rows=20)
    m = _random(rng, theta.shape)
    var, mom = tf.Variable(theta), tf.Variable(m)
    update.lazy_sparse_update(var, mom, tf.constant(indices), tf.constant(values),
                              0.01, 0.9, 0.99, 0.1)
    untouched = np.setdiff1d(np.arange(20), indices)
    assert untouched.size > 0
    assert var.numpy()[untouched].tobytes() == theta[untouched].tobytes()
    assert mom.numpy()[untouched].tobytes() == m[untouched].tobytes()
    touched = np.unique(indices)
    assert np.all(var.numpy()[touched] != theta[touched])


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_empty_indices(rng, mode):
    theta, m = _random(rng, (5, 2)), _random(rng, (5, 2))
    var, mom = tf.Variable(theta), tf.Variable(m)
    rule = update.exact_sparse_update if mode == "exact" else update.lazy_sparse_update
    rule(var, mom, tf.zeros([0], tf.int64), tf.zeros([0, 2]), 0.01, 0.9, 0.99)
    expected = ref.step(theta, m, np.zeros_like(m), 0.01, 0.9, 0.99)[:2]
    if mode == "lazy":
        expected = (theta, m)  # nothing touched: a no-op
    np.testing.assert_array_equal(var.numpy(), expected[0])
    np.testing.assert_array_equal(mom.numpy(), expected[1])


def test_rank1_sparse(rng):
    theta, m = _random(rng, (8,)), np.zeros(8, np.float32)
    var, mom = tf.Variable(theta), tf.Variable(m)
    indices, values = np.array([3, 3, 6], np.int64), np.array([0.5, -2.0, 1.0], np.float32)
    update.lazy_sparse_update(var, mom, indices, values, 0.01, 0.9, 0.99)
    e_theta, e_m, _ = ref.sparse_step(theta, m, indices, values, 0.01, 0.9, 0.99, mode="lazy")
    np.testing.assert_array_equal(var.numpy(), e_theta)
    np.testing.assert_array_equal(mom.numpy(), e_m)


@pytest.mark.parametrize("var_dtype,m_dtype", [
    ("float16", "float16"), ("bfloat16", "bfloat16"), ("float64", "float64"),
    ("float32", "bfloat16"), ("bfloat16", "float32"), ("float16", "bfloat16"),
])
def test_dtypes_compute_in_at_least_float32(rng, var_dtype, m_dtype):
    tf_var_dtype, tf_m_dtype = tf.as_dtype(var_dtype), tf.as_dtype(m_dtype)
    np_var, np_m = tf_var_dtype.as_numpy_dtype, tf_m_dtype.as_numpy_dtype
    theta = _random(rng, (6, 4)).astype(np_var)
    m = np.zeros((6, 4), np_m)
    var, mom = tf.Variable(theta, dtype=tf_var_dtype), tf.Variable(m, dtype=tf_m_dtype)
    for _ in range(3):
        g = _random(rng, (6, 4)).astype(np_var)
        update.dense_update(var, mom, tf.constant(g, dtype=tf_var_dtype), 0.01, 0.9, 0.99, 0.1)
        theta, m, _ = ref.step(theta, m, g, 0.01, 0.9, 0.99, 0.1, momentum_dtype=np_m)
        assert var.dtype == tf_var_dtype and mom.dtype == tf_m_dtype
        np.testing.assert_array_equal(var.numpy(), theta)
        np.testing.assert_array_equal(mom.numpy(), m)
    assert update.compute_dtype(var_dtype, m_dtype) == (
        tf.float64 if "float64" in (var_dtype, m_dtype) else tf.float32)


def test_ema_update():
    avg, value = tf.Variable([1.0, 2.0]), tf.constant([3.0, -2.0])
    update.ema_update(avg, value, 0.75)
    expected = np.float32(0.75) * np.float32([1.0, 2.0]) + (np.float32(1) - np.float32(0.75)) * np.float32([3.0, -2.0])
    np.testing.assert_array_equal(avg.numpy(), expected)
