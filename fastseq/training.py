"""Training fastseq models: loss and gradients with the gradients Keras computes,
Keras-style ``compile`` / ``train_on_batch`` / ``fit`` / ``evaluate``, weights in Keras
order, and saving to NumPy ``.npz`` + JSON.

Trainable models are the chains ``fastseq.from_keras`` imports, made of::

    [Embedding | Masking] -> (LSTM | Bidirectional(LSTM) | Dense)* -> Dense(softmax)

(``Dense`` or ``TimeDistributed(Dense)``; ``Identity`` layers pass through) trained with
the sparse categorical cross-entropy.  Masking, ``go_backwards``,
``zero_output_for_mask``, ``return_sequences=False`` (many-to-one), stacked layers and
every Bidirectional merge mode but None are supported.

**Loss** (as Keras 3's ``reduce_weighted_values`` with ``sum_over_batch_size``): with a
mask (Embedding(mask_zero=True) or Masking), ``sum(loss * mask * sample_weight) /
count(mask)``; without, ``sum(loss * sample_weight) / number of entries``.  A last
``Dense(activation="softmax")`` gives its logits to the loss; a
``TimeDistributed(Dense(softmax))`` output reaches it as probabilities, which Keras clips
to ``[1e-7, 1 - 1e-7]`` before the log; both are reproduced (see kernels/xent_cpu.py).
``sample_weight``: [B] (one weight per sequence) or [B, T] (per step).

**Gradients** are listed in the order of ``keras_model.trainable_weights``: per layer,
Embedding [embeddings], LSTM [kernel, recurrent_kernel, bias], Bidirectional [forward
kernel, recurrent_kernel, bias, backward kernel, recurrent_kernel, bias], Dense [kernel,
bias] (no bias entry for layers without one).

**Speed**: the work runs on ``fastseq.get_num_threads()`` threads.  In a model with a
Bidirectional layer the two directions run in two threads; the batch is split into row
groups for the remaining threads (each group runs the whole forward and backward pass;
the groups' gradients are summed).  Every GEMM runs single-threaded in the thread that
needs it (BLAS is limited to one thread during a pass).  Rows are sorted by length so the
recurrent GEMM of a step covers only the rows still active, and trailing steps masked in
every row of a group are not computed when that cannot change the result.  Kernels:
kernels/lstm_bwd_cpu.py (LSTM forward with saved state, BPTT) and kernels/xent_cpu.py
(last Dense + softmax + cross-entropy, forward and backward in chunks of rows).

Dropout is not applied: layers imported as ``Dropout``-like records are refused, and an
LSTM with nonzero ``dropout``/``recurrent_dropout`` is refused as well.
"""
import concurrent.futures
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import _validate
from . import optimizers as _optimizers
from ._threads import get_num_threads
from .config import DENSE_CHUNK_ROWS
from .kernels import lstm_bwd_cpu as _lk
from .kernels import xent_cpu as _xk
from .kernels.activations import ACTIVATION_CODES
from .optimizers import SparseRows

__all__ = ["loss_and_gradients", "compile", "train_on_batch", "fit", "evaluate",
           "trainable_weights", "get_weights", "set_weights", "to_keras", "save", "load",
           "lstm_vjp", "SparseRows"]

# Row groups have at least this many rows (smaller groups make the per-step GEMMs
# inefficient).
MIN_ROWS_PER_THREAD = 8
# Keras's backend.epsilon(): the clip of probabilities in the cross-entropy.
KERAS_EPSILON = 1e-7
# Activations of Dense layers inside the chain (the last Dense has its own path).
_HIDDEN_DENSE_ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid")
_REFUSED = {"Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout",
            "AlphaDropout"}


# --- the model as a list of trainable ops ---------------------------------------------
class _LSTM:
    """One LSTM record (or the same attributes in a namespace) in training."""

    def __init__(self, rec, dtype, device="cpu"):
        self.rec = rec
        self.W = rec.kernel
        self.U = rec.recurrent_kernel
        self.H = self.U.shape[0]
        self.b = rec.bias if rec.bias is not None else np.zeros(4 * self.H, dtype)
        self.act = ACTIVATION_CODES[rec.activation]
        self.rec_act = ACTIVATION_CODES[rec.recurrent_activation]
        self.dtype = dtype
        self.device = device      # "cuda": the recurrences run on the GPU

    def weights(self):
        r = self.rec
        return [r.kernel, r.recurrent_kernel] + ([r.bias] if r.bias is not None else [])

    def run_forward(self, x, m8, h0=None, c0=None):
        """x [T, B, D] (C-contiguous, input order), m8 [T, B] uint8 -> out [T, B, H]
        (input order) and what the backward pass needs."""
        T, B, D = x.shape
        if self.device == "cuda":
            from . import _cuda
            r = self.rec
            out, saved = _cuda.lstm_train_forward_cuda(
                x, self.W, self.U, self.b, m8, h0, c0, go_backwards=r.go_backwards,
                zero_output_for_mask=r.zero_output_for_mask, act=r.activation,
                rec=r.recurrent_activation)
            return out, None, None, ("cuda", saved)
        nact = _active_rows(m8)
        H, dt = self.H, self.dtype
        if isinstance(x, _TokenRows):
            # one projection per distinct token, looked up by the kernel
            xw, idx = np.matmul(x.rows, self.W), x.inv
        else:
            xw = np.matmul(x.reshape(T * B, D), self.W)
            idx = np.arange(T * B, dtype=np.int64).reshape(T, B)
        h = np.zeros((B, H), dt) if h0 is None else np.array(h0, dt, order="C")
        c = np.zeros((B, H), dt) if c0 is None else np.array(c0, dt, order="C")
        hprev = np.empty((T, B, H), dt)
        cprev = np.empty((T, B, H), dt)
        gates = np.empty((T, B, 4 * H), dt)
        actc = np.empty((T, B, H), dt)
        out = np.empty((T, B, H), dt)
        zu = np.empty((B, 4 * H), dt)
        _lk.lstm_train_forward(xw, idx, np.ascontiguousarray(self.U, dtype=dt), self.b,
                               m8, nact, int(self.rec.go_backwards), h, c, hprev, cprev,
                               gates, actc, out, zu, int(self.rec.zero_output_for_mask),
                               self.act, self.rec_act)
        saved = (x, m8, nact, hprev, cprev, gates, actc)
        return out, h, c, saved

    def run_backward(self, saved, dout, dh=None, dc=None, need_dx=True):
        """dout [T, B, H] (input order) -> dx [T, B, D] or None, [dW, dU, (db)],
        dh0, dc0."""
        if _on_gpu(saved):
            from . import _cuda
            dx, dW, dU, db, dh0, dc0 = _cuda.lstm_train_backward_cuda(
                saved[1], dout, dh, dc, need_dx)
            grads = [dW, dU] + ([db] if self.rec.bias is not None else [])
            return dx, grads, dh0, dc0
        x, m8, nact, hprev, cprev, gates, actc = saved
        T, B, D = x.shape
        H, dt = self.H, self.dtype
        dz = np.empty((T, B, 4 * H), dt)
        dh = np.zeros((B, H), dt) if dh is None else np.array(dh, dt, order="C")
        dc = np.zeros((B, H), dt) if dc is None else np.array(dc, dt, order="C")
        carry = np.zeros((B, H), dt)
        dhu = np.empty((B, H), dt)
        _lk.lstm_train_backward(np.ascontiguousarray(dout, dtype=dt), self.U, m8, nact,
                                int(self.rec.go_backwards), gates, actc, cprev, dz, dh,
                                dc, carry, dhu, int(self.rec.zero_output_for_mask),
                                self.act, self.rec_act)
        dz2 = dz.reshape(T * B, 4 * H)
        if isinstance(x, _TokenRows):
            # X^T dZ = (rows of the distinct tokens)^T (dZ summed per token)
            dzu = np.zeros((len(x.rows), 4 * H), dt)
            _lk.sum_rows_by_index(x.inv.reshape(-1), dz2, dzu)
            dW = np.matmul(x.rows.T, dzu)
        else:
            dW = np.matmul(x.reshape(T * B, D).T, dz2)
        grads = [dW, np.matmul(hprev.reshape(T * B, H).T, dz2)]
        if self.rec.bias is not None:
            grads.append(dz2.sum(axis=0))
        dx = np.matmul(dz2, self.W.T).reshape(T, B, D) if need_dx else None
        return dx, grads, dh, dc

    # as a layer of the chain
    def forward(self, x, mask, pool=None):
        T, B, _ = x.shape
        m8 = mask if mask is not None else np.ones((T, B), np.uint8)
        if not isinstance(x, _TokenRows):
            x = np.ascontiguousarray(x, dtype=self.dtype)
        out, _, _, saved = self.run_forward(x, m8)
        gb = self.rec.go_backwards
        if self.rec.return_sequences:
            return (out[::-1] if gb else out), mask, saved
        return out[0 if gb else T - 1], None, saved

    def backward(self, saved, dy, need_dx=True, pool=None):
        T, B = saved[1]["shape"][:2] if _on_gpu(saved) else saved[0].shape[:2]
        if self.rec.return_sequences:
            dout = dy[::-1] if self.rec.go_backwards else dy
        else:
            dout = np.zeros((T, B, self.H), self.dtype)
            dout[0 if self.rec.go_backwards else T - 1] = dy
        dx, grads, _, _ = self.run_backward(saved, dout, need_dx=need_dx)
        return dx, grads


