"""The small-batch LSTM split by hidden units across two threads
(``fastseq/kernels/lstm_split_cpu.py``, atomics in ``kernels/sync_cpu.py``, the worker
thread in ``fastseq/_threads.py``, its mailbox in ``kernels/worker_cpu.py``).

The ``split`` paths of the ``cpu_path`` fixture run every LSTM test through it; here:
that the driver really runs both parts at once, that the claim protocol gives the right
answer whichever part arrives first or alone (no deadlock), the worker's mailbox
(posting, serving, cancelling, sleeping and waking), and the atomics themselves.
"""
import os
import threading
import time

import numba
import numpy as np
import pytest

import fastseq
from fastseq import _cpu, _threads, config
from fastseq.kernels import lstm_split_cpu, sync_cpu, worker_cpu
from fastseq.ops import lstm_dense
from reference import ref_dense, ref_lstm

needs_two_threads = pytest.mark.skipif(
    numba.config.NUMBA_NUM_THREADS < 2,
    reason="the unit split runs only when two threads are allowed (NUMBA_NUM_THREADS=1)")


def _data(rng, B, T, D, H, K, dtype):
    """Input and weights; the LSTM's weights scaled by fan-in (pre-activations of
    standard deviation about 2).  With weights of 0.5 at H = 128 the recurrence is
    chaotic: a float32 result then moves by as much as the tolerance with the order
    of the sums alone (numpy in float32, the terms of h U permuted: 4e-6 to 3.3e-5
    from the float64 reference over 20 orders; 3e-7 to 8e-7 at 0.3)."""
    x = rng.standard_normal((B, T, D)).astype(dtype)
    w = 2.0 / np.sqrt(D + H)
    ws = [(rng.standard_normal(s) * scale).astype(dtype)
          for s, scale in (((D, 4 * H), w), ((H, 4 * H), w), ((4 * H,), w), ((H, K), 0.5),
                           ((K,), 0.5))]
    return (x, *ws)


@pytest.fixture
def counted(monkeypatch):
    """What part 0 of each split job returned, as run by the CPU driver (2: the worker
    thread ran part 1 alongside; 1: part 0 ran the job alone)."""
    calls = []
    real = _cpu._run_part

    def wrapper(*args):
        ran = real(*args)
        calls.append(int(ran))
        return ran

    monkeypatch.setattr(_cpu, "_run_part", wrapper)
    return calls


@pytest.fixture(autouse=True)
def workers_rest():
    """After each test, split workers stop spinning (a test may have set them to spin
    for ever): a spinning worker left behind would take a core from the next test."""
    yield
    for w in list(_threads._workers.values()):
        if w is not None:
            w.rest()


def _spinning_worker(dtype, timeout=120.0):
    """The split worker of ``dtype``, started, awake and spinning (its first start
    compiles its loop, which can take a while on a cold cache)."""
    w = _threads.worker(dtype)
    w.wake()            # also sets its idle time from the config, as patched
    deadline = time.monotonic() + timeout
    while not w.spinning():
        w.wake()
        assert time.monotonic() < deadline, "the worker never started spinning"
        time.sleep(0.001)
    return w


