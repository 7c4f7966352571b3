"""Fused time-distributed Dense + activation, and fused Dense + argmax (Numba CUDA).

``dense_rows(x, W, b, y, act)``: ``y = act(x @ W + b)`` row-wise, activation fused:
linear, softmax (stable), log_softmax (stable), sigmoid, tanh, relu.
``dense_argmax(x, W, b, idx, act)``: ``idx[r] = argmax_k act(x @ W + b)[r, k]`` without
writing any probabilities (or logits) to memory.
``dense_epilogue(y, b, act)``: ``y = act(y + b)`` in place, for logits ``y = x @ W`` that
a GEMM library (cuBLAS through CuPy) computed; one thread per row.

Mapping: a block owns ``RB`` consecutive rows (the last block may be ragged); its
``nthr`` threads (a power of two) own output columns ``k = kc + tid`` for
``kc = 0, nthr, 2*nthr, ...``.  For each column chunk the block walks D in slices of
``DT``: the ``RB x DT`` slice of x is staged in shared memory (``xs``, static), then each
thread accumulates its column for all ``RB`` rows in registers, so every weight it loads
(coalesced across the block) is used ``RB`` times.  For softmax/log_softmax each thread
keeps an online (max, sum of exp) per row over its columns and writes the raw logits;
a shared-memory tree reduction (dynamic ``red``: ``2*nthr`` values + ``2*RB`` row
statistics) combines the per-thread statistics per row, then each thread rewrites only
the values it wrote itself.  The argmax kernel keeps a running (best value, index) per
row instead and writes one index per row.  Ties go to the lowest index; NaN counts as
the maximum (NumPy's argmax rule).  For softmax/log_softmax the argmax is taken on the
logits (the same order as the probabilities), for the other activations on the
activated values.
"""
import math

import numpy as np
from numba import cuda
from numba import types as nbt

DENSE_LINEAR = 0
DENSE_SOFTMAX = 1
DENSE_LOG_SOFTMAX = 2
DENSE_SIGMOID = 3
DENSE_TANH = 4
DENSE_RELU = 5

DENSE_CODES = {
    "linear": DENSE_LINEAR,
    "softmax": DENSE_SOFTMAX,
    "log_softmax": DENSE_LOG_SOFTMAX,
    "sigmoid": DENSE_SIGMOID,
    "tanh": DENSE_TANH,
    "relu": DENSE_RELU,
}

_NB_DTYPES = {np.dtype(np.float32): nbt.float32, np.dtype(np.float64): nbt.float64}

_CACHE = {}


def signatures(np_dtype):
    """Numba signatures per kernel name for one float dtype."""
    f = _NB_DTYPES[np.dtype(np_dtype)]
    i8 = nbt.int64
    return {
        "dense": (f[:, ::1], f[:, ::1], f[::1], f[:, ::1], i8),        # x, W, b, y, act
        "argmax": (f[:, ::1], f[:, ::1], f[::1], nbt.int64[::1], i8),  # x, W, b, idx, act
        "epilogue": (f[:, ::1], f[::1], i8),                            # y, b, act
    }


class DenseKernels:
    def __init__(self, np_dtype, rb, dt, dense, argmax, epilogue, signatures):
        self.dtype = np.dtype(np_dtype)
        self.rb = rb
        self.dt = dt
        self.dense = dense
        self.argmax = argmax
        self.epilogue = epilogue
        self.signatures = signatures


