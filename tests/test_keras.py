"""The Keras contract: configs, serialization, .keras files and model.fit."""

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
