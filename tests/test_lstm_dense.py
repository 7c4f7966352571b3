"""The fused LSTM -> Dense pass (``fastseq.ops.lstm_dense``, used by ``Model`` for tagger
heads) and the thread split of the CPU backend, against the float64 reference."""
import numba
import numpy as np
import pytest

import fastseq
from fastseq import config
from fastseq.ops import lstm_dense
from reference import ref_dense, ref_lstm

# ``cpu_path`` (tests/conftest.py) forces each CPU path (fused / per-step GEMM, one
# chunk / one step per chunk with U in 4-column blocks), rows split across threads.


def _weights(rng, D, H, K, dtype):
    return [(rng.standard_normal(s) * 0.5).astype(dtype)
            for s in ((D, 4 * H), (H, 4 * H), (4 * H,), (H, K), (K,))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["softmax", "log_softmax", None, "relu"])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_lstm_dense_matches_reference(cpu_path, dtype, activation, go_backwards, rng,
                                      assert_close):
    B, T, D, H, K = 5, 9, 4, 7, 6
    x = rng.standard_normal((B, T, D)).astype(dtype)
    W, U, b, Wd, bd = _weights(rng, D, H, K, dtype)
    mask = rng.random((B, T)) > 0.3
    mask[0, :] = False          # a fully masked row
    mask[1, :4] = False         # left padding
    y = lstm_dense(x, W, U, b, Wd, bd, activation, mask=mask, go_backwards=go_backwards)
    hs = ref_lstm(x, W, U, b, mask=mask, return_sequences=True, go_backwards=go_backwards)
    expected = ref_dense(hs, Wd, bd, activation)
    assert y.dtype == dtype and y.shape == (B, T, K)
    atol, rtol = config.tolerance(dtype)
    assert_close(y, expected, atol, rtol, what=f"lstm_dense[{cpu_path}]")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B", [1, 2, 3, 7])
def test_thread_split_gives_reference(threads, B, rng, assert_close, monkeypatch):
    """Rows are split into one block per thread (uneven blocks for odd B)."""
    # blocks of >= 2 rows take the BLAS GEMM path (H = 5: 2 * 5 * 20 multiply-adds)
    monkeypatch.setattr(config, "GEMM_MIN_STEP_MACS", 2 * 5 * 20)
    monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1)  # split even tiny problems
    old = fastseq.get_num_threads()
    fastseq.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        T, D, H, K = 6, 3, 5, 4
        x = rng.standard_normal((B, T, D)).astype(np.float32)
        W, U, b, Wd, bd = _weights(rng, D, H, K, np.float32)
        y = lstm_dense(x, W, U, b, Wd, bd, "softmax")
        seq = fastseq.lstm(x, W, U, b, return_sequences=True)
        hs = ref_lstm(x, W, U, b, return_sequences=True)
    finally:
        fastseq.set_num_threads(old)
    atol, rtol = config.tolerance(np.float32)
    assert_close(seq, hs, atol, rtol, what="lstm")
    assert_close(y, ref_dense(hs, Wd, bd, "softmax"), atol, rtol, what="lstm_dense")


def test_lstm_dense_bad_dense_kernel():
    x = np.zeros((2, 3, 4), np.float32)
    W, U, b = np.zeros((4, 20), np.float32), np.zeros((5, 20), np.float32), None
    with pytest.raises(ValueError, match=r"`dense_kernel` must have shape .*\(5, \?\).*got \(6, 3\)"):
        lstm_dense(x, W, U, b, np.zeros((6, 3), np.float32), None, "softmax")
    with pytest.raises(ValueError, match=r"`dense_bias` .*got \(4,\)"):
        lstm_dense(x, W, U, b, np.zeros((5, 3), np.float32), np.zeros(4), "softmax")
    with pytest.raises(ValueError, match="unknown `dense_activation` 'gelu'"):
        lstm_dense(x, W, U, b, np.zeros((5, 3), np.float32), None, "gelu")


def test_set_num_threads_checks_its_argument():
    with pytest.raises(TypeError, match="`n` must be an int"):
        fastseq.set_num_threads(1.5)
    with pytest.raises(ValueError, match=r"`n` must be in \[1, "):
        fastseq.set_num_threads(0)