def _on_gpu(saved):
    """Whether ``saved`` came from the CUDA forward pass of an _LSTM."""
    return isinstance(saved[0], str) and saved[0] == "cuda"


class _Bidirectional:
    def __init__(self, rec, dtype, device="cpu"):
        self.rec = rec
        self.fwd = _LSTM(rec.forward_layer, dtype, device)
        self.bwd = _LSTM(rec.backward_layer, dtype, device)
        self.mode = rec.merge_mode
        self.rs = rec.forward_layer.return_sequences

    def weights(self):
        return self.fwd.weights() + self.bwd.weights()

    def forward(self, x, mask, pool=None):
        # with a pool, the backward direction runs in another thread
        fut = pool.submit(self.bwd.forward, x, mask) if pool is not None else None
        yf, out_mask, sf = self.fwd.forward(x, mask)
        yb, _, sb = fut.result() if fut is not None else self.bwd.forward(x, mask)
        if self.rs:
            yb = yb[::-1]
        if self.mode == "concat":
            y = np.concatenate([yf, yb], axis=-1)
        elif self.mode == "sum":
            y = yf + yb
        elif self.mode == "ave":
            y = (yf + yb) / yf.dtype.type(2)
        else:  # mul
            y = yf * yb
        return y, out_mask, (sf, sb, yf, yb)

    def backward(self, saved, dy, need_dx=True, pool=None):
        sf, sb, yf, yb = saved
        if self.mode == "concat":
            H = yf.shape[-1]
            dyf, dyb = dy[..., :H], dy[..., H:]
        elif self.mode == "sum":
            dyf = dyb = dy
        elif self.mode == "ave":
            dyf = dyb = dy / dy.dtype.type(2)
        else:
            dyf, dyb = dy * yb, dy * yf
        if self.rs:
            dyb = dyb[::-1]
        fut = pool.submit(self.bwd.backward, sb, dyb, need_dx) if pool is not None \
            else None
        dxf, gf = self.fwd.backward(sf, dyf, need_dx)
        dxb, gb = fut.result() if fut is not None else self.bwd.backward(sb, dyb, need_dx)
        if need_dx:
            dxf += dxb
        dx = dxf
        return dx, gf + gb


def _check_no_dropout(fn, where, rec):
    if getattr(rec, "dropout", 0.0) or getattr(rec, "recurrent_dropout", 0.0):
        raise ValueError(f"{fn}: {where} has dropout={rec.dropout}, recurrent_dropout="
                         f"{rec.recurrent_dropout}; training with dropout is not "
                         f"supported (fastseq trains without it): set them to 0")


def _active_rows(m8):
    """nact [T]: 1 + the last unmasked row at each time (rows after it are masked)."""
    T, B = m8.shape
    any_on = m8[:, ::-1] != 0
    last = B - np.argmax(any_on, axis=1)
    return np.where(any_on.any(axis=1), last, 0).astype(np.int64)


def _act_forward(name, z):
    if name == "relu":
        return np.maximum(z, 0, out=z)
    if name == "tanh":
        return np.tanh(z, out=z)
    if name == "sigmoid":
        from scipy.special import expit
        return expit(z, out=z)
    return z


def _act_backward(name, y, dy):
    one = y.dtype.type(1)
    if name == "relu":
        return dy * (y > 0)
    if name == "tanh":
        return dy * (one - y * y)
    if name == "sigmoid":
        return dy * (y * (one - y))
    return dy


class _Dense:
    """A Dense layer inside the chain (not the last one)."""

    def __init__(self, rec, dtype):
        self.rec = rec
        self.dtype = dtype

    def weights(self):
        r = self.rec
        return [r.kernel] + ([r.bias] if r.bias is not None else [])

    def forward(self, x, mask, pool=None):
        x2 = np.ascontiguousarray(x, dtype=self.dtype).reshape(-1, x.shape[-1])
        z = np.matmul(x2, self.rec.kernel)
        if self.rec.bias is not None:
            z += self.rec.bias
        y = _act_forward(self.rec.activation, z)
        return y.reshape(x.shape[:-1] + (y.shape[-1],)), mask, (x2, y, x.shape)

    def backward(self, saved, dy, need_dx=True, pool=None):
        x2, y, shape = saved
        dz = _act_backward(self.rec.activation, y, dy.reshape(y.shape))
        grads = [np.matmul(x2.T, dz)] + ([dz.sum(axis=0)] if self.rec.bias is not None
                                         else [])
        dx = np.matmul(dz, self.rec.kernel.T).reshape(shape) if need_dx else None
        return dx, grads


class _Identity:
    def weights(self):
        return []

    def forward(self, x, mask, pool=None):
        return x, mask, None

    def backward(self, saved, dy, need_dx=True, pool=None):
        return dy, []


class _Final:
    """The last Dense layer fused with softmax and the cross-entropy."""

    def __init__(self, rec, dtype, mode):
        self.rec = rec
        self.dtype = dtype
        self.mode = mode
        self.W = rec.kernel
        K = self.W.shape[1]
        self.b = rec.bias if rec.bias is not None else np.zeros(K, dtype)

    def weights(self):
        r = self.rec
        return [r.kernel] + ([r.bias] if r.bias is not None else [])

    def run(self, x2, labels, weights, scale, need_dx=True):
        """x2 [N, D] -> (stats [3], dx [N, D], [dW, (db)])."""
        N, D = x2.shape
        K = self.W.shape[1]
        dt = self.dtype
        rows = int(max(1, min(N, DENSE_CHUNK_ROWS)))
        z = np.empty((rows, K), dt)
        tmp = np.empty((D, K), dt)
        pbuf = np.empty(K, dt)
        dW = np.zeros((D, K), dt)
        db = np.zeros(K, dt)
        dx = np.empty((N, D), dt)
        stats = np.zeros(3, np.float64)
        _xk.dense_xent(x2, self.W, self.W.T, self.b, labels, weights, dt.type(scale),
                       self.mode, KERAS_EPSILON, z, tmp, pbuf, dW, db, dx, stats)
        grads = [dW] + ([db] if self.rec.bias is not None else [])
        return stats, dx, grads


class _TokenRows:
    """An Embedding's output [T, B, E] kept as token ids, for the LSTM that reads it:
    x[t, b] = rows[inv[t, b]], where rows are the embeddings of the batch's distinct
    tokens.  The LSTM computes its input projection x W once per distinct token, and
    its kernel gradient X^T dZ from the per-token sums of dZ (on EWT batches of 32
    sentences, 44% of the positions are distinct tokens)."""

    def __init__(self, embeddings, ids_t):
        uniq, inv = np.unique(ids_t, return_inverse=True)
        self.rows = np.take(embeddings, uniq, axis=0)       # [U, E]
        self.inv = inv.reshape(ids_t.shape).astype(np.int64)  # [T, B]
        self.shape = ids_t.shape + (embeddings.shape[1],)


