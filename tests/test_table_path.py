"""Embedding -> LSTM on the CPU: the input projection is a lookup in (embeddings @ W),
built once per weights version.  Same predictions as Keras, and the table follows the
weights when they change."""
import keras
import numpy as np
import pytest

import fastseq
from fastseq import config


def _model(rnn, head=True, mask_zero=True):
    layers = [keras.Input((None,), dtype="int32"),
              keras.layers.Embedding(30, 5, mask_zero=mask_zero), rnn]
    if head:
        layers.append(keras.layers.Dense(4, activation="softmax"))
    m = keras.Sequential(layers)
    rng = np.random.default_rng(0)
    m.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.5
                   for w in m.get_weights()])
    return m


def _ids(B=6, T=7):
    ids = np.random.default_rng(1).integers(1, 30, size=(B, T))
    ids[0, 4:] = 0      # right padding
    ids[1, :3] = 0      # left padding
    ids[2, :] = 0       # a fully padded row
    return ids


CASES = {
    "lstm_seq_dense": lambda: _model(keras.layers.LSTM(6, return_sequences=True)),
    "lstm_backwards": lambda: _model(keras.layers.LSTM(6, return_sequences=True,
                                                       go_backwards=True)),
    "lstm_last": lambda: _model(keras.layers.LSTM(6), head=False),
    "bi_concat": lambda: _model(keras.layers.Bidirectional(
        keras.layers.LSTM(6, return_sequences=True))),
    "bi_concat_no_head": lambda: _model(keras.layers.Bidirectional(
        keras.layers.LSTM(6, return_sequences=True)), head=False),
    "bi_sum_last": lambda: _model(keras.layers.Bidirectional(
        keras.layers.LSTM(6), merge_mode="sum"), head=False),
    "no_mask": lambda: _model(keras.layers.LSTM(6, return_sequences=True),
                              mask_zero=False),
}
# Embedding -> Bidirectional(concat) -> Dense: each direction applies its half of the
# Dense kernel to its own outputs (Bidirectional.forward_table_dense)
FUSED_BI = {
    "softmax": lambda: _model(keras.layers.Bidirectional(
        keras.layers.LSTM(6, return_sequences=True))),
    "linear_no_bias": lambda: keras.Sequential([
        keras.Input((None,), dtype="int32"), keras.layers.Embedding(30, 5, mask_zero=True),
        keras.layers.Bidirectional(keras.layers.LSTM(6, return_sequences=True)),
        keras.layers.Dense(4, use_bias=False)]),
    "explicit_backward_layer": lambda: _model(keras.layers.Bidirectional(
        keras.layers.LSTM(6, return_sequences=True),
        backward_layer=keras.layers.LSTM(6, return_sequences=True, go_backwards=True,
                                         recurrent_activation="hard_sigmoid"))),
    "swapped_directions": lambda: _model(keras.layers.Bidirectional(
        keras.layers.LSTM(6, return_sequences=True, go_backwards=True),
        backward_layer=keras.layers.LSTM(6, return_sequences=True))),
    "relu_no_mask": lambda: keras.Sequential([
        keras.Input((None,), dtype="int32"), keras.layers.Embedding(30, 5),
        keras.layers.Bidirectional(keras.layers.LSTM(6, return_sequences=True)),
        keras.layers.Dense(4, activation="relu")]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_table_path_matches_keras(case):
    model = CASES[case]()
    ids = _ids()
    fm = fastseq.from_keras(model)
    got = fm.predict(ids)
    rnn = fm.layers[1]
    inner = [rnn.forward_layer, rnn.backward_layer] if hasattr(rnn, "forward_layer") \
        else [rnn]
    assert all(getattr(r, "_table", None) is not None for r in inner), "table not used"
    diff = np.abs(got - model.predict(ids, verbose=0)).max()
    assert diff <= config.KERAS_PARITY_ATOL, diff


# How the two directions run: "one_call": each in one Numba call (lstm_table_dense),
# both on this thread (tiny work); "worker": the same with the second direction handed
# to the worker thread (work threshold 1); "per_chunk": the general driver, per chunk
# from Python (what a batch too large for the fused kernel takes).
ROUTES = {
    "one_call": {},
    "worker": {"MIN_MACS_PER_THREAD": 1},
    "per_chunk": {"GEMM_MIN_STEP_MACS": 1},
}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("case", list(FUSED_BI))
def test_bidirectional_dense_fused(case, route, monkeypatch):
    """The Dense after a concat Bidirectional runs as two halves, one per direction,
    and the result equals Keras's, whichever way the directions run."""
    from fastseq import _cpu, keras_import
    calls = []
    real = keras_import.Bidirectional.forward_table_dense
    real_pair = _cpu.table_dense_pair

    def spy(self, *args):
        calls.append(case)
        return real(self, *args)

    def spy_pair(*args):
        calls.append("one_call")
        return real_pair(*args)

    monkeypatch.setattr(keras_import.Bidirectional, "forward_table_dense", spy)
    monkeypatch.setattr(_cpu, "table_dense_pair", spy_pair)
    for name, value in ROUTES[route].items():
        monkeypatch.setattr(config, name, value)
    model = FUSED_BI[case]()
    rng = np.random.default_rng(2)
    model.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.5
                       for w in model.get_weights()])
    ids = _ids()
    fm = fastseq.from_keras(model)
    for _ in range(3):      # the first call of a dtype starts the worker
        got = fm.predict(ids)
        diff = np.abs(got - model.predict(ids, verbose=0)).max()
        assert diff <= config.KERAS_PARITY_ATOL, diff
    want = [case, "one_call"] if route != "per_chunk" else [case]
    assert calls[:len(want)] == want, f"path taken: {calls}"


