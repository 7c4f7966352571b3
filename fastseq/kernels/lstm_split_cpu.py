"""Numba CPU kernel: the LSTM recurrence of a small batch on two cores, split by hidden
units, with a spin barrier per step (Keras gate order i, f, c, o).

At batch 1-4 a step's work is the product h U, which reads all of U [H, 4H] (256 KB at
H = 128 in float32): on one core that read from L2 bounds the step.  Here part p of two
threads owns hidden units [u0, u1) = [p H / 2, (p + 1) H / 2): the columns of U, W and b
of those units' four gates, half of U, so each core reads half of it per step.  Every
step each part computes its units' gates from the whole previous h, writes its half of
the new h, and publishes it (an epoch per part, ``sync_cpu``, a release store and an
acquire load, about 0.05 us a round trip here).  The step is pipelined across that
exchange: right after publishing, a part already sums its own units of the new h into
the next step's pre-activations, and only then waits for the other half.  h is
double-buffered (step s reads h[s % 2] and writes h[(s + 1) % 2]), so one exchange per
step is enough.  Every pre-activation adds its own slice's units first, then the
others', in the split and in the alone runs alike.

Each part reads its slice's columns of W, U and b packed contiguously (``packed``): packed
once per set of weights by the caller (``pack_slices``; an imported model keeps them), or
by each part for its own slice at the start of the job.  Each part computes its own
columns of the input projection x W for a chunk of steps, so no [B, T, 4H] buffer
exists.  With a Dense epilogue the chunk's outputs go to a shared
[B, Tc, H] buffer; after a barrier each part applies the Dense (+ activation) to half
of the chunk's rows, then a second barrier protects the buffer until both are done.

The products (each step's h U, the chunk's projection, the Dense) run in the register
tiles of ``tile_cpu``; at batch 1 a step's h U is one row through the wide row tiles, a
single stream through the packed half of U.

The same kernel runs alone (``nparts`` = 1, units [0, H)) when the partner thread did
not start in time (``sync_cpu.claim``).  Masking as in ``lstm_cpu``.
"""
import numpy as np
from numba import njit

from ..config import NJIT_OPTS, NJIT_INLINE_OPTS
from .dense_cpu import bias_act_rows
from .lstm_cpu import _cell_row
from .sync_cpu import barrier, claim, publish, wait_other
from .tile_cpu import gemm_rows_acc, gemm_rows_acc_k

OUT_NONE, OUT_SEQUENCE, OUT_EPILOGUE = 0, 1, 2


@njit(**NJIT_INLINE_OPTS)
def _pack_slice(W, U, b, u0, u1, Wp, Up, bp):
    """Columns of units [u0, u1) of W [D, 4H], U [H, 4H], b [4H], gate by gate, into
    contiguous Wp [D, 4 Hh], Up [H, 4 Hh], bp [4 Hh] (Hh = u1 - u0)."""
    H = U.shape[0]
    Hh = u1 - u0
    for g in range(4):
        src = g * H + u0
        dst = g * Hh
        # row slices: an index src + j could be negative as far as Numba knows, and
        # its wraparound check would stop the copies vectorising
        for k in range(W.shape[0]):
            wi = W[k, src:src + Hh]
            wo = Wp[k, dst:dst + Hh]
            for j in range(Hh):
                wo[j] = wi[j]
        for k in range(H):
            ui = U[k, src:src + Hh]
            uo = Up[k, dst:dst + Hh]
            for j in range(Hh):
                uo[j] = ui[j]
        bi = b[src:src + Hh]
        bo = bp[dst:dst + Hh]
        for j in range(Hh):
            bo[j] = bi[j]


@njit(**NJIT_INLINE_OPTS)
def _project(x, t0, n, Wp, bp, xw):
    """xw[r, :n] = x[r, t0:t0 + n] Wp + bp for every row r (xw: [Bp, Tc, 4 Hh])."""
    for r in range(x.shape[0]):
        zx = xw[r]
        for t in range(n):
            for j in range(bp.shape[0]):
                zx[t, j] = bp[j]
        gemm_rows_acc(x[r, t0:t0 + n], n, Wp, zx)


