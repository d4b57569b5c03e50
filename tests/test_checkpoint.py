"""Checkpoints: momentum (and EMA) saved as slots keyed to their variables."""

import warnings

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_lion

VOCAB, DIM = 30, 4


class Net(tf_keras.Model):
    """Layers keyed by attribute name; `reverse` creates them (and orders
    `trainable_variables`) the other way round, `extra_layer` adds one."""

    def __init__(self, reverse=False, extra_layer=False):
        super().__init__()
        if reverse:
            self.out = tf_keras.layers.Dense(1)
            self.dense = tf_keras.layers.Dense(3)
            self.emb = tf_keras.layers.Embedding(VOCAB, DIM)
        else:
            self.emb = tf_keras.layers.Embedding(VOCAB, DIM)
            self.dense = tf_keras.layers.Dense(3)
            self.out = tf_keras.layers.Dense(1)
        self.extra = tf_keras.layers.Dense(3) if extra_layer else None

    def call(self, x):
        x = self.dense(tf.reduce_mean(self.emb(x), axis=1))
        if self.extra is not None:
            x = self.extra(x)
        return self.out(x)


def _model(seed=0, build=True, **kwargs):
    tf_keras.utils.set_random_seed(seed)
    model = Net(**kwargs)
    if build:
        model(tf.zeros([1, 5], tf.int32))
    return model


def _named(model):
    """Variables by a name that does not depend on creation order."""
    return {f"{layer}/{v.name.split('/')[-1]}": v
            for layer in ("emb", "dense", "extra", "out") if getattr(model, layer) is not None
            for v in getattr(model, layer).trainable_variables}


def _batches(n, seed=5):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, VOCAB, (8, 5)).astype(np.int32),
             rng.standard_normal((8, 1)).astype(np.float32)) for _ in range(n)]


def _optimizer(**kwargs):
    schedule = tf_keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=2, decay_rate=0.7)
    defaults = dict(learning_rate=schedule, weight_decay=0.1, use_ema=True, ema_momentum=0.9,
                    jit_compile=False)
    defaults.update(kwargs)
    return tf_lion.Lion(**defaults)


def _train(model, opt, batches):
    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    for x, y in batches:
        step(x, y)


def _state(model, opt):
    named = _named(model)
    out = {n: v.numpy() for n, v in named.items()}
    for n, v in named.items():
        for slot in opt.get_slot_names():
            out[f"{n}/{slot}"] = opt.get_slot(v, slot).numpy()
    out["iterations"] = opt.iterations.numpy()
    return out


def _assert_states_equal(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_exact_resume(tmp_path, sparse_mode, jit_compile):
    batches = _batches(6)
    model, opt = _model(), _optimizer(sparse_mode=sparse_mode, jit_compile=jit_compile)
    _train(model, opt, batches)
    uninterrupted = _state(model, opt)

    model, opt = _model(), _optimizer(sparse_mode=sparse_mode, jit_compile=jit_compile)
    _train(model, opt, batches[:3])
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "ckpt"))
    del model, opt

    model, opt = _model(seed=99), _optimizer(sparse_mode=sparse_mode, jit_compile=jit_compile)
    status = tf.train.Checkpoint(model=model, optimizer=opt).restore(path)
    _train(model, opt, batches[3:])
    status.assert_consumed()
    _assert_states_equal(uninterrupted, _state(model, opt))


def _train_one_and_save(tmp_path):
    model, opt = _model(), _optimizer(use_ema=False, learning_rate=0.01)
    _train(model, opt, _batches(2))
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "ckpt"))
    saved = {n: (v.numpy(), opt.get_slot(v, "m").numpy()) for n, v in _named(model).items()}
    return path, saved, [v.name for v in model.trainable_variables]


def test_restore_into_other_variable_order(tmp_path):
    path, saved, order = _train_one_and_save(tmp_path)
    model, opt = _model(seed=3, reverse=True), _optimizer(use_ema=False, learning_rate=0.01)
    assert [v.name for v in model.trainable_variables] != order  # really another order
    tf.train.Checkpoint(model=model, optimizer=opt).restore(path).assert_existing_objects_matched()
    opt.build(model.trainable_variables)
    for name, v in _named(model).items():
        np.testing.assert_array_equal(v.numpy(), saved[name][0])
        np.testing.assert_array_equal(opt.get_slot(v, "m").numpy(), saved[name][1])


def test_restore_into_model_with_extra_layer(tmp_path):
    path, saved, _ = _train_one_and_save(tmp_path)
    model, opt = _model(seed=3, extra_layer=True), _optimizer(use_ema=False, learning_rate=0.01)
    tf.train.Checkpoint(model=model, optimizer=opt).restore(path).expect_partial()
    opt.build(model.trainable_variables)
    fresh = [n for n in _named(model) if n.startswith("extra")]
    assert fresh
    for name, v in _named(model).items():
        m = opt.get_slot(v, "m").numpy()
        expected = np.zeros_like(m) if name in fresh else saved[name][1]
        np.testing.assert_array_equal(m, expected)


def test_deferred_restore_before_build_and_before_first_call(tmp_path):
    path, saved, _ = _train_one_and_save(tmp_path)
    model = _model(seed=7, build=False)  # no variables exist yet
    opt = _optimizer(use_ema=False, learning_rate=0.01)
    tf.train.Checkpoint(model=model, optimizer=opt).restore(path)
    assert not model.weights and not opt._slots.ordered("m")
    model(tf.zeros([1, 5], tf.int32))  # first call creates (and restores) the variables
    opt.build(model.trainable_variables)  # building creates (and restores) the slots
    for name, v in _named(model).items():
        np.testing.assert_array_equal(v.numpy(), saved[name][0])
        np.testing.assert_array_equal(opt.get_slot(v, "m").numpy(), saved[name][1])
    assert int(opt.iterations) == 2


def test_checkpoint_without_optimizer_state_warns_and_keeps_zero_momentum(tmp_path):
    model = _model()
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "model_only"))
    restored, opt = _model(seed=4), _optimizer(use_ema=False, learning_rate=0.01)
    tf.train.Checkpoint(model=restored, optimizer=opt).restore(path).expect_partial()
    with pytest.warns(UserWarning, match="no Lion state.*momentum starts at zero"):
        opt.build(restored.trainable_variables)
    for a, b in zip(model.trainable_variables, restored.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(opt.get_slot(b, "m").numpy(), np.zeros(b.shape))


@pytest.mark.parametrize("new_setting, fresh", [
    ({"use_ema": True}, "EMA average starts at the restored weights"),
    ({"gradient_accumulation_steps": 2}, "gradient accumulator starts at zero"),
])
def test_warning_names_only_the_slots_that_start_fresh(tmp_path, new_setting, fresh):
    """Resuming with EMA or accumulation newly on: the momentum is restored,
    and the warning names the new slots, not the momentum."""
    path, saved, _ = _train_one_and_save(tmp_path)
    model, opt = _model(seed=4), _optimizer(learning_rate=0.01, **{"use_ema": False,
                                                                   **new_setting})
    tf.train.Checkpoint(model=model, optimizer=opt).restore(path)
    with pytest.warns(UserWarning, match=f"no Lion state for some of their slots: {fresh} "
                                         "for 5 variable"):
        opt.build(model.trainable_variables)
    for name, v in _named(model).items():
        np.testing.assert_array_equal(opt.get_slot(v, "m").numpy(), saved[name][1])


def test_state_the_optimizer_no_longer_keeps_is_dropped_with_a_warning(tmp_path, recwarn):
    model, opt = _model(), _optimizer(use_ema=True, gradient_accumulation_steps=2)
    _train(model, opt, _batches(2))  # a window completed: the accumulators are zero
    between = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "between"))
    _train(model, opt, _batches(1, seed=8))  # a window in progress
    within = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "within"))

    restored, plain = _model(seed=4), _optimizer(use_ema=True)
    tf.train.Checkpoint(model=restored, optimizer=plain).restore(between)
    assert not [w for w in recwarn if "does not keep" in str(w.message)]  # zeros: nothing lost
    restored, plain = _model(seed=4), _optimizer(use_ema=False)
    with pytest.warns(UserWarning) as record:
        tf.train.Checkpoint(model=restored, optimizer=plain).restore(within)
    messages = [str(w.message) for w in record if "does not keep" in str(w.message)]
    assert len(messages) == 2  # once per slot name, not per variable
    assert any("'average' slots" in m for m in messages)
    assert any("'accumulator' slots" in m and "window in progress are dropped" in m
               for m in messages)
    plain.build(restored.trainable_variables)  # the momentum itself is restored
    for a, b in zip(model.trainable_variables, restored.trainable_variables):
        np.testing.assert_array_equal(opt.get_slot(a, "m").numpy(), plain.get_slot(b, "m").numpy())


