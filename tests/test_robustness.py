"""Regressions from a pass of hostile inputs over the public API: each case below once
gave a wrong answer, a stale answer or an unhelpful error."""
import threading

import keras
import numpy as np
import pytest

import fastseq
from fastseq import _threads, cli, training
from fastseq.training import lstm_vjp

from test_errors import expect_error


def _bilstm_tagger(V=20, E=6, H=5, K=4, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(V, E, mask_zero=True),
        keras.layers.Bidirectional(keras.layers.LSTM(H, return_sequences=True)),
        keras.layers.TimeDistributed(keras.layers.Dense(K, activation="softmax")),
    ])


def _ids(rng, B=4, T=7, V=20):
    ids = rng.integers(1, V, size=(B, T))
    ids[1, 4:] = 0
    ids[3, 2:] = 0
    return ids


# --- numerics: a first value that is infinite or NaN -----------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ["softmax", "log_softmax"])
def test_softmax_with_minus_inf_first_logit(dtype, activation):
    """The accumulator once started as row[0] - row[0], NaN when row[0] is -inf."""
    bias = np.array([-np.inf, 0.0, 1.0], dtype)
    y = fastseq.dense(np.zeros((2, 2), dtype), np.zeros((2, 3), dtype), bias, activation)
    e = np.exp(1.0)
    want = np.array([0.0, 1 / (1 + e), e / (1 + e)])
    if activation == "log_softmax":
        with np.errstate(divide="ignore"):
            want = np.log(want)
    assert np.array_equal(np.isfinite(y), np.isfinite(want)[None].repeat(2, 0))
    np.testing.assert_allclose(y[:, 1:], np.broadcast_to(want[1:], (2, 2)), rtol=1e-6)
    assert (y[:, 0] == (0.0 if activation == "softmax" else -np.inf)).all()


def test_nan_in_embedding_stays_at_its_step():
    """Embedding -> Bidirectional -> Dense: the Dense of four steps at a time once
    started its sums from the first step's value, so a NaN there spread to the next
    three steps' outputs; Keras keeps them finite."""
    km = _bilstm_tagger()
    w = km.get_weights()
    w[0][7] = np.nan
    km.set_weights(w)
    x = np.array([[7, 0, 0, 0, 0, 0, 0, 0], [3, 4, 5, 6, 8, 9, 0, 0]])
    want = km.predict(x, verbose=0)
    got = fastseq.from_keras(km).predict(x)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[0, 0]).all() and np.isfinite(got[0, 1:]).all()
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)


# --- weights: no stale derived arrays ---------------------------------------------------
def test_trainable_weights_are_read_only_views():
    fm = fastseq.from_keras(_bilstm_tagger())
    live = fm.trainable_weights
    assert not any(w.flags.writeable for w in live)
    with pytest.raises(ValueError, match="read-only"):
        live[0][...] = 0.0
    fm.set_weights([np.full_like(w, 0.5) for w in fm.get_weights()])
    assert all((w == 0.5).all() for w in live)   # views follow the model's arrays


def test_updates_through_set_weights_reach_cached_paths():
    """A manual update loop (loss_and_gradients + set_weights) after a predict: the
    Embedding table, the Dense halves and the blocked kernels are renewed."""
    rng = np.random.default_rng(0)
    km = _bilstm_tagger()
    fm = fastseq.from_keras(km)
    ids = _ids(rng)
    y = rng.integers(0, 4, size=ids.shape)
    fm.predict(ids)                       # builds the caches
    for _ in range(3):
        _, grads = fm.loss_and_gradients(ids, y)
        fm.set_weights([w - 0.5 * g for w, g in zip(fm.get_weights(), grads)])
    km.set_weights(fm.get_weights())
    np.testing.assert_allclose(fm.predict(ids), km.predict(ids, verbose=0), atol=1e-5)


