"""tf_lion.Lion's Keras contract and numbers, against the numpy reference and tf-keras Lion."""

import warnings

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import numpy_lion as ref
import tf_lion


def _random(rng, shape, zero_fraction=0.2):
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < zero_fraction] = 0.0
    return x


SHAPES = [(4,), (3, 5), (2, 2, 3)]


def _run(opt, thetas, grads_per_step):
    vars_ = [tf.Variable(t) for t in thetas]
    for grads in grads_per_step:
        opt.apply_gradients(zip([tf.constant(g) for g in grads], vars_))
    return vars_


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_dense_equals_reference_without_xla(rng, weight_decay):
    thetas = [_random(rng, s) for s in SHAPES]
    grads = [[_random(rng, s) for s in SHAPES] for _ in range(5)]
    opt = tf_lion.Lion(learning_rate=0.01, weight_decay=weight_decay, jit_compile=False)
    vars_ = _run(opt, thetas, grads)
    for i, theta in enumerate(thetas):
        m = np.zeros_like(theta)
        for step_grads in grads:
            theta, m, _ = ref.step(theta, m, step_grads[i], 0.01, 0.9, 0.99, weight_decay)
        np.testing.assert_array_equal(vars_[i].numpy(), theta)
        np.testing.assert_array_equal(opt.get_slot(vars_[i], "m").numpy(), m)
    assert int(opt.iterations) == 5


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_dense_xla_matches_reference_within_fused_rounding(rng, weight_decay):
    """Each XLA step, from the reference's state, within FMA rounding (see numpy_lion)."""
    theta, m = _random(rng, (64, 33)), np.zeros((64, 33), np.float32)
    var = tf.Variable(theta)
    opt = tf_lion.Lion(learning_rate=0.01, weight_decay=weight_decay, jit_compile=True)
    for _ in range(5):
        g = _random(rng, theta.shape)
        opt.apply_gradients([(tf.constant(g), var)])
        new_m = opt.get_slot(var, "m").numpy()
        theta, m = ref.assert_fused_step_close(var.numpy(), new_m, theta, m, g, 0.01, 0.9,
                                               0.99, weight_decay)
        var.assign(theta)
        opt.get_slot(var, "m").assign(m)


def test_agrees_with_tf_keras_lion_exactly_without_weight_decay(rng):
    thetas = [_random(rng, s) for s in SHAPES]
    grads = [[_random(rng, s) for s in SHAPES] for _ in range(6)]
    ours = _run(tf_lion.Lion(learning_rate=0.003, beta_1=0.8, beta_2=0.95, jit_compile=False),
                thetas, grads)
    theirs = _run(tf_keras.optimizers.Lion(learning_rate=0.003, beta_1=0.8, beta_2=0.95),
                  thetas, grads)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_agrees_with_tf_keras_lion_with_weight_decay(rng):
    """tf-keras decays first (theta -= theta*wd*lr) then takes the sign step: the same
    formula in another order, so agreement is to a few float32 roundings of theta."""
    thetas = [_random(rng, s) for s in SHAPES]
    grads = [[_random(rng, s) for s in SHAPES] for _ in range(6)]
    ours = _run(tf_lion.Lion(learning_rate=0.003, weight_decay=0.5, jit_compile=False),
                thetas, grads)
    theirs = _run(tf_keras.optimizers.Lion(learning_rate=0.003, weight_decay=0.5),
                  thetas, grads)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=6 * 4 * ref.EPS32 * 3)


def test_hyperparameters_as_variables_callables_tensors_and_schedules(rng):
    lr_var = tf.Variable(0.01)
    b1_value = [0.9]
    schedule = tf_keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=1, decay_rate=0.5)
    theta = _random(rng, (5,))
    grads = [_random(rng, (5,)) for _ in range(3)]
    for lr, expected_lrs in [
        (lr_var, [0.01, 0.005, 0.005]),
        (lambda: lr_var * 2, [0.02, 0.01, 0.01]),
        (tf.constant(0.01), [0.01, 0.01, 0.01]),
        (schedule, [0.02, 0.01, 0.005]),
    ]:
        lr_var.assign(0.01)
        opt = tf_lion.Lion(learning_rate=lr, beta_1=lambda: b1_value[0],
                           beta_2=tf.Variable(0.99), weight_decay=tf.constant(0.1),
                           jit_compile=False)
        var = tf.Variable(theta)
        e_theta, m = theta, np.zeros_like(theta)
        b1_value[0] = 0.9
        for i, g in enumerate(grads):
            opt.apply_gradients([(tf.constant(g), var)])
            e_theta, m, _ = ref.step(e_theta, m, g, expected_lrs[i], b1_value[0], 0.99, 0.1)
            if i == 0:
                lr_var.assign(0.005)  # a variable / callable learning rate is read every step
                b1_value[0] = 0.5  # so is a callable beta_1
        np.testing.assert_array_equal(var.numpy(), e_theta)