def test_a_slot_that_fails_to_restore_fails_again_instead_of_starting_at_zero(tmp_path):
    path, saved, _ = _train_one_and_save(tmp_path)  # float32 momentum
    model, opt = _model(seed=4), _optimizer(use_ema=False, momentum_dtype="bfloat16")
    with pytest.raises(tf.errors.InvalidArgumentError, match="bfloat16"):  # slots made at once
        tf.train.Checkpoint(model=model, optimizer=opt).restore(path)
    for _ in range(2):
        with pytest.raises(tf.errors.InvalidArgumentError, match="bfloat16"):
            opt.build(model.trainable_variables)
    with pytest.raises(KeyError, match="no 'm' slot yet"):  # no slot of zeros was kept
        opt.get_slot(model.trainable_variables[0], "m")


def test_a_checkpoint_saved_after_a_restore_and_before_any_step_keeps_the_momenta(tmp_path):
    """Restoring creates the slots of the variables it binds (as OptimizerV2
    does): a save before the first step (at the top of a resumed loop, on
    preemption) holds them, and no restore reads a file after it returned
    (with `max_to_keep=1` that file is gone)."""
    path, saved, _ = _train_one_and_save(tmp_path)
    model, opt = _model(seed=3), _optimizer(use_ema=False, learning_rate=0.01)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=opt)
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path / "run"), max_to_keep=1)
    checkpoint.restore(path)
    for name, v in _named(model).items():  # already there, before any build
        np.testing.assert_array_equal(opt.get_slot(v, "m").numpy(), saved[name][1])
    first = manager.save()
    second = manager.save()  # deletes `first`
    assert not tf.io.gfile.glob(first + "*")
    opt.build(model.trainable_variables)
    model, opt = _model(seed=4), _optimizer(use_ema=False, learning_rate=0.01)
    tf.train.Checkpoint(model=model, optimizer=opt).restore(second).assert_consumed()
    for name, v in _named(model).items():
        np.testing.assert_array_equal(v.numpy(), saved[name][0])
        np.testing.assert_array_equal(opt.get_slot(v, "m").numpy(), saved[name][1])


def test_momentum_of_a_variable_frozen_after_a_restore_is_saved_again(tmp_path):
    path, saved, _ = _train_one_and_save(tmp_path)
    model, opt = _model(seed=3), _optimizer(use_ema=False, learning_rate=0.01)
    tf.train.Checkpoint(model=model, optimizer=opt).restore(path)
    model.emb.trainable = False
    _train(model, opt, _batches(1))  # steps over dense and out only
    again = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "again"))
    model, opt = _model(seed=4), _optimizer(use_ema=False, learning_rate=0.01)
    tf.train.Checkpoint(model=model, optimizer=opt).restore(again)
    frozen = model.emb.trainable_variables[0]
    np.testing.assert_array_equal(opt.get_slot(frozen, "m").numpy(), saved["emb/embeddings:0"][1])


def test_partitioned_variable_slots_are_made_at_restore(tmp_path):
    from tensorflow.python.distribute import sharded_variable

    def make():
        shards = [tf.Variable(tf.ones((3, 2)), name="table/part_0"),
                  tf.Variable(tf.ones((2, 2)), name="table/part_1")]
        return shards, sharded_variable.ShardedVariable(shards), tf_lion.Lion(0.1,
                                                                              jit_compile=False)

    shards, table, opt = make()
    opt.apply_gradients([(tf.fill([3, 2], 2.0), shards[0]), (tf.fill([2, 2], -3.0), shards[1])])
    saved = [opt.get_slot(s, "m").numpy() for s in shards]
    path = tf.train.Checkpoint(t=table, opt=opt).write(str(tmp_path / "s"))
    shards, table, opt = make()
    tf.train.Checkpoint(t=table, opt=opt).restore(path)
    again = tf.train.Checkpoint(t=table, opt=opt).write(str(tmp_path / "again"))
    shards, table, opt = make()
    tf.train.Checkpoint(t=table, opt=opt).restore(again)
    opt.build(shards)
    for shard, value in zip(shards, saved):
        np.testing.assert_array_equal(opt.get_slot(shard, "m").numpy(), value)


def test_slots_made_by_a_restore_join_keras_files_when_their_variables_are_built(tmp_path):
    """A restore creates slots in the checkpoint's traversal order, which is not
    the model's: they take no position in `variables` (Keras files, which a
    legacy `.h5` loads by position) until a build places them. A layer frozen
    since the restore keeps its momentum in checkpoints and out of Keras files,
    which `load_model` then loads (it builds the trainable variables only)."""
    class Block(tf_keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.inner = tf_keras.layers.Dense(4)

        def call(self, x):
            return self.inner(x)

    def make():
        tf_keras.utils.set_random_seed(0)
        model = tf_keras.Sequential([tf_keras.Input((4,)), Block(name="block"),
                                     tf_keras.layers.Dense(4, name="top")])
        model.compile(optimizer=tf_lion.Lion(0.01, jit_compile=False), loss="mse")
        return model

    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal((8, 4)).astype(np.float32) for _ in range(2))
    trained = make()
    trained.fit(x, y, batch_size=8, verbose=0)
    path = tf.train.Checkpoint(model=trained, optimizer=trained.optimizer).write(
        str(tmp_path / "a"))
    restored = make()
    tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).restore(path)
    assert len(restored.optimizer.variables) == 1  # the step counter; the slots exist:
    for a, b in zip(trained.trainable_variables, restored.trainable_variables):
        np.testing.assert_array_equal(restored.optimizer.get_slot(b, "m").numpy(),
                                      trained.optimizer.get_slot(a, "m").numpy())
    restored.optimizer.build(restored.trainable_variables)
    assert [v.name for v in restored.optimizer.variables[1:]] == [
        "m/" + v.name for v in restored.trainable_variables]

    frozen = make()
    frozen.layers[0].trainable = False
    frozen.compile(optimizer=frozen.optimizer, loss="mse")
    tf.train.Checkpoint(model=frozen, optimizer=frozen.optimizer).restore(path)
    frozen.fit(x, y, batch_size=8, verbose=0)
    frozen.save(str(tmp_path / "frozen.keras"))
    loaded = tf_keras.models.load_model(str(tmp_path / "frozen.keras"),
                                        custom_objects={"Block": Block})
    assert int(loaded.optimizer.iterations) == 2
    for a, b in zip(frozen.trainable_variables, loaded.trainable_variables):
        np.testing.assert_array_equal(loaded.optimizer.get_slot(b, "m").numpy(),
                                      frozen.optimizer.get_slot(a, "m").numpy())
    block_kernel = frozen.layers[0].inner.kernel  # frozen: kept in checkpoints
    np.testing.assert_array_equal(frozen.optimizer.get_slot(block_kernel, "m").numpy(),
                                  trained.optimizer.get_slot(trained.layers[0].inner.kernel,
                                                             "m").numpy())


