"""The fast paths: in-place formulation, grouped and shared programs, padded sparse rows.

No timings here (benchmarks/ measures); these tests check that each fast path
gives the right numbers and has the structure that makes it fast.
"""

import gc
import os
import platform
import re
import types

import numpy as np
import pytest
import tensorflow as tf

import numpy_lion as ref
import tf_lion
from tf_lion import step as step_lib
from tf_lion import update as update_lib

EPS32 = np.finfo(np.float32).eps


def _optimized_hlo(fn, *args):
    return tf.function(fn, jit_compile=True).experimental_get_compiler_ir(*args)(
        stage="optimized_hlo")


def _table_copies(hlo, shape):
    """`copy` instructions of a whole table (XLA copies a buffer it cannot update in place)."""
    dims = ",".join(str(d) for d in shape)
    return [line for line in hlo.splitlines() if re.search(rf"= f32\[{dims}\]\S* copy\(", line)]


def test_momentum_first_matches_textbook_except_near_zero(rng):
    theta, m, g = (rng.standard_normal(100_000).astype(np.float32) for _ in range(3))
    m[:100] = 0.0  # sign(0) cases
    g[:50] = 0.0
    args = [tf.constant(x) for x in (theta, m, g)] + [tf.constant(np.float32(x))
                                                        for x in (0.01, 0.9, 0.99, 0.1)]
    t1, m1 = update_lib.lion_step(*args)
    t2, m2 = update_lib.lion_step(*args, momentum_first=True)
    np.testing.assert_array_equal(m1.numpy(), m2.numpy())  # the same momentum
    _, _, c = ref.step(theta, m, g, 0.01, 0.9, 0.99, 0.1)
    near_zero = np.abs(c) <= 4 * EPS32 * (np.abs(0.9 * m) + np.abs(0.1 * g))
    differ = t1.numpy() != t2.numpy()
    assert not np.any(differ & ~near_zero)  # signs agree wherever c is clear of zero
    assert np.sum(differ) <= 5


def test_beta_2_zero_keeps_the_textbook_order(rng):
    """With beta_2 = 0 the new momentum is g, and c still needs the old momentum."""
    theta, g1, g2 = (rng.standard_normal(64).astype(np.float32) for _ in range(3))
    var = tf.Variable(theta)
    opt = tf_lion.Lion(0.01, beta_1=0.5, beta_2=0.0, jit_compile=True)
    assert not opt._momentum_first
    assert tf_lion.Lion(beta_2=0.99)._momentum_first
    m = np.zeros_like(theta)
    for g in (g1, g2):
        opt.apply_gradients([(tf.constant(g), var)])
        e_theta, e_m = ref.assert_fused_step_close(var.numpy(), opt.get_slot(var, "m").numpy(),
                                                   theta, m, g, 0.01, 0.5, 0.0)
        theta, m = var.numpy(), e_m
    np.testing.assert_array_equal(opt.get_slot(var, "m").numpy(), g2)


def _table_broadcasts(hlo, shape):
    """Table-sized buffers the program fills from a scalar (a zero gradient table, say)."""
    dims = ",".join(str(d) for d in shape)
    entry = hlo[hlo.index("\nENTRY"):].split("\n}")[0]
    return [line for line in entry.splitlines()
            if re.search(rf"= f32\[{dims}\]\S* (broadcast\(|fusion\(%\S+\), kind=kLoop, "
                         rf"calls=%wrapped_broadcast)", line)]


@pytest.mark.parametrize("rule", ["dense", "exact"])
def test_compiled_update_has_no_table_sized_copy(rule, monkeypatch):
    """XLA updates theta and m in place (the textbook order copies m every step);
    exact sparse builds no table-sized temporary."""
    shape = (2000, 32)
    var, mom = tf.Variable(tf.ones(shape)), tf.Variable(tf.zeros(shape))
    if rule == "dense":
        grad = tf.ones(shape)

        def step(g, momentum_first):
            update_lib.dense_update(var, mom, g, 0.01, 0.9, 0.99, 0.1,
                                    momentum_first=momentum_first)
        args = (grad,)
    else:
        idx, vals = tf.constant([3, 7, 7, 1999]), tf.ones([4, 32])

        def step(i, v, momentum_first):
            update_lib.exact_sparse_update(var, mom, i, v, 0.01, 0.9, 0.99, 0.1,
                                           momentum_first=momentum_first)
        args = (idx, vals)
    fast = _optimized_hlo(lambda *a: step(*a, momentum_first=True), *args)
    assert _table_copies(fast, shape) == []
    if rule == "dense":  # the check can fail: the textbook order does copy
        textbook = _optimized_hlo(lambda *a: step(*a, momentum_first=False), *args)
        assert len(_table_copies(textbook, shape)) >= 1
    else:
        assert _table_broadcasts(fast, shape) == []
        # The check can fail: a zero gradient table is a broadcast, and without
        # the one-element dependency that orders the momentum pass after the
        # parameter pass, XLA copies the momentum.
        def scattered(i, v):  # the rows scattered into a zero gradient table
            dense = tf.tensor_scatter_nd_update(tf.zeros(shape), i[:, None], v)
            update_lib.dense_update(var, mom, dense, 0.01, 0.9, 0.99, 0.1, momentum_first=True)
        assert len(_table_broadcasts(_optimized_hlo(scattered, *args), shape)) >= 1
        monkeypatch.setattr(update_lib, "_false_after", lambda x: tf.constant(False))
        unordered = _optimized_hlo(lambda *a: step(*a, momentum_first=True), *args)
        assert len(_table_copies(unordered, shape)) >= 1


