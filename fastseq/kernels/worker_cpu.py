"""Numba CPU side of the fastseq worker thread (``_threads.Worker``): a mailbox through
which a caller hands a job to a thread that stays in Numba code, never takes the GIL,
and spins for a while after each job, so a job posted in quick succession starts within
a microsecond (a Python thread pool needs a futex wake-up, tens to hundreds of
microseconds on this VM, per hand-off).

A job is posted by address in an int64 mailbox [MB_SIZE]: up to 16 arrays as
(address, shape0, shape1, shape2) and 8 scalars, then its sequence number (release
store).  Two kinds:

- KIND_SPLIT: part 1 of ``lstm_split_cpu.lstm_units_split`` (the caller runs part 0;
  the parts meet at barriers).
- KIND_TABLE: one direction of ``lstm_table_cpu.lstm_table_dense`` (the caller runs
  the other direction, then cancels the job if the worker has not taken it, and runs
  it itself, or waits until the worker reports it done: ``settle_job``).
"""
import numpy as np
from numba import carray, njit

from ..config import NJIT_OPTS, NJIT_INLINE_OPTS
from .lstm_split_cpu import lstm_units_split
from .lstm_table_cpu import lstm_table_dense
from .sync_cpu import (address_to_voidptr, atomic_cas, atomic_load, atomic_store,
                       cycle_counter, futex_wait_us, futex_wake, wait_at_least)

# Slots (each on its own cache line where two threads write):
MB_JOB = 0          # sequence number of the last posted job
MB_TAKEN = 8        # last job taken by the worker, or cancelled by the poster
MB_DONE = 16        # last job the worker finished
MB_STATE = 24       # worker: 1 spinning (takes a job at once), 2 dozing, 0 stopped
MB_IDLE = 25        # cycle-counter ticks without a job after which the worker dozes
                    # (read while it spins, so it can be shortened at any time)
MB_POKE = 26        # set by a caller that found the worker dozing: spin again
MB_QUIT = 27        # set to make ``serve`` return
MB_KIND = 28        # the posted job's kind
MB_ARGS = 32        # 16 arrays as (address, shape0, shape1, shape2), then 8 scalars
MB_SCALARS = MB_ARGS + 16 * 4
MB_SIZE = MB_SCALARS + 8

KIND_SPLIT = 1
KIND_TABLE = 2


@njit(**NJIT_INLINE_OPTS)
def _put(mb, k, a):
    o = MB_ARGS + 4 * k
    mb[o] = a.ctypes.data
    for d in range(a.ndim):
        mb[o + 1 + d] = a.shape[d]


@njit(**NJIT_OPTS)
def post_split_job(mb, seq, sync, claim_ticks, x, W, U, b, hbuf, c, seen, mask, Tc,
                   packed, pack, work, seqbuf, out, out_mode, Wd, bd, dense_code, ybuf,
                   zero_output, act, rec):
    """Post part 1 of a ``lstm_units_split`` job (its arguments) as job ``seq``.
    The arrays must stay alive until mb[MB_DONE] reaches ``seq`` (``settle_job``)."""
    _put(mb, 0, sync)
    _put(mb, 1, x)
    _put(mb, 2, W)
    _put(mb, 3, U)
    _put(mb, 4, b)
    _put(mb, 5, hbuf)
    _put(mb, 6, c)
    _put(mb, 7, seen)
    _put(mb, 8, mask)
    _put(mb, 9, work)
    _put(mb, 10, seqbuf)
    _put(mb, 11, out)
    _put(mb, 12, Wd)
    _put(mb, 13, bd)
    _put(mb, 14, ybuf)
    _put(mb, 15, packed)
    o = MB_SCALARS
    mb[o] = claim_ticks
    mb[o + 1] = Tc
    mb[o + 2] = out_mode
    mb[o + 3] = dense_code
    mb[o + 4] = 1 if zero_output else 0
    mb[o + 5] = act
    mb[o + 6] = rec
    mb[o + 7] = 1 if pack else 0
    mb[MB_KIND] = KIND_SPLIT
    atomic_store(mb, MB_JOB, seq)      # release: the arguments are visible first