def test_a_dropped_keras_file_keeps_the_state_a_checkpoint_restored_before_it(tmp_path):
    def make():
        tf_keras.utils.set_random_seed(0)
        model = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(3, name="a"),
                                     tf_keras.layers.Dense(3, name="b")])
        model.compile(tf_lion.Lion(0.01, jit_compile=False), "mse")
        return model

    x, y = np.ones((4, 3), np.float32), np.zeros((4, 3), np.float32)
    source = make()
    source.fit(x, y, verbose=0)
    path = tf.train.Checkpoint(model=source, optimizer=source.optimizer).write(
        str(tmp_path / "c"))
    restored_m = source.optimizer.get_slot(source.trainable_variables[0], "m").numpy()
    source.fit(x, y, verbose=0)
    source.save_weights(str(tmp_path / "w.weights.h5"))
    model = make()
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore(path)
    model.load_weights(str(tmp_path / "w.weights.h5"))  # waits for the build
    model.get_layer("b").trainable = False
    with pytest.warns(UserWarning, match="restored from a checkpoint before the file was "
                                         "loaded, which it keeps"):
        model.optimizer.build(model.trainable_variables)  # does not fit: the file is dropped
    assert int(model.optimizer.iterations) == 1
    np.testing.assert_array_equal(
        model.optimizer.get_slot(model.trainable_variables[0], "m").numpy(), restored_m)


@pytest.mark.parametrize("create", ["build", "call"])
def test_a_restore_before_keras_builds_the_model_in_a_graph_makes_the_slots(tmp_path, create):
    """A deferred restore reaches the optimizer while Keras creates the
    variables in a graph of its own (`model.build(shape)`): the slots are made
    then too (under `init_scope`), so the file may be gone afterwards."""
    def make():
        tf_keras.utils.set_random_seed(0)
        model = tf_keras.Sequential([tf_keras.layers.Dense(3, name="a"),
                                     tf_keras.layers.Dense(2, name="b")])
        model.compile(tf_lion.Lion(0.01, jit_compile=False), "mse")
        return model

    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    source = make()
    source.fit(x, np.zeros((8, 2), np.float32), verbose=0, epochs=2)
    saved = [source.optimizer.get_slot(v, "m").numpy() for v in source.trainable_variables]
    first = tf.train.CheckpointManager(tf.train.Checkpoint(model=source, optimizer=source.optimizer),
                                       str(tmp_path / "run"), max_to_keep=1).save()
    model = make()  # no variables yet
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path / "run"), max_to_keep=1)
    checkpoint.restore(first)
    if create == "build":
        model.build((None, 3))
    else:
        model(x)
    again = manager.save()
    assert not tf.io.gfile.glob(first + "*")
    model.optimizer.build(model.trainable_variables)
    for v, m in zip(model.trainable_variables, saved):
        np.testing.assert_array_equal(model.optimizer.get_slot(v, "m").numpy(), m)
    resumed = make()
    resumed.build((None, 3))
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(again)
    for v, m in zip(resumed.trainable_variables, saved):
        np.testing.assert_array_equal(resumed.optimizer.get_slot(v, "m").numpy(), m)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_restore_into_a_module_that_creates_its_variable_in_a_traced_step(tmp_path, jit_compile):
    """The restore reaches the optimizer while the step's trace creates the
    variable (no value yet): the EMA average made then starts from the
    checkpoint's value, not from the variable."""
    class Lazy(tf.Module):
        def __call__(self, x):
            if not hasattr(self, "w"):
                self.w = tf.Variable(tf.ones([3, 2]) * 0.5, name="w")
            return x @ self.w

    x = tf.constant(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32))

    def step(module, opt):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(module(x) ** 2)
        grads = tape.gradient(loss, module.trainable_variables)
        opt.apply_gradients(zip(grads, module.trainable_variables))

    def make():
        return Lazy(), tf_lion.Lion(0.01, use_ema=True, jit_compile=jit_compile)

    source, opt = make()
    step(source, opt)
    step(source, opt)
    path = tf.train.Checkpoint(model=source, optimizer=opt).save(str(tmp_path / "c"))
    module, opt = make()
    tf.train.Checkpoint(model=module, optimizer=opt).restore(path)
    tf.function(lambda: step(module, opt))()  # creates `w`, restores, steps
    reference, ref_opt = make()
    reference(x)
    tf.train.Checkpoint(model=reference, optimizer=ref_opt).restore(path).assert_consumed()
    tf.function(lambda: step(reference, ref_opt))()
    for name in ("m", "average"):
        np.testing.assert_array_equal(opt.get_slot(module.w, name).numpy(),
                                      ref_opt.get_slot(reference.w, name).numpy())
    np.testing.assert_array_equal(module.w.numpy(), reference.w.numpy())


def test_no_warning_when_state_is_restored(tmp_path, recwarn):
    path, _, _ = _train_one_and_save(tmp_path)
    model, opt = _model(seed=4), _optimizer(use_ema=False, learning_rate=0.01)
    tf.train.Checkpoint(model=model, optimizer=opt).restore(path)
    opt.build(model.trainable_variables)
    assert not [w for w in recwarn if "Lion" in str(w.message)]


def test_optimizer_only_checkpoint_warns_that_slots_are_dropped(tmp_path, recwarn):
    model, opt = _model(), _optimizer(use_ema=False, learning_rate=0.01)
    _train(model, opt, _batches(1))
    with pytest.warns(UserWarning, match="NOT saved.*model in the same"):
        tf.train.Checkpoint(optimizer=opt).save(str(tmp_path / "opt_only"))
    recwarn.clear()
    tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "both"))
    assert not [w for w in recwarn if "NOT saved" in str(w.message)]


def test_checkpoint_keys_are_slot_keys_not_list_positions(tmp_path):
    path, _, _ = _train_one_and_save(tmp_path)
    keys = [k for k, _ in tf.train.list_variables(path)]
    slot_keys = [k for k in keys if ".OPTIMIZER_SLOT/optimizer/m" in k]
    assert len(slot_keys) == 5  # embeddings, 2 kernels, 2 biases
    assert "model/emb/embeddings/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE" in keys
    assert not [k for k in keys if "optimizer/_variables/" in k and not k.endswith("/0/.ATTRIBUTES/VARIABLE_VALUE")]


def test_slot_shape_mismatch_names_variable_and_both_shapes(tmp_path):
    var = tf.Variable(tf.zeros([4, 2]), name="table")
    opt = tf_lion.Lion()
    opt.apply_gradients([(tf.ones([4, 2]), var)])
    path = tf.train.Checkpoint(v=var, optimizer=opt).save(str(tmp_path / "ckpt"))
    # Same checkpoint key, another shape: the variable is left out of this restore so
    # only the slot can fail (a variable's own mismatch raises TensorFlow's error).
    bigger = tf.Variable(tf.zeros([6, 2]), name="table")
    opt2 = tf_lion.Lion()
    opt2.build([bigger])
    with pytest.raises(ValueError, match=r"'table:0' has shape \[4, 2\].*variable has shape \[6, 2\]"):
        status = tf.train.Checkpoint(v=bigger, optimizer=opt2).restore(path)
    np.testing.assert_array_equal(opt2.get_slot(bigger, "m").numpy(), np.zeros([6, 2]))


def test_variable_shape_mismatch_is_an_error(tmp_path):
    path, _, _ = _train_one_and_save(tmp_path)
    tf_keras.utils.set_random_seed(0)
    model = Net()
    model.emb = tf_keras.layers.Embedding(VOCAB + 5, DIM)
    model(tf.zeros([1, 5], tf.int32))
    with pytest.raises(ValueError, match=r"embeddings.*\[30, 4\].*\[35, 4\]"):
        tf.train.Checkpoint(model=model, optimizer=_optimizer(use_ema=False)).restore(path)


def test_corrupted_checkpoint_raises_and_restores_nothing(tmp_path):
    path, _, _ = _train_one_and_save(tmp_path)
    data = [p for p in tmp_path.iterdir() if ".data-" in p.name][0]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated
    model, opt = _model(seed=4), _optimizer(use_ema=False, learning_rate=0.01)
    before = [v.numpy() for v in model.trainable_variables]
    # TensorFlow's own error (for a truncated data file its reader raises IndexError).
    with pytest.raises((tf.errors.DataLossError, tf.errors.OutOfRangeError, IndexError)):
        tf.train.Checkpoint(model=model, optimizer=opt).restore(path)
    for v, b in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(v.numpy(), b)


def _compiled(seed=0, **kwargs):
    model = _model(seed=seed)
    model.compile(optimizer=_optimizer(**kwargs), loss="mse")
    return model