def test_set_weights_checks_everything_before_writing():
    fm = fastseq.from_keras(_bilstm_tagger())
    before = fm.get_weights()
    bad = [w + 1.0 for w in before]
    bad[-1] = np.zeros(99)
    with pytest.raises(ValueError, match="weight .* must have shape"):
        fm.set_weights(bad)
    assert all(np.array_equal(a, b) for a, b in zip(fm.get_weights(), before))
    bad[-1] = None
    with pytest.raises(TypeError, match="got None"):
        fm.set_weights(bad)
    bad[-1] = before[-1].astype(complex)
    with pytest.raises(TypeError, match="real numbers"):
        fm.set_weights(bad)
    with pytest.raises(TypeError, match="to_keras: `keras_model`"):
        fm.to_keras(None)


# --- training inputs ----------------------------------------------------------------------
def test_huge_class_ids_are_rejected_not_wrapped():
    """ids >= 2**31 were cast to int32 before the range check and wrapped onto valid
    classes (2**32 + 3 trained as class 3)."""
    rng = np.random.default_rng(1)
    fm = fastseq.from_keras(_bilstm_tagger())
    ids = _ids(rng)
    for bad in (2**32 + 3, 2**31, -(2**32) + 1):
        with pytest.raises(ValueError, match=r"`y` holds class ids outside \[0, 4\)"):
            fm.loss_and_gradients(ids, np.full(ids.shape, bad, np.int64))


def test_fit_checks_sample_weight_and_batch_size():
    rng = np.random.default_rng(2)
    fm = fastseq.from_keras(_bilstm_tagger())
    fm.compile("adam")
    ids = _ids(rng)
    y = rng.integers(0, 4, size=ids.shape)
    expect_error(ValueError, lambda: fm.fit(ids, y, sample_weight=np.ones(3), verbose=0),
                 "sample_weight", "(3,)", "(4,)")
    expect_error(ValueError, lambda: fm.fit(ids, y, sample_weight=2.0, verbose=0),
                 "sample_weight", "()", "(4,)")
    expect_error(ValueError, lambda: fm.fit(ids, y, batch_size="8", verbose=0),
                 "batch_size", "'8'")
    expect_error(TypeError, lambda: fm.fit(5, verbose=0), "x", "int")


# --- compile: Keras optimizers and the Keras model's own settings -------------------------
def test_compile_defaults_to_the_keras_models_settings():
    km = _bilstm_tagger()
    km.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
               loss="sparse_categorical_crossentropy")
    fm = fastseq.from_keras(km)
    fm.compile()
    opt = fm._fastseq_training["optimizer"]
    assert type(opt).__name__ == "SGD"
    assert opt.learning_rate == pytest.approx(0.5) and opt.momentum == pytest.approx(0.9)
    fm.compile(keras.optimizers.Adam(0.01))      # a Keras optimizer object
    opt = fm._fastseq_training["optimizer"]
    assert type(opt).__name__ == "Adam" and opt.learning_rate == pytest.approx(0.01)
    # not compiled in Keras: Adam with Keras's defaults
    fm = fastseq.from_keras(_bilstm_tagger())
    fm.compile()
    opt = fm._fastseq_training["optimizer"]
    assert type(opt).__name__ == "Adam" and opt.learning_rate == pytest.approx(1e-3)
    # an optimizer fastseq does not have: compile() says so, an explicit one works
    km.compile(optimizer=keras.optimizers.RMSprop(), loss="sparse_categorical_crossentropy")
    fm = fastseq.from_keras(km)
    with pytest.raises(ValueError, match="RMSprop is not supported; .*pass `optimizer`"):
        fm.compile()
    fm.compile("sgd")


# --- shapes at the edges ------------------------------------------------------------------
def test_dense_with_no_input_features_gives_the_activated_bias():
    b = np.arange(7, dtype=np.float32)
    y = fastseq.dense(np.zeros((3, 0), np.float32), np.zeros((0, 7), np.float32), b,
                      "softmax")
    e = np.exp(b - b.max())
    np.testing.assert_allclose(y, np.broadcast_to(e / e.sum(), (3, 7)), rtol=1e-6)