@njit(**NJIT_OPTS)
def post_table_job(mb, seq, table, ids, mask, Ub, b, WdX, h, c, seen, reverse, flip_out,
                   zero_output, act, rec, skip_fresh, idx_buf, mask_buf, z, hseq_buf,
                   ybuf, out):
    """Post a ``lstm_table_dense`` call (its arguments) as job ``seq``; the arrays must
    stay alive as for ``post_split_job``."""
    _put(mb, 0, table)
    _put(mb, 1, ids)
    _put(mb, 2, mask)
    _put(mb, 3, Ub)
    _put(mb, 4, b)
    _put(mb, 5, WdX)
    _put(mb, 6, h)
    _put(mb, 7, c)
    _put(mb, 8, seen)
    _put(mb, 9, idx_buf)
    _put(mb, 10, mask_buf)
    _put(mb, 11, z)
    _put(mb, 12, hseq_buf)
    _put(mb, 13, out)
    _put(mb, 14, ybuf)
    o = MB_SCALARS
    mb[o] = 1 if reverse else 0
    mb[o + 1] = 1 if flip_out else 0
    mb[o + 2] = 1 if zero_output else 0
    mb[o + 3] = act
    mb[o + 4] = rec
    mb[o + 5] = 1 if skip_fresh else 0
    mb[MB_KIND] = KIND_TABLE
    atomic_store(mb, MB_JOB, seq)


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
    o = MB_SCALARS
    if mb[MB_KIND] == KIND_SPLIT:
        lstm_units_split(
            np.int64(1), _arr1(mb, 0, np.int64), mb[o], _arr3(mb, 1, dt),
            _arr2(mb, 2, dt), _arr2(mb, 3, dt), _arr1(mb, 4, dt), _arr3(mb, 5, dt),
            _arr2(mb, 6, dt), _arr1(mb, 7, np.uint8), _arr2(mb, 8, np.uint8), mb[o + 1],
            _arr2(mb, 15, dt), mb[o + 7] != 0, _arr2(mb, 9, dt), _arr3(mb, 10, dt),
            _arr3(mb, 11, dt), mb[o + 2],
            _arr2(mb, 12, dt), _arr1(mb, 13, dt), mb[o + 3], _arr3(mb, 14, dt),
            mb[o + 4] != 0, mb[o + 5], mb[o + 6])
    elif mb[MB_KIND] == KIND_TABLE:
        lstm_table_dense(
            _arr2(mb, 0, dt), _arr2(mb, 1, np.int64), _arr2(mb, 2, np.uint8),
            _arr3(mb, 3, dt), _arr1(mb, 4, dt), _arr1(mb, 5, dt), _arr2(mb, 6, dt),
            _arr2(mb, 7, dt), _arr1(mb, 8, np.uint8), mb[o] != 0, mb[o + 1] != 0,
            mb[o + 2] != 0, mb[o + 3], mb[o + 4], mb[o + 5] != 0, _arr1(mb, 9, np.int64),
            _arr1(mb, 10, np.uint8),
            _arr2(mb, 11, dt), _arr1(mb, 12, dt), _arr1(mb, 14, dt), _arr3(mb, 13, dt))


@njit(**NJIT_OPTS)
def take_job(mb, job, taken):
    """The worker's claim of job ``job``, having read MB_JOB = ``job`` and then
    MB_TAKEN = ``taken``: True when it now owns the job.  Sequence numbers only grow,
    so only a newer job is taken.  The worker's two loads are not one atomic read: it
    may read an old MB_JOB (s - 1), lose the core, and read MB_TAKEN after the caller
    has posted and cancelled job s (MB_TAKEN = s).  A test of ``job != taken`` then let
    its compare-and-swap set MB_TAKEN back from s to s - 1 and run the cancelled job,
    whose arrays the caller was using or had freed (heap corruption, wrong outputs)."""
    return job > taken and atomic_cas(mb, MB_TAKEN, taken, job)


@njit(**NJIT_INLINE_OPTS)
def _serve(mb, max_polls, dt):
    """Serve jobs until mb[MB_QUIT] is set.  State 1 (spinning): poll without pause;
    after mb[MB_IDLE] ticks with no job (or ``max_polls`` polls without a counter),
    state 2 (dozing): poll between naps that grow from 50 us to 1 ms (10 ms after
    about a second), until a job or a poke (mb[MB_POKE], set by a caller that found
    the worker dozing: ``poke``) comes.  A nap is a futex wait on mb[MB_POKE], which a
    poke ends at once (a plain sleep where there are no futexes)."""
    polls = 0
    t0 = cycle_counter()
    nap = 0
    naps = 0
    atomic_store(mb, MB_STATE, 1)
    while atomic_load(mb, MB_QUIT) == 0:
        job = atomic_load(mb, MB_JOB)
        taken = atomic_load(mb, MB_TAKEN)
        if job > taken:
            if take_job(mb, job, taken):
                _run_posted(mb, dt)
                atomic_store(mb, MB_DONE, job)
            nap = 0
        elif nap > 0:
            # a poke ends the nap at once (a futex wake, where there are futexes)
            futex_wait_us(mb, MB_POKE, 0, nap)
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
    GIL, so a caller never waits for it to get it; returns only when mb[MB_QUIT] is
    set."""
    return _serve(mb, max_polls, np.float32)


@njit(**NJIT_OPTS)
def serve_float64(mb, max_polls):
    """``serve_float32`` for float64 jobs."""
    return _serve(mb, max_polls, np.float64)


@njit(**NJIT_OPTS)
def poke(mb):
    """Make a dozing worker spin again: set mb[MB_POKE] and end its nap."""
    atomic_store(mb, MB_POKE, 1)
    futex_wake(mb, MB_POKE)


@njit(**NJIT_OPTS)
def settle_job(mb, seq, wait):
    """A caller leaving its job ``seq`` - after its own share returned, or by an
    exception - in one Numba call (so a KeyboardInterrupt cannot cut it short).
    Nothing if the job was never posted; else cancel it if the worker has not taken
    it, or, if taken and ``wait``, wait until the worker has finished it.  Returns
    True when the worker took it.

    KIND_SPLIT: if cancelled, part 0 ran the job alone.  If taken and both parts ran
    (or part 0 ran alone and part 1 came late), the outputs are written, but part 1
    may still be returning (or packing its scratch row), so the job's arrays must stay
    alive until mb[MB_DONE] reaches ``seq`` (``wait`` may be False).  If part 0 came
    too late, part 1 runs the whole job alone: ``wait`` must be True.
    KIND_TABLE: if cancelled the caller runs the job itself; if taken, ``wait`` must
    be True before the caller reads the job's outputs."""
    if atomic_load(mb, MB_JOB) < seq:
        return False
    if atomic_cas(mb, MB_TAKEN, seq - 1, seq):
        # cancelled: nobody will run it, so it counts as done (jobs are posted only
        # when the worker has finished the previous one, so nothing else writes DONE)
        atomic_store(mb, MB_DONE, seq)
        return False
    if wait:
        wait_at_least(mb, MB_DONE, seq)
    return True