@needs_two_threads
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,H", [(1, 128), (3, 33), (4, 64)])
def test_driver_takes_split_path(rng, assert_close, counted, monkeypatch, dtype, B, H):
    """A small batch runs split and matches the float64 reference, with a mask, the
    Dense epilogue, initial states and several chunks."""
    monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1)
    monkeypatch.setattr(config, "SPLIT_UNITS_MIN_STEP_MACS", 0)
    monkeypatch.setattr(config, "CHUNK_BYTES", 4 * H * 4 * 16)   # 16 steps per chunk
    monkeypatch.setattr(config, "CHUNK_MIN_ROWS", 1)
    T, D, K = 40, 16, 7
    x, W, U, b, Wd, bd = _data(rng, B, T, D, H, K, dtype)
    monkeypatch.setattr(config, "SPLIT_WORKER_IDLE_TICKS", 1 << 62)  # keep it awake
    # each part waits long enough for the other (on a loaded machine a short wait can
    # expire, and the part that came runs the job alone: right, but not checked here)
    monkeypatch.setattr(config, "SPLIT_CLAIM_TICKS", 10 ** 9)
    mask = rng.random((B, T)) > 0.25
    mask[0, :5] = False
    # a first call loads the kernels (and, the first time, starts the worker); a part
    # that waits too long for its partner runs the job alone, which is right but not
    # what this test checks
    lstm_dense(x, W, U, b, Wd, bd, "softmax", mask=mask)
    fastseq.lstm(x, W, U, b, mask=mask, return_sequences=True, return_state=True,
                 zero_output_for_mask=True, initial_state=[np.ones((B, H), dtype)] * 2)
    _spinning_worker(dtype)
    counted.clear()
    y = lstm_dense(x, W, U, b, Wd, bd, "softmax", mask=mask)
    want = ref_dense(ref_lstm(x, W, U, b, mask=mask, return_sequences=True), Wd, bd,
                     "softmax")
    atol, rtol = config.tolerance(dtype)
    assert_close(y, want, atol, rtol, what="lstm_dense (split)")
    h0 = [rng.standard_normal((B, H)).astype(dtype) for _ in range(2)]
    kw = dict(mask=mask, return_sequences=True, return_state=True,
              zero_output_for_mask=True, initial_state=h0)
    for name, got, exp in zip(("output", "h", "c"), fastseq.lstm(x, W, U, b, **kw),
                              ref_lstm(x, W, U, b, **kw)):
        assert_close(got, exp, atol, rtol, what=name)
    assert len(counted) == 2, "the unit-split kernel did not run"
    assert counted == [2, 2], "the worker thread did not run part 1 alongside"


@needs_two_threads
def test_caller_waits_when_the_worker_runs_the_job_alone(rng, assert_close, monkeypatch):
    """The caller's part comes late (here: 2 ms late), so the worker's part claims
    the whole job and runs it alone; the caller's part returns 0 at once.  The call
    must then wait for the worker before it returns: it once returned the outputs
    half-written (wrong predict results with calls from several threads)."""
    monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1)
    monkeypatch.setattr(config, "SPLIT_UNITS_MIN_STEP_MACS", 0)
    monkeypatch.setattr(config, "SPLIT_WORKER_IDLE_TICKS", 1 << 62)
    monkeypatch.setattr(config, "SPLIT_CLAIM_TICKS", 1000)      # a short wait
    B, T, D, H, K = 1, 20000, 8, 64, 5      # the worker is still busy when the caller returns
    x, W, U, b, Wd, bd = _data(rng, B, T, D, H, K, np.float32)
    x *= 0.2
    lstm_dense(x[:, :5], W, U, b, Wd, bd, "softmax")            # load, start the worker
    _spinning_worker(np.float32)
    ran = []
    real = _cpu._run_part

    def late(*args):
        time.sleep(0.002)
        r = real(*args)
        ran.append(int(r))
        return r

    monkeypatch.setattr(_cpu, "_run_part", late)
    y = lstm_dense(x, W, U, b, Wd, bd, "softmax").copy()   # as the call returned it
    assert ran == [0], "the worker did not run the job alone"
    # the same job run alone by this thread's part, with the worker dozing (the same
    # kernel in the same mode, so the same bits; 20000 float32 steps drift too far from
    # a float64 reference to compare with it)
    w = _threads.worker(np.float32)
    w.rest()
    # a job this long would wake the dozing worker and wait for it: not here
    monkeypatch.setattr(config, "SPLIT_WAKE_WAIT_MACS", 1 << 62)
    deadline = time.monotonic() + 60
    while w.spinning():
        assert time.monotonic() < deadline, "the worker kept spinning"
        time.sleep(0.001)
    ran.clear()
    monkeypatch.setattr(_cpu, "_run_part", lambda *a: ran.append(int(real(*a))) or ran[-1])
    want = lstm_dense(x, W, U, b, Wd, bd, "softmax")
    assert ran == [1], "this thread's part did not run the job alone"
    assert np.array_equal(y, want), (
        f"{int((y != want).sum())} of {y.size} outputs differ from the same job run by "
        f"this thread alone")
    assert_close(y[:, :50], ref_dense(ref_lstm(x[:, :50], W, U, b, return_sequences=True),
                                      Wd, bd, "softmax"), *config.tolerance(np.float32))


