"""tf_lion against other TensorFlow optimizers and the machine's bandwidth floor.

    python -m benchmarks.run                  # full run (about 6 minutes on 2 cores)
    python -m benchmarks.run --quick          # 2-3 minutes: fewer repeats, 100 vars in B, E
    python -m benchmarks.run --scenarios A,D --repeats 7 --json results.json

Everything runs in one process. For each scenario every optimizer gets its own
copy of the same variables and the same precomputed gradients (tensors, never
recomputed). Before anything is timed, every tf_lion configuration takes two
steps on the benchmark's own variables and is compared with an independent
numpy Lion (`benchmarks/reference.py`); a disagreement beyond fused-multiply-add
rounding aborts the run. Then the optimizers are timed round-robin: each repeat
times one block of k steps of every optimizer in turn (the starting optimizer
rotates), so machine noise hits all of them alike; the reported figure is the
median over repeats of (block time / k). See benchmarks/README.md.
"""

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # Keras 3 reads this at import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import tf_lion  # noqa: E402
from benchmarks import bandwidth as bandwidth_lib  # noqa: E402
from benchmarks import reference  # noqa: E402

__all__ = ["Scenario", "scenarios", "check_optimizer", "run", "main", "HYPERPARAMETERS"]

HYPERPARAMETERS = {"lr": 1e-4, "beta_1": 0.9, "beta_2": 0.99, "weight_decay": 0.1}
REFERENCE = "tf_keras_lion"  # the "x tf-keras Lion" column divides by this optimizer's time


# --------------------------------------------------------------------------- #
# Scenarios
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class Scenario:
    name: str
    description: str
    shapes: list
    dtype: str = "float32"  # the variables' (and gradients') dtype
    sparse: dict = None  # {"rows", "cols", "batch", "zipf"} for an embedding table
    bytes_per_param: int = 20  # Lion's minimal traffic per parameter, for the floor
    competitors: tuple = ()
    # Rows whose own minimal traffic differs (C: a bfloat16 momentum, 10 B/param).
    row_bytes_per_param: dict = dataclasses.field(default_factory=dict)
    # A smaller table whose lazy step ("tf_lion_lazy_small") is timed in this
    # scenario's round-robin, so the two sizes see the same load.
    small: "Scenario" = None

    @property
    def params(self):
        return int(sum(int(np.prod(s)) for s in self.shapes))

    @property
    def num_vars(self):
        return len(self.shapes)


_DENSE = ("tf_lion", "tf_lion_nojit", "tf_lion_xla_step",
          "tf_keras_lion", "keras3_lion", "tf_keras_adam", "legacy_adam")
_BF16 = ("tf_lion", "tf_lion_nojit", "tf_lion_mbf16", "tf_lion_mbf16_nojit", "tf_lion_xla_step",
         "tf_keras_lion", "keras3_lion", "tf_keras_adam", "legacy_adam")
_SPARSE = ("tf_lion_exact", "tf_lion_exact_nojit", "tf_lion_lazy", "tf_lion_lazy_nojit",
           "tf_keras_lion", "keras3_lion", "tf_keras_adam", "legacy_adam")
_TINY_VARS = _DENSE + ("empty_call", "captures_floor")


def _split(total, parts):
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _rows_name(rows):
    if rows >= 10 ** 6 and rows % 10 ** 6 == 0:
        return f"{rows // 10 ** 6}M"
    if rows >= 1000 and rows % 1000 == 0:
        return f"{rows // 1000}k"
    return str(rows)


