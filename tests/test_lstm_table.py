"""One direction of an Embedding-fed LSTM with its Dense half, in one call
(``fastseq/kernels/lstm_table_cpu.py``), against the float64 reference; and the
same job handed to the worker thread through its mailbox (``kernels/worker_cpu.py``)."""
import time

import numba
import numpy as np
import pytest

from fastseq import _cpu, _threads, config
from fastseq.kernels import lstm_table_cpu, worker_cpu
from reference import ref_dense, ref_lstm


@pytest.fixture(autouse=True)
def workers_rest():
    """A worker left spinning would take a core from the next test."""
    yield
    for w in list(_threads._workers.values()):
        if w is not None:
            w.rest()


def _ids(rng, B, T, V):
    ids = rng.integers(1, V, size=(B, T))
    ids[0, T // 2:] = 0          # right padding
    ids[1, :3] = 0               # left padding
    ids[2, :] = 0                # all padding
    return ids


def _job(rng, B=6, T=11, V=13, E=3, H=5, K=4, dtype=np.float32, reverse=False,
         flip=False, Tc=3, zero_output=False, act=1, rec=2, ids=None, state=False,
         skip_fresh=True):
    """A job for lstm_table_dense and what it must write (float64 reference); with
    ``state``, also the reference's final (h, c)."""
    emb = rng.standard_normal((V, E))
    W = rng.standard_normal((E, 4 * H)) * 0.5
    U = rng.standard_normal((H, 4 * H)) * 0.5
    b = rng.standard_normal(4 * H) * 0.5
    Wd = rng.standard_normal((H, K)) * 0.5
    ids = _ids(rng, B, T, V) if ids is None else ids
    mask = ids != 0
    names = {1: "tanh", 2: "sigmoid", 3: "hard_sigmoid"}
    seq, h, c = ref_lstm(emb[ids], W, U, b, mask=mask, return_sequences=True,
                         return_state=True, go_backwards=reverse,
                         zero_output_for_mask=zero_output, activation=names[act],
                         recurrent_activation=names[rec])
    want = ref_dense(seq, Wd)            # processing order
    if flip:
        want = want[:, ::-1]
    cast = [a.astype(dtype) for a in (emb @ W, U, b, Wd)]
    table, Uc, bc, Wdc = (np.ascontiguousarray(a) for a in cast)
    Ub = _cpu.block_columns(Uc)
    WdX = _cpu.dense_pack(Wdc)
    G = 4 * H
    args = (table, ids.astype(np.int64), mask.view(np.uint8), Ub, bc, WdX,
            np.zeros((B, H), dtype), np.zeros((B, H), dtype), np.zeros(B, np.uint8),
            reverse, flip, zero_output, act, rec, skip_fresh, np.empty(B * Tc, np.int64),
            np.empty(B * Tc, np.uint8), np.empty((B, G), dtype),
            np.empty(B * Tc * H, dtype), np.full(B * Tc * K, np.nan, dtype),
            np.full((B, T, K), np.nan, dtype))
    if state:
        return args, want, (h, c)
    return args, want


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse,flip", [(False, False), (True, True), (True, False),
                                          (False, True)])
@pytest.mark.parametrize("Tc", [1, 3, 11, 16])
def test_matches_reference(rng, assert_close, dtype, reverse, flip, Tc):
    """Every chunk size (one step, several chunks with a short last one, one chunk),
    both time directions and output orders, masked rows (padding on either side, a
    row of padding only), B = 6 (a group of four rows and two single rows)."""
    args, want = _job(rng, dtype=dtype, reverse=reverse, flip=flip, Tc=Tc)
    lstm_table_cpu.lstm_table_dense(*args)
    atol, rtol = config.tolerance(dtype)
    assert_close(args[-1], want, atol, rtol, what="lstm_table_dense")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K", [1, 16, 17, 33])
def test_dense_widths(rng, assert_close, dtype, K):
    """Dense widths around the vector width: the Dense's whole vectors of columns run
    in the register tiles (4 x 2 and 4 x 1 tiles, one-row tiles for the rows past the
    last group of four: B = 9, chunks of 3 steps), the rest as dot products."""
    args, want = _job(rng, B=9, T=7, H=8, K=K, dtype=dtype, reverse=True, flip=True)
    lstm_table_cpu.lstm_table_dense(*args)
    atol, rtol = config.tolerance(dtype)
    assert_close(args[-1], want, atol, rtol, what=f"lstm_table_dense, K = {K}")


@pytest.mark.parametrize("zero_output,act,rec", [(True, 1, 2), (False, 1, 3),
                                                 (True, 2, 3)])
def test_options(rng, assert_close, zero_output, act, rec):
    args, want = _job(rng, B=9, T=7, H=8, reverse=True, flip=True,
                      zero_output=zero_output, act=act, rec=rec)
    lstm_table_cpu.lstm_table_dense(*args)
    atol, rtol = config.tolerance(np.float32)
    assert_close(args[-1], want, atol, rtol, what="lstm_table_dense options")


