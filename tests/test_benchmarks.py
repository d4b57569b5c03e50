"""The benchmark harness (benchmarks/): its numpy check, and one tiny timing round.

No timing is asserted: these check that the harness measures what it claims,
that the correctness check in front of the timing accepts tf_lion and rejects
wrong updates, and that the JSON report has the documented structure.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

import tf_lion
from benchmarks import reference
from benchmarks import run as bench

HP = bench.HYPERPARAMETERS


class _WrongLion:
    """A stub optimizer: Lion with one deliberate error (`flaw`)."""

    def __init__(self, flaw):
        self.flaw = flaw
        self.slots = {}

    def get_slot(self, var, name):
        return self.slots[var.ref()]

    def apply_gradients(self, grads_and_vars):
        f32 = lambda x: tf.constant(x, tf.float32)  # noqa: E731 (float32, as Lion stores them)
        lr, b1, b2 = f32(HP["lr"]), f32(HP["beta_1"]), f32(HP["beta_2"])
        wd = f32(HP["weight_decay"])
        for g, v in grads_and_vars:
            if v.ref() not in self.slots:
                self.slots[v.ref()] = tf.Variable(tf.zeros_like(v))
            m = self.slots[v.ref()]
            g = tf.convert_to_tensor(g)
            c = b1 * m + (1 - b1) * g
            if self.flaw == "direction ignores the momentum":
                c = g
            elif self.flaw == "direction interpolates with beta_2":
                c = b2 * m + (1 - b2) * g
            direction = -tf.sign(c) if self.flaw == "flipped sign" else tf.sign(c)
            beta = b1 if self.flaw == "momentum uses beta_1" else b2
            v.assign(v - lr * (direction + wd * v))
            m.assign(beta * m + (1 - beta) * g)


def _dense_problem(seed=0, shapes=((7, 5), (3,))):
    rng = np.random.default_rng(seed)
    variables = [tf.Variable(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    return variables, grads


@pytest.mark.parametrize("jit", [True, False])
def test_check_accepts_tf_lion(jit):
    variables, grads = _dense_problem()
    opt = tf_lion.Lion(learning_rate=HP["lr"], beta_1=HP["beta_1"], beta_2=HP["beta_2"],
                       weight_decay=HP["weight_decay"], jit_compile=jit)
    opt.build(variables)
    step = tf.function(lambda: opt.apply_gradients(zip([tf.constant(g) for g in grads], variables)))
    _, stats = bench.check_optimizer(step, variables, lambda v: opt.get_slot(v, "m"), grads, HP,
                                     steps=2)
    assert len(stats) == 2 * len(variables)


@pytest.mark.parametrize("flaw,what", [(None, None), ("flipped sign", "theta"),
                                       ("momentum uses beta_1", "momentum"),
                                       # From a zero momentum and a fixed gradient these
                                       # equal Lion: the check starts from random momenta.
                                       ("direction ignores the momentum", "theta"),
                                       ("direction interpolates with beta_2", "theta")])
def test_check_rejects_a_wrong_update(flaw, what):
    variables, grads = _dense_problem()
    opt = _WrongLion(flaw)
    step = lambda: opt.apply_gradients(zip(grads, variables))  # noqa: E731
    step()  # creates the stub's momentum; the check starts from the second step
    check = lambda: bench.check_optimizer(  # noqa: E731
        step, variables, lambda v: opt.get_slot(v, "m"), grads, HP, context="stub")
    if flaw is None:
        check()  # the stub without its flaw is Lion: the rejections below are the flaws'
        return
    with pytest.raises(reference.CorrectnessError, match=what):
        check()


def _sparse_problem(rows=50, cols=3):
    rng = np.random.default_rng(1)
    variable = tf.Variable(rng.standard_normal((rows, cols)).astype(np.float32))
    indices = np.array([4, 9, 4, 4, 17, 9], np.int32)  # duplicates, summed before the sign
    values = rng.standard_normal((indices.size, cols)).astype(np.float32)
    grad = tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([rows, cols]))
    return variable, grad, (indices, values)


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_sparse_checks_accept_tf_lion_and_reject_the_other_mode(sparse_mode):
    variable, grad, grad_np = _sparse_problem()
    opt = tf_lion.Lion(learning_rate=HP["lr"], beta_1=HP["beta_1"], beta_2=HP["beta_2"],
                       weight_decay=HP["weight_decay"], sparse_mode=sparse_mode)
    step = tf.function(lambda: opt.apply_gradients([(grad, variable)]))
    momentum = lambda v: opt.get_slot(v, "m")  # noqa: E731
    opt.build([variable])
    bench.check_optimizer(step, [variable], momentum, [grad_np], HP, mode=sparse_mode)
    other = "lazy" if sparse_mode == "exact" else "exact"
    match = "absent from the indices" if other == "lazy" else "theta|momentum"
    with pytest.raises(reference.CorrectnessError, match=match):
        bench.check_optimizer(step, [variable], momentum, [grad_np], HP, mode=other)


def test_exact_check_rejects_unsummed_duplicates():
    """Applying only the last of each duplicate index is not Lion on the densified gradient."""
    variable, _, (indices, values) = _sparse_problem()
    last = {int(i): k for k, i in enumerate(indices)}
    keep = np.array(sorted(last.values()))
    grad = tf.IndexedSlices(tf.constant(values[keep]), tf.constant(indices[keep]),
                            tf.constant(variable.shape.as_list()))
    opt = tf_lion.Lion(learning_rate=HP["lr"], beta_1=HP["beta_1"], beta_2=HP["beta_2"],
                       weight_decay=HP["weight_decay"], sparse_mode="exact", jit_compile=False)
    opt.build([variable])
    step = lambda: opt.apply_gradients([(grad, variable)])  # noqa: E731
    with pytest.raises(reference.CorrectnessError):
        bench.check_optimizer(step, [variable], lambda v: opt.get_slot(v, "m"),
                              [(indices, values)], HP, mode="exact", steps=1)


def test_bfloat16_rounding_matches_tensorflow():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(10_000).astype(np.float32),
                        # exact ties between two bfloat16 values, both parities
                        np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)], np.float32)])
    want = tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy()
    np.testing.assert_array_equal(reference.round_to_bfloat16(x), want)


def _tiny_report(tmp_path, argv=()):
    path = tmp_path / "report.json"
    code = bench.main(["--tiny", "--scenarios", "A,D,E", "--repeats", "2", "--json", str(path),
                       "--optimizers", "tf_lion,tf_lion_nojit,tf_lion_exact,tf_lion_lazy,"
                       "tf_lion_lazy_small,tf_keras_lion,keras3_lion,legacy_adam,empty_call,"
                       "captures_floor", *argv])
    return code, path


def test_tiny_run_writes_the_documented_json(tmp_path, capsys):
    code, path = _tiny_report(tmp_path)
    assert code == 0
    report = json.loads(path.read_text())
    assert set(report) >= {"machine", "settings", "timing_method", "scenarios", "results",
                           "correctness", "skipped"}
    machine = report["machine"]
    for key in ("cpu_model", "cores", "tensorflow", "tf_keras", "keras", "date",
                "bandwidth_gb_per_s", "bandwidth"):
        assert key in machine, key
    assert machine["tensorflow"] == tf.__version__
    assert machine["bandwidth_gb_per_s"] > 0
    assert [s["name"] for s in report["scenarios"]] == ["A", "D500", "D2k", "E"]
    for s in report["scenarios"]:
        assert s["floor_ms"] > 0 and s["params"] > 0 and s["num_vars"] > 0
    assert report["skipped"] == []
    rows = {(r["scenario"], r["key"]): r for r in report["results"]}
    assert set(rows) == {
        ("A", k)
        for k in ("tf_lion", "tf_lion_nojit", "tf_keras_lion", "keras3_lion", "legacy_adam")
    } | {
        (d, k) for d in ("D500", "D2k")
        for k in ("tf_lion_exact", "tf_lion_lazy", "tf_keras_lion", "keras3_lion", "legacy_adam")
    } | {("D2k", "tf_lion_lazy_small")} | {
        ("E", k) for k in ("tf_lion", "tf_lion_nojit", "tf_keras_lion", "keras3_lion",
                           "legacy_adam", "empty_call", "captures_floor")
    }
    floor = rows[("E", "captures_floor")]["median_ms"]
    for key in ("tf_lion", "tf_keras_lion", "legacy_adam"):
        r = rows[("E", key)]
        assert r["us_per_var_above_captures"] == pytest.approx(
            (r["median_ms"] - floor) * 1e3 / 6)  # 6 tiny variables
    assert "us_per_var_above_captures" not in rows[("A", "tf_lion")]
    scenarios = {s["name"]: s for s in report["scenarios"]}
    for s in scenarios.values():  # each floor at the median of its own rotation's passes
        assert s["bandwidth_gb_per_s"] == pytest.approx(
            float(np.median(s["bandwidth_samples_gb_per_s"])))
        assert s["floor_ms"] == pytest.approx(
            s["bytes_per_param"] * s["params"] / (s["bandwidth_gb_per_s"] * 1e9) * 1e3)
    for r in report["results"]:
        assert len(r["samples_ms"]) == 2
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["median_ms"] > 0 and r["us_per_var"] > 0
        assert not r["retraced_while_timed"], r["optimizer"]
        if r["key"] == "tf_lion_lazy_small":  # another table: no ratios to this one's
            assert r["x_floor"] is None and r["x_tf_keras_lion"] is None
        else:
            assert r["x_floor"] == pytest.approx(
                r["median_ms"] / scenarios[r["scenario"]]["floor_ms"])
    for s in ("A", "D500", "D2k", "E"):
        assert rows[(s, "tf_keras_lion")]["x_tf_keras_lion"] == pytest.approx(1.0)
    # The smaller table's lazy step, timed in the larger table's round-robin: the size ratio.
    small = rows[("D2k", "tf_lion_lazy_small")]
    assert small["optimizer"] == "tf_lion lazy (jit), 500 table"
    d2k = report["scenarios"][2]
    assert "lazy_over_smaller_table" not in report["scenarios"][1]
    assert d2k["smaller_table"] == "D500"
    assert d2k["lazy_over_smaller_table"] == pytest.approx(
        rows[("D2k", "tf_lion_lazy")]["median_ms"] / small["median_ms"])
    checked = {(c["scenario"], c["optimizer"]) for c in report["correctness"]}
    assert checked == {(r["scenario"], r["optimizer"]) for r in report["results"]
                       if r["key"].startswith("tf_lion")}
    assert all(c["passed"] and c["steps"] == 2 for c in report["correctness"])
    table = capsys.readouterr().out
    assert "x tf-keras Lion" in table and "tf_lion lazy (jit)" in table
    assert "D2k, tf_lion lazy (jit) over the same step on the D500 table" in table


def test_run_aborts_before_timing_when_tf_lion_disagrees(tmp_path, monkeypatch, capsys):
    real = tf_lion.Lion

    def off_by_beta_2(**kwargs):  # the optimizer the harness builds, with a wrong beta_2
        return real(**dict(kwargs, beta_2=0.9))

    monkeypatch.setattr(bench.tf_lion, "Lion", off_by_beta_2)
    code, path = _tiny_report(tmp_path, ["--scenarios", "A", "--optimizers", "tf_lion_nojit"])
    assert code == 2
    assert not path.exists()
    assert "ABORTED" in capsys.readouterr().err


def test_bfloat16_momentum_rows_of_c_are_against_their_own_floor():
    """C's floor is 14 B/param (bfloat16 theta and g, float32 m); a row with a
    bfloat16 momentum moves 10 B/param and is divided by that floor."""
    c = next(s for s in bench.scenarios() if s.name == "C")
    assert c.bytes_per_param == 14
    assert c.row_bytes_per_param["tf_lion_mbf16"] == 10
    assert c.row_bytes_per_param["tf_keras_lion"] == 10  # keeps m in the variables' dtype
    assert "tf_lion" not in c.row_bytes_per_param


def test_bfloat16_store_tolerance_is_one_ulp():
    """A bfloat16 result may be the neighbour of the reference's (float32 values
    a few eps apart round differently), not two bfloat16 steps away."""
    rng = np.random.default_rng(3)
    theta0 = reference.round_to_bfloat16(rng.uniform(1.0, 2.0, 64).astype(np.float32))
    m0 = rng.standard_normal(64).astype(np.float32)
    g = rng.standard_normal(64).astype(np.float32)
    want, want_m, _ = reference.lion_step(theta0, m0, g, HP["lr"], HP["beta_1"], HP["beta_2"],
                                         HP["weight_decay"], theta_dtype="bfloat16")
    ulp = np.float32(2.0 ** -7)  # bfloat16 spacing in [1, 2)
    for steps, ok in ((0, True), (1, True), (2, False)):
        got = want.copy()
        got[5] = want[5] + steps * ulp
        check = lambda: reference.check_step(  # noqa: E731
            theta0, m0, g, got, want_m, HP, theta_dtype="bfloat16")
        if ok:
            check()
        else:
            with pytest.raises(reference.CorrectnessError, match="theta"):
                check()
