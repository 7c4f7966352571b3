"""CUDA kernels (Numba) for training an LSTM: the per-step cell of a forward pass that
saves what backpropagation through time needs, and the per-step cell of the backward
recurrence (Keras gate order i, f, c, o).  The CUDA counterpart of ``lstm_bwd_cpu``,
with the same layout and semantics.

Layout: everything is **time-major** and indexed by **input time** ``t`` (with Keras
``go_backwards`` processing step ``s`` reads input time ``t = T - 1 - s``), so the large
products of the backward pass are single GEMMs over all steps, run by the glue
(``fastseq._cuda.lstm_vjp_cuda``) with the GEMM kernel::

    dW = X^T dZ    dU = Hp^T dZ    db = column sums of dZ    dX = dZ W^T

Two ways to run the recurrences (``fastseq._cuda.TRAIN_MODE``):

- "auto": the forward recurrence runs in the inference kernels (``lstm_cuda``), and
  ``scan_h`` / ``scan_c`` rebuild what backpropagation needs from its outputs (h
  before each step, then the gates and c from x W and hprev U, two GEMMs over all
  steps); the backward recurrence is one cooperative launch of ``bwd_persistent``
  (one grid barrier per step).
- "stepwise": per step, a GEMM launch for ``h U`` (forward) or ``dz U^T`` (backward)
  between cell launches (``fwd_cell``; ``bwd_cell`` and ``bwd_dh``).

One thread per (batch row, hidden unit) in the cell and scan kernels, over a 1-D
grid-stride loop; a thread touches only its own unit's state, so a cell needs no
barrier (the step's GEMM, a launch before, has read all of h).

Masking as in ``lstm_bwd_cpu``: a masked step keeps h and c; its output is the previous
output of the row (zero before the first step) or zero with ``zero_output_for_mask``;
backward, the state gradients pass a masked step unchanged, its dz is zero, and the
gradient of its output flows to the previous output through ``carry`` (or is dropped
with ``zero_output_for_mask``).

Kernels are built per dtype by ``train_kernels``; ``signatures`` lists the exact Numba
signatures the glue compiles.  Importing this module needs ``numba.cuda`` but no GPU.
"""
import numpy as np
from numba import cuda
from numba import types as nbt

from .activations import (ACT_HARD_SIGMOID, ACT_RELU, ACT_SIGMOID, ACT_SOFTSIGN,
                          ACT_TANH)
from .lstm_cuda import make_act, make_stage_rows

_NB_DTYPES = {np.dtype(np.float32): nbt.float32, np.dtype(np.float64): nbt.float64}
_CACHE = {}


def make_act_grad(np_dtype):
    """Device function ``act_grad(code, y)``: the derivative of activation ``code`` at
    the point where it returned ``y`` (as ``lstm_bwd_cpu.act_grad``)."""
    ty = np.dtype(np_dtype).type
    ZERO = ty(0.0)
    ONE = ty(1.0)
    SIXTH = ty(1.0 / 6.0)

    @cuda.jit(device=True)
    def act_grad(code, y):
        if code == ACT_TANH:
            return ONE - y * y
        elif code == ACT_SIGMOID:
            return y * (ONE - y)
        elif code == ACT_HARD_SIGMOID:
            if y > ZERO and y < ONE:
                return SIXTH
            return ZERO
        elif code == ACT_RELU:
            if y > ZERO:
                return ONE
            return ZERO
        elif code == ACT_SOFTSIGN:
            a = ONE - abs(y)
            return a * a
        return ONE

    return act_grad


def signatures(np_dtype):
    """Argument types of each kernel for one float dtype."""
    f = _NB_DTYPES[np.dtype(np_dtype)]
    i = nbt.int64
    a2, a3 = f[:, ::1], f[:, :, ::1]
    m2 = nbt.uint8[:, ::1]
    return {
        # xw, zu, b, mask, t, tp, s, h, c, hprev, cprev, gates, actc, out, zofm, act, rec
        "fwd_cell": (a3, a2, f[::1], m2, i, i, i, a2, a2, a3, a3, a3, a3, a3, i, i, i),
        # dout, carry, dh, dc, gates, actc, cprev, dz, mask, t, zofm, act, rec
        "bwd_cell": (a3, a2, a2, a2, a3, a3, a3, a3, m2, i, i, i, i),
        # dhu, dh, mask, t
        "bwd_dh": (a2, a2, m2, i),
        # A, out
        "col_sum": (a2, f[::1]),
        # outs, mask, h0, hprev, out, go_back
        "scan_h": (a3, m2, a2, a3, a3, i),
        # xw, gates, b, mask, c0, cprev, actc, go_back, act, rec
        "scan_c": (a3, a3, f[::1], m2, a2, a3, a3, i, i, i),
        # src, dst, rev
        "swap01": (a3, a3, i),
        # dout, gates, actc, cprev, mask, U, dz, dh, dc, carry, geo, strides, flags
        "bwd_persistent": (a3, a3, a3, a3, m2, a2, a3, a2, a2, a2, i, i, i),
        "bwd_persistent_global": (a3, a3, a3, a3, m2, a2, a3, a2, a2, a2, i, i, i),
    }