def _ops(fn):
    return [op.type for op in tf.function(fn).get_concrete_function().graph.get_operations()]


@pytest.mark.parametrize("rule", ["dense", "exact"])
def test_graph_mode_steps_theta_with_the_fused_kernel(rule, rng):
    """Without XLA, `theta - lr * direction` is one in-place kernel for float32
    variables (one pass over memory instead of two), and the same numbers as
    the numpy reference bit for bit, at sizes where the kernels vectorize."""
    shape = (257, 67)  # odd sizes: vector loops and their scalar tails
    theta, m = _random_pair(rng, shape)
    idx = rng.integers(0, shape[0], 300).astype(np.int64)
    vals = rng.standard_normal((300, shape[1])).astype(np.float32)
    g = ref.densify(idx, vals, shape[0]) if rule == "exact" else \
        rng.standard_normal(shape).astype(np.float32)
    var, mom = tf.Variable(theta), tf.Variable(m)

    def step():
        if rule == "exact":
            update_lib.exact_sparse_update(var, mom, tf.constant(idx), tf.constant(vals),
                                           0.01, 0.9, 0.99, 0.1)
        else:
            update_lib.dense_update(var, mom, tf.constant(g), 0.01, 0.9, 0.99, 0.1)
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert _ops(step).count("ResourceApplyGradientDescent") == (1 if x86 else 0)
    want_theta, want_m = theta, m
    for run in (step, tf.function(step)):  # eager, then graph
        run()
        want_theta, want_m, _ = ref.step(want_theta, want_m, g, 0.01, 0.9, 0.99, 0.1)
        np.testing.assert_array_equal(var.numpy(), want_theta)
        np.testing.assert_array_equal(mom.numpy(), want_m)
    # bfloat16 variables are computed in float32 and rounded once: no fused kernel.
    low, low_m = tf.Variable(tf.cast(theta, tf.bfloat16)), tf.Variable(m)

    def low_step():
        update_lib.dense_update(low, low_m, tf.cast(g, tf.bfloat16), 0.01, 0.9, 0.99, 0.1)
    assert "ResourceApplyGradientDescent" not in _ops(low_step)


