"""Threads of the CPU backend.

The CPU kernels are serial Numba functions that release the GIL; parallelism comes from
running them on disjoint blocks of rows in a small pool of Python threads (the caller's
thread plus ``n - 1`` workers), each block running start to end with no barrier, and each
thread calling single-threaded BLAS for its own GEMMs.  ``n`` defaults to Numba's
``NUMBA_NUM_THREADS`` (all cores unless set) and is changed with ``set_num_threads``.
"""
import atexit
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from . import config

_state = {"n": None, "pool": None, "blas": None}
_lock = threading.Lock()
_local = threading.local()   # .single: this thread runs fastseq calls on itself only


def _after_fork_in_child():
    """A forked child has none of the parent's threads: forget the pool (a job sent to
    it would wait for ever) and the workers (``worker`` starts new ones), and renew
    the lock, which another thread may have held at the fork."""
    global _lock
    _lock = threading.Lock()
    _state["pool"] = None
    _workers.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _stop_workers_at_exit():
    """Stop this process's workers and wait for them (at interpreter exit).  A worker
    started on a cold compile cache spends its first seconds compiling its loop; if the
    interpreter finalises meanwhile, the thread dies inside LLVM and the process
    crashes (a segfault after a script that ran about 9 s was seen).  Waiting lets the
    compilation finish; the loop then sees MB_QUIT and returns at once."""
    ws = _own_workers()
    for w in ws:
        w.stop()
    for w in ws:
        w.thread.join(timeout=config.WORKER_EXIT_WAIT_S)


atexit.register(_stop_workers_at_exit)


def _own_workers():
    """The workers this process started (not ones inherited through fork)."""
    return [w for w in list(_workers.values()) if w is not None and w.pid == os.getpid()]