def scenarios(tiny=False, quick=False):
    """The scenarios, in order.

    `quick=True` spreads B's 10M parameters over 100 variables and gives E 100
    tiny variables instead of 300 (tracing and compiling 300 per-variable
    updates takes minutes, see README); `tiny=True` gives miniature versions
    of everything (a smoke test of the harness, for the tests).
    """
    num_many = 100 if quick else 300
    if tiny:
        dense = [[16, 16]] * 4
        many = [[r, 16] for r in _split(100, 12)]
        tables = [(500, 8, 64), (2000, 8, 64)]
        tiny_vars = [[4]] * 6
    else:
        dense = [[1000, 1000]] * 10  # 10M
        many = [[r, 100] for r in _split(100_000, num_many)]  # 10M params
        tables = [(100_000, 64, 4096), (1_000_000, 64, 4096)]
        tiny_vars = [[4]] * num_many
    out = [
        Scenario("A", f"{_count(dense)} float32 params in {len(dense)} variables", dense,
                 competitors=_DENSE),
        Scenario("B", f"{_count(many)} float32 params in {len(many)} variables", many,
                 competitors=_DENSE),
        Scenario("C", f"{_count(dense)} bfloat16 params in {len(dense)} variables, float32 "
                 "momentum (tf_lion m=bf16: bfloat16 momentum)", dense, dtype="bfloat16",
                 bytes_per_param=14, competitors=_BF16,
                 # bfloat16 momentum (peers keep m, v in the variables' dtype): 2+2+2 read,
                 # 2+2 written
                 row_bytes_per_param={k: 10 for k in _BF16 if k not in (
                     "tf_lion", "tf_lion_nojit", "tf_lion_xla_step")}),
    ]
    smallest = None
    for rows, cols, batch in tables:  # smallest first
        out.append(Scenario(
            f"D{_rows_name(rows)}",
            f"{_rows_name(rows)} x {cols} float32 table, IndexedSlices of {batch} Zipf(1.1) "
            "indices with duplicates", [[rows, cols]],
            sparse={"rows": rows, "cols": cols, "batch": batch, "zipf": 1.1},
            competitors=_SPARSE + (("tf_lion_lazy_small",) if smallest else ()),
            small=smallest))
        smallest = smallest or out[-1]
    out.append(Scenario("E", f"{len(tiny_vars)} tiny float32 variables of shape {tiny_vars[0]} "
                        "(per-variable overhead)", tiny_vars, competitors=_TINY_VARS))
    return out


def _count(shapes):
    n = sum(int(np.prod(s)) for s in shapes)
    return f"{n / 1e6:g}M" if n >= 10 ** 6 else str(n)


def _select(all_scenarios, names):
    if not names:
        return all_scenarios
    chosen = []
    for name in names:
        hits = [s for s in all_scenarios
                if s.name == name or (name == "D" and s.name.startswith("D"))]
        if not hits:
            raise SystemExit(f"unknown scenario {name!r}; known: "
                             f"{', '.join(s.name for s in all_scenarios)} (D = all tables)")
        chosen += [s for s in hits if s not in chosen]
    return [s for s in all_scenarios if s in chosen]


@dataclasses.dataclass
class Data:
    init: list  # tf tensors, the variables' initial values
    grads: list  # tf tensors or tf.IndexedSlices, fixed for the whole run
    grads_np: list  # float32 arrays, or (indices, values) pairs, for the reference
    info: dict


def make_data(scenario, seed=0):
    dtype = tf.as_dtype(scenario.dtype)
    init, grads, grads_np = [], [], []
    info = {}
    for i, shape in enumerate(scenario.shapes):
        theta = 0.05 * tf.random.stateless_normal(shape, seed=[seed, 2 * i])
        init.append(tf.cast(theta, dtype))
        if scenario.sparse is None:
            g = tf.cast(0.01 * tf.random.stateless_normal(shape, seed=[seed, 2 * i + 1]), dtype)
            grads.append(g)
            grads_np.append(tf.cast(g, tf.float32).numpy())
            continue
        sp = scenario.sparse
        rng = np.random.default_rng(seed + 1)
        weights = 1.0 / np.arange(1, sp["rows"] + 1, dtype=np.float64) ** sp["zipf"]
        ranks = rng.choice(sp["rows"], size=sp["batch"], p=weights / weights.sum())
        rows = rng.permutation(sp["rows"])[ranks]  # hot ids spread over the table
        indices = rows.astype(np.int32)
        values = (0.01 * rng.standard_normal((sp["batch"], sp["cols"]))).astype(np.float32)
        grads.append(tf.IndexedSlices(tf.constant(values, dtype), tf.constant(indices),
                                      tf.constant([sp["rows"], sp["cols"]], tf.int64)))
        grads_np.append((indices, values))
        counts = np.bincount(indices)
        info.update(unique_indices=int(np.count_nonzero(counts)), max_duplicates=int(counts.max()))
    return Data(init, grads, grads_np, info)