@needs_two_threads
def test_split_not_taken(rng, counted, monkeypatch):
    """One thread, a large batch, go_backwards, or a tiny H: the split is not used."""
    x, W, U, b, Wd, bd = _data(rng, 1, 50, 64, 128, 5, np.float32)   # C1's sizes
    fastseq.set_num_threads(1)
    try:
        fastseq.lstm(x, W, U, b)
    finally:
        fastseq.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    fastseq.lstm(x, W, U, b, go_backwards=True)
    xb, Wb, Ub, bb, _, _ = _data(rng, 8, 30, 8, 128, 5, np.float32)
    fastseq.lstm(xb, Wb, Ub, bb)
    xs, Ws, Us, bs, _, _ = _data(rng, 1, 30, 8, 16, 5, np.float32)
    fastseq.lstm(xs, Ws, Us, bs)
    assert counted == []
    fastseq.lstm(x, W, U, b)
    assert len(counted) == 1


def _job(rng, B=2, T=13, D=5, H=9, K=4, dtype=np.float32, Tc=4, prepacked=False):
    """Arguments of lstm_units_split for one job (epilogue mode), and its reference;
    with ``prepacked``, W, U and b come packed (``_cpu.split_pack_of``, as an imported
    model keeps them), else each part packs its own slice."""
    x, W, U, b, Wd, bd = _data(rng, B, T, D, H, K, dtype)
    mask = rng.random((B, T)) > 0.3
    want = ref_dense(ref_lstm(x, W, U, b, mask=mask, return_sequences=True), Wd, bd,
                     "softmax")
    out = np.full((B, T, K), np.nan, dtype)
    hbuf = np.zeros((2, B, H), dtype)
    state = dict(
        sync=np.zeros(sync_cpu.SYNC_SIZE, np.int64), x=x, W=W, U=U, b=b, hbuf=hbuf,
        c=np.zeros((B, H), dtype), seen=np.zeros(B, np.uint8),
        mask=np.ascontiguousarray(mask.view(np.uint8)), Tc=Tc,
        packed=(_cpu.split_pack_of(W, U, b) if prepacked else
                np.full((3, lstm_split_cpu.pack_size(D, H)), np.nan, dtype)),
        pack=not prepacked,
        work=np.full((3, lstm_split_cpu.work_size(B, Tc, H)), np.nan, dtype),
        seqbuf=np.empty((B, Tc, H), dtype), out=out, Wd=Wd, bd=bd,
        ybuf=np.empty((2, B * Tc, K), dtype))
    return state, want


def _post(mb, seq, st, spins):
    worker_cpu.post_split_job(
        mb, seq, st["sync"], spins, st["x"], st["W"], st["U"], st["b"], st["hbuf"],
        st["c"], st["seen"], st["mask"], st["Tc"], st["packed"], st["pack"], st["work"],
        st["seqbuf"], st["out"], lstm_split_cpu.OUT_EPILOGUE, st["Wd"], st["bd"], 100, st["ybuf"],
        False, 1, 2)


def _part(p, st, spins):
    return lstm_split_cpu.lstm_units_split(
        p, st["sync"], spins, st["x"], st["W"], st["U"], st["b"], st["hbuf"], st["c"],
        st["seen"], st["mask"], st["Tc"], st["packed"], st["pack"], st["work"],
        st["seqbuf"], st["out"], lstm_split_cpu.OUT_EPILOGUE, st["Wd"], st["bd"], 100, st["ybuf"], False, 1, 2)