def test_learning_rate_setter_and_property():
    opt = tf_lion.Lion(learning_rate=0.1)
    opt.learning_rate = 0.05
    assert float(opt.learning_rate) == pytest.approx(0.05)
    sched = tf_lion.Lion(learning_rate=tf_keras.optimizers.schedules.PolynomialDecay(0.1, 10))
    with pytest.raises(TypeError):
        sched.learning_rate = 0.1


@pytest.mark.parametrize("new_rate", ["variable", "callable"])
def test_learning_rate_replaced_after_tracing_warns(new_rate):
    """A float assigned after tracing reaches the traced step; a new object
    cannot (the trace holds the old one), and the setter says so."""
    var = tf.Variable([0.0])
    opt = tf_lion.Lion(learning_rate=0.1, beta_1=0.5)
    step = tf.function(lambda: opt.apply_gradients([(tf.constant([-1.0]), var)]))
    step()
    opt.learning_rate = 0.25  # assigned into the optimizer's variable
    step()
    np.testing.assert_allclose(var.numpy(), [0.35], rtol=1e-6)  # 0.1 + 0.25 (float32 sums)
    replacement = tf.Variable(0.5) if new_rate == "variable" else (lambda: 0.5)
    with pytest.warns(UserWarning, match="traced .* keep using the previous one"):
        opt.learning_rate = replacement
    unbuilt = tf_lion.Lion(learning_rate=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unbuilt.learning_rate = replacement  # nothing traced yet: no warning


def test_exclude_from_weight_decay(rng):
    theta = _random(rng, (4,))
    g = _random(rng, (4,))
    for how in ["var_list", "var_names"]:
        kernel, bias = tf.Variable(theta, name="kernel"), tf.Variable(theta, name="bias")
        opt = tf_lion.Lion(learning_rate=0.01, weight_decay=0.3, jit_compile=False)
        if how == "var_list":
            opt.exclude_from_weight_decay(var_list=[bias])
        else:
            opt.exclude_from_weight_decay(var_names=["bias"])
        opt.apply_gradients([(tf.constant(g), kernel), (tf.constant(g), bias)])
        m0 = np.zeros_like(theta)
        np.testing.assert_array_equal(kernel.numpy(), ref.step(theta, m0, g, 0.01, 0.9, 0.99, 0.3)[0])
        np.testing.assert_array_equal(bias.numpy(), ref.step(theta, m0, g, 0.01, 0.9, 0.99, 0.0)[0])


def test_exclusions_of_the_other_kind_are_kept_by_a_later_call(rng):
    """Names from the constructor survive `exclude_from_weight_decay(var_list=...)`
    (tf-keras's method would drop them, and `get_config` with them); a call
    with neither kind clears both, as in tf-keras."""
    theta, g = _random(rng, (4,)), _random(rng, (4,))
    m0 = np.zeros_like(theta)
    decayed = ref.step(theta, m0, g, 0.01, 0.9, 0.99, 0.3)[0]
    kept = ref.step(theta, m0, g, 0.01, 0.9, 0.99, 0.0)[0]
    for calls, expected, names in [
            ([dict(var_list="emb")], [kept, kept, decayed], ["bias"]),
            ([dict(var_list="emb"), dict(var_names=["kernel"])], [kept, decayed, kept],
             ["kernel"]),
            ([dict(var_names=["kernel"])], [decayed, decayed, kept], ["kernel"]),
            ([dict(var_list="emb"), dict()], [decayed, decayed, decayed], None)]:
        emb, bias, kernel = (tf.Variable(theta, name=n) for n in ("emb", "bias", "kernel"))
        opt = tf_lion.Lion(learning_rate=0.01, weight_decay=0.3, jit_compile=False,
                           exclude_from_weight_decay_names=["bias"])
        for call in calls:
            opt.exclude_from_weight_decay(**{k: [emb] if v == "emb" else v
                                             for k, v in call.items()})
        assert opt.get_config().get("exclude_from_weight_decay_names") == names
        opt.apply_gradients([(tf.constant(g), v) for v in (emb, bias, kernel)])
        for v, want in zip((emb, bias, kernel), expected):
            np.testing.assert_array_equal(v.numpy(), want, err_msg=f"{calls} {v.name}")


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_variable_constraint_applies_after_the_update(jit_compile, traced):
    v = tf.Variable([1.0, -1.0, 0.25], constraint=lambda x: tf.minimum(x, 0.5))
    opt = tf_lion.Lion(0.25, beta_1=0.5, beta_2=0.75, jit_compile=jit_compile)

    def step():
        opt.apply_gradients([(tf.constant([-1.0, 1.0, -1.0]), v)])
    (tf.function(step) if traced else step)()
    np.testing.assert_array_equal(v.numpy(), [0.5, -1.25, 0.5])


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_constraint_runs_only_when_the_step_changes_the_variables(jit_compile, traced):
    """A skipped step (`skip_nonfinite`) and a call that only accumulates change
    nothing: MaxNorm, which rescales by n / (n + 1e-7) (not 1 in float32 for a
    norm of 0.5), must not run there."""
    def make(**kwargs):
        v = tf.Variable([[0.3, 0.4]], constraint=tf_keras.constraints.MaxNorm(5.0, axis=1))
        opt = tf_lion.Lion(0.1, jit_compile=jit_compile, **kwargs)
        step = lambda g: opt.apply_gradients([(g, v)])  # noqa: E731
        return v, opt, (tf.function(step) if traced else step)

    v, opt, step = make(skip_nonfinite=True)
    for _ in range(3):
        step(tf.constant([[np.nan, -1.0]]))
    assert int(opt.skipped_steps) == 3
    np.testing.assert_array_equal(v.numpy(), np.float32([[0.3, 0.4]]))
    step(tf.constant([[-1.0, -1.0]]))  # applied: [0.4, 0.5], then rescaled a little
    np.testing.assert_allclose(v.numpy(), [[0.4, 0.5]], rtol=1e-6)

    v, opt, step = make(gradient_accumulation_steps=3)
    for _ in range(2):
        step(tf.constant([[-1.0, -1.0]]))
        np.testing.assert_array_equal(v.numpy(), np.float32([[0.3, 0.4]]))
    step(tf.constant([[-1.0, -1.0]]))
    np.testing.assert_allclose(v.numpy(), [[0.4, 0.5]], rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_constrained_table_and_an_empty_lazy_step(jit_compile, traced):
    """A lazy step without rows changes nothing, constraint included; a step
    with rows constrains the whole variable (a constraint is a function of all
    of it), as tf-keras."""
    table = tf.Variable([[0.3, 0.4], [0.6, 0.8]],
                        constraint=tf_keras.constraints.MaxNorm(5.0, axis=1))
    opt = tf_lion.Lion(0.1, sparse_mode="lazy", jit_compile=jit_compile)

    def step(indices):
        rows = tf.ones([tf.size(indices), 2])
        opt.apply_gradients([(tf.IndexedSlices(rows, indices, tf.constant([2, 2])), table)])
    step = tf.function(step) if traced else step
    before = table.numpy()
    step(tf.zeros([0], tf.int32))
    np.testing.assert_array_equal(table.numpy(), before)
    step(tf.constant([0]))
    np.testing.assert_allclose(table.numpy(), [[0.2, 0.3], [0.6, 0.8]], rtol=1e-6)
    assert not np.array_equal(table.numpy()[1], before[1])  # rescaled by n / (n + 1e-7)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_variable_constraint_applies_after_an_ema_overwrite(jit_compile):
    """As tf-keras: the weights an EMA overwrite leaves are constrained too."""
    v = tf.Variable([0.05, 1.0], constraint=tf_keras.constraints.NonNeg())
    opt = tf_lion.Lion(0.1, use_ema=True, ema_momentum=0.0, ema_overwrite_frequency=1,
                       jit_compile=jit_compile)
    tf.function(lambda: opt.apply_gradients([(tf.constant([1.0, 1.0]), v)]))()
    np.testing.assert_array_equal(v.numpy(), np.float32([0.0, 0.9]))


def test_none_gradients_are_skipped(rng):
    a, b = tf.Variable(_random(rng, (3,))), tf.Variable(_random(rng, (3,)))
    before = b.numpy()
    opt = tf_lion.Lion(learning_rate=0.1)
    opt.apply_gradients([(tf.ones(3), a), (None, b)])
    np.testing.assert_array_equal(b.numpy(), before)
    np.testing.assert_array_equal(opt.get_slot(b, "m").numpy(), np.zeros(3))
    assert int(opt.iterations) == 1


def test_clipping_applies_before_update(rng):
    g = np.array([3.0, -4.0], np.float32)  # norm 5
    var = tf.Variable([0.0, 0.0])
    opt = tf_lion.Lion(learning_rate=0.1, clipnorm=1.0, jit_compile=False)
    opt.apply_gradients([(tf.constant(g), var)])
    clipped = (g * np.float32(1.0) / np.float32(5.0)).astype(np.float32)
    np.testing.assert_allclose(opt.get_slot(var, "m").numpy(),
                               (np.float32(1) - np.float32(0.99)) * clipped, rtol=1e-6)


def test_momentum_dtype_stores_bfloat16(rng):
    var = tf.Variable(_random(rng, (8,)))
    opt = tf_lion.Lion(momentum_dtype="bfloat16")
    opt.apply_gradients([(tf.ones(8), var)])
    assert opt.get_slot(var, "m").dtype == tf.bfloat16
    assert var.dtype == tf.float32


def test_bfloat16_momentum_stalls_below_target():
    """The precision trade-off documented in README: a bf16 momentum with beta_2=0.99 fed
    a constant gradient of 1 stops moving once (1 - beta_2) * (1 - m) falls below half a
    bf16 ulp of m (2**-9 in [0.5, 1)): at m = 1 - 2**-9 / 0.01 = 0.805, not at 1."""
    var32, var16 = tf.Variable([0.0]), tf.Variable([0.0])
    opt32 = tf_lion.Lion(beta_2=0.99)
    opt16 = tf_lion.Lion(beta_2=0.99, momentum_dtype="bfloat16")
    for _ in range(1000):
        opt32.apply_gradients([(tf.ones(1), var32)])
        opt16.apply_gradients([(tf.ones(1), var16)])
    m32 = float(opt32.get_slot(var32, "m").numpy()[0])
    m16 = float(tf.cast(opt16.get_slot(var16, "m"), tf.float32).numpy()[0])
    assert m32 > 0.99  # float32 reaches its target of 1
    assert abs(m16 - (1 - 2**-9 / 0.01)) <= 2**-8  # stalls within one bf16 ulp of 0.805


def test_mixed_precision_policies(rng):
    for policy in ["mixed_float16", "mixed_bfloat16"]:
        tf_keras.mixed_precision.set_global_policy(policy)
        try:
            layer = tf_keras.layers.Dense(3)
            x = tf.constant(_random(rng, (4, 5)))
            opt = tf_lion.Lion(learning_rate=0.01)
            before = [v.numpy() for v in layer.trainable_variables] if layer.built else None
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.cast(layer(x), tf.float32) ** 2)
            grads = tape.gradient(loss, layer.trainable_variables)
            before = [v.numpy() for v in layer.trainable_variables]
            opt.apply_gradients(zip(grads, layer.trainable_variables))
            for v, b in zip(layer.trainable_variables, before):
                assert v.dtype == tf.float32
                assert opt.get_slot(v, "m").dtype == tf.float32
                assert np.any(v.numpy() != b)
        finally:
            tf_keras.mixed_precision.set_global_policy("float32")


def test_ema_matches_reference_and_finalize(rng):
    theta = _random(rng, (5,))
    grads = [_random(rng, (5,)) for _ in range(4)]
    var = tf.Variable(theta)
    opt = tf_lion.Lion(learning_rate=0.01, use_ema=True, ema_momentum=0.9, jit_compile=False)
    e_theta, m, avg = theta, np.zeros_like(theta), theta.copy()
    for g in grads:
        opt.apply_gradients([(tf.constant(g), var)])
        e_theta, m, _ = ref.step(e_theta, m, g, 0.01, 0.9, 0.99)
        avg = ref.f32(0.9) * avg + (ref.f32(1) - ref.f32(0.9)) * e_theta
    np.testing.assert_array_equal(var.numpy(), e_theta)
    np.testing.assert_array_equal(opt.get_slot(var, "average").numpy(), avg)
    opt.finalize_variable_values([var])
    np.testing.assert_array_equal(var.numpy(), avg)


def test_ema_overwrite_frequency(rng):
    var = tf.Variable(_random(rng, (3,)))
    opt = tf_lion.Lion(learning_rate=0.1, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2)
    opt.apply_gradients([(tf.ones(3), var)])
    assert np.any(var.numpy() != opt.get_slot(var, "average").numpy())
    opt.apply_gradients([(tf.ones(3), var)])
    np.testing.assert_array_equal(var.numpy(), opt.get_slot(var, "average").numpy())


def test_variables_order_and_new_variables_get_slots(rng):
    a, b = tf.Variable(_random(rng, (2,))), tf.Variable(_random(rng, (3,)))
    opt = tf_lion.Lion()
    opt.apply_gradients([(tf.ones(2), a)])
    assert [v.shape for v in opt.variables] == [(), (2,)]
    opt.apply_gradients([(tf.ones(3), b), (tf.ones(2), a)])  # b is new: gets its slot now
    # A step over all the variables orders them (as fit's steps over the model's).
    assert [v.shape for v in opt.variables] == [(), (3,), (2,)]
    assert opt.variables[2] is opt.get_slot(a, "m")
    opt.apply_gradients([(tf.ones(2), a)])  # a subset: the order stays
    assert [v.shape for v in opt.variables] == [(), (3,), (2,)]
    opt.apply_gradients([(tf.ones(2), a), (tf.ones(3), b)])
    assert [v.shape for v in opt.variables] == [(), (2,), (3,)]
    assert opt.get_slot_names() == ["m"]


def test_sparse_modes_through_optimizer(rng):
    table = _random(rng, (12, 4))
    indices = np.array([1, 5, 1, 7, 5, 5], np.int64)
    values = _random(rng, (6, 4))
    for mode in ["exact", "lazy"]:
        var = tf.Variable(table)
        opt = tf_lion.Lion(learning_rate=0.01, weight_decay=0.2, sparse_mode=mode, jit_compile=False)
        opt.apply_gradients([(tf.IndexedSlices(tf.constant(values), tf.constant(indices),
                                               tf.constant([12, 4], tf.int64)), var)])
        e_theta, e_m, _ = ref.sparse_step(table, np.zeros_like(table), indices, values,
                                          0.01, 0.9, 0.99, 0.2, mode=mode)
        np.testing.assert_array_equal(var.numpy(), e_theta)
        np.testing.assert_array_equal(opt.get_slot(var, "m").numpy(), e_m)


def test_embedding_gradient_is_sparse_and_applied(rng):
    layer = tf_keras.layers.Embedding(50, 4)
    ids = tf.constant([[1, 2, 2], [7, 1, 3]])
    layer(ids)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(ids) ** 2)
    (grad,) = tape.gradient(loss, layer.trainable_variables)
    assert isinstance(grad, tf.IndexedSlices)
    before = layer.embeddings.numpy()
    opt = tf_lion.Lion(learning_rate=0.1, sparse_mode="lazy")
    opt.apply_gradients([(grad, layer.embeddings)])
    changed = np.where(np.any(layer.embeddings.numpy() != before, axis=1))[0]
    np.testing.assert_array_equal(changed, [1, 2, 3, 7])


