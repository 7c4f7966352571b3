"""Memory bounds of the CPU backend (NumPy reports its allocations to tracemalloc).

* ``return_sequences=False`` runs in memory that does not grow with T (the input
  projection is held one time chunk at a time, never as [B, T, 4H]).
* The tagger pass (LSTM -> Dense) at the C3 benchmark size allocates at most the output
  plus 32 MiB (issue target), i.e. never the [B, T, 4H] projection (105 MB) nor the
  [B, T, H] LSTM sequence (26 MB).
"""
import tracemalloc

import numpy as np

import fastseq
from fastseq.ops import lstm_dense

MiB = 1 << 20


def _peak_growth(fn):
    """Peak bytes allocated while ``fn`` runs, above what was allocated before it."""
    fn()  # compile / warm outside the measurement
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - base


def _weights(rng, D, H):
    W = (rng.standard_normal((D, 4 * H)) * 0.1).astype(np.float32)
    U = (rng.standard_normal((H, 4 * H)) * 0.1).astype(np.float32)
    return W, U, np.zeros(4 * H, np.float32)


def test_last_output_memory_does_not_grow_with_T():
    rng = np.random.default_rng(0)
    D, H = 16, 32
    W, U, b = _weights(rng, D, H)
    peaks = {}
    for T in (2_000, 40_000):
        x = rng.standard_normal((1, T, D)).astype(np.float32)
        peaks[T] = _peak_growth(lambda: fastseq.lstm(x, W, U, b))
    # 20x more steps, the same working set (chunk buffers of about CHUNK_BYTES)
    assert peaks[40_000] <= peaks[2_000] + 256 * 1024, peaks
    assert peaks[40_000] < 4 * MiB, peaks


def test_tagger_pass_at_c3_size_stays_within_output_plus_32_mib():
    rng = np.random.default_rng(0)
    B, T, D, H, K = 128, 100, 256, 512, 50
    W, U, b = _weights(rng, D, H)
    Wd = (rng.standard_normal((H, K)) * 0.1).astype(np.float32)
    bd = np.zeros(K, np.float32)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    out_bytes = B * T * K * 4
    growth = _peak_growth(lambda: lstm_dense(x, W, U, b, Wd, bd, "softmax"))
    assert growth <= out_bytes + 32 * MiB, (growth / MiB, out_bytes / MiB)