def test_fused_kernel_only_on_x86_cpus_and_theta_read_only_when_decayed():
    """GPU kernels contract `theta - lr * direction` into one multiply-add
    (one rounding instead of two), so the fused kernel is for CPUs only; and
    without weight decay the in-place step does not read theta at all (on a
    table in copy-on-read mode a read copies the table)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")

    def var(device, dtype=tf.float32):
        return types.SimpleNamespace(dtype=dtype, device=device)
    cpu, gpu = "/job:localhost/replica:0/task:0/device:CPU:0", "/job:worker/task:1/device:GPU:0"
    assert update_lib._steps_in_place(var(cpu), tf.float32) == x86
    assert update_lib._steps_in_place(var("/job:ps/task:0/device:CPU:0"), tf.float32) == x86
    assert not update_lib._steps_in_place(var(gpu), tf.float32)
    assert not update_lib._steps_in_place(var(""), tf.float32)
    assert not update_lib._steps_in_place(var(cpu, tf.bfloat16), tf.float32)
    v, m = tf.Variable(tf.ones([300])), tf.Variable(tf.ones([300]))
    for wd, reads in ((None, 1 if x86 else 2), (0.1, 2)):
        def step(wd=wd):
            update_lib.dense_update(v, m, tf.ones([300]), 0.01, 0.9, 0.99, wd)
        assert _ops(step).count("ReadVariableOp") == reads


def _graph_ops(fn):
    return tf.function(fn).get_concrete_function().graph.get_operations()


# The (theta, momentum) dtypes: stored in the compute dtype or not.
_STORAGE = [("float32", "float32"), ("bfloat16", "float32"), ("float32", "bfloat16"),
            ("bfloat16", "bfloat16")]


@pytest.mark.parametrize("rule", ["dense", "exact"])
@pytest.mark.parametrize("momentum_first", [False, True])
@pytest.mark.parametrize("weight_decay", [None, 0.1])
@pytest.mark.parametrize("theta_dtype, m_dtype", _STORAGE)
def test_graph_mode_fuses_each_add_scaled_with_the_same_bits(
        theta_dtype, m_dtype, weight_decay, momentum_first, rule, rng, monkeypatch):
    """Without XLA, at FUSED_MIN_ELEMENTS elements or more, each `x + a * y`
    of the step is TF's fused in-place kernel on a temporary resource that
    adopts `x`, and the numbers are those of the plain ops bit for bit (eager,
    and graph below the threshold)."""
    shape = (257, 257)  # 66049 >= FUSED_MIN_ELEMENTS, odd: vector loops and scalar tails
    assert np.prod(shape) >= update_lib.FUSED_MIN_ELEMENTS
    theta, m = _random_pair(rng, shape)
    idx = rng.integers(0, shape[0], 300).astype(np.int64)
    vals = rng.standard_normal((300, shape[1])).astype(np.float32)
    grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
    x86 = platform.machine().lower() in ("x86_64", "amd64")

    def run(mode):
        var = tf.Variable(tf.cast(theta, theta_dtype))
        mom = tf.Variable(tf.cast(m, m_dtype))

        def step(g):
            if rule == "exact":
                update_lib.exact_sparse_update(
                    var, mom, tf.constant(idx), tf.cast(vals, theta_dtype), 0.01, 0.9, 0.99,
                    weight_decay, momentum_first=momentum_first)
            else:
                update_lib.dense_update(var, mom, g, 0.01, 0.9, 0.99, weight_decay,
                                        momentum_first=momentum_first)
        args = [tf.cast(g, theta_dtype) for g in grads]
        if mode == "graph":
            ops = _graph_ops(lambda: step(args[0]))
            types_ = [op.type for op in ops]
            # momentum, c, direction (with decay) and theta; exact mode's
            # zero-gradient pass: direction and theta
            want = (3 if rule == "dense" else 1) + (weight_decay is not None)
            assert types_.count("ResourceApplyGradientDescent") == (want if x86 else 0)
            temps = (rule == "dense") * 2 + (weight_decay is not None) + \
                (theta_dtype != "float32")
            assert types_.count("VarHandleOp") == (temps if x86 else 0)
            step = tf.function(step)
        for g in args:
            step(g)
        return [tf.cast(x, tf.float32).numpy() for x in (var, mom)]

    fused = run("graph")
    eager = run("eager")
    monkeypatch.setattr(update_lib, "FUSED_MIN_ELEMENTS", 10**12)
    plain = run("plain graph")
    for a, b, c in zip(fused, eager, plain):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    if (theta_dtype, m_dtype, momentum_first, rule) == ("float32", "float32", False, "dense"):
        want_theta, want_m = theta, m
        for g in grads:
            want_theta, want_m, _ = ref.step(want_theta, want_m, g, 0.01, 0.9, 0.99,
                                             weight_decay or 0.0)
        np.testing.assert_array_equal(fused[0], want_theta)
        np.testing.assert_array_equal(fused[1], want_m)


def test_fused_arithmetic_only_in_graphs_without_xla_on_large_x86_cpu_variables():
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    cpu = "/job:localhost/replica:0/task:0/device:CPU:0"

    def var(device=cpu, shape=(256, 256)):
        return types.SimpleNamespace(dtype=tf.float32, device=device, shape=tf.TensorShape(shape))
    assert not update_lib._fuses(var())  # eagerly
    seen = {}

    def trace():
        seen["large"] = update_lib._fuses(var())
        seen["ps"] = update_lib._fuses(var("/job:ps/task:1/device:CPU:0"))
        seen["small"] = update_lib._fuses(var(shape=(255, 256)))
        seen["unknown size"] = update_lib._fuses(var(shape=(None, 256)))
        seen["gpu"] = update_lib._fuses(var("/device:GPU:0"))
        seen["unplaced"] = update_lib._fuses(var(""))
        return tf.constant(0)
    tf.function(trace).get_concrete_function()
    assert seen == {"large": x86, "ps": x86, "small": False, "unknown size": False,
                    "gpu": False, "unplaced": False}
    tf.function(trace, jit_compile=True).get_concrete_function()
    assert not any(seen.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_mode_ema_is_updated_in_place_with_the_same_bits(dtype, rng, monkeypatch):
    """The weights' EMA is another `moving_average`: for an average of
    FUSED_MIN_ELEMENTS or more its sum is the fused kernel without XLA; the
    bits are the plain ops' and numpy's."""
    shape = (257, 257)
    average0 = rng.standard_normal(shape).astype(np.float32)
    values = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
    x86 = platform.machine().lower() in ("x86_64", "amd64")

    def run():
        average = tf.Variable(tf.cast(average0, dtype))

        @tf.function
        def step(v):
            update_lib.ema_update(average, tf.cast(v, dtype), 0.999)
        for v in values:
            step(tf.constant(v))
        ops = [op.type for op in step.get_concrete_function(tf.constant(values[0])).graph
               .get_operations()]
        return tf.cast(average, tf.float32).numpy(), ops
    fused, ops = run()
    assert ops.count("ResourceApplyGradientDescent") == int(x86)
    monkeypatch.setattr(update_lib, "FUSED_MIN_ELEMENTS", 10**12)
    plain, ops = run()
    assert "ResourceApplyGradientDescent" not in ops
    np.testing.assert_array_equal(fused, plain)
    if dtype == "float32":
        want = average0
        for v in values:
            want = np.float32(0.999) * want + (np.float32(1) - np.float32(0.999)) * v
        np.testing.assert_array_equal(fused, want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_path_takes_shape_one_hyperparameters(dtype):
    """Hyperparameters given as shape-[1] tensors (accepted by Lion) are made
    scalars: the fused kernel's `alpha` must be one."""
    def run(wrap):
        var = tf.Variable(tf.ones([256, 256], dtype))
        opt = tf_lion.Lion(wrap(0.01), beta_1=wrap(0.9), beta_2=wrap(0.99),
                           weight_decay=wrap(0.1), use_ema=True, ema_momentum=wrap(0.9),
                           jit_compile=False)
        grad = tf.fill([256, 256], tf.constant(0.5, dtype))
        step = tf.function(lambda: opt.apply_gradients([(grad, var)]))
        step()
        step()
        return [tf.cast(x, tf.float32).numpy()
                for x in (var, opt.get_slot(var, "m"), opt.get_slot(var, "average"))]
    for a, b in zip(run(lambda x: tf.constant([x])), run(lambda x: x)):
        np.testing.assert_array_equal(a, b)


