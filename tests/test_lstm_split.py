"""The small-batch LSTM split by hidden units across two threads
(``fastseq/kernels/lstm_split_cpu.py``, atomics in ``kernels/sync_cpu.py``).

The ``split`` paths of the ``cpu_path`` fixture run every LSTM test through it; here:
that the driver really takes it, that its claim protocol gives the right answer
whichever part arrives first or alone (no deadlock), and the atomics themselves.
"""
import threading

import numba
import numpy as np
import pytest

import fastseq
from fastseq import _cpu, config
from fastseq.kernels import lstm_split_cpu, sync_cpu
from fastseq.ops import lstm_dense
from reference import ref_dense, ref_lstm

needs_two_threads = pytest.mark.skipif(
    numba.config.NUMBA_NUM_THREADS < 2,
    reason="the unit split runs only when two threads are allowed (NUMBA_NUM_THREADS=1)")


def _data(rng, B, T, D, H, K, dtype):
    x = rng.standard_normal((B, T, D)).astype(dtype)
    ws = [(rng.standard_normal(s) * 0.5).astype(dtype)
          for s in ((D, 4 * H), (H, 4 * H), (4 * H,), (H, K), (K,))]
    return (x, *ws)


@pytest.fixture
def counted(monkeypatch):
    """Count calls of the two-thread split kernel made by the CPU driver."""
    calls = []
    real = lstm_split_cpu.lstm_units_split_2

    def wrapper(*args):
        ran = real(*args)
        calls.append(ran)
        return ran

    monkeypatch.setattr(lstm_split_cpu, "lstm_units_split_2", wrapper)
    return calls


@needs_two_threads
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,H", [(1, 128), (3, 33), (4, 64)])
def test_driver_takes_split_path(rng, assert_close, counted, monkeypatch, dtype, B, H):
    """A small batch runs split and matches the float64 reference, with a mask, the
    Dense epilogue, initial states and several chunks."""
    monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1)
    monkeypatch.setattr(config, "SPLIT_UNITS_MIN_STEP_MACS", 0)
    monkeypatch.setattr(config, "CHUNK_BYTES", 4 * H * 4 * 16)   # 16 steps per chunk
    T, D, K = 40, 16, 7
    x, W, U, b, Wd, bd = _data(rng, B, T, D, H, K, dtype)
    mask = rng.random((B, T)) > 0.25
    mask[0, :5] = False
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
    assert all(r in (1, 2) for r in counted)


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


def _job(rng, B=2, T=13, D=5, H=9, K=4, dtype=np.float32, Tc=4):
    """Arguments of lstm_units_split for one job (epilogue mode), and its reference."""
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
        scratch=np.empty((3, lstm_split_cpu.scratch_size(B, Tc, D, H)), dtype),
        seqbuf=np.empty((B, Tc, H), dtype), out=out, Wd=Wd, bd=bd,
        ybuf=np.empty((2, B * Tc, K), dtype))
    return state, want


def _part(p, st, spins):
    return lstm_split_cpu.lstm_units_split(
        p, st["sync"], spins, st["x"], st["W"], st["U"], st["b"], st["hbuf"], st["c"],
        st["seen"], st["mask"], st["Tc"], st["scratch"], st["seqbuf"], st["out"],
        lstm_split_cpu.OUT_EPILOGUE, st["Wd"], st["bd"], 100, st["ybuf"], False, 1, 2)


@pytest.mark.parametrize("first", [0, 1])
def test_part_alone_then_late_part_does_nothing(rng, assert_close, first):
    """A part that finds no partner runs the whole job alone (no barrier, no wait);
    the other part, arriving later, returns 0 and writes nothing."""
    st, want = _job(rng)
    assert _part(first, st, 0) == 1
    atol, rtol = config.tolerance(np.float32)
    assert_close(st["out"], want, atol, rtol, what=f"part {first} alone")
    before = st["out"].copy(), st["hbuf"].copy(), st["c"].copy()
    assert _part(1 - first, st, 0) == 0
    for a, b in zip(before, (st["out"], st["hbuf"], st["c"])):
        np.testing.assert_array_equal(a, b)


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


def test_racing_claims_always_correct(rng, assert_close):
    """No wait at all: which part runs (alone or together) depends on timing, and every
    outcome gives the reference answer."""
    atol, rtol = config.tolerance(np.float32)
    outcomes = set()
    for _ in range(30):
        st, want = _job(rng, T=9, Tc=3)
        ran = lstm_split_cpu.lstm_units_split_2(
            st["sync"], 0, st["x"], st["W"], st["U"], st["b"], st["hbuf"], st["c"],
            st["seen"], st["mask"], st["Tc"], st["scratch"], st["seqbuf"], st["out"],
            lstm_split_cpu.OUT_EPILOGUE, st["Wd"], st["bd"], 100, st["ybuf"], False, 1,
            2)
        outcomes.add(int(ran))
        assert_close(st["out"], want, atol, rtol, what="racing claim")
    assert outcomes <= {1, 2}, outcomes


def test_atomics():
    """The intrinsics read and write the slot they are given; CAS succeeds only on the
    expected value; the barrier passes once both parts have published an epoch."""
    @numba.njit
    def run(a):
        sync_cpu.atomic_store(a, 3, 7)
        v = sync_cpu.atomic_load(a, 3)
        ok1 = sync_cpu.atomic_cas(a, 3, 7, 9)
        ok2 = sync_cpu.atomic_cas(a, 3, 7, 11)
        sync_cpu.cpu_pause()
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