# --------------------------------------------------------------------------- #
# Competitors
# --------------------------------------------------------------------------- #
_LABELS = {
    "tf_lion": "tf_lion (jit)",
    "tf_lion_nojit": "tf_lion (no jit)",
    "tf_lion_xla_step": "tf_lion (no jit) in XLA step",
    "tf_lion_mbf16": "tf_lion m=bf16 (jit)",
    "tf_lion_mbf16_nojit": "tf_lion m=bf16 (no jit)",
    "tf_lion_exact": "tf_lion exact (jit)",
    "tf_lion_exact_nojit": "tf_lion exact (no jit)",
    "tf_lion_lazy": "tf_lion lazy (jit)",
    "tf_lion_lazy_nojit": "tf_lion lazy (no jit)",
    "tf_lion_lazy_small": "tf_lion lazy (jit) on the smaller table",
    "tf_keras_lion": "tf-keras Lion",
    "keras3_lion": "Keras 3 Lion",
    "tf_keras_adam": "tf-keras Adam",
    "legacy_adam": "legacy Adam (fused)",
    "empty_call": "(empty tf.function call)",
    "captures_floor": "(tf.function capturing vars, slots, grads)",
}
ALL_COMPETITORS = tuple(_LABELS)


def _label(key, scenario):
    label = _LABELS[key]
    if key == "tf_lion_lazy_small":
        return f"tf_lion lazy (jit), {_rows_name(scenario.small.sparse['rows'])} table"
    if scenario.dtype == "bfloat16":
        if key in ("tf_lion", "tf_lion_nojit", "tf_lion_xla_step"):
            label = label.replace("tf_lion", "tf_lion m=f32")
        elif key in ("tf_keras_lion", "keras3_lion"):
            label += " (m=bf16)"
        elif key in ("tf_keras_adam", "legacy_adam"):
            label += " (m,v=bf16)"
    return label


def _tf_lion_config(key, scenario):
    """(jit_compile, sparse_mode, momentum_dtype, whole step in XLA) of a tf_lion key."""
    jit = not key.endswith("_nojit") and key != "tf_lion_xla_step"
    mode = "lazy" if "_lazy" in key else "exact"
    if "_mbf16" in key:
        momentum = "bfloat16"
    elif scenario.dtype == "bfloat16":
        momentum = "float32"
    else:
        momentum = None
    return jit, mode, momentum, key == "tf_lion_xla_step"


_keras3_module = None


def _keras3():
    global _keras3_module
    if _keras3_module is None:
        import keras  # noqa: PLC0415 (after KERAS_BACKEND is set)

        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(f"Keras 3 uses the {keras.backend.backend()!r} backend; set "
                               "KERAS_BACKEND=tensorflow before anything imports keras")
        _keras3_module = keras
    return _keras3_module


