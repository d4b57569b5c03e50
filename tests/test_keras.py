"""The Keras contract: configs, serialization, .keras files and model.fit."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tf_lion


def test_get_config_from_config_round_trip():
    opt = tf_lion.Lion(learning_rate=3e-4, beta_1=0.8, beta_2=0.95, weight_decay=0.3,
                       sparse_mode="lazy", momentum_dtype="bfloat16", clipnorm=1.0,
                       use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=5,
                       jit_compile=False, name="MyLion")
    config = opt.get_config()
    assert config["learning_rate"] == pytest.approx(3e-4)
    assert config["sparse_mode"] == "lazy" and config["momentum_dtype"] == "bfloat16"
    assert config["jit_compile"] is False
    clone = tf_lion.Lion.from_config(config)
    assert clone.get_config() == config


def test_config_with_schedule_and_callables():
    schedule = tf_keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=100)
    opt = tf_lion.Lion(learning_rate=schedule, beta_1=lambda: 0.7, weight_decay=tf.Variable(0.2))
    config = opt.get_config()
    assert config["beta_1"] == pytest.approx(0.7) and config["weight_decay"] == pytest.approx(0.2)
    clone = tf_lion.Lion.from_config(config)
    assert isinstance(clone._learning_rate, tf_keras.optimizers.schedules.CosineDecay)
    assert clone._learning_rate.get_config() == schedule.get_config()


def test_weight_decay_exclusions_by_name_survive_config_and_keras_file(tmp_path):
    """`exclude_from_weight_decay(var_names=...)` is in the config, so a model
    resumed from a `.keras` file keeps excluding (tf-keras's optimizers lose it)."""
    opt = tf_lion.Lion(learning_rate=0.01, weight_decay=10.0)
    opt.exclude_from_weight_decay(var_names=["bias"])
    config = opt.get_config()
    assert config["exclude_from_weight_decay_names"] == ["bias"]
    assert tf_lion.Lion.from_config(config).get_config() == config
    assert tf_lion.Lion(**config).get_config() == config  # as for every tf-keras optimizer
    assert "exclude_from_weight_decay_names" not in tf_lion.Lion().get_config()

    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    y = np.random.default_rng(1).standard_normal((8, 1)).astype(np.float32)

    def train(resume):
        tf_keras.utils.set_random_seed(0)
        model = tf_keras.Sequential(
            [tf_keras.layers.Dense(1, input_shape=(4,), bias_initializer="ones")])
        lion = tf_lion.Lion(learning_rate=0.01, weight_decay=10.0, jit_compile=False)
        lion.exclude_from_weight_decay(var_names=["bias"])
        model.compile(optimizer=lion, loss="mse")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        if resume:
            model.save(tmp_path / "m.keras")
            model = tf_keras.models.load_model(tmp_path / "m.keras")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        return [w.numpy() for w in model.weights]

    for uninterrupted, resumed in zip(train(False), train(True)):
        np.testing.assert_array_equal(resumed, uninterrupted)


def test_learning_rate_scheduler_callback_reaches_the_traced_step():
    """`LearningRateScheduler` assigns `optimizer.lr` between epochs of one `fit`."""
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    y = np.random.default_rng(1).standard_normal((16, 1)).astype(np.float32)
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.layers.Dense(1, input_shape=(4,))])
    model.compile(optimizer=tf_lion.Lion(learning_rate=0.01), loss="mse")
    seen = []
    record = tf_keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append([w.numpy() for w in model.weights]))
    zero_after_two = tf_keras.callbacks.LearningRateScheduler(
        lambda epoch, lr: 0.01 if epoch < 2 else 0.0)
    model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=[zero_after_two, record])
    assert not np.array_equal(seen[0][0], seen[1][0])  # epoch 2 at 0.01 moved the kernel
    for epoch in (2, 3):  # epochs 3 and 4 at 0: nothing moves (no weight decay)
        for now, before in zip(seen[epoch], seen[1]):
            np.testing.assert_array_equal(now, before)
    assert float(model.optimizer.learning_rate) == 0.0


def test_serialize_deserialize():
    opt = tf_lion.Lion(learning_rate=2e-4, weight_decay=0.1, sparse_mode="lazy")
    restored = tf_keras.optimizers.deserialize(tf_keras.optimizers.serialize(opt))
    assert isinstance(restored, tf_lion.Lion)
    assert restored.get_config() == opt.get_config()
    by_name = tf_keras.optimizers.get(tf_keras.optimizers.serialize(opt))
    assert isinstance(by_name, tf_lion.Lion)