def test_scalar_inputs_are_reported_as_scalars():
    expect_error(ValueError, lambda: fastseq.dense(np.float32(2), np.zeros((1, 3))),
                 "x", "scalar")
    expect_error(ValueError, lambda: fastseq.lstm(np.float32(1), np.zeros((1, 4)),
                                                  np.zeros((1, 4))),
                 "x", "got shape ()")


def test_lstm_vjp_checks_its_arguments_like_lstm():
    rng = np.random.default_rng(3)
    B, T, D, H = 2, 3, 4, 5
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    W = rng.standard_normal((D, 4 * H)).astype(np.float32)
    U = rng.standard_normal((H, 4 * H)).astype(np.float32)
    b = np.zeros(4 * H, np.float32)
    dy = np.ones((B, H), np.float32)
    expect_error(TypeError, lambda: lstm_vjp(x + 1j, W, U, b, dy), "x", "complex64")
    expect_error(TypeError, lambda: lstm_vjp(x, W, U, b, dy, mask=np.full((B, T), 0.4)),
                 "mask", "float64")
    expect_error(ValueError, lambda: lstm_vjp(x[:0], W, U, b, dy[:0]), "x", "(0, 3, 4)")
    expect_error(ValueError, lambda: lstm_vjp(x, W, U, b, dy, return_state=True), "dy",
                 "ndarray")
    expect_error(ValueError, lambda: lstm_vjp(x, W, U, b, dy, initial_state=[dy]),
                 "initial_state", "length 1")
    expect_error(ValueError, lambda: lstm_vjp(x, W, U, b, dy, activation=["tanh"]),
                 "activation", "['tanh']")
    expect_error(TypeError, lambda: lstm_vjp(x, W, U, b, "abc"), "dy", "<U3")
    assert lstm_vjp(x, W, U, None, dy)["bias"] is None


# --- the command line ---------------------------------------------------------------------
@pytest.mark.parametrize("argv, option", [
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--repeats", "-1"], "--repeats"),
    (["bench", "--budget", "-5"], "--budget"),
    (["bench", "--json", "/no/such/folder/x.json"], "--json"),
    (["validate", "m.keras", "--batch-size", "0"], "--batch-size"),
    (["validate", "m.keras", "--atol", "nan"], "--atol"),
    (["train-tagger", "--max-sentences", "0"], "--max-sentences"),
    (["train-tagger", "--max-sentences", "-12000"], "--max-sentences"),
    (["train-tagger", "--units", "0"], "--units"),
    (["train-tagger", "--threads", "0"], "--threads"),
    (["train-tagger", "--save", "/no/such/folder/x"], "--save"),
])
def test_cli_rejects_bad_values_up_front(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and argv[-1] in err


def test_from_keras_messages_name_the_real_problem():
    with pytest.raises(ValueError, match="has no layers"):
        fastseq.from_keras(keras.Sequential([keras.Input((None, 3))]))
    inp = keras.Input((5, 3))
    _, h, _ = keras.layers.LSTM(4, return_state=True)(inp)
    with pytest.raises(ValueError, match=r"uses output 1 of layer '.*' \(LSTM\)"):
        fastseq.from_keras(keras.Model(inp, h))


def _from_four_threads(calls, want, rounds):
    """Call ``calls[key]()`` from four threads at once, ``rounds`` times in each thread,
    cycling through the keys; returns (thread, round, key) for every result that
    differs from ``want[key]`` (its result alone)."""
    keys = list(calls)
    bad, errors = [], []

    def work(t):
        try:
            for it in range(rounds):
                key = keys[(7 * t + it) % len(keys)]
                if not np.array_equal(calls[key](), want[key]):
                    bad.append((t, it, key))
        except Exception as exc:  # reported below
            errors.append(repr(exc))
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads), errors[:3]
    return bad


