"""Atomic flags for CPU kernels that run on two threads in lockstep (Numba intrinsics).

Numba has no atomics for CPU code, so these emit LLVM atomic instructions directly:
``atomic_load`` (acquire), ``atomic_store`` (release) and ``atomic_cas`` (compare and
swap, sequentially consistent) on an element of an int64 array, ``os_yield``
(``sched_yield``), ``os_sleep_us`` (``usleep``), ``cycle_counter`` (RDTSC) and
``address_to_voidptr`` (to view memory posted by address with ``numba.carray``).

A release store of a flag after plain stores of data, and an acquire load of the flag
before plain loads of that data, order them for the compiler and the CPU: a thread that
sees the flag sees the data.

``sync`` arrays used with these helpers are int64 [3 * SYNC_STRIDE]: slot 0 is the claim
word, slots SYNC_STRIDE and 2 * SYNC_STRIDE the epoch counters of parts 0 and 1, each on
its own 64-byte cache line so the two threads do not write the same line.

``futex_wait_us`` / ``futex_wake`` put a thread to sleep on an element of such an array
and wake it (Linux futexes, through libc's ``syscall``); elsewhere the wait is a plain
sleep and the wake does nothing.
"""
import platform
import sys

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..config import NJIT_INLINE_OPTS

SYNC_STRIDE = 8            # int64 slots per cache line
SYNC_SIZE = 3 * SYNC_STRIDE
# claim word states
CLAIM_FREE, ARRIVED_0, ARRIVED_1, CLAIM_BOTH, CLAIM_ALONE = 0, 1, 2, 3, 4

def _item_pointer(context, builder, aty, arr, idx):
    ary = context.make_array(aty)(context, builder, arr)
    return cgutils.get_item_pointer(context, builder, aty, ary, [idx])


def _check(arr, idx):
    ok = (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1
          and isinstance(idx, types.Integer))
    if not ok:
        raise TypeError("sync_cpu atomics take (int64[:] array, integer index)")


@intrinsic
def atomic_load(typingctx, arr, idx):
    """arr[idx] read with acquire ordering."""
    _check(arr, idx)

    def codegen(context, builder, sig, args):
        ptr = _item_pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(ptr, ordering="acquire", align=8)
    return types.int64(arr, idx), codegen


@intrinsic
def atomic_store(typingctx, arr, idx, val):
    """arr[idx] = val with release ordering."""
    _check(arr, idx)

    def codegen(context, builder, sig, args):
        ptr = _item_pointer(context, builder, sig.args[0], args[0], args[1])
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(v, ptr, ordering="release", align=8)
        return context.get_dummy_value()
    return types.void(arr, idx, val), codegen


@intrinsic
def atomic_cas(typingctx, arr, idx, expected, new):
    """If arr[idx] == expected set it to new; returns True when it did (seq_cst)."""
    _check(arr, idx)

    def codegen(context, builder, sig, args):
        ptr = _item_pointer(context, builder, sig.args[0], args[0], args[1])
        e = context.cast(builder, args[2], sig.args[2], types.int64)
        n = context.cast(builder, args[3], sig.args[3], types.int64)
        pair = builder.cmpxchg(ptr, e, n, "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)
    return types.boolean(arr, idx, expected, new), codegen


@intrinsic
def address_to_voidptr(typingctx, addr):
    """An integer address (``arr.ctypes.data``) as a void pointer, for ``numba.carray``."""
    if not isinstance(addr, types.Integer):
        raise TypeError("address_to_voidptr takes an integer address")

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.int64)
        return builder.inttoptr(v, context.get_value_type(types.voidptr))
    return types.voidptr(addr), codegen


@intrinsic
def cycle_counter(typingctx):
    """The CPU's cycle/time-stamp counter (x86 RDTSC, constant rate); 0 on targets
    without one."""
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(64), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.readcyclecounter")
        return builder.call(fn, [])
    return types.int64(), codegen


@intrinsic
def os_yield(typingctx):
    """Give the core to another runnable thread (``sched_yield``)."""
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def os_sleep_us(typingctx, us):
    """Sleep this thread for ``us`` microseconds (``usleep``), without the GIL."""
    if not isinstance(us, types.Integer):
        raise TypeError("os_sleep_us takes an integer")

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "usleep")
        v = context.cast(builder, args[0], sig.args[0], types.int32)
        builder.call(fn, [v])
        return context.get_dummy_value()
    return types.void(us), codegen


# Linux's futex syscall number on the architectures that have it under one number
# (x86-64: 202, arm64: 98); None elsewhere (no futex: naps are plain sleeps).
SYS_FUTEX = ({"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(
    platform.machine().lower()) if sys.platform.startswith("linux")
    and sys.byteorder == "little" else None)
FUTEX_WAIT_PRIVATE = 128
FUTEX_WAKE_PRIVATE = 129