def _model(vocab=40, seed=0):
    tf_keras.utils.set_random_seed(seed)
    inputs = tf_keras.Input(shape=(6,), dtype="int32")
    x = tf_keras.layers.Embedding(vocab, 8)(inputs)
    x = tf_keras.layers.GlobalAveragePooling1D()(x)
    x = tf_keras.layers.Dense(16, activation="relu")(x)
    outputs = tf_keras.layers.Dense(1)(x)
    return tf_keras.Model(inputs, outputs)


def _data(n=256, vocab=40, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(n, 6)).astype(np.int32)
    weights = np.linspace(-1, 1, vocab).astype(np.float32)
    y = weights[x].mean(axis=1, keepdims=True) * 3
    return x, y


@pytest.mark.parametrize("sparse_mode", ["exact", "lazy"])
def test_fit_reduces_loss(sparse_mode):
    x, y = _data()
    model = _model()
    model.compile(optimizer=tf_lion.Lion(learning_rate=3e-3, weight_decay=0.01,
                                         sparse_mode=sparse_mode), loss="mse")
    history = model.fit(x, y, batch_size=32, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.3 * losses[0], losses
    # The embedding really received sparse gradients and its own momentum.
    emb = model.layers[1].embeddings
    assert np.any(model.optimizer.get_slot(emb, "m").numpy() != 0)


def test_keras_file_keeps_optimizer_state_and_resumes_identically(tmp_path):
    x, y = _data()
    model = _model()
    model.compile(optimizer=tf_lion.Lion(learning_rate=1e-3, weight_decay=0.05,
                                         sparse_mode="lazy"), loss="mse")
    model.fit(x[:128], y[:128], batch_size=32, epochs=1, verbose=0, shuffle=False)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = tf_keras.models.load_model(path)
    assert isinstance(loaded.optimizer, tf_lion.Lion)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations) == 4
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    model.fit(x[128:], y[128:], batch_size=32, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x[128:], y[128:], batch_size=32, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for v in model.trainable_variables:
        assert np.any(model.optimizer.get_slot(v, "m").numpy() != 0)


# --------------------------------------------------------------------------- #
# loss_scale_factor in fit and minimize
# --------------------------------------------------------------------------- #
def test_fit_with_loss_scale_factor_equals_fit_without():
    """`fit` calls `minimize`, which scales the loss under its tape (a power of
    two: scaling and unscaling are exact, so the weights are the same bits)."""
    x, y = _data()
    weights = []
    for factor in (None, 1024.0):
        model = _model()
        model.compile(optimizer=tf_lion.Lion(3e-3, weight_decay=0.01, clipvalue=0.01,
                                             loss_scale_factor=factor), loss="mse")
        model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
        weights.append([w.numpy() for w in model.weights])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("form", ["callable", "tape"])
def test_minimize_with_loss_scale_factor_equals_minimize_without(form):
    results = []
    for factor in (None, 1024.0):
        var = tf.Variable([1.0, -2.0, 0.5], dtype=tf.float16)
        opt = tf_lion.Lion(0.01, beta_1=0.0, loss_scale_factor=factor)
        # float16 gradients of 1e-5: divided by 1024 without scaling, they underflow to 0.
        loss = lambda: tf.reduce_sum(var * tf.constant([1e-5, -1e-5, 1e-5], tf.float16))  # noqa: E731
        if form == "callable":
            opt.minimize(loss, [var])
        else:
            with tf.GradientTape() as tape:
                value = loss()
            opt.minimize(value, [var], tape=tape)
        results.append(var.numpy())
    np.testing.assert_array_equal(results[1], results[0])
    np.testing.assert_array_equal(results[0], np.array([0.99, -1.99, 0.49], np.float16))


def test_minimize_with_loss_scale_factor_inside_the_tape_and_with_a_list_of_losses():
    for factor in (None, 1024.0):
        inside, listed = tf.Variable([1.0, -2.0]), tf.Variable([1.0, -2.0])
        opt = tf_lion.Lion(0.1, loss_scale_factor=factor)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(inside * [1.0, -1.0])
            opt.minimize(loss, [inside], tape=tape)  # in the tape's own block
        np.testing.assert_array_equal(inside.numpy(), np.float32([0.9, -1.9]))
        with tf.GradientTape() as tape:
            losses = [tf.reduce_sum(listed), tf.reduce_sum(-2.0 * listed)]  # gradients add up
        tf_lion.Lion(0.1, loss_scale_factor=factor).minimize(losses, [listed], tape=tape)
        np.testing.assert_array_equal(listed.numpy(), np.float32([1.1, -1.9]))


# --------------------------------------------------------------------------- #
# SavedModel
# --------------------------------------------------------------------------- #
def _trained_model(x, y, **optimizer_args):
    model = _model()
    model.compile(optimizer=tf_lion.Lion(1e-3, sparse_mode="lazy", **optimizer_args),
                  loss="mse")
    model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0, shuffle=False)
    return model


