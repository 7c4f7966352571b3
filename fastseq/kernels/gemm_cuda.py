"""Tiled shared-memory GEMM for CUDA (Numba): ``C = A @ Bm``.

Used for the LSTM input projection of all time steps at once (``[B*T, D] @ [D, 4H]``)
when CuPy (cuBLAS) is not installed.

Mapping: a block of ``THR x THR`` threads computes a ``TILE x TILE`` tile of C, each
thread an ``MT x MT`` micro-tile (``MT = TILE // THR``) whose rows are ``ty + THR*i`` and
columns ``tx + THR*j`` (strided, so a warp's shared-memory reads hit distinct banks or
broadcast and its stores to C are coalesced).  The K dimension is walked in slices of
``BK = THR``: the block stages ``A[m0:m0+TILE, k0:k0+BK]`` transposed into ``As``
(``BK x (TILE+1)``, padded against bank conflicts on the transposing store) and
``Bm[k0:k0+BK, n0:n0+TILE]`` into ``Bs`` (``BK x TILE``); each thread loads ``MT``
elements of each per slice.  Out-of-range elements are staged as zeros, so ragged
edges need no special path.  Grid: ``(ceil(N/TILE), ceil(M/TILE))``.
"""
import numpy as np
from numba import cuda
from numba import types as nbt

_NB_DTYPES = {np.dtype(np.float32): nbt.float32, np.dtype(np.float64): nbt.float64}

_CACHE = {}


def signature(np_dtype):
    """(A, Bm, C) Numba signature for one float dtype."""
    f = _NB_DTYPES[np.dtype(np_dtype)]
    return (f[:, ::1], f[:, ::1], f[:, ::1])


def gemm_kernel(np_dtype, tile=64, thr=16):
    """Python kernel function ``gemm(A, Bm, C)`` for ``np_dtype`` and the given tile
    (``tile`` a multiple of ``thr``; block = ``thr x thr`` threads)."""
    key = (np.dtype(np_dtype).str, int(tile), int(thr))
    fn = _CACHE.get(key)
    if fn is not None:
        return fn
    if tile % thr:
        raise ValueError(f"gemm tile {tile} must be a multiple of the thread tile {thr}")
    nbdt = _NB_DTYPES[np.dtype(np_dtype)]
    ZERO = np.dtype(np_dtype).type(0.0)
    TILE = int(tile)
    THR = int(thr)
    MT = TILE // THR
    BK = THR
    NT = THR * THR
    TILEP = TILE + 1

    def gemm(A, Bm, C):
        # A: [M, K]; Bm: [K, N]; C: [M, N] (overwritten with A @ Bm)
        M = A.shape[0]
        K = A.shape[1]
        N = Bm.shape[1]
        As = cuda.shared.array((BK, TILEP), nbdt)
        Bs = cuda.shared.array((BK, TILE), nbdt)
        acc = cuda.local.array((MT, MT), nbdt)
        av = cuda.local.array(MT, nbdt)
        bv = cuda.local.array(MT, nbdt)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * THR + tx
        m0 = cuda.blockIdx.y * TILE
        n0 = cuda.blockIdx.x * TILE
        for i in range(MT):
            for j in range(MT):
                acc[i, j] = ZERO
        for k0 in range(0, K, BK):
            for i in range(MT):
                e = tid + i * NT
                row = e // BK
                kk = e - row * BK
                gm = m0 + row
                gk = k0 + kk
                v = ZERO
                if gm < M and gk < K:
                    v = A[gm, gk]
                As[kk, row] = v
                kb = e // TILE
                col = e - kb * TILE
                gk = k0 + kb
                gn = n0 + col
                v = ZERO
                if gk < K and gn < N:
                    v = Bm[gk, gn]
                Bs[kb, col] = v
            cuda.syncthreads()
            for kk in range(BK):
                for i in range(MT):
                    av[i] = As[kk, ty + THR * i]
                for j in range(MT):
                    bv[j] = Bs[kk, tx + THR * j]
                for i in range(MT):
                    for j in range(MT):
                        acc[i, j] += av[i] * bv[j]
            cuda.syncthreads()
        for i in range(MT):
            gm = m0 + ty + THR * i
            if gm < M:
                for j in range(MT):
                    gn = n0 + tx + THR * j
                    if gn < N:
                        C[gm, gn] = acc[i, j]

    _CACHE[key] = gemm
    return gemm