def set_num_threads(n):
    """Use ``n`` threads in the CPU kernels (and in Numba's own parallel code).

    ``n`` may not exceed ``NUMBA_NUM_THREADS`` (default: the number of cores).
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: `n` must be an int, got {type(n).__name__}")
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(f"set_num_threads: `n` must be in [1, {limit}] "
                         f"(NUMBA_NUM_THREADS), got {n}")
    _state["n"] = n
    numba.set_num_threads(n)


def get_num_threads():
    """Threads the CPU kernels use now (1 inside ``run_pair``'s two tasks)."""
    if getattr(_local, "single", False):
        return 1
    n = _state["n"]
    return numba.config.NUMBA_NUM_THREADS if n is None else n


def split(n_rows, macs_per_row=0):
    """Contiguous [lo, hi) row blocks, one per thread; a block gets at least
    ``config.MIN_MACS_PER_THREAD`` multiply-adds of work (``macs_per_row`` each row)."""
    min_rows = 1
    if macs_per_row > 0:
        min_rows = max(1, -(-config.MIN_MACS_PER_THREAD // macs_per_row))
    k = max(1, min(get_num_threads(), n_rows // min_rows))
    return [(i * n_rows // k, (i + 1) * n_rows // k) for i in range(k)]


def _pool(workers):
    with _lock:
        pool = _state["pool"]
        if pool is None or pool._max_workers < workers:
            pool = _state["pool"] = ThreadPoolExecutor(
                max_workers=max(workers, numba.config.NUMBA_NUM_THREADS - 1),
                thread_name_prefix="fastseq")
    return pool


def _single(fn):
    def run(*args):
        old = getattr(_local, "single", False)
        _local.single = True
        try:
            return fn(*args)
        finally:
            _local.single = old
    return run


def run_pair(fa, fb, macs=None):
    """Run two independent tasks at once (e.g. the two directions of a Bidirectional
    layer), each on one thread, when two threads are allowed and each task has at least
    ``config.MIN_MACS_PER_THREAD`` multiply-adds of work (``macs``, when known); else one
    after the other.  Returns (fa(), fb())."""
    if get_num_threads() < 2 or (macs is not None and macs < config.MIN_MACS_PER_THREAD):
        return fa(), fb()
    with _blas_single_thread():
        future = _pool(1).submit(_single(fb))
        try:
            a = _single(fa)()
        finally:
            b = future.result()
    return a, b


def run_blocks(fn, blocks):
    """Run ``fn(lo, hi)`` for every block, the first on this thread, the rest on the pool.
    BLAS is kept to one thread meanwhile: each block's thread does its own GEMMs, and a
    multi-threaded BLAS on these small per-step products only adds wake-ups and spinning
    (catastrophically so on a loaded machine)."""
    if len(blocks) == 1:
        with _blas_single_thread():
            fn(*blocks[0])
        return
    pool = _pool(len(blocks) - 1)
    with _blas_single_thread():
        futures = [pool.submit(fn, lo, hi) for lo, hi in blocks[1:]]
        try:
            fn(*blocks[0])
        finally:
            for f in futures:
                f.result()


class Worker:
    """A thread that runs jobs posted through ``kernels/worker_cpu``'s mailbox (one
    worker per float dtype): part 1 of the two-thread jobs of ``lstm_split_cpu``, and
    the second direction of a Bidirectional layer fed by an Embedding
    (``lstm_table_cpu``).  It lives in Numba code and never takes the GIL: for a few
    milliseconds after each job (``config.SPLIT_WORKER_IDLE_TICKS``) it spins, so calls
    in quick succession hand it their job in well under a microsecond; then it dozes
    (polls between naps of up to 1 ms, 10 ms after a second; a nap is a futex wait on
    Linux).  A caller that finds it dozing pokes it to spin again for the calls to
    come: the poke ends its nap, and the worker wakes on another core than the
    caller's (``wake``).
    """

    def __init__(self, dtype):
        from .kernels import worker_cpu as kw
        self.kw = kw
        self.mb = np.zeros(kw.MB_SIZE, np.int64)
        self.mb[kw.MB_IDLE] = config.SPLIT_WORKER_IDLE_TICKS
        self.serve = kw.serve_float32 if dtype == np.float32 else kw.serve_float64
        self.lock = threading.Lock()
        self.seq = 0
        self.held = []          # (job, arrays) the worker may still touch
        self.pid = os.getpid()
        self.thread = threading.Thread(target=self.serve,
                                       args=(self.mb, config.SPLIT_WORKER_MAX_POLLS),
                                       daemon=True, name="fastseq-worker")
        self.thread.start()
        self.tid = getattr(self.thread, "native_id", None)
        self.allowed = None     # the worker's own affinity while wake() narrows it

    def spinning(self):
        """Whether the worker is spinning (takes a job at once); a worker woken by
        ``wake`` gets back the cores it was allowed before."""
        if self.mb[self.kw.MB_STATE] == 1:
            if self.allowed is not None:
                self._unpin()
            return True
        return False

    def busy(self):
        """Whether the worker has taken a job it has not finished (the mailbox must not
        be written then)."""
        return self.mb[self.kw.MB_DONE] < self.mb[self.kw.MB_TAKEN]

    def hold(self, seq, refs):
        """Keep ``refs`` (a job's arrays) alive until the worker finishes job ``seq``."""
        self.held.append((seq, refs))

    def release_done(self):
        held = self.held
        if held and held[0][0] <= self.mb[self.kw.MB_DONE]:
            done = self.mb[self.kw.MB_DONE]
            self.held = [(s, r) for s, r in held if s > done]

    def wake(self):
        """Make a dozing worker spin again (for SPLIT_WORKER_IDLE_TICKS as now set);
        with config.WORKER_WAKE_ELSEWHERE, on a core other than this thread's."""
        self.mb[self.kw.MB_IDLE] = config.SPLIT_WORKER_IDLE_TICKS
        if config.WORKER_WAKE_ELSEWHERE and self.mb[self.kw.MB_STATE] == 2:
            self._wake_elsewhere()
        self.kw.poke(self.mb)

    def _wake_elsewhere(self):
        """Narrow the dozing worker's cores to the ones it may use other than this
        thread's, so that it wakes on another one (``spinning`` widens them again
        once it spins).  A worker that dozed on the core the caller now runs on would
        otherwise be woken there by its nap's timer and wait behind the caller, as
        the scheduler does not move it to an idle core until a tick later."""
        cpu = _this_cpu()
        if cpu < 0 or self.tid is None:
            return
        try:
            allowed = self.allowed if self.allowed is not None else \
                os.sched_getaffinity(self.tid)
            others = allowed - {cpu}
            if others:
                os.sched_setaffinity(self.tid, others)
                self.allowed = allowed
        except OSError:     # the thread is gone, or its affinity is not ours to set
            pass

    def _unpin(self):
        try:
            os.sched_setaffinity(self.tid, self.allowed)
        except OSError:
            pass
        self.allowed = None

    def stop(self):
        """Make the worker's loop return (after the job it may be running)."""
        self.mb[self.kw.MB_QUIT] = 1
        self.kw.poke(self.mb)

    def rest(self):
        """Make the worker stop spinning now (it dozes until the next poke)."""
        self.mb[self.kw.MB_IDLE] = 0


def _libc_sched_getcpu():
    """libc's sched_getcpu (Linux), or None."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        import ctypes
        fn = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = []
    return fn


_sched_getcpu = _libc_sched_getcpu()


def _this_cpu():
    """The core this thread runs on now (-1 where that cannot be known)."""
    return _sched_getcpu() if _sched_getcpu is not None else -1


_workers = {}


def worker(dtype, start=True):
    """The Worker of ``dtype`` in this process; with ``start``, started if there is
    none yet (or only one inherited through fork), else None then."""
    key = np.dtype(dtype)
    w = _workers.get(key)
    if w is not None and w.pid == os.getpid():
        return w        # the common case, without the lock
    with _lock:
        w = _workers.get(key)
        if w is None or w.pid != os.getpid():
            w = _workers[key] = Worker(key) if start else None
    return w


def wait_for_workers(timeout=None):
    """Wait until this process's worker threads run their loops; returns True when
    every one does (or has stopped), False on timeout (seconds; default
    config.WORKER_EXIT_WAIT_S).

    On a cold compile cache a worker compiles its loop in its own thread after the
    first call that starts it, and the compilation holds the GIL for seconds: any
    Python code in the process runs slowly meanwhile (the benchmark measured PyTorch's
    C1 call at 130 ms instead of 0.5 ms).  The benchmark waits here after fastseq's
    warm-up calls, so that this one-time cost is not timed as part of another
    framework's calls.  With a warm cache the loop loads in milliseconds."""
    import time
    limit = config.WORKER_EXIT_WAIT_S if timeout is None else float(timeout)
    deadline = time.monotonic() + limit
    for w in _own_workers():
        while w.thread.is_alive() and w.mb[w.kw.MB_STATE] == 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
    return True


class _blas_single_thread:
    """Set every loaded BLAS to one thread; restore the previous counts on exit."""

    def __enter__(self):
        libs = _state["blas"]
        if libs is None:
            try:
                from threadpoolctl import ThreadpoolController
                libs = [c for c in ThreadpoolController().lib_controllers
                        if c.user_api == "blas"]
            except Exception:  # threadpoolctl missing or unusable: leave BLAS alone
                libs = []
            _state["blas"] = libs
        self.saved = [(c, c.get_num_threads()) for c in libs]
        for c, n in self.saved:
            if n != 1:
                c.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        for c, n in self.saved:
            if n != 1:
                c.set_num_threads(n)
        return False