class _Embedding:
    def __init__(self, rec):
        self.rec = rec
        self.token_rows = False     # set by _Plan when the next op is an LSTM on the CPU

    def weights(self):
        return [self.rec.embeddings]

    def forward(self, ids_t, mask, pool=None):
        if self.rec.mask_zero:
            mask = (ids_t != 0).view(np.uint8)
        if self.token_rows:
            return _TokenRows(self.rec.embeddings, ids_t), mask, ids_t
        return np.take(self.rec.embeddings, ids_t, axis=0), mask, ids_t

    def backward(self, ids_t, dy, need_dx=True, pool=None):
        E = self.rec.embeddings
        return None, [SparseRows(ids_t.reshape(-1), dy.reshape(-1, E.shape[1]), E.shape)]


class _Masking:
    def __init__(self, rec, dtype):
        self.rec = rec
        self.dtype = dtype

    def weights(self):
        return []

    def forward(self, x, mask, pool=None):
        mv = self.dtype.type(self.rec.mask_value)
        keep = np.any(x != mv, axis=-1)
        return np.where(keep[..., None], x, self.dtype.type(0)), keep.view(np.uint8), None

    def backward(self, saved, dy, need_dx=True, pool=None):
        return None, []


class _Plan:
    """What a model needs for training, checked once per call."""

    def __init__(self, model, from_logits=False, fn="training"):
        layers = [l for l in getattr(model, "layers", None) or []]
        if not layers:
            raise TypeError(f"{fn}: `model` must be a fastseq.Model with layers, got "
                            f"{type(model).__name__}")
        dtypes = {np.dtype(l.dtype) for l in layers}
        if len(dtypes) != 1:
            raise ValueError(f"{fn}: the model mixes compute dtypes "
                             f"{sorted(map(str, dtypes))}; training needs one dtype for "
                             f"every layer")
        self.dtype = dt = dtypes.pop()
        self.model = model
        # a model imported with device="cuda" runs its LSTM recurrences (forward and
        # backward) on the GPU; the rest of the step stays on the CPU
        self.device = "cuda" if getattr(model, "device", "cpu") == "cuda" else "cpu"
        self.ops = []
        self.mask_source = None
        self.tokens = False
        self.seq_output = True
        self.trimmable = True
        self.bidirectional = False
        last = layers[-1]
        for i, rec in enumerate(layers[:-1]):
            kind = type(rec).__name__
            where = f"layer {rec.name!r} ({rec.keras_class})"
            if kind == "Embedding":
                if i != 0:
                    raise ValueError(f"{fn}: {where} must be the first layer")
                self.ops.append(_Embedding(rec))
                self.tokens = True
                if rec.mask_zero:
                    self.mask_source = "embedding"
            elif kind == "Masking":
                if i != 0:
                    raise ValueError(f"{fn}: {where}: training supports Masking only as "
                                     f"the first layer")
                self.ops.append(_Masking(rec, dt))
                self.mask_source = "masking"
            elif kind == "LSTM":
                self._check_seq(fn, where)
                _check_no_dropout(fn, where, rec)
                self.ops.append(_LSTM(rec, dt, self.device))
                if not rec.return_sequences:
                    self.seq_output = False
                elif rec.go_backwards:
                    self.trimmable = False  # reversed sequence, mask in input order
            elif kind == "Bidirectional":
                self._check_seq(fn, where)
                _check_no_dropout(fn, where, rec.forward_layer)
                _check_no_dropout(fn, where, rec.backward_layer)
                if rec.merge_mode not in ("concat", "sum", "ave", "mul"):
                    raise ValueError(f"{fn}: {where} has merge_mode={rec.merge_mode!r}; "
                                     f"training supports concat, sum, ave and mul")
                self.ops.append(_Bidirectional(rec, dt, self.device))
                self.bidirectional = True
                if not rec.return_sequences:
                    self.seq_output = False
            elif kind == "Dense":
                if rec.activation not in _HIDDEN_DENSE_ACTIVATIONS:
                    raise ValueError(f"{fn}: {where} has activation {rec.activation!r}; "
                                     f"hidden Dense layers support "
                                     f"{list(_HIDDEN_DENSE_ACTIVATIONS)}")
                self.ops.append(_Dense(rec, dt))
            elif kind == "Identity" and rec.keras_class not in _REFUSED:
                self.ops.append(_Identity())
            elif rec.keras_class in _REFUSED:
                raise ValueError(f"{fn}: {where}: training with dropout/noise layers is "
                                 f"not supported (fastseq trains without them); remove "
                                 f"the layer")
            else:
                raise ValueError(f"{fn}: {where} is not supported in training; supported: "
                                 f"Embedding, Masking, LSTM, Bidirectional(LSTM), Dense, "
                                 f"then a last Dense/TimeDistributed(Dense)")
        if type(last).__name__ != "Dense":
            raise ValueError(f"{fn}: the last layer {last.name!r} ({last.keras_class}) "
                             f"must be a Dense or TimeDistributed(Dense) layer with a "
                             f"softmax (sparse categorical cross-entropy)")
        if last.activation == "softmax" and not from_logits:
            # Keras's loss gets the softmax's logits from a plain Dense, unless the
            # output is cast to the loss's dtype (Keras's floatx) first: a float64 Dense
            # under float32 floatx loses them, and the loss takes the probabilities
            loss_dtype = _loss_dtype(model)
            cast = loss_dtype is not None and np.dtype(loss_dtype) != last.dtype
            mode = _xk.XENT_LOGITS if last.keras_class == "Dense" and not cast \
                else _xk.XENT_PROBS
        elif last.activation == "linear" and from_logits:
            mode = _xk.XENT_LOGITS
        else:
            raise ValueError(
                f"{fn}: the last layer {last.name!r} has activation {last.activation!r}; "
                f"the sparse categorical cross-entropy needs activation='softmax' (or "
                f"'linear' with from_logits=True), from_logits={from_logits}")
        self.final = _Final(last, dt, mode)
        if self.device == "cpu" and len(self.ops) > 1 and \
                isinstance(self.ops[0], _Embedding) and \
                isinstance(self.ops[1], (_LSTM, _Bidirectional)):
            self.ops[0].token_rows = True
        # has_weights_before[i]: some op before op i has weights (its input gradient is
        # needed); index len(ops) stands for the last layer.
        self.has_weights_before = [False]
        for op in self.ops:
            self.has_weights_before.append(self.has_weights_before[-1]
                                           or bool(op.weights()))
        self.classes = last.kernel.shape[1]
        if not self.seq_output:
            self.trimmable = False
        if self.mask_source is None:
            self.trimmable = False

    def _check_seq(self, fn, where):
        if not self.seq_output:
            raise ValueError(f"{fn}: {where} follows a recurrent layer with "
                             f"return_sequences=False; not supported")

    def weights(self):
        out = []
        for op in self.ops:
            out += op.weights()
        return out + self.final.weights()


