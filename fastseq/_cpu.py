"""CPU backend: drives the Numba kernels over blocks of rows and chunks of time steps.

Inputs arrive validated: contiguous NumPy arrays of one float dtype.  The batch is split
into one contiguous block of rows per thread (``_threads``); each thread runs its rows
through every time step on its own, a chunk of steps at a time: the fused Numba kernel
computes each step's input projection and recurrent product itself (register tiles,
x read in place), or, for very large blocks, the chunk's projection is one BLAS GEMM and
each step a BLAS GEMM ``h U`` plus a Numba pointwise kernel; then optionally a Dense
epilogue on the chunk while it is in cache.  No [B, T, 4H] buffer is ever held: at
most [rows, Tc, 4H] (the GEMM path).
"""
import time

import numpy as np

from . import config
from . import _threads
from ._threads import split, run_blocks
from .kernels import (lstm_cpu, lstm_split_cpu, lstm_table_cpu, dense_cpu, sync_cpu,
                      tile_cpu, worker_cpu)
from .kernels.activations import ACTIVATION_CODES

_DENSE_CODES = dict(ACTIVATION_CODES)
_DENSE_CODES["softmax"] = dense_cpu.DENSE_SOFTMAX
_DENSE_CODES["log_softmax"] = dense_cpu.DENSE_LOG_SOFTMAX