@pytest.mark.skipif(_threads.get_num_threads() < 2,
                    reason="the worker thread is used only when two threads are allowed")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_from_four_threads_matches_one_thread(dtype):
    """Four Python threads calling predict on one model: every call must equal the
    single-thread result.  Before the worker's claim was fixed
    (``worker_cpu.take_job``), such runs crashed (heap corruption) or returned wrong
    outputs in about half the tries."""
    from fastseq import tagger
    model = tagger.build_model(300, 16, 24, seed=1, dtype=np.dtype(dtype).type)
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 300, size=shape) for shape in
          [(1, 40), (3, 25), (32, 30), (8, 60), (1, 3), (64, 12)]]
    for x in xs:
        x[0, -2:] = 0
    calls = {(i, bs): (lambda x=x, bs=bs: model.predict(x, batch_size=bs))
             for i, x in enumerate(xs) for bs in (None, 2)}
    want = {key: call() for key, call in calls.items()}
    bad = _from_four_threads(calls, want, rounds=120)
    assert not bad, f"{len(bad)} of 480 calls differ from their result alone: {bad[:4]}"


# --- saved models, data files -------------------------------------------------------------
def _saved(tmp_path, dtype="float32"):
    """A saved Embedding(20, 6) -> Bidirectional(LSTM(5)) -> Dense(4) tagger."""
    from fastseq import tagger
    fm = tagger.build_model(20, 6, 5, K=4, seed=3, dtype=np.dtype(dtype).type)
    npz, js = training.save(fm, tmp_path / "m", metadata={"note": "x"})
    return fm, npz, js


def _edit(js, change):
    import json
    cfg = json.loads(js.read_text())
    change(cfg)
    js.write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, message", [
    (lambda c: c["layers"][0].update(dtype="int32"), "dtype must be 'float32' or"),
    (lambda c: c["layers"][1]["forward_layer"].update(go_backwards="false"),
     "'go_backwards' has the wrong type"),
    (lambda c: c["layers"][1].update(merge_mode="max"), "merge_mode must be one of"),
    (lambda c: c["layers"][2].update(bias=c["layers"][2]["kernel"]),
     "bias must be a 1-D float32 array"),
    (lambda c: c["layers"][1]["forward_layer"].update(kernel="nope"),
     "has no array 'nope'"),
    (lambda c: c["layers"][1].update(merge_mode="sum"),
     "expects inputs of width 10, but the layer before gives 5"),
    (lambda c: c["layers"][2].update(activation="relu6x"), "activation must be one of"),
    (lambda c: c["layers"][0].update({"class": "Conv1D"}), "unknown layer class 'Conv1D'"),
    (lambda c: c.update(version=99), "format version 99"),
    (lambda c: c.pop("input_shape"), "missing 'input_shape'"),
    (lambda c: c.update(metadata=[1]), "metadata must be a dict"),
])
def test_load_rejects_edited_configs(tmp_path, change, message):
    """Each edit once loaded silently (and predicted wrongly) or failed later with a
    KeyError, AttributeError or a Numba typing error."""
    _, npz, js = _saved(tmp_path)
    _edit(js, change)
    with pytest.raises(ValueError, match=message):
        training.load(tmp_path / "m")


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04trunc", "npy"])
def test_load_rejects_unreadable_weights_and_configs(tmp_path, content):
    _, npz, js = _saved(tmp_path)
    if content == "npy":
        np.save(tmp_path / "a.npy", np.zeros(3))
        npz.write_bytes((tmp_path / "a.npy").read_bytes())
    else:
        npz.write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot read .*m\.npz as the model's weights"):
        training.load(tmp_path / "m")
    js.write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read .*m\.json"):
        training.load(tmp_path / "m")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip_still_exact(tmp_path, dtype):
    fm, _, _ = _saved(tmp_path, dtype)
    ids = _ids(np.random.default_rng(5))
    back = training.load(tmp_path / "m")
    assert back.metadata == {"note": "x"}
    assert all(w.dtype == np.dtype(dtype) for w in back.get_weights())
    assert np.array_equal(back.predict(ids), fm.predict(ids))


