"""Migrating checkpoints of other TensorFlow Lions into tf_lion.

Every source checkpoint is written here by the real writer: a small model
trained 3 steps with `tf_keras.optimizers.Lion` (state by list position) or
with a legacy OptimizerV2 Lion (slot `m`, the paper's TF2 layout).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_lion
from tf_lion import checkpoint as checkpoint_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR, BETA_1, BETA_2 = 1e-2, 0.9, 0.99


def dense_model(hidden=8, frozen_first=False, extra_layer=False):
    tf_keras.utils.set_random_seed(7)
    layers = [tf_keras.layers.Dense(hidden, activation="tanh", input_shape=(5,))]
    if extra_layer:
        layers.append(tf_keras.layers.Dense(hidden, activation="tanh"))
    layers.append(tf_keras.layers.Dense(3))
    model = tf_keras.Sequential(layers)
    model.layers[0].trainable = not frozen_first
    return model


def embedding_model():
    tf_keras.utils.set_random_seed(7)
    return tf_keras.Sequential([
        tf_keras.layers.Embedding(20, 4, input_length=6),
        tf_keras.layers.GlobalAveragePooling1D(),
        tf_keras.layers.Dense(3),
    ])


def dense_batch(step):
    rng = np.random.default_rng(100 + step)
    return (rng.normal(size=(16, 5)).astype(np.float32),
            rng.normal(size=(16, 3)).astype(np.float32))


def embedding_batch(step):
    rng = np.random.default_rng(200 + step)
    # Only ids < 12: rows 12..19 never get a gradient (their momentum stays 0).
    return (rng.integers(0, 12, size=(16, 6)), rng.normal(size=(16, 3)).astype(np.float32))


def train(model, optimizer, batch_fn, steps, first=0):
    for step in range(first, first + steps):
        x, y = batch_fn(step)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))


def write_tf_keras_checkpoint(directory, model_fn=dense_model, batch_fn=dense_batch, **kwargs):
    """Trains `model_fn()` 3 steps with tf-keras Lion and saves it; returns (path, model, opt)."""
    model = model_fn()
    optimizer = tf_keras.optimizers.Lion(learning_rate=LR, beta_1=BETA_1, beta_2=BETA_2, **kwargs)
    train(model, optimizer, batch_fn, 3)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(directory / "ckpt"))
    return path, model, optimizer


def tf_lion_opt(**kwargs):
    kwargs = {"learning_rate": LR, "beta_1": BETA_1, "beta_2": BETA_2, "jit_compile": False,
              **kwargs}
    return tf_lion.Lion(**kwargs)


def assert_bitwise(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.tobytes() == expected.tobytes()


def assert_momenta_match(opt, model, keras_opt):
    for j, variable in enumerate(model.trainable_variables):
        assert_bitwise(opt.get_slot(variable, "m").numpy(), keras_opt.momentums[j].numpy())


# --------------------------------------------------------------------------- #
# tf-keras Lion -> tf_lion
# --------------------------------------------------------------------------- #
def test_dense_model_restores_momenta_step_and_continues_bitwise(tmp_path):
    path, keras_model, keras_opt = write_tf_keras_checkpoint(tmp_path)
    model, opt = dense_model(), tf_lion_opt()
    state = checkpoint_lib.restore_from_tf_keras_lion(path, model, opt)

    assert [t.shape for t in state.momenta] == [(5, 8), (8,), (8, 3), (3,)]
    assert_momenta_match(opt, model, keras_opt)
    assert int(opt.iterations.numpy()) == int(keras_opt.iterations.numpy()) == 3
    for mine, theirs in zip(model.variables, keras_model.variables):
        assert_bitwise(mine.numpy(), theirs.numpy())
    # The momenta are not trivially equal to anything else the source saved.
    assert not np.array_equal(opt.get_slot(model.trainable_variables[0], "m").numpy(),
                              keras_model.trainable_variables[0].numpy())

    train(keras_model, keras_opt, dense_batch, 3, first=3)
    train(model, opt, dense_batch, 3, first=3)
    for mine, theirs in zip(model.trainable_variables, keras_model.trainable_variables):
        assert_bitwise(mine.numpy(), theirs.numpy())
    assert_momenta_match(opt, model, keras_opt)
    assert int(opt.iterations.numpy()) == 6


def test_directory_path_uses_latest_checkpoint(tmp_path):
    path, _, keras_opt = write_tf_keras_checkpoint(tmp_path)
    model, opt = dense_model(), tf_lion_opt()
    state = checkpoint_lib.restore_from_tf_keras_lion(str(tmp_path), model, opt)
    assert state.prefix == path
    assert_momenta_match(opt, model, keras_opt)


def test_embedding_model_sparse_momenta_restore(tmp_path):
    path, keras_model, keras_opt = write_tf_keras_checkpoint(
        tmp_path, embedding_model, embedding_batch)
    model, opt = embedding_model(), tf_lion_opt()
    checkpoint_lib.restore_from_tf_keras_lion(path, model, opt)

    table_m = opt.get_slot(model.trainable_variables[0], "m").numpy()
    assert table_m.shape == (20, 4)
    assert np.all(table_m[12:] == 0) and np.all(np.any(table_m[:12] != 0, axis=1))
    assert_momenta_match(opt, model, keras_opt)
    assert int(opt.iterations.numpy()) == 3
    for mine, theirs in zip(model.variables, keras_model.variables):
        assert_bitwise(mine.numpy(), theirs.numpy())


def test_ema_source_maps_momenta_through_momentums_edges(tmp_path):
    path, keras_model, keras_opt = write_tf_keras_checkpoint(tmp_path, use_ema=True)
    averages = keras_opt._model_variables_moving_average
    # The trap: with EMA, _variables/1..4 are the averages, the momenta are _variables/5..8.
    saved = {name for name, _ in tf.train.list_variables(path)}
    assert "optimizer/_variables/8/.ATTRIBUTES/VARIABLE_VALUE" in saved
    assert keras_opt._variables[1] is averages[0] and keras_opt._variables[5] is keras_opt.momentums[0]

    model, opt = dense_model(), tf_lion_opt(use_ema=True)
    state = checkpoint_lib.restore_from_tf_keras_lion(path, model, opt)
    assert state.momenta[0].key.startswith("optimizer/_variables/5/")
    assert_momenta_match(opt, model, keras_opt)
    for j, variable in enumerate(model.trainable_variables):
        assert_bitwise(opt.get_slot(variable, "average").numpy(), averages[j].numpy())
        assert not np.array_equal(opt.get_slot(variable, "m").numpy(), averages[j].numpy())

    train(keras_model, keras_opt, dense_batch, 3, first=3)
    train(model, opt, dense_batch, 3, first=3)
    for j, (mine, theirs) in enumerate(zip(model.trainable_variables,
                                           keras_model.trainable_variables)):
        assert_bitwise(mine.numpy(), theirs.numpy())
        # tf-keras rounds 1 - ema_momentum in float64 first: close, not bitwise.
        np.testing.assert_allclose(opt.get_slot(mine, "average").numpy(), averages[j].numpy(),
                                   rtol=1e-6, atol=1e-7)
    assert_momenta_match(opt, model, keras_opt)


def test_ema_source_into_optimizer_without_ema_warns_and_drops(tmp_path):
    path, _, keras_opt = write_tf_keras_checkpoint(tmp_path, use_ema=True)
    model, opt = dense_model(), tf_lion_opt()
    with pytest.warns(UserWarning, match="averages are dropped"):
        checkpoint_lib.restore_from_tf_keras_lion(path, model, opt)
    assert_momenta_match(opt, model, keras_opt)
    assert opt.get_slot_names() == ["m"]


def test_momentum_dtype_casts_on_restore(tmp_path):
    path, _, keras_opt = write_tf_keras_checkpoint(tmp_path)
    model, opt = dense_model(), tf_lion_opt(momentum_dtype="bfloat16")
    checkpoint_lib.restore_from_tf_keras_lion(path, model, opt)
    for j, variable in enumerate(model.trainable_variables):
        slot = opt.get_slot(variable, "m")
        assert slot.dtype == tf.bfloat16
        assert_bitwise(slot.numpy(), tf.cast(keras_opt.momentums[j], tf.bfloat16).numpy())


def test_shape_mismatch_names_the_variable_and_changes_nothing(tmp_path):
    path, _, _ = write_tf_keras_checkpoint(tmp_path)
    model, opt = dense_model(hidden=6), tf_lion_opt()
    before = [v.numpy() for v in model.variables]
    kernel = model.trainable_variables[0]
    with pytest.raises(ValueError, match=r"momentum 0 .*shape \[5, 8\].*"
                                         + f"'{kernel.name}', has shape \\[5, 6\\]"):
        checkpoint_lib.restore_from_tf_keras_lion(path, model, opt)
    for value, variable in zip(before, model.variables):
        assert_bitwise(variable.numpy(), value)
    assert int(opt.iterations.numpy()) == 0 and len(opt.variables) == 1  # not built


def test_count_mismatch_and_explicit_trainable_variables(tmp_path):
    # Written with the first layer frozen: 2 momenta, for the last layer's kernel and bias.
    path, keras_model, keras_opt = write_tf_keras_checkpoint(
        tmp_path, lambda: dense_model(frozen_first=True))
    model, opt = dense_model(), tf_lion_opt()
    with pytest.raises(ValueError, match="has 2 tf-keras Lion momenta but 4 trainable"):
        checkpoint_lib.restore_from_tf_keras_lion(path, model, opt)

    last = model.layers[-1].trainable_variables
    checkpoint_lib.restore_from_tf_keras_lion(path, model, opt, trainable_variables=last)
    for j, variable in enumerate(last):
        assert_bitwise(opt.get_slot(variable, "m").numpy(), keras_opt.momentums[j].numpy())
    assert int(opt.iterations.numpy()) == 3


def test_errors_for_checkpoints_without_tf_keras_lion_momenta(tmp_path):
    model = dense_model()
    adam = tf_keras.optimizers.Adam()
    train(model, adam, dense_batch, 1)
    adam_path = tf.train.Checkpoint(model=model, optimizer=adam).save(str(tmp_path / "adam/c"))
    with pytest.raises(ValueError, match="not a Lion"):
        checkpoint_lib.restore_from_tf_keras_lion(adam_path, dense_model(), tf_lion_opt())

    lion = tf_keras.optimizers.Lion()
    train(model, lion, dense_batch, 1)
    model_only = tf.train.Checkpoint(model=model).save(str(tmp_path / "model/c"))
    with pytest.raises(ValueError, match="no tf-keras Lion optimizer state"):
        checkpoint_lib.restore_from_tf_keras_lion(model_only, dense_model(), tf_lion_opt())

    net_path = tf.train.Checkpoint(net=model, optimizer=lion).save(str(tmp_path / "net/c"))
    with pytest.raises(ValueError, match="has no 'model' entry"):
        checkpoint_lib.restore_from_tf_keras_lion(net_path, dense_model(), tf_lion_opt())

    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        checkpoint_lib.restore_from_tf_keras_lion(str(tmp_path / "nothing"), model, tf_lion_opt())
    with pytest.raises(TypeError, match="tf_lion.Lion"):
        checkpoint_lib.restore_from_tf_keras_lion(adam_path, model, adam)


def test_written_source_and_compiled_models_restore(tmp_path):
    """A source written with `Checkpoint.write` (no save counter), and models
    compiled with the optimizers on both sides (the `fit` user): the model's
    optimizer is a child of the model in both checkpoints."""
    keras_model = dense_model()
    keras_opt = tf_keras.optimizers.Lion(learning_rate=LR, beta_1=BETA_1, beta_2=BETA_2)
    keras_model.compile(keras_opt, "mse")
    train(keras_model, keras_opt, dense_batch, 3)
    path = tf.train.Checkpoint(model=keras_model, optimizer=keras_opt).write(str(tmp_path / "w"))

    model, opt = dense_model(), tf_lion_opt(learning_rate=0.5 * LR)
    model.compile(opt, "mse")
    checkpoint_lib.restore_from_tf_keras_lion(path, model, opt)
    assert_momenta_match(opt, model, keras_opt)
    assert int(opt.iterations.numpy()) == 3
    assert float(opt.learning_rate.numpy()) == np.float32(0.5 * LR)  # its own, not the source's
    for mine, theirs in zip(model.variables, keras_model.variables):
        assert_bitwise(mine.numpy(), theirs.numpy())


def test_model_weights_missing_from_the_checkpoint_are_named(tmp_path):
    path, _, _ = write_tf_keras_checkpoint(tmp_path)
    model = dense_model()
    model.add(tf_keras.layers.Dense(2))  # its weights are not in the checkpoint
    opt = tf_lion_opt()
    variables = model.trainable_variables[:4]  # the source's, for the momenta
    before = [v.numpy() for v in model.variables]
    with pytest.raises(ValueError, match=r"2 of the model's 6 weights are not in it"):
        checkpoint_lib.restore_from_tf_keras_lion(path, model, opt,
                                                  trainable_variables=variables)
    for variable, value in zip(model.variables, before):  # the weights read are put back
        assert_bitwise(variable.numpy(), value)


@pytest.mark.parametrize("build_first", [True, False])
def test_plain_restore_of_tf_keras_lion_momenta_warns_that_they_are_dropped(tmp_path,
                                                                             build_first):
    path, keras_model, _ = write_tf_keras_checkpoint(tmp_path)
    model, opt = dense_model(), tf_lion_opt()
    if build_first:
        opt.build(model.trainable_variables)
    with pytest.warns(UserWarning, match="NOT restored.*restore_from_tf_keras_lion"):
        tf.train.Checkpoint(model=model, optimizer=opt).restore(path)
    if build_first:
        opt.build(model.trainable_variables)
    else:  # and the build says it again, as for any checkpoint without Lion state
        with pytest.warns(UserWarning, match="momentum starts at zero for 4 variable"):
            opt.build(model.trainable_variables)
    for mine, theirs in zip(model.variables, keras_model.variables):
        assert_bitwise(mine.numpy(), theirs.numpy())
    assert not np.any(opt.get_slot(model.trainable_variables[0], "m").numpy())


# --------------------------------------------------------------------------- #
# OptimizerV2 slot layout (legacy optimizers, the paper's TF2 Lion)
# --------------------------------------------------------------------------- #
class LegacyLion(tf_keras.optimizers.legacy.Optimizer):
    """A minimal OptimizerV2 Lion: slot "m", step counter "iter"."""

    def __init__(self, learning_rate=1e-4, beta_1=0.9, beta_2=0.99, name="LegacyLion", **kwargs):
        super().__init__(name, **kwargs)
        self._set_hyper("learning_rate", learning_rate)
        self._set_hyper("beta_1", beta_1)
        self._set_hyper("beta_2", beta_2)

    def _create_slots(self, var_list):
        for var in var_list:
            self.add_slot(var, "m")

    def _resource_apply_dense(self, grad, var, apply_state=None):
        lr, beta_1, beta_2 = (self._get_hyper(name, var.dtype)
                              for name in ("learning_rate", "beta_1", "beta_2"))
        m = self.get_slot(var, "m")
        c = beta_1 * m + (1.0 - beta_1) * grad
        return tf.group(var.assign_sub(lr * tf.sign(c)),
                        m.assign(beta_2 * m + (1.0 - beta_2) * grad))

    def get_config(self):
        config = super().get_config()
        config.update({name: self._serialize_hyperparameter(name)
                       for name in ("learning_rate", "beta_1", "beta_2")})
        return config


def write_legacy_checkpoint(directory):
    model = dense_model()
    optimizer = LegacyLion(learning_rate=LR, beta_1=BETA_1, beta_2=BETA_2)
    train(model, optimizer, dense_batch, 3)
    path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(str(directory / "ckpt"))
    return path, model, optimizer


def test_optimizer_v2_slot_layout_restores_through_the_slot_protocol(tmp_path):
    path, legacy_model, legacy_opt = write_legacy_checkpoint(tmp_path)
    assert ("model/layer_with_weights-0/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/"
            "VARIABLE_VALUE") in {name for name, _ in tf.train.list_variables(path)}

    model, opt = dense_model(), tf_lion_opt()
    tf.train.Checkpoint(model=model, optimizer=opt).restore(path).expect_partial()
    opt.build(model.trainable_variables)  # the deferred slot restorations land here
    for mine, theirs in zip(model.trainable_variables, legacy_model.trainable_variables):
        assert_bitwise(mine.numpy(), theirs.numpy())
        assert_bitwise(opt.get_slot(mine, "m").numpy(), legacy_opt.get_slot(theirs, "m").numpy())
    # OptimizerV2 saves its step as "optimizer/iter"; Lion restores it into `iterations`.
    assert int(opt.iterations.numpy()) == int(legacy_opt.iterations.numpy()) == 3

    train(legacy_model, legacy_opt, dense_batch, 3, first=3)
    train(model, opt, dense_batch, 3, first=3)
    for mine, theirs in zip(model.trainable_variables, legacy_model.trainable_variables):
        assert_bitwise(mine.numpy(), theirs.numpy())
        assert_bitwise(opt.get_slot(mine, "m").numpy(), legacy_opt.get_slot(theirs, "m").numpy())


def test_optimizer_v2_slot_layout_is_recognised_by_the_converter(tmp_path):
    path, _, _ = write_legacy_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="already in the OptimizerV2 slot layout"):
        checkpoint_lib.restore_from_tf_keras_lion(path, dense_model(), tf_lion_opt())


# --------------------------------------------------------------------------- #
# Conversion and the command line
# --------------------------------------------------------------------------- #
def run_cli(*args, pythonpath=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "tf_lion.convert_checkpoint", *map(str, args)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def restore_tf_lion_checkpoint(path, **kwargs):
    model, opt = dense_model(), tf_lion_opt(**kwargs)
    tf.train.Checkpoint(model=model, optimizer=opt).restore(path).expect_partial()
    opt.build(model.trainable_variables)  # deferred slot restorations land here
    return model, opt


def test_convert_writes_a_tf_lion_checkpoint(tmp_path):
    path, keras_model, keras_opt = write_tf_keras_checkpoint(tmp_path / "src", use_ema=True)
    written = checkpoint_lib.convert_tf_keras_lion_checkpoint(
        path, tmp_path / "dst" / "ckpt", dense_model(), tf_lion_opt(use_ema=True))
    names = {name for name, _ in tf.train.list_variables(written)}
    assert ("model/layer_with_weights-0/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/"
            "VARIABLE_VALUE") in names

    model, opt = restore_tf_lion_checkpoint(written, use_ema=True)
    for mine, theirs in zip(model.variables, keras_model.variables):
        assert_bitwise(mine.numpy(), theirs.numpy())
    assert_momenta_match(opt, model, keras_opt)
    for j, variable in enumerate(model.trainable_variables):
        assert_bitwise(opt.get_slot(variable, "average").numpy(),
                       keras_opt._model_variables_moving_average[j].numpy())
    assert int(opt.iterations.numpy()) == 3


def test_cli_help_and_usage_errors():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--model_fn", "--inspect", "--momentum_dtype", "MODULE:FUNCTION"):
        assert flag in result.stdout

    result = run_cli("some/ckpt", "out/ckpt")
    assert result.returncode == 2 and "--model_fn MODULE:FUNCTION is required" in result.stderr


def test_cli_inspect_lists_momenta(tmp_path):
    path, _, keras_opt = write_tf_keras_checkpoint(tmp_path, use_ema=True)
    result = run_cli(path, "--inspect")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "iterations:    3" in out and "ema:           yes (4 averages)" in out
    assert "momenta:       4" in out and "learning_rate: 0.01" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    assert [" ".join(row[1:-2]) for row in rows] == ["[5, 8]", "[8]", "[8, 3]", "[3]"]
    assert {row[-2] for row in rows} == {"float32"}
    assert rows[0][-1] == "optimizer/_variables/5/.ATTRIBUTES/VARIABLE_VALUE"

    result = run_cli(tmp_path / "missing", "--inspect")
    assert result.returncode == 1 and "error: No checkpoint at" in result.stderr


def write_model_module(directory, extra=""):
    """`mig_models.py` in `directory`: `build()` returns `dense_model()`'s architecture."""
    (directory / "mig_models.py").write_text(textwrap.dedent("""\
        import tf_keras

        def build():
            tf_keras.utils.set_random_seed(7)
            return tf_keras.Sequential([
                tf_keras.layers.Dense(8, activation="tanh", input_shape=(5,)),
                tf_keras.layers.Dense(3),
            ])
    """) + textwrap.dedent(extra))


