"""The training API as a user reaches it: methods of the Model returned by
``fastseq.from_keras`` and the ``fastseq train-tagger`` command."""
import subprocess
import sys

import keras
import numpy as np
import pytest

import fastseq
from fastseq import training


def _tagger(dropout=0.0):
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(50, 8, mask_zero=True),
        keras.layers.Bidirectional(keras.layers.LSTM(6, return_sequences=True,
                                                     dropout=dropout)),
        keras.layers.Dense(5, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss="sparse_categorical_crossentropy")
    return model


def _data(rng, B=8, T=7):
    ids = rng.integers(1, 50, size=(B, T))
    ids[::2, 5:] = 0
    tags = (ids % 5).astype(np.int32)
    return ids, tags


def test_model_methods_delegate_to_training():
    rng = np.random.default_rng(0)
    km = _tagger()
    fm = fastseq.from_keras(km)
    ids, tags = _data(rng)
    loss, grads = fm.loss_and_gradients(ids, tags)
    loss2, grads2 = training.loss_and_gradients(fm, ids, tags)
    assert loss == loss2 and all(np.array_equal(a, b) for a, b in zip(grads, grads2))
    assert [g.shape for g in grads] == [tuple(w.shape) for w in km.trainable_weights]
    assert [w.shape for w in fm.get_weights()] == [g.shape for g in grads]
    fm.compile()                      # the Keras model's own settings by default
    hist = fm.fit(ids, tags, batch_size=4, epochs=4, verbose=0)
    assert hist["loss"][-1] < hist["loss"][0]
    fm.to_keras(km)                   # train in fastseq, serve in Keras
    np.testing.assert_allclose(km.predict(ids, verbose=0), fm.predict(ids), atol=1e-5)
    fm.set_weights([np.zeros_like(w) for w in fm.get_weights()])
    assert all(not w.any() for w in fm.trainable_weights)


def test_training_refuses_lstm_dropout():
    fm = fastseq.from_keras(_tagger(dropout=0.2))
    ids, tags = _data(np.random.default_rng(1))
    with pytest.raises(ValueError, match=r"dropout=0\.2.*not supported"):
        fm.loss_and_gradients(ids, tags)


def test_train_tagger_is_a_cli_subcommand():
    out = subprocess.run([sys.executable, "-m", "fastseq", "train-tagger", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--compare" in out.stdout and "--tag" in out.stdout