def test_save_writes_nothing_when_metadata_is_not_json(tmp_path):
    fm = fastseq.from_keras(_bilstm_tagger())
    with pytest.raises(TypeError, match="metadata"):
        training.save(fm, tmp_path / "m", metadata={"x": np.float32(1)})
    assert not list(tmp_path.iterdir())
    for bad in ("", ".", str(tmp_path) + "/"):
        with pytest.raises(ValueError, match="`path` must name a file"):
            training.save(fm, bad)


def test_conllu_reader_skips_a_byte_order_mark(tmp_path):
    from fastseq import datasets
    line = "\t".join(["1", "Dogs", "dog", "NOUN", "_", "_", "0", "root", "_", "_"])
    p = tmp_path / "bom.conllu"
    p.write_bytes(b"\xef\xbb\xbf" + (line + "\n\n").encode())
    assert list(datasets.read_conllu(p)) == [(["Dogs"], ["NOUN"])]
    p.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="cannot read it as UTF-8 CoNLL-U"):
        list(datasets.read_conllu(p))


def test_dataset_helpers_check_their_arguments(tmp_path):
    from fastseq import datasets
    sents = [(["a", "b", "c"], ["NOUN", "VERB", "NOUN"]), (["d"], ["DET"])]
    vocab = datasets.Vocab.build([[w, t] for w, t in sents])   # list pairs, as from JSON
    assert len(vocab) == 6
    for kw in ({"max_len": -1}, {"max_len": 0}, {"max_len": 1.5}, {"batch_size": True},
               {"batch_size": 2.7}, {"batch_size": "3"}):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=f"`{name}` must be an int"):
            list(datasets.batches(sents, vocab, **kw))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([-1])
    with pytest.raises(ValueError, match="line breaks"):
        datasets.Vocab(["a\nb"]).save(tmp_path / "v.txt")


def test_train_tagger_load_checks(tmp_path, capsys, monkeypatch):
    from fastseq import tagger
    monkeypatch.chdir(tmp_path)     # an empty --load once started training here
    assert tagger.main_train_tagger(["--load", "", "--tag", "dog", "--epochs", "1",
                                     "--max-sentences", "5", "--no-save"]) == 2
    assert "--load: the path is empty" in capsys.readouterr().err
    vocab_words = [f"w{i}" for i in range(30)]
    from fastseq import datasets
    vocab = datasets.Vocab(vocab_words)
    model = tagger.build_model(len(vocab) + 5, 4, 3)      # Embedding larger than vocab
    tagger.save_tagger(model, vocab, tmp_path / "t")
    with pytest.raises(ValueError, match="the vocabulary has 32 words but the model's "
                                         "Embedding 37 rows"):
        tagger.load_tagger(tmp_path / "t")


def test_validate_refuses_an_npz_input(tmp_path, capsys):
    km = keras.Sequential([keras.Input((None, 3)), keras.layers.LSTM(4)])
    km.save(tmp_path / "m.keras")
    np.savez(tmp_path / "x.npz", a=np.zeros((2, 5, 3)))
    code = cli.main(["validate", str(tmp_path / "m.keras"), "--input",
                     str(tmp_path / "x.npz")])
    assert code == 2
    assert "expected one array saved with numpy.save" in capsys.readouterr().out


@pytest.mark.skipif(_threads.get_num_threads() < 2,
                    reason="the unit split runs only when two threads are allowed")
