"""`tf_lion.tpu`: the TPU readiness check, and the HLO of sparse aggregation.

Everything here compiles with XLA on CPU (no TPU can be emulated) and reads
the "hlo" stage, the program XLA hands to any backend. Steps are compiled,
never run.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from tensorflow.compiler.tf2xla.ops import gen_xla_ops
from tensorflow.python.distribute import tpu_strategy
from tensorflow.python.tpu import tpu_function

import tf_lion
from tf_lion import distribute as distribute_lib
from tf_lion import tpu
from tf_lion import update as update_lib

VOCAB, DIM, SEQ, BATCH = 64, 8, 4, 2


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _model():
    ids = tf_keras.Input((SEQ,), dtype="int32")
    x = tf_keras.layers.Embedding(VOCAB, DIM)(ids)
    x = tf_keras.layers.Flatten()(x)
    out = tf_keras.layers.Dense(1, dtype="float32")(x)
    return tf_keras.Model(ids, out)


def _train_step(model, opt, extra=None):
    """A full step: forward, GradientTape, apply_gradients, all inside."""

    def train_step(ids, y):
        with tf.GradientTape() as tape:
            pred = tf.cast(model(ids, training=True), tf.float32)
            if extra is not None:
                pred = extra(pred, ids)
            loss = tf.reduce_mean(tf.square(pred - y))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return train_step


def _inputs():
    ids = tf.constant(np.arange(BATCH * SEQ).reshape(BATCH, SEQ) % 5, tf.int32)
    return ids, tf.zeros((BATCH, 1))


def _parameters(report):
    return [ins.shape for ins in tpu.parse_hlo(report.hlo_text) if ins.opcode == "parameter"]


@pytest.fixture
def mixed_bfloat16():
    previous = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        tf_keras.mixed_precision.set_global_policy(previous)


# --------------------------------------------------------------------------- #
# Full train steps pass
# --------------------------------------------------------------------------- #
STEP_CASES = {
    "exact": dict(sparse_mode="exact"),
    "lazy": dict(sparse_mode="lazy"),
    "exact-wd": dict(sparse_mode="exact", weight_decay=0.1),
    "lazy-wd-bf16-momentum": dict(sparse_mode="lazy", weight_decay=0.1,
                                  momentum_dtype="bfloat16"),
}


def _check_clean_step(opt_kwargs, build=True):
    model = _model()
    opt = tf_lion.Lion(learning_rate=0.01, **opt_kwargs)
    if build:
        opt.build(model.trainable_variables)
    before = [w.copy() for w in model.get_weights()]
    report = tpu.check_compiles(_train_step(model, opt), *_inputs())

    assert report.ok and report.problems == []
    assert all(count == 0 for count in report.kind_counts.values()), report.kind_counts
    assert report.collectives == []  # one device: no cross-replica traffic
    # The sparse gradient is applied with a scatter and never deduplicated
    # with tf.unique (which lowers to a serial while loop and dynamic shapes).
    assert report.opcode_counts.get("scatter", 0) >= 2
    assert "while" not in report.opcode_counts
    # Compiled, not run.
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    assert int(opt.iterations.numpy()) == 0
    return report, opt


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_full_train_step_is_tpu_ready(case):
    report, _ = _check_clean_step(STEP_CASES[case])
    table_params = [s for s in _parameters(report) if s.startswith(f"bf16[{VOCAB},{DIM}]")]
    if STEP_CASES[case].get("momentum_dtype") == "bfloat16":
        assert table_params, "the bfloat16 momentum of the embedding is a program input"
    else:
        assert not table_params


def test_first_call_creates_the_slots():
    # No opt.build(): the momentum slots are created (zeros, in tf.init_scope)
    # while the check traces the step.
    report, opt = _check_clean_step(dict(sparse_mode="lazy"), build=False)
    momenta = [v for v in opt.variables if v.shape == (VOCAB, DIM)]
    assert len(momenta) == 1 and not np.any(momenta[0].numpy())
    assert report.ok


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_mixed_bfloat16_step_is_tpu_ready(mixed_bfloat16, sparse_mode):
    model = _model()
    assert model.layers[1].compute_dtype == "bfloat16"
    opt = tf_lion.Lion(learning_rate=0.01, sparse_mode=sparse_mode, weight_decay=0.1)
    opt.build(model.trainable_variables)
    report = tpu.check_compiles(_train_step(model, opt), *_inputs())
    assert report.ok
    params = _parameters(report)
    assert f"f32[{VOCAB},{DIM}]{{1,0}}" in params  # float32 table and momentum
    assert any(ins.opcode == "convert" and ins.shape.startswith("bf16[")
               for ins in tpu.parse_hlo(report.hlo_text))


def test_xla_function_wrapping():
    def step(x):
        return x * 2

    jitted = tf.function(step, jit_compile=True)
    assert tpu.xla_function(jitted) is jitted
    plain_fn = tf.function(step)
    rewrapped = tpu.xla_function(plain_fn)
    assert rewrapped is not plain_fn and rewrapped.function_spec.jit_compile
    assert rewrapped.python_function is step
    assert tpu.xla_function(step).function_spec.jit_compile
    with pytest.raises(TypeError):
        tpu.xla_function(3)
    # A tf.function without jit_compile is checked like the plain function.
    report = tpu.check_compiles(plain_fn, tf.ones(3))
    assert report.ok and report.opcode_counts.get("multiply") == 1


def test_specs_partials_and_unknown_shapes():
    def scaled(x, scale):
        return x * scale

    assert tpu.check_compiles(functools.partial(scaled, scale=2.0), tf.ones(3)).ok
    spec = functools.partial(tf.TensorSpec, dtype=tf.float32)
    assert tpu.check_compiles(scaled, spec([3]), scale=spec([])).ok
    # Specs next to Python values, nested specs (a dataset's element_spec) and
    # defaults: TensorFlow's compiler-IR call takes none of them as given.
    assert tpu.check_compiles(scaled, spec([3]), scale=2.0).ok

    def with_default(x, scale=2.0):
        return tf.reduce_sum(x * scale)
    assert tpu.check_compiles(with_default, tf.ones(3)).ok
    assert tpu.check_compiles(tf.function(with_default, jit_compile=True), spec([3])).ok
    dataset = tf.data.Dataset.from_tensors(
        ({"ids": tf.zeros([8, 4], tf.int32), "dense": tf.zeros([8, 3])}, tf.zeros([8, 1])))

    def step(features, label):
        return (tf.reduce_sum(tf.cast(features["ids"], tf.float32))
                + tf.reduce_sum(features["dense"]) + tf.reduce_sum(label))
    assert tpu.check_compiles(step, *dataset.element_spec).ok
    assert tpu.check_compiles(lambda batch: step(*batch), dataset.element_spec).ok
    report = tpu.compile_report(scaled, spec([None]), scale=spec([]))
    assert [p.kind for p in report.problems] == ["dynamic-shape"]
    assert "unknown dimensions" in report.problems[0].detail
    assert report.kind_counts["dynamic-shape"] == 1 and report.hlo_text == ""


# --------------------------------------------------------------------------- #
# What is reported
# --------------------------------------------------------------------------- #
def test_float64_step_is_reported():
    model = _model()
    opt = tf_lion.Lion()
    opt.build(model.trainable_variables)

    def in_float64(pred, ids):
        return tf.cast(tf.cast(pred, tf.float64) * 2.0, tf.float32)

    with pytest.raises(tpu.TPUCompatibilityError) as info:
        tpu.check_compiles(_train_step(model, opt, extra=in_float64), *_inputs())
    error = info.value
    assert isinstance(error, ValueError)
    assert {p.kind for p in error.problems} == {"float64"}
    assert error.report.kind_counts["float64"] > len(error.problems) >= 1
    assert all("f64[" in p.hlo_line for p in error.problems)
    assert any("Cast" in p.detail for p in error.problems)
    message = str(error)
    assert "Step 'train_step' is not ready for TPU" in message
    assert "[float64]" in message and "HLO: " in message and "metadata" not in message


def test_float64_is_reported_once_where_it_starts():
    """A reduction's f64 reducer parameters and init value are not places where
    64-bit data starts: one cast, one problem; an f64 input, one more."""
    def step(x):
        return tf.cast(tf.reduce_sum(tf.cast(x, tf.float64)), tf.float32)
    report = tpu.compile_report(step, tf.ones([8]))
    assert [p.kind for p in report.problems] == ["float64"]
    assert "TF op Cast" in report.problems[0].detail
    assert report.kind_counts["float64"] > 1

    def two(x, y):
        return tf.cast(tf.reduce_max(y) + tf.reduce_min(tf.cast(x, tf.float64)), tf.float32)
    report = tpu.compile_report(two, tf.ones([8]), tf.ones([8], tf.float64))
    details = sorted(p.detail.split(";")[0] for p in report.problems)
    assert details == ["convert produces f64 data", "parameter produces f64 data"], details


def test_tf_keras_lion_step_is_reported():
    # tf-keras deduplicates sparse gradients with tf.unique: the same step
    # with its Lion has data-dependent shapes (tf_lion's has none, above).
    model = _model()
    opt = tf_keras.optimizers.Lion(learning_rate=0.01)
    opt.build(model.trainable_variables)
    with pytest.raises(tpu.TPUCompatibilityError) as info:
        tpu.check_compiles(_train_step(model, opt), *_inputs())
    problems = info.value.problems
    assert {p.kind for p in problems} == {"dynamic-shape"}
    assert any("TF op Unique" in p.detail and "<=" in p.hlo_line for p in problems)


def test_py_function_and_string_ops_are_named():
    def step(x):
        doubled = tf.py_function(lambda t: t * 2, [x], tf.float32)
        length = tf.strings.length(tf.strings.as_string(x))
        return doubled, length

    with pytest.raises(tpu.TPUCompatibilityError) as info:
        tpu.check_compiles(step, tf.ones(3))
    report = info.value.report
    assert report.hlo_text == ""
    assert {p.kind for p in report.problems} == {"not-compilable"}
    details = " | ".join(p.detail for p in report.problems)
    # XLA's error names only the first op; the report names every one.
    assert "EagerPyFunc (tf.py_function)" in details
    assert "AsString (a string op" in details and "StringLength" in details
    assert len(report.problems) == 3


def test_ops_of_nested_tf_functions_are_named():
    @tf.function
    def augment(x):
        doubled = tf.py_function(lambda t: t * 2, [x], tf.float32)
        return doubled, tf.strings.length(tf.strings.as_string(x))

    def step(x):
        doubled, length = augment(x)
        return tf.reduce_sum(doubled) + tf.cast(tf.reduce_sum(length), tf.float32)

    report = tpu.compile_report(step, tf.ones(3))
    details = " | ".join(p.detail for p in report.problems)
    assert "EagerPyFunc (tf.py_function)" in details
    assert "AsString (a string op" in details and "StringLength" in details
    assert len(report.problems) == 3


def test_tpu_only_ops_are_reported_as_such():
    def step(x):
        return tf.compat.v1.tpu.cross_replica_sum(x, [[0, 1]])

    report = tpu.compile_report(step, tf.ones(3))
    (problem,) = report.problems
    assert problem.kind == "not-compilable"
    assert "CrossReplicaSum" in problem.detail and "only in TPU builds" in problem.detail


def test_unique_gives_a_bounded_dynamic_dimension():
    # tf.unique compiles (tf.unique_with_counts does not): XLA gives it a
    # bounded-dynamic output s32[<=n], a sort and a serial while loop.
    def step(x):
        values, _ = tf.unique(x)
        return tf.reduce_sum(values)

    with pytest.raises(tpu.TPUCompatibilityError) as info:
        tpu.check_compiles(step, tf.constant([3, 1, 3, 2, 7]))
    report = info.value.report
    (problem,) = report.problems
    assert problem.kind == "dynamic-shape"
    assert "s32[<=5]" in problem.hlo_line and "TF op Unique" in problem.detail
    assert report.kind_counts["dynamic-shape"] >= 1 and "while" in report.opcode_counts

    report = tpu.compile_report(lambda x: tf.unique_with_counts(x)[0], tf.constant([3, 1]))
    assert [p.kind for p in report.problems] == ["not-compilable"]
    assert "UniqueWithCounts" in report.problems[0].detail


def test_boolean_mask_gives_a_bounded_dynamic_dimension():
    report = tpu.compile_report(lambda x: tf.boolean_mask(x, x > 2), tf.constant([3, 1, 4]))
    assert [p.kind for p in report.problems] == ["dynamic-shape"]
    assert "<=3" in report.problems[0].hlo_line and "Where" in report.problems[0].detail


def test_dynamic_shape_is_reported_where_it_starts_not_in_loop_parameters():
    """A masked vector mapped over: the loop's parameters carry the dynamic
    size in, they do not start it; the mask's `Where` does."""
    def step(x):
        return tf.map_fn(lambda v: v * 2.0, tf.boolean_mask(x, x > 2.0))

    report = tpu.compile_report(step, tf.constant([3.0, 1.0, 4.0]))
    assert report.problems and all(p.kind == "dynamic-shape" for p in report.problems)
    assert not any(" parameter(" in p.hlo_line for p in report.problems)
    assert "Where" in report.problems[0].detail