class Competitor:
    """One optimizer on its own copy of the scenario's variables.

    `step()` runs one `apply_gradients` inside a `tf.function` and returns the
    optimizer's step counter (a scalar read after the update).
    """

    def __init__(self, key, scenario, data):
        self.key = key
        self.label = _label(key, scenario)
        self.is_tf_lion = key.startswith("tf_lion")
        self.notes = ""
        hp = HYPERPARAMETERS
        jit_step = False
        if key == "empty_call":
            counter = tf.Variable(0, dtype=tf.int64, name="counter")
            self.variables, self.optimizer = [], None
            self.step = tf.function(lambda: tf.identity(counter))
            self.notes = "a tf.function that only reads a scalar variable: per-call floor"
            return
        if key == "captures_floor":
            # What calling any optimizer's step costs here before it computes
            # anything: a tf.function that captures every variable, one slot
            # per variable and every gradient, and hands them all to one op.
            counter = tf.Variable(0, dtype=tf.int64, name="counter")
            self.variables = [tf.Variable(t, name=f"v{i}") for i, t in enumerate(data.init)]
            slots = [tf.Variable(tf.zeros_like(t), name=f"m{i}") for i, t in enumerate(data.init)]
            handles = [v.handle for v in self.variables + slots]
            grads = list(data.grads)
            self.optimizer = None

            def captures():
                tf.raw_ops.IdentityN(input=handles + grads)
                return tf.identity(counter)
            self.step = tf.function(captures)
            self.notes = ("capture floor: one op over the captured variables, slots and "
                          "gradients; subtract it for an optimizer's own per-variable cost")
            return
        if key == "keras3_lion":
            keras = _keras3()
            self.variables = [keras.Variable(t, dtype=t.dtype.name, name=f"v{i}")
                              for i, t in enumerate(data.init)]
            opt = keras.optimizers.Lion(learning_rate=hp["lr"], beta_1=hp["beta_1"],
                                        beta_2=hp["beta_2"], weight_decay=hp["weight_decay"])
            opt.build(self.variables)
            counter = lambda: opt.iterations.value  # noqa: E731
            self.notes = f"keras {keras.__version__}, TF backend; densifies IndexedSlices"
        else:
            self.variables = [tf.Variable(t, name=f"v{i}") for i, t in enumerate(data.init)]
            if self.is_tf_lion:
                jit, mode, momentum, jit_step = _tf_lion_config(key, scenario)
                opt = tf_lion.Lion(learning_rate=hp["lr"], beta_1=hp["beta_1"],
                                   beta_2=hp["beta_2"], weight_decay=hp["weight_decay"],
                                   sparse_mode=mode, momentum_dtype=momentum, jit_compile=jit)
                self.mode = mode if scenario.sparse else "dense"
                self.momentum_dtype = momentum or scenario.dtype
                opt.build(self.variables)
                if jit_step:
                    self.notes = "jit_compile=False, whole step in tf.function(jit_compile=True)"
            elif key == "tf_keras_lion":
                opt = tf_keras.optimizers.Lion(learning_rate=hp["lr"], beta_1=hp["beta_1"],
                                               beta_2=hp["beta_2"], weight_decay=hp["weight_decay"])
                opt.build(self.variables)
                self.notes = "tf-keras turns its XLA off without a GPU; dedups IndexedSlices"
            elif key == "tf_keras_adam":
                opt = tf_keras.optimizers.Adam(learning_rate=hp["lr"])
                opt.build(self.variables)
                self.notes = "no weight decay; 28 B/param of traffic"
            elif key == "legacy_adam":
                opt = tf_keras.optimizers.legacy.Adam(learning_rate=hp["lr"])
                self.notes = "ResourceApplyAdam kernel; no weight decay; 28 B/param"
            else:
                raise ValueError(f"unknown competitor {key!r}")
            counter = lambda: opt.iterations  # noqa: E731
        self.optimizer = opt
        grads, variables = data.grads, self.variables

        def step():
            opt.apply_gradients(zip(grads, variables))
            return tf.identity(counter())

        self.step = tf.function(step, jit_compile=True if jit_step else None)

    def momentum(self, variable):
        return self.optimizer.get_slot(variable, "m")


def _read_f32(variable):
    value = tf.convert_to_tensor(variable)
    return (value if value.dtype == tf.float32 else tf.cast(value, tf.float32)).numpy()


def randomize_momentum(variables, momentum_of, grads_np, seed=0):
    """Gives every momentum random values on the scale of its gradient.

    From a zero momentum and a fixed gradient, m stays a positive multiple of
    g and sign(c) = sign(g) whatever beta_1 is: a Lion that ignored its
    momentum (or mixed up the betas) would pass. Random momenta make the
    direction depend on both; in exact mode they also make the rows without a
    gradient move by sign(beta_1 * m).
    """
    rng = np.random.default_rng(seed)
    for v, g in zip(variables, grads_np):
        values = g[1] if isinstance(g, tuple) else g
        scale = float(np.std(values)) or 1.0
        m = momentum_of(v)
        draw = rng.standard_normal(tuple(m.shape), dtype=np.float32) * np.float32(scale)
        m.assign(tf.cast(draw, m.dtype))