# --- inputs ---------------------------------------------------------------------------
def _prepare(plan, x, y, sample_weight, fn):
    """Checked arrays: x [B, T] ids or [B, T, D] floats, labels like the output without
    its class axis, row weights (mask * sample_weight) and the loss denominator."""
    dt = plan.dtype
    try:
        x = np.asarray(x)
        y = np.asarray(y)
    except Exception as exc:
        raise TypeError(f"{fn}: `x` and `y` must be arrays ({exc})") from None
    if plan.tokens:
        if x.ndim != 2 or x.dtype.kind not in "iuf":
            raise ValueError(f"{fn}: `x` must be [B, T] integer token ids, got shape "
                             f"{x.shape} dtype {x.dtype}")
        if x.dtype.kind == "f":
            if not np.all(x == np.trunc(x)):
                raise ValueError(f"{fn}: `x` holds non-integer token ids")
        x = x.astype(np.int64, copy=False)
        V = plan.ops[0].rec.embeddings.shape[0]
        if x.size and (x.min() < 0 or x.max() >= V):
            raise ValueError(f"{fn}: `x` holds token ids outside [0, {V}): min {x.min()}, "
                             f"max {x.max()}")
    else:
        if x.ndim != 3 or x.dtype.kind not in "biuf":
            raise ValueError(f"{fn}: `x` must be [B, T, D] numbers, got shape {x.shape} "
                             f"dtype {x.dtype}")
        x = x.astype(dt, copy=False)
    B = x.shape[0]
    if B == 0 or x.shape[1] == 0:
        raise ValueError(f"{fn}: `x` must not be empty, got shape {x.shape}")
    want = (B, x.shape[1]) if plan.seq_output else (B,)
    if y.shape == want + (1,):
        y = y[..., 0]
    if y.shape != want:
        what = "[B, T]" if plan.seq_output else "[B]"
        raise ValueError(f"{fn}: `y` must have shape {what} = {want} (class ids), got "
                         f"{y.shape}")
    if y.dtype.kind not in "iuf" or (y.dtype.kind == "f" and not np.all(y == np.trunc(y))):
        raise ValueError(f"{fn}: `y` must hold integer class ids, got dtype {y.dtype}")
    if plan.mask_source == "embedding":
        mask = x != 0
    elif plan.mask_source == "masking":
        mask = np.any(x != dt.type(plan.ops[0].rec.mask_value), axis=-1)
    else:
        mask = None
    if not plan.seq_output:
        mask = None
    w = np.ones(want, dt)
    if sample_weight is not None:
        sw = np.asarray(sample_weight)
        if sw.dtype.kind not in "biuf":
            raise TypeError(f"{fn}: `sample_weight` must hold real numbers, got dtype "
                            f"{sw.dtype}")
        sw = sw.astype(dt, copy=False)
        if sw.shape == (B,) and plan.seq_output:
            sw = np.broadcast_to(sw[:, None], want)
        if sw.shape != want:
            shapes = f"({B},) or {want}" if plan.seq_output else f"({B},)"
            raise ValueError(f"{fn}: `sample_weight` must have shape {shapes}, got "
                             f"{sw.shape}")
        if not np.all(np.isfinite(sw)):
            raise ValueError(f"{fn}: `sample_weight` must be finite")
        w = w * sw
    # labels of rows that count must be valid classes (checked before the cast to
    # int32, which would wrap ids of 2**31 and more onto valid classes)
    counted = w != 0 if mask is None else (w != 0) & mask
    if np.any(counted & ((y < 0) | (y >= plan.classes))):
        raise ValueError(f"{fn}: `y` holds class ids outside [0, {plan.classes})")
    y = np.where(counted, y, 0).astype(np.int32)
    if mask is not None:
        w = w * mask
        denom = int(mask.sum())
    else:
        denom = int(np.prod(want))
    return x, y, w, denom, mask


# --- the passes -----------------------------------------------------------------------
def _time_major(a):
    return np.ascontiguousarray(np.swapaxes(a, 0, 1))


def _group_pass(plan, x, y, w, scale, want_grads, pool=None):
    """Forward (and backward) of one row group.  x [b, T...], y/w [b, T] or [b].
    ``pool``: an executor for the second direction of Bidirectional layers, or None."""
    h = _time_major(x)
    mask = None
    saved = []
    for op in plan.ops:
        h, mask, s = op.forward(h, mask, pool)
        saved.append(s)
    D = h.shape[-1]
    x2 = np.ascontiguousarray(h, dtype=plan.dtype).reshape(-1, D)
    if y.ndim == 2:
        labels, weights = _time_major(y).reshape(-1), _time_major(w).reshape(-1)
    else:
        labels, weights = y, w
    stats, dx, grads_last = plan.final.run(x2, labels, weights, scale)
    if not want_grads:
        return stats, None
    dh = dx.reshape(h.shape)
    grads = []
    for i in range(len(plan.ops) - 1, -1, -1):
        if not plan.has_weights_before[i + 1]:
            break  # nothing before this layer needs a gradient
        dh, g = plan.ops[i].backward(saved[i], dh, plan.has_weights_before[i], pool)
        grads = g + grads
    return stats, grads + grads_last


_POOLS = {}
_POOL_LOCK = threading.Lock()
_BLAS = None


def _forget_pools():
    """In a forked child: the parent's pool threads do not exist there (a job sent to
    them would wait for ever), and the lock may have been held at the fork."""
    global _POOL_LOCK
    _POOLS.clear()
    _POOL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)


def _executor(kind, n):
    """A shared thread pool with at least ``n`` workers ("groups" for row groups,
    "directions" for the second direction of Bidirectional layers)."""
    with _POOL_LOCK:
        pool = _POOLS.get(kind)
        if pool is None or pool._max_workers < n:
            pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=n, thread_name_prefix=f"fastseq-{kind}")
            _POOLS[kind] = pool
        return pool


class _NoLimit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _blas_one_thread():
    """A context limiting BLAS to one thread: every pass runs its GEMMs in the thread
    that calls them (the per-step GEMMs are small; parallelism comes from row groups
    and the two directions of Bidirectional layers)."""
    global _BLAS
    if _BLAS is None:
        try:
            import scipy.linalg  # noqa: F401 - loads the BLAS that Numba's np.dot calls
            from threadpoolctl import ThreadpoolController
            _BLAS = ThreadpoolController()
        except Exception:  # pragma: no cover - threadpoolctl is a dependency
            _BLAS = False
    return _BLAS.limit(limits=1, user_api="blas") if _BLAS else _NoLimit()


