"""Certify tests/reference.py against real Keras 3 layers (float32, KERAS_PARITY_ATOL).

The kernel tests trust the reference; these tests are what makes that trust earned.  Every
masking edge the kernels are tested on is checked here first against keras.layers.LSTM with
the mask passed as ``layer(x, mask=...)``, and the semantics the reference documents
(zeros before the first unmasked step, zero last output with zero_output_for_mask and right
padding, reversed output order with go_backwards, ...) are asserted on Keras' own output.
"""
import numpy as np
import pytest

import keras  # a test dependency: fail loudly if it is missing, never skip

from fastseq.config import KERAS_PARITY_ATOL  # noqa: E402
from reference import _hard_sigmoid, ref_dense, ref_lstm  # noqa: E402

ATOL = KERAS_PARITY_ATOL
RTOL = 0.0


def _weights(rng, D, H, scale=0.5):
    W = (rng.standard_normal((D, 4 * H)) * scale).astype(np.float32)
    U = (rng.standard_normal((H, 4 * H)) * scale).astype(np.float32)
    b = (rng.standard_normal(4 * H) * scale).astype(np.float32)
    return W, U, b


def _keras_lstm(x, W, U, b, initial_state=None, mask=None, **kw):
    H = U.shape[0]
    use_bias = b is not None
    layer = keras.layers.LSTM(H, use_bias=use_bias, **kw)
    layer.build(x.shape)
    layer.set_weights([W, U, b] if use_bias else [W, U])
    call_kw = {}
    if mask is not None:
        call_kw["mask"] = keras.ops.convert_to_tensor(mask)
    if initial_state is not None:
        call_kw["initial_state"] = [keras.ops.convert_to_tensor(s) for s in initial_state]
    out = layer(keras.ops.convert_to_tensor(x), **call_kw)
    if isinstance(out, (list, tuple)):
        return [keras.ops.convert_to_numpy(o) for o in out]
    return keras.ops.convert_to_numpy(out)


def _compare(k, r, assert_close):
    if isinstance(k, list):
        assert isinstance(r, list) and len(k) == len(r)
        for name, kk, rr in zip(("output", "h", "c"), k, r):
            assert_close(kk, rr, ATOL, RTOL, what=name)
    else:
        assert_close(k, r, ATOL, RTOL)


def _run_both(rng, B, T, D, H, assert_close, mask=None, init=False, bias=True, **kw):
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    W, U, b = _weights(rng, D, H)
    if not bias:
        b = None
    st = None
    if init:
        st = [rng.standard_normal((B, H)).astype(np.float32) for _ in range(2)]
    k = _keras_lstm(x, W, U, b, initial_state=st, mask=mask, **kw)
    r = ref_lstm(x, W, U, b, initial_state=st, mask=mask, **kw)
    _compare(k, r, assert_close)
    return k, r, st


# ---------------------------------------------------------------------------- LSTM, no mask
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_lstm_plain(rng, assert_close, return_sequences, go_backwards):
    _run_both(rng, 3, 6, 4, 5, assert_close, init=True, return_state=True,
              return_sequences=return_sequences, go_backwards=go_backwards)


@pytest.mark.parametrize(
    "activation,recurrent_activation",
    [("tanh", "sigmoid"), ("tanh", "hard_sigmoid"), ("relu", "sigmoid"),
     ("linear", "sigmoid"), ("softsign", "hard_sigmoid"), ("tanh", "tanh")],
)
def test_lstm_activations(rng, assert_close, activation, recurrent_activation):
    _run_both(rng, 2, 5, 3, 4, assert_close, return_sequences=True, return_state=True,
              activation=activation, recurrent_activation=recurrent_activation)


def test_lstm_no_bias_and_t1(rng, assert_close):
    _run_both(rng, 2, 1, 3, 4, assert_close, bias=False, return_state=True)
    _run_both(rng, 1, 4, 1, 1, assert_close, bias=False, return_sequences=True)