def _fit_data():
    x = np.concatenate([b[0] for b in _batches(8)])
    y = np.concatenate([b[1] for b in _batches(8)])
    return x, y


def _fit_state(model):
    return _state(model, model.optimizer)


@pytest.mark.parametrize("fmt", ["tf", "weights.h5"])
def test_save_weights_load_weights_keep_optimizer_state(tmp_path, fmt):
    x, y = _fit_data()
    model = _compiled()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    path = str(tmp_path / ("w" if fmt == "tf" else "model.weights.h5"))
    model.save_weights(path)
    for build_first in (True, False):  # .weights.h5 before the build: the values wait for it
        restored = _compiled(seed=9)
        if build_first:
            restored.optimizer.build(restored.trainable_variables)
        restored.load_weights(path)
        if not build_first:
            assert int(restored.optimizer.iterations) == 4  # the step counter loads at once
            restored.optimizer.build(restored.trainable_variables)
        _assert_states_equal(_fit_state(model), _fit_state(restored))


def _fine_tuned(path_stem):
    """Trained with the embedding frozen, then unfrozen: the slots of `dense`
    and `out` are built a step before the embedding's."""
    x, y = _fit_data()
    model = _compiled()
    model.emb.trainable = False
    model.compile(optimizer=model.optimizer, loss="mse")
    model.fit(x[:32], y[:32], batch_size=16, verbose=0, shuffle=False)
    model.emb.trainable = True
    model.compile(optimizer=model.optimizer, loss="mse")
    model.fit(x[32:], y[32:], batch_size=16, verbose=0, shuffle=False)
    model.save(path_stem + ".keras")
    model.save_weights(path_stem + ".weights.h5")
    return model


def test_keras_files_put_each_momentum_on_its_own_variable_after_fine_tuning(tmp_path):
    model = _fine_tuned(str(tmp_path / "ft"))
    # fit's last build covered all variables: the state follows the model's order.
    assert ([v.name for v in model.optimizer._slots.ordered_owners("m")]
            == [v.name for v in model.trainable_variables])
    loaded = tf_keras.models.load_model(str(tmp_path / "ft.keras"))  # names kept
    _assert_states_equal(_fit_state(model), _fit_state(loaded))
    restored = _compiled(seed=9)  # other variable names: by position, in the model's order
    restored.load_weights(str(tmp_path / "ft.weights.h5"))
    restored.optimizer.build(restored.trainable_variables)
    _assert_states_equal(_fit_state(model), _fit_state(restored))


def test_keras_file_state_goes_by_name_when_the_order_differs(tmp_path):
    """Built in another order than the file's (a custom loop over a subset
    first): labels with the same variable names put every value in place."""
    model = _fine_tuned(str(tmp_path / "ft"))
    emb, rest = model.trainable_variables[:1], model.trainable_variables[1:]
    saved = _fit_state(model)
    opt = _optimizer()
    opt.build(rest)
    opt.build(rest + emb)  # covers all, but in another order than the file's
    assert opt._slots.ordered_owners("m") == rest + emb != model.trainable_variables
    model.optimizer = opt
    model.load_weights(str(tmp_path / "ft.weights.h5"))
    _assert_states_equal(saved, _fit_state(model))


def _h5_labels_removed(path):
    import h5py  # installed with TensorFlow
    with h5py.File(path, "r+") as f:
        del f["optimizer/vars/labels"]


def _optimizer_state(opt):
    return [v.numpy() for v in opt.variables]


@pytest.mark.parametrize("labels", [True, False])
def test_keras_file_that_does_not_fit_raises_and_loads_nothing(tmp_path, labels):
    """The optimizer's state is all loaded or (here) not at all."""
    x, y = _fit_data()
    source = _compiled(use_ema=False, gradient_accumulation_steps=2)
    source.fit(x[:48], y[:48], batch_size=16, verbose=0, shuffle=False)  # mid-window
    path = str(tmp_path / "acc.weights.h5")
    source.save_weights(path)
    if not labels:  # a file without labels (tf_lion before labels): by position only
        _h5_labels_removed(path)
    targets = [_compiled(seed=3, skip_nonfinite=True)]  # one variable more
    if labels:  # as many variables as the file, of other kinds: told apart by the labels
        targets.append(_compiled(seed=3))
    for target in targets:
        target.fit(x[:16], y[:16], batch_size=16, verbose=0)
        before = _optimizer_state(target.optimizer)
        match = (r"holds gradient accumulators: 5, which this optimizer does not keep "
                 r"\(use_ema=True, gradient_accumulation_steps=None"
                 if labels else "has 12 variables .*; the Keras file holds 11")
        with pytest.raises(ValueError, match=match + ".*Nothing was loaded into the optimizer"):
            target.load_weights(path)
        for a, b in zip(before, _optimizer_state(target.optimizer)):
            np.testing.assert_array_equal(a, b)


def test_keras_file_state_by_position_checks_every_shape(tmp_path):
    """Other variable names and another order: by position, and a shape that
    does not fit names the slot and the file's position and label."""
    _fine_tuned(str(tmp_path / "ft"))
    model = _compiled(seed=9)
    emb, rest = model.trainable_variables[:1], model.trainable_variables[1:]
    model.optimizer.build(rest + emb)
    before = _optimizer_state(model.optimizer)
    with pytest.raises(ValueError, match=r"'m:net_\d+/dense_\d+/kernel:0' has shape \(4, 3\), "
                                         r"but its value in the Keras file \(position 1 \('m:"
                                         r"net_\d+/embedding_\d+/embeddings:0'\)\) has shape "
                                         r"\(30, 4\)"):
        model.load_weights(str(tmp_path / "ft.weights.h5"))
    for a, b in zip(before, _optimizer_state(model.optimizer)):
        np.testing.assert_array_equal(a, b)


def test_keras_file_loaded_before_a_build_over_some_variables_is_dropped_with_a_warning(
        tmp_path):
    _fine_tuned(str(tmp_path / "ft"))
    restored = _compiled(seed=9)
    restored.load_weights(str(tmp_path / "ft.weights.h5"))
    with pytest.warns(UserWarning, match=r"this optimizer has step counter: 1, momenta: 1, "
                                         r"EMA averages: 1.*before the optimizer built its "
                                         r"slots.*dropped and this optimizer starts fresh. "
                                         r"To load it"):  # (no checkpoint state is kept)
        restored.optimizer.build(restored.trainable_variables[:1])
    restored.optimizer.build(restored.trainable_variables)
    assert int(restored.optimizer.iterations) == 0
    assert not np.any(restored.optimizer.get_slot(restored.trainable_variables[0], "m").numpy())


def test_keras_file_of_an_optimizer_that_never_stepped_loads(tmp_path, recwarn):
    untrained = _compiled()
    untrained.save(str(tmp_path / "untrained.keras"))
    loaded = tf_keras.models.load_model(str(tmp_path / "untrained.keras"))
    assert int(loaded.optimizer.iterations) == 0
    assert not [w for w in recwarn if "Lion" in str(w.message)]
    x, y = _fit_data()
    loaded.fit(x[:16], y[:16], batch_size=16, verbose=0)
    assert int(loaded.optimizer.iterations) == 1