def check_optimizer(step, variables, momentum_of, grads_np, hp, mode="dense",
                    theta_dtype="float32", m_dtype="float32", steps=2, context="optimizer",
                    random_momentum=True):
    """Runs `steps` calls of `step()` and checks each against the numpy reference.

    With `random_momentum` (the default) the momenta start from random values
    (`randomize_momentum`), so the check tests the direction, not only sign(g).

    Args:
      step: zero-argument callable applying the gradients once.
      variables: the variables it updates; `momentum_of(v)` is v's momentum.
      grads_np: per variable, the float32 gradient or `(indices, values)`.
      hp: dict with lr, beta_1, beta_2, weight_decay.
      mode: "dense", "exact" or "lazy".

    Returns:
      (seconds of the first call, list of per-step statistics).
    Raises:
      reference.CorrectnessError on a disagreement.
    """
    if random_momentum:
        randomize_momentum(variables, momentum_of, grads_np)
    first_call = None
    stats = []
    for s in range(steps):
        before = [(_read_f32(v), _read_f32(momentum_of(v))) for v in variables]
        start = time.perf_counter()
        result = step()
        if result is not None:
            np.asarray(result)
        if first_call is None:
            first_call = time.perf_counter() - start
        for i, (v, g, (theta0, m0)) in enumerate(zip(variables, grads_np, before)):
            st = reference.check_step(
                theta0, m0, g, _read_f32(v), _read_f32(momentum_of(v)), hp, mode=mode,
                theta_dtype=theta_dtype, m_dtype=m_dtype,
                context=f"{context}, step {s + 1}, variable {i} ({getattr(v, 'name', '?')})")
            stats.append(st)
        del before
    return first_call, stats


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #
def _time_block(step, k):
    """Seconds per step over k back-to-back calls.

    TensorFlow's eager executor is synchronous on CPU, so a call returns after
    its step has run; reading the 8-byte counter of the last call is a guard
    in case asynchronous execution is on. No tensor bigger than that is read.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(k):
            out = step()
        np.asarray(out)
        return (time.perf_counter() - start) / k
    finally:
        if enabled:
            gc.enable()


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _run_scenario(scenario, settings, stream, only=None):
    """Checks, warms up and times one scenario's optimizers, round-robin.

    `stream` (a bandwidth.StreamKernel) takes one timed pass per repeat in the
    same rotation. Returns (scenario info, results without floor columns,
    correctness records, skipped optimizers, bandwidth samples in GB/s).
    """
    data = make_data(scenario)
    keys = [k for k in scenario.competitors if only is None or k in only]
    small = make_data(scenario.small) if "tf_lion_lazy_small" in keys else None
    competitors, skipped, checks = [], [], []
    for key in keys:
        start = time.perf_counter()
        grads_np = data.grads_np
        try:
            if key == "tf_lion_lazy_small":  # the smaller table, timed in this rotation
                comp = Competitor("tf_lion_lazy", scenario.small, small)
                comp.key, comp.label, grads_np = key, _label(key, scenario), small.grads_np
                comp.notes = (f"the {scenario.small.name} table's lazy step, interleaved with "
                              f"this scenario's: {scenario.name} lazy / this = the size ratio")
            else:
                comp = Competitor(key, scenario, data)
        except Exception as e:  # noqa: BLE001 (a competitor that cannot run here is reported)
            if key.startswith("tf_lion"):
                raise
            skipped.append({"optimizer": _label(key, scenario), "key": key, "reason": _short(e)})
            _log(f"  {scenario.name}: skipping {_label(key, scenario)}: {_short(e)}")
            continue
        try:
            if comp.is_tf_lion:
                first_call, stats = check_optimizer(
                    comp.step, comp.variables, comp.momentum, grads_np, HYPERPARAMETERS,
                    mode=comp.mode, theta_dtype=scenario.dtype, m_dtype=comp.momentum_dtype,
                    steps=settings["check_steps"],
                    context=f"scenario {scenario.name}, {comp.label}")
                checks.append({
                    "scenario": scenario.name, "optimizer": comp.label, "mode": comp.mode,
                    "steps": settings["check_steps"], "passed": True,
                    "elements_compared": int(sum(s["elements"] for s in stats)),
                    "rounding_sign_flips": int(sum(s["rounding_sign_flips"] for s in stats)),
                })
            else:
                t0 = time.perf_counter()
                np.asarray(comp.step())
                first_call = time.perf_counter() - t0
            warm = [_time_block(comp.step, 1) for _ in range(settings["warmup"])]
        except reference.CorrectnessError:
            raise
        except Exception as e:  # noqa: BLE001
            if comp.is_tf_lion:
                raise
            skipped.append({"optimizer": comp.label, "key": key, "reason": _short(e)})
            _log(f"  {scenario.name}: skipping {comp.label}: {_short(e)}")
            continue
        comp.first_call_s = first_call
        comp.traces_before_timing = comp.step.experimental_get_tracing_count()
        comp.k = int(min(settings["max_k"], max(1, round(settings["target_s"] / min(warm)))))
        comp.samples = []
        competitors.append(comp)
        _log(f"  {scenario.name}: {comp.label:<36} first call {first_call:7.2f} s, "
             f"warm {min(warm) * 1e3:9.3f} ms, {comp.k} steps/block"
             f"{', checked' if comp.is_tf_lion else ''} ({time.perf_counter() - start:.1f} s)")
    bandwidth = []
    probe = object()  # the bandwidth kernel's place in the rotation
    rotation = competitors + [probe]
    for r in range(settings["repeats"]):
        gc.collect()
        n = len(rotation)
        for comp in rotation[r % n:] + rotation[:r % n]:
            if comp is probe:
                bandwidth.append(stream.run())
            else:
                comp.samples.append(_time_block(comp.step, comp.k))
    results = []
    ref = next((c for c in competitors if c.key == REFERENCE), None)
    ref_ms = float(np.median(ref.samples)) * 1e3 if ref else None
    for comp in competitors:
        ms = np.array(comp.samples) * 1e3
        median = float(np.median(ms))
        results.append({
            "scenario": scenario.name,
            "optimizer": comp.label,
            "key": comp.key,
            "median_ms": median,
            "min_ms": float(ms.min()),
            "max_ms": float(ms.max()),
            "samples_ms": [round(float(x), 4) for x in ms],
            "steps_per_sample": comp.k,
            "first_call_s": round(comp.first_call_s, 3),
            "traces": comp.step.experimental_get_tracing_count(),
            "retraced_while_timed": (comp.step.experimental_get_tracing_count()
                                     != comp.traces_before_timing),
            # The smaller table's row has its own table: no ratio to this one's.
            "x_tf_keras_lion": (median / ref_ms if ref_ms and comp.key != "tf_lion_lazy_small"
                                else None),
            "bytes_per_param": scenario.row_bytes_per_param.get(comp.key,
                                                                 scenario.bytes_per_param),
            "us_per_var": median * 1e3 / scenario.num_vars,
            "notes": comp.notes,
        })
    info = {
        "name": scenario.name,
        "description": scenario.description,
        "params": scenario.params,
        "num_vars": scenario.num_vars,
        "dtype": scenario.dtype,
        "bytes_per_param": scenario.bytes_per_param,
        "sparse": scenario.sparse,
        "bandwidth_samples_gb_per_s": [round(b, 2) for b in bandwidth],
        **data.info,
    }
    medians = {r["key"]: r["median_ms"] for r in results}
    if "tf_lion_lazy" in medians and "tf_lion_lazy_small" in medians:
        info["smaller_table"] = scenario.small.name
        info["lazy_over_smaller_table"] = medians["tf_lion_lazy"] / medians["tf_lion_lazy_small"]
    del competitors, data, small
    gc.collect()
    return info, results, checks, skipped, bandwidth


def _short(e):
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:200] + ("..." if len(text) > 200 else "")


# --------------------------------------------------------------------------- #
# Machine, table, JSON
# --------------------------------------------------------------------------- #
def _source_state():
    """The commit and locally modified files of tf_lion/ and benchmarks/ (read-only git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(tf_lion.__file__)))

    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", "-C", root, *args], check=True,
                              capture_output=True, text=True, timeout=10).stdout.rstrip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "modified": [line[3:] for line in git("status", "--porcelain", "--",
                                                      "tf_lion", "benchmarks").splitlines()]}
    except (OSError, subprocess.SubprocessError):
        return None