@pytest.mark.parametrize("prepacked", [False, True])
@pytest.mark.parametrize("first", [0, 1])
def test_part_alone_then_late_part_does_nothing(rng, assert_close, first, prepacked):
    """A part that finds no partner runs the whole job alone (no barrier, no wait);
    the other part, arriving later, returns 0 and writes nothing (the weights given
    packed are only read)."""
    st, want = _job(rng, prepacked=prepacked)
    packed = st["packed"].copy()
    assert _part(first, st, 0) == 1
    atol, rtol = config.tolerance(np.float32)
    assert_close(st["out"], want, atol, rtol, what=f"part {first} alone")
    before = st["out"].copy(), st["hbuf"].copy(), st["c"].copy()
    assert _part(1 - first, st, 0) == 0
    for a, b in zip(before, (st["out"], st["hbuf"], st["c"])):
        np.testing.assert_array_equal(a, b)
    if prepacked:
        np.testing.assert_array_equal(st["packed"], packed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_threads_in_lockstep(rng, assert_close, dtype):
    """Both parts on their own threads, each waiting long enough for the other: they
    run together (both return 2) and match the reference, in either start order."""
    atol, rtol = config.tolerance(dtype)
    for first in (0, 1):
        st, want = _job(rng, B=3, T=17, H=10, dtype=dtype)
        ran = {}
        th = threading.Thread(target=lambda: ran.setdefault(first, _part(first, st,
                                                                         10 ** 9)))
        th.start()
        ran[1 - first] = _part(1 - first, st, 10 ** 9)
        th.join()
        assert ran == {0: 2, 1: 2}
        assert_close(st["out"], want, atol, rtol, what=f"lockstep, part {first} first")


@pytest.mark.parametrize("B,H,Tc", [(1, 128, 5), (2, 9, 4), (3, 33, 1), (4, 64, 7)])
def test_lockstep_equals_alone_bit_for_bit(rng, B, H, Tc):
    """Each step is pipelined across the exchange of h: a part sums its own units of
    the new h before it waits for the other half.  The sums are ordered the same way
    when one part runs the job alone, so the two must agree bit for bit; a part that
    read a stale half of h (a missing wait) would not.  Weights packed by the parts
    themselves (alone) or given packed (together, every other trial) give the same
    bits too."""
    for trial in range(25):
        seed = int(rng.integers(1 << 30))
        alone, _ = _job(np.random.default_rng(seed), B=B, T=23, H=H, Tc=Tc)
        assert _part(trial % 2, alone, 0) == 1
        both, _ = _job(np.random.default_rng(seed), B=B, T=23, H=H, Tc=Tc,
                       prepacked=trial % 2 == 1)
        ran = {}
        th = threading.Thread(target=lambda: ran.setdefault(1, _part(1, both, 10 ** 9)))
        th.start()
        ran[0] = _part(0, both, 10 ** 9)
        th.join()
        assert ran == {0: 2, 1: 2}
        for name in ("out", "hbuf", "c", "seen"):
            np.testing.assert_array_equal(both[name], alone[name], err_msg=name)


def test_racing_claims_always_correct(rng, assert_close):
    """No wait at all: which part runs (alone or together) depends on timing, and every
    outcome gives the reference answer."""
    atol, rtol = config.tolerance(np.float32)
    for _ in range(30):
        st, want = _job(rng, T=9, Tc=3)
        th = threading.Thread(target=_part, args=(1, st, 0))
        th.start()
        _part(0, st, 0)
        th.join()
        assert_close(st["out"], want, atol, rtol, what="racing claim")


@needs_two_threads
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_worker_serves_posted_jobs(rng, assert_close, monkeypatch, dtype):
    """Jobs posted by address in the worker's mailbox: the worker runs part 1 of each,
    and the answers match the reference."""
    monkeypatch.setattr(config, "SPLIT_WORKER_IDLE_TICKS", 1 << 62)
    w = _spinning_worker(dtype)
    atol, rtol = config.tolerance(dtype)
    with w.lock:
        for i in range(6):
            st, want = _job(rng, B=3, T=11, H=10, dtype=dtype, prepacked=i % 2 == 1)
            w.seq += 1
            _post(w.mb, w.seq, st, 10 ** 9)
            assert _part(0, st, 10 ** 9) == 2
            assert worker_cpu.settle_job(w.mb, w.seq, True)      # taken, now done
            assert w.mb[worker_cpu.MB_DONE] == w.seq
            assert_close(st["out"], want, atol, rtol, what="posted job")


def test_unserved_job_is_cancelled(rng, assert_close):
    """A job posted to a mailbox nobody serves: part 0 runs it alone, and settle_job
    cancels it, so no thread can pick it up later; a job never posted is left alone."""
    mb = np.zeros(worker_cpu.MB_SIZE, np.int64)
    st, want = _job(rng)
    _post(mb, 1, st, 1000)
    assert _part(0, st, 1000) == 1
    assert not worker_cpu.settle_job(mb, 1, True)
    # cancelled, and counted as done, so the next job can be posted
    assert mb[worker_cpu.MB_TAKEN] == 1 and mb[worker_cpu.MB_DONE] == 1
    # job 2 was never posted (an interrupt before its post): nothing changes
    assert not worker_cpu.settle_job(mb, 2, True)
    assert mb[worker_cpu.MB_TAKEN] == 1 and mb[worker_cpu.MB_DONE] == 1
    atol, rtol = config.tolerance(np.float32)
    assert_close(st["out"], want, atol, rtol, what="cancelled job run alone")


def test_worker_never_takes_a_cancelled_job():
    """The worker's stale read: it read MB_JOB = s - 1, lost the core, and reads
    MB_TAKEN only after the caller posted job s and cancelled it (MB_TAKEN = s).  Its
    claim must fail and leave the mailbox as it is (it once set MB_TAKEN back to s - 1
    and ran the cancelled job on arrays the caller had freed)."""
    mb = np.zeros(worker_cpu.MB_SIZE, np.int64)
    s = 5
    for slot in (worker_cpu.MB_JOB, worker_cpu.MB_TAKEN, worker_cpu.MB_DONE):
        mb[slot] = s - 1
    job = int(mb[worker_cpu.MB_JOB])            # the worker's first load ...
    mb[worker_cpu.MB_JOB] = s                   # ... the caller posts job s ...
    assert not worker_cpu.settle_job(mb, s, True)   # ... and cancels it
    taken = int(mb[worker_cpu.MB_TAKEN])        # the worker's second load
    assert not worker_cpu.take_job(mb, job, taken)
    assert mb[worker_cpu.MB_TAKEN] == s and mb[worker_cpu.MB_DONE] == s
    # the next job is taken once, and then the caller cannot cancel it
    mb[worker_cpu.MB_JOB] = s + 1
    assert worker_cpu.take_job(mb, s + 1, s)
    assert not worker_cpu.take_job(mb, s + 1, s)
    assert worker_cpu.settle_job(mb, s + 1, False)  # True: the worker has it


@needs_two_threads
def test_worker_sleeps_and_wakes(rng, assert_close, monkeypatch):
    """A worker put to rest dozes; the next call runs alone, right, and pokes it to
    spin again."""
    monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1)
    # once woken it spins until the test ends: a check descheduled for longer than the
    # usual spin time (about 4 ms) would otherwise miss it on a loaded machine
    monkeypatch.setattr(config, "SPLIT_WORKER_IDLE_TICKS", 1 << 62)
    w = _spinning_worker(np.float32)
    w.rest()
    deadline = time.monotonic() + 10
    while w.spinning():
        assert time.monotonic() < deadline, "the worker never started dozing"
        time.sleep(0.001)
    x, W, U, b, Wd, bd = _data(rng, 1, 20, 8, 64, 5, np.float32)
    want = ref_dense(ref_lstm(x, W, U, b, return_sequences=True), Wd, bd, "softmax")
    atol, rtol = config.tolerance(np.float32)
    assert_close(lstm_dense(x, W, U, b, Wd, bd, "softmax"), want, atol, rtol)
    deadline = time.monotonic() + 10
    while not w.spinning():
        assert time.monotonic() < deadline, "the call did not wake the worker"
        time.sleep(0.001)