class TrainKernels:
    """Python kernel functions for one dtype, plus their Numba signatures."""

    def __init__(self, np_dtype, sigs, **kernels):
        self.dtype = np.dtype(np_dtype)
        self.signatures = sigs
        for name, fn in kernels.items():
            setattr(self, name, fn)


def train_kernels(np_dtype):
    """The training kernels for ``np_dtype`` (cached)."""
    key = np.dtype(np_dtype).str
    ks = _CACHE.get(key)
    if ks is not None:
        return ks
    ty = np.dtype(np_dtype).type
    ZERO = ty(0.0)
    nbdt = _NB_DTYPES[np.dtype(np_dtype)]
    act = make_act(np_dtype)
    act_grad = make_act_grad(np_dtype)
    stage_rows = make_stage_rows(np_dtype)

    def fwd_cell(xw, zu, b, mask, t, tp, s, h, c, hprev, cprev, gates, actc, out, zofm,
                 a_code, r_code):
        # xw: [T, B, 4H] x W (no bias); zu: [B, 4H] h U of this step (from the GEMM);
        # b: [4H]; mask: [T, B] uint8; t: input time of step s, tp: of step s - 1;
        # h, c: [B, H] state, updated; hprev, cprev: [T, B, H] written at t: the state
        # before the step; gates: [T, B, 4H] written at t (unmasked rows): i, f, g, o;
        # actc: [T, B, H] written at t (unmasked rows): act(c); out: [T, B, H] written
        # at t: the step's output
        B = h.shape[0]
        H = h.shape[1]
        n = B * H
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        while k < n:
            r = k // H
            j = k - r * H
            hv = h[r, j]
            cv = c[r, j]
            hprev[t, r, j] = hv
            cprev[t, r, j] = cv
            if mask[t, r] != 0:
                zi = zu[r, j] + xw[t, r, j] + b[j]
                zf = zu[r, H + j] + xw[t, r, H + j] + b[H + j]
                zg = zu[r, 2 * H + j] + xw[t, r, 2 * H + j] + b[2 * H + j]
                zo = zu[r, 3 * H + j] + xw[t, r, 3 * H + j] + b[3 * H + j]
                gi = act(r_code, zi)
                gf = act(r_code, zf)
                gg = act(a_code, zg)
                go = act(r_code, zo)
                gates[t, r, j] = gi
                gates[t, r, H + j] = gf
                gates[t, r, 2 * H + j] = gg
                gates[t, r, 3 * H + j] = go
                cn = gf * cv + gi * gg
                ac = act(a_code, cn)
                actc[t, r, j] = ac
                hn = go * ac
                c[r, j] = cn
                h[r, j] = hn
                out[t, r, j] = hn
            elif zofm != 0 or s == 0:
                out[t, r, j] = ZERO
            else:
                out[t, r, j] = out[tp, r, j]
            k += stride

    @cuda.jit(device=True)
    def cell_grad(r, j, t, dout, carry, dh, dc, gates, actc, cprev, dz, mask, zofm,
                  a_code, r_code):
        # The backward cell of batch row r, unit j at input time t (see bwd_cell):
        # writes dz[t, r, g*H + j] and updates dc[r, j] and carry[r, j].
        H = dh.shape[1]
        if mask[t, r] != 0:
            dhv = dout[t, r, j] + carry[r, j] + dh[r, j]
            carry[r, j] = ZERO
            a = actc[t, r, j]
            o = gates[t, r, 3 * H + j]
            dcn = dc[r, j] + dhv * o * act_grad(a_code, a)
            dz[t, r, 3 * H + j] = dhv * a * act_grad(r_code, o)
            gi = gates[t, r, j]
            gf = gates[t, r, H + j]
            gg = gates[t, r, 2 * H + j]
            dz[t, r, j] = dcn * gg * act_grad(r_code, gi)
            dz[t, r, H + j] = dcn * cprev[t, r, j] * act_grad(r_code, gf)
            dz[t, r, 2 * H + j] = dcn * gi * act_grad(a_code, gg)
            dc[r, j] = dcn * gf
        else:
            dz[t, r, j] = ZERO
            dz[t, r, H + j] = ZERO
            dz[t, r, 2 * H + j] = ZERO
            dz[t, r, 3 * H + j] = ZERO
            if zofm != 0:
                carry[r, j] = ZERO
            else:
                carry[r, j] += dout[t, r, j]

    def bwd_cell(dout, carry, dh, dc, gates, actc, cprev, dz, mask, t, zofm, a_code,
                 r_code):
        # dout: [T, B, H] gradient wrt the outputs; carry: [B, H] gradient flowing along
        # masked outputs; dh, dc: [B, H] gradient wrt the state after the step (dc is
        # left holding it before the step; dh is replaced by bwd_dh after the GEMM);
        # gates, actc, cprev: as saved by fwd_cell; dz: [T, B, 4H] written at t
        B = dh.shape[0]
        H = dh.shape[1]
        n = B * H
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        while k < n:
            r = k // H
            cell_grad(r, k - r * H, t, dout, carry, dh, dc, gates, actc, cprev, dz, mask,
                      zofm, a_code, r_code)
            k += stride

    def bwd_dh(dhu, dh, mask, t):
        # dhu: [B, H] = dz[t] U^T (from the GEMM); dh: [B, H] <- dhu on unmasked rows
        B = dh.shape[0]
        H = dh.shape[1]
        n = B * H
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        while k < n:
            r = k // H
            if mask[t, r] != 0:
                dh[r, k - r * H] = dhu[r, k - r * H]
            k += stride

    def col_sum(A, out):
        # A: [R, C] -> out: [C], out[j] = sum over rows of A[:, j] (one thread a column)
        R = A.shape[0]
        C = A.shape[1]
        j = cuda.grid(1)
        stride = cuda.gridsize(1)
        while j < C:
            acc = ZERO
            for i in range(R):
                acc += A[i, j]
            out[j] = acc
            j += stride

    def swap01(src, dst, rev):
        # dst[q, p, :] = src[p, q, :] (src[p, Q-1-q, :] when rev != 0), blocks over the
        # rows (p, q) in turn, threads along a row.  src: [P, Q, R]; dst: [Q, P, R]
        P = src.shape[0]
        Q = src.shape[1]
        R = src.shape[2]
        row = cuda.blockIdx.x
        while row < P * Q:
            q = row // P
            p = row - q * P
            qs = Q - 1 - q if rev != 0 else q
            k = cuda.threadIdx.x
            while k < R:
                dst[q, p, k] = src[p, qs, k]
                k += cuda.blockDim.x
            row += cuda.gridDim.x

    def scan_h(outs, mask, h0, hprev, out, go_back):
        # The persistent forward's outputs rearranged for backpropagation, one thread
        # per (row, unit), walking the steps in order.
        # outs: [B, T, H] outputs in processing order (lstm_cuda's); mask: [T, B];
        # h0: [B, H] initial h; hprev: [T, B, H] <- the h before each input time's step
        # (an unmasked step's output is its new h; a masked step keeps h);
        # out: [T, B, H] <- outs at input times.
        B = outs.shape[0]
        T = outs.shape[1]
        H = outs.shape[2]
        n = B * H
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        while k < n:
            r = k // H
            j = k - r * H
            hv = h0[r, j]
            for s in range(T):
                t = T - 1 - s if go_back != 0 else s
                hprev[t, r, j] = hv
                y = outs[r, s, j]
                out[t, r, j] = y
                if mask[t, r] != 0:
                    hv = y
            k += stride

    def scan_c(xw, gates, b, mask, c0, cprev, actc, go_back, a_code, r_code):
        # The cell state along the steps, from the gate inputs; one thread per (row,
        # unit).  xw: [T, B, 4H] x W (no bias); gates: [T, B, 4H] holds hprev U on entry
        # and the activated gates i, f, g, o on return (unmasked rows); b: [4H];
        # mask: [T, B]; c0: [B, H]; cprev: [T, B, H] <- c before each step; actc:
        # [T, B, H] <- act(c) after each unmasked step.
        T = xw.shape[0]
        B = c0.shape[0]
        H = c0.shape[1]
        n = B * H
        k = cuda.grid(1)
        stride = cuda.gridsize(1)
        while k < n:
            r = k // H
            j = k - r * H
            cv = c0[r, j]
            for s in range(T):
                t = T - 1 - s if go_back != 0 else s
                cprev[t, r, j] = cv
                if mask[t, r] != 0:
                    gi = act(r_code, gates[t, r, j] + xw[t, r, j] + b[j])
                    gf = act(r_code, gates[t, r, H + j] + xw[t, r, H + j] + b[H + j])
                    gg = act(a_code, gates[t, r, 2 * H + j] + xw[t, r, 2 * H + j]
                             + b[2 * H + j])
                    go = act(r_code, gates[t, r, 3 * H + j] + xw[t, r, 3 * H + j]
                             + b[3 * H + j])
                    gates[t, r, j] = gi
                    gates[t, r, H + j] = gf
                    gates[t, r, 2 * H + j] = gg
                    gates[t, r, 3 * H + j] = go
                    cv = gf * cv + gi * gg
                    actc[t, r, j] = act(a_code, cv)
            k += stride

    @cuda.jit(device=True)
    def dot4rows(w, z0, z1, z2, z3, m, n, step):
        # (z0 . w, z1 . w, z2 . w, z3 . w) over m, m + step, ... < n (1-D arrays)
        a0 = ZERO
        a1 = ZERO
        a2 = ZERO
        a3 = ZERO
        while m < n:
            wm = w[m]
            a0 += z0[m] * wm
            a1 += z1[m] * wm
            a2 += z2[m] * wm
            a3 += z3[m] * wm
            m += step
        return a0, a1, a2, a3

    def make_bwd_persistent(STAGED):
        # STAGED (a compile-time constant): dz[t] staged in shared memory (RC > 0) or
        # read from global memory (RC = 0); two kernels, so each compiles alone
        def bwd_persistent(dout, gates, actc, cprev, mask, U, dz, dh, dc, carry, geo,
                           strides, flags):
            # The whole backward recurrence in one cooperative launch (bwd_cell, the
            # product dz[t] U^T and bwd_dh of every step).  Block q owns units j0..j0+nu-1
            # (j0 = q*HB) and keeps their rows of U in shared memory.  Each step: (A) the
            # cell gradient of its units (dz[t, :, g*H + j]; reads dh of its own units
            # only), a grid barrier publishing dz[t], then (B) dh[r, j] = dz[t, r, :] . U[j]
            # on unmasked rows: dz[t] is staged in shared memory RC rows at a time (up to 8
            # loads in flight per thread), or read from global memory when RC = 0 (one
            # chunk of all B rows); KS threads share the dot products of each item
            # of 4 rows x 1 unit (4 sums per thread, each U value loaded once for 4 rows),
            # summed through shared memory.
            # dout, actc, cprev: [T, B, H]; gates, dz: [T, B, 4H]; mask: [T, B] uint8;
            # U: [H, 4H]; dh, dc, carry: [B, H], the gradients wrt the final state on entry
            # (carry: zeros) and wrt the initial state on return;
            # geo = HB | KS << 16 | RC << 32; strides = Up | Zs << 32: the padded row
            # strides of the staged U rows and dz rows;
            # flags = go_back | zofm << 1 | act << 8 | rec << 16.
            # Dynamic shared memory: HB*Up + RC*Zs + 4*blockDim.x values.
            T = gates.shape[0]
            B = gates.shape[1]
            H4 = gates.shape[2]
            H = H4 // 4
            HB = geo & 0xFFFF
            KS = (geo >> 16) & 0xFFFF
            RC = geo >> 32
            Up = strides & 0xFFFFFFFF
            Zs = strides >> 32
            go_back = flags & 1
            zofm = (flags >> 1) & 1
            a_code = (flags >> 8) & 0xFF
            r_code = (flags >> 16) & 0xFF
            j0 = cuda.blockIdx.x * HB
            nu = min(HB, H - j0)
            tid = cuda.threadIdx.x
            nthr = cuda.blockDim.x
            sm = cuda.shared.array(0, nbdt)
            nus = HB * Up
            Us = sm[:nus]
            zs = sm[nus:nus + RC * Zs]
            red = sm[nus + RC * Zs:nus + RC * Zs + 4 * nthr]
            for e in range(tid, nu * H4, nthr):
                u = e // H4
                Us[u * Up + e - u * H4] = U[j0 + u, e - u * H4]
            cuda.syncthreads()
            part = tid % KS
            slot = tid // KS
            nslots = nthr // KS
            staged = STAGED
            CH = RC if staged else B     # rows per chunk
            H4u = np.uint64(H4)
            ksu = np.uint64(KS)
            grid = cuda.cg.this_grid()
            for s in range(T - 1, -1, -1):
                t = T - 1 - s if go_back != 0 else s
                for e in range(tid, B * nu, nthr):
                    r = e // nu
                    cell_grad(r, j0 + e - r * nu, t, dout, carry, dh, dc, gates, actc, cprev,
                              dz, mask, zofm, a_code, r_code)
                cuda.threadfence()
                grid.sync()
                for r0 in range(0, B, CH):
                    nr = min(CH, B - r0)
                    # stage rows r0..r0+nr-1 of dz[t]
                    if staged:
                        stage_rows(dz[t, r0:r0 + nr], zs, Zs, tid, nthr)
                    cuda.syncthreads()
                    # items: 4 rows x 1 unit (rows past the chunk reuse its last row; their
                    # sums are discarded), KS threads each
                    nitems = ((nr + 3) // 4) * nu
                    nrounds = (nitems + nslots - 1) // nslots
                    for rnd in range(nrounds):
                        item = rnd * nslots + slot
                        grp = item // nu
                        u = item - grp * nu
                        a0 = ZERO
                        a1 = ZERO
                        a2 = ZERO
                        a3 = ZERO
                        if item < nitems:
                            wrow = Us[u * Up:u * Up + H4]
                            q0 = 4 * grp
                            q1 = min(q0 + 1, nr - 1)
                            q2 = min(q0 + 2, nr - 1)
                            q3 = min(q0 + 3, nr - 1)
                            if staged:
                                a0, a1, a2, a3 = dot4rows(
                                    wrow, zs[q0 * Zs:q0 * Zs + H4], zs[q1 * Zs:q1 * Zs + H4],
                                    zs[q2 * Zs:q2 * Zs + H4], zs[q3 * Zs:q3 * Zs + H4],
                                    np.uint64(part), H4u, ksu)
                            else:
                                a0, a1, a2, a3 = dot4rows(
                                    wrow, dz[t, r0 + q0], dz[t, r0 + q1], dz[t, r0 + q2],
                                    dz[t, r0 + q3], np.uint64(part), H4u, ksu)
                        if KS > 1:
                            red[tid] = a0
                            red[nthr + tid] = a1
                            red[2 * nthr + tid] = a2
                            red[3 * nthr + tid] = a3
                            cuda.syncthreads()
                            w2 = KS // 2
                            while w2 > 0:
                                if part < w2:
                                    for q in range(4):
                                        red[q * nthr + tid] += red[q * nthr + tid + w2]
                                cuda.syncthreads()
                                w2 //= 2
                            a0 = red[tid]
                            a1 = red[nthr + tid]
                            a2 = red[2 * nthr + tid]
                            a3 = red[3 * nthr + tid]
                            cuda.syncthreads()
                        if item < nitems and part == 0:
                            j = j0 + u
                            rb = r0 + 4 * grp
                            if mask[t, rb] != 0:
                                dh[rb, j] = a0
                            if 4 * grp + 1 < nr and mask[t, rb + 1] != 0:
                                dh[rb + 1, j] = a1
                            if 4 * grp + 2 < nr and mask[t, rb + 2] != 0:
                                dh[rb + 2, j] = a2
                            if 4 * grp + 3 < nr and mask[t, rb + 3] != 0:
                                dh[rb + 3, j] = a3
                    # the next chunk overwrites zs; (A) of the next step reads dh of this
                    # block's units, written above by other threads of the block
                    cuda.syncthreads()

        return bwd_persistent

    bwd_persistent = make_bwd_persistent(True)
    bwd_persistent_global = make_bwd_persistent(False)

    ks = TrainKernels(np_dtype, signatures(np_dtype), fwd_cell=fwd_cell,
                      bwd_cell=bwd_cell, bwd_dh=bwd_dh, col_sum=col_sum, scan_h=scan_h,
                      scan_c=scan_c, swap01=swap01, bwd_persistent=bwd_persistent,
                      bwd_persistent_global=bwd_persistent_global)
    _CACHE[key] = ks
    return ks