def _layout(plan, B, n_threads):
    """Row groups and whether Bidirectional layers split their directions over two
    threads: with a Bidirectional layer, pairs of threads share a row group."""
    if plan.device == "cuda":
        return [(0, B)], False      # one stream of GPU launches
    split = n_threads >= 2 and plan.bidirectional
    per_group = 2 if split else 1
    n = max(1, min(n_threads // per_group, B // MIN_ROWS_PER_THREAD))
    return [(g * B // n, (g + 1) * B // n) for g in range(n)], split


def _run(plan, x, y, w, mask, scale, want_grads, n_threads=None):
    """Stats [loss sum, correct, weight sum] and summed gradients over row groups."""
    B = len(x)
    parts, split = _layout(plan, B, n_threads or get_num_threads())
    jobs = []
    for lo, hi in parts:
        xs, ys, ws = x[lo:hi], y[lo:hi], w[lo:hi]
        if mask is not None:
            m = mask[lo:hi]
            if plan.trimmable:
                cols = np.flatnonzero(m.any(axis=0))
                T = int(cols[-1]) + 1 if len(cols) else 1
                xs, ys, ws, m = xs[:, :T], ys[:, :T], ws[:, :T], m[:, :T]
            # rows by decreasing last unmasked step: the recurrent GEMM of each step
            # then covers only the leading rows that are still active (the gradients
            # are sums over rows, so the order does not matter)
            last = np.where(m.any(axis=1), m.shape[1] - np.argmax(m[:, ::-1], axis=1), 0)
            order = np.argsort(-last, kind="stable")
            xs, ys, ws = xs[order], ys[order], ws[order]
        jobs.append((xs, ys, ws))
    dpool = _executor("directions", len(jobs)) if split else None
    # the BLAS limit is process-wide: set once here, around all the threads' work
    with _blas_one_thread():
        if len(jobs) == 1:
            results = [_group_pass(plan, *jobs[0], scale, want_grads, dpool)]
        else:
            pool = _executor("groups", len(jobs))
            futs = [pool.submit(_group_pass, plan, *job, scale, want_grads, dpool)
                    for job in jobs]
            results = [f.result() for f in futs]
    stats = sum(r[0] for r in results)
    if not want_grads:
        return stats, None
    grads = list(results[0][1])
    for _, g in results[1:]:
        for k, gk in enumerate(g):
            if isinstance(gk, SparseRows):
                grads[k] = SparseRows(np.concatenate([grads[k].indices, gk.indices]),
                                      np.concatenate([grads[k].values, gk.values]),
                                      gk.dense_shape)
            else:
                grads[k] = grads[k] + gk
    return stats, grads


def _state(model):
    return getattr(model, "_fastseq_training", None)


def _loss_dtype(model):
    """The dtype Keras would compute this model's loss in: the compiled Keras loss
    object's, else Keras's floatx when the model was imported (a loss given by name
    computes in floatx); None for a model that never met Keras (no cast)."""
    st = _state(model)
    return (st or {}).get("loss_dtype") or getattr(model, "_keras_floatx", None)


def _from_logits(model, from_logits):
    if from_logits is not None:
        return bool(from_logits)
    st = _state(model)
    return bool(st["from_logits"]) if st else False


def _loss_and_grads(model, x, y, sample_weight, fn, from_logits=None, sparse=True):
    plan = _Plan(model, _from_logits(model, from_logits), fn)
    x, y, w, denom, mask = _prepare(plan, x, y, sample_weight, fn)
    scale = 1.0 / denom if denom > 0 else 0.0
    stats, grads = _run(plan, x, y, w, mask, scale, True)
    loss = float(stats[0] * scale)
    if not sparse:
        grads = [g.to_dense() if isinstance(g, SparseRows) else g for g in grads]
    return loss, grads, stats, plan


# --- public API -----------------------------------------------------------------------
def loss_and_gradients(model, x, y, sample_weight=None, *, from_logits=None,
                       sparse=False):
    """The loss Keras computes for ``model`` on the batch (x, y) and its gradients.

    x: [B, T] token ids (models starting with Embedding) or [B, T, D] floats;
    y: [B, T] class ids ([B] when the last recurrent layer returns only its last
    output); sample_weight: None, [B] or [B, T].
    Returns ``(loss, grads)``: a float and one array per weight, in the order of
    ``keras_model.trainable_weights`` (see :func:`trainable_weights`).  With
    ``sparse=True`` the embedding gradient is a :class:`SparseRows` (one row per token,
    as TensorFlow gives it), else dense.  ``from_logits`` (default: as compiled, else
    False) applies to a last Dense with a linear activation.
    """
    loss, grads, _, _ = _loss_and_grads(model, x, y, sample_weight, "loss_and_gradients",
                                        from_logits, sparse)
    return loss, grads


def trainable_weights(model):
    """Read-only views of the model's weight arrays (not copies: they show every later
    update by ``fit``, ``train_on_batch`` or ``set_weights``), in Keras's
    ``trainable_weights`` order.  They are read-only because the model caches arrays
    derived from its weights (an Embedding's table of input projections, a Dense's
    halves, blocked recurrent kernels, GPU copies) and renews them only when its
    weights change through its own methods: change weights with ``set_weights``
    (e.g. ``model.set_weights([w - lr * g for w, g in zip(model.get_weights(),
    grads)])``)."""
    out = []
    for w in _all_weights(model):
        v = w.view()
        v.flags.writeable = False
        out.append(v)
    return out


def get_weights(model):
    """Copies of the weights in Keras's ``trainable_weights`` order."""
    return [w.copy() for w in _all_weights(model)]


def _all_weights(model):
    out = []
    for rec in model.layers:
        kind = type(rec).__name__
        if kind == "Embedding":
            out.append(rec.embeddings)
        elif kind == "LSTM":
            out += _lstm_weights(rec)
        elif kind == "Bidirectional":
            out += _lstm_weights(rec.forward_layer) + _lstm_weights(rec.backward_layer)
        elif kind == "Dense":
            out += [rec.kernel] + ([rec.bias] if rec.bias is not None else [])
    return out


def _lstm_weights(rec):
    return [rec.kernel, rec.recurrent_kernel] + ([rec.bias] if rec.bias is not None else [])


def set_weights(model, weights):
    """Write ``weights`` (Keras's ``trainable_weights`` order, e.g. from
    ``keras_model.get_weights()`` of a model without non-trainable weights) into the
    model's arrays in place."""
    mine = _all_weights(model)
    try:
        weights = list(weights)
    except TypeError:
        raise TypeError(f"set_weights: `weights` must be a list of {len(mine)} arrays, "
                        f"got {type(weights).__name__}") from None
    if len(weights) != len(mine):
        raise ValueError(f"set_weights: the model has {len(mine)} weight arrays, got "
                         f"{len(weights)}")
    # check every array before writing any, so a bad one leaves the model unchanged
    checked = []
    for i, (m, w) in enumerate(zip(mine, weights)):
        if w is None:
            raise TypeError(f"set_weights: weight {i} must be an array of shape "
                            f"{m.shape}, got None")
        w = _validate.as_host(w, "set_weights", f"weights[{i}]", m.dtype)
        if w.shape != m.shape:
            raise ValueError(f"set_weights: weight {i} must have shape {m.shape}, got "
                             f"{w.shape}")
        checked.append(w)
    for m, w in zip(mine, checked):
        m[...] = w
    _weights_changed(model)


def to_keras(model, keras_model):
    """Write the fastseq model's weights into ``keras_model`` (the model it was imported
    from, or one of the same architecture)."""
    mine = _all_weights(model)
    if not hasattr(keras_model, "trainable_weights"):
        raise TypeError(f"to_keras: `keras_model` must be a Keras model, got "
                        f"{type(keras_model).__name__}")
    theirs = list(keras_model.trainable_weights)
    if len(theirs) != len(mine):
        raise ValueError(f"to_keras: the Keras model has {len(theirs)} trainable weights, "
                         f"the fastseq model {len(mine)}")
    for i, (m, v) in enumerate(zip(mine, theirs)):
        if tuple(v.shape) != m.shape:
            raise ValueError(f"to_keras: weight {i} ({v.path}) has shape "
                             f"{tuple(v.shape)}, fastseq's {m.shape}")
        v.assign(m.astype(v.dtype, copy=False))


def compile(model, optimizer="adam", loss="sparse_categorical_crossentropy",
            from_logits=False):
    """Attach an optimizer (name, config dict or :mod:`fastseq.optimizers` instance)
    and the loss to ``model`` for :func:`train_on_batch` and :func:`fit`.

    ``loss``: "sparse_categorical_crossentropy" (or Keras's function / a
    ``keras.losses.SparseCategoricalCrossentropy`` whose ``from_logits`` is used, with
    the default reduction and no ignore_class)."""
    name = loss if isinstance(loss, str) else getattr(loss, "__name__",
                                                      type(loss).__name__)
    if name == "SparseCategoricalCrossentropy" and hasattr(loss, "get_config"):
        cfg = loss.get_config()
        if cfg.get("ignore_class") is not None or cfg.get("reduction", "sum_over_batch_size"
                                                          ) != "sum_over_batch_size":
            raise ValueError("compile: only the default reduction "
                             "('sum_over_batch_size') and ignore_class=None are supported")
        from_logits = bool(cfg.get("from_logits", from_logits))
    elif name != "sparse_categorical_crossentropy":
        raise ValueError(f"compile: `loss` must be 'sparse_categorical_crossentropy', got "
                         f"{loss!r}")
    opt = _optimizers.get(optimizer)
    loss_dtype = getattr(loss, "dtype", None) if not isinstance(loss, str) else None
    old = _state(model)
    model._fastseq_training = {"optimizer": opt, "from_logits": bool(from_logits),
                               "loss_dtype": None if loss_dtype is None else
                               str(np.dtype(loss_dtype))}
    try:
        _Plan(model, bool(from_logits), "compile")  # check the model now
    except Exception:
        model._fastseq_training = old   # a failed compile changes nothing
        raise
    return model


def _compiled(model, fn):
    st = _state(model)
    if st is None:
        raise ValueError(f"{fn}: the model is not compiled; call "
                         f"fastseq.training.compile(model, optimizer=...) first")
    return st


def _weights_changed(model):
    """Tell the model its weights changed in place (a GPU copy must be re-uploaded)."""
    model._weights_version = getattr(model, "_weights_version", 0) + 1


def train_on_batch(model, x, y, sample_weight=None):
    """One optimizer step on the batch; returns the loss before the step (as Keras)."""
    st = _compiled(model, "train_on_batch")
    loss, grads, _, plan = _loss_and_grads(model, x, y, sample_weight, "train_on_batch")
    st["optimizer"].apply(grads, plan.weights())
    _weights_changed(model)
    return loss


def evaluate(model, x, y=None, sample_weight=None, batch_size=32, *, from_logits=None):
    """{"loss": ..., "accuracy": ...} over (x, y) in batches (or over a sequence of
    ``(x, y[, sample_weight])`` batches given as ``x``).  The loss is the mean of the
    batch losses weighted by the batch sizes (as Keras reports it); the accuracy counts
    the unmasked entries, weighted by the sample weights."""
    plan = _Plan(model, _from_logits(model, from_logits), "evaluate")
    total = n = 0.0
    correct = weight = 0.0
    for xb, yb, swb in _batches(x, y, sample_weight, batch_size, False, None, "evaluate"):
        xb, yb, w, denom, mask = _prepare(plan, xb, yb, swb, "evaluate")
        scale = 1.0 / denom if denom > 0 else 0.0
        stats, _ = _run(plan, xb, yb, w, mask, scale, False)
        total += stats[0] * scale * len(xb)
        n += len(xb)
        correct += stats[1]
        weight += stats[2]
    return {"loss": total / n if n else float("nan"),
            "accuracy": correct / weight if weight else float("nan")}


def _check_batch_size(batch_size, fn):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or \
            batch_size < 1:
        raise ValueError(f"{fn}: `batch_size` must be a positive int, got {batch_size!r}")


def _batch_list(x, fn):
    """``x`` given with y=None: a non-empty sequence of batches, as a list."""
    try:
        items = list(x)
    except TypeError:
        raise TypeError(f"{fn}: with y=None, `x` must be a sequence of (x, y) or "
                        f"(x, y, sample_weight) batches, got {type(x).__name__}") from None
    if not items:
        raise ValueError(f"{fn}: `x` holds no batches")
    return items


def _batches(x, y, sample_weight, batch_size, shuffle, rng, fn):
    """(x, y, sample_weight) batches from arrays or from a sequence of batches."""
    if y is None:
        items = _batch_list(x, fn)
        order = rng.permutation(len(items)) if shuffle else range(len(items))
        for i in order:
            b = items[i]
            if not isinstance(b, (tuple, list)) or len(b) not in (2, 3):
                raise TypeError(f"{fn}: with y=None, `x` must be a sequence of (x, y) or "
                                f"(x, y, sample_weight) batches")
            yield b[0], b[1], (b[2] if len(b) == 3 else None)
        return
    _check_batch_size(batch_size, fn)
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"{fn}: `x` and `y` must be arrays with a batch axis, got "
                         f"shapes {x.shape} and {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{fn}: `x` and `y` have {len(x)} and {len(y)} samples")
    if len(x) == 0:
        raise ValueError(f"{fn}: `x` must not be empty, got shape {x.shape}")
    sw = None
    if sample_weight is not None:
        sw = np.asarray(sample_weight)
        if sw.ndim not in (1, 2) or len(sw) != len(x):
            raise ValueError(f"{fn}: `sample_weight` must have shape ({len(x)},) or "
                             f"({len(x)}, T), one weight per sample (or per sample and "
                             f"step), got shape {sw.shape}")
    idx = rng.permutation(len(x)) if shuffle else np.arange(len(x))
    for lo in range(0, len(x), batch_size):
        sel = idx[lo:lo + batch_size]
        yield x[sel], y[sel], (None if sw is None else sw[sel])


def fit(model, x, y=None, batch_size=32, epochs=1, validation_data=None,
        sample_weight=None, shuffle=True, verbose=1, seed=None, callback=None):
    """Train like ``keras_model.fit``; returns the history dict {"loss": [...],
    "accuracy": [...], "val_loss": [...], "val_accuracy": [...], "epoch_time": [...]}
    (val_* with ``validation_data`` = (x, y), (x, y, sample_weight), a list of such
    batch tuples, or a 1-tuple holding a sequence of them).

    x, y: arrays (padded batches; trailing all-padding steps of each batch are skipped)
    or, with ``y=None``, ``x`` a sequence of (x, y[, sample_weight]) batches (e.g.
    length-bucketed); ``shuffle`` permutes samples (arrays) or batches (sequence) every
    epoch with ``numpy.random.default_rng(seed)``.  ``verbose=1``: a tqdm progress bar
    per epoch; ``callback(epoch, logs)`` is called after each epoch.
    """
    st = _compiled(model, "fit")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"fit: `epochs` must be a non-negative int, got {epochs!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"fit: `callback` must be a function callback(epoch, logs), got "
                        f"{type(callback).__name__}")
    if y is None and sample_weight is not None:
        raise ValueError("fit: `sample_weight` cannot be used with y=None (x a sequence "
                         "of batches); give each batch as (x, y, sample_weight)")
    validation = _validation_args(validation_data)
    plan = _Plan(model, st["from_logits"], "fit")
    opt = st["optimizer"]
    weights = plan.weights()
    try:
        rng = np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise TypeError(f"fit: `seed` must be an int or None, got {seed!r}") from None
    history = {"loss": [], "accuracy": [], "epoch_time": []}
    if y is None:
        x = _batch_list(x, "fit")
        n_batches = len(x)
    else:
        _check_batch_size(batch_size, "fit")
        n_batches = math.ceil(len(np.asarray(x)) / batch_size) if np.ndim(x) else 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        bar = _progress(n_batches, f"Epoch {epoch + 1}/{epochs}", verbose)
        total = n = correct = weight = 0.0
        for xb, yb, swb in _batches(x, y, sample_weight, batch_size, shuffle, rng, "fit"):
            xb, yb, w, denom, mask = _prepare(plan, xb, yb, swb, "fit")
            scale = 1.0 / denom if denom > 0 else 0.0
            stats, grads = _run(plan, xb, yb, w, mask, scale, True)
            opt.apply(grads, weights)
            _weights_changed(model)
            loss = stats[0] * scale
            total += loss * len(xb)
            n += len(xb)
            correct += stats[1]
            weight += stats[2]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total / n:.4f}", refresh=False)
        logs = {"loss": total / n if n else float("nan"),
                "accuracy": correct / weight if weight else float("nan")}
        history["loss"].append(logs["loss"])
        history["accuracy"].append(logs["accuracy"])
        history["epoch_time"].append(time.perf_counter() - t0)
        if validation is not None:
            val = evaluate(model, *validation, batch_size,
                           from_logits=st["from_logits"])
            logs.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            history.setdefault("val_loss", []).append(val["loss"])
            history.setdefault("val_accuracy", []).append(val["accuracy"])
        if bar is not None:
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
            bar.close()
        elif verbose:
            print(f"Epoch {epoch + 1}/{epochs} - " + " - ".join(
                f"{k}: {v:.4f}" for k, v in logs.items()), file=sys.stderr)
        if callback is not None:
            callback(epoch, dict(logs))
    return history


def _validation_args(validation_data):
    """(x, y, sample_weight) for ``evaluate`` from fit's ``validation_data``: a tuple
    (x, y) or (x, y, sample_weight), or batches - a list of such tuples, or a 1-tuple
    holding a sequence of them (then y is None)."""
    vd = validation_data
    if vd is None:
        return None
    if isinstance(vd, list) and vd and all(isinstance(b, tuple) and len(b) in (2, 3)
                                           for b in vd):
        return vd, None, None
    if isinstance(vd, tuple) and len(vd) == 1:
        return vd[0], None, None
    if isinstance(vd, (tuple, list)) and len(vd) in (2, 3):
        return vd[0], vd[1], (vd[2] if len(vd) == 3 else None)
    raise ValueError(f"fit: `validation_data` must be (x, y), (x, y, sample_weight) or "
                     f"batches of them, got {type(vd).__name__}"
                     + (f" of length {len(vd)}" if isinstance(vd, (tuple, list)) else ""))


def _progress(total, desc, verbose):
    if verbose != 1:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # without tqdm: one line per epoch
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=True)