def test_cli_converts_with_model_fn(tmp_path):
    path, _, keras_opt = write_tf_keras_checkpoint(tmp_path / "src")
    write_model_module(tmp_path, """
        def wrong():
            return tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(5,))])
    """)
    dst = tmp_path / "dst" / "ckpt"
    result = run_cli(path, dst, "--model_fn", "mig_models:build", pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"wrote {dst}: 4 momenta, iterations 3, learning_rate 0.01" in result.stdout

    model, opt = restore_tf_lion_checkpoint(str(dst), learning_rate=5e-4)
    assert_momenta_match(opt, model, keras_opt)
    assert int(opt.iterations.numpy()) == 3
    assert opt.learning_rate.numpy() == np.float32(LR)  # the source's, carried over

    result = run_cli(path, tmp_path / "other", "--model_fn", "mig_models:wrong",
                     pythonpath=tmp_path)
    assert result.returncode == 1
    assert "has 4 tf-keras Lion momenta but 2 trainable variables" in result.stderr
    result = run_cli(path, dst, "--model_fn", "mig_models:build", pythonpath=tmp_path)
    assert result.returncode == 1 and "already exists; pass --overwrite" in result.stderr


def test_cli_writes_no_learning_rate_when_the_source_has_none(tmp_path):
    """A source trained with a schedule saves no learning rate; the converted
    checkpoint then holds none either, and a restore keeps the optimizer's own."""
    model = dense_model()
    schedule = tf_keras.optimizers.schedules.ExponentialDecay(LR, 10, 0.5)
    keras_opt = tf_keras.optimizers.Lion(learning_rate=schedule)
    train(model, keras_opt, dense_batch, 3)
    path = tf.train.Checkpoint(model=model, optimizer=keras_opt).save(str(tmp_path / "src" / "c"))
    write_model_module(tmp_path)
    dst = tmp_path / "dst" / "ckpt"
    result = run_cli(path, dst, "--model_fn", "mig_models:build", pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "learning_rate none (the source has none" in result.stdout
    assert not [name for name, _ in tf.train.list_variables(str(dst)) if "learning_rate" in name]
    model, opt = restore_tf_lion_checkpoint(str(dst), learning_rate=3e-3)
    assert opt.learning_rate.numpy() == np.float32(3e-3)
    assert_momenta_match(opt, model, keras_opt)
