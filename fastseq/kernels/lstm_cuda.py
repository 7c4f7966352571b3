"""CUDA kernels for the LSTM recurrence (Numba CUDA).

Three kernels run the recurrence; the first two use the same thread mapping (below) for
a block's slice of hidden units:

* ``lstm_persistent`` - one cooperative launch for all T steps.  Block ``bx`` owns hidden
  units ``j0 = bx*HB .. j0+nu`` (``nu <= HB``; the last block may be ragged) for every
  batch row.  It copies the columns of the recurrent weights that feed its units (all four
  gates, ``4*nu`` rows of ``Ut``) into shared memory once and keeps them there for the
  whole sequence, and initialises its units' state (h0/c0 or zeros).  Between steps a
  grid-wide barrier (``cuda.cg.this_grid().sync()``) publishes the new ``h``; ``h`` is
  double-buffered in global memory (step ``s`` reads ``st[s % 2]``, writes
  ``st[1 - s % 2]``), so one barrier per step is enough.  When all of h is small
  (``Hs > 0``) the block copies it to shared memory at the start of each step.  The
  cell state ``c`` of a unit is only ever touched by the thread that owns it; when
  every item has its own threads (one round), that thread keeps c and the last output
  in registers and loads the next step's inputs before the barrier.
* ``lstm_step`` - the fallback when the weight slices do not fit on chip or the grid
  cannot be co-resident: one launch per step, weights read from global memory (L2).
  Grid = (hidden-unit slices, batch chunks); ``init_state`` sets its state first.
* ``cell_gemm`` - the cell update alone, one thread per (row, unit), after a GEMM has
  formed ``h U`` for the step (``LSTM_MODE = "gemm"``: cuBLAS through CuPy).  It shares
  the gate, mask and output rules (``cell_update``) with ``lstm_step``.

Thread mapping inside a block (both kernels): the block's work is a list of *items*,
one per (unit ``u``, group of ``RBB`` batch rows).  ``KS`` threads (a power of two)
cooperate on one item, each summing every ``KS``-th term of the four length-H dot
products ``h[b, :] . U[:, g*H + j]`` for its ``RBB`` rows (so each weight loaded from
shared memory is used ``RBB`` times), followed by a shared-memory tree reduction over
the ``KS`` partial sums (``RBB`` is 1 or 4, a compile-time constant; the inner loop keeps
its ``4*RBB`` sums in scalar registers and indexes with unsigned integers so no
negative-index wraparound code is emitted).  Items are processed in rounds of
``blockDim.x // KS`` so every thread of the block runs the same number of rounds
(barriers stay uniform).  The thread with ``part == 0`` then applies the gates, masking
and output rules for its item.

Shared memory of the persistent kernel (dynamic, one array): ``Us`` = ``4*HB`` rows of
``Hp`` values (row ``g*HB + u`` = recurrent weights of gate ``g`` into unit ``j0+u``;
``Hp >= H`` is padded so the rows of the items that share a warp start in different
banks), then the staged h (``B`` rows of ``Hs`` values, ``Hs`` odd; none when
``Hs = 0``), then the reduction buffer ``red`` of ``4*RBB*blockDim.x`` values (only when
``KS > 1``).  The per-step kernel only has ``red``.

Keras semantics (keras/src/backend/tensorflow/rnn.py): a masked step keeps h and c; its
output is the previous output (zero before the first unmasked step) or zero with
``zero_output_for_mask``; the returned last output is the output of the last processed
step; with ``go_backwards`` time runs backwards and outputs are stored in processing
order.

Kernels are built per (dtype, RBB) by ``lstm_kernels`` so constants and shared/local
arrays have the right type; ``signatures`` lists the exact Numba signatures the glue
(``fastseq._cuda``) compiles.  Importing this module needs ``numba.cuda`` but no GPU.
"""
import math

import numpy as np
from numba import cuda
from numba import types as nbt