def test_keras_file_for_a_subset_of_the_names_warns_and_ema_newly_on_loads_by_name(tmp_path):
    """Names are generated per process, so a file with slots for only some of
    the names (a frozen embedding) could be shifted: its slot values are
    dropped with a warning, not guessed. The same names with EMA newly on: by
    name, averages kept."""
    x, y = _fit_data()
    model = _compiled(use_ema=False)
    model.emb.trainable = False
    model.compile(optimizer=model.optimizer, loss="mse")
    model.fit(x[:32], y[:32], batch_size=16, verbose=0, shuffle=False)
    frozen = str(tmp_path / "frozen.weights.h5")
    model.save_weights(frozen)
    model.emb.trainable = True
    model.compile(optimizer=model.optimizer, loss="mse")
    model.fit(x[32:48], y[32:48], batch_size=16, verbose=0)  # now all variables step
    before = _optimizer_state(model.optimizer)
    with pytest.warns(UserWarning, match=r"holds slots for 4 of the 5 variable names this "
                                         r"optimizer has slots for \(none for \['net_\d+/"
                                         r"embedding.*the slot values are NOT loaded"):
        model.load_weights(frozen)
    after = _optimizer_state(model.optimizer)
    assert int(after[0]) == 2  # the step counter is the file's
    for a, b in zip(before[1:], after[1:]):  # the slots are as they were
        np.testing.assert_array_equal(a, b)

    everything = str(tmp_path / "all.weights.h5")
    model.save_weights(everything)
    saved = {label: v.numpy() for label, v in model.optimizer._labelled_variables()}
    model.optimizer = _optimizer(use_ema=True)
    model.optimizer.build(model.trainable_variables)
    averages = {label: v.numpy() for label, v in model.optimizer._labelled_variables()
                if label.startswith("average:")}
    with pytest.warns(UserWarning, match=r"holds no state for 5 of this optimizer's variables "
                                         r"\(EMA averages: 5"):
        model.load_weights(everything)
    loaded = {label: v.numpy() for label, v in model.optimizer._labelled_variables()}
    assert sorted(loaded) == sorted(list(saved) + list(averages))
    for label, value in list(saved.items()) + list(averages.items()):
        np.testing.assert_array_equal(loaded[label], value, err_msg=label)


def test_keras_state_waiting_for_build_is_saved_and_loses_to_a_later_checkpoint(tmp_path):
    model = _fine_tuned(str(tmp_path / "ft"))
    waiting = _compiled(seed=9)
    waiting.load_weights(str(tmp_path / "ft.weights.h5"))
    waiting.save_weights(str(tmp_path / "again.weights.h5"))  # the waiting values, as loaded
    again = _compiled(seed=10)
    again.load_weights(str(tmp_path / "again.weights.h5"))
    again.optimizer.build(again.trainable_variables)
    _assert_states_equal(_fit_state(model), _fit_state(again))

    x, y = _fit_data()
    model.fit(x[:16], y[:16], batch_size=16, verbose=0)  # a newer state, in a checkpoint
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path / "ckpt"))
    tf.train.Checkpoint(model=waiting, optimizer=waiting.optimizer).restore(path)
    # A Keras file saved now holds the checkpoint's step counter, which has won
    # (the slots the restore made join at the build), not the waiting values.
    waiting.save_weights(str(tmp_path / "after.weights.h5"))
    after = _compiled(seed=11)
    after.load_weights(str(tmp_path / "after.weights.h5"))
    assert int(after.optimizer.iterations) == int(model.optimizer.iterations) != 4
    with pytest.warns(UserWarning, match="the checkpoint's state is kept"):
        waiting.optimizer.build(waiting.trainable_variables)
    _assert_states_equal(_fit_state(model), _fit_state(waiting))


def test_keras_file_with_skip_mismatch_before_build_trains_fresh(tmp_path):
    """`load_weights(skip_mismatch=True)` into a changed model: Keras skips the
    layers that do not fit; the waiting optimizer state does not fit either
    and is dropped with a warning at the first step, which then trains."""
    x, y = _fit_data()
    source = _compiled()
    source.fit(x[:32], y[:32], batch_size=16, verbose=0)
    path = str(tmp_path / "w.weights.h5")
    source.save_weights(path)
    tf_keras.utils.set_random_seed(1)
    changed = Net()
    changed.dense = tf_keras.layers.Dense(5)  # another shape
    changed(tf.zeros([1, 5], tf.int32))
    changed.compile(optimizer=_optimizer(), loss="mse")
    with pytest.warns(UserWarning, match="Could not load weights"):  # Keras skips 2 layers
        changed.load_weights(path, skip_mismatch=True)
    with pytest.warns(UserWarning, match="shape.*starts fresh"):
        changed.fit(x[:16], y[:16], batch_size=16, verbose=0)
    assert int(changed.optimizer.iterations) == 1


@pytest.mark.parametrize("kind", ["mirrored", "central_storage"])
def test_keras_state_waiting_for_build_reaches_every_replica(tmp_path, kind):
    """The first step's build runs in a replica's context: every local copy
    of a mirrored slot and step counter must get the file's values, and a
    central-storage variable (which refuses assignments there) its value."""
    devices = ["/cpu:0", "/cpu:1"]
    strategy = (tf.distribute.MirroredStrategy(devices) if kind == "mirrored" else
                tf.distribute.experimental.CentralStorageStrategy(devices))
    x, y = _fit_data()
    with strategy.scope():
        source = _compiled(use_ema=False)
    source.fit(x[:32], y[:32], batch_size=16, verbose=0, shuffle=False)
    path = str(tmp_path / "mirrored.weights.h5")
    source.save_weights(path)
    with strategy.scope():
        model = _compiled(seed=9, use_ema=False)
    model.load_weights(path)  # before the first step: the slot values wait
    assert int(model.optimizer.iterations.numpy()) == 2  # the counters at once
    model.fit(x[32:48], y[32:48], batch_size=16, verbose=0, shuffle=False)
    source.fit(x[32:48], y[32:48], batch_size=16, verbose=0, shuffle=False)
    if kind == "mirrored":
        for v in model.optimizer.variables + model.trainable_variables:
            copies = [c.numpy() for c in v.values]
            for c in copies[1:]:
                np.testing.assert_array_equal(copies[0], c, err_msg=v.name)
    _assert_states_equal(_fit_state(source), _fit_state(model))


def test_a_rejected_keras_file_keeps_the_values_waiting_from_an_earlier_one(tmp_path):
    model = _fine_tuned(str(tmp_path / "ft"))  # use_ema=True
    other = _compiled(use_ema=False, gradient_accumulation_steps=2)
    other.fit(*[a[:16] for a in _fit_data()], batch_size=16, verbose=0)
    other.save_weights(str(tmp_path / "acc.weights.h5"))
    restored = _compiled(seed=9)
    restored.load_weights(str(tmp_path / "ft.weights.h5"))  # waits
    with pytest.raises(ValueError, match="does not keep"):
        restored.load_weights(str(tmp_path / "acc.weights.h5"))
    restored.optimizer.build(restored.trainable_variables)
    for a, b in zip(_optimizer_state(model.optimizer), _optimizer_state(restored.optimizer)):
        np.testing.assert_array_equal(a, b)  # (Keras loaded some layers of the other file)


def test_two_waiting_keras_files_that_do_not_fit_put_back_the_first_counters(tmp_path):
    _fine_tuned(str(tmp_path / "ft"))
    _fine_tuned(str(tmp_path / "ft2"))
    restored = _compiled(seed=9)
    restored.load_weights(str(tmp_path / "ft.weights.h5"))
    restored.load_weights(str(tmp_path / "ft2.weights.h5"))  # replaces the waiting values
    assert int(restored.optimizer.iterations) == 4
    with pytest.warns(UserWarning, match="starts fresh"):
        restored.optimizer.build(restored.trainable_variables[:1])
    assert int(restored.optimizer.iterations) == 0  # as before the first file


class _Var:
    def __init__(self, shape):
        self.shape = tf.TensorShape(shape)
        self.dtype = tf.float32


def test_match_keras_state_by_name_by_position_or_counters_only():
    match = tf_lion.slots.match_keras_state
    a, b, c, step = _Var([2]), _Var([3]), _Var([2]), _Var([])
    values = {"iterations": np.int64(5), "m:a": np.zeros(2), "m:b": np.ones(3), "m:c": np.full(2, 2.)}

    def assigned(labels, variables, saved):
        pairs, fresh = match("opt", labels, variables, saved, [values[k] for k in saved])
        return [(variables.index(v), float(np.sum(x))) for v, x in pairs], fresh

    # The same names in another order: by name.
    assert assigned(["iterations", "m:b", "m:a"], [step, b, a],
                    ["iterations", "m:a", "m:b"]) == ([(0, 5.0), (1, 3.0), (2, 0.0)], [])
    # Other names: by position (here shapes fit).
    assert assigned(["iterations", "m:x", "m:y"], [step, a, b],
                    ["iterations", "m:a", "m:b"]) == ([(0, 5.0), (1, 0.0), (2, 3.0)], [])
    # A file of an optimizer that never stepped, even into repeated names: the counter only.
    assert assigned(["iterations", "m:w", "m:w"], [step, a, c], ["iterations"]) == (
        [(0, 5.0)], ["m:w", "m:w"])
    # Slots for a subset of the names (shifted names look the same): not guessed.
    with pytest.raises(tf_lion.slots.PartialKerasState, match="2 of the 3 variable names"):
        assigned(["iterations", "m:a", "m:b", "m:c"], [step, a, b, c],
                 ["iterations", "m:b", "m:c"])
    # By position, every shape is checked.
    with pytest.raises(ValueError, match="'m:y' has shape \\(3,\\).*position 2"):
        assigned(["iterations", "m:x", "m:y"], [step, b, b], ["iterations", "m:b", "m:c"])