@pytest.mark.parametrize("as_specs", [False, True])
def test_shape_read_from_an_input_value_is_not_compiled_in(as_specs):
    """`ids[:, :max(lengths)]`: a TPU compiles before it sees `lengths`, so the
    example's values must not become constants of the checked program."""
    def step(ids, lengths):
        return tf.reduce_sum(ids[:, :tf.reduce_max(lengths)])

    ids, lengths = tf.ones([2, 8], tf.int32), tf.constant([3, 5])
    args = (tf.TensorSpec.from_tensor(ids), tf.TensorSpec.from_tensor(lengths)) if as_specs \
        else (ids, lengths)
    report = tpu.compile_report(step, *args)
    assert not report.ok
    assert {p.kind for p in report.problems} <= {"dynamic-shape", "not-compilable"}
    assert "constant({3, 5})" not in report.hlo_text
    with pytest.raises(tpu.TPUCompatibilityError):
        tpu.check_compiles(step, *args)
    # With the size fixed in the program, the same step is fine.
    assert tpu.check_compiles(lambda ids, lengths: tf.reduce_sum(ids[:, :5]), *args).ok


def test_sparse_and_ragged_example_values_are_not_compiled_in_either():
    sparse = tf.sparse.SparseTensor([[0, 0], [1, 2]], [1, 3], [2, 4])
    report = tpu.compile_report(
        lambda s: tf.reduce_sum(tf.ones([tf.reduce_max(s.values)])), sparse)
    assert not report.ok and "constant({1, 3})" not in report.hlo_text
    ragged = tf.ragged.constant([[1, 2], [3]])
    assert not tpu.compile_report(
        lambda r: tf.reduce_sum(tf.ones([tf.reduce_max(r.row_lengths())])), ragged).ok
    assert tpu.check_compiles(lambda r: tf.reduce_sum(r.values), ragged).ok
    report = tpu.compile_report(lambda r: tf.reduce_sum(r.values),
                                tf.RaggedTensorSpec.from_value(ragged))
    assert [p.kind for p in report.problems] == ["dynamic-shape"]
    assert "unknown dimensions" in report.problems[0].detail