def test_hard_sigmoid_definition():
    # Keras 3: relu6(x + 3) / 6, i.e. slope 1/6, saturating at |x| >= 3.
    z = np.array([-10.0, -3.0, -2.9, -1.0, 0.0, 0.5, 2.9, 3.0, 10.0], dtype=np.float32)
    k = keras.ops.convert_to_numpy(keras.activations.hard_sigmoid(z))
    np.testing.assert_allclose(k, _hard_sigmoid(z.astype(np.float64)), atol=1e-7)
    np.testing.assert_allclose(k[[0, 1, 7, 8]], [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(k[4], 0.5)


# ---------------------------------------------------------------------------- LSTM masking
def _left_pad_mask(B, T):
    m = np.ones((B, T), dtype=bool)
    for i in range(B):
        m[i, : min(i + 1, T - 1)] = False
    return m


def _right_pad_mask(B, T):
    m = np.ones((B, T), dtype=bool)
    for i in range(B):
        m[i, T - min(i + 1, T - 1):] = False
    return m


@pytest.mark.parametrize("zero_output_for_mask", [False, True])
def test_left_padding_outputs_zero_not_h0(rng, assert_close, zero_output_for_mask):
    B, T = 3, 6
    mask = _left_pad_mask(B, T)
    k, _, st = _run_both(rng, B, T, 3, 4, assert_close, mask=mask, init=True,
                         return_sequences=True, return_state=True,
                         zero_output_for_mask=zero_output_for_mask)
    seq = k[0]
    # Keras: masked steps before any unmasked step output zeros, even with a nonzero h0.
    for i in range(B):
        lead = int(np.argmax(mask[i]))
        assert lead > 0
        assert np.all(seq[i, :lead] == 0.0)
        assert np.any(seq[i, lead] != 0.0)


@pytest.mark.parametrize("zero_output_for_mask", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_right_padding(rng, assert_close, zero_output_for_mask, return_sequences):
    B, T = 3, 6
    mask = _right_pad_mask(B, T)
    k, _, _ = _run_both(rng, B, T, 3, 4, assert_close, mask=mask, init=True,
                        return_sequences=return_sequences, return_state=True,
                        zero_output_for_mask=zero_output_for_mask)
    out, h, c = k
    if return_sequences:
        last = out[:, -1]
    else:
        last = out
    if zero_output_for_mask:
        # Keras returns the (zeroed) output of the last processed step, not h.
        assert np.all(last == 0.0)
        assert np.all(np.any(h != 0.0, axis=1))
    else:
        # Without it, the output of a masked step repeats the last unmasked output == h.
        np.testing.assert_array_equal(last, h)


@pytest.mark.parametrize("zero_output_for_mask", [False, True])
def test_go_backwards_order_and_mask(rng, assert_close, zero_output_for_mask):
    B, T, D, H = 2, 5, 3, 4
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    W, U, b = _weights(rng, D, H)
    mask = _right_pad_mask(B, T)
    kw = dict(return_sequences=True, return_state=True,
              zero_output_for_mask=zero_output_for_mask)
    kb = _keras_lstm(x, W, U, b, mask=mask, go_backwards=True, **kw)
    rb = ref_lstm(x, W, U, b, mask=mask, go_backwards=True, **kw)
    _compare(kb, rb, assert_close)
    # Keras' go_backwards sequence is the forward LSTM over the reversed input, in that
    # (processing) order, with the mask reversed alongside.
    kf = _keras_lstm(x[:, ::-1].copy(), W, U, b, mask=mask[:, ::-1].copy(), **kw)
    for a, e in zip(kb, kf):
        assert_close(a, e, ATOL, RTOL)
    # Right padding becomes leading padding when processed backwards: zeros first.
    assert np.all(kb[0][1, :2] == 0.0)


def test_go_backwards_last_output(rng, assert_close):
    _run_both(rng, 2, 5, 3, 4, assert_close, go_backwards=True,
              mask=_left_pad_mask(2, 5), init=True, return_state=True)


@pytest.mark.parametrize("zero_output_for_mask", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_all_false_row(rng, assert_close, zero_output_for_mask, return_sequences):
    B, T = 3, 4
    mask = rng.random((B, T)) < 0.6
    mask[0] = True
    mask[1] = False
    k, _, st = _run_both(rng, B, T, 3, 4, assert_close, mask=mask, init=True,
                         return_sequences=return_sequences, return_state=True,
                         zero_output_for_mask=zero_output_for_mask)
    out, h, c = k
    # A row that is masked everywhere: zero output, states equal to the initial states.
    assert np.all(out[1] == 0.0)
    np.testing.assert_array_equal(h[1], st[0][1])
    np.testing.assert_array_equal(c[1], st[1][1])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("zero_output_for_mask", [False, True])
def test_random_mask(assert_close, seed, go_backwards, zero_output_for_mask):
    rng = np.random.default_rng(seed)
    B, T = 4, 7
    mask = rng.random((B, T)) < 0.5
    _run_both(rng, B, T, 3, 5, assert_close, mask=mask, init=bool(seed),
              return_sequences=True, return_state=True, go_backwards=go_backwards,
              zero_output_for_mask=zero_output_for_mask)
    _run_both(rng, B, T, 3, 5, assert_close, mask=mask, init=bool(seed),
              go_backwards=go_backwards, zero_output_for_mask=zero_output_for_mask)


# ---------------------------------------------------------------------------- Dense
@pytest.mark.parametrize(
    "activation", [None, "linear", "softmax", "log_softmax", "sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3), (2, 2, 3, 3)])
def test_dense(rng, assert_close, activation, shape):
    D, N = shape[-1], 6
    x = rng.standard_normal(shape).astype(np.float32)
    W = rng.standard_normal((D, N)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    for use_bias in (True, False):
        layer = keras.layers.Dense(N, activation=activation, use_bias=use_bias)
        layer.build(shape)
        layer.set_weights([W, b] if use_bias else [W])
        k = keras.ops.convert_to_numpy(layer(x))
        r = ref_dense(x, W, b if use_bias else None, activation)
        assert_close(k, r, ATOL, RTOL, what=f"dense {activation} bias={use_bias}")


@pytest.mark.parametrize("activation", ["softmax", "log_softmax"])
def test_dense_softmax_large_logits(assert_close, activation):
    # Logits of order +-1e4: a naive exp overflows; both must stay finite.
    x = np.array([[1.0, -1.0], [0.5, 0.25], [-1.0, 1.0]], dtype=np.float32)
    W = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1.0]], dtype=np.float32)
    layer = keras.layers.Dense(3, activation=activation, use_bias=False)
    layer.build(x.shape)
    layer.set_weights([W])
    k = keras.ops.convert_to_numpy(layer(x))
    r = ref_dense(x, W, None, activation)
    assert np.all(np.isfinite(r))
    # log_softmax of -2e4-size logits is ~-2e4: float32 spacing there is ~2e-3.
    atol = ATOL if activation == "softmax" else 1e-6 * np.abs(r).max() + ATOL
    assert_close(k, r, atol, RTOL)


def test_nan_in_masked_step_does_not_leak(assert_close):
    # A masked step's input is ignored entirely (Keras selects, it does not multiply):
    # NaN there leaves the row finite; NaN at an unmasked step poisons the rest of its row.
    rng = np.random.default_rng(5)
    B, T, D, H = 3, 5, 2, 3
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    W, U, b = _weights(rng, D, H)
    mask = np.ones((B, T), dtype=bool)
    mask[0, 1] = False
    x[0, 1, 0] = np.nan
    x[1, 2, 1] = np.nan
    for zofm in (False, True):
        kw = dict(return_sequences=True, return_state=True, zero_output_for_mask=zofm)
        k = _keras_lstm(x, W, U, b, mask=mask, **kw)
        r = ref_lstm(x, W, U, b, mask=mask, **kw)
        _compare(k, r, assert_close)
        assert np.all(np.isfinite(k[0][0])) and np.all(np.isfinite(k[0][2]))
        assert np.all(np.isfinite(k[0][1, :2])) and np.all(np.isnan(k[0][1, 2:]))