@njit(**NJIT_INLINE_OPTS)
def _slice_units(q, H):
    """Units [u0, u1) of slice q (0: the first H // 2, 1: the rest)."""
    return (0, H // 2) if q == 0 else (H // 2, H)


@njit(**NJIT_INLINE_OPTS)
def _own_product(t, u0, u1, Up, xw, z, h):
    """The first half of a step's pre-activations, z = xw[:, t] + h[:, u0:u1] U[u0:u1]
    (this slice's columns): the slice's own units of h, known before the other part
    has finished the previous step."""
    Bp, G = z.shape
    for r in range(Bp):
        for j in range(G):
            z[r, j] = xw[r, t, j]
    gemm_rows_acc_k(h, Bp, u0, u1 - u0, Up[u0:u1], z)


@njit(**NJIT_INLINE_OPTS)
def _finish_step(s, t, u0, u1, Up, z, hc, hn, c, seen, mask, seqbuf, out, out_mode,
                 zero_output, act, rec):
    """The rest of step s (chunk step t) for units [u0, u1) of every row: z += the
    other units of h times their rows of U, the gates, the new c and h, and the
    outputs of those units."""
    Bp, G = z.shape
    H = hc.shape[1]
    Hh = u1 - u0
    if u0 > 0:
        gemm_rows_acc_k(hc, Bp, 0, u0, Up[:u0], z)
    if u1 < H:
        gemm_rows_acc_k(hc, Bp, u1, H - u1, Up[u1:], z)
    for r in range(Bp):
        hrow = hn[r, u0:u1]
        if mask[r, s] != 0:
            # an unmasked step's output is its new h, written in the gate loop
            if out_mode == OUT_SEQUENCE:
                _cell_row(z[r], hrow, c[r, u0:u1], Hh, act, rec, out[r, s, u0:u1], True)
            elif out_mode == OUT_EPILOGUE:
                _cell_row(z[r], hrow, c[r, u0:u1], Hh, act, rec, seqbuf[r, t, u0:u1],
                          True)
            else:
                _cell_row(z[r], hrow, c[r, u0:u1], Hh, act, rec, hrow, False)
            if seen[r] == 0:
                # both parts write it: only once, so its line is not passed between
                # the cores at every step
                seen[r] = 1
            continue
        for j in range(Hh):
            hn[r, u0 + j] = hc[r, u0 + j]
        if out_mode != OUT_NONE:
            keep = seen[r] != 0 and not zero_output
            if out_mode == OUT_SEQUENCE:
                for j in range(Hh):
                    out[r, s, u0 + j] = hn[r, u0 + j] if keep else 0.0
            else:
                for j in range(Hh):
                    seqbuf[r, t, u0 + j] = hn[r, u0 + j] if keep else 0.0


@njit(**NJIT_OPTS)
def lstm_units_split(part, sync, claim_ticks, x, W, U, b, hbuf, c, seen, mask, Tc,
                     packed, pack, work, seqbuf, out, out_mode, Wd, bd, dense_code, ybuf,
                     zero_output, act, rec):
    """Run all T steps for part ``part`` (0 or 1) of a job.  The caller runs part 0;
    a pool thread runs part 1, posted to it with ``post_job`` (it runs ``serve_*``).

    The units are two slices, [0, H // 2) and [H // 2, H).  Part p owns slice p and
    half of the epilogue's rows.  When the other part does not arrive in time
    (``sync_cpu.claim``), the part that came does both slices, one after the other,
    every step (no barrier), and the late part does nothing.

    sync:    int64 [sync_cpu.SYNC_SIZE], zeros at the start (claim word, two epochs)
    x:       [Bp, T, D] input, processing order, C-contiguous
    W:       [D, 4H] kernel;  U: [H, 4H] recurrent kernel;  b: [4H] bias
    hbuf:    [2, Bp, H] h double buffer, hbuf[0] = initial h; on return the final h is
             hbuf[T % 2]
    c:       [Bp, H] cell state, updated in place (each part its own units)
    seen:    [Bp] uint8, updated in place (row has had an unmasked step)
    mask:    [Bp, T] uint8 (1 = step is computed), processing order
    Tc:      steps per chunk
    packed:  [2 or 3, pack_size(D, H)] float: row q holds slice q's columns of W, U
             and b, packed (``pack_slices``).  With ``pack`` false it is filled already
             (rows 0 and 1) and only read.  With ``pack`` true ([3, ...]) each part packs
             its own slice into its row first, and a part running alone packs the other
             slice into row 2 (the late part may still be writing its own row)
    work:    [3, work_size(Bp, Tc, H)] float, one row per slice in use: its input
             projection [Bp, Tc, 4 Hh] and pre-activations [Bp, 4 Hh]; rows 0 and 1 for
             parts 0 and 1, row 2 for the second slice of a part running alone
    seqbuf:  [Bp, Tc, H] shared chunk of outputs (out_mode OUT_EPILOGUE), else unused
    out:     [Bp, T, H] (OUT_SEQUENCE) or [Bp, T, K] (OUT_EPILOGUE); unused for OUT_NONE
    Wd, bd:  [H, K], [K] Dense epilogue and its activation code (OUT_EPILOGUE)
    ybuf:    [2, Bp * Tc, K] scratch for epilogue rows, row p for part p
    Returns 2 (both parts ran), 1 (this part ran the job alone) or 0 (this part came
    too late and did nothing).
    """
    Bp, T, D = x.shape
    H = U.shape[0]
    # each part packs its slice (when asked) and projects the first chunk before it
    # looks for the other part (which meanwhile may still be starting)
    first = min(Tc, T)
    _prepare(part, part, part, pack, x, W, U, b, packed, work, Tc, first)
    nparts = claim(sync, part, claim_ticks)
    if nparts == 0:
        return 0
    # work (and, when packing, packed) row of each slice: its own part's row when both
    # run; the part running alone keeps its row for its slice and uses row 2 for the
    # other one, because the late part may still be writing its own rows before it
    # finds the job taken (packed weights given ready are only read: their own rows)
    rows = np.empty(2, np.int64)
    prow = np.empty(2, np.int64)
    prow[0] = 0
    prow[1] = 1
    if nparts == 1:
        rows[part] = part
        rows[1 - part] = 2
        if pack:
            prow[1 - part] = 2
        _prepare(1 - part, prow[1 - part], 2, pack, x, W, U, b, packed, work, Tc, first)
        q_lo, q_hi = 0, 2
    else:
        rows[0] = 0
        rows[1] = 1
        q_lo, q_hi = part, part + 1
    # Each step is pipelined across the exchange of h: a part publishes its half of
    # the new h, sums its own units of it into the next step's pre-activations, and
    # only then waits for the other half (every element adds its own units' products,
    # then the others', whether or not the job is split).
    epoch = 0
    for t0 in range(0, T, Tc):
        n = min(Tc, T - t0)
        for q in range(q_lo, q_hi):
            Wp, Up, bp = _packed_views(packed[prow[q]], D, H, q)
            xw, z = _work_views(work[rows[q]], Bp, Tc, H, q)
            if t0 > 0:
                _project(x, t0, n, Wp, bp, xw)
            u0, u1 = _slice_units(q, H)
            _own_product(0, u0, u1, Up, xw, z, hbuf[t0 % 2])
        for t in range(n):
            s = t0 + t
            hc = hbuf[s % 2]
            hn = hbuf[(s + 1) % 2]
            if nparts == 2 and s > 0:
                wait_other(sync, part, epoch)   # the other half of hc is written
            # two parts: one slice each; one part alone: slice 1's step reads only hc,
            # so slice 0 may start its next step before it
            for q in range(q_lo, q_hi):
                Wp, Up, bp = _packed_views(packed[prow[q]], D, H, q)
                xw, z = _work_views(work[rows[q]], Bp, Tc, H, q)
                u0, u1 = _slice_units(q, H)
                _finish_step(s, t, u0, u1, Up, z, hc, hn, c, seen, mask, seqbuf, out,
                             out_mode, zero_output, act, rec)
                if nparts == 2:
                    epoch += 1
                    publish(sync, part, epoch)   # this part's half of hn
                if t + 1 < n:
                    _own_product(t + 1, u0, u1, Up, xw, z, hn)
        if nparts == 2:
            # both halves of the chunk's last h (and of its outputs) are written
            wait_other(sync, part, epoch)
        if out_mode == OUT_EPILOGUE:
            # this part's share of the chunk's rows (r, t) through the Dense
            R = Bp * n
            lo = q_lo * R // 2
            hi = q_hi * R // 2
            K = Wd.shape[1]
            yb = ybuf[q_lo]
            for q in range(hi - lo):
                for k in range(K):
                    yb[q, k] = 0.0
            for r in range(Bp):
                tlo = max(lo - r * n, 0)
                thi = min(hi - r * n, n)
                if tlo < thi:
                    q0 = r * n + tlo - lo
                    gemm_rows_acc(seqbuf[r, tlo:thi], thi - tlo, Wd,
                                  yb[q0:q0 + thi - tlo])
            bias_act_rows(yb[:hi - lo], bd, dense_code)
            for q in range(lo, hi):
                r = q // n
                t = q % n
                for k in range(K):
                    out[r, t0 + t, k] = yb[q - lo, k]
            if nparts == 2:
                epoch += 1
                barrier(sync, part, epoch)
    return nparts


@njit(**NJIT_INLINE_OPTS)
def pack_size(D, H):
    """Floats of one slice's packed W, U and b (sized for the larger slice, H - H // 2
    units)."""
    G = 4 * (H - H // 2)
    return D * G + H * G + G


@njit(**NJIT_INLINE_OPTS)
def work_size(Bp, Tc, H):
    """Floats of one slice's input projection and pre-activations (larger slice)."""
    G = 4 * (H - H // 2)
    return Bp * Tc * G + Bp * G


@njit(**NJIT_INLINE_OPTS)
def _packed_views(buf, D, H, q):
    """Slice q's packed W [D, 4 Hh], U [H, 4 Hh] and b [4 Hh], views of buf."""
    u0, u1 = _slice_units(q, H)
    G = 4 * (u1 - u0)
    Wp = buf[:D * G].reshape((D, G))
    Up = buf[D * G:D * G + H * G].reshape((H, G))
    bp = buf[D * G + H * G:D * G + H * G + G]
    return Wp, Up, bp


@njit(**NJIT_INLINE_OPTS)
def _work_views(buf, Bp, Tc, H, q):
    """Slice q's input projection [Bp, Tc, 4 Hh] and pre-activations [Bp, 4 Hh]."""
    u0, u1 = _slice_units(q, H)
    G = 4 * (u1 - u0)
    xw = buf[:Bp * Tc * G].reshape((Bp, Tc, G))
    z = buf[Bp * Tc * G:Bp * Tc * G + Bp * G].reshape((Bp, G))
    return xw, z


@njit(**NJIT_OPTS)
def pack_slices(W, U, b, packed):
    """Both slices' columns of W [D, 4H], U [H, 4H] and b [4H], packed into rows 0 and
    1 of packed [>= 2, pack_size(D, H)] (what ``lstm_units_split`` reads with ``pack``
    false)."""
    D = W.shape[0]
    H = U.shape[0]
    for q in range(2):
        Wp, Up, bp = _packed_views(packed[q], D, H, q)
        u0, u1 = _slice_units(q, H)
        _pack_slice(W, U, b, u0, u1, Wp, Up, bp)


@njit(**NJIT_INLINE_OPTS)
def _prepare(q, prow, wrow, pack, x, W, U, b, packed, work, Tc, n):
    """Pack slice q's weights into packed[prow] when ``pack``, and project the first
    chunk (n steps) into work[wrow]."""
    Bp, T, D = x.shape
    H = U.shape[0]
    Wp, Up, bp = _packed_views(packed[prow], D, H, q)
    xw, z = _work_views(work[wrow], Bp, Tc, H, q)
    if pack:
        u0, u1 = _slice_units(q, H)
        _pack_slice(W, U, b, u0, u1, Wp, Up, bp)
    _project(x, 0, n, Wp, bp, xw)