def test_final_state(rng, assert_close):
    """h and c come out as the reference's final state (the all-padding row stays at
    zero and is not marked seen)."""
    for reverse in (False, True):
        args, _, (h, c) = _job(rng, dtype=np.float64, reverse=reverse, state=True)
        lstm_table_cpu.lstm_table_dense(*args)
        atol, rtol = config.tolerance(np.float64)
        assert_close(args[6], h, atol, rtol, what="final h")
        assert_close(args[7], c, atol, rtol, what="final c")
        assert list(args[8]) == [1, 1, 0, 1, 1, 1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_skip_fresh_changes_nothing(rng, dtype, reverse):
    """Skipping h U at each row's first unmasked step (h still zero) gives the same
    bits as computing it: rows start at different steps (padding on either side, a
    row of padding only), B = 9 (two groups of four rows and one single row)."""
    ids = _ids(rng, 9, 11, 13)
    ids[4, :5] = 0      # a group whose rows start at different steps
    ids[8, :7] = 0      # the single row starts late
    got = []
    for skip in (True, False):
        args, want = _job(np.random.default_rng(5), B=9, dtype=dtype, reverse=reverse,
                          flip=reverse, ids=ids, skip_fresh=skip)
        lstm_table_cpu.lstm_table_dense(*args)
        got.append(args[-1])
    np.testing.assert_array_equal(got[0], got[1])


def test_non_finite_u_is_not_skipped(rng):
    """With an inf in U, h U at the first step is NaN (0 * inf), as Keras computes it:
    the table path runs without the skip (``u_finite`` False), and every output is
    NaN like the reference's."""
    args, _ = _job(rng, B=4, T=5, ids=np.ones((4, 5), np.int64), skip_fresh=False)
    Ub = args[3]
    Ub[0, 0, 0] = np.inf      # U[0, 0]: the input gate of unit 0, from h[0]
    lstm_table_cpu.lstm_table_dense(*args)
    assert np.isnan(args[-1]).all()


needs_two_threads = pytest.mark.skipif(
    numba.config.NUMBA_NUM_THREADS < 2,
    reason="the worker thread is used only when two threads are allowed "
           "(NUMBA_NUM_THREADS=1)")


@needs_two_threads
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_worker_runs_posted_table_jobs(rng, assert_close, monkeypatch, dtype):
    """Jobs posted by address: the spinning worker takes each (settle_job cannot cancel
    it) and its output matches the reference once settle_job returns."""
    monkeypatch.setattr(config, "SPLIT_WORKER_IDLE_TICKS", 1 << 62)
    w = _threads.worker(dtype)
    w.wake()
    deadline = time.monotonic() + 120
    while not w.spinning():
        w.wake()
        assert time.monotonic() < deadline, "the worker never started spinning"
        time.sleep(0.001)
    atol, rtol = config.tolerance(dtype)
    with w.lock:
        for i in range(4):
            args, want = _job(rng, dtype=dtype, reverse=bool(i % 2), flip=bool(i % 2))
            w.seq += 1
            worker_cpu.post_table_job(w.mb, w.seq, *args)
            deadline = time.monotonic() + 10
            while w.mb[worker_cpu.MB_TAKEN] < w.seq:
                assert time.monotonic() < deadline, "the worker never took the job"
                time.sleep(0.0001)
            assert worker_cpu.settle_job(w.mb, w.seq, True)  # taken: not cancelled
            assert w.mb[worker_cpu.MB_DONE] == w.seq
            assert_close(args[-1], want, atol, rtol, what="table job run by the worker")


def test_unserved_table_job_is_cancelled(rng):
    """Posted to a mailbox nobody serves: settle_job cancels it (counted as done), so
    the caller runs it itself and nobody else can pick it up."""
    mb = np.zeros(worker_cpu.MB_SIZE, np.int64)
    args, _ = _job(rng)
    worker_cpu.post_table_job(mb, 1, *args)
    assert not worker_cpu.settle_job(mb, 1, True)    # returns at once
    assert mb[worker_cpu.MB_TAKEN] == 1 and mb[worker_cpu.MB_DONE] == 1
    assert np.isnan(args[-1]).all()     # nobody ran it


@needs_two_threads
def test_pair_with_dozing_and_busy_worker(rng, assert_close, monkeypatch):
    """table_dense_pair gives the reference answer whether the worker spins, dozes (the
    caller pokes it and runs the job itself if it is not taken in time), or is held
    by another caller (both directions on this thread)."""
    monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1)
    ids = _ids(rng, 5, 9, 13)
    (a0, want0), (a1, want1) = (_job(rng, B=5, T=9, H=6, ids=ids),
                                _job(rng, B=5, T=9, H=6, ids=ids, reverse=True, flip=True))
    parts = [(a[0], a[3], a[4], a[5], a[9], a[10], a[11], a[12], a[13], a[14])
             for a in (a0, a1)]
    m8 = a0[2]
    bd = np.zeros(a0[-1].shape[2], np.float32)
    want = want0 + want1
    w = _threads.worker(np.float32)
    atol, rtol = config.tolerance(np.float32)
    for state in ("first", "spinning", "dozing", "held", "one thread"):
        if state == "spinning":
            w.wake()
        elif state == "dozing":
            w.rest()
        if state == "held":
            with w.lock:
                got = _cpu.table_dense_pair(ids, m8, parts, bd, "linear")
        elif state == "one thread":
            monkeypatch.setattr(_threads, "get_num_threads", lambda: 1)
            got = _cpu.table_dense_pair(ids, m8, parts, bd, "linear")
        else:
            got = _cpu.table_dense_pair(ids, m8, parts, bd, "linear")
        assert_close(got, want, atol, rtol, what=f"worker {state}")
    # no mask (m8 None): every step computed
    full = np.where(ids == 0, 1, ids)
    (b0, v0), (b1, v1) = (_job(rng, B=5, T=9, H=6, ids=full),
                          _job(rng, B=5, T=9, H=6, ids=full, reverse=True, flip=True))
    parts = [(a[0], a[3], a[4], a[5], a[9], a[10], a[11], a[12], a[13], a[14])
             for a in (b0, b1)]
    got = _cpu.table_dense_pair(full, None, parts, bd, "linear")
    assert_close(got, v0 + v1, atol, rtol, what="no mask")
