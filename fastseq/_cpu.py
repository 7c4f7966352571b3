"""CPU backend: drives the Numba kernels over chunks of time steps / rows.

Inputs arrive validated: contiguous NumPy arrays of one float dtype.
"""
import numba
import numpy as np

from . import config
from .kernels import lstm_cpu, dense_cpu
from .kernels.activations import ACTIVATION_CODES

_DENSE_CODES = dict(ACTIVATION_CODES)
_DENSE_CODES["softmax"] = dense_cpu.DENSE_SOFTMAX
_DENSE_CODES["log_softmax"] = dense_cpu.DENSE_LOG_SOFTMAX


def chunk_steps(B, G, itemsize, T):
    """Steps per chunk so the [B, Tc, G] projection buffer holds about CHUNK_BYTES."""
    return int(max(1, min(T, config.CHUNK_BYTES // max(1, B * G * itemsize))))


def lstm_forward(x, W, U, b, h0, c0, mask, *, go_backwards, return_sequences,
                 zero_output_for_mask, act, rec):
    """x [B, T, D], W [D, 4H], U [H, 4H], b [4H], h0/c0 [B, H] or None, mask [B, T]
    bool or None.  Returns (output, h, c): output is [B, T, H] (processing order) with
    return_sequences, else the last output [B, H]."""
    B, T, D = x.shape
    H = U.shape[0]
    G = 4 * H
    dt = x.dtype
    h = np.zeros((B, H), dt) if h0 is None else h0.copy()
    c = np.zeros((B, H), dt) if c0 is None else c0.copy()
    if B == 0:
        out = np.zeros((0, T, H) if return_sequences else (0, H), dt)
        return out, h, c
    seen = np.zeros(B, np.uint8)
    if mask is None:
        m8 = np.ones((B, T), np.uint8)
    else:
        m8 = mask.view(np.uint8) if mask.dtype == np.bool_ else (mask != 0).view(np.uint8)
        if go_backwards:
            m8 = m8[:, ::-1]
        m8 = np.ascontiguousarray(m8)
    if go_backwards:
        x = x[:, ::-1]
    out = np.empty((B, T, H), dt) if return_sequences else np.empty((1, 1, 1), dt)

    Tc = chunk_steps(B, G, dt.itemsize, T)
    use_gemm = B >= config.GEMM_MIN_BATCH
    nthreads = numba.get_num_threads()
    xin = np.empty((B, Tc, D), dt)          # contiguous copy of the chunk's inputs
    xw = np.empty((B, Tc, G), dt)           # its projection x W
    zu = np.empty((B, G), dt) if use_gemm else None
    for s0 in range(0, T, Tc):
        n = min(Tc, T - s0)
        if n != Tc:
            xin = np.empty((B, n, D), dt)
            xw = np.empty((B, n, G), dt)
        xin[...] = x[:, s0:s0 + n]
        np.matmul(xin.reshape(B * n, D), W, out=xw.reshape(B * n, G))
        mc = m8[:, s0:s0 + n]
        if not mc.flags.c_contiguous:
            mc = np.ascontiguousarray(mc)
        oc = out[:, s0:s0 + n] if return_sequences else out
        if use_gemm:
            for s in range(n):
                np.matmul(h, U, out=zu)
                lstm_cpu.lstm_step_pointwise(zu, xw, s, b, h, c, seen, mc, oc,
                                             return_sequences, zero_output_for_mask,
                                             act, rec)
        else:
            lstm_cpu.lstm_chunk_fused(xw, U, b, h, c, seen, mc, oc, return_sequences,
                                      zero_output_for_mask, act, rec, nthreads)
    if return_sequences:
        return out, h, c
    # the last output as Keras defines it: the output of the final step
    last_on = m8[:, T - 1] != 0
    keep = last_on | ((seen != 0) & (not zero_output_for_mask))
    last = np.where(keep[:, None], h, np.zeros_like(h))
    return last, h, c


def dense_forward(x2, W, b, activation):
    """x2 [N, D] @ W [D, K] + b [K], activation fused per chunk of rows.  Returns [N, K]."""
    N, D = x2.shape
    K = W.shape[1]
    code = _DENSE_CODES[activation]
    y = np.empty((N, K), x2.dtype)
    if N == 0:
        return y
    step = max(1, int(config.DENSE_CHUNK_ROWS))
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        yc = y[r0:r1]
        np.matmul(x2[r0:r1], W, out=yc)
        dense_cpu.bias_act_inplace(yc, b, code)
    return y