# --- LSTM vector-Jacobian product -----------------------------------------------------
def lstm_vjp(x, kernel, recurrent_kernel, bias, dy, *, initial_state=None, mask=None,
             return_sequences=False, return_state=False, go_backwards=False,
             zero_output_for_mask=False, activation="tanh",
             recurrent_activation="sigmoid", device="cpu"):
    """Gradients of ``sum(dy * fastseq.lstm(x, ...))`` (same arguments as
    :func:`fastseq.lstm`): the backward pass of one LSTM layer.  ``device``: "cpu"
    (or "auto") runs the Numba CPU kernels, "cuda" the CUDA ones
    (``kernels/lstm_bwd_cuda.py``; host arrays in and out).

    dy: shaped like lstm's output: [B, T, H] (return_sequences) or [B, H]; with
    return_state a list [d_output, d_h, d_c] (entries may be None).
    Returns a dict with "x" [B, T, D], "kernel", "recurrent_kernel", "bias" (None when
    bias is None), "h0" and "c0" [B, H] (gradients wrt the initial state).
    """
    from . import ops as _ops
    fn = "lstm_vjp"
    _validate.check_device(fn, device)
    if device == "cuda":
        from . import _cuda
        _cuda._require()
    # the checks of fastseq.lstm (host arrays in, whatever the device)
    a = _ops._lstm_args(fn, x, kernel, recurrent_kernel, bias, initial_state, mask,
                        return_sequences, go_backwards, zero_output_for_mask, activation,
                        recurrent_activation, "cpu")
    x, W, U, b, h0, c0, mask = a["arrays"]
    if bias is None:
        b = None
    dt = a["dtype"]
    B, T, D = x.shape
    H = a["H"]
    if B == 0:
        raise ValueError(f"{fn}: `x` must hold at least one sample, got shape {x.shape}")
    activation = activation or "linear"
    recurrent_activation = recurrent_activation or "linear"
    rec = SimpleNamespace(kernel=W, recurrent_kernel=U, bias=b,
                          return_sequences=bool(return_sequences),
                          go_backwards=bool(go_backwards),
                          zero_output_for_mask=bool(zero_output_for_mask),
                          activation=activation, recurrent_activation=recurrent_activation)
    op = _LSTM(rec, dt)
    if mask is None:
        m8 = np.ones((T, B), np.uint8)
    else:
        m8 = _time_major(mask.astype(np.uint8))
    if return_state:
        if not isinstance(dy, (list, tuple)) or len(dy) != 3:
            raise ValueError(f"{fn}: with return_state, `dy` must be a list [d_output, "
                             f"d_h, d_c] (entries may be None), got "
                             f"{type(dy).__name__}"
                             + (f" of length {len(dy)}" if isinstance(dy, (list, tuple))
                                else ""))
        d_out, d_h, d_c = dy
    else:
        d_out, d_h, d_c = dy, None, None
    if d_h is not None:
        d_h = _validate.as_host(d_h, fn, "dy[1]", dt)
    if d_c is not None:
        d_c = _validate.as_host(d_c, fn, "dy[2]", dt)
    if d_out is not None:
        d_out = _validate.as_host(d_out, fn, "dy[0]" if return_state else "dy", dt)
        want = (B, T, H) if return_sequences else (B, H)
        if d_out.shape != want:
            raise ValueError(f"{fn}: the output gradient must have shape {want}, got "
                             f"{d_out.shape}")
    for name, d in (("h", d_h), ("c", d_c)):
        if d is not None and np.shape(d) != (B, H):
            raise ValueError(f"{fn}: the gradient wrt the final {name} must have shape "
                             f"({B}, {H}), got {np.shape(d)}")
    if device == "cuda":
        # batch-major arrays in and out; the GPU rearranges them
        from . import _cuda
        dx, dW, dU, db, dh0, dc0 = _cuda.lstm_vjp_cuda(
            x, W, U, b, m8, h0, c0, d_out, d_h, d_c, return_sequences=return_sequences,
            go_backwards=go_backwards, zero_output_for_mask=zero_output_for_mask,
            act=activation, rec=recurrent_activation)
        return {"x": dx, "kernel": dW, "recurrent_kernel": dU,
                "bias": db if b is not None else None, "h0": dh0, "c0": dc0}
    xt = _time_major(x)
    dout = np.zeros((T, B, H), dt)
    if d_out is not None:
        if return_sequences:
            d = _time_major(d_out)
            dout += d[::-1] if go_backwards else d
        else:
            dout[0 if go_backwards else T - 1] += d_out
    _, _, _, saved = op.run_forward(xt, m8, h0, c0)
    dx, grads, dh0, dc0 = op.run_backward(saved, dout, d_h, d_c)
    return {"x": _time_major(dx), "kernel": grads[0], "recurrent_kernel": grads[1],
            "bias": grads[2] if b is not None else None, "h0": dh0, "c0": dc0}