def test_problems_name_the_steps_own_arguments():
    report = tpu.compile_report(lambda words: tf.strings.length(words), tf.constant(["ab"]))
    assert any("'words'" in p.detail for p in report.problems)


def test_host_transfer_and_custom_call_in_compiled_hlo():
    def recv_step(x):
        return gen_xla_ops.xla_recv(tf.float32, tensor_name="t", shape=[3]) + x

    report = tpu.compile_report(recv_step, tf.ones(3))
    assert [p.kind for p in report.problems] == ["host-transfer"]
    assert " recv(" in report.problems[0].hlo_line
    assert report.kind_counts["host-transfer"] == 2  # recv and recv-done

    def custom_step(x):
        return gen_xla_ops.xla_custom_call([x], target_name="my_kernel", backend_config="",
                                           dtype=tf.float32, shape=[3])

    report = tpu.compile_report(custom_step, tf.ones(3))
    assert [p.kind for p in report.problems] == ["custom-call"]
    assert "'my_kernel'" in report.problems[0].detail


def test_no_false_positives_on_common_lowerings():
    # tf.image.resize emits an f64 constant converted to f32 (folded by XLA);
    # tf.linalg.qr emits XLA's own "Qr" custom-call; Assert ops are dropped.
    def step(x):
        image = tf.image.resize(tf.reshape(x, (1, 4, 4, 1)), (2, 2))
        q, _ = tf.linalg.qr(tf.reshape(x, (4, 4)))
        tf.debugging.assert_less(x, 100.0)
        return tf.reduce_sum(image) + tf.reduce_sum(q)

    report = tpu.check_compiles(step, tf.random.normal((16,)))
    assert "f64[" in report.hlo_text and 'custom_call_target="Qr"' in report.hlo_text
    assert report.ok


