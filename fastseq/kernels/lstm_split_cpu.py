"""Numba CPU kernel: the LSTM recurrence of a small batch on two cores, split by hidden
units, with a spin barrier per step (Keras gate order i, f, c, o).

At batch 1-4 a step's work is the product h U, which reads all of U [H, 4H] (256 KB at
H = 128 in float32): on one core that read from L2 bounds the step.  Here part p of two
threads owns hidden units [u0, u1) = [p H / 2, (p + 1) H / 2): the columns of U, W and b
of those units' four gates, half of U, so each core reads half of it per step.  Every
step each part computes its units' gates from the whole previous h, writes its half of
the new h, and waits at a barrier for the other half (``sync_cpu.barrier``, about
0.05 us here).  h is double-buffered (step s reads h[s % 2] and writes h[(s + 1) % 2]),
so one barrier per step is enough.

Each part computes its own columns of the input projection x W for a chunk of steps, so
no [B, T, 4H] buffer exists.  With a Dense epilogue the chunk's outputs go to a shared
[B, Tc, H] buffer; after a barrier each part applies the Dense (+ activation) to half
of the chunk's rows, then a second barrier protects the buffer until both are done.

The same kernel runs alone (``nparts`` = 1, units [0, H)) when the partner thread did
not start in time (``sync_cpu.claim``).  Masking as in ``lstm_cpu``.
"""
import numpy as np
from numba import carray, njit

from ..config import NJIT_OPTS, NJIT_INLINE_OPTS
from .dense_cpu import bias_act_rows
from .lstm_cpu import _cell_row
from .sync_cpu import (address_to_voidptr, atomic_cas, atomic_load, atomic_store,
                       barrier, claim, cycle_counter, os_sleep_us, wait_at_least)

OUT_NONE, OUT_SEQUENCE, OUT_EPILOGUE = 0, 1, 2


@njit(**NJIT_INLINE_OPTS)
def _gemm_acc(A, Bm, Z):
    """Z += A Bm.

    A:  [M, Kd]
    Bm: [Kd, n], C-contiguous (rows are contiguous, so the j loops vectorise)
    Z:  [M, n]
    Rows four at a time with k unrolled by four, the loops of
    ``lstm_cpu.lstm_chunk_fused`` (which keeps them inline: calling this function from
    there made it 20-30% slower, bench/gemm_rates.py).
    """
    M, n = Z.shape
    Kd = A.shape[1]
    M4 = M - M % 4
    for m in range(0, M4, 4):
        z0r = Z[m]
        z1r = Z[m + 1]
        z2r = Z[m + 2]
        z3r = Z[m + 3]
        k = 0
        while k + 4 <= Kd:
            a_0 = A[m, k]
            a_1 = A[m + 1, k]
            a_2 = A[m + 2, k]
            a_3 = A[m + 3, k]
            e0 = A[m, k + 1]
            e1 = A[m + 1, k + 1]
            e2 = A[m + 2, k + 1]
            e3 = A[m + 3, k + 1]
            f0 = A[m, k + 2]
            f1 = A[m + 1, k + 2]
            f2 = A[m + 2, k + 2]
            f3 = A[m + 3, k + 2]
            g0 = A[m, k + 3]
            g1 = A[m + 1, k + 3]
            g2 = A[m + 2, k + 3]
            g3 = A[m + 3, k + 3]
            b0 = Bm[k]
            b1 = Bm[k + 1]
            b2 = Bm[k + 2]
            b3 = Bm[k + 3]
            for j in range(n):
                p = b0[j]
                q = b1[j]
                v = b2[j]
                w = b3[j]
                z0r[j] += (a_0 * p + e0 * q) + (f0 * v + g0 * w)
                z1r[j] += (a_1 * p + e1 * q) + (f1 * v + g1 * w)
                z2r[j] += (a_2 * p + e2 * q) + (f2 * v + g2 * w)
                z3r[j] += (a_3 * p + e3 * q) + (f3 * v + g3 * w)
            k += 4
        while k < Kd:
            a_0 = A[m, k]
            a_1 = A[m + 1, k]
            a_2 = A[m + 2, k]
            a_3 = A[m + 3, k]
            b0 = Bm[k]
            for j in range(n):
                p = b0[j]
                z0r[j] += a_0 * p
                z1r[j] += a_1 * p
                z2r[j] += a_2 * p
                z3r[j] += a_3 * p
            k += 1
    for m in range(M4, M):
        zr = Z[m]
        k = 0
        while k + 4 <= Kd:
            a_0 = A[m, k]
            a_1 = A[m, k + 1]
            a_2 = A[m, k + 2]
            a_3 = A[m, k + 3]
            b0 = Bm[k]
            b1 = Bm[k + 1]
            b2 = Bm[k + 2]
            b3 = Bm[k + 3]
            for j in range(n):
                zr[j] += (a_0 * b0[j] + a_1 * b1[j]) + (a_2 * b2[j] + a_3 * b3[j])
            k += 4
        while k < Kd:
            a_0 = A[m, k]
            b0 = Bm[k]
            for j in range(n):
                zr[j] += a_0 * b0[j]
            k += 1


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
        _gemm_acc(x[r, t0:t0 + n], Wp, zx[:n])


