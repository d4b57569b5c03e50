"""Bad input: a clear error naming the argument or variable, and nothing changed."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_lion


_SCHEDULE = tf_keras.optimizers.schedules.ExponentialDecay(0.9, 10, 0.5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(learning_rate=-0.1), r"learning_rate.*-0\.1"),
    (dict(learning_rate=tf.constant(-1.0)), r"learning_rate"),
    (dict(learning_rate=tf.Variable(-1.0)), r"learning_rate"),
    (dict(learning_rate=float("nan")), r"learning_rate.*nan"),
    (dict(learning_rate="fast"), r"learning_rate.*fast"),
    (dict(beta_1=-0.01), r"beta_1.*-0\.01"),
    (dict(beta_1=1.5), r"beta_1.*1\.5"),
    (dict(beta_2=-1.0), r"beta_2.*-1\.0"),
    (dict(beta_2=1.01), r"beta_2.*1\.01"),
    (dict(beta_2=tf.constant([0.9, 0.9])), r"beta_2"),
    (dict(weight_decay=-0.1), r"weight_decay.*-0\.1"),
    (dict(sparse_mode="dense"), r"sparse_mode.*dense"),
    (dict(momentum_dtype="int32"), r"momentum_dtype.*int32"),
    (dict(momentum_dtype="float12"), r"momentum_dtype.*float12"),
    (dict(learning_rate=float("inf")), r"learning_rate.*inf"),
    (dict(weight_decay=float("inf")), r"weight_decay.*inf"),
    (dict(jit_compile="false"), r"jit_compile.*'false'"),
    (dict(use_ema="no"), r"use_ema.*'no'"),
    (dict(clipnorm=-1.0), r"clipnorm.*-1\.0"),
    (dict(clipvalue=-0.5), r"clipvalue.*-0\.5"),
    (dict(use_ema=2), r"use_ema.*2"),
    (dict(global_clipnorm=-1.0), r"global_clipnorm.*-1\.0"),
    (dict(clipnorm=float("nan")), r"clipnorm.*nan"),
    (dict(beta_1=_SCHEDULE), r"beta_1.*LearningRateSchedule"),
    (dict(beta_2=_SCHEDULE), r"beta_2.*LearningRateSchedule"),
    (dict(weight_decay=_SCHEDULE), r"weight_decay.*LearningRateSchedule"),
    (dict(learning_rate="0.1"), r"learning_rate.*'0\.1'"),
    (dict(beta_1="0.9"), r"beta_1.*'0\.9'"),
    (dict(beta_2=b"0.99"), r"beta_2.*0\.99"),
    (dict(weight_decay="0.1"), r"weight_decay.*'0\.1'"),
    (dict(use_ema=True, ema_momentum=float("nan")), r"ema_momentum.*nan"),
    (dict(use_ema=True, ema_momentum="0.9"), r"ema_momentum.*'0\.9'"),
    (dict(use_ema=True, ema_momentum=1.5), r"ema_momentum.*1\.5"),
    (dict(clipnorm=float("inf")), r"clipnorm.*finite.*inf"),
    (dict(global_clipnorm=float("inf")), r"global_clipnorm.*finite.*inf"),
    (dict(exclude_from_weight_decay_names="bias"), r"exclude_from_weight_decay_names.*'bias'"),
    (dict(exclude_from_weight_decay_names=["bias", 3]), r"exclude_from_weight_decay_names"),
])
def test_invalid_hyperparameters_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tf_lion.Lion(**kwargs)


def test_infinite_clipvalue_is_no_clipping():
    var = tf.Variable([1.0, -1.0])
    tf_lion.Lion(0.1, clipvalue=float("inf")).apply_gradients([(tf.constant([5.0, -5.0]), var)])
    np.testing.assert_array_equal(var.numpy(), np.float32([1.0, -1.0]) - np.float32([0.1, -0.1]))


def test_values_tf_keras_saves_are_accepted():
    """tf-keras keeps `use_ema`/`jit_compile` as given and treats a clip of 0 as
    off: configs it (or tf_lion before these checks) saved hold such values."""
    opt = tf_lion.Lion(use_ema=1, jit_compile=0, clipnorm=0.0, clipvalue=0)
    assert tf_lion.Lion(global_clipnorm=0.0).global_clipnorm == 0.0
    assert opt.use_ema is True and opt.jit_compile is False
    assert tf_lion.Lion(use_ema=None).use_ema is False
    var = tf.Variable([1.0, -1.0])
    opt.apply_gradients([(tf.constant([100.0, -100.0]), var)])  # not clipped to 0
    np.testing.assert_allclose(var.numpy(), [1.0 - 1e-4, -1.0 + 1e-4], rtol=1e-7)
    config = tf_keras.optimizers.Lion(use_ema=1, clipnorm=0.0).get_config()
    assert tf_lion.Lion.from_config(config).use_ema is True


def test_valid_edge_values_are_accepted():
    tf_lion.Lion(learning_rate=0.0, beta_1=0.0, beta_2=0.0, weight_decay=0.0)
    tf_lion.Lion(beta_1=1.0, beta_2=1.0, weight_decay=None)
    tf_lion.Lion(beta_1=lambda: 0.5, beta_2=tf.Variable(0.9), learning_rate=lambda: 1e-3)
    for dtype in ["float16", "bfloat16", "float32", "float64", tf.bfloat16]:
        tf_lion.Lion(momentum_dtype=dtype)


@pytest.mark.parametrize("dtype", [tf.float64, tf.float16, tf.bfloat16])
def test_learning_rate_tensor_of_any_float_dtype(dtype):
    """A tensor becomes a float32 variable, as a float does (so the config, a
    plain float, rebuilds the same variable and checkpoints restore)."""
    opt = tf_lion.Lion(learning_rate=tf.constant(0.5, dtype))
    assert opt.learning_rate.dtype == tf.float32
    var = tf.Variable([1.0, -1.0])
    opt.apply_gradients([(tf.constant([1.0, -1.0]), var)])
    np.testing.assert_array_equal(var.numpy(), [0.5, -0.5])
    opt.learning_rate = tf.constant(0.25, tf.float64)  # assigned into its variable
    opt.apply_gradients([(tf.constant([1.0, -1.0]), var)])
    np.testing.assert_array_equal(var.numpy(), [0.25, -0.25])


def test_integer_variable_is_rejected_by_name():
    var = tf.Variable([1, 2], name="counter")
    with pytest.raises(TypeError, match="counter"):
        tf_lion.Lion().apply_gradients([(tf.constant([1, 1]), var)])


def test_gradient_shape_mismatch_names_variable():
    var = tf.Variable(tf.zeros([3, 2]), name="kernel")
    opt = tf_lion.Lion()
    with pytest.raises(ValueError, match=r"kernel.*\(2, 3\)"):
        opt.apply_gradients([(tf.ones([2, 3]), var)])
    with pytest.raises(ValueError, match="kernel"):
        opt.apply_gradients([(tf.IndexedSlices(tf.ones([1, 5]), tf.constant([0])), var)])
    np.testing.assert_array_equal(var.numpy(), np.zeros([3, 2]))
    assert int(opt.iterations) == 0


def test_gradient_dtype_mismatch_names_variable():
    var = tf.Variable(tf.zeros([2]), name="bias")
    with pytest.raises(TypeError, match=r"bias.*float16"):
        tf_lion.Lion().apply_gradients([(tf.ones([2], tf.float16), var)])


def test_float_sparse_indices_rejected():
    var = tf.Variable(tf.zeros([3, 2]), name="table")
    grad = tf.IndexedSlices(tf.ones([1, 2]), tf.constant([0], tf.int16))
    with pytest.raises(TypeError, match="table"):
        tf_lion.Lion().apply_gradients([(grad, var)])


def test_all_none_gradients_raise_like_tf_keras():
    var = tf.Variable([1.0])
    with pytest.raises(ValueError, match="No gradients"):
        tf_lion.Lion().apply_gradients([(None, var)])


def test_unknown_kwarg():
    with pytest.raises(TypeError, match="bogus"):
        tf_lion.Lion(bogus=1)


@pytest.mark.parametrize("shape", [tf.TensorShape(None), tf.TensorShape([None, 3])])
def test_variable_of_unknown_shape_is_rejected_by_name(shape):
    var = tf.Variable(tf.ones([2, 3]), shape=shape, name="free_form")
    with pytest.raises(ValueError, match="free_form.*fully defined|fully defined.*free_form"):
        tf_lion.Lion().apply_gradients([(tf.ones([2, 3]), var)])


def test_sparse_gradient_with_more_indices_than_rows_names_variable():
    var = tf.Variable(tf.zeros([5, 2]), name="table")
    grad = tf.IndexedSlices(tf.ones([2, 2]), tf.constant([0, 1, 2]), tf.constant([5, 2]))
    for jit in (True, False):
        with pytest.raises(ValueError, match="table"):
            tf_lion.Lion(jit_compile=jit).apply_gradients([(grad, var)])
    np.testing.assert_array_equal(var.numpy(), np.zeros([5, 2]))


@pytest.mark.parametrize("accumulation", [None, 2])
@pytest.mark.parametrize("jit", [True, False])
def test_dense_gradient_of_unknown_static_shape_is_checked_at_run_time(jit, accumulation):
    """A [4] (or [1, 4]) gradient would broadcast over a [3, 4] variable; it must
    fail instead, naming it, before any variable (here one with an XLA program
    of its own), slot or counter changes."""
    var = tf.Variable(tf.zeros([3, 4]), name="kernel")
    other = tf.Variable(tf.ones([2 ** 18]), name="other")
    opt = tf_lion.Lion(jit_compile=jit, gradient_accumulation_steps=accumulation)

    @tf.function(input_signature=[tf.TensorSpec(None)])
    def step(g):
        opt.apply_gradients([(tf.ones([2 ** 18]), other), (g, var)])

    for _ in range(accumulation or 1):
        step(tf.ones([3, 4]))  # fits: applied
    moved, other_moved = var.numpy(), other.numpy()
    assert np.all(moved != 0)
    counted = opt.iterations.numpy()
    state = [s.numpy() for s in opt.variables]
    for bad in (tf.ones([4]), tf.ones([1, 4])):
        for _ in range(accumulation or 1):
            with pytest.raises(tf.errors.InvalidArgumentError, match=(
                    r"variable \W*kernel:0\W+ does not have its shape|gradient_of_kernel")):
                step(bad)
    np.testing.assert_array_equal(var.numpy(), moved)
    np.testing.assert_array_equal(other.numpy(), other_moved)
    assert opt.iterations.numpy() == counted
    for before, after in zip(state, opt.variables):
        np.testing.assert_array_equal(after.numpy(), before)


@pytest.mark.parametrize("outer_jit", [False, True])
@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_sparse_gradient_with_counts_unknown_when_traced_must_agree(mode, jit, outer_jit):
    """5 indices and 3 value rows, counts unknown when traced: an error naming the
    table (also inside an XLA-compiled step, which drops Assert ops), nothing changed."""
    var = tf.Variable(tf.ones([6, 2]), name="table")
    opt = tf_lion.Lion(0.1, sparse_mode=mode, jit_compile=jit)

    @tf.function(jit_compile=outer_jit, input_signature=[
        tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None])])
    def step(indices, values):
        opt.apply_gradients([(tf.IndexedSlices(values, indices, tf.constant([6, 2])), var)])

    step(tf.constant([0, 2, 2]), tf.ones([3, 2]))  # counts agree: applied
    moved, counted = var.numpy(), opt.iterations.numpy()
    assert np.any(moved != 1.0)
    # [2, 1] would broadcast; [1, 6] for 3 indices has the right number of elements
    for n_indices, n_rows, width in [(5, 3, 2), (2, 3, 2), (2, 2, 1), (3, 1, 6)]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=(
                r"variable \W*table:0\W+ has (a different number of indices and value rows"
                r"|value rows of another shape)|gradient_of_table_0")):
            step(tf.range(n_indices), tf.ones([n_rows, width]))
        np.testing.assert_array_equal(var.numpy(), moved)
        assert opt.iterations.numpy() == counted


@pytest.mark.parametrize("jit", [True, False])
def test_per_replica_dense_gradient_of_unknown_shape_is_checked_in_cross_replica_apply(jit):
    """Per-replica values reduced in a merge_call and applied there: a [1]
    gradient must not broadcast over a [3] variable on any replica."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        var = tf.Variable([1.0, 2.0, 3.0], name="kernel")
        opt = tf_lion.Lion(0.1, jit_compile=jit)

    def merge_fn(strategy, grad):
        reduced = strategy.extended.reduce_to(tf.distribute.ReduceOp.SUM, grad, var)
        return opt.apply_gradients([(reduced, var)], skip_gradients_aggregation=True)

    @tf.function(input_signature=[tf.TensorSpec([None])])
    def step(g):
        def replica_fn(g):
            ctx = tf.distribute.get_replica_context()
            g = g * tf.cast(ctx.replica_id_in_sync_group + 1, tf.float32)  # per-replica values
            return ctx.merge_call(merge_fn, args=(g,))
        strategy.run(replica_fn, args=(g,))

    step(tf.constant([1.0, -1.0, 1.0]))
    moved = [v.numpy() for v in var.values]
    np.testing.assert_allclose(moved[0], [0.9, 2.1, 2.9], rtol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"variable \W*kernel:0\W+ does not have its shape|gradient_of_kernel"):
        step(tf.constant([1.0]))
    for v, before in zip(var.values, moved):
        np.testing.assert_array_equal(v.numpy(), before)