def test_packs_group_small_dense_variables_of_one_kind(monkeypatch):
    def var(shape, dtype=tf.float32):
        return types.SimpleNamespace(shape=tf.TensorShape(shape), dtype=dtype)
    f32, bf16 = tf.float32, tf.bfloat16
    dense, sparse = tf.zeros([1]), tf.IndexedSlices(tf.zeros([1, 4]), tf.constant([0]))
    rows = [  # (variable, gradient, momentum dtype, extra slot, decayed, seed)
        (var([4]), dense, f32, None, True, None),            # 0: pack 1
        (var([2, 3]), dense, f32, None, True, None),         # 1: pack 1
        (var([1024]), dense, f32, None, True, None),         # 2: pack 1 (at the limit)
        (var([1025]), dense, f32, None, True, None),         # 3: too large
        (var([4]), dense, f32, None, False, None),           # 4: alone without decay
        (var([4]), sparse, f32, None, True, None),           # 5: sparse gradient
        (var([4], bf16), dense, f32, None, True, None),      # 6: pack 2
        (var([4], bf16), dense, f32, None, True, None),      # 7: pack 2
        (var([4]), dense, f32, None, True, tf.constant([1, 2])),  # 8: stochastic rounding
        (var([4]), dense, f32, "average", True, None),       # 9: EMA
        (var([4]), dense, bf16, None, True, None),           # 10: alone with a bf16 momentum
        (var([None]), dense, f32, None, True, None),         # 11: size unknown
    ]
    twice = var([4])
    rows += [(twice, dense, f32, None, True, None)] * 2      # 12, 13: given twice
    variables = [r[0] for r in rows]
    grads = [r[1] for r in rows]
    slots = [dict({"m": var([1], r[2])}, **({r[3]: None} if r[3] else {})) for r in rows]
    decayed = [r[4] for r in rows]
    seeds = [r[5] for r in rows]
    options = ("exact", None, True)
    assert step_lib.packs(variables, grads, slots, decayed, seeds, options) == [[0, 1, 2], [6, 7]]
    accumulating = ("exact", 2, True)
    assert step_lib.packs(variables, grads, slots, decayed, seeds, accumulating) == []
    monkeypatch.setattr(step_lib, "PACK_MAX_TOTAL", 10)  # [4] + [2, 3] fit, [1024] alone
    assert step_lib.packs(variables, grads, slots, decayed, seeds, options) == [[0, 1], [6, 7]]
    seen = []
    tf.function(lambda: seen.append(step_lib.packs(variables, grads, slots, decayed, seeds,
                                                    options)), jit_compile=True
                ).get_concrete_function()
    assert seen == [[]]  # XLA fuses by itself