# --------------------------------------------------------------------------- #
# lint_hlo on hand-written HLO
# --------------------------------------------------------------------------- #
def _module(*body, extra=""):
    lines = ["HloModule m", "", extra, "ENTRY %main (p0: f32[4]) -> f32[4] {",
             "  %p0 = f32[4]{0} parameter(0)"]
    lines += ["  " + line for line in body]
    lines += ["}"]
    return "\n".join(lines)


def _kinds(report):
    return [p.kind for p in report.problems]


def test_lint_send_recv():
    report = tpu.lint_hlo(_module(
        "%tok = token[] after-all()",
        "%send = (f32[4]{0}, u32[], token[]) send(f32[4]{0} %p0, token[] %tok), channel_id=1, "
        "is_host_transfer=true",
        "%send-done = token[] send-done((f32[4]{0}, u32[], token[]) %send), channel_id=1, "
        "is_host_transfer=true",
        "%recv = (f32[4]{0}, u32[], token[]) recv(token[] %tok), channel_id=2, "
        "is_host_transfer=true",
        "%recv-done = (f32[4]{0}, token[]) recv-done((f32[4]{0}, u32[], token[]) %recv), "
        "channel_id=2, is_host_transfer=true",
        "ROOT %r = f32[4]{0} get-tuple-element((f32[4]{0}, token[]) %recv-done), index=0",
    ))
    assert _kinds(report) == ["host-transfer", "host-transfer"]
    assert report.kind_counts["host-transfer"] == 4
    assert " send(" in report.problems[0].hlo_line and "host" in report.problems[0].detail
    assert " recv(" in report.problems[1].hlo_line