def _last_cpu(tid):
    """The core thread ``tid`` of this process last ran on (/proc, field 39)."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2:].split()[36])


needs_two_cores = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2
    or _threads._this_cpu() < 0,
    reason="keeping the worker off the caller's core needs Linux and two usable cores")


@needs_two_threads
@needs_two_cores
@pytest.mark.parametrize("elsewhere", [True, False])
def test_wake_keeps_the_worker_off_the_callers_core(monkeypatch, elsewhere):
    """A dozing worker is woken on another core than the caller's: its allowed cores
    leave out the caller's until it spins, then are what they were.  (A worker that
    dozed on the caller's core was seen to wake there, behind the caller, for a
    scheduler tick of 4 ms.)  With config.WORKER_WAKE_ELSEWHERE off, wake() leaves
    them alone."""
    monkeypatch.setattr(config, "WORKER_WAKE_ELSEWHERE", elsewhere)
    monkeypatch.setattr(config, "SPLIT_WORKER_IDLE_TICKS", 1 << 62)
    w = _spinning_worker(np.float32)
    allowed = os.sched_getaffinity(w.tid)
    mine = os.sched_getaffinity(0)
    try:
        cpu = _threads._this_cpu()
        os.sched_setaffinity(0, {cpu})      # this thread stays on that core meanwhile
        # the worker dozes, last on this core (it ran its last poll there)
        os.sched_setaffinity(w.tid, {cpu})
        w.rest()
        deadline = time.monotonic() + 10
        while w.mb[worker_cpu.MB_STATE] != 2:
            assert time.monotonic() < deadline, "the worker never started dozing"
            time.sleep(0.001)
        os.sched_setaffinity(w.tid, allowed)
        w.wake()
        if elsewhere:
            assert os.sched_getaffinity(w.tid) == allowed - {cpu}
        else:
            assert os.sched_getaffinity(w.tid) == allowed
        deadline = time.monotonic() + 10
        while w.mb[worker_cpu.MB_STATE] != 1:
            assert time.monotonic() < deadline, "the worker did not wake"
            time.sleep(0.001)
        if elsewhere:
            assert _last_cpu(w.tid) != cpu, "the worker woke on the caller's core"
        assert w.spinning()
        assert os.sched_getaffinity(w.tid) == allowed
        assert w.allowed is None
    finally:
        os.sched_setaffinity(0, mine)
        os.sched_setaffinity(w.tid, allowed)


@needs_two_threads
def test_long_job_waits_for_a_dozing_worker(rng, assert_close, counted, monkeypatch):
    """A long job that finds the worker dozing wakes it and waits for it (up to
    SPLIT_WAKE_WAIT_S) instead of running alone: a job that runs alone for longer than
    the worker spins afterwards would find it dozing at every call, and back-to-back
    long calls always ran on one thread (B=1, T=2000, H=128 with 20 ms pauses: 6.3 ms
    per call split, 10.1 ms alone)."""
    monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1)
    # a loaded machine: wait as long as it takes for the worker to wake and to claim,
    # and once woken let it spin until the test ends (a caller descheduled for longer
    # than the worker's spin time would miss the window and run alone)
    monkeypatch.setattr(config, "SPLIT_WAKE_WAIT_S", 5.0)
    monkeypatch.setattr(config, "SPLIT_CLAIM_TICKS", 1 << 40)
    monkeypatch.setattr(config, "SPLIT_WORKER_IDLE_TICKS", 1 << 62)
    x, W, U, b, Wd, bd = _data(rng, 1, 30, 8, 64, 5, np.float32)
    want = ref_dense(ref_lstm(x, W, U, b, return_sequences=True), Wd, bd, "softmax")
    atol, rtol = config.tolerance(np.float32)
    w = _spinning_worker(np.float32)
    for wait_macs, expect in ((1 << 62, {1}), (1, {2, 0})):
        monkeypatch.setattr(config, "SPLIT_WAKE_WAIT_MACS", wait_macs)
        w.rest()
        deadline = time.monotonic() + 10
        while w.spinning():
            assert time.monotonic() < deadline, "the worker never started dozing"
            time.sleep(0.001)
        counted.clear()
        assert_close(lstm_dense(x, W, U, b, Wd, bd, "softmax"), want, atol, rtol)
        # 1: this thread ran the job alone; 2 (or 0, its part late): the worker took part
        assert len(counted) == 1 and counted[0] in expect, (wait_macs, counted)


def test_atomics():
    """The intrinsics read and write the slot they are given; CAS succeeds only on the
    expected value; the barrier passes once both parts have published an epoch."""
    @numba.njit
    def run(a):
        sync_cpu.atomic_store(a, 3, 7)
        v = sync_cpu.atomic_load(a, 3)
        ok1 = sync_cpu.atomic_cas(a, 3, 7, 9)
        ok2 = sync_cpu.atomic_cas(a, 3, 7, 11)
        sync_cpu.os_yield()
        return v, ok1, ok2, a[3]

    a = np.zeros(8, np.int64)
    assert run(a) == (7, True, False, 9)

    @numba.njit(nogil=True)
    def barriers(sync, part, n):
        for e in range(1, n + 1):
            sync_cpu.barrier(sync, part, e)
        return n

    sync = np.zeros(sync_cpu.SYNC_SIZE, np.int64)
    th = threading.Thread(target=barriers, args=(sync, 1, 1000))
    th.start()
    assert barriers(sync, 0, 1000) == 1000
    th.join()
    assert sync[sync_cpu.SYNC_STRIDE] == sync[2 * sync_cpu.SYNC_STRIDE] == 1000


@pytest.mark.skipif(sync_cpu.SYS_FUTEX is None,
                    reason="futexes are Linux-only (x86-64 and arm64 here); elsewhere a "
                           "dozing worker's nap is a plain sleep that ends by itself")
def test_futex_wait_ends_at_a_wake_or_a_changed_word():
    """futex_wait_us sleeps until futex_wake (not its whole timeout), returns at once
    when the word is not the expected value, and ends by itself at its timeout.  The
    worker's naps wait this way, so a poke ends one at once (bench/wake_latency.py
    here: a dozing worker spun again after a median of 290-470 us with plain sleeps,
    120-135 us with futex waits)."""
    @numba.njit(nogil=True)
    def wait(a, us):
        sync_cpu.futex_wait_us(a, 0, 0, us)
        return sync_cpu.atomic_load(a, 0)

    @numba.njit
    def wake(a):
        sync_cpu.atomic_store(a, 0, 1)
        sync_cpu.futex_wake(a, 0)

    a = np.zeros(8, np.int64)
    wait(a, 1)                                  # compiled, and a 1 us timeout ends
    a[0] = 5
    t0 = time.monotonic()
    assert wait(a, 20_000_000) == 5             # not the expected 0: no sleep at all
    assert time.monotonic() - t0 < 10.0
    a[0] = 0
    t0 = time.monotonic()
    wait(a, 30_000)                             # 30 ms, then it ends by itself
    assert time.monotonic() - t0 < 10.0
    got = []
    th = threading.Thread(target=lambda: got.append(wait(a, 20_000_000)))
    t0 = time.monotonic()
    th.start()
    time.sleep(0.05)                            # the thread is asleep by now (or soon)
    wake(a)
    th.join(timeout=15.0)
    assert not th.is_alive() and got == [1]
    assert time.monotonic() - t0 < 10.0, "the wake did not end the 20 s wait"


def test_unit_split_size_rule(monkeypatch):
    """The driver's rule: small batch, H >= 2, two threads, enough work."""
    monkeypatch.setattr(config, "SPLIT_UNITS_MAX_ROWS", 4)
    monkeypatch.setattr(config, "SPLIT_UNITS_MIN_STEP_MACS", 16_384)
    two = numba.config.NUMBA_NUM_THREADS >= 2
    assert _cpu._use_unit_split(1, 50, 64, 128, None, False) is two   # C1
    assert not _cpu._use_unit_split(5, 50, 64, 128, None, False)
    assert not _cpu._use_unit_split(1, 50, 64, 32, None, False)
    assert not _cpu._use_unit_split(1, 50, 64, 128, None, True)
    assert not _cpu._use_unit_split(1, 50, 64, 128, np.zeros((3, 512)), False)
    assert not _cpu._use_unit_split(1, 1, 1, 64, None, False)