def dense_kernels(np_dtype, rows_per_block=16, k_tile=64):
    """Build (once) the Dense kernels for ``np_dtype``, ``RB = rows_per_block`` rows per
    block and a staged D slice of ``DT = k_tile`` values."""
    key = (np.dtype(np_dtype).str, int(rows_per_block), int(k_tile))
    ks = _CACHE.get(key)
    if ks is not None:
        return ks
    nbdt = _NB_DTYPES[np.dtype(np_dtype)]
    ty = np.dtype(np_dtype).type
    ZERO = ty(0.0)
    ONE = ty(1.0)
    NEG_INF = ty(-np.inf)
    RB = int(rows_per_block)
    DT = int(k_tile)

    @cuda.jit(device=True)
    def elementwise(act, z):
        if act == DENSE_SIGMOID:
            if z >= ZERO:
                return ONE / (ONE + math.exp(-z))
            e = math.exp(z)
            return e / (ONE + e)
        elif act == DENSE_TANH:
            return math.tanh(z)
        elif act == DENSE_RELU:
            if z < ZERO:
                return ZERO
            return z
        return z

    @cuda.jit(device=True)
    def better(v, i, bv, bi):
        # True if (v, i) should replace the current best (bv, bi): larger value, NaN
        # above everything, ties (and NaN vs NaN) to the lower index.
        if v != v:
            if bv != bv:
                return i < bi
            return True
        if bv != bv:
            return False
        if v > bv:
            return True
        return v == bv and i < bi

    @cuda.jit(device=True, inline="always")
    def row_tile(x, W, row0, nr, kc, xs, acc):
        # acc[r] = sum_d x[row0 + r, d] * W[d, kc + tid] for r < RB (rows >= nr are
        # zero-padded); every thread of the block must call this (barriers inside).
        tid = cuda.threadIdx.x
        nthr = cuda.blockDim.x
        D = x.shape[1]
        K = W.shape[1]
        k = kc + tid
        for r in range(RB):
            acc[r] = ZERO
        for d0 in range(0, D, DT):
            cuda.syncthreads()
            for e in range(tid, RB * DT, nthr):
                r = e // DT
                dd = e - r * DT
                v = ZERO
                if r < nr and d0 + dd < D:
                    v = x[row0 + r, d0 + dd]
                xs[r, dd] = v
            cuda.syncthreads()
            if k < K:
                dn = min(DT, D - d0)
                for dd in range(dn):
                    w = W[d0 + dd, k]
                    for r in range(RB):
                        acc[r] += xs[r, dd] * w

    def dense_rows(x, W, b, y, act):
        # x: [M, D]; W: [D, K]; b: [K]; y: [M, K] output; act: DENSE_* code.
        # Grid: ceil(M/RB) blocks; block: power-of-two threads; dynamic shared memory
        # (2*blockDim.x + 2*RB) values.
        M = x.shape[0]
        K = W.shape[1]
        tid = cuda.threadIdx.x
        nthr = cuda.blockDim.x
        row0 = cuda.blockIdx.x * RB
        nr = min(RB, M - row0)
        xs = cuda.shared.array((RB, DT), nbdt)
        red = cuda.shared.array(0, nbdt)
        acc = cuda.local.array(RB, nbdt)
        mx = cuda.local.array(RB, nbdt)
        sx = cuda.local.array(RB, nbdt)
        soft = act == DENSE_SOFTMAX or act == DENSE_LOG_SOFTMAX
        for r in range(RB):
            mx[r] = NEG_INF
            sx[r] = ZERO
        for kc in range(0, K, nthr):
            row_tile(x, W, row0, nr, kc, xs, acc)
            k = kc + tid
            if k < K:
                bk = b[k]
                for r in range(nr):
                    z = acc[r] + bk
                    if soft:
                        y[row0 + r, k] = z
                        if z > mx[r]:
                            sx[r] = sx[r] * math.exp(mx[r] - z) + ONE
                            mx[r] = z
                        else:
                            sx[r] += math.exp(z - mx[r])
                    else:
                        y[row0 + r, k] = elementwise(act, z)
        if soft:
            for r in range(RB):              # every row (padding rows are harmless)
                red[tid] = mx[r]
                red[nthr + tid] = sx[r]
                cuda.syncthreads()
                w = nthr // 2
                while w > 0:
                    if tid < w:
                        m1 = red[tid]
                        m2 = red[tid + w]
                        s2 = red[nthr + tid + w]
                        if m2 > m1:
                            red[nthr + tid] = s2 + red[nthr + tid] * math.exp(m1 - m2)
                            red[tid] = m2
                        elif m2 > NEG_INF:
                            red[nthr + tid] += s2 * math.exp(m2 - m1)
                    cuda.syncthreads()
                    w //= 2
                if tid == 0:
                    red[2 * nthr + r] = red[0]
                    red[2 * nthr + RB + r] = red[nthr]
                cuda.syncthreads()
            for kc in range(0, K, nthr):
                k = kc + tid
                if k < K:
                    for r in range(nr):      # no register arrays here
                        m = red[2 * nthr + r]
                        ssum = red[2 * nthr + RB + r]
                        z = y[row0 + r, k]
                        if act == DENSE_SOFTMAX:
                            y[row0 + r, k] = math.exp(z - m) / ssum
                        else:
                            y[row0 + r, k] = (z - m) - math.log(ssum)

    def dense_argmax(x, W, b, idx, act):
        # x: [M, D]; W: [D, K]; b: [K]; idx: [M] int64 output; act: DENSE_* code.
        # Grid/block/shared memory as dense_rows.
        M = x.shape[0]
        K = W.shape[1]
        tid = cuda.threadIdx.x
        nthr = cuda.blockDim.x
        row0 = cuda.blockIdx.x * RB
        nr = min(RB, M - row0)
        xs = cuda.shared.array((RB, DT), nbdt)
        red = cuda.shared.array(0, nbdt)
        acc = cuda.local.array(RB, nbdt)
        bv = cuda.local.array(RB, nbdt)
        bi = cuda.local.array(RB, nbt.int64)
        soft = act == DENSE_SOFTMAX or act == DENSE_LOG_SOFTMAX
        for r in range(RB):
            bv[r] = NEG_INF
            bi[r] = K
        for kc in range(0, K, nthr):
            row_tile(x, W, row0, nr, kc, xs, acc)
            k = kc + tid
            if k < K:
                bk = b[k]
                for r in range(nr):
                    z = acc[r] + bk
                    if not soft:
                        z = elementwise(act, z)
                    if better(z, k, bv[r], bi[r]):
                        bv[r] = z
                        bi[r] = k
        for r in range(RB):
            red[tid] = bv[r]
            red[nthr + tid] = bi[r]
            cuda.syncthreads()
            w = nthr // 2
            while w > 0:
                if tid < w:
                    v2 = red[tid + w]
                    i2 = red[nthr + tid + w]
                    if better(v2, i2, red[tid], red[nthr + tid]):
                        red[tid] = v2
                        red[nthr + tid] = i2
                cuda.syncthreads()
                w //= 2
            if tid == 0 and r < nr:
                idx[row0 + r] = int(red[nthr])
            cuda.syncthreads()

    def dense_epilogue(y, b, act):
        # y: [M, K] logits x@W without the bias (from a GEMM), rewritten in place as
        # act(y + b); b: [K]; act: DENSE_* code.  One thread per row, 1-D grid-stride
        # loop; softmax/log_softmax subtract the row maximum first (stable).
        M = y.shape[0]
        K = y.shape[1]
        soft = act == DENSE_SOFTMAX or act == DENSE_LOG_SOFTMAX
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        while i < M:
            if soft:
                m = NEG_INF
                for k in range(K):
                    z = y[i, k] + b[k]
                    y[i, k] = z
                    if z > m:
                        m = z
                ssum = ZERO
                for k in range(K):
                    ssum += math.exp(y[i, k] - m)
                if act == DENSE_SOFTMAX:
                    for k in range(K):
                        y[i, k] = math.exp(y[i, k] - m) / ssum
                else:
                    ls = math.log(ssum)
                    for k in range(K):
                        y[i, k] = (y[i, k] - m) - ls
            else:
                for k in range(K):
                    y[i, k] = elementwise(act, y[i, k] + b[k])
            i += stride

    ks = DenseKernels(np_dtype, RB, DT, dense_rows, dense_argmax, dense_epilogue,
                      signatures(np_dtype))
    _CACHE[key] = ks
    return ks