def test_waiting_keras_file_dropped_after_a_checkpoint_keeps_the_checkpoints_counter(tmp_path):
    model = _fine_tuned(str(tmp_path / "ft"))  # iterations 4
    x, y = _fit_data()
    model.fit(x[:64], y[:64], batch_size=16, verbose=0)  # iterations 8
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path / "ckpt"))
    restored = _compiled(seed=9)
    restored.load_weights(str(tmp_path / "ft.weights.h5"))  # waits
    # The optimizer alone (with the model, its slots would be made, and the
    # next file would load into them at once).
    tf.train.Checkpoint(optimizer=restored.optimizer).restore(path).expect_partial()
    assert int(restored.optimizer.iterations) == 8
    restored.load_weights(str(tmp_path / "ft.weights.h5"))  # waits again, after the restore
    assert int(restored.optimizer.iterations) == 4
    with pytest.warns(UserWarning, match="starts fresh"):
        restored.optimizer.build(restored.trainable_variables[:1])
    assert int(restored.optimizer.iterations) == 8  # the checkpoint's, from before this file


def test_set_weights_checks_count_and_shapes_by_position():
    """`set_weights` (the legacy `.h5` path) is positional, without labels."""
    v = tf.Variable(tf.ones([3]), name="v")
    opt = tf_lion.Lion(jit_compile=False)
    opt.build([v])
    opt.set_weights([np.int64(7), np.full(3, 0.5, np.float32)])
    assert int(opt.iterations) == 7
    np.testing.assert_array_equal(opt.get_slot(v, "m").numpy(), np.full(3, 0.5, np.float32))
    with pytest.raises(ValueError, match="has 2 variables, got 1 weights"):
        opt.set_weights([np.int64(1)])
    with pytest.raises(ValueError, match="has shape \\(3,\\), the weight has shape \\(2,\\)"):
        opt.set_weights([np.int64(1), np.zeros(2, np.float32)])
    assert int(opt.iterations) == 7  # nothing was assigned


def _bfloat16_momentum_model(seed=0):
    tf_keras.utils.set_random_seed(seed)
    model = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(4, name="a"),
                                 tf_keras.layers.Dense(2, name="b")])
    model.compile(optimizer=tf_lion.Lion(1e-2, momentum_dtype="bfloat16", jit_compile=False),
                  loss="mse")
    return model


def _bfloat16_momenta(model):
    return [model.optimizer.get_slot(v, "m") for v in model.trainable_variables]