# --------------------------------------------------------------------------- #
# Inputs of other types
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("jit_compile", [False, True])
def test_numpy_scalar_arguments_act_like_python_numbers(rng, jit_compile):
    """NumPy scalars (from a config, `np.linspace`, ...) are Python numbers to the step."""
    theta = _random(rng, (3, 5))
    grads = [[_random(rng, (3, 5))] for _ in range(4)]
    plain = tf_lion.Lion(0.01, beta_2=0.99, weight_decay=0.1, gradient_accumulation_steps=2,
                         loss_scale_factor=4.0, seed=3, jit_compile=jit_compile)
    numpy_args = tf_lion.Lion(0.01, beta_2=np.float32(0.99), weight_decay=0.1,
                              gradient_accumulation_steps=np.int64(2),
                              loss_scale_factor=np.float64(4.0), seed=np.int32(3),
                              jit_compile=jit_compile)
    for opt in (plain, numpy_args):
        opt.vars_ = _run(opt, [theta], grads)
    np.testing.assert_array_equal(numpy_args.vars_[0].numpy(), plain.vars_[0].numpy())
    assert not np.array_equal(plain.vars_[0].numpy(), theta)
    assert numpy_args._momentum_first is True
    config = numpy_args.get_config()
    for key in ("beta_2", "gradient_accumulation_steps", "loss_scale_factor", "seed"):
        assert type(config[key]) in (int, float), (key, type(config[key]))


