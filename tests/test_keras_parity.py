"""fastseq.from_keras(model).predict(x) equals model.predict(x) for every supported chain.

Every model gets seeded random weights (biases nonzero) and is compared in float32 to
``config.KERAS_PARITY_ATOL``; a float64 model to the float64 tolerance.  Unsupported
layers and graphs must fail with an error that names the layer and its class.
"""
import numpy as np
import pytest

import keras  # a test dependency: fail loudly if it is missing, never skip
from keras import layers as L

import fastseq
from fastseq import config
from fastseq.keras_import import NUMPY_ACTIVATIONS

ATOL = config.KERAS_PARITY_ATOL
B, T, D, H, V = 5, 7, 4, 6, 20
LENGTHS = [7, 3, 5, 1, 0]  # ragged, one row fully padded


def _randomize(model, seed=0):
    """Seeded uniform weights for every variable, so biases are nonzero too."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(-0.6, 0.6, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    return model


def _floats(seed=1, batch=B, steps=T):
    return np.random.default_rng(seed).standard_normal((batch, steps, D)).astype(np.float32)


def _padded_floats(left=False, pad=0.0):
    x = _floats()
    for i, n in enumerate(LENGTHS):
        if left:
            x[i, :T - n] = pad
        else:
            x[i, n:] = pad
    x[0, 2] = pad  # a masked step inside a sequence (Masking masks any all-pad step)
    return x


def _ids(left=False, seed=2, batch=B, steps=T, lengths=LENGTHS):
    ids = np.random.default_rng(seed).integers(1, V, size=(batch, steps))
    for i, n in enumerate(lengths[:batch]):
        if left:
            ids[i, :steps - n] = 0
        else:
            ids[i, n:] = 0
    return ids


def _seq(*layers, int_input=False):
    inp = keras.Input((None,), dtype="int32") if int_input else keras.Input((None, D))
    return _randomize(keras.Sequential([inp, *layers]))


def _tagger(mode="concat"):
    return [L.Bidirectional(L.LSTM(H, return_sequences=True), merge_mode=mode),
            L.TimeDistributed(L.Dense(3, activation="softmax"))]


def _functional_chain():
    inp = keras.Input((None,), dtype="int32")
    h = L.Embedding(V, D, mask_zero=True)(inp)
    h = L.Bidirectional(L.LSTM(H, return_sequences=True))(h)
    h = L.Dropout(0.3)(h)
    out = L.TimeDistributed(L.Dense(3, activation="softmax"))(h)
    return _randomize(keras.Model(inp, out)), _ids()


def _nested():
    inner = keras.Sequential([keras.Input((None, D)), L.LSTM(H, return_sequences=True),
                              L.Dense(3)])
    outer = keras.Sequential([keras.Input((None, D)), L.Masking(), inner,
                              L.Activation("softmax")])
    return _randomize(outer), _padded_floats()


CASES = {
    "lstm_last_output": lambda: (_seq(L.LSTM(H)), _floats()),
    "lstm_stacked_dense_softmax": lambda: (_seq(
        L.LSTM(H, return_sequences=True), L.LSTM(5, return_sequences=True), L.LSTM(H),
        L.Dense(3, activation="softmax")), _floats()),
    "lstm_options": lambda: (_seq(
        L.LSTM(H, return_sequences=True, activation="relu",
               recurrent_activation="hard_sigmoid", use_bias=False),
        L.LSTM(H, return_sequences=True, activation="softsign", recurrent_activation="tanh",
               dropout=0.3, recurrent_dropout=0.2),
        L.LSTM(H, activation="linear", recurrent_activation="sigmoid"),
        L.Dense(2, activation="sigmoid")), _floats()),
    **{f"bidirectional_{m}": (lambda m=m: (_seq(*_tagger(m)), _floats()))
       for m in ("concat", "sum", "mul", "ave")},
    "bidirectional_none_last": lambda: (_seq(
        L.LSTM(H, return_sequences=True),
        L.Bidirectional(L.LSTM(H, return_sequences=True), merge_mode=None)), _floats()),
    "bidirectional_last_output": lambda: (_seq(
        L.Bidirectional(L.LSTM(H)), L.Dense(3, activation="softmax")), _floats()),
    "bidirectional_backward_layer": lambda: (_seq(
        L.Masking(),
        L.Bidirectional(L.LSTM(H, return_sequences=True),
                        backward_layer=L.LSTM(H, return_sequences=True, go_backwards=True,
                                              activation="relu")),
        L.Dense(3)), _padded_floats()),
    "masking_right_padding_tagger": lambda: (_seq(
        L.Masking(), L.LSTM(H, return_sequences=True),
        L.TimeDistributed(L.Dense(3, activation="softmax"))), _padded_floats()),
    "masking_left_padding_bidirectional_last": lambda: (_seq(
        L.Masking(), L.Bidirectional(L.LSTM(H), merge_mode="ave"), L.Dense(2)),
        _padded_floats(left=True)),
    "masking_value_dense": lambda: (_seq(  # Masking outputs 0 at masked steps
        L.Masking(mask_value=-1.0), L.Dense(3, activation="softmax")),
        _padded_floats(pad=-1.0)),
    "embedding_right_padding_tagger": lambda: (_seq(
        L.Embedding(V, D, mask_zero=True), *_tagger(), int_input=True), _ids()),
    "embedding_left_padding_last_output": lambda: (_seq(
        L.Embedding(V, D, mask_zero=True), L.LSTM(H, return_sequences=True), L.LSTM(H),
        L.Dense(3, activation="softmax"), int_input=True), _ids(left=True)),
    "softmax_after_last_output": lambda: (_seq(  # the last-output LSTM drops the mask
        L.Embedding(V, D, mask_zero=True), L.LSTM(H), L.Dense(3), L.Softmax(),
        int_input=True), _ids()),
    "embedding_no_mask": lambda: (_seq(
        L.Embedding(V, D), L.LSTM(H), int_input=True), _ids()),
    "go_backwards_masked": lambda: (_seq(
        L.Masking(), L.LSTM(H, return_sequences=True, go_backwards=True),
        L.LSTM(H, return_sequences=True, go_backwards=True, zero_output_for_mask=True),
        L.LSTM(H, go_backwards=True), L.Dense(3)), _padded_floats()),
    "zero_output_for_mask": lambda: (_seq(
        L.Embedding(V, D, mask_zero=True),
        L.LSTM(H, return_sequences=True, zero_output_for_mask=True),
        L.LSTM(H, zero_output_for_mask=True), int_input=True), _ids()),
    "dense_3d_regularizers_activations": lambda: (_seq(
        L.Dense(5, activation="tanh"), L.Dropout(0.5), L.SpatialDropout1D(0.5),
        L.GaussianNoise(1.0), L.LSTM(H, return_sequences=True),
        L.Dense(4, activation="elu"),
        L.Activation("relu"), L.TimeDistributed(L.Dense(3)), L.Softmax()), _floats()),
    "dense_3d_masked": lambda: (_seq(
        L.Masking(), L.Dense(5, activation="relu"), L.GaussianDropout(0.2),
        L.LSTM(H, return_sequences=True), L.Dense(3, activation="log_softmax"),
        L.Activation("sigmoid")), _padded_floats()),
    "functional_chain": _functional_chain,
    "nested_model": _nested,
}


def _max_err(fast, ref):
    if isinstance(ref, (list, tuple)):  # Keras gives a tuple for Bidirectional(None)
        assert isinstance(fast, list) and len(fast) == len(ref)
        return max(_max_err(f, r) for f, r in zip(fast, ref))
    assert isinstance(fast, np.ndarray) and fast.shape == ref.shape, (
        getattr(fast, "shape", None), ref.shape)
    assert fast.dtype == ref.dtype, (fast.dtype, ref.dtype)
    assert np.all(np.isfinite(fast))
    return float(np.max(np.abs(fast.astype(np.float64) - ref)))


@pytest.mark.parametrize("case", list(CASES))
def test_predict_matches_keras(case):
    model, x = CASES[case]()
    expected = model.predict(x, verbose=0)
    got = fastseq.from_keras(model).predict(x)
    err = _max_err(got, expected)
    assert err <= ATOL, f"{case}: max abs error {err:.3e} > {ATOL:g}"


def test_other_sequence_lengths_and_batches():
    # Dense rather than TimeDistributed(Dense): Keras 3.15's masked TimeDistributed fails
    # when predict() sees a new sequence length.
    model = _seq(L.Embedding(V, D, mask_zero=True),
                 L.Bidirectional(L.LSTM(H, return_sequences=True)),
                 L.Dense(3, activation="softmax"), int_input=True)
    fast = fastseq.from_keras(model, device="cpu")
    for steps, lengths, batch_size in [(7, LENGTHS, None), (3, [3, 1, 2, 0, 3], 2),
                                       (11, [11, 4, 9, 1, 6], 3)]:
        x = _ids(steps=steps, lengths=lengths)
        err = _max_err(fast.predict(x, batch_size=batch_size), model.predict(x, verbose=0))
        assert err <= ATOL, f"T={steps}, batch_size={batch_size}: {err:.3e}"


def test_batch_size_list_output():
    model = _seq(L.Masking(), L.Bidirectional(L.LSTM(H, return_sequences=True),
                                              merge_mode=None))
    x = _padded_floats()
    whole = fastseq.from_keras(model).predict(x)
    parts = fastseq.from_keras(model).predict(x, batch_size=2)
    assert isinstance(parts, list) and len(parts) == 2
    assert _max_err(parts, whole) <= ATOL


def test_float64_model():
    f64 = dict(dtype="float64")
    model = _randomize(keras.Sequential([
        keras.Input((None, D), dtype="float64"), L.Masking(**f64),
        L.Bidirectional(L.LSTM(H, return_sequences=True, **f64), **f64),
        L.LSTM(H, **f64), L.Dense(3, activation="softmax", **f64)]))
    x = _padded_floats().astype(np.float64)
    expected = model.predict(x, verbose=0)
    got = fastseq.from_keras(model).predict(x)
    assert expected.dtype == np.float64
    assert _max_err(got, expected) <= config.tolerance(np.float64)[0]
    assert all(layer.dtype == np.float64 for layer in fastseq.from_keras(model).layers)


def test_softmax_layer_with_mask():
    # Keras applies a propagated [B, T] mask to Softmax by broadcasting it against the
    # [B, T, C] input from the right: it only works where B == T == C, and fails otherwise.
    model = _seq(L.Embedding(V, D, mask_zero=True), L.LSTM(H, return_sequences=True),
                 L.Dense(3), L.Softmax(name="probs"), int_input=True)
    x = _ids(batch=3, steps=3, lengths=[3, 1, 2])
    expected = model.predict(x, verbose=0)
    assert _max_err(fastseq.from_keras(model).predict(x), expected) <= ATOL
    x = _ids()
    with pytest.raises(Exception, match="broadcast"):  # a ValueError or a TF graph error
        model.predict(x, verbose=0)
    with pytest.raises(ValueError, match="Softmax layer 'probs'.*broadcast"):
        fastseq.from_keras(model).predict(x)


def test_device_is_passed_to_the_ops(monkeypatch):
    import fastseq.keras_import as ki
    seen = []

    def spy(op):
        def run(*args, device, **kwargs):
            seen.append((op.__name__, device))
            return op(*args, device="cpu", **kwargs)
        return run

    monkeypatch.setattr(ki, "lstm", spy(ki.lstm))
    monkeypatch.setattr(ki, "dense", spy(ki.dense))
    # no GPU here: skip the one-time weight upload, so the layers go through the ops
    monkeypatch.setattr(ki.Model, "_upload", lambda self: None)
    model, x = CASES["embedding_right_padding_tagger"]()
    fast = fastseq.from_keras(model, device="cuda")
    assert fast.device == "cuda"
    assert _max_err(fast.predict(x), model.predict(x, verbose=0)) <= ATOL
    assert seen == [("lstm", "cuda"), ("lstm", "cuda"), ("dense", "cuda")]


def test_layers_records_hold_weight_copies():
    model, x = CASES["embedding_right_padding_tagger"]()
    fast = fastseq.from_keras(model)
    assert [r.name for r in fast.layers] == [layer.name for layer in model.layers]
    emb, bi, td = fast.layers
    assert (emb.keras_class, bi.keras_class, td.keras_class) == (
        "Embedding", "Bidirectional(LSTM)", "TimeDistributed(Dense)")
    kw = model.get_weights()
    mine = [emb.embeddings, bi.forward_layer.kernel, bi.forward_layer.recurrent_kernel,
            bi.forward_layer.bias, bi.backward_layer.kernel,
            bi.backward_layer.recurrent_kernel, bi.backward_layer.bias, td.kernel, td.bias]
    assert len(kw) == len(mine)
    for a, k in zip(mine, kw):
        np.testing.assert_array_equal(a, k)
    before = fast.predict(x)
    _randomize(model, seed=5)  # the copies do not follow later changes to the Keras model
    np.testing.assert_array_equal(fast.predict(x), before)
    classes = fast.predict_classes(x)
    np.testing.assert_array_equal(classes, np.argmax(before, axis=-1))
    assert classes.shape == (B, T) and classes.dtype.kind == "i"


def test_numpy_activations_match_keras():
    x = np.concatenate([np.linspace(-12, 12, 97), [-80.0, 80.0, 0.0]]).astype(np.float32)
    x = x.reshape(4, 25)
    for name, fn in NUMPY_ACTIVATIONS.items():
        expected = keras.ops.convert_to_numpy(keras.activations.get(name)(x))
        got = np.asarray(fn(x))
        err = np.max(np.abs(got - expected) / np.maximum(1.0, np.abs(expected)))
        assert err <= 1e-6, f"{name}: {err:.3e}"


def _two_branches():
    inp = keras.Input((None, D))
    a = L.LSTM(H, name="branch_a")(inp)
    b = L.LSTM(H, name="branch_b")(inp)
    return keras.Model(inp, L.Concatenate(name="merge_ab")([a, b]))


def _dropout_in_training_mode():
    inp = keras.Input((None, D))
    h = L.Dropout(0.5, name="always_on")(inp, training=True)
    return keras.Model(inp, L.LSTM(H)(h))


def _bidirectional_none_inside():
    inp = keras.Input((None, D))
    both = L.Bidirectional(L.LSTM(H, return_sequences=True), merge_mode=None,
                           name="bi_none")(inp)
    return keras.Model(inp, L.Dense(2)(both[0]))


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed_tagger")
        self.rnn = L.LSTM(H)

    def call(self, x):
        return self.rnn(x)


@pytest.mark.parametrize("build,names", [
    (lambda: _seq(L.LSTM(H, return_sequences=True), L.GRU(H, name="my_gru")),
     ["my_gru", "GRU"]),
    (lambda: _seq(L.Conv1D(3, 2, name="conv")), ["conv", "Conv1D"]),
    (_two_branches, ["merge_ab", "Concatenate"]),
    (_dropout_in_training_mode, ["always_on", "Dropout", "training=True"]),
    (lambda: _seq(L.LSTM(H, return_state=True, name="stateful_out")),
     ["stateful_out", "LSTM", "return_state"]),
    (lambda: keras.Sequential([keras.Input(batch_shape=(2, None, D)),
                               L.LSTM(H, stateful=True, name="st")]), ["st", "stateful"]),
    (_bidirectional_none_inside, ["bi_none", "Bidirectional", "merge_mode"]),
    (lambda: _seq(L.Bidirectional(L.GRU(H), name="bi_gru")), ["bi_gru", "GRU"]),
    (lambda: _seq(L.TimeDistributed(L.Dropout(0.1), name="td_drop")),
     ["td_drop", "TimeDistributed", "Dropout"]),
    (lambda: _seq(L.Dense(3, activation="gelu", name="gelu_dense")),
     ["gelu_dense", "Dense", "gelu"]),
    (lambda: _seq(L.Dense(3), L.Embedding(V, 2, name="late_emb")),
     ["late_emb", "Embedding"]),
])
def test_unsupported_raises_naming_layer(build, names):
    model = build()
    with pytest.raises((ValueError, TypeError)) as info:
        fastseq.from_keras(model)
    for name in names:
        assert name in str(info.value), str(info.value)


def test_unsupported_models():
    sub = _Subclassed()
    sub(np.zeros((1, T, D), np.float32))
    with pytest.raises(TypeError, match="subclassed_tagger"):
        fastseq.from_keras(sub)
    with pytest.raises(ValueError, match="not built"):
        fastseq.from_keras(keras.Sequential([L.LSTM(H)]))
    with pytest.raises(TypeError, match="keras_model"):
        fastseq.from_keras(object())
    with pytest.raises(ValueError, match="device"):
        fastseq.from_keras(_seq(L.LSTM(H)), device="tpu")


def test_predict_input_errors():
    floats = fastseq.from_keras(_seq(L.LSTM(H)))
    tokens = fastseq.from_keras(_seq(L.Embedding(V, D, mask_zero=True), L.LSTM(H),
                                     int_input=True))
    ids = _ids()
    bad = [
        (floats, _floats()[0], ValueError, "3-D"),
        (floats, np.zeros((B, T, D + 1), np.float32), ValueError, "features"),
        (floats, np.zeros((0, T, D), np.float32), ValueError, "empty"),
        (floats, np.full((B, T, D), "a"), TypeError, "real numbers"),
        (tokens, ids[..., None], ValueError, "2-D"),
        (tokens, ids + V, ValueError, "outside"),
        (tokens, ids - 1, ValueError, "outside"),
        (tokens, ids + 0.5, ValueError, "whole numbers"),
        (tokens, ids.astype(bool), TypeError, "integer"),
    ]
    for model, x, err, words in bad:
        with pytest.raises(err, match=words) as info:
            model.predict(x)
        assert "`x`" in str(info.value)
    for bs, err in [(0, ValueError), (1.5, TypeError), (True, TypeError)]:
        with pytest.raises(err, match="batch_size"):
            floats.predict(_floats(), batch_size=bs)
    # whole-number float ids are accepted, as Keras casts them
    np.testing.assert_array_equal(tokens.predict(ids.astype(np.float32)),
                                  tokens.predict(ids))