@intrinsic
def _futex(typingctx, arr, idx, op, val, us):
    """syscall(SYS_futex, &arr[idx] (its low 32 bits), op, val, timeout of ``us``
    microseconds, 0, 0); returns its result (-1 on error)."""
    _check(arr, idx)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        ptr = _item_pointer(context, builder, sig.args[0], args[0], args[1])
        ts = cgutils.alloca_once(builder, ir.LiteralStructType([i64, i64]))
        t = context.cast(builder, args[4], sig.args[4], types.int64)
        million = ir.Constant(i64, 1_000_000)
        builder.store(builder.sdiv(t, million), cgutils.gep_inbounds(builder, ts, 0, 0))
        builder.store(builder.mul(builder.srem(t, million), ir.Constant(i64, 1000)),
                      cgutils.gep_inbounds(builder, ts, 0, 1))
        fnty = ir.FunctionType(i64, [i64], var_arg=True)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "syscall")
        return builder.call(fn, [
            ir.Constant(i64, SYS_FUTEX), builder.ptrtoint(ptr, i64),
            context.cast(builder, args[2], sig.args[2], types.int64),
            context.cast(builder, args[3], sig.args[3], types.int64),
            builder.ptrtoint(ts, i64), ir.Constant(i64, 0), ir.Constant(i64, 0)])
    return types.int64(arr, idx, op, val, us), codegen


@njit(**NJIT_INLINE_OPTS)
def futex_wait_us(arr, idx, expected, us):
    """Sleep up to ``us`` microseconds, or until ``futex_wake(arr, idx)``, if the low 32
    bits of arr[idx] still equal ``expected`` (else return at once); a plain sleep of
    ``us`` where there are no futexes.  May also return early for no reason: callers
    check what they wait for."""
    if SYS_FUTEX is None:
        os_sleep_us(us)
    else:
        _futex(arr, idx, FUTEX_WAIT_PRIVATE, expected, us)


@njit(**NJIT_INLINE_OPTS)
def futex_wake(arr, idx):
    """Wake a thread sleeping in ``futex_wait_us`` on arr[idx] (nothing without
    futexes, where its sleep ends by itself)."""
    if SYS_FUTEX is not None:
        _futex(arr, idx, FUTEX_WAKE_PRIVATE, 1, 0)


# Waits spin on plain loads (no PAUSE: under a hypervisor, a PAUSE loop can trigger
# pause-loop exits that take the vCPU away for milliseconds) for up to this many
# cycle-counter ticks (about 10 us at 2.6 GHz), then yield the core at every check.
SPIN_TICKS = 25_000
SPIN_POLLS = 20_000     # the same where the target has no cycle counter


@njit(**NJIT_INLINE_OPTS)
def _still_spinning(t0, polls, ticks, max_polls):
    """Whether a wait that began at cycle count t0 (0: no counter) and has polled
    ``polls`` times is still within ``ticks`` ticks (or ``max_polls`` polls)."""
    if t0 != 0:
        return cycle_counter() - t0 < ticks
    return polls < max_polls


@njit(**NJIT_INLINE_OPTS)
def wait_at_least(sync, slot, value):
    """Wait until sync[slot] >= value: spin for a while, then sched_yield between
    checks (the other thread is normally a fraction of a microsecond away)."""
    if atomic_load(sync, slot) >= value:
        return
    t0 = cycle_counter()
    polls = 0
    spinning = True
    while atomic_load(sync, slot) < value:
        polls += 1
        if spinning and (polls & 63) == 0:
            spinning = _still_spinning(t0, polls, SPIN_TICKS, SPIN_POLLS)
        if not spinning:
            os_yield()


@njit(**NJIT_INLINE_OPTS)
def publish(sync, part, epoch):
    """Publish this part's epoch (a release store: what it wrote before is visible to
    the other part once that part sees the epoch)."""
    atomic_store(sync, (1 + part) * SYNC_STRIDE, epoch)


@njit(**NJIT_INLINE_OPTS)
def wait_other(sync, part, epoch):
    """Wait until the other part has published ``epoch`` (or a later one)."""
    wait_at_least(sync, (2 - part) * SYNC_STRIDE, epoch)


@njit(**NJIT_INLINE_OPTS)
def barrier(sync, part, epoch):
    """Two-thread barrier: publish this part's epoch, wait for the other part's.
    Each part calls it with epochs 1, 2, 3, ... in the same order."""
    publish(sync, part, epoch)
    wait_other(sync, part, epoch)


@njit(**NJIT_INLINE_OPTS)
def claim(sync, part, wait_ticks):
    """Decide whether the two parts of a job run together.  Either part may arrive
    first, on any thread (even the same thread as the other, one after the other):

    - the first to arrive marks itself and waits up to ``wait_ticks`` cycle-counter
      ticks (polls, where there is no counter) for the other; if it does not come, the
      first takes the whole job alone;
    - the second joins (both run) unless the first has already gone alone, in which
      case the second must do nothing.

    Returns 2 (both run, in lockstep), 1 (this part runs the whole job alone) or 0
    (the other part runs it alone; do nothing).  No part ever waits for a partner that
    has not arrived, so the job cannot deadlock whatever the threads do."""
    mine = ARRIVED_0 + part
    other = ARRIVED_0 + 1 - part
    if atomic_cas(sync, 0, CLAIM_FREE, mine):
        t0 = cycle_counter()
        polls = 0
        while True:
            if atomic_load(sync, 0) == CLAIM_BOTH:
                return 2
            polls += 1
            if (polls & 63) == 0 and not _still_spinning(t0, polls, wait_ticks,
                                                         wait_ticks):
                break
        if atomic_cas(sync, 0, mine, CLAIM_ALONE):
            return 1
        return 2
    if atomic_cas(sync, 0, other, CLAIM_BOTH):
        return 2
    return 0