# --- save / load ----------------------------------------------------------------------
_FORMAT = "fastseq-model"


def _paths(path):
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text or text.endswith(("/", os.sep)) or \
            not Path(text).name:
        raise ValueError(f"save/load: `path` must name a file (PATH gives PATH.npz and "
                         f"PATH.json), got {path!r}")
    p = Path(path)
    base = p.with_suffix("") if p.suffix in (".npz", ".json") else p
    return base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")


def _layer_config(rec, arrays, prefix):
    kind = type(rec).__name__
    cfg = {"class": kind, "name": rec.name, "keras_class": rec.keras_class,
           "dtype": str(np.dtype(rec.dtype))}

    def put(attr):
        a = getattr(rec, attr)
        if a is None:
            cfg[attr] = None
        else:
            key = f"{prefix}{attr}"
            arrays[key] = np.asarray(a)
            cfg[attr] = key

    if kind == "Embedding":
        put("embeddings")
        cfg["mask_zero"] = bool(rec.mask_zero)
    elif kind == "Masking":
        cfg["mask_value"] = float(rec.mask_value)
    elif kind == "LSTM":
        for a in ("kernel", "recurrent_kernel", "bias"):
            put(a)
        for a in ("return_sequences", "go_backwards", "zero_output_for_mask"):
            cfg[a] = bool(getattr(rec, a))
        cfg["activation"] = rec.activation
        cfg["recurrent_activation"] = rec.recurrent_activation
    elif kind == "Bidirectional":
        cfg["forward_layer"] = _layer_config(rec.forward_layer, arrays, prefix + "fwd.")
        cfg["backward_layer"] = _layer_config(rec.backward_layer, arrays, prefix + "bwd.")
        cfg["merge_mode"] = rec.merge_mode
    elif kind == "Dense":
        put("kernel")
        put("bias")
        cfg["activation"] = rec.activation
    elif kind == "Activation":
        cfg["activation"] = rec.activation
    elif kind == "Softmax":
        cfg["axis"] = list(rec.axis) if isinstance(rec.axis, tuple) else rec.axis
    elif kind != "Identity":
        raise ValueError(f"save: layer {rec.name!r} ({kind}) cannot be saved")
    return cfg


def save(model, path, metadata=None):
    """Save ``model`` as ``PATH.npz`` (weights) + ``PATH.json`` (architecture and the
    JSON-serialisable ``metadata`` dict); no pickle.  Returns the two paths."""
    npz, js = _paths(path)
    arrays = {}
    layers = [_layer_config(rec, arrays, f"{i}.") for i, rec in enumerate(model.layers)]
    config = {"format": _FORMAT, "version": 1, "name": model.name,
              "input_shape": list(model.input_shape), "layers": layers,
              "metadata": metadata or {}}
    try:
        text = json.dumps(config, indent=1)   # before anything is written
    except (TypeError, ValueError) as exc:
        raise TypeError(f"save: `metadata` must be JSON-serialisable ({exc})") from None
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **arrays)
    js.write_text(text, encoding="utf-8")
    return npz, js