def test_lint_infeed_outfeed():
    report = tpu.lint_hlo(_module(
        "%tok = token[] after-all()",
        "%infeed = ((f32[4]{0}), token[]) infeed(token[] %tok)",
        "%out = token[] outfeed(f32[4]{0} %p0, token[] %tok), outfeed_shape=f32[4]{0}",
        "ROOT %r = f32[4]{0} add(f32[4]{0} %p0, f32[4]{0} %p0)",
    ))
    assert _kinds(report) == ["host-transfer", "host-transfer"]
    assert "infeed" in report.problems[0].detail and "outfeed" in report.problems[1].detail


def test_lint_custom_calls():
    report = tpu.lint_hlo(_module(
        '%cb = f32[4]{0} custom-call(f32[4]{0} %p0), custom_call_target="xla_python_cpu_callback", '
        "custom_call_has_side_effect=true",
        '%ffi = f32[4]{0} custom-call(f32[4]{0} %cb), custom_call_target="my_ffi_host_callback"',
        '%host = f32[4]{0} custom-call(f32[4]{0} %ffi), custom_call_target="MoveToHost"',
        '%eigh = (f32[2,2]{1,0}, f32[2]{0}) custom-call(f32[2,2]{1,0} %x), custom_call_target="Eigh"',
        '%shard = f32[4]{0} custom-call(f32[4]{0} %host), custom_call_target="Sharding", '
        "sharding={replicated}",
        '%odd = f32[4]{0} custom-call(f32[4]{0} %shard), custom_call_target="lapack_sgeqrf"',
        "ROOT %r = f32[4]{0} copy(f32[4]{0} %odd)",
    ))
    assert _kinds(report) == ["host-transfer"] * 3 + ["custom-call"]
    assert "'xla_python_cpu_callback'" in report.problems[0].detail
    assert "'lapack_sgeqrf'" in report.problems[3].detail
    assert report.opcode_counts["custom-call"] == 6