def test_a_variable_given_twice_takes_both_steps_without_xla():
    """Two gradients for one variable are two steps in turn (as with XLA):
    such a variable is never packed, where the second write would drop the
    first step."""
    results = []
    for jit in (True, False):
        v, w = tf.Variable([1.0, 2.0]), tf.Variable([3.0, 4.0])
        opt = tf_lion.Lion(0.1, jit_compile=jit)
        tf.function(lambda: opt.apply_gradients([
            (tf.constant([1.0, 1.0]), v), (tf.constant([1.0, -1.0]), v),
            (tf.constant([1.0, 1.0]), w)]))()
        results.append((v.numpy(), w.numpy()))
    np.testing.assert_allclose(results[0][0], [0.8, 2.0], rtol=1e-6)  # two steps of 0.1
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("graph", [False, True])
def test_packed_small_variables_equal_one_update_each(graph, rng, monkeypatch):
    """Without XLA the small dense variables are updated in packs of one dtype
    and weight decay; the bits are those of one update per variable, with a
    skipped non-finite step and a variable excluded from weight decay."""
    shapes = [(3,), (2, 5), (4,), (7, 3), (300,), (5,)]
    dtypes = ["float32", "float32", "bfloat16", "bfloat16", "float32", "float32"]
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(4)]
    grads[2][0][0] = np.nan  # skipped everywhere

    def run():
        variables = [tf.Variable(tf.constant(v, dtype), name=f"v{i}")
                     for i, (v, dtype) in enumerate(zip(values, dtypes))]
        opt = tf_lion.Lion(0.01, weight_decay=0.1, skip_nonfinite=True, jit_compile=False)
        opt.exclude_from_weight_decay(var_names=["v5"])

        def step(gs):
            opt.apply_gradients(zip(gs, variables))
        if graph:
            step = tf.function(step)
        for gs in grads:
            step([tf.constant(g, dtype) for g, dtype in zip(gs, dtypes)])
        return opt, variables, [tf.cast(x, tf.float32).numpy() for v in variables
                                for x in (v, opt.get_slot(v, "m"))]
    calls = []
    packed_dense_update = update_lib.packed_dense_update
    monkeypatch.setattr(update_lib, "packed_dense_update", lambda v, *a, **k: (
        calls.append([x.name for x in v]), packed_dense_update(v, *a, **k))[1])
    opt, variables, packed = run()
    assert set(map(tuple, calls)) == {("v0:0", "v1:0", "v4:0"), ("v2:0", "v3:0")}
    assert opt.skipped_steps.numpy() == 1
    monkeypatch.setattr(step_lib, "PACK_MAX_ELEMENTS", 0)
    calls.clear()
    _, _, single = run()
    assert calls == []
    for a, b in zip(packed, single):
        np.testing.assert_array_equal(a, b)
    # and the float32 ones are the numpy reference's
    for i in (0, 1, 4, 5):
        theta, m = values[i], np.zeros(shapes[i], np.float32)
        for k, gs in enumerate(grads):
            if k != 2:
                theta, m, _ = ref.step(theta, m, gs[i], 0.01, 0.9, 0.99, 0.0 if i == 5 else 0.1)
        np.testing.assert_array_equal(packed[2 * i], theta)
        np.testing.assert_array_equal(packed[2 * i + 1], m)


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_fused_temporaries_are_freed_within_the_step():
    """The anonymous resources `_fused_add_scaled` creates are owned by their
    handles: nothing accumulates from step to step."""
    n = 2**21  # 8 MB in float32: four temporaries a step would leak 1.3 GB in 40 steps
    var, mom = tf.Variable(tf.zeros([n], tf.bfloat16)), tf.Variable(tf.zeros([n], tf.bfloat16))
    grad = tf.ones([n], tf.bfloat16)

    @tf.function
    def step():
        update_lib.dense_update(var, mom, grad, 0.01, 0.9, 0.99, 0.1)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert [op.type for op in step.get_concrete_function().graph.get_operations()].count(
            "VarHandleOp") == 4
    for _ in range(3):
        step()
    before = _resident_bytes()
    for _ in range(40):
        step()
    assert _resident_bytes() - before < 160 * 2**20
    assert np.all(var.numpy().astype(np.float32) < 0)  # the steps ran