def test_unused_variable_of_unknown_shape_is_skipped_like_tf_keras():
    """No gradient, no slots: `fit` with an unused free-form variable runs."""

    class WithSpare(tf_keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight("w", shape=(3,), initializer="ones")
            self.spare = tf.Variable(tf.zeros([4]), shape=tf.TensorShape(None), name="spare")

        def call(self, x):
            return x * self.w

    model = tf_keras.Sequential([tf_keras.Input((3,)), WithSpare()])
    model.compile(tf_lion.Lion(0.1, jit_compile=False), "mse")
    model.fit(np.ones((4, 3), np.float32), np.zeros((4, 3), np.float32), verbose=0)
    np.testing.assert_allclose(model.layers[0].w.numpy(), [0.9, 0.9, 0.9], rtol=1e-6)
    # With EMA, `fit` ends by copying the averages: the spare has none and is left alone.
    ema = tf_keras.Sequential([tf_keras.Input((3,)), WithSpare()])
    ema.compile(tf_lion.Lion(0.1, use_ema=True, ema_momentum=0.5, jit_compile=False), "mse")
    ema.fit(np.ones((4, 3), np.float32), np.zeros((4, 3), np.float32), verbose=0)
    np.testing.assert_allclose(ema.layers[0].w.numpy(), [0.95, 0.95, 0.95], rtol=1e-6)
    with pytest.raises(ValueError, match="spare"):
        model.optimizer.build([model.layers[0].spare])