def test_lint_dynamic_dimensions():
    report = tpu.lint_hlo(_module(
        "%n = s32[] constant(2)",
        "%d = f32[<=4]{0} set-dimension-size(f32[4]{0} %p0, s32[] %n), dimensions={0}",
        "%e = f32[<=4]{0} negate(f32[<=4]{0} %d)",
        "%u = f32[?,3]{1,0} custom-call(f32[4]{0} %p0), custom_call_target=\"SliceToDynamic\"",
        "ROOT %r = f32[4]{0} add(f32[4]{0} %p0, f32[4]{0} %p0)",
    ))
    # Reported where dynamism starts (d and u), counted everywhere (d, e, u).
    assert _kinds(report) == ["dynamic-shape", "dynamic-shape"]
    assert "f32[<=4]" in report.problems[0].detail and "f32[?,3]" in report.problems[1].detail
    assert report.kind_counts["dynamic-shape"] == 3


def test_lint_float64():
    report = tpu.lint_hlo(_module(
        "%c = f64[] constant(0.5)",
        "%cb = f64[4]{0} broadcast(f64[] %c), dimensions={}",
        "%cf = f32[4]{0} convert(f64[4]{0} %cb)",
        "%w = f64[4]{0} convert(f32[4]{0} %cf)",
        "%m = f64[4]{0} multiply(f64[4]{0} %w, f64[4]{0} %cb)",
        "%z = c128[4]{0} parameter(1)",
        "ROOT %r = f32[4]{0} convert(f64[4]{0} %m)",
    ))
    # XLA folds %cb, %cf and %w (converts of constants): f64 starts at %m and %z.
    assert _kinds(report) == ["float64", "float64"]
    assert "%m = f64[4]{0} multiply" in report.problems[0].hlo_line
    assert "c128" in report.problems[1].detail
    assert report.kind_counts["float64"] == 2  # m, z (not the constants)


def test_lint_ignores_names_and_metadata():
    # Names and metadata are not instructions: an "All-reduction" computation
    # (a tf.reduce_all), op names with "f64"/"send"/"<=" are no problems.
    text = "\n".join([
        "HloModule m, entry_computation_layout={(f32[4]{0})->pred[]}",
        "",
        "%Lion_assert_less_All-reduction.1 (x.1: pred[], y.1: pred[]) -> pred[] {",
        "  %x.1 = pred[] parameter(0)",
        "  %y.1 = pred[] parameter(1)",
        "  ROOT %and.1 = pred[] and(pred[] %x.1, pred[] %y.1)",
        "}",
        "",
        "ENTRY %main (p0: f32[4]) -> pred[] {",
        '  %p0 = f32[4]{0} parameter(0), metadata={op_type="Cast" op_name="send_f64[<=3]/recv"}',
        "  %t = pred[] constant(true)",
        "  %gt = pred[4]{0} compare(f32[4]{0} %p0, f32[4]{0} %p0), direction=GT, "
        'metadata={op_type="All" op_name="infeed/custom-call(\\"x\\")"}',
        "  ROOT %all = pred[] reduce(pred[4]{0} %gt, pred[] %t), dimensions={0}, "
        "to_apply=%Lion_assert_less_All-reduction.1",
        "}",
    ])
    report = tpu.lint_hlo(text)
    assert report.ok and report.collectives == []
    assert report.instruction_count == 7
    gt = [ins for ins in tpu.parse_hlo(text) if ins.name == "gt"][0]
    assert gt.op_type == "All" and gt.attributes == "direction=GT"