def test_update_chains_order_large_updates_per_chain_and_device():
    big = [tf.Variable(tf.zeros([16, 16]), name=f"big{i}") for i in range(5)]
    small = tf.Variable(tf.zeros([4]), name="small")
    with tf.device("/cpu:1"):
        other = tf.Variable(tf.zeros([16, 16]), name="other_device")
    created, results = {}, {}

    @tf.function
    def step():
        chains = step_lib.UpdateChains(chains=2)
        graph = tf.compat.v1.get_default_graph()
        for v in big + [small, other]:
            before = set(graph.get_operations())
            results[v.name] = chains.add(v, lambda v=v: v.assign_add(tf.ones_like(v)))
            created[v.name] = [op for op in graph.get_operations() if op not in before]

    step.get_concrete_function()

    def waits_for(name):
        """The updates whose result `name`'s update has as a control input."""
        inputs = {c for op in created[name] for c in op.control_inputs}
        return sorted(n for n, r in results.items() if r.op in inputs)
    # Two chains on cpu:0: 0 -> 2 -> 4 and 1 -> 3; the small variable and the
    # variable of another device wait for nothing.
    assert [waits_for(f"big{i}:0") for i in range(5)] == [
        [], [], ["big0:0"], ["big1:0"], ["big2:0"]]
    assert waits_for("small:0") == [] and waits_for("other_device:0") == []


@pytest.mark.parametrize("files, expected", [
    ({}, 64),                                                     # no cgroup files: affinity
    ({"cpu.max": "max 100000\n"}, 64),                            # v2, unlimited
    ({"cpu.max": "200000 100000\n"}, 2),                          # v2, 2 CPUs
    ({"cpu.max": "150000 100000\n"}, 2),                          # v2, 1.5 CPUs: round up
    ({"cpu.max": "50000 100000\n"}, 1),                           # v2, half a CPU: one chain
    ({"unified/cpu.max": "300000 100000\n"}, 3),                  # hybrid hierarchy
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 64),  # v1, none
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
    ({"cpu.max": "8000000 100000\n"}, 64),                        # v2, 80 CPUs: the affinity
    ({"cpu.max": "garbage\n"}, 64),                               # malformed: no limit
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "0\n"}, 64),
])
def test_cores_are_the_affinity_capped_by_the_cgroup_quota(files, expected, tmp_path,
                                                           monkeypatch, request):
    step_lib._cores.cache_clear()  # read once per process; here with a made-up affinity
    request.addfinalizer(step_lib._cores.cache_clear)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert step_lib._cores(str(tmp_path)) == expected
    assert step_lib.UpdateChains()._chains == step_lib._cores()  # the default root


@pytest.mark.parametrize("fused", [False, True])
def test_chained_graph_mode_optimizer_equals_reference(fused, rng, monkeypatch):
    """Without XLA the updates of variables of >= CHAIN_MIN_ELEMENTS are
    ordered (and, with `fused`, every variable takes the fused arithmetic of
    `_fused_add_scaled`); the numbers are the numpy reference's, bit for bit."""
    monkeypatch.setattr(step_lib, "PACK_MAX_ELEMENTS", 0)  # the small ones would be packed
    if fused:
        monkeypatch.setattr(update_lib, "FUSED_MIN_ELEMENTS", 1)
    shapes = [(16, 17)] * 5 + [(3,), (300,)]
    assert sum(int(np.prod(s)) >= step_lib.CHAIN_MIN_ELEMENTS for s in shapes) == 6
    theta = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    variables = [tf.Variable(t) for t in theta]
    opt = tf_lion.Lion(learning_rate=0.01, beta_1=0.9, beta_2=0.99, weight_decay=0.1,
                       jit_compile=False)

    @tf.function
    def step(gs):
        opt.apply_gradients(zip(gs, variables))
    m = [np.zeros(s, np.float32) for s in shapes]
    for gs in grads:
        step([tf.constant(g) for g in gs])
        for i, g in enumerate(gs):
            theta[i], m[i], _ = ref.step(theta[i], m[i], g, 0.01, 0.9, 0.99, 0.1)
    for v, t, mm in zip(variables, theta, m):
        np.testing.assert_array_equal(v.numpy(), t)
        np.testing.assert_array_equal(opt.get_slot(v, "m").numpy(), mm)


def _random_pair(rng, shape):
    theta = rng.standard_normal(shape).astype(np.float32)
    m = rng.standard_normal(shape).astype(np.float32)
    m[rng.random(shape) < 0.1] = 0.0  # sign(0) where the gradient is zero too
    return theta, m