@pytest.mark.parametrize("fmt", [".keras", ".h5", ".weights.h5", "weights.h5 before build"])
def test_keras_files_keep_a_bfloat16_momentum(tmp_path, fmt):
    """h5py has no bfloat16. tf_lion writes its bfloat16 state widened to
    float32 (exact); tf-keras's legacy `.h5` writes it itself, as opaque
    2-byte records, which loading reads back as bfloat16."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 3)).astype(np.float32), rng.standard_normal((16, 2))
    model = _bfloat16_momentum_model()
    model.fit(x, y.astype(np.float32), batch_size=8, epochs=2, verbose=0, shuffle=False)
    saved = [m.numpy() for m in _bfloat16_momenta(model)]
    assert all(m.dtype == tf.bfloat16.as_numpy_dtype and np.any(m) for m in saved)
    path = str(tmp_path / ("model" + (fmt if fmt.startswith(".") else ".weights.h5")))
    if "weights" in fmt:
        model.save_weights(path)
        loaded = _bfloat16_momentum_model(seed=5)
        if fmt == ".weights.h5":
            loaded.optimizer.build(loaded.trainable_variables)
        loaded.load_weights(path)
        loaded.optimizer.build(loaded.trainable_variables)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf-keras: .h5 is a legacy format
            model.save(path)
        loaded = tf_keras.models.load_model(path, custom_objects={"Lion": tf_lion.Lion})
    assert int(loaded.optimizer.iterations) == 4
    for before, after in zip(saved, _bfloat16_momenta(loaded)):
        assert after.dtype == tf.bfloat16
        np.testing.assert_array_equal(after.numpy(), before)


def test_keras_file_values_are_all_converted_before_any_is_assigned():
    """A value that does not convert to its slot's dtype names the slot and
    leaves every value as it was (the step counter comes first in the file)."""
    v = tf.Variable(tf.ones([3]), name="v")
    opt = tf_lion.Lion(jit_compile=False)
    opt.build([v])
    labels = np.array([b"iterations", b"m:" + v.name.encode()])
    with pytest.raises(ValueError, match=r"'m:v:0' \(position 1.*cannot be converted to float32"):
        opt.load_own_variables({"0": np.int64(5), "1": np.array(["a", "b", "c"]),
                                "labels": labels})
    with pytest.raises(ValueError, match="Optimizer variable 'm/v.*cannot be converted"):
        opt.set_weights([np.int64(5), np.array(["a", "b", "c"])])
    assert int(opt.iterations) == 0
    # bfloat16 as h5py stores it, 2-byte records: tf-keras's legacy .h5 (set_weights)
    # and Keras files of earlier tf_lion versions.
    bf16 = np.array([0.5, -1.5, 3.0], tf.bfloat16.as_numpy_dtype)
    opt.set_weights([np.int64(5), bf16.view("V2")])
    assert int(opt.iterations) == 5
    np.testing.assert_array_equal(opt.get_slot(v, "m").numpy(), [0.5, -1.5, 3.0])
    opt.load_own_variables({"0": np.int64(6), "1": (2 * bf16).view("V2"), "labels": labels})
    assert int(opt.iterations) == 6
    np.testing.assert_array_equal(opt.get_slot(v, "m").numpy(), [1.0, -3.0, 6.0])


def test_keras_file_without_optimizer_state_warns_and_changes_nothing(tmp_path):
    path = str(tmp_path / "model_only.weights.h5")
    _model().save_weights(path)  # not compiled: no optimizer in the file
    target = _compiled(seed=3)  # compiled, not trained (a trained one has loss metrics)
    with pytest.warns(UserWarning, match="holds no optimizer state"):
        target.load_weights(path)
    target.optimizer.build(target.trainable_variables)  # nothing was left pending
    assert not np.any(target.optimizer.get_slot(target.trainable_variables[0], "m").numpy())


def test_model_checkpoint_callback_keeps_optimizer_state(tmp_path):
    x, y = _fit_data()
    model = _compiled(use_ema=False)  # fit's final EMA overwrite happens after the last save
    path = str(tmp_path / "best.keras")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False,
              callbacks=[tf_keras.callbacks.ModelCheckpoint(path)])
    loaded = tf_keras.models.load_model(path)
    _assert_states_equal(_fit_state(model), _fit_state(loaded))


class _Interrupt(tf_keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("preempted")


def test_backup_and_restore_resumes_exactly(tmp_path):
    x, y = _fit_data()
    reference = _compiled()
    reference.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False)

    backup = str(tmp_path / "backup")
    model = _compiled()
    with pytest.raises(RuntimeError, match="preempted"):
        model.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False,
                  callbacks=[tf_keras.callbacks.BackupAndRestore(backup), _Interrupt()])
    resumed = _compiled(seed=5)
    resumed.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False,
                callbacks=[tf_keras.callbacks.BackupAndRestore(backup)])
    _assert_states_equal(_fit_state(reference), _fit_state(resumed))


def _mirrored_step(strategy, model, opt):
    @tf.function
    def step(x, y):
        def replica(x, y):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum((model(x) - y) ** 2) / 8.0  # / global batch
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
        strategy.run(replica, args=(x, y))

    def run(batches):
        for x, y in batches:
            halves = strategy.experimental_distribute_values_from_function(
                lambda ctx: (x[4 * ctx.replica_id_in_sync_group:][:4],
                             y[4 * ctx.replica_id_in_sync_group:][:4]))
            step(*halves)
    return run


def _build(strategy, seed, sparse_mode):
    with strategy.scope():
        model = _model(seed=seed)
        opt = _optimizer(sparse_mode=sparse_mode, jit_compile=True)
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return model, opt, _mirrored_step(strategy, model, opt)
    return model, opt, lambda batches: _train(model, opt, batches)


def _assign_state(model, opt, state):
    opt.build(model.trainable_variables)
    for name, v in _named(model).items():
        v.assign(state[name])
        for slot in opt.get_slot_names():
            opt.get_slot(v, slot).assign(state[f"{name}/{slot}"])
    opt.iterations.assign(state["iterations"])


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
@pytest.mark.parametrize("direction", ["mirrored_to_single", "single_to_mirrored"])
def test_restore_across_strategies(tmp_path, direction, sparse_mode):
    """Save with one replica count, restore with another: the state arrives bitwise, and
    continuing equals continuing from the same state moved across without a checkpoint."""
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.get_strategy()
    source, target = (mirrored, single) if direction == "mirrored_to_single" else (single, mirrored)
    batches = _batches(5)

    model, opt, run = _build(source, 0, sparse_mode)
    run(batches[:3])
    saved = _state(model, opt)
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "ckpt"))
    if isinstance(opt.get_slot(model.emb.embeddings, "m"), tf.distribute.DistributedValues):
        assert direction == "mirrored_to_single"

    restored_model, restored_opt, restored_run = _build(target, 11, sparse_mode)
    tf.train.Checkpoint(model=restored_model, optimizer=restored_opt).restore(path)
    restored_opt.build(restored_model.trainable_variables)
    _assert_states_equal(saved, _state(restored_model, restored_opt))
    if direction == "single_to_mirrored":  # every replica got the value
        m = restored_opt.get_slot(restored_model.emb.embeddings, "m")
        for component in m.values:
            np.testing.assert_array_equal(component.numpy(), saved["emb/embeddings:0/m"])
    restored_run(batches[3:])

    moved_model, moved_opt, moved_run = _build(target, 12, sparse_mode)
    _assign_state(moved_model, moved_opt, saved)
    moved_run(batches[3:])
    _assert_states_equal(_state(moved_model, moved_opt), _state(restored_model, restored_opt))


_CRASH_SCRIPT = r"""
import sys, numpy as np, tensorflow as tf
sys.path.insert(0, sys.argv[2])
import tf_lion
var = tf.Variable(tf.random.stateless_normal([3000, 10000], seed=[1, 2]))  # 120 MB
opt = tf_lion.Lion()
ckpt = tf.train.Checkpoint(var=var, optimizer=opt)
manager = tf.train.CheckpointManager(ckpt, sys.argv[1], max_to_keep=3)
opt.apply_gradients([(tf.ones_like(var), var)])
manager.save()
print("saved-1", float(var[0, 0]), flush=True)
opt.apply_gradients([(tf.ones_like(var), var)])
print("saving-2", flush=True)
manager.save()
print("saved-2", flush=True)
"""


def test_killed_during_save_leaves_previous_checkpoint_restorable(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ckpt_dir = tmp_path / "ckpts"
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_SCRIPT, str(ckpt_dir), root],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first_value = None
        deadline = time.time() + 120
        for line in proc.stdout:
            if line.startswith("saved-1"):
                first_value = float(line.split()[1])
            if line.startswith("saving-2"):
                time.sleep(0.05)
                proc.send_signal(signal.SIGKILL)
                break
            assert time.time() < deadline
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    assert latest is not None and latest.endswith("ckpt-1"), latest  # the save was cut short
    var = tf.Variable(tf.zeros([3000, 10000]))
    opt = tf_lion.Lion()
    tf.train.Checkpoint(var=var, optimizer=opt).restore(latest).assert_existing_objects_matched()
    opt.build([var])
    assert float(var[0, 0]) == first_value
    assert int(opt.iterations) == 1
    np.testing.assert_array_equal(opt.get_slot(var, "m").numpy()[:2, :3], np.full([2, 3], np.float32(1) - np.float32(0.99)))


def _sparse_rows(row, rows=6):
    return tf.IndexedSlices(tf.ones((1, 2)), tf.constant([row]), tf.constant([rows, 2]))


def _lazy_or_exact(mode, rows=6):
    var = tf.Variable(tf.ones((rows, 2)), name="table")
    return var, tf_lion.Lion(learning_rate=0.1, gradient_accumulation_steps=2, sparse_mode=mode,
                             jit_compile=False)


@pytest.mark.parametrize("build_first", [False, True])
def test_exact_checkpoint_mid_window_resumes_in_lazy_mode_without_losing_rows(
        tmp_path, build_first):
    """An exact-mode checkpoint has no row mask: the rows its accumulator holds
    are marked, so the applying call applies them (they were zeroed unapplied)."""
    var, opt = _lazy_or_exact("exact")
    opt.apply_gradients([(_sparse_rows(3), var)])  # call 1 of the window
    path = tf.train.Checkpoint(v=var, opt=opt).save(str(tmp_path / "c"))

    expected_var, expected_opt = _lazy_or_exact("lazy")
    for row in (3, 5):
        expected_opt.apply_gradients([(_sparse_rows(row), expected_var)])

    resumed_var, resumed_opt = _lazy_or_exact("lazy")
    if build_first:  # slots exist before the restore: the accumulator is restored into them
        resumed_opt.build([resumed_var])
        tf.train.Checkpoint(v=resumed_var, opt=resumed_opt).restore(path)
    else:  # restored into slots created at the first step, with a warning
        tf.train.Checkpoint(v=resumed_var, opt=resumed_opt).restore(path)
        with pytest.warns(UserWarning, match="row mask .* non-zero rows"):
            resumed_opt.build([resumed_var])
    np.testing.assert_array_equal(resumed_opt.get_slot(resumed_var, "touched").numpy(),
                                  [0, 0, 0, 1, 0, 0])
    resumed_opt.apply_gradients([(_sparse_rows(5), resumed_var)])  # applies the window
    np.testing.assert_array_equal(resumed_var.numpy(), expected_var.numpy())
    assert resumed_var.numpy()[3, 0] != 1.0  # row 3 moved


def test_lazy_checkpoint_mid_window_resumes_in_exact_mode_and_says_nothing_is_lost(tmp_path):
    var, opt = _lazy_or_exact("lazy")
    opt.apply_gradients([(_sparse_rows(3), var)])
    path = tf.train.Checkpoint(v=var, opt=opt).save(str(tmp_path / "c"))
    resumed, exact = _lazy_or_exact("exact")
    with pytest.warns(UserWarning, match="'touched'.*nothing is lost"):
        tf.train.Checkpoint(v=resumed, opt=exact).restore(path)
        exact.build([resumed])
    np.testing.assert_array_equal(exact.get_slot(resumed, "accumulator").numpy()[3], [1, 1])


def test_exact_checkpoint_restored_over_marked_rows_replaces_the_row_mask(tmp_path):
    """Rows marked before the restore (an earlier restore, or this process's
    own window) are not the checkpoint's: they must not move at its applying call."""
    var, opt = _lazy_or_exact("exact")
    for row in (3, 5):  # a window: both rows get momentum
        opt.apply_gradients([(_sparse_rows(row), var)])
    opt.apply_gradients([(_sparse_rows(3), var)])  # call 1 of the next window: row 3
    a = tf.train.Checkpoint(v=var, opt=opt).save(str(tmp_path / "a"))
    var, opt = _lazy_or_exact("exact")
    for row in (3, 5):
        opt.apply_gradients([(_sparse_rows(row), var)])
    opt.apply_gradients([(_sparse_rows(5), var)])  # the next window began with row 5
    b = tf.train.Checkpoint(v=var, opt=opt).save(str(tmp_path / "b"))

    resumed_var, resumed = _lazy_or_exact("lazy")
    resumed.build([resumed_var])
    tf.train.Checkpoint(v=resumed_var, opt=resumed).restore(a)
    tf.train.Checkpoint(v=resumed_var, opt=resumed).restore(b)
    np.testing.assert_array_equal(resumed.get_slot(resumed_var, "touched").numpy(),
                                  [0, 0, 0, 0, 0, 1])
    before = resumed_var.numpy()[3].copy()
    resumed.apply_gradients([(_sparse_rows(5), resumed_var)])  # applies b's window
    np.testing.assert_array_equal(resumed_var.numpy()[3], before)  # row 3: not in the window