def test_collectives_helper():
    text = _module(
        "%ar = f32[64,8]{1,0} all-reduce(f32[64,8]{1,0} %t), replica_groups={{0,1}}, "
        "to_apply=%sum",
        "%ag = s32[16]{0} all-gather(s32[8]{0} %i), replica_groups={{0,1}}, dimensions={0}",
        "%a2a = (s64[1,8]{1,0}, s64[1,8]{1,0}) all-to-all(s64[1,8]{1,0} %a, s64[1,8]{1,0} %b), "
        "replica_groups={{0,1}}",
        "%cp = f32[4]{0} collective-permute(f32[4]{0} %p0), source_target_pairs={{0,1},{1,0}}",
        "%rs = f32[32,8]{1,0} reduce-scatter(f32[64,8]{1,0} %t), replica_groups=[1,2]<=[2], "
        "dimensions={0}, to_apply=%sum",
        "%ars = f32[4]{0} all-reduce-start(f32[4]{0} %p0), replica_groups={}, to_apply=%sum",
        "%ard = f32[4]{0} all-reduce-done(f32[4]{0} %ars)",
        "ROOT %r = f32[4]{0} copy(f32[4]{0} %ard)",
    )
    found = tpu.collectives(text)
    assert [c.opcode for c in found] == ["all-reduce", "all-gather", "all-to-all",
                                         "collective-permute", "reduce-scatter",
                                         "all-reduce-start"]
    assert [c.operand_elements for c in found] == [512, 8, 16, 4, 512, 4]
    assert [c.result_elements for c in found] == [512, 16, 16, 4, 256, 4]
    assert found[1].elements == 16
    assert found[0].replica_groups == "{{0,1}}" and found[4].replica_groups == "[1,2]<=[2]"
    assert tpu.lint_hlo(text).collectives == found


# --------------------------------------------------------------------------- #
# Sparse aggregation across replicas, in HLO
# --------------------------------------------------------------------------- #
REPLICAS, ROWS, COLS, IDS = 2, 1000, 16, 8


class _CpuTPUReplicaContext(tpu_strategy._TPUReplicaContext):
    """TPUStrategy's replica context with its one TPU-only op swapped for its HLO twin.

    `all_gather` is TPUStrategy's own code (inherited, unchanged). Inside a
    TPU program `all_reduce` ends in `tpu_ops.cross_replica_sum`, the TF op
    `CrossReplicaSum`, whose XLA kernel (tensorflow/core/tpu/kernels/
    cross_replica_ops.cc, linked only into TPU builds) emits
    `xla::CrossReplicaSum`: an HLO `all-reduce` with a sum. CPU builds have no
    kernel for it, so here `all_reduce` emits that same `all-reduce` with
    `XlaAllReduce(reduce_op="Add", mode="CrossReplica")`. Like the TPU op, it
    densifies a `tf.IndexedSlices` first (`convert_to_tensor` of its input).
    The replica id is a program input, as `TPUStrategy.run` feeds it.
    """

    def __init__(self, num_replicas, replica_id):  # pylint: disable=super-init-not-called
        self._num = num_replicas
        self._id = replica_id

    @property
    def num_replicas_in_sync(self):
        return self._num

    @property
    def replica_id_in_sync_group(self):
        return self._id

    def all_reduce(self, reduce_op, value, options=None):
        del options

        def reduce_one(v):
            v = tf.convert_to_tensor(v)
            if reduce_op == tf.distribute.ReduceOp.MEAN:
                v = v * (1.0 / self._num)
            return gen_xla_ops.xla_all_reduce(v, [list(range(self._num))],
                                              reduce_op="Add", mode="CrossReplica")

        return tf.nest.map_structure(reduce_one, value)