def test_wait_for_workers():
    """wait_for_workers returns once every worker runs its loop, and reports a
    timeout while one is still starting (here a stand-in whose loop never starts)."""
    w = _threads.worker(np.float32)
    assert _threads.wait_for_workers(timeout=120.0)
    assert w.mb[w.kw.MB_STATE] in (1, 2)

    class Starting:
        pid = os.getpid()
        kw = w.kw
        mb = np.zeros(w.kw.MB_SIZE, np.int64)      # MB_STATE 0: loop not running yet
        thread = threading.Thread(target=threading.Event().wait, args=(5.0,),
                                  daemon=True)

    Starting.thread.start()
    key = "starting-stand-in"
    _threads._workers[key] = Starting()
    try:
        t0 = time.monotonic()
        assert not _threads.wait_for_workers(timeout=0.05)
        assert time.monotonic() - t0 < 4.0
        Starting.mb[w.kw.MB_STATE] = 2
        assert _threads.wait_for_workers(timeout=1.0)
    finally:
        del _threads._workers[key]


@needs_two_threads
def test_imported_model_keeps_packed_weights_until_they_change(rng, counted,
                                                               monkeypatch):
    """An imported LSTM -> Dense tagger keeps its weights packed for the split from call
    to call, and packs them again once training or set_weights changes them: every
    prediction equals, bit for bit, the public op on the weights as they are then
    (which packs them at each call)."""
    import keras
    from fastseq import training
    monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1)
    monkeypatch.setattr(config, "SPLIT_UNITS_MIN_STEP_MACS", 0)
    monkeypatch.setattr(config, "SPLIT_WORKER_IDLE_TICKS", 1 << 62)
    monkeypatch.setattr(config, "SPLIT_CLAIM_TICKS", 10 ** 9)
    T, D, H, K = 12, 6, 16, 5
    model = keras.Sequential([keras.Input((T, D)),
                              keras.layers.LSTM(H, return_sequences=True),
                              keras.layers.TimeDistributed(
                                  keras.layers.Dense(K, activation="softmax"))])
    fm = fastseq.from_keras(model)
    lstm, dense = fm.layers
    x = rng.standard_normal((1, T, D)).astype(np.float32)
    _spinning_worker(np.float32)

    def direct():
        return lstm_dense(x, lstm.kernel, lstm.recurrent_kernel, lstm.bias,
                          dense.kernel, dense.bias, "softmax")

    y0 = fm.predict(x)
    assert counted and all(r in (1, 2) for r in counted), counted
    packed = lstm._split_pack
    np.testing.assert_array_equal(y0, direct())
    np.testing.assert_array_equal(fm.predict(x), y0)
    assert lstm._split_pack is packed, "the packed weights were not kept"
    training.compile(fm, optimizer="sgd")
    training.train_on_batch(fm, x, rng.integers(0, K, size=(1, T)))
    y1 = fm.predict(x)
    assert not np.array_equal(y1, y0), "training did not change the prediction"
    np.testing.assert_array_equal(y1, direct())
    training.set_weights(fm, [w * 0.5 for w in training.get_weights(fm)])
    y2 = fm.predict(x)
    assert not np.array_equal(y2, y1)
    np.testing.assert_array_equal(y2, direct())
