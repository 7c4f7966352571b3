"""The register-tiled microkernels (fastseq/kernels/tile_cpu.py) against a float64
NumPy product, on shapes that exercise every tile and the leftovers."""
import numpy as np
import pytest
from numba import njit

from fastseq.config import tolerance
from fastseq.kernels import tile_cpu


@njit(cache=True)
def _gemm(A, n, B, C):
    tile_cpu.gemm_rows_acc(A, n, B, C)


SHAPES = [
    (16, 256, 1024),   # whole 4 x 4 tiles (the C2 per-thread product)
    (7, 13, 70),       # leftover rows, a 4 x 1 tile, leftover columns
    (4, 1, 64),        # K = 1
    (3, 5, 17),        # rows below one group, columns below and past one vector
    (1, 128, 512),     # a single row (the B = 1 path)
    (5, 0, 40),        # K = 0: C unchanged
    (9, 33, 5),        # N below one vector: scalar columns only
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_gemm_rows_acc_matches_float64(M, K, N, dtype):
    rng = np.random.default_rng(M * 1000 + K * 10 + N)
    A = rng.standard_normal((M, K)).astype(dtype)
    B = rng.standard_normal((K, N)).astype(dtype)
    C = rng.standard_normal((M, N)).astype(dtype)
    for n in sorted({M, max(0, M - 1), M // 2}):
        want = C.astype(np.float64)
        want[:n] += A[:n].astype(np.float64) @ B.astype(np.float64)
        got = C.copy()
        _gemm(A, n, B, got)
        atol, rtol = tolerance(dtype)
        # sums of K products: the error grows with K (and the size of the terms)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1, K))
        assert np.array_equal(got[n:], C[n:])   # rows past n untouched


def test_tiles_refuse_non_contiguous_arrays():
    A = np.ones((8, 8), np.float32)
    with pytest.raises(Exception, match="C-contiguous"):
        _gemm(A[:, ::2], 4, A, A.copy())