# Activation codes shared with the CPU kernels (one table for both backends).
from .activations import (ACTIVATION_CODES, ACT_HARD_SIGMOID, ACT_LINEAR,  # noqa: E402,F401
                          ACT_RELU, ACT_SIGMOID, ACT_SOFTSIGN, ACT_TANH)

# Register tiles over batch rows that the glue uses.
RBB_CHOICES = (1, 4)

_NB_DTYPES = {np.dtype(np.float32): nbt.float32, np.dtype(np.float64): nbt.float64}


def make_act(np_dtype):
    """Device function ``act(code, x)`` for one float dtype (constants of that dtype, so
    float32 stays float32)."""
    ty = np.dtype(np_dtype).type
    ZERO = ty(0.0)
    ONE = ty(1.0)
    THREE = ty(3.0)
    SIX = ty(6.0)

    @cuda.jit(device=True)
    def act(code, x):
        if code == ACT_TANH:
            return math.tanh(x)
        elif code == ACT_SIGMOID:
            if x >= ZERO:
                return ONE / (ONE + math.exp(-x))
            e = math.exp(x)
            return e / (ONE + e)
        elif code == ACT_HARD_SIGMOID:
            y = (x + THREE) / SIX
            if y < ZERO:
                y = ZERO
            if y > ONE:
                y = ONE
            return y
        elif code == ACT_RELU:
            if x < ZERO:
                return ZERO
            return x
        elif code == ACT_SOFTSIGN:
            return x / (ONE + abs(x))
        return x

    return act


_STAGE_CACHE = {}


def make_stage_rows(np_dtype):
    """Device function ``stage_rows(src, dst, ds, tid, nthr)`` for one float dtype: the
    threads of a block copy ``dst[r*ds + k] = src[r, k]`` for every row r and column k
    of ``src`` (global, [R, C]) into ``dst`` (shared, R*ds values).  Each pass moves
    up to 8 values per thread with all 8 loads issued before the stores (one L2 round
    trip per pass; guarded, so small R*C also gets one pass).  The (row, column) of a
    thread's values advance by a step split once into rows and columns, so the loop
    does no integer division."""
    key = np.dtype(np_dtype).str
    fn = _STAGE_CACHE.get(key)
    if fn is not None:
        return fn
    nbdt = _NB_DTYPES[np.dtype(np_dtype)]

    @cuda.jit(device=True)
    def step(r, c, dr, dcol, C):
        # (row, column) of the value nthr = dr*C + dcol places further on
        c += dcol
        if c >= C:
            return r + dr + 1, c - C
        return r + dr, c

    @cuda.jit(device=True)
    def stage_rows(src, dst, ds, tid, nthr):
        R = src.shape[0]
        C = src.shape[1]
        dr = nthr // C             # the step of nthr values, in rows and columns
        dcol = nthr - dr * C
        r = tid // C
        c = tid - r * C
        while r < R:
            v = cuda.local.array(8, nbdt)
            rq = r
            cq = c
            for q in range(8):
                if rq < R:
                    v[q] = src[rq, cq]
                rq, cq = step(rq, cq, dr, dcol, C)
            rq = r
            cq = c
            for q in range(8):
                if rq < R:
                    dst[rq * ds + cq] = v[q]
                rq, cq = step(rq, cq, dr, dcol, C)
            r = rq
            c = cq

    _STAGE_CACHE[key] = stage_rows
    return stage_rows


@cuda.jit(device=True)
def unpack_flags(flags):
    """(has_mask, go_back, zofm, ret_seq, has_h0, has_c0, act, ract) from the packed
    ``flags`` of the persistent kernels."""
    return (flags & 1, (flags >> 1) & 1, (flags >> 2) & 1, (flags >> 3) & 1,
            (flags >> 4) & 1, (flags >> 5) & 1, (flags >> 8) & 0xFF, (flags >> 16) & 0xFF)