def test_small_batch_calls_from_four_threads_match_one_thread():
    """B = 1-4 runs split by hidden units, part 1 on the worker.  From four threads at
    once, every call must equal its result alone: a caller once returned while the
    worker was still running the whole job alone (its outputs half-written)."""
    from fastseq import ops
    rng = np.random.default_rng(0)
    cases = []
    for B, T, D, H in [(1, 50, 64, 128), (3, 40, 32, 128), (2, 30, 16, 64)]:
        x = rng.standard_normal((B, T, D)).astype(np.float32)
        W = (rng.standard_normal((D, 4 * H)) * 0.1).astype(np.float32)
        U = (rng.standard_normal((H, 4 * H)) * 0.1).astype(np.float32)
        Wd = (rng.standard_normal((H, 10)) * 0.1).astype(np.float32)
        m = np.ones((B, T), bool)
        m[0, -3:] = False
        cases.append((x, W, U, np.zeros(4 * H, np.float32), Wd, np.zeros(10, np.float32),
                      m))

    def run(c, k):
        x, W, U, b, Wd, bd, m = c
        if k == 0:
            return ops.lstm_dense(x, W, U, b, Wd, bd, "softmax", mask=m)
        return fastseq.lstm(x, W, U, b, return_sequences=k == 1, mask=m)
    calls = {(i, k): (lambda c=c, k=k: run(c, k)) for i, c in enumerate(cases)
             for k in range(3)}
    want = {key: call() for key, call in calls.items()}
    bad = _from_four_threads(calls, want, rounds=300)
    assert not bad, f"{len(bad)} of 1200 calls differ from their result alone: {bad[:4]}"


def test_float64_layers_under_float32_floatx_lose_their_logits_as_in_keras():
    """A float64 softmax Dense under Keras's default float32 floatx: Keras casts the
    output to float32 for the loss, which drops the logits, so its loss clips the
    probabilities.  fastseq used the logits (loss 44.7 against Keras's 10.6 on a
    confident model)."""
    import tensorflow as tf
    rng = np.random.default_rng(1)
    B, T, D, H, K = 3, 5, 4, 6, 5
    x = rng.normal(size=(B, T, D)).astype("float32")
    y = rng.integers(0, K, (B, T))
    inp = keras.Input((None, D))
    h = keras.layers.LSTM(H, return_sequences=True, dtype="float64")(inp)
    km = keras.Model(inp, keras.layers.Dense(K, activation="softmax", dtype="float64")(h))
    w = km.get_weights()
    w[-2] *= 500          # confident: many probabilities beyond the clip
    km.set_weights(w)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    with tf.GradientTape() as tape:
        want = loss_fn(y, km(x))
    want_grads = tape.gradient(want, km.trainable_weights)
    loss, grads = fastseq.from_keras(km).loss_and_gradients(x, y)
    assert loss == pytest.approx(float(want), rel=1e-5)
    for g, v, wg in zip(grads, km.trainable_weights, want_grads):
        np.testing.assert_allclose(g, wg.numpy(), rtol=1e-4, atol=1e-6, err_msg=v.path)


def test_fit_checks_its_other_arguments_before_training():
    """Each of these once trained first and failed late, or was silently ignored."""
    rng = np.random.default_rng(6)
    fm = fastseq.from_keras(_bilstm_tagger())
    fm.compile("sgd")
    ids = _ids(rng)
    y = rng.integers(0, 4, size=ids.shape)
    before = fm.get_weights()
    expect_error(TypeError, lambda: fm.fit(ids, y, callback=keras.callbacks.History(),
                                           verbose=0), "callback", "History")
    expect_error(ValueError, lambda: fm.fit([(ids, y)], sample_weight=np.ones(4),
                                            verbose=0), "sample_weight", "(x, y, sample")
    expect_error(ValueError, lambda: fm.fit(ids, y, validation_data=(ids, y, None, 1),
                                            verbose=0), "validation_data", "length 4")
    expect_error(TypeError, lambda: fm.fit(ids, y, seed="a", verbose=0), "seed", "'a'")
    expect_error(TypeError, lambda: fm.train_on_batch(ids, y, np.full(4, "a")),
                 "sample_weight", "<U1")
    expect_error(ValueError, lambda: fm.fit(ids[:0], y[:0], verbose=0), "x", "(0, 7)")
    expect_error(ValueError, lambda: fm.fit([], verbose=0), "x", "no batches")
    assert all(np.array_equal(a, b) for a, b in zip(fm.get_weights(), before))
    # a list of validation batches is evaluated batch by batch
    half = [(ids[:2], y[:2]), (ids[2:], y[2:])]
    hist = fm.fit(ids, y, validation_data=half, epochs=1, verbose=0)
    want = fm.evaluate(half)
    assert hist["val_loss"][0] == pytest.approx(want["loss"])