def machine_description():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or "unknown"
    try:
        keras_version = _keras3().__version__
    except Exception as e:  # noqa: BLE001
        keras_version = f"unavailable ({_short(e)})"
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "keras": keras_version,
        "numpy": np.__version__,
        "tf_lion": tf_lion.__version__,
        "tf_lion_source": _source_state(),
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "load_average_at_start": load,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))}f}"


def format_table(report):
    header = ("scenario", "optimizer", "ms/step", "min-max ms", "x floor", "x tf-keras Lion",
              "us/var/step", "first call s")
    rows = []
    for r in report["results"]:
        rows.append((r["scenario"], r["optimizer"], _fmt(r["median_ms"]),
                     f"{_fmt(r['min_ms'], 2)}-{_fmt(r['max_ms'], 2)}", _fmt(r["x_floor"]),
                     _fmt(r["x_tf_keras_lion"]), _fmt(r["us_per_var"]), _fmt(r["first_call_s"], 2)))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in rows:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("| " + " | ".join(cells) + " |")
    floors = "; ".join(f"{s['name']}: {_fmt(s['floor_ms'])} ms at "
                       f"{s['bandwidth_gb_per_s']:.1f} GB/s" for s in report["scenarios"])
    lines.append("")
    bw = report["machine"]["bandwidth"]
    lines.append(f"bandwidth {bw['median_gb_per_s']:.1f} GB/s (median of all "
                 f"{bw['interleaved_samples']} interleaved passes; best "
                 f"{bw['best_gb_per_s']:.1f}); floors, each at the median of its scenario's "
                 f"passes: {floors}")
    scenario_bytes = {s["name"]: s["bytes_per_param"] for s in report["scenarios"]}
    for name, b in sorted({(r["scenario"], r["bytes_per_param"]) for r in report["results"]
                           if r["bytes_per_param"] != scenario_bytes[r["scenario"]]}):
        lines.append(f"{name}: rows with a bfloat16 momentum are against their own floor, "
                     f"{b} B/param")
    above = [r for r in report["results"] if "us_per_var_above_captures" in r]
    for name in dict.fromkeys(r["scenario"] for r in above):
        costs = ", ".join(f"{r['optimizer']} {_fmt(r['us_per_var_above_captures'])}"
                          for r in above if r["scenario"] == name)
        lines.append(f"{name}, us/var/step above the capture floor: {costs}")
    for s in report["scenarios"]:
        if "lazy_over_smaller_table" in s:
            lines.append(f"{s['name']}, tf_lion lazy (jit) over the same step on the "
                         f"{s['smaller_table']} table, timed in the same round-robin: "
                         f"{s['lazy_over_smaller_table']:.2f}x")
    for s in report["skipped"]:
        lines.append(f"skipped in {s['scenario']}: {s['optimizer']}: {s['reason']}")
    return "\n".join(lines)