def test_exact_sparse_under_xla_equals_dense_update_bitwise(rng):
    shape = (50, 4)
    theta = rng.standard_normal(shape).astype(np.float32)
    idx = rng.integers(0, 50, 30).astype(np.int32)
    vals = rng.standard_normal((30, 4)).astype(np.float32)
    dense_grad = ref.densify(idx, vals, 50)
    out = []
    for sparse in (True, False):
        var, mom = tf.Variable(theta), tf.Variable(theta * 0.5)

        @tf.function(jit_compile=True)
        def step():
            if sparse:
                update_lib.exact_sparse_update(var, mom, tf.constant(idx), tf.constant(vals),
                                               0.01, 0.9, 0.99, 0.1, momentum_first=True)
            else:
                update_lib.dense_update(var, mom, tf.constant(dense_grad), 0.01, 0.9, 0.99, 0.1,
                                        momentum_first=True)
        step()
        out.append((var.numpy(), mom.numpy()))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


def test_one_program_per_group_of_variables(rng, monkeypatch):
    """jit_compile=True updates the variables of a device in XLA programs of
    up to 16 variables (31 variables: 2 programs); they give the same bits
    as one program per variable."""
    values = [rng.standard_normal(s).astype(np.float32) for s in [(5,), (3, 4), (7, 2)] * 10]
    grads = [rng.standard_normal(v.shape).astype(np.float32) for v in values]
    table = rng.standard_normal((20, 3)).astype(np.float32)
    sparse = tf.IndexedSlices(tf.constant(rng.standard_normal((6, 3)).astype(np.float32)),
                              tf.constant([1, 4, 4, 19, 0, 1]), tf.constant([20, 3]))

    def run():
        variables = [tf.Variable(v) for v in values] + [tf.Variable(table)]
        opt = tf_lion.Lion(0.01, weight_decay=0.1, use_ema=True)
        step = tf.function(lambda: opt.apply_gradients(
            zip([tf.constant(g) for g in grads] + [sparse], variables)))
        for _ in range(3):
            step()
        return opt, [v.numpy() for v in variables] + [opt.get_slot(v, "m").numpy()
                                                      for v in variables]

    fused_opt, fused = run()
    assert step_lib.FUSION_GROUP_SIZE == 16
    assert fused_opt._compiled_step.experimental_get_tracing_count() == 2  # 16 + 15
    monkeypatch.setattr(step_lib, "fusable", lambda *args: False)
    single_opt, single = run()
    # one program per variable; traces shared by same-shaped variables only:
    # (5,), (3, 4), (7, 2) and the table
    assert single_opt._compiled_step.experimental_get_tracing_count() == 4
    for a, b in zip(fused, single):
        np.testing.assert_array_equal(a, b)


def test_fusion_groups_put_large_variables_alone():
    small, large = tf.Variable(tf.zeros([4])), tf.Variable(tf.zeros([512, 512]))
    variables = [small] * 20 + [large] + [small] * 3
    assert step_lib.fusion_groups(variables) == [
        list(range(16)), [20], [16, 17, 18, 19, 21, 22, 23]]
    assert step_lib.fusion_groups([large, large]) == [[0], [1]]
    assert step_lib.fusion_groups([]) == []


@pytest.mark.parametrize("mirrored", [False, True])
def test_traces_are_shared_only_where_variables_are_arguments(mirrored):
    """Without a strategy, same-shaped variable groups share one trace, also
    after the variables it was traced with are gone. Under a strategy the
    per-device variables are captured by the trace, so each set gets its own;
    a shared trace would keep updating the first set (it did, silently)."""
    strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if mirrored
                else tf.distribute.get_strategy())
    with strategy.scope():
        opt = tf_lion.Lion(0.1)

    def train(start):
        with strategy.scope():
            variables = [tf.Variable(tf.fill([4], start)) for _ in range(3)]

        @tf.function
        def step():
            strategy.run(lambda: opt.apply_gradients(zip([tf.ones([4])] * 3, variables)))
        step()
        step()
        return [v.numpy() for v in variables]

    for start in (1.0, 2.0, 3.0):
        for value in train(start):
            np.testing.assert_allclose(value, start - 0.2, rtol=1e-6)
        gc.collect()
    traces = opt._compiled_step._list_all_concrete_functions()
    if mirrored:
        assert len(traces) == 6  # 3 variable sets x 2 devices
    else:
        assert len(traces) == 1
        assert [c for c in traces[0].captured_inputs if c.dtype == tf.resource] == []