def chunk_steps(rows, G, itemsize, T):
    """Steps per chunk so a block's [rows, Tc, G] projection holds about CHUNK_BYTES,
    and the chunk's projection GEMM has at least CHUNK_MIN_ROWS rows."""
    steps = max(config.CHUNK_BYTES // max(1, rows * G * itemsize),
                -(-config.CHUNK_MIN_ROWS // max(1, rows)))
    return int(max(1, min(T, steps)))


def lstm_forward(x, W, U, b, h0, c0, mask, *, go_backwards, return_sequences,
                 zero_output_for_mask, act, rec, epilogue=None, table=None,
                 split_pack=None):
    """x [B, T, D], W [D, 4H], U [H, 4H], b [4H], h0/c0 [B, H] or None, mask [B, T]
    bool or None.  Returns (output, h, c): output is [B, T, H] (processing order) with
    return_sequences, else the last output [B, H].

    epilogue: optional (Wd [H, K], bd [K], activation name): with return_sequences the
    Dense is applied to each chunk of outputs as it is produced and the output is
    [B, T, K]; the [B, T, H] sequence is never stored.

    table: optional [V, 4H] = embeddings @ W for an LSTM fed by an Embedding; then ``x``
    is the token ids [B, T] and the input projection of a step is a row lookup (exact:
    (E W)[id] = E[id] W), and W is not used.

    split_pack: optional callable returning W, U and b packed for the two-thread split
    (``split_pack_of``), for a caller that keeps them from call to call; without it a
    split call packs them itself.
    """
    B, T = x.shape[:2]
    D = 0 if table is not None else x.shape[2]
    H = U.shape[0]
    G = 4 * H
    dt = U.dtype
    h = np.zeros((B, H), dt) if h0 is None else h0.copy()
    c = np.zeros((B, H), dt) if c0 is None else c0.copy()
    if epilogue is not None and not return_sequences:
        raise ValueError("epilogue needs return_sequences")
    width = H if epilogue is None else epilogue[0].shape[1]
    if B == 0:
        out = np.zeros((0, T, width) if return_sequences else (0, H), dt)
        return out, h, c
    seen = np.zeros(B, np.uint8)
    if mask is None:
        m8 = None       # every step computed; the rows' threads use a chunk of ones
    else:
        m8 = mask.view(np.uint8)
        if go_backwards:
            m8 = np.ascontiguousarray(m8[:, ::-1])
    xs = x[:, ::-1] if go_backwards else x
    out = np.empty((B, T, width), dt) if return_sequences else None
    ep = None
    if epilogue is not None:
        Wd, bd, name = epilogue
        ep = (Wd, bd, _DENSE_CODES[name])

    K = 0 if ep is None else ep[0].shape[1]
    if _use_unit_split(B, T, D, H, table, go_backwards):
        _lstm_unit_split(x, W, U, b, h, c, seen, m8, out, ep, zero_output_for_mask,
                         act, rec, None if split_pack is None else split_pack())
        return _finish(out, h, c, seen, m8, T, return_sequences, zero_output_for_mask)
    blocks = split(B, macs_per_row=T * (D * G + H * G + H * K))
    Ub = block_columns(U)
    # the fused kernel's own projection reads x in place, in input time order
    xin = None if table is not None else (
        np.ascontiguousarray(x.reshape(B, T * D), dtype=dt), block_columns(W),
        bool(go_backwards))

    def run(lo, hi):
        _lstm_rows(xs, W, U, Ub, b, h, c, seen, m8, out, lo, hi, zero_output_for_mask,
                   act, rec, ep, table, xin)

    run_blocks(run, blocks)
    return _finish(out, h, c, seen, m8, T, return_sequences, zero_output_for_mask)


_ones_cache = [np.ones(0, np.uint8)]


def _ones(n):
    """n uint8 ones (a mask with every step computed): a view of a shared buffer that
    only grows, cheaper than a new array at batch 1; the kernels only read it."""
    buf = _ones_cache[0]
    if buf.size < n:
        buf = _ones_cache[0] = np.ones(n, np.uint8)
    return buf[:n]


def _finish(out, h, c, seen, m8, T, return_sequences, zero_output_for_mask):
    if return_sequences:
        return out, h, c
    # the last output as Keras defines it: the output of the final step
    if m8 is None:
        return h.copy(), h, c
    keep = (m8[:, T - 1] != 0) | ((seen != 0) & (not zero_output_for_mask))
    last = np.where(keep[:, None], h, np.zeros_like(h))
    return last, h, c


def _use_unit_split(B, T, D, H, table, go_backwards):
    """Whether a call runs on two threads split by hidden units (small batches): two
    threads allowed, at most config.SPLIT_UNITS_MAX_ROWS rows, a step's product h U big
    enough to be worth a barrier, and enough work in all to pay the hand-off."""
    if table is not None or go_backwards or H < 2 or B > config.SPLIT_UNITS_MAX_ROWS:
        return False
    if _threads.get_num_threads() < 2:
        return False
    step = B * H * 4 * H
    return (step >= config.SPLIT_UNITS_MIN_STEP_MACS
            and _split_macs(B, T, D, H) >= 2 * config.MIN_MACS_PER_THREAD)


def _split_macs(B, T, D, H):
    """Multiply-adds of an LSTM call's input projection and recurrence."""
    return T * B * (D + H) * 4 * H


# part 0 of a split job (a module attribute, so tests can count the calls without
# touching the kernel module that the worker thread's loop compiles against)
_run_part = lstm_split_cpu.lstm_units_split


def split_pack_of(W, U, b):
    """W [D, 4H], U [H, 4H] and b [4H] packed for the two-thread split: [2, n], row q
    the columns of slice q's units (kernels/lstm_split_cpu.pack_slices)."""
    packed = np.empty((2, lstm_split_cpu.pack_size(W.shape[0], U.shape[0])), U.dtype)
    lstm_split_cpu.pack_slices(W, U, b, packed)
    return packed


def _lstm_unit_split(x, W, U, b, h, c, seen, m8, out, ep, zero_output, act, rec,
                     packed=None):
    """The whole sequence on two threads, each owning half of the hidden units
    (kernels/lstm_split_cpu.py); h, c, seen and out are updated in place.  packed:
    W, U and b as ``split_pack_of`` gives them, or None (each part packs its own)."""
    B, T, D = x.shape
    H = U.shape[0]
    dt = U.dtype
    Tc = chunk_steps(B, 4 * H, dt.itemsize, T)
    mask = _ones(B * T).reshape(B, T) if m8 is None else m8
    hbuf = np.empty((2, B, H), dt)
    hbuf[0] = h
    if ep is not None:
        Wd, bd, code = ep
        mode = lstm_split_cpu.OUT_EPILOGUE
        seqbuf = np.empty((B, Tc, H), dt)
        ybuf = np.empty((2, B * Tc, Wd.shape[1]), dt)
    else:
        Wd, bd, code = np.zeros((1, 1), dt), np.zeros(1, dt), 0
        mode = lstm_split_cpu.OUT_NONE if out is None else lstm_split_cpu.OUT_SEQUENCE
        seqbuf = np.empty((1, 1, 1), dt)
        ybuf = np.empty((2, 1, 1), dt)
    o = out if out is not None else np.empty((1, 1, 1), dt)
    pack = packed is None
    if pack:
        packed = np.empty((3, lstm_split_cpu.pack_size(D, H)), dt)
    work = np.empty((3, lstm_split_cpu.work_size(B, Tc, H)), dt)
    sync = np.zeros(sync_cpu.SYNC_SIZE, np.int64)

    args = (x, W, U, b, hbuf, c, seen, mask, Tc, packed, pack, work, seqbuf, o, mode, Wd,
            bd, code, ybuf, zero_output, act, rec)
    kw = worker_cpu
    worker = _threads.worker(dt, start=False)
    if worker is None:
        # first call of this dtype: run alone, then start the worker (it compiles its
        # loop in the background the first time)
        _run_part(0, sync, 0, *args)
        _threads.worker(dt)
    elif not worker.lock.acquire(blocking=False):
        # another thread's job is using the worker: run this one alone
        _run_part(0, sync, 0, *args)
    else:
        try:
            worker.release_done()
            ready = worker.spinning() and not worker.busy()
            if not ready:
                # the worker dozes (or is still busy): wake it for the calls to come;
                # a long job waits a little for it (a job that ran alone for longer
                # than the worker's spin time would find it dozing at every call)
                worker.wake()
                ready = (_split_macs(B, T, D, H) >= config.SPLIT_WAKE_WAIT_MACS
                         and _await_worker(worker, config.SPLIT_WAKE_WAIT_S))
            if ready:
                worker.seq += 1
                seq = worker.seq
                # kept alive until the worker is done with the job, whatever happens
                # here (held before the job exists, so no interrupt can come between)
                worker.hold(seq, (sync,) + args)
                ran = -1
                try:
                    kw.post_split_job(worker.mb, seq, sync, config.SPLIT_CLAIM_TICKS,
                                      *args)
                    ran = _run_part(0, sync, config.SPLIT_CLAIM_TICKS, *args)
                finally:
                    # cancel the job if the worker has not taken it; if it has, wait
                    # for it unless both parts ran or this one ran alone (then the
                    # outputs are written and the worker is only returning from its
                    # part): when this part came too late (0) the worker runs the job
                    # alone, and on an exception (-1) its outputs must not be freed
                    kw.settle_job(worker.mb, seq, ran not in (1, 2))
                    worker.release_done()
            else:
                _run_part(0, sync, 0, *args)
        finally:
            worker.lock.release()
    h[...] = hbuf[T % 2]


def _await_worker(worker, timeout):
    """Wait up to ``timeout`` seconds for a woken worker to spin (and be free); True if
    it does.  The GIL is let go at each poll."""
    deadline = time.perf_counter() + timeout
    while True:
        if worker.spinning() and not worker.busy():
            return True
        if time.perf_counter() >= deadline:
            return False
        time.sleep(0)


def table_dense_pair(ids, m8, parts, bd, activation):
    """A Bidirectional LSTM fed by an Embedding and followed by a Dense, on the CPU:
    each direction in one ``lstm_table_cpu.lstm_table_dense`` call (all chunks, its
    half of the Dense), the second on the worker thread when two threads are allowed
    (``kernels/worker_cpu``: handed over without the GIL or a thread wake-up), then
    activation(y_f + y_b + bd).

    ids: [B, T] int64 token ids; m8: [B, T] uint8 mask or None
    parts: for each direction (table [V, 4H], Ub = block_columns(U), b [4H], WdX (its
    rows of the Dense kernel, dense_pack), reverse, flip_out, zero_output, act, rec,
    u_finite (U has no inf or NaN)) (see ``lstm_table_dense``); bd: [K] the Dense bias.
    Returns y [B, T, K].

    The state starts at zero, so with a finite U each row's first unmasked step skips
    its h U (``skip_fresh``).
    """
    B, T = ids.shape
    dt = parts[0][0].dtype
    K = bd.shape[0]
    mask = _ones(B * T).reshape(B, T) if m8 is None else m8
    jobs = []
    macs = 0
    for table, Ub, b, WdX, reverse, flip_out, zero_output, act, rec, u_finite in parts:
        H = Ub.shape[1]
        G = 4 * H
        Tc = chunk_steps(B, G, dt.itemsize, T)
        jobs.append((table, ids, mask, Ub, b, WdX, np.zeros((B, H), dt),
                     np.zeros((B, H), dt), np.zeros(B, np.uint8), reverse, flip_out,
                     zero_output, act, rec, u_finite, np.empty(B * Tc, np.int64),
                     np.empty(B * Tc, np.uint8),
                     np.empty((B, G), dt), np.empty(B * Tc * H, dt),
                     np.empty(B * Tc * K, dt), np.empty((B, T, K), dt)))
        macs = max(macs, B * T * (H * G + H * K))
    if _threads.get_num_threads() < 2 or macs < config.MIN_MACS_PER_THREAD:
        for job in jobs:
            lstm_table_cpu.lstm_table_dense(*job)
    else:
        _run_table_jobs(jobs, dt)
    y = jobs[0][-1]
    y += jobs[1][-1]
    bias_act(y.reshape(B * T, K), bd, activation)
    return y


def _run_table_jobs(jobs, dt):
    """jobs[0] on this thread, jobs[1] on the worker (this thread runs it when the
    worker has not taken it by then, or is someone else's now)."""
    kt = lstm_table_cpu.lstm_table_dense
    kw = worker_cpu
    worker = _threads.worker(dt, start=False)
    locked = worker is not None and worker.lock.acquire(blocking=False)
    try:
        if locked:
            worker.release_done()
        if not locked or worker.busy():
            # the first call of this dtype (start the worker for the calls to come; it
            # compiles its loop in the background the first time), another thread's
            # job has the worker, or it is still returning from an earlier job
            for job in jobs:
                kt(*job)
            if worker is None:
                _threads.worker(dt)
            return
        if not worker.spinning():
            worker.wake()
        worker.seq += 1
        seq = worker.seq
        worker.hold(seq, jobs[1])       # alive until the worker is done with it
        taken = False
        try:
            kw.post_table_job(worker.mb, seq, *jobs[1])
            kt(*jobs[0])
        finally:
            # cancel the job, or wait until the worker has run it (one Numba call)
            taken = kw.settle_job(worker.mb, seq, True)
            worker.release_done()
        if not taken:
            kt(*jobs[1])
    finally:
        if locked:
            worker.lock.release()


def block_columns(U):
    """U [H, 4H] as [nb, H, JB]: blocks of JB = config.FUSED_BLOCK_COLUMNS columns, each
    contiguous, for the fused kernel (one block, a view, when 4H <= JB, when 4H <=
    config.FUSED_ONE_BLOCK_COLUMNS, or when JB does not divide 4H)."""
    H, G = U.shape
    JB = int(config.FUSED_BLOCK_COLUMNS)
    if G <= max(JB, int(config.FUSED_ONE_BLOCK_COLUMNS)) or G % JB:
        return U.reshape(1, H, G)
    return np.ascontiguousarray(U.reshape(H, G // JB, JB).transpose(1, 0, 2))


def dense_pack(Wd):
    """Wd [H, K] for lstm_table_cpu's Dense epilogue: [H * K + L * H], Wd flattened and
    then its last L = K % V columns transposed (V: the vector width of
    tile_cpu.VECTOR_BYTES), so those columns are contiguous for their dot products."""
    V = tile_cpu.VECTOR_BYTES // Wd.dtype.itemsize
    H, K = Wd.shape
    L = K % V
    return np.ascontiguousarray(np.concatenate([Wd.ravel(), Wd[:, K - L:].T.ravel()]))


def _lstm_rows(xs, W, U, Ub, b, h, c, seen, m8, out, lo, hi, zero_output, act, rec,
               ep, table=None, xin=None):
    """All time steps for rows lo:hi (runs on one thread).

    xin: None, or (x2 [B, T * D] the input in input time order, Wb = block_columns(W),
    reverse): then the fused path computes each step's projection in the kernel
    (lstm_cpu.lstm_chunk_xfused) instead of one GEMM per chunk."""
    T = xs.shape[1]
    D = 0 if table is not None else xs.shape[2]
    H = U.shape[0]
    G = 4 * H
    dt = U.dtype
    rows = hi - lo
    hb, cb, sb = h[lo:hi], c[lo:hi], seen[lo:hi]
    Tc = chunk_steps(rows, G, dt.itemsize, T)
    use_gemm = rows * H * G >= config.GEMM_MIN_STEP_MACS
    in_kernel = (xin is not None and table is None and not use_gemm
                 and rows >= config.XPROJ_MIN_ROWS)
    write = out is not None
    zu = np.empty((rows, G), dt)      # pre-activations of a step (both paths)
    # flat buffers sized for a full chunk; a shorter last chunk uses their heads, which
    # are contiguous too (nothing is reallocated)
    if in_kernel:
        xin_buf = xw_buf = None
    else:
        xin_buf = np.empty(rows * Tc * D, dt)     # contiguous copy of the chunk's inputs
        xw_buf = np.empty(rows * Tc * G, dt)      # its projection x W
    if ep is not None:
        K = ep[0].shape[1]
        hseq_buf = np.empty(rows * Tc * H, dt)  # chunk outputs fed to the epilogue
        y_buf = np.empty(rows * Tc * K, dt)
    dummy = np.empty((1, 1, 1), dt)
    ones = _ones(rows * Tc) if m8 is None else None
    own = {}

    def own_rows(n):
        """idx of a chunk of n steps in its own projection buffer: r * n + s."""
        if n not in own:
            own[n] = np.arange(rows * n, dtype=np.int64).reshape(rows, n)
        return own[n]
    for s0 in range(0, T, Tc):
        n = min(Tc, T - s0)
        if ep is not None:
            hseq = hseq_buf[:rows * n * H].reshape(rows, n, H)
            ybuf = y_buf[:rows * n * K].reshape(rows * n, K)
        if in_kernel:
            pass        # the kernel projects each step itself
        elif table is None:
            xc = xin_buf[:rows * n * D].reshape(rows, n, D)
            xw = xw_buf[:rows * n * G].reshape(rows, n, G)
            xc[...] = xs[lo:hi, s0:s0 + n]
            np.matmul(xc.reshape(rows * n, D), W, out=xw.reshape(rows * n, G))
            src, idx = xw.reshape(rows * n, G), own_rows(n)
        elif use_gemm:
            xw = xw_buf[:rows * n * G].reshape(rows, n, G)
            np.take(table, xs[lo:hi, s0:s0 + n], axis=0, out=xw)
        else:
            # the fused kernel reads the table rows in place
            src, idx = table, np.ascontiguousarray(xs[lo:hi, s0:s0 + n], dtype=np.int64)
        mc = ones[:rows * n].reshape(rows, n) if m8 is None else m8[lo:hi, s0:s0 + n]
        if not mc.flags.c_contiguous:
            mc = np.ascontiguousarray(mc)
        if ep is not None:
            oc = hseq
        elif write:
            oc = out[lo:hi, s0:s0 + n]
        else:
            oc = dummy
        if use_gemm:
            for s in range(n):
                np.matmul(hb, U, out=zu)
                lstm_cpu.lstm_step_pointwise(zu, xw, s, b, hb, cb, sb, mc, oc, write,
                                             zero_output, act, rec)
        elif in_kernel:
            x2, Wb, reverse = xin
            lstm_cpu.lstm_chunk_xfused(x2[lo:hi], D, s0, T, reverse, Wb, Ub, b, hb, cb,
                                       sb, mc, zu, oc, write, zero_output, act, rec)
        else:
            lstm_cpu.lstm_chunk_fused(src, idx, Ub, b, hb, cb, sb, mc, zu, oc, write,
                                      zero_output, act, rec, False)
        if ep is not None:
            np.matmul(hseq.reshape(rows * n, H), ep[0], out=ybuf)
            dense_cpu.bias_act_rows(ybuf, ep[1], ep[2])
            out[lo:hi, s0:s0 + n] = ybuf.reshape(rows, n, -1)


def bias_act(y2, b, activation):
    """y2 [N, K] <- activation(y2 + b) in place (activation: a Dense activation name)."""
    if y2.shape[0]:
        dense_cpu.bias_act_rows(y2, b, _DENSE_CODES[activation])


def dense_forward(x2, W, b, activation):
    """x2 [N, D] @ W [D, K] + b [K], activation fused per chunk of rows.  Returns [N, K]."""
    N = x2.shape[0]
    K = W.shape[1]
    code = _DENSE_CODES[activation]
    y = np.empty((N, K), x2.dtype)
    if N == 0:
        return y
    step = max(1, int(config.DENSE_CHUNK_ROWS))

    def run(lo, hi):
        for r0 in range(lo, hi, step):
            r1 = min(hi, r0 + step)
            yc = y[r0:r1]
            np.matmul(x2[r0:r1], W, out=yc)
            dense_cpu.bias_act_rows(yc, b, code)

    run_blocks(run, split(N, macs_per_row=x2.shape[1] * K))
    return y