def test_table_follows_weight_changes():
    model = CASES["bi_concat"]()
    ids = _ids()
    fm = fastseq.from_keras(model)
    fm.predict(ids)
    new = [w * 0.7 for w in fm.get_weights()]
    fm.set_weights(new)
    model.set_weights(new)
    diff = np.abs(fm.predict(ids) - model.predict(ids, verbose=0)).max()
    assert diff <= config.KERAS_PARITY_ATOL, diff


@pytest.mark.parametrize("case", ["bi_concat_no_head", "bi_sum_last"])
def test_bidirectional_directions_on_two_threads(case, monkeypatch):
    """Tiny models run their two directions one after the other; with the work
    threshold at 1 they run on two threads at once (run_pair), same result.  (With a
    Dense after the layer the directions go to the worker thread instead:
    test_bidirectional_dense_fused.)"""
    monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1)
    import fastseq._threads as th
    calls = []
    real = th._single

    def spy(fn):
        calls.append(fn)
        return real(fn)

    monkeypatch.setattr(th, "_single", spy)
    model = CASES[case]()
    ids = _ids()
    diff = np.abs(fastseq.from_keras(model).predict(ids)
                  - model.predict(ids, verbose=0)).max()
    assert diff <= config.KERAS_PARITY_ATOL, diff
    if fastseq.get_num_threads() >= 2:
        assert len(calls) == 2      # both directions went through the thread pair


def test_bidirectional_on_float_input_two_threads(monkeypatch):
    """The same without an Embedding (no lookup table): Masking -> Bidirectional."""
    monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1)
    model = keras.Sequential([keras.Input((None, 3)), keras.layers.Masking(0.0),
                              keras.layers.Bidirectional(
                                  keras.layers.LSTM(5, return_sequences=True))])
    x = np.random.default_rng(2).standard_normal((4, 6, 3)).astype(np.float32)
    x[0, 4:] = 0
    diff = np.abs(fastseq.from_keras(model).predict(x) - model.predict(x, verbose=0)).max()
    assert diff <= config.KERAS_PARITY_ATOL, diff


def test_non_finite_recurrent_kernel_gives_nan_like_keras():
    """An inf in the recurrent kernel: Keras's h U at a row's first step is NaN
    (0 * inf), so every real token's output is NaN.  The fused path skips h U at a
    row's first step only when U is finite; here it must not (and after
    ``set_weights`` with finite weights again it must match Keras)."""
    model = FUSED_BI["softmax"]()
    ids = _ids()
    fm = fastseq.from_keras(model)
    weights = fm.get_weights()
    bad = [w.copy() for w in weights]
    bad[2][0, 0] = np.inf           # the forward LSTM's recurrent kernel
    model.set_weights(bad)
    fm.set_weights(bad)
    want = model.predict(ids, verbose=0)
    got = fm.predict(ids)
    real = ids != 0
    assert np.isnan(want[real]).all()
    assert np.isnan(got[real]).all()
    model.set_weights(weights)
    fm.set_weights(weights)
    diff = np.abs(fm.predict(ids) - model.predict(ids, verbose=0)).max()
    assert diff <= config.KERAS_PARITY_ATOL, diff