@pytest.mark.parametrize("build_first", [True, False])
def test_lazy_then_exact_checkpoint_restored_leaves_the_exact_rows_marked(tmp_path, build_first):
    """Two restores (a lazy checkpoint, then an exact one) before or after build:
    the accumulator is the exact one's, and so must the mask be."""
    var, opt = _lazy_or_exact("lazy")
    opt.apply_gradients([(_sparse_rows(3), var)])
    lazy = tf.train.Checkpoint(v=var, opt=opt).save(str(tmp_path / "lazy"))
    var, opt = _lazy_or_exact("exact")
    opt.apply_gradients([(_sparse_rows(5), var)])
    exact = tf.train.Checkpoint(v=var, opt=opt).save(str(tmp_path / "exact"))

    resumed_var, resumed = _lazy_or_exact("lazy")
    if build_first:
        resumed.build([resumed_var])
    tf.train.Checkpoint(v=resumed_var, opt=resumed).restore(lazy)
    tf.train.Checkpoint(v=resumed_var, opt=resumed).restore(exact)
    resumed.build([resumed_var])
    np.testing.assert_array_equal(resumed.get_slot(resumed_var, "touched").numpy(),
                                  [0, 0, 0, 0, 0, 1])
    resumed.apply_gradients([(_sparse_rows(0), resumed_var)])  # the applying call
    np.testing.assert_array_equal(resumed_var.numpy()[:, 0] < 1, [1, 0, 0, 0, 0, 1])


def test_lazy_checkpoint_keeps_its_own_row_mask(tmp_path):
    """A row whose gradients cancel has a zero accumulator but is in the mask:
    restoring a lazy checkpoint must keep the saved mask, not rebuild it."""
    var, opt = _lazy_or_exact("lazy")
    opt.apply_gradients([(_sparse_rows(3), var)])
    opt.apply_gradients([(tf.IndexedSlices(-tf.ones((1, 2)), tf.constant([3]),
                                           tf.constant([6, 2])), var)])  # cancels: applies
    opt.apply_gradients([(tf.IndexedSlices(tf.constant([[1.0, 1.0], [-1.0, -1.0]]),
                                           tf.constant([4, 4]), tf.constant([6, 2])), var)])
    np.testing.assert_array_equal(opt.get_slot(var, "accumulator").numpy()[4], [0, 0])
    path = tf.train.Checkpoint(v=var, opt=opt).save(str(tmp_path / "c"))
    for build_first in (True, False):
        resumed_var, resumed = _lazy_or_exact("lazy")
        if build_first:
            resumed.build([resumed_var])
        tf.train.Checkpoint(v=resumed_var, opt=resumed).restore(path)
        resumed.build([resumed_var])
        np.testing.assert_array_equal(resumed.get_slot(resumed_var, "touched").numpy(),
                                      [0, 0, 0, 0, 1, 0])


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_exact_keras_file_mid_window_loads_into_lazy_mode_without_losing_rows(tmp_path, suffix):
    def model(mode):
        tf_keras.utils.set_random_seed(0)
        inputs = tf_keras.Input(shape=(1,), dtype="int32")
        outputs = tf_keras.layers.Embedding(6, 2, embeddings_initializer="ones",
                                            name="emb")(inputs)  # the same names: matched
        m = tf_keras.Model(inputs, outputs)
        m.compile(tf_lion.Lion(0.1, gradient_accumulation_steps=2, sparse_mode=mode,
                               jit_compile=False), "mse")
        return m

    def call(m, row):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_sum(m(tf.constant([[row]])))
        grads = tape.gradient(loss, m.trainable_variables)
        m.optimizer.apply_gradients(zip(grads, m.trainable_variables))

    saved = model("exact")
    call(saved, 3)  # call 1 of the window
    path = str(tmp_path / f"m{suffix}")
    saved.save(path) if suffix == ".keras" else saved.save_weights(path)
    expected = model("lazy")
    call(expected, 3)
    call(expected, 5)

    resumed = model("lazy")
    resumed.load_weights(path)  # before the slots exist: they wait for build
    with pytest.warns(UserWarning, match="holds no state"):
        resumed.optimizer.build(resumed.trainable_variables)
    table = resumed.trainable_variables[0]
    np.testing.assert_array_equal(resumed.optimizer.get_slot(table, "touched").numpy(),
                                  [0, 0, 0, 1, 0, 0])
    call(resumed, 5)  # the applying call
    np.testing.assert_array_equal(resumed.get_weights()[0], expected.get_weights()[0])


@pytest.mark.parametrize("build_first", [False, True])
def test_exact_checkpoint_mid_window_resumes_lazy_on_partitioned_variables(tmp_path, build_first):
    from tensorflow.python.distribute import sharded_variable

    def make(mode):
        shards = [tf.Variable(tf.ones((3, 2)), name="table/part_0"),
                  tf.Variable(tf.ones((3, 2)), name="table/part_1")]
        return shards, sharded_variable.ShardedVariable(shards), tf_lion.Lion(
            0.1, gradient_accumulation_steps=2, sparse_mode=mode, jit_compile=False)

    def rows(row):
        return tf.IndexedSlices(tf.ones((1, 2)), tf.constant([row]), tf.constant([3, 2]))

    shards, table, opt = make("exact")
    opt.apply_gradients([(rows(1), shards[0]), (rows(1), shards[1])])
    path = tf.train.Checkpoint(t=table, opt=opt).write(str(tmp_path / "s"))
    shards, table, opt = make("lazy")
    if build_first:
        opt.build(shards)
    tf.train.Checkpoint(t=table, opt=opt).restore(path)
    opt.build(shards)
    for shard in shards:
        np.testing.assert_array_equal(opt.get_slot(shard, "touched").numpy(), [0, 1, 0])
    opt.apply_gradients([(rows(2), shards[0]), (rows(2), shards[1])])  # the applying call
    for shard in shards:
        np.testing.assert_allclose(shard.numpy()[1], [0.9, 0.9], rtol=1e-6)


def test_keras_file_without_accumulators_keeps_the_row_mask(tmp_path):
    """A file from an optimizer that did not accumulate: the accumulators and row
    masks keep their values, as the warning says (a cancelled row stays marked)."""
    def model(**kwargs):
        inputs = tf_keras.Input(shape=(2,), dtype="int32")
        outputs = tf_keras.layers.Embedding(6, 2, embeddings_initializer="ones",
                                            name="emb")(inputs)
        m = tf_keras.Model(inputs, outputs)
        m.compile(tf_lion.Lion(0.1, jit_compile=False, **kwargs), "mse")
        return m

    source = model()
    source.optimizer.build(source.trainable_variables)
    source.save_weights(str(tmp_path / "plain.weights.h5"))
    target = model(gradient_accumulation_steps=2, sparse_mode="lazy")
    table = target.trainable_variables[0]
    cancelling = tf.IndexedSlices(tf.constant([[1.0, 1.0], [-1.0, -1.0]]), tf.constant([4, 4]),
                                  tf.constant([6, 2]))
    target.optimizer.apply_gradients([(cancelling, table)])
    with pytest.warns(UserWarning, match="keep their values"):
        target.load_weights(str(tmp_path / "plain.weights.h5"))
    np.testing.assert_array_equal(target.optimizer.get_slot(table, "touched").numpy(),
                                  [0, 0, 0, 0, 1, 0])