def test_saved_model_of_a_trained_model_loads_everywhere(tmp_path):
    """A SavedModel lists no slot variables for its loader (which would need
    `add_slot`); its checkpoint keeps them, keyed as in tf.train.Checkpoint."""
    x, y = _data()
    model = _trained_model(x, y, use_ema=True)
    expected = model(x[:4]).numpy()
    path = str(tmp_path / "saved")
    tf.saved_model.save(model, path)

    loaded = tf.saved_model.load(path)
    np.testing.assert_array_equal(loaded(x[:4]).numpy(), expected)
    assert isinstance(loaded.optimizer, tf_lion.keras_compat.RestoredLion)
    by_name = {(v.name, n): s.numpy() for v, n, s in loaded.optimizer.slots}
    assert len(by_name) == 2 * len(model.trainable_variables)
    for var in model.trainable_variables:
        for slot in ("m", "average"):
            np.testing.assert_array_equal(by_name[(var.name, slot)],
                                          model.optimizer.get_slot(var, slot).numpy())

    keras_path = str(tmp_path / "keras_saved")
    model.save(keras_path, save_format="tf")
    reloaded = tf_keras.models.load_model(keras_path)
    assert isinstance(reloaded.optimizer, tf_lion.Lion)
    np.testing.assert_array_equal(reloaded(x[:4]).numpy(), expected)

    # Where tf_lion is not installed (plain TensorFlow, a serving job).
    code = ("import sys, numpy as np, tensorflow as tf\n"
            f"m = tf.saved_model.load({path!r})\n"
            f"print(m(np.asarray({x[:4].tolist()!r}, np.int32)).numpy().tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    served = np.asarray(json.loads(out.stdout.strip().splitlines()[-1]), np.float32)
    np.testing.assert_array_equal(served, expected)

    # Training resumes from the SavedModel's checkpoint with the momenta keyed.
    fresh = _model(seed=5)
    fresh.compile(optimizer=tf_lion.Lion(1e-3, sparse_mode="lazy", use_ema=True), loss="mse")
    tf.train.Checkpoint(root=fresh).read(
        str(tmp_path / "saved" / "variables" / "variables")).expect_partial()
    fresh.optimizer.build(fresh.trainable_variables)
    for var, fresh_var in zip(model.trainable_variables, fresh.trainable_variables):
        np.testing.assert_array_equal(fresh_var.numpy(), var.numpy())
        np.testing.assert_array_equal(fresh.optimizer.get_slot(fresh_var, "m").numpy(),
                                      model.optimizer.get_slot(var, "m").numpy())
    assert int(fresh.optimizer.iterations) == 2

    # Saved again, the loaded object keeps its slots keyed to their variables.
    resaved = str(tmp_path / "resaved")
    tf.saved_model.save(loaded, resaved)
    again = _model(seed=6)
    again.compile(optimizer=tf_lion.Lion(1e-3, sparse_mode="lazy", use_ema=True), loss="mse")
    tf.train.Checkpoint(root=again).read(
        os.path.join(resaved, "variables", "variables")).expect_partial()
    again.optimizer.build(again.trainable_variables)
    for var, again_var in zip(model.trainable_variables, again.trainable_variables):
        np.testing.assert_array_equal(again.optimizer.get_slot(again_var, "m").numpy(),
                                      model.optimizer.get_slot(var, "m").numpy())
    assert isinstance(tf.saved_model.load(resaved).optimizer, tf_lion.keras_compat.RestoredLion)


def test_saved_model_with_loss_scale_optimizer_loads(tmp_path):
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x, y = _data()
        model = _model()
        model.compile(optimizer=tf_lion.Lion(1e-3), loss="mse")
        model.fit(x[:64], y[:64], batch_size=32, epochs=1, verbose=0)
        path = str(tmp_path / "saved")
        model.save(path, save_format="tf")
        loaded = tf.saved_model.load(path)
        assert isinstance(loaded.optimizer, tf_lion.keras_compat.RestoredLion)
        assert len(loaded.optimizer.slots) == len(model.trainable_variables)
        reloaded = tf_keras.models.load_model(path)
        np.testing.assert_array_equal(reloaded(x[:4]).numpy(), model(x[:4]).numpy())
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