def _run_script_ok(path, text, *args):
    """Run ``text`` as a script in a fresh Python (a crash fails only the calling test);
    it must exit 0 and print "ok" last."""
    import subprocess
    import sys
    path.write_text(text)
    proc = subprocess.run([sys.executable, str(path), *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


_INTERRUPT_SCRIPT = r"""
import gc, sys, time
import numpy as np
import fastseq
from fastseq import _threads, config, tagger
from fastseq.kernels import worker_cpu as kw
config.SPLIT_WORKER_IDLE_TICKS = 1 << 62      # the worker spins: jobs go to it
rng = np.random.default_rng(0)
which = sys.argv[1]
if which == "split":
    D, H = 32, 128
    x = rng.standard_normal((1, 400, D)).astype(np.float32)
    W = (rng.standard_normal((D, 4 * H)) * 0.1).astype(np.float32)
    U = (rng.standard_normal((H, 4 * H)) * 0.1).astype(np.float32)
    call = lambda: fastseq.lstm(x, W, U, None, return_sequences=True)
    name = "post_split_job"
else:
    model = tagger.build_model(1000, 32, 64)
    ids = rng.integers(1, 1000, (16, 200))
    call = lambda: model.predict(ids)
    name = "post_table_job"
want = call()
# on a cold compile cache the worker compiles its loop for seconds after the first
# call; until it runs, every call runs alone and nothing is posted
assert _threads.wait_for_workers(timeout=300), "the worker thread never ran its loop"
for _ in range(30):
    call()
real = getattr(kw, name)
interrupted = 0
for _ in range(20):
    def post_then_interrupt(*a):       # a Ctrl-C that lands as the post returns
        real(*a)
        raise KeyboardInterrupt
    setattr(kw, name, post_then_interrupt)
    try:
        call()
    except KeyboardInterrupt:
        interrupted += 1
    setattr(kw, name, real)
    gc.collect()
    junk = [np.zeros(n, np.float32) for n in (256, 51200, 10 ** 5) for _ in range(4)]
    time.sleep(0.01)
    assert not any(j.any() for j in junk), "freed arrays were written after the call"
assert interrupted == 20, interrupted
bad = sum(not np.array_equal(call(), want) for _ in range(30))
assert bad == 0, f"{bad} of 30 later calls wrong"
print("ok")
"""


@pytest.mark.skipif(_threads.get_num_threads() < 2,
                    reason="jobs go to the worker thread only when two threads are allowed")
@pytest.mark.parametrize("which", ["split", "table"])
def test_interrupt_right_after_posting_a_job_is_safe(which, tmp_path):
    """A KeyboardInterrupt raised as the post of a worker job returns: the job's arrays
    must outlive the worker's use of them, and later calls must be right.  The post was
    outside the try, so the job was never cancelled or waited for: the process
    segfaulted or aborted with heap corruption.  Run in a subprocess, so a crash is a
    failure of this test only."""
    _run_script_ok(tmp_path / "interrupt.py", _INTERRUPT_SCRIPT, which)


_FORK_SCRIPT = r"""
import multiprocessing as mp
import numpy as np
import fastseq
from fastseq import tagger, training
rng = np.random.default_rng(0)
D, H = 16, 32
x = rng.standard_normal((64, 20, D)).astype(np.float32)      # rows on the thread pool
x1 = x[:1]                                                   # the worker thread
W = (rng.standard_normal((D, 4 * H)) * 0.1).astype(np.float32)
U = (rng.standard_normal((H, 4 * H)) * 0.1).astype(np.float32)
model = tagger.build_model(200, 8, 16)
ids = rng.integers(1, 200, (8, 12))
tags = rng.integers(0, 17, (8, 12))
training.compile(model, "adam")

def work(_):
    out = [fastseq.lstm(x, W, U, None), fastseq.lstm(x1, W, U, None), model.predict(ids)]
    out.append(np.float64(training.loss_and_gradients(model, ids, tags)[0]))
    return out

want = work(0)                      # the parent uses every pool and the worker first
training.train_on_batch(model, ids, tags)
want = work(0)
with mp.get_context("fork").Pool(2) as pool:
    got = pool.map_async(work, range(2)).get(timeout=120)
for g in got:
    assert all(np.array_equal(a, b) for a, b in zip(g, want)), "child results differ"
print("ok")
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "register_at_fork"),
                    reason="os.register_at_fork is POSIX-only")
def test_forked_children_work_after_the_parent_used_the_pools(tmp_path):
    """Forked children once hung: the parent's thread pools (rows, training groups,
    optimizer) came over without their threads, so any job sent to them never ran."""
    _run_script_ok(tmp_path / "fork.py", _FORK_SCRIPT)


_EXIT_SCRIPT = r"""
import sys, time
import numpy as np
from fastseq import _threads
from fastseq.kernels import worker_cpu

real = worker_cpu.serve_float32


def slow_serve(mb, max_polls):
    # stands for the worker's first start on a cold cache: seconds of compiling
    time.sleep(1.0)
    r = real(mb, max_polls)
    with open(sys.argv[1], "w") as f:
        f.write(str(int(mb[worker_cpu.MB_STATE])))
    return r


worker_cpu.serve_float32 = slow_serve
_threads.worker(np.float32)
print("ok")
"""


def test_interpreter_exit_waits_for_a_worker_still_starting(tmp_path):
    """A script that exited while the worker thread was still compiling its loop (the
    first start on a cold cache) crashed with a segfault: the interpreter finalised
    under the thread, inside LLVM.  At exit the workers are now told to stop and
    waited for, so the loop starts, sees the request and returns (state 0)."""
    marker = tmp_path / "stopped.txt"
    _run_script_ok(tmp_path / "exit.py", _EXIT_SCRIPT, str(marker))
    assert marker.exists(), "the worker thread was killed at exit, not stopped"
    assert marker.read_text() == "0"


def test_interrupted_adam_step_leaves_a_consistent_state(monkeypatch):
    """A KeyboardInterrupt as Adam's row sums of the Embedding gradient return: the
    step is lost, but the next steps must be right.  The sums ran before the try that
    clears their index, so later steps read stale rows (the loss became nan)."""
    from fastseq import optimizers, tagger
    rng = np.random.default_rng(0)
    tx, ty = rng.integers(1, 1000, (32, 30)), rng.integers(0, 17, (32, 30))

    def losses(interrupt):
        m = tagger.build_model(1000, 16, 32, seed=2)
        m.compile()
        m.train_on_batch(tx, ty)
        if interrupt:
            real = optimizers._sum_rows

            def sums_then_interrupt(*a):
                real(*a)
                raise KeyboardInterrupt
            monkeypatch.setattr(optimizers, "_sum_rows", sums_then_interrupt)
            with pytest.raises(KeyboardInterrupt):
                m.train_on_batch(tx, ty)
            monkeypatch.setattr(optimizers, "_sum_rows", real)
        return [float(m.train_on_batch(tx, ty)) for _ in range(3)]
    got = losses(True)
    assert np.isfinite(got).all(), got
    # the interrupted step changed nothing, up to the moments' decay already applied
    np.testing.assert_allclose(got, losses(False), rtol=1e-2)