@njit(**NJIT_INLINE_OPTS)
def _step(s, t, u0, Up, xw, z, hc, hn, c, seen, mask, seqbuf, out, out_mode,
          zero_output, act, rec):
    """Step s (chunk step t) for units [u0, u0 + Hh) of every row: z = xw + h U, the
    gates, the new c and h, and the outputs of those units."""
    Bp, G = z.shape
    Hh = G // 4
    for r in range(Bp):
        for j in range(G):
            z[r, j] = xw[r, t, j]
    _gemm_acc(hc, Up, z)
    for r in range(Bp):
        on = mask[r, s] != 0
        if on:
            _cell_row(z[r], hn[r, u0:u0 + Hh], c[r, u0:u0 + Hh], Hh, act, rec)
            seen[r] = 1
        else:
            for j in range(Hh):
                hn[r, u0 + j] = hc[r, u0 + j]
        if out_mode != OUT_NONE:
            keep = on or (seen[r] != 0 and not zero_output)
            if out_mode == OUT_SEQUENCE:
                for j in range(Hh):
                    out[r, s, u0 + j] = hn[r, u0 + j] if keep else 0.0
            else:
                for j in range(Hh):
                    seqbuf[r, t, u0 + j] = hn[r, u0 + j] if keep else 0.0


@njit(**NJIT_OPTS)
def lstm_units_split(part, sync, claim_ticks, x, W, U, b, hbuf, c, seen, mask, Tc,
                     scratch, seqbuf, out, out_mode, Wd, bd, dense_code, ybuf,
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
    scratch: [3, n_scratch] float, one row per slice in use: its packed W, U, b, its
             input projection [Bp, Tc, 4 Hh] and pre-activations [Bp, 4 Hh]
             (n_scratch = scratch_size(Bp, Tc, D, H)); rows 0 and 1 for parts 0 and 1,
             row 2 for the second slice of a part running alone
    seqbuf:  [Bp, Tc, H] shared chunk of outputs (out_mode OUT_EPILOGUE), else unused
    out:     [Bp, T, H] (OUT_SEQUENCE) or [Bp, T, K] (OUT_EPILOGUE); unused for OUT_NONE
    Wd, bd:  [H, K], [K] Dense epilogue and its activation code (OUT_EPILOGUE)
    ybuf:    [2, Bp * Tc, K] scratch for epilogue rows, row p for part p
    Returns 2 (both parts ran), 1 (this part ran the job alone) or 0 (this part came
    too late and did nothing).
    """
    Bp, T, D = x.shape
    H = U.shape[0]
    # each part packs its slice and projects the first chunk before it looks for the
    # other part (which meanwhile may still be starting)
    first = min(Tc, T)
    _prepare(part, part, x, W, U, b, scratch, Tc, first)
    nparts = claim(sync, part, claim_ticks)
    if nparts == 0:
        return 0
    # scratch row of each slice: its own part's row when both run; the part running
    # alone keeps its row for its slice and uses row 2 for the other one, because the
    # late part may still be writing its own row before it finds the job taken
    rows = np.empty(2, np.int64)
    if nparts == 1:
        rows[part] = part
        rows[1 - part] = 2
        _prepare(1 - part, 2, x, W, U, b, scratch, Tc, first)
        q_lo, q_hi = 0, 2
    else:
        rows[0] = 0
        rows[1] = 1
        q_lo, q_hi = part, part + 1
    epoch = 0
    for t0 in range(0, T, Tc):
        n = min(Tc, T - t0)
        if t0 > 0:
            for q in range(q_lo, q_hi):
                Wp, Up, bp, xw, z = _views(scratch[rows[q]], Bp, Tc, D, H, q)
                _project(x, t0, n, Wp, bp, xw)
        for t in range(n):
            s = t0 + t
            hc = hbuf[s % 2]
            hn = hbuf[(s + 1) % 2]
            for q in range(q_lo, q_hi):
                Wp, Up, bp, xw, z = _views(scratch[rows[q]], Bp, Tc, D, H, q)
                _step(s, t, q * (H // 2), Up, xw, z, hc, hn, c, seen, mask, seqbuf,
                      out, out_mode, zero_output, act, rec)
            if nparts == 2:
                epoch += 1
                barrier(sync, part, epoch)
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
                    _gemm_acc(seqbuf[r, tlo:thi], Wd, yb[q0:q0 + thi - tlo])
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


# --- the pool thread's side: part 1 of jobs posted in a mailbox ------------------------
# A job is posted by address in an int64 mailbox [MB_SIZE], so the pool thread can take
# it without returning to Python (no GIL, no wake-up: it spins for a while after each
# job).  Slots (each on its own cache line where two threads write):
MB_JOB = 0          # sequence number of the last posted job
MB_TAKEN = 8        # last job taken by the pool thread, or cancelled by the poster
MB_DONE = 16        # last job the pool thread finished
MB_STATE = 24       # worker: 1 spinning (takes a job at once), 2 dozing, 0 stopped
MB_IDLE = 25        # cycle-counter ticks without a job after which the worker dozes
                    # (read while it spins, so it can be shortened at any time)
MB_POKE = 26        # set by a caller that found the worker dozing: spin again
MB_QUIT = 27        # set to make ``serve`` return
MB_ARGS = 32        # 15 arrays as (address, shape0, shape1, shape2), then 7 scalars
MB_SIZE = MB_ARGS + 15 * 4 + 8


@njit(**NJIT_INLINE_OPTS)
def _put(mb, k, a):
    o = MB_ARGS + 4 * k
    mb[o] = a.ctypes.data
    for d in range(a.ndim):
        mb[o + 1 + d] = a.shape[d]


@njit(**NJIT_OPTS)
def post_job(mb, seq, sync, claim_ticks, x, W, U, b, hbuf, c, seen, mask, Tc, scratch,
             seqbuf, out, out_mode, Wd, bd, dense_code, ybuf, zero_output, act, rec):
    """Post part 1 of a job (the arguments of ``lstm_units_split``) as job ``seq``.
    The arrays must stay alive until ``finish_job(mb, seq)`` returns."""
    _put(mb, 0, sync)
    _put(mb, 1, x)
    _put(mb, 2, W)
    _put(mb, 3, U)
    _put(mb, 4, b)
    _put(mb, 5, hbuf)
    _put(mb, 6, c)
    _put(mb, 7, seen)
    _put(mb, 8, mask)
    _put(mb, 9, scratch)
    _put(mb, 10, seqbuf)
    _put(mb, 11, out)
    _put(mb, 12, Wd)
    _put(mb, 13, bd)
    _put(mb, 14, ybuf)
    o = MB_ARGS + 60
    mb[o] = claim_ticks
    mb[o + 1] = Tc
    mb[o + 2] = out_mode
    mb[o + 3] = dense_code
    mb[o + 4] = 1 if zero_output else 0
    mb[o + 5] = act
    mb[o + 6] = rec
    atomic_store(mb, MB_JOB, seq)      # release: the arguments are visible first


@njit(**NJIT_INLINE_OPTS)
def _arr1(mb, k, dt):
    o = MB_ARGS + 4 * k
    return carray(address_to_voidptr(mb[o]), (mb[o + 1],), dt)


@njit(**NJIT_INLINE_OPTS)
def _arr2(mb, k, dt):
    o = MB_ARGS + 4 * k
    return carray(address_to_voidptr(mb[o]), (mb[o + 1], mb[o + 2]), dt)


@njit(**NJIT_INLINE_OPTS)
def _arr3(mb, k, dt):
    o = MB_ARGS + 4 * k
    return carray(address_to_voidptr(mb[o]), (mb[o + 1], mb[o + 2], mb[o + 3]), dt)


@njit(**NJIT_INLINE_OPTS)
def _run_posted(mb, dt):
    o = MB_ARGS + 60
    return lstm_units_split(
        np.int64(1), _arr1(mb, 0, np.int64), mb[o], _arr3(mb, 1, dt), _arr2(mb, 2, dt),
        _arr2(mb, 3, dt), _arr1(mb, 4, dt), _arr3(mb, 5, dt), _arr2(mb, 6, dt),
        _arr1(mb, 7, np.uint8), _arr2(mb, 8, np.uint8), mb[o + 1], _arr2(mb, 9, dt),
        _arr3(mb, 10, dt), _arr3(mb, 11, dt), mb[o + 2], _arr2(mb, 12, dt),
        _arr1(mb, 13, dt), mb[o + 3], _arr3(mb, 14, dt), mb[o + 4] != 0, mb[o + 5],
        mb[o + 6])


@njit(**NJIT_INLINE_OPTS)
def _serve(mb, max_polls, dt):
    """Serve jobs until mb[MB_QUIT] is set.  State 1 (spinning): poll without pause;
    after mb[MB_IDLE] ticks with no job (or ``max_polls`` polls without a counter),
    state 2 (dozing): poll between sleeps that grow from 50 us to 1 ms (10 ms after
    about a second), until a job or a poke (mb[MB_POKE], set by a caller that found
    the worker dozing) comes."""
    polls = 0
    t0 = cycle_counter()
    nap = 0
    naps = 0
    atomic_store(mb, MB_STATE, 1)
    while atomic_load(mb, MB_QUIT) == 0:
        job = atomic_load(mb, MB_JOB)
        taken = atomic_load(mb, MB_TAKEN)
        if job != taken:
            if atomic_cas(mb, MB_TAKEN, taken, job):
                _run_posted(mb, dt)
                atomic_store(mb, MB_DONE, job)
            nap = 0
        elif nap > 0:
            os_sleep_us(nap)
            naps += 1
            if atomic_load(mb, MB_POKE) != 0:
                atomic_store(mb, MB_POKE, 0)
                nap = 0
            else:
                # naps of up to 1 ms for the first second or so, then up to 10 ms
                nap = min(2 * nap, 1_000 if naps < 1_000 else 10_000)
                continue
        else:
            polls += 1
            if (polls & 1023) == 0 and (
                    (t0 != 0 and cycle_counter() - t0 >= atomic_load(mb, MB_IDLE))
                    or (t0 == 0 and polls >= max_polls)):
                nap = 50
                naps = 0
                atomic_store(mb, MB_STATE, 2)
            continue
        # a job or a poke: spin again
        polls = 0
        t0 = cycle_counter()
        atomic_store(mb, MB_STATE, 1)
    atomic_store(mb, MB_STATE, 0)
    return 0


@njit(**NJIT_OPTS)
def serve_float32(mb, max_polls):
    """The worker thread's loop for float32 jobs (see ``_serve``); it never needs the
    GIL, so a caller never waits for it; returns only when mb[MB_QUIT] is set."""
    return _serve(mb, max_polls, np.float32)


@njit(**NJIT_OPTS)
def serve_float64(mb, max_polls):
    """``serve_float32`` for float64 jobs."""
    return _serve(mb, max_polls, np.float64)


@njit(**NJIT_OPTS)
def finish_job(mb, seq):
    """After part 0 of job ``seq`` returned: cancel the job if the worker has not taken
    it (part 0 then ran it alone).  Returns True when the worker has taken it: its
    part 1 then has finished writing the outputs (the two parts passed a last barrier
    together, or part 1 found the job taken and writes only its scratch row), but it
    may still be running, so the job's arrays must be kept alive until mb[MB_DONE]
    reaches ``seq``."""
    if atomic_cas(mb, MB_TAKEN, seq - 1, seq):
        # cancelled: nobody will run it, so it counts as done (jobs are posted only
        # when the worker has finished the previous one, so nothing else writes DONE)
        atomic_store(mb, MB_DONE, seq)
        return False
    return True


@njit(**NJIT_INLINE_OPTS)
def scratch_size(Bp, Tc, D, H):
    """Floats of one slice's scratch (sized for the larger slice, H - H // 2 units)."""
    G = 4 * (H - H // 2)
    return D * G + H * G + G + Bp * Tc * G + Bp * G


@njit(**NJIT_INLINE_OPTS)
def _views(buf, Bp, Tc, D, H, q):
    """Slice q's packed W, U, b, input projection and pre-activations, views of buf."""
    Hh = H - H // 2 if q == 1 else H // 2
    G = 4 * Hh
    o = 0
    Wp = buf[o:o + D * G].reshape((D, G))
    o += D * G
    Up = buf[o:o + H * G].reshape((H, G))
    o += H * G
    bp = buf[o:o + G]
    o += G
    xw = buf[o:o + Bp * Tc * G].reshape((Bp, Tc, G))
    o += Bp * Tc * G
    z = buf[o:o + Bp * G].reshape((Bp, G))
    return Wp, Up, bp, xw, z


@njit(**NJIT_INLINE_OPTS)
def _prepare(q, row, x, W, U, b, scratch, Tc, n):
    """Pack slice q's weights into scratch[row] and project the first chunk (n steps)."""
    Bp, T, D = x.shape
    H = U.shape[0]
    Wp, Up, bp, xw, z = _views(scratch[row], Bp, Tc, D, H, q)
    u0 = q * (H // 2)
    u1 = H if q == 1 else H // 2
    _pack_slice(W, U, b, u0, u1, Wp, Up, bp)
    _project(x, 0, n, Wp, bp, xw)