def test_numpy_and_list_gradients_are_converted():
    """As in tf-keras: a NumPy array or a list is a dense gradient."""
    expected = tf.Variable([1.0, 2.0])
    tf_lion.Lion(0.1).apply_gradients([(tf.constant([1.0, -1.0]), expected)])
    for grad in (np.array([1.0, -1.0], np.float32), [1.0, -1.0]):
        var = tf.Variable([1.0, 2.0])
        tf_lion.Lion(0.1).apply_gradients([(grad, var)])
        np.testing.assert_array_equal(var.numpy(), expected.numpy())
    with pytest.raises(TypeError, match="float64"):  # a float64 array is not silently cast
        tf_lion.Lion(0.1).apply_gradients([(np.array([1.0, -1.0]), tf.Variable([1.0, 2.0]))])


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("beta_1,beta_2", [(0.9, 0.9), (0.95, 0.9), (0.9, 1.0), (0.0, 0.99),
                                           (0.0, 0.5), (0.99, 0.990000001), (0.9, 0.99999999)])
def test_infinite_gradient_with_beta_1_not_below_beta_2_gives_the_textbook_step(
        jit_compile, beta_1, beta_2):
    """sign(+-inf) = +-1: theta moves by lr. The rebuilt direction would compute
    0 * inf or inf - inf (NaN), so beta_1 >= beta_2, beta_1 = 0 (`beta_1 * m'`
    with m' infinite) and beta_2 = 1 (the momentum's own update is 0 * inf)
    keep the textbook order, compared in float32 as the step sees them."""
    opt = tf_lion.Lion(0.1, beta_1=beta_1, beta_2=beta_2, jit_compile=jit_compile)
    assert not opt._momentum_first
    var = tf.Variable([1.0, 1.0, 1.0])
    opt.apply_gradients([(tf.constant([np.inf, -np.inf, 1.0]), var)])
    np.testing.assert_array_equal(var.numpy(), np.float32([0.9, 1.1, 0.9]))
    assert tf_lion.Lion(0.1, beta_1=0.9, beta_2=0.99)._momentum_first  # the usual case


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("beta_2", [1e-10, 1e-4, 0.3])
def test_small_beta_2_keeps_the_textbook_direction(jit_compile, beta_2):
    """Below MOMENTUM_FIRST_MIN_BETA_2 the rebuilt direction would lose precision
    (at beta_2 = 1e-10 it cancels to zero); the textbook order is used instead."""
    opt = tf_lion.Lion(0.1, beta_2=beta_2, jit_compile=jit_compile)
    assert not opt._momentum_first
    theta = np.array([0.0, 0.0, 0.0, 1.0], np.float32)
    m0 = np.array([0.0, 0.0, 0.0, 0.0], np.float32)
    steps = [np.array([1.0, -3.0, 0.5, 2.0], np.float32),
             np.array([-0.25, 1.0, 0.75, -0.5], np.float32)]
    var = tf.Variable(theta)
    for g in steps:
        opt.apply_gradients([(tf.constant(g), var)])
    expected, m = theta, m0
    for g in steps:
        expected, m, c = ref.step(expected, m, g, 0.1, 0.9, beta_2)
        assert np.all(np.abs(c) > 1e-3)  # no sign near zero: the result is exact
    # theta - lr * sign(c) without weight decay: lr * (+-1) is exact, so a fused
    # multiply-add (XLA) rounds the same as the reference.
    np.testing.assert_array_equal(var.numpy(), expected)
    assert tf_lion.Lion(beta_1=0.4, beta_2=0.5)._momentum_first and tf_lion.Lion(beta_2=0.99)._momentum_first