@pytest.mark.parametrize("sparse_mode, accumulation", [("exact", None), ("lazy", 2)])
def test_shared_traces_never_mix_shapes(sparse_mode, accumulation, rng, monkeypatch):
    """Groups of the same structure but other shapes get their own trace.

    Shared by a relaxed signature (`reduce_retracing`), a trace kept the static
    row count of the table it was traced with: exact sparse then left the
    other tables' untouched rows undecayed, and lazy accumulation failed on
    the touched-row mask. Same bits as one trace per variable set.
    """
    shapes = [(100, 8)] + [(3,)] * 15 + [(7, 8)] + [(3,)] * 15 + [(50, 8)] + [(3,)] * 15
    values = [rng.standard_normal(s).astype(np.float32) for s in shapes]

    def grad(shape):
        if len(shape) == 2:
            return tf.IndexedSlices(tf.constant(rng.standard_normal((3, 8)), tf.float32),
                                    tf.constant([0, 2, 2]), tf.constant(shape))
        return tf.constant(rng.standard_normal(shape), tf.float32)
    grads = [grad(s) for s in shapes]

    def run():
        variables = [tf.Variable(v) for v in values]
        opt = tf_lion.Lion(0.1, weight_decay=0.5, sparse_mode=sparse_mode,
                           gradient_accumulation_steps=accumulation)
        step = tf.function(lambda: opt.apply_gradients(zip(grads, variables)))
        for _ in range(4):
            step()
        return opt, [v.numpy() for v in variables]

    shared_opt, shared = run()
    assert shared_opt._compiled_step.experimental_get_tracing_count() == 3
    monkeypatch.setattr(step_lib, "trace_key", lambda vs: tuple(id(v) for v in vs))
    _, separate = run()
    for a, b in zip(shared, separate):
        np.testing.assert_array_equal(a, b)
    # row 40 of the 50-row table gets no gradient: exact moves it, lazy keeps it
    assert np.array_equal(shared[32][40], values[32][40]) == (sparse_mode == "lazy")


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_sparse_rows_of_varying_count_are_padded_harmlessly(sparse_mode, rng):
    """Row counts unknown at trace time (parameter-server shards) are padded to
    powers of two for XLA with out-of-range rows; results equal the unpadded,
    uncompiled update within XLA's fused rounding, and the last row, which a
    clamped gather of the padding would read, is untouched in lazy mode."""
    rows = 24
    theta = rng.standard_normal((rows, 3)).astype(np.float32)
    variables = {jit: tf.Variable(theta) for jit in (True, False)}
    opts = {jit: tf_lion.Lion(0.1, sparse_mode=sparse_mode, weight_decay=0.1, jit_compile=jit)
            for jit in (True, False)}
    steps = {}
    for jit in (True, False):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int32),
                                      tf.TensorSpec([None, 3], tf.float32)])
        def step(i, v, jit=jit):
            opts[jit].apply_gradients(
                [(tf.IndexedSlices(v, i, tf.constant([rows, 3])), variables[jit])])
        steps[jit] = step
    m = np.zeros_like(theta)
    for n in (3, 5, 7, 13, 2):
        idx = rng.integers(0, rows - 1, n).astype(np.int32)  # never the last row
        vals = rng.standard_normal((n, 3)).astype(np.float32)
        before = variables[True].numpy()
        for jit in (True, False):
            steps[jit](idx, vals)
        g = ref.densify(idx, vals, rows)
        got = variables[True].numpy()
        if sparse_mode == "lazy":
            touched = np.zeros(rows, bool)
            touched[idx] = True
            np.testing.assert_array_equal(got[~touched], before[~touched])
            ref.assert_fused_step_close(got[touched], opts[True].get_slot(
                variables[True], "m").numpy()[touched], before[touched], m[touched], g[touched],
                0.1, 0.9, 0.99, 0.1)
        else:
            ref.assert_fused_step_close(got, opts[True].get_slot(variables[True], "m").numpy(),
                                        before, m, g, 0.1, 0.9, 0.99, 0.1)
        m = opts[True].get_slot(variables[True], "m").numpy()
    if sparse_mode == "lazy":
        np.testing.assert_array_equal(variables[True].numpy()[rows - 1], theta[rows - 1])


def test_traces_of_the_compiled_step_do_not_warn_of_retracing(caplog):
    """Six variables of distinct large shapes: six programs (by design), and no
    "calls triggered tf.function retracing" warning from TensorFlow."""
    variables = [tf.Variable(tf.ones([2 ** 18 + i])) for i in range(6)]
    opt = tf_lion.Lion(0.1)
    with caplog.at_level("WARNING", logger="tensorflow"):
        for _ in range(2):
            opt.apply_gradients([(tf.ones_like(v), v) for v in variables])
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
    assert opt._compiled_step.experimental_get_tracing_count() == 6