@cuda.jit(device=True)
def block_prologue(Ut, Us, st, h0, c0, j0, nu, HB, Hp, has_h0, has_c0):
    """A persistent block's start: copy the recurrent weights of its units j0..j0+nu-1
    (all four gates) into shared memory, Us[(g*HB + u)*Hp + k] = Ut[g*H + j0 + u, k],
    and set their initial state in st [4, B, H] (h0 or 0, c0 or 0, last output 0).
    Ut: [4H, H]; h0, c0: [B, H] (or dummies when absent).  Every thread of the block
    calls it; it ends with a block barrier (the caller's grid barrier publishes st)."""
    H = Ut.shape[1]
    B = st.shape[1]
    tid = cuda.threadIdx.x
    nthr = cuda.blockDim.x
    for e in range(tid, 4 * nu * H, nthr):
        row = e // H
        k = e - row * H
        g = row // nu
        u = row - g * nu
        Us[(g * HB + u) * Hp + k] = Ut[g * H + j0 + u, k]
    for e in range(tid, B * nu, nthr):
        b = e // nu
        j = j0 + e - b * nu
        st[0, b, j] = h0[b, j] if has_h0 != 0 else 0
        st[2, b, j] = c0[b, j] if has_c0 != 0 else 0
        st[3, b, j] = 0
    cuda.syncthreads()


class LSTMKernels:
    """Python kernel functions for one (dtype, RBB), plus their Numba signatures."""

    def __init__(self, np_dtype, rbb, persistent, step, init_state, transpose,
                 signatures, cell_gemm):
        self.dtype = np.dtype(np_dtype)
        self.rbb = rbb
        self.persistent = persistent
        self.step = step
        self.cell_gemm = cell_gemm
        self.init_state = init_state
        self.transpose = transpose
        self.signatures = signatures


_CACHE = {}


def signatures(np_dtype):
    """Numba signatures, per kernel name, for one float dtype."""
    f = _NB_DTYPES[np.dtype(np_dtype)]
    i8 = nbt.int64
    a1 = f[::1]
    a2 = f[:, ::1]
    a3 = f[:, :, ::1]
    m2 = nbt.uint8[:, ::1]
    return {
        # G, Ut, bias, st, out, mask, h0, c0, geo, Hs, flags
        "persistent": (a3, a2, a1, a3, a3, m2, a2, a2, i8, i8, i8),
        # st, h0, c0, flags
        "init_state": (a3, a2, a2, i8),
        # G, Ut1, bias, hin, hout, c, ylast, out, mask, s, t,
        # HB, BB, KS, has_mask, zofm, ret_seq, act, ract
        "step": (a3, a1, a1, a2, a2, a2, a2, a3, m2, i8, i8,
                 i8, i8, i8, i8, i8, i8, i8, i8),
        # zu, G, bias, hin, hout, c, ylast, out, mask, s, t, has_mask, zofm, ret_seq,
        # act, ract
        "cell_gemm": (a2, a3, a1, a2, a2, a2, a2, a3, m2, i8, i8, i8, i8, i8, i8, i8),
        # A, AT
        "transpose": (a2, a2),
    }


