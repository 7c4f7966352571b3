"""Plain, slow float64 NumPy reference for the fastseq ops.

Written directly from the maths of a Keras 3 ``LSTM`` / ``Dense`` layer, one time step and
one gate at a time, with no attempt at speed.  Everything is computed in float64 whatever
the input dtype.  ``tests/test_reference_vs_keras.py`` checks these functions against real
Keras layers; the kernel tests then compare fastseq against them.

Keras 3 (TensorFlow backend, non-cuDNN loop) masking semantics reproduced here, each one
checked against Keras in ``test_reference_vs_keras.py``:

* A masked step leaves both states (h, c) unchanged.
* The output of a masked step is the previous *output* (not the state h), or zero with
  ``zero_output_for_mask=True``.  The "previous output" before the first step is zero, so
  masked steps before any unmasked step output zeros even when an initial state is given.
* ``return_sequences=False`` returns the output of the last *processed* step, masking
  applied, i.e. with ``zero_output_for_mask=True`` and right padding it is all zeros.
* ``go_backwards=True`` processes the time axis in reverse (the mask is reversed with it)
  and the returned sequence is in processing order (reversed with respect to the input).
* ``return_state`` returns the carried states (h, c) after the last step: for a row whose
  mask is all False they equal the initial states, and the output is all zeros.
"""
import numpy as np


def _sigmoid(x):
    # Stable in both directions; float64 in, float64 out.
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def _hard_sigmoid(x):
    # Keras 3 definition: relu6(x + 3) / 6  (0 for x <= -3, 1 for x >= 3, x/6 + 1/2 between).
    return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def _relu(x):
    return np.maximum(x, 0.0)


def _linear(x):
    return x.copy()


def _softsign(x):
    return x / (1.0 + np.abs(x))


LSTM_ACTIVATIONS = {
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "hard_sigmoid": _hard_sigmoid,
    "relu": _relu,
    "linear": _linear,
    None: _linear,
    "softsign": _softsign,
}


def _f64(a):
    return np.array(a, dtype=np.float64, copy=True)


def ref_lstm(
    x,
    kernel,
    recurrent_kernel,
    bias=None,
    initial_state=None,
    mask=None,
    return_sequences=False,
    return_state=False,
    go_backwards=False,
    zero_output_for_mask=False,
    activation="tanh",
    recurrent_activation="sigmoid",
):
    """Keras 3 LSTM forward pass in float64.

    x [B, T, D]; kernel [D, 4H]; recurrent_kernel [H, 4H]; bias [4H] or None;
    initial_state (h0, c0) each [B, H] or None (zeros); mask [B, T] bool or None.
    Gate order along the 4H axis: i, f, c (candidate), o.
    Returns output ([B, H] or [B, T, H]); with return_state, [output, h, c].
    """
    x = _f64(x)
    W = _f64(kernel)
    U = _f64(recurrent_kernel)
    B, T, D = x.shape
    H = U.shape[0]
    assert W.shape == (D, 4 * H) and U.shape == (H, 4 * H)
    b = np.zeros(4 * H) if bias is None else _f64(bias)
    assert b.shape == (4 * H,)
    act = LSTM_ACTIVATIONS[activation]
    ract = LSTM_ACTIVATIONS[recurrent_activation]

    if initial_state is None:
        h = np.zeros((B, H))
        c = np.zeros((B, H))
    else:
        h = _f64(initial_state[0]).reshape(B, H)
        c = _f64(initial_state[1]).reshape(B, H)
    m = np.ones((B, T), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    assert m.shape == (B, T)

    order = list(range(T - 1, -1, -1)) if go_backwards else list(range(T))
    outputs = np.zeros((B, T, H))
    prev_out = np.zeros((B, H))
    for k, t in enumerate(order):
        new_h = np.empty((B, H))
        new_c = np.empty((B, H))
        for bi in range(B):
            z = x[bi, t] @ W + h[bi] @ U + b
            zi, zf, zc, zo = z[:H], z[H:2 * H], z[2 * H:3 * H], z[3 * H:]
            i_g = ract(zi)
            f_g = ract(zf)
            o_g = ract(zo)
            cand = act(zc)
            new_c[bi] = f_g * c[bi] + i_g * cand
            new_h[bi] = o_g * act(new_c[bi])
        out = np.empty((B, H))
        for bi in range(B):
            if m[bi, t]:
                out[bi] = new_h[bi]
                h[bi] = new_h[bi]
                c[bi] = new_c[bi]
            elif zero_output_for_mask:
                out[bi] = 0.0
            else:
                out[bi] = prev_out[bi]
        outputs[:, k] = out
        prev_out = out

    result = outputs if return_sequences else outputs[:, -1].copy()
    if return_state:
        return [result, h.copy(), c.copy()]
    return result


def _softmax(z):
    zmax = z.max(axis=-1, keepdims=True)
    e = np.exp(z - zmax)
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(z):
    zmax = z.max(axis=-1, keepdims=True)
    s = z - zmax
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


DENSE_ACTIVATIONS = {
    None: _linear,
    "linear": _linear,
    "softmax": _softmax,
    "log_softmax": _log_softmax,
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "relu": _relu,
}


def ref_dense(x, kernel, bias=None, activation=None):
    """Keras 3 Dense in float64 over the last axis of x (any rank >= 1).

    x [..., D]; kernel [D, N]; bias [N] or None.  Returns [..., N].
    """
    x = _f64(x)
    W = _f64(kernel)
    D, N = W.shape
    assert x.shape[-1] == D
    lead = x.shape[:-1]
    x2 = x.reshape(-1, D)
    z = np.zeros((x2.shape[0], N))
    for r in range(x2.shape[0]):
        z[r] = x2[r] @ W
    if bias is not None:
        z = z + _f64(bias)
    return DENSE_ACTIVATIONS[activation](z).reshape(lead + (N,))