class _BadFile(ValueError):
    """A saved model file that does not hold what ``save`` writes."""


def _field(cfg, key, kind, where):
    """cfg[key], checked to be of ``kind`` (bool, str, list, dict, "number", "str?" for
    a string or None)."""
    if not isinstance(cfg, dict) or key not in cfg:
        raise _BadFile(f"{where}: missing {key!r}")
    v = cfg[key]
    ok = {bool: isinstance(v, bool), str: isinstance(v, str), list: isinstance(v, list),
          dict: isinstance(v, dict),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool),
          "str?": v is None or isinstance(v, str)}[kind]
    if not ok:
        raise _BadFile(f"{where}: {key!r} has the wrong type ({v!r})")
    return v


def _make_layer(ki, cfg, arrays, width, where):
    """The layer record of ``cfg`` (checked against what ``save`` writes, its arrays
    against each other and against the input ``width``, the last axis it receives;
    None for token ids).  Returns (layer, output width)."""
    from .ops import DENSE_ACTIVATIONS, LSTM_ACTIVATIONS
    kind = _field(cfg, "class", str, where)
    if kind not in ("Embedding", "Masking", "LSTM", "Bidirectional", "Dense",
                    "Activation", "Softmax", "Identity"):
        raise _BadFile(f"{where}: unknown layer class {kind!r}")
    where = f"{where} ({kind} {cfg.get('name')!r})"
    dtype = _field(cfg, "dtype", str, where)
    if dtype not in ("float32", "float64"):
        raise _BadFile(f"{where}: dtype must be 'float32' or 'float64', got {dtype!r}")
    dt = np.dtype(dtype)
    common = (_field(cfg, "name", str, where), _field(cfg, "keras_class", str, where), dt)

    def arr(attr, ndim, optional=False):
        key = cfg.get(attr) if isinstance(cfg, dict) else None
        if key is None:
            if optional and attr in cfg:
                return None
            raise _BadFile(f"{where}: missing the array {attr!r}")
        if not isinstance(key, str) or key not in arrays:
            raise _BadFile(f"{where}: the weights file has no array {key!r} ({attr})")
        a = arrays[key]
        if a.ndim != ndim or a.dtype != dt:
            raise _BadFile(f"{where}: {attr} must be a {ndim}-D {dtype} array, got shape "
                           f"{a.shape} dtype {a.dtype}")
        return np.ascontiguousarray(a)

    def choice(key, choices):
        v = cfg.get(key)
        if v not in choices:
            raise _BadFile(f"{where}: {key} must be one of {sorted(map(str, choices))}, "
                           f"got {v!r}")
        return v

    def need(D, what):
        if width is not None and D != width:
            raise _BadFile(f"{where}: {what} expects inputs of width {D}, but the layer "
                           f"before gives {width}")
        if width is None and kind != "Embedding":
            raise _BadFile(f"{where}: a model on token ids must start with an Embedding")

    if kind == "Embedding":
        if width is not None:
            raise _BadFile(f"{where}: an Embedding must be the first layer")
        E = arr("embeddings", 2)
        return ki.Embedding(*common, E, _field(cfg, "mask_zero", bool, where)), E.shape[1]
    if kind == "Masking":
        need(width, "it")
        return ki.Masking(*common, _field(cfg, "mask_value", "number", where)), width
    if kind == "LSTM":
        W, U, b = arr("kernel", 2), arr("recurrent_kernel", 2), arr("bias", 1, True)
        H = U.shape[0]
        if U.shape != (H, 4 * H) or W.shape[1:] != (4 * H,) or \
                (b is not None and b.shape != (4 * H,)):
            raise _BadFile(f"{where}: kernel, recurrent_kernel and bias must be [D, 4H], "
                           f"[H, 4H] and [4H]; got {W.shape}, {U.shape} and "
                           f"{None if b is None else b.shape}")
        need(W.shape[0], "its kernel")
        flags = {k: _field(cfg, k, bool, where) for k in
                 ("return_sequences", "go_backwards", "zero_output_for_mask")}
        return ki.LSTM(*common, W, U, b, **flags,
                       activation=choice("activation", LSTM_ACTIVATIONS),
                       recurrent_activation=choice("recurrent_activation",
                                                   LSTM_ACTIVATIONS)), H
    if kind == "Bidirectional":
        fwd, hf = _make_layer(ki, _field(cfg, "forward_layer", dict, where), arrays, width,
                              where + " forward")
        bwd, hb = _make_layer(ki, _field(cfg, "backward_layer", dict, where), arrays,
                              width, where + " backward")
        if not (isinstance(fwd, ki.LSTM) and isinstance(bwd, ki.LSTM)) or hf != hb or \
                fwd.return_sequences != bwd.return_sequences:
            raise _BadFile(f"{where}: its two layers must be LSTMs of the same size and "
                           f"return_sequences")
        mode = choice("merge_mode", ("concat", "sum", "mul", "ave", None))
        width = 2 * hf if mode == "concat" else hf
        return ki.Bidirectional(*common, fwd, bwd, mode), width
    if kind == "Dense":
        Wd, bd = arr("kernel", 2), arr("bias", 1, True)
        if bd is not None and bd.shape != Wd.shape[1:]:
            raise _BadFile(f"{where}: bias must be [K] = ({Wd.shape[1]},), got {bd.shape}")
        need(Wd.shape[0], "its kernel")
        act = choice("activation", set(DENSE_ACTIVATIONS) | set(ki.NUMPY_ACTIVATIONS))
        return ki.Dense(*common, Wd, bd, act), Wd.shape[1]
    need(width, "it")
    if kind == "Activation":
        return ki.Activation(*common, choice("activation", ki.NUMPY_ACTIVATIONS)), width
    if kind == "Softmax":
        axis = cfg.get("axis")
        if not (isinstance(axis, int) or (isinstance(axis, list) and all(
                isinstance(a, int) for a in axis))) or isinstance(axis, bool):
            raise _BadFile(f"{where}: axis must be an int or a list of ints, got {axis!r}")
        return ki.Softmax(*common, axis), width
    return ki.Identity(*common), width


def load(path, device="auto"):
    """Load a model written by :func:`save`; its ``metadata`` dict is set as
    ``model.metadata``.  A file that does not hold what ``save`` writes (corrupt,
    edited, from elsewhere) raises ValueError naming it and what is wrong."""
    from . import keras_import as ki
    npz, js = _paths(path)
    try:
        config = json.loads(js.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"load: no model config at {js}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"load: cannot read {js} as a fastseq model config "
                         f"({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        raise ValueError(f"load: {js} is not a fastseq model file")
    if config.get("version") != 1:
        raise ValueError(f"load: {js} has format version {config.get('version')!r}; "
                         f"this fastseq reads version 1")
    if not npz.is_file():
        raise FileNotFoundError(f"load: no model weights at {npz} (its config {js} "
                                f"exists)")
    try:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # not a zip, truncated, a .npy, pickled objects, ...
        raise ValueError(f"load: cannot read {npz} as the model's weights "
                         f"({type(exc).__name__}: {exc})") from None
    try:
        shape = _field(config, "input_shape", list, str(js))
        if not shape or not all(d is None or (isinstance(d, int) and d > 0)
                                for d in shape):
            raise _BadFile(f"{js}: input_shape must be a list of positive ints or nulls, "
                           f"got {shape!r}")
        metadata = config.get("metadata", {})
        if not isinstance(metadata, dict):
            raise _BadFile(f"{js}: metadata must be a dict, got {type(metadata).__name__}")
        layers = []
        # the last axis the first layer receives: token ids have none
        width = shape[-1] if len(shape) == 3 else None
        for i, c in enumerate(_field(config, "layers", list, str(js))):
            layer, width = _make_layer(ki, c, arrays, width, f"{js}: layer {i}")
            layers.append(layer)
        if not layers:
            raise _BadFile(f"{js}: the model has no layers")
    except _BadFile as exc:
        raise ValueError(f"load: {exc}") from None
    model = ki.Model(layers, tuple(shape), device=device, name=config.get("name"))
    model.metadata = metadata
    return model