def lstm_kernels(np_dtype, rbb):
    """Build (once) the LSTM kernels for ``np_dtype`` (float32/float64) and a register
    tile of ``rbb`` batch rows per thread."""
    key = (np.dtype(np_dtype).str, int(rbb))
    ks = _CACHE.get(key)
    if ks is not None:
        return ks
    nbdt = _NB_DTYPES[np.dtype(np_dtype)]
    ty = np.dtype(np_dtype).type
    ZERO = ty(0.0)
    RBB = int(rbb)
    if RBB not in RBB_CHOICES:
        raise ValueError(f"rbb must be one of {RBB_CHOICES}, got {rbb}")
    act_fn = make_act(np_dtype)
    stage_rows = make_stage_rows(np_dtype)

    @cuda.jit(device=True)
    def dot1(w0, w1, w2, w3, hr, k, ku, ksu, acc):
        # acc[g, 0] += sum over k, k+KS, ... < ku of hr[k] * wg[k]  (RBB = 1)
        a0 = ZERO
        a1 = ZERO
        a2 = ZERO
        a3 = ZERO
        while k < ku:
            hk = hr[k]
            a0 += hk * w0[k]
            a1 += hk * w1[k]
            a2 += hk * w2[k]
            a3 += hk * w3[k]
            k += ksu
        acc[0, 0] = a0
        acc[1, 0] = a1
        acc[2, 0] = a2
        acc[3, 0] = a3

    @cuda.jit(device=True)
    def dot4(w0, w1, w2, w3, h0r, h1r, h2r, h3r, k, ku, ksu, acc):
        # acc[g, r] = sum over k, k+KS, ... < ku of hr_r[k] * wg[k]  (RBB = 4)
        a00 = ZERO
        a01 = ZERO
        a02 = ZERO
        a03 = ZERO
        a10 = ZERO
        a11 = ZERO
        a12 = ZERO
        a13 = ZERO
        a20 = ZERO
        a21 = ZERO
        a22 = ZERO
        a23 = ZERO
        a30 = ZERO
        a31 = ZERO
        a32 = ZERO
        a33 = ZERO
        while k < ku:
            x0 = w0[k]
            x1 = w1[k]
            x2 = w2[k]
            x3 = w3[k]
            hk = h0r[k]
            a00 += hk * x0
            a10 += hk * x1
            a20 += hk * x2
            a30 += hk * x3
            hk = h1r[k]
            a01 += hk * x0
            a11 += hk * x1
            a21 += hk * x2
            a31 += hk * x3
            hk = h2r[k]
            a02 += hk * x0
            a12 += hk * x1
            a22 += hk * x2
            a32 += hk * x3
            hk = h3r[k]
            a03 += hk * x0
            a13 += hk * x1
            a23 += hk * x2
            a33 += hk * x3
            k += ksu
        acc[0, 0] = a00
        acc[0, 1] = a01
        acc[0, 2] = a02
        acc[0, 3] = a03
        acc[1, 0] = a10
        acc[1, 1] = a11
        acc[1, 2] = a12
        acc[1, 3] = a13
        acc[2, 0] = a20
        acc[2, 1] = a21
        acc[2, 2] = a22
        acc[2, 3] = a23
        acc[3, 0] = a30
        acc[3, 1] = a31
        acc[3, 2] = a32
        acc[3, 3] = a33

    @cuda.jit(device=True)
    def reduce_parts(acc, red, part, KS, tid, nthr):
        # Sum the KS partial results of each item (its KS consecutive threads) into
        # the acc of its thread with part == 0: a shared-memory tree (red: 4*RBB*nthr
        # values).  Every thread of the block must call it (barriers inside).
        for g in range(4):
            for r in range(RBB):
                red[(g * RBB + r) * nthr + tid] = acc[g, r]
        cuda.syncthreads()
        w = KS // 2
        while w > 0:
            if part < w:
                for q in range(4 * RBB):
                    red[q * nthr + tid] += red[q * nthr + tid + w]
            cuda.syncthreads()
            w //= 2
        if part == 0:
            for g in range(4):
                for r in range(RBB):
                    acc[g, r] = red[(g * RBB + r) * nthr + tid]
        cuda.syncthreads()

    @cuda.jit(device=True)
    def gates(zi, zf, zc, zo, cp, act, ract):
        # (c', h') of one unit from its four gate pre-activations and its cell state cp
        ig = act_fn(ract, zi)
        fg = act_fn(ract, zf)
        og = act_fn(ract, zo)
        cn = fg * cp + ig * act_fn(act, zc)
        return cn, og * act_fn(act, cn)

    @cuda.jit(device=True)
    def cell_update(zi, zf, zc, zo, bb, j, s, t, G, bias, hin, hout, c, ylast, out, mask,
                    has_mask, zofm, ret_seq, act, ract):
        # Row bb, unit j of step s (input time t) from the recurrent sums zi, zf, zc, zo
        # (hin U, gate order i, f, c, o): adds G[bb, t] + bias; a masked step keeps h and
        # c and outputs the last output (zero with zofm).  Writes c, hout, ylast and,
        # with ret_seq, out[bb, s].
        H = hin.shape[1]
        on = True
        if has_mask != 0:
            on = mask[bb, t] != 0
        if on:
            cn, hn = gates(zi + (G[bb, t, j] + bias[j]), zf + (G[bb, t, H + j] + bias[H + j]),
                           zc + (G[bb, t, 2 * H + j] + bias[2 * H + j]),
                           zo + (G[bb, t, 3 * H + j] + bias[3 * H + j]), c[bb, j], act, ract)
            c[bb, j] = cn
            hout[bb, j] = hn
            y = hn
        else:
            hout[bb, j] = hin[bb, j]
            if zofm != 0:
                y = ZERO
            else:
                y = ylast[bb, j]
        ylast[bb, j] = y
        if ret_seq != 0:
            out[bb, s, j] = y

    @cuda.jit(device=True)
    def cell_step(s, t, G, bias, Uc, ldu, gstride, uoff, hin, hout, c, ylast, out, mask,
                  j0, nu, b0, b1, KS, red, has_mask, zofm, ret_seq, act, ract):
        # One time step for units j0..j0+nu-1 and batch rows b0..b1-1.
        # G: [B, T, 4H] input projection x@W (no bias); bias: [4H]
        # Uc: 1-D weights; the weights of gate g into unit j0+u are
        #     Uc[(g*gstride + uoff + u)*ldu + k], k < H
        # hin, hout, c, ylast: [B, H]; out: [B, T, H] (or dummy); mask: [B, T] uint8
        # red: reduction buffer, 4*RBB*blockDim.x values (used when KS > 1)
        tid = cuda.threadIdx.x
        nthr = cuda.blockDim.x
        H = hin.shape[1]
        part = tid % KS
        slot = tid // KS
        nslots = nthr // KS
        ngrp = (b1 - b0 + RBB - 1) // RBB
        nitems = ngrp * nu
        nrounds = (nitems + nslots - 1) // nslots
        acc = cuda.local.array((4, RBB), nbdt)
        for rnd in range(nrounds):
            item = rnd * nslots + slot
            valid = item < nitems
            for g in range(4):
                for r in range(RBB):
                    acc[g, r] = ZERO
            u = 0
            bb0 = b0
            if valid:
                u = item % nu
                bb0 = b0 + (item // nu) * RBB
                r0 = (uoff + u) * ldu
                r1 = (gstride + uoff + u) * ldu
                r2 = (2 * gstride + uoff + u) * ldu
                r3 = (3 * gstride + uoff + u) * ldu
                # hot loop: row views hoisted, unsigned indices (no negative-index
                # wraparound code), scalar accumulators (registers)
                w0 = Uc[r0:r0 + H]
                w1 = Uc[r1:r1 + H]
                w2 = Uc[r2:r2 + H]
                w3 = Uc[r3:r3 + H]
                Hu = np.uint64(H)
                ksu = np.uint64(KS)
                k = np.uint64(part)
                if RBB == 1:
                    dot1(w0, w1, w2, w3, hin[bb0], k, Hu, ksu, acc)
                else:
                    # RBB == 4; rows past the batch end recompute row b1-1 (discarded)
                    last = b1 - 1
                    dot4(w0, w1, w2, w3, hin[min(bb0, last)], hin[min(bb0 + 1, last)],
                         hin[min(bb0 + 2, last)], hin[min(bb0 + 3, last)], k, Hu, ksu,
                         acc)
            if KS > 1:
                reduce_parts(acc, red, part, KS, tid, nthr)
            if valid and part == 0:
                j = j0 + u
                for r in range(RBB):
                    bb = bb0 + r
                    if bb < b1:
                        cell_update(acc[0, r], acc[1, r], acc[2, r], acc[3, r], bb, j, s,
                                    t, G, bias, hin, hout, c, ylast, out, mask, has_mask,
                                    zofm, ret_seq, act, ract)

    @cuda.jit(device=True)
    def load_inputs(G, bias, mask, t, j, bb0, H, has_mask, zin, mon):
        # zin[g, r] = G[b, t, g*H + j] + bias[g*H + j]; mon[r] = mask[b, t] (1 without a
        # mask) for the item's rows b = bb0 + r (rows past the end reuse row B-1)
        last = G.shape[0] - 1
        for r in range(RBB):
            bb = min(bb0 + r, last)
            for g in range(4):
                zin[g, r] = G[bb, t, g * H + j] + bias[g * H + j]
            mon[r] = mask[bb, t] if has_mask != 0 else np.uint8(1)

    def lstm_persistent(G, Ut, bias, st, out, mask, h0, c0, geo, Hs, flags):
        # G: [B, T, 4H] input projection x@W (no bias); Ut: [4H, H] (recurrent kernel
        # transposed: Ut[g*H+j, k] = U[k, g*H+j]); bias: [4H];
        # st: [4, B, H] state, written here: st[0], st[1] = h double buffer (step s
        #     reads st[s % 2], writes st[1 - s % 2]), st[2] = c, st[3] = last output;
        # out: [B, T, H] or [1, 1, 1]; mask: [B, T] uint8 or [1, 1];
        # h0, c0: [B, H] initial state, or [1, 1] when absent (zeros);
        # geo = HB | KS << 20 | Hp << 40; Hs: row stride of h staged in shared memory
        #     (0: h is read from global memory);
        # flags = has_mask | go_back << 1 | zofm << 2 | ret_seq << 3 | has_h0 << 4
        #         | has_c0 << 5 | act << 8 | ract << 16.
        # Grid: ceil(H/HB) blocks, launched cooperatively; dynamic shared memory
        # 4*HB*Hp (weights) + B*Hs (staged h) (+ 4*RBB*blockDim.x if KS > 1) values.
        B = G.shape[0]
        T = G.shape[1]
        H = Ut.shape[1]
        HB = geo & 0xFFFFF
        KS = (geo >> 20) & 0xFFFFF
        Hp = geo >> 40
        has_mask, go_back, zofm, ret_seq, has_h0, has_c0, act, ract = \
            unpack_flags(flags)
        j0 = cuda.blockIdx.x * HB
        nu = min(HB, H - j0)
        tid = cuda.threadIdx.x
        nthr = cuda.blockDim.x
        sm = cuda.shared.array(0, nbdt)
        nus = 4 * HB * Hp
        nhs = B * Hs
        Us = sm[:nus]
        hs = sm[nus:nus + nhs]
        red = sm[nus + nhs:]
        block_prologue(Ut, Us, st, h0, c0, j0, nu, HB, Hp, has_h0, has_c0)
        grid = cuda.cg.this_grid()
        grid.sync()
        part = tid % KS
        slot = tid // KS
        nslots = nthr // KS
        ngrp = (B + RBB - 1) // RBB
        nitems = ngrp * nu
        nrounds = (nitems + nslots - 1) // nslots
        last = B - 1
        ksu = np.uint64(KS)
        Hu = np.uint64(H)
        acc = cuda.local.array((4, RBB), nbdt)
        zin = cuda.local.array((4, RBB), nbdt)
        mon = cuda.local.array(RBB, nbt.uint8)
        # one round (every item has its own threads): the owner keeps c and the last
        # output of its rows in registers and loads the next step's inputs before the
        # grid barrier
        single = nrounds == 1
        creg = cuda.local.array(RBB, nbdt)
        yreg = cuda.local.array(RBB, nbdt)
        c = st[2]
        ylast = st[3]
        if single:
            item = slot
            if item < nitems and part == 0:
                u = item % nu
                bb0 = (item // nu) * RBB
                for r in range(RBB):
                    creg[r] = c[min(bb0 + r, last), j0 + u]
                    yreg[r] = ZERO
                load_inputs(G, bias, mask, T - 1 if go_back != 0 else 0, j0 + u, bb0, H,
                            has_mask, zin, mon)
        for s in range(T):
            t = s
            if go_back != 0:
                t = T - 1 - s
            p = s % 2
            hin = st[p]
            hout = st[1 - p]
            # one round: c and the last output stay in registers until the last step
            keep = single and s + 1 < T
            if Hs > 0:
                # stage all of h once per step (the grid barrier before this step also
                # ended every thread's reads of the previous one)
                stage_rows(hin, hs, Hs, tid, nthr)
                cuda.syncthreads()
            for rnd in range(nrounds):
                item = rnd * nslots + slot
                valid = item < nitems
                u = 0
                bb0 = 0
                if valid:
                    u = item % nu
                    bb0 = (item // nu) * RBB
                if valid and part == 0 and not single:
                    load_inputs(G, bias, mask, t, j0 + u, bb0, H, has_mask, zin, mon)
                for g in range(4):
                    for r in range(RBB):
                        acc[g, r] = ZERO
                if valid:
                    w0 = Us[u * Hp:u * Hp + H]
                    w1 = Us[(HB + u) * Hp:(HB + u) * Hp + H]
                    w2 = Us[(2 * HB + u) * Hp:(2 * HB + u) * Hp + H]
                    w3 = Us[(3 * HB + u) * Hp:(3 * HB + u) * Hp + H]
                    k = np.uint64(part)
                    if RBB == 1:
                        if Hs > 0:
                            dot1(w0, w1, w2, w3, hs[bb0 * Hs:bb0 * Hs + H], k, Hu, ksu,
                                 acc)
                        else:
                            dot1(w0, w1, w2, w3, hin[bb0], k, Hu, ksu, acc)
                    else:
                        # rows past the batch end reuse row B-1 (results discarded)
                        q0 = min(bb0, last)
                        q1 = min(bb0 + 1, last)
                        q2 = min(bb0 + 2, last)
                        q3 = min(bb0 + 3, last)
                        if Hs > 0:
                            dot4(w0, w1, w2, w3, hs[q0 * Hs:q0 * Hs + H],
                                 hs[q1 * Hs:q1 * Hs + H], hs[q2 * Hs:q2 * Hs + H],
                                 hs[q3 * Hs:q3 * Hs + H], k, Hu, ksu, acc)
                        else:
                            dot4(w0, w1, w2, w3, hin[q0], hin[q1], hin[q2], hin[q3], k,
                                 Hu, ksu, acc)
                if KS > 1:
                    reduce_parts(acc, red, part, KS, tid, nthr)
                if valid and part == 0:
                    j = j0 + u
                    for r in range(RBB):
                        bb = bb0 + r
                        if bb < B:
                            if single:
                                cp = creg[r]
                                if not keep:    # last step: c must reach memory
                                    c[bb, j] = cp
                            else:
                                cp = c[bb, j]
                            if mon[r] != 0:
                                cn, hn = gates(acc[0, r] + zin[0, r], acc[1, r] + zin[1, r],
                                               acc[2, r] + zin[2, r], acc[3, r] + zin[3, r],
                                               cp, act, ract)
                                if keep:
                                    creg[r] = cn
                                else:
                                    c[bb, j] = cn
                                hout[bb, j] = hn
                                y = hn
                            else:
                                hout[bb, j] = hin[bb, j]
                                if zofm != 0:
                                    y = ZERO
                                elif single:
                                    y = yreg[r]
                                else:
                                    y = ylast[bb, j]
                            if keep:
                                yreg[r] = y
                            else:
                                ylast[bb, j] = y
                            if ret_seq != 0:
                                out[bb, s, j] = y
            if s + 1 < T:
                if single and slot < nitems and part == 0:
                    load_inputs(G, bias, mask, T - 2 - s if go_back != 0 else s + 1,
                                j0 + slot % nu, (slot // nu) * RBB, H, has_mask, zin, mon)
                grid.sync()

    def init_state(st, h0, c0, flags):
        # st: [4, B, H] <- (h0 or 0, anything, c0 or 0, 0) for the per-step kernel;
        # h0, c0: [B, H] or [1, 1]; flags as in lstm_persistent (bits 4, 5 used).
        # 1-D grid-stride loop over B*H.
        B = st.shape[1]
        H = st.shape[2]
        has_h0 = (flags >> 4) & 1
        has_c0 = (flags >> 5) & 1
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        while i < B * H:
            b = i // H
            j = i - b * H
            st[0, b, j] = h0[b, j] if has_h0 != 0 else ZERO
            st[2, b, j] = c0[b, j] if has_c0 != 0 else ZERO
            st[3, b, j] = ZERO
            i += stride

    def lstm_step(G, Ut1, bias, hin, hout, c, ylast, out, mask, s, t,
                  HB, BB, KS, has_mask, zofm, ret_seq, act, ract):
        # One step: G [B, T, 4H]; Ut1: [4H*H] (Ut flattened, row stride H); bias [4H];
        # hin, hout, c, ylast: [B, H]; out [B, T, H] or [1, 1, 1]; mask [B, T] uint8.
        # Grid: (ceil(H/HB), ceil(B/BB)); dynamic shared memory 4*RBB*blockDim.x if
        # KS > 1.
        B = hin.shape[0]
        H = hin.shape[1]
        j0 = cuda.blockIdx.x * HB
        nu = min(HB, H - j0)
        b0 = cuda.blockIdx.y * BB
        b1 = min(B, b0 + BB)
        red = cuda.shared.array(0, nbdt)
        cell_step(s, t, G, bias, Ut1, H, H, j0, hin, hout, c, ylast, out, mask,
                  j0, nu, b0, b1, KS, red, has_mask, zofm, ret_seq, act, ract)

    def cell_gemm(zu, G, bias, hin, hout, c, ylast, out, mask, s, t, has_mask, zofm,
                  ret_seq, act, ract):
        # One step after its recurrent product zu = hin U (a cuBLAS GEMM per step, mode
        # "gemm"): one thread per (row, unit), 1-D grid-stride loop.
        # zu: [B, 4H]; G: [B, T, 4H] input projection x@W (no bias); bias: [4H];
        # hin, hout, c, ylast: [B, H]; out: [B, T, H] (or dummy); mask: [B, T] uint8.
        H = hin.shape[1]
        n = hin.shape[0] * H
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        while k < n:
            bb = k // H
            j = k - bb * H
            cell_update(zu[bb, j], zu[bb, H + j], zu[bb, 2 * H + j], zu[bb, 3 * H + j], bb,
                        j, s, t, G, bias, hin, hout, c, ylast, out, mask, has_mask, zofm,
                        ret_seq, act, ract)
            k += stride

    def transpose(A, AT):
        # A: [R, C] -> AT: [C, R]; 1-D grid-stride loop over the elements of AT.
        R = A.shape[0]
        C = A.shape[1]
        n = R * C
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        while i < n:
            cc = i // R
            rr = i - cc * R
            AT[cc, rr] = A[rr, cc]
            i += stride

    ks = LSTMKernels(np_dtype, RBB, lstm_persistent, lstm_step, init_state, transpose,
                     signatures(np_dtype), cell_gemm)
    _CACHE[key] = ks
    return ks