def _floor_ms(bytes_per_param, info):
    return bytes_per_param * info["params"] / (info["bandwidth_gb_per_s"] * 1e9) * 1e3


def run(scenario_names=None, quick=False, tiny=False, repeats=None, json_path=None,
        competitors=None, check_steps=2, print_table=True):
    """Runs the benchmark; returns the report dict (also written to `json_path`).

    Progress goes to stderr; the table to stdout unless `print_table=False`.
    """
    started = time.perf_counter()
    settings = {
        "quick": quick, "tiny": tiny,
        "repeats": repeats or (1 if tiny else 5 if quick else 15),
        "target_s": 0.005 if tiny else 0.05 if quick else 0.25,
        "max_k": 5 if tiny else 50 if quick else 200,
        "bandwidth_elements": 2 ** 20 if tiny else 32 * 2 ** 20,
        "warmup": 1 if tiny else 2,
        "check_steps": check_steps,
        "hyperparameters": HYPERPARAMETERS,
    }
    chosen = _select(scenarios(tiny, quick), scenario_names)
    stream = bandwidth_lib.StreamKernel(settings["bandwidth_elements"])
    first = [stream.run() for _ in range(3)]
    _log(f"bandwidth before the run: {', '.join(f'{b:.1f}' for b in first)} GB/s")
    report = {
        "machine": machine_description(),
        "settings": settings,
        "timing_method": (
            "per scenario, one tf.function(lambda: opt.apply_gradients(zip(grads, vars))) per "
            "optimizer, fixed precomputed gradient tensors; first call = trace + compile; "
            f"{settings['warmup']} warm-up calls; then {settings['repeats']} round-robin repeats, "
            "each timing one block of k back-to-back calls per optimizer (k chosen so a block "
            f"takes about {settings['target_s'] * 1e3:g} ms, rotating the starting optimizer), "
            "synchronised by reading the returned scalar step counter after the block; "
            "ms/step = median over repeats of block time / k (includes the per-call Python "
            "dispatch of one tf.function call, see the '(empty tf.function call)' row)"),
        "scenarios": [], "results": [], "correctness": [], "skipped": [],
    }
    only = set(competitors) if competitors else None
    samples = []
    for scenario in chosen:
        _log(f"scenario {scenario.name}: {scenario.description}")
        info, results, checks, skipped, bandwidth = _run_scenario(scenario, settings, stream, only)
        report["scenarios"].append(info)
        report["results"] += results
        report["correctness"] += checks
        report["skipped"] += [dict(s, scenario=scenario.name) for s in skipped]
        samples += bandwidth
    del stream
    # The floor: Lion's minimal traffic at the bandwidth measured between the
    # optimizers (median of the interleaved passes: the same noise they saw).
    samples = samples or first
    gbps = float(np.median(samples))
    report["machine"]["bandwidth_gb_per_s"] = gbps
    report["machine"]["bandwidth"] = {
        "median_gb_per_s": gbps, "best_gb_per_s": max(samples + first),
        "interleaved_samples": len(samples),
        "before_run_gb_per_s": [round(b, 2) for b in first],
        "method": bandwidth_lib.StreamKernel.method_text(settings["bandwidth_elements"]) +
        "; one pass per round-robin repeat, interleaved with the optimizers; each "
        "scenario's floor uses the median of the passes in its own rotation",
    }
    # Each scenario's floor uses the passes taken in its own rotation: the load
    # its optimizers saw (load differs between scenarios of one run).
    by_name = {info["name"]: info for info in report["scenarios"]}
    for info in report["scenarios"]:
        own = info["bandwidth_samples_gb_per_s"]
        info["bandwidth_gb_per_s"] = float(np.median(own)) if own else gbps
        info["floor_ms"] = _floor_ms(info["bytes_per_param"], info)
    for r in report["results"]:
        info = by_name[r["scenario"]]
        r["x_floor"] = (None if r["key"] == "tf_lion_lazy_small"
                        else r["median_ms"] / _floor_ms(r["bytes_per_param"], info))
    captured = {r["scenario"]: r["median_ms"] for r in report["results"]
                if r["key"] == "captures_floor"}
    for r in report["results"]:
        if r["scenario"] in captured and r["key"] not in ("captures_floor", "empty_call"):
            n = next(s["num_vars"] for s in report["scenarios"] if s["name"] == r["scenario"])
            r["us_per_var_above_captures"] = (r["median_ms"] - captured[r["scenario"]]) * 1e3 / n
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    if print_table:
        out = sys.stdout
        m = report["machine"]
        print(f"\n{m['cpu_model']}, {m['cores']} cores; TF {m['tensorflow']}, tf-keras "
              f"{m['tf_keras']}, Keras {m['keras']}; {m['date']}", file=out)
        print(format_table(report), file=out)
        print(f"correctness: {len(report['correctness'])} tf_lion configurations checked against "
              f"the numpy reference, all passed; total {report['total_seconds']} s", file=out)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="5 repeats, shorter timing blocks, and B and E with 100 variables "
                        "instead of 300 (about 2-3 minutes)")
    parser.add_argument("--tiny", action="store_true",
                        help="miniature scenarios (a smoke test of the harness, not a benchmark)")
    parser.add_argument("--scenarios", default="",
                        help="comma-separated: A,B,C,D,E (D = every table; or D100k, D1M)")
    parser.add_argument("--optimizers", default="",
                        help=f"comma-separated subset of: {','.join(ALL_COMPETITORS)}")
    parser.add_argument("--repeats", type=int, default=None,
                        help="round-robin repeats per scenario (default 15, --quick 5)")
    parser.add_argument("--check-steps", type=int, default=2,
                        help="tf_lion steps checked against numpy before timing (default 2)")
    parser.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")  # not the retracing notice for our many one-trace functions
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    comps = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    unknown = sorted(set(comps) - set(ALL_COMPETITORS))
    if unknown:
        parser.error(f"unknown optimizers {unknown}; known: {', '.join(ALL_COMPETITORS)}")
    if args.check_steps < 1:
        parser.error("--check-steps must be >= 1: correctness is checked before timing")
    try:
        run(names, quick=args.quick, tiny=args.tiny, repeats=args.repeats, json_path=args.json,
            competitors=comps or None, check_steps=args.check_steps)
    except reference.CorrectnessError as e:
        print(f"\nABORTED: tf_lion disagrees with the numpy Lion reference; no results are "
              f"reported.\n{e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