def _embedding_steps():
    table = tf.Variable(tf.random.stateless_normal((ROWS, COLS), seed=[1, 2]))
    momentum = tf.Variable(tf.zeros((ROWS, COLS)))
    hypers = (1e-3, 0.9, 0.99, 0.1)

    def sparse_grad(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(tf.gather(table, ids)))
        grad = tape.gradient(loss, table)
        assert isinstance(grad, tf.IndexedSlices)
        return grad

    def keras_style(ids, replica_id):
        # tf-keras on TPU: all_reduce(SUM) -> cross_replica_sum of the
        # densified gradient, then a dense update.
        ctx = _CpuTPUReplicaContext(REPLICAS, replica_id)
        dense = ctx.all_reduce(tf.distribute.ReduceOp.SUM, sparse_grad(ids))
        update_lib.dense_update(table, momentum, dense, *hypers)

    def gather_style(ids, replica_id):
        # tf_lion: all_gather indices and values, then the lazy sparse update.
        ctx = _CpuTPUReplicaContext(REPLICAS, replica_id)
        with tpu_function.tpu_shard_context(REPLICAS):  # as inside a TPU program
            grad = distribute_lib.all_gather_indexed_slices(sparse_grad(ids), ctx)
        assert grad.indices.shape == (REPLICAS * IDS,)
        update_lib.lazy_sparse_update(table, momentum, grad.indices, grad.values, *hypers)

    return keras_style, gather_style


def test_sparse_aggregation_never_all_reduces_the_table():
    keras_style, gather_style = _embedding_steps()
    ids = tf.constant([1, 5, 5, 9, 100, 3, 2, 999], tf.int32)
    replica_id = tf.constant(0, tf.int32)

    densified = tpu.check_compiles(keras_style, ids, replica_id).collectives
    gathered = tpu.check_compiles(gather_style, ids, replica_id).collectives

    table_size = ROWS * COLS
    assert [(c.opcode, c.elements) for c in densified] == [("all-reduce", table_size)]
    assert densified[0].operand_shapes == (f"f32[{ROWS},{COLS}]{{1,0}}",)
    # TPU's all_gather of int32/float32 is a one-hot masked all-reduce of
    # [replicas, n, ...]: indices then values, batch-sized.
    assert [c.opcode for c in gathered] == ["all-reduce", "all-reduce"]
    assert [c.elements for c in gathered] == [REPLICAS * IDS, REPLICAS * IDS * COLS]
    assert gathered[0].operand_shapes[0].startswith(f"s32[{REPLICAS},{IDS}]")
    assert all(c.elements < table_size for c in gathered)
    assert sum(c.elements for c in gathered) * 50 < table_size


def test_int64_indices_take_the_all_to_all_path():
    # int64 is not among the dtypes TPU's all_gather sums with
    # cross_replica_sum; it uses AllToAll, another TPU-only op (no HLO here).
    # Its inputs are still batch-sized.
    _, gather_style = _embedding_steps()
    ids = tf.constant([1, 5, 5, 9, 100, 3, 2, 999], tf.int64)
    replica_id = tf.constant(0, tf.int32)

    report = tpu.compile_report(gather_style, ids, replica_id)
    assert [p.kind for p in report.problems] == ["not-compilable"]
    assert "AllToAll" in report.problems[0].detail
    assert "only in TPU builds" in report.problems[0].detail

    graph = tpu.xla_function(gather_style).get_concrete_function(ids, replica_id).graph
    sizes = sorted(op.inputs[0].shape.num_elements()
                   for op in graph.get_operations() if op.type == "AllToAll")
    assert sizes == [REPLICAS, REPLICAS * IDS]  # replica ids, then tiled indices
