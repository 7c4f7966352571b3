"""Numba CPU kernels for the last layer of a tagger in training: a (time-distributed)
Dense layer with softmax fused with the sparse categorical cross-entropy loss, forward
and backward in one pass over chunks of rows.

For each chunk of rows the logits ``x W`` come from a BLAS GEMM into a small buffer,
the kernel turns them in place into ``dL/dlogits`` (the probabilities live only in
registers), and the chunk's contributions ``dW += x^T dZ``, ``db += sum dZ``,
``dX = dZ W^T`` follow as GEMMs on the same buffer while it is in cache.

Two ways of computing the loss, as Keras does (TensorFlow backend):

* ``XENT_LOGITS``: the loss sees the logits ``z`` (a ``Dense(activation="softmax")`` last
  layer, whose output carries its logits, or ``from_logits=True`` on a linear layer):
  ``loss = logsumexp(z) - z[y]``, ``dz = softmax(z) - onehot(y)``.
* ``XENT_PROBS``: the loss sees only probabilities ``p = softmax(z)`` (e.g. a
  ``TimeDistributed(Dense(softmax))`` output): Keras clips ``q = clip(p, eps, 1 - eps)``,
  takes ``log q`` as logits: ``loss = log(sum q) - log q[y]``; the gradient goes back
  through the log, the clip (zero outside ``[eps, 1 - eps]``) and the softmax.

Row weights ``w`` (mask times sample weight) scale each row's loss; the caller divides
the weighted sum by Keras's denominator, and ``scale`` (= 1 / denominator) scales the
gradient.  Rows with ``w == 0`` are skipped and get a zero gradient.
"""
import math

import numpy as np
from numba import njit

from ..config import FASTMATH
from .activations import exp_act

XENT_LOGITS = 0
XENT_PROBS = 1


@njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
def xent_rows(z, b, labels, weights, scale, mode, eps, pbuf, stats):
    """Loss and gradient of a chunk of rows, in place.

    z:       [n, K] logits without bias (x W), overwritten with dL/dz (scaled)
    b:       [K] bias (zeros when the layer has none)
    labels:  [n] integer class ids in [0, K)
    weights: [n] row weights (0 = row ignored)
    scale:   gradient factor (1 / Keras's denominator)
    mode:    XENT_LOGITS or XENT_PROBS
    eps:     clip epsilon of XENT_PROBS (Keras's backend.epsilon())
    pbuf:    [K] scratch (probabilities of a row, XENT_PROBS)
    stats:   [3] float64, accumulated: sum w * loss, sum w * [argmax == label], sum w
    """
    n, K = z.shape
    one = z.dtype.type(1)
    zero = z.dtype.type(0)
    lo = z.dtype.type(eps)
    hi = one - lo
    for r in range(n):
        w = weights[r]
        row = z[r]
        if w == 0:
            for k in range(K):
                row[k] = zero
            continue
        y = labels[r]
        m = row[0] + b[0]
        am = 0
        for k in range(K):
            v = row[k] + b[k]
            row[k] = v
            if v > m:
                m = v
                am = k
        zy = row[y]
        s = zero
        for k in range(K):
            e = exp_act(row[k] - m)
            row[k] = e
            s += e
        inv = one / s
        g = w * scale
        if mode == XENT_LOGITS:
            loss = (m + math.log(s)) - zy
            for k in range(K):
                row[k] = row[k] * inv * g
            row[y] -= g
        else:
            # q = clip(p, eps, 1 - eps), S = sum q; loss = log S - log q_y
            S = zero
            for k in range(K):
                p = row[k] * inv
                pbuf[k] = p
                S += min(max(p, lo), hi)
            loss = math.log(S) - math.log(min(max(pbuf[y], lo), hi))
            # through the log and the clip: dp_k = (q_k / S - [k == y]) / q_k inside
            # [eps, 1 - eps], else 0; through the softmax: dz_k = p_k (dp_k - p . dp)
            invS = one / S
            dot = zero
            for k in range(K):
                p = pbuf[k]
                dp = zero
                if p >= lo and p <= hi:
                    dp = invS
                    if k == y:
                        dp -= one / p
                row[k] = dp
                dot += dp * p
            for k in range(K):
                row[k] = pbuf[k] * (row[k] - dot) * g
        stats[0] += w * loss
        if am == y:
            stats[1] += w
        stats[2] += w


@njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
def dense_xent(x, W, WT, b, labels, weights, scale, mode, eps, z, tmp, pbuf, dW, db, dx,
               stats):
    """Last Dense layer + softmax + sparse categorical cross-entropy, forward and
    backward, over chunks of rows.

    x:       [N, D] input rows of the Dense layer (C-contiguous)
    W:       [D, K] kernel;  WT: [K, D] its transpose (W.T, F-contiguous);  b: [K] bias
    labels:  [N] class ids;  weights: [N] row weights (0 = ignored)
    scale, mode, eps: as in xent_rows
    z:       [C, K] scratch, C = rows per chunk
    tmp:     [D, K] scratch
    pbuf:    [K] scratch
    dW:      [D, K] accumulated (+=);  db: [K] accumulated (+=)
    dx:      [N, D] written: gradient wrt x
    stats:   [3] float64 accumulated, see xent_rows
    """
    N = x.shape[0]
    C, K = z.shape
    for lo in range(0, N, C):
        hi = min(N, lo + C)
        zc = z[:hi - lo]
        xc = x[lo:hi]
        np.dot(xc, W, zc)
        xent_rows(zc, b, labels[lo:hi], weights[lo:hi], scale, mode, eps, pbuf, stats)
        np.dot(xc.T, zc, tmp)
        dW += tmp
        for r in range(hi - lo):
            for k in range(K):
                db[k] += zc[r, k]
        np.dot(zc, WT, dx[lo:hi])


@njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
def dense_probs(x, W, b, mode, z, out):
    """Class probabilities of the last layer (evaluation), chunk by chunk.

    x: [N, D];  W: [D, K];  b: [K];  z: [C, K] scratch;  out: [N, K] written
    mode: XENT_LOGITS / XENT_PROBS (both: softmax of the logits)
    """
    N = x.shape[0]
    C, K = z.shape
    for lo in range(0, N, C):
        hi = min(N, lo + C)
        zc = z[:hi - lo]
        np.dot(x[lo:hi], W, zc)
        for r in range(hi - lo):
            m = zc[r, 0] + b[0]
            for k in range(K):
                v = zc[r, k] + b[k]
                zc[r, k] = v
                if v > m:
                    m = v
            s = zc[r, 0] - zc[r, 0]
            for k in range(K):
                e = exp_act(zc[r, k] - m)
                zc[r, k] = e
                s += e
            for k in range(K):
                out[lo + r, k] = zc[r, k] / s
