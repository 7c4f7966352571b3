"""Training: loss and gradients equal what Keras computes (tf.GradientTape on the same
model and batch), optimizer steps through train_on_batch equal Keras's, fit lowers the
loss on EWT, save/load round trips, and the train-tagger command runs.

Gradients are compared per weight as max |fastseq - keras| / max |keras|: at most 1e-4
in float32 and 1e-9 in float64.
"""
import numpy as np
import pytest

import keras  # a test dependency: fail loudly if it is missing, never skip
import tensorflow as tf
from keras import layers as L

import fastseq
from fastseq import training, optimizers
from fastseq.optimizers import SparseRows

RTOL = {"float32": 1e-4, "float64": 1e-9}
B, T, V, E, K = 6, 7, 25, 5, 4
LENGTHS = [7, 4, 1, 6, 0, 3]  # ragged, one row fully padded


def _ids(seed=0, lengths=LENGTHS, steps=T, hole=True):
    ids = np.random.default_rng(seed).integers(1, V, size=(len(lengths), steps))
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    if hole:
        ids[0, 2] = 0  # a masked step inside a sentence
    return ids


def _labels(seed=1, shape=(B, T)):
    return np.random.default_rng(seed).integers(0, K, size=shape)


def _randomize(model, seed=0, scale=0.6):
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(-scale, scale, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    return model


def _build(spec, dtype):
    """Keras models named by ``spec`` (every layer in ``dtype``)."""
    kw = {"dtype": dtype}
    emb = L.Embedding(V, E, mask_zero=True, **kw)
    seq = {"return_sequences": True, **kw}
    if spec == "bi_concat":
        layers = [emb, L.Bidirectional(L.LSTM(5, **seq), **kw),
                  L.Dense(K, activation="softmax", **kw)]
    elif spec == "stacked":
        layers = [emb, L.LSTM(5, **seq), L.LSTM(4, go_backwards=True, **seq),
                  L.Bidirectional(L.LSTM(3, **seq), merge_mode="mul", **kw),
                  L.Dense(K, activation="softmax", **kw)]
    elif spec == "zero_output_ave":
        layers = [emb, L.LSTM(5, zero_output_for_mask=True, **seq),
                  L.Bidirectional(L.LSTM(3, activation="relu",
                                         recurrent_activation="hard_sigmoid", **seq),
                                  merge_mode="ave", **kw),
                  L.Dense(K, activation="softmax", **kw)]
    elif spec == "sum_time_distributed":
        layers = [emb, L.Bidirectional(L.LSTM(4, use_bias=False, **seq), merge_mode="sum",
                                       **kw),
                  L.TimeDistributed(L.Dense(K, activation="softmax", **kw), **kw)]
    elif spec == "many_to_one":
        layers = [emb, L.LSTM(5, **seq), L.LSTM(4, go_backwards=True, **kw),
                  L.Dense(K, activation="softmax", **kw)]
    elif spec == "no_mask":
        layers = [L.Embedding(V, E, **kw), L.LSTM(5, go_backwards=True,
                                                   activation="softsign", **seq),
                  L.Dense(6, activation="tanh", **kw),
                  L.Dense(K, activation="softmax", **kw)]
    elif spec == "masking_floats":
        layers = [L.Masking(0.0, **kw), L.LSTM(5, recurrent_activation="sigmoid", **seq),
                  L.Dense(6, activation="relu", **kw), L.Bidirectional(
                      L.LSTM(3, **seq), **kw),
                  L.Dense(K, activation="softmax", **kw)]
    else:
        raise AssertionError(spec)
    inp = keras.Input((None, E), dtype=dtype) if spec == "masking_floats" else \
        keras.Input((None,), dtype="int32")
    return _randomize(keras.Sequential([inp, *layers]), seed=hash(spec) % 1000)


def _inputs(spec, dtype):
    ids = _ids()
    if spec == "masking_floats":
        x = np.random.default_rng(3).standard_normal((B, T, E)).astype(dtype)
        x[ids == 0] = 0.0
        return x, _labels()
    if spec == "many_to_one":
        return ids, _labels(shape=(B,))
    return ids, _labels()


def _tape(model, x, y, sample_weight, dtype):
    """Keras's loss and gradients for the batch (eager, tf.GradientTape)."""
    lossf = keras.losses.SparseCategoricalCrossentropy(dtype=dtype)
    with tf.GradientTape() as tape:
        out = model(x)
        loss = lossf(y, out, sample_weight=sample_weight)
    grads = tape.gradient(loss, model.trainable_weights)
    return float(loss), [tf.convert_to_tensor(g).numpy() for g in grads]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _check_grads(got, want, rtol, names):
    assert len(got) == len(want)
    errs = {n: _rel(g, w) for n, g, w in zip(names, got, want)}
    bad = {n: e for n, e in errs.items() if not e <= rtol}
    assert not bad, f"relative errors above {rtol:g}: {bad}"
    return errs


SPECS = ["bi_concat", "stacked", "zero_output_ave", "sum_time_distributed",
         "many_to_one", "no_mask", "masking_floats"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("spec", SPECS)
def test_gradients_equal_gradient_tape(spec, dtype):
    model = _build(spec, dtype)
    x, y = _inputs(spec, dtype)
    sw = None
    if spec in ("bi_concat", "no_mask"):
        sw = np.random.default_rng(5).uniform(0, 2, y.shape).astype(dtype)
    elif spec == "many_to_one":
        sw = np.random.default_rng(5).uniform(0, 2, (B,)).astype(dtype)
    want_loss, want = _tape(model, x, y, sw, dtype)
    fm = fastseq.from_keras(model)
    loss, got = training.loss_and_gradients(fm, x, y, sample_weight=sw)
    assert abs(loss - want_loss) <= RTOL[dtype] * abs(want_loss)
    _check_grads(got, want, RTOL[dtype], [w.path for w in model.trainable_weights])
    assert all(g.dtype == np.dtype(dtype) for g in got)


def test_time_distributed_probabilities_are_clipped_as_keras_does():
    """A TimeDistributed(Dense(softmax)) output reaches Keras's loss as probabilities,
    clipped to [1e-7, 1 - 1e-7]; saturated rows must give Keras's loss and gradients."""
    dtype = "float64"
    for td in (True, False):
        dense = L.Dense(K, activation="softmax", dtype=dtype)
        model = keras.Sequential([keras.Input((None,), dtype="int32"),
                                  L.Embedding(V, E, mask_zero=True, dtype=dtype),
                                  L.LSTM(5, return_sequences=True, dtype=dtype),
                                  L.TimeDistributed(dense, dtype=dtype) if td else dense])
        _randomize(model, seed=7)
        w = model.get_weights()
        w[-2] = w[-2] * 200.0  # saturate the softmax
        model.set_weights(w)
        x, y = _ids(), _labels()
        p = model.predict(x, verbose=0)
        py = np.take_along_axis(p, y[..., None], -1)[..., 0][x != 0]
        assert np.sum(py < 1e-7) >= 3  # some labels are clipped
        want_loss, want = _tape(model, x, y, None, dtype)
        fm = fastseq.from_keras(model)
        # the tape's loss computes in float64 (under float32 floatx a loss by name would
        # cast the output to float32, and the plain Dense's logits would be lost too)
        training.compile(fm, loss=keras.losses.SparseCategoricalCrossentropy(dtype=dtype))
        loss, got = training.loss_and_gradients(fm, x, y)
        assert abs(loss - want_loss) <= 1e-9 * want_loss
        _check_grads(got, want, 1e-9, [v.path for v in model.trainable_weights])


def test_loss_equals_keras_test_on_batch():
    model = _build("bi_concat", "float32")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x, y = _ids(), _labels()
    sw = np.random.default_rng(2).uniform(0, 1, y.shape).astype(np.float32)
    fm = fastseq.from_keras(model)
    for weights in (None, sw):
        want = float(model.test_on_batch(x, y, sample_weight=weights))
        loss, _ = training.loss_and_gradients(fm, x, y, sample_weight=weights)
        assert abs(loss - want) <= 1e-5 * want


def test_gradient_order_and_weights_follow_keras():
    model = _build("stacked", "float32")
    fm = fastseq.from_keras(model)
    mine = training.get_weights(fm)
    theirs = [v.numpy() for v in model.trainable_weights]
    assert [w.shape for w in mine] == [w.shape for w in theirs]
    assert all(np.array_equal(a, b) for a, b in zip(mine, theirs))
    # trainable_weights are read-only views of the live arrays the optimizer updates
    live = training.trainable_weights(fm)
    assert np.shares_memory(live[1], fm.layers[1].kernel)
    assert not any(w.flags.writeable for w in live)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lstm_vjp_initial_state_and_return_state(dtype):
    """Gradients wrt the initial state and with return_state, masked, go_backwards."""
    rng = np.random.default_rng(4)
    D, H = 3, 4
    x = rng.standard_normal((B, T, D)).astype(dtype)
    mask = _ids() != 0
    h0 = rng.standard_normal((B, H)).astype(dtype)
    c0 = rng.standard_normal((B, H)).astype(dtype)
    for go_backwards, zero_output, rs in ((False, False, True), (True, True, True),
                                          (True, False, False)):
        layer = L.LSTM(H, return_sequences=rs, return_state=True,
                       go_backwards=go_backwards, zero_output_for_mask=zero_output,
                       dtype=dtype)
        layer.build((None, None, D))
        for v in layer.weights:
            v.assign(rng.uniform(-0.7, 0.7, v.shape).astype(dtype))
        W, U, b = (v.numpy() for v in layer.weights)
        d_out = rng.standard_normal((B, T, H) if rs else (B, H)).astype(dtype)
        d_h = rng.standard_normal((B, H)).astype(dtype)
        d_c = rng.standard_normal((B, H)).astype(dtype)
        xs, h0t, c0t = (tf.constant(a) for a in (x, h0, c0))
        with tf.GradientTape() as tape:
            tape.watch([xs, h0t, c0t])
            out, h, c = layer(xs, initial_state=[h0t, c0t], mask=tf.constant(mask))
            obj = tf.reduce_sum(out * d_out) + tf.reduce_sum(h * d_h) + \
                tf.reduce_sum(c * d_c)
        want = tape.gradient(obj, [xs, *layer.trainable_weights, h0t, c0t])
        got = training.lstm_vjp(x, W, U, b, [d_out, d_h, d_c], initial_state=[h0, c0],
                                mask=mask, return_sequences=rs, return_state=True,
                                go_backwards=go_backwards,
                                zero_output_for_mask=zero_output)
        names = ["x", "kernel", "recurrent_kernel", "bias", "h0", "c0"]
        _check_grads([got[n] for n in names], [w.numpy() for w in want], RTOL[dtype],
                     names)



@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rows,units", [(9, 37), (13, 18)])
def test_lstm_vjp_at_register_tile_edges(rows, units, dtype):
    """The recurrent products of the training kernels go four rows by four outputs at
    a time: sizes that leave rows and outputs over (H not a multiple of 4, B = 4k + 1),
    with ragged masks in both directions, against tf.GradientTape."""
    rng = np.random.default_rng(rows)
    steps, D = 6, 5
    x = rng.standard_normal((rows, steps, D)).astype(dtype)
    lengths = rng.integers(0, steps + 1, size=rows)
    mask = np.arange(steps)[None, :] < lengths[:, None]
    for go_backwards in (False, True):
        layer = L.LSTM(units, return_sequences=True, go_backwards=go_backwards,
                       dtype=dtype)
        layer.build((None, None, D))
        for v in layer.weights:
            v.assign(rng.uniform(-0.5, 0.5, v.shape).astype(dtype))
        W, U, b = (v.numpy() for v in layer.weights)
        d_out = rng.standard_normal((rows, steps, units)).astype(dtype)
        xs = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xs)
            obj = tf.reduce_sum(layer(xs, mask=tf.constant(mask)) * d_out)
        want = tape.gradient(obj, [xs, *layer.trainable_weights])
        got = training.lstm_vjp(x, W, U, b, d_out, mask=mask, return_sequences=True,
                                go_backwards=go_backwards)
        names = ["x", "kernel", "recurrent_kernel", "bias"]
        _check_grads([got[n] for n in names], [w.numpy() for w in want], RTOL[dtype],
                     names)

def _tagger_keras(seed=0, units=6):
    model = keras.Sequential([keras.Input((None,), dtype="int32"),
                              L.Embedding(V, E, mask_zero=True),
                              L.Bidirectional(L.LSTM(units, return_sequences=True)),
                              L.Dense(K, activation="softmax")])
    return _randomize(model, seed=seed, scale=0.3)


def test_twenty_adam_steps_equal_keras_train_on_batch():
    model = _tagger_keras()
    fm = fastseq.from_keras(model)
    model.compile(optimizer=keras.optimizers.Adam(),
                  loss="sparse_categorical_crossentropy")
    training.compile(fm, optimizer=optimizers.from_keras(model))
    rng = np.random.default_rng(0)
    for step in range(20):
        lengths = rng.integers(1, T + 1, size=B)
        x = _ids(seed=step, lengths=list(lengths), hole=False)
        y = rng.integers(0, K, size=(B, T))
        want = float(model.train_on_batch(x, y))
        got = training.train_on_batch(fm, x, y)
        assert abs(got - want) <= 1e-4 * want, (step, got, want)
    for v, mine in zip(model.trainable_weights, training.get_weights(fm)):
        err = _rel(mine, v.numpy())  # max |difference| / max |keras weight|
        assert err <= 1e-4, (v.path, err)
    # predict uses the trained weights
    np.testing.assert_allclose(fm.predict(_ids()), model.predict(_ids(), verbose=0),
                               atol=1e-5)


def test_to_keras_and_set_weights_round_trip():
    model = _tagger_keras()
    fm = fastseq.from_keras(model)
    new = [w + 0.01 for w in training.get_weights(fm)]
    training.set_weights(fm, new)
    assert all(np.array_equal(a, b) for a, b in zip(training.get_weights(fm), new))
    other = _tagger_keras(seed=3)
    training.to_keras(fm, other)
    assert all(np.array_equal(v.numpy(), w) for v, w in zip(other.trainable_weights, new))
    with pytest.raises(ValueError, match="weight 0"):
        training.set_weights(fm, [np.zeros((2, 2))] + new[1:])


def test_sparse_embedding_gradient_is_per_token():
    model = _tagger_keras()
    fm = fastseq.from_keras(model)
    x, y = _ids(), _labels()
    _, dense = training.loss_and_gradients(fm, x, y)
    _, sparse = training.loss_and_gradients(fm, x, y, sparse=True)
    g = sparse[0]
    assert isinstance(g, SparseRows) and len(g.indices) == x.size
    np.testing.assert_allclose(g.to_dense(), dense[0], rtol=1e-6, atol=1e-9)
    assert np.all(dense[0][0] == 0)  # padding id: masked steps give no gradient


def test_multithreaded_gradients_equal_single_thread(monkeypatch):
    model = _build("bi_concat", "float64")
    fm = fastseq.from_keras(model)
    x = np.concatenate([_ids(seed=s) for s in range(4)])
    y = _labels(shape=x.shape)
    monkeypatch.setattr(training, "MIN_ROWS_PER_THREAD", 2)
    plan = training._Plan(fm)
    xx, yy, w, denom, mask = training._prepare(plan, x, y, None, "t")
    s1, g1 = training._run(plan, xx, yy, w, mask, 1 / denom, True, n_threads=1)
    s4, g4 = training._run(plan, xx, yy, w, mask, 1 / denom, True, n_threads=4)
    assert abs(s1[0] - s4[0]) <= 1e-12 * abs(s1[0])
    for a, b in zip(g1, g4):
        a = a.to_dense() if isinstance(a, SparseRows) else a
        b = b.to_dense() if isinstance(b, SparseRows) else b
        assert _rel(b, a) <= 1e-12


def test_errors_name_the_problem():
    fm = fastseq.from_keras(_tagger_keras())
    with pytest.raises(ValueError, match="not compiled"):
        training.fit(fm, _ids(), _labels(), verbose=0)
    with pytest.raises(ValueError, match="`y` must have shape"):
        training.loss_and_gradients(fm, _ids(), _labels(shape=(B,)))
    with pytest.raises(ValueError, match="class ids outside"):
        training.loss_and_gradients(fm, _ids(), _labels() + K)
    with pytest.raises(ValueError, match="token ids outside"):
        training.loss_and_gradients(fm, _ids() + V, _labels())
    with pytest.raises(ValueError, match="sample_weight"):
        training.loss_and_gradients(fm, _ids(), _labels(), sample_weight=np.ones(3))
    drop = keras.Sequential([keras.Input((None,), dtype="int32"),
                             L.Embedding(V, E, mask_zero=True), L.Dropout(0.5),
                             L.LSTM(3, return_sequences=True),
                             L.Dense(K, activation="softmax")])
    with pytest.raises(ValueError, match="dropout"):
        training.loss_and_gradients(fastseq.from_keras(drop), _ids(), _labels())
    lin = keras.Sequential([keras.Input((None,), dtype="int32"), L.Embedding(V, E),
                            L.LSTM(3, return_sequences=True), L.Dense(K)])
    with pytest.raises(ValueError, match="softmax"):
        training.loss_and_gradients(fastseq.from_keras(lin), _ids(), _labels())
    # a linear last layer trains with from_logits=True, as Keras's from_logits loss
    loss, _ = training.loss_and_gradients(fastseq.from_keras(lin), _ids(), _labels(),
                                          from_logits=True)
    assert np.isfinite(loss)


# --- fit on EWT, save / load, the tagger ----------------------------------------------
@pytest.fixture(scope="module")
def ewt_small():
    from fastseq import datasets
    train = datasets.load_ewt("train")[:96]
    vocab = datasets.Vocab.build(train, lowercase=True)
    return train, vocab


def test_fit_lowers_the_loss_on_ewt_batches(ewt_small):
    from fastseq import datasets, tagger
    train, vocab = ewt_small
    model = tagger.build_model(len(vocab), 16, 16, len(datasets.UPOS_TAGS), seed=0)
    training.compile(model, optimizer=optimizers.Adam(learning_rate=0.01))
    batches = [(b.ids, b.tags) for b in datasets.batches(train, vocab, 16)]
    before = training.evaluate(model, batches)["loss"]
    hist = training.fit(model, batches, epochs=3, verbose=0, seed=0,
                        validation_data=(batches,))
    after = training.evaluate(model, batches)
    assert set(hist) >= {"loss", "accuracy", "val_loss", "val_accuracy", "epoch_time"}
    assert len(hist["loss"]) == 3
    assert hist["loss"][-1] < hist["loss"][0]
    assert after["loss"] < 0.8 * before
    assert after["accuracy"] > 0.3
    # arrays padded to one length give the same loss as bucketed batches
    ids = np.zeros((len(train), max(len(w) for w, _ in train)), np.int32)
    tags = np.zeros_like(ids)
    for i, (w, t) in enumerate(train):
        ids[i, :len(w)] = vocab.encode(w)
        tags[i, :len(w)] = datasets.encode_tags(t)
    hist2 = training.fit(model, ids, tags, batch_size=32, epochs=1, verbose=0,
                         validation_data=(ids, tags))
    assert np.isfinite(hist2["loss"][0]) and 0 <= hist2["val_accuracy"][0] <= 1


def test_save_load_round_trip(tmp_path):
    model = _build("stacked", "float32")
    fm = fastseq.from_keras(model)
    npz, js = training.save(fm, tmp_path / "m", metadata={"note": "x"})
    assert npz.exists() and js.exists()
    loaded = training.load(tmp_path / "m.npz")
    assert loaded.metadata == {"note": "x"}
    np.testing.assert_array_equal(loaded.predict(_ids()), fm.predict(_ids()))
    assert all(np.array_equal(a, b) for a, b in zip(training.get_weights(loaded),
                                                    training.get_weights(fm)))
    # no pickle in the weights file
    with np.load(npz, allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)


def test_train_tagger_command(tmp_path, capsys):
    from fastseq import tagger
    path = tmp_path / "tagger"
    rc = tagger.main_train_tagger(["--epochs", "1", "--max-sentences", "64",
                                   "--embedding-dim", "8", "--units", "8",
                                   "--no-progress", "--save", str(path),
                                   "--tag", "The dog barks ."])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "test acc" in out and "dog/" in out
    assert (tmp_path / "tagger.npz").exists()
    rc = tagger.main_train_tagger(["--load", str(path), "--tag", "I like green tea ."])
    out = capsys.readouterr().out
    assert rc == 0
    words = out.split()
    assert [w.split("/")[0] for w in words] == ["I", "like", "green", "tea", "."]
    from fastseq.datasets import UPOS_TAGS
    assert all(w.split("/")[1] in UPOS_TAGS for w in words)
    assert tagger.main_train_tagger(["--load", str(tmp_path / "missing")]) == 2
