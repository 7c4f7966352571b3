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
    (5, 37, 467),      # a leftover row through every row tile (1 x 16, 8, 4, 1) and
                       # the scalar columns
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


@njit(cache=True)
def _gemm_k(A, n, ak, K, B, C):
    tile_cpu.gemm_rows_acc_k(A, n, ak, K, B, C)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,ak,K,N", [(1, 64, 64, 256), (3, 0, 64, 256), (5, 7, 30, 467)])
def test_gemm_rows_acc_k_takes_a_range_of_k(M, ak, K, N, dtype):
    """C[:n] += A[:n, ak:ak+K] @ B[:K] (the split kernel's halves of h U)."""
    rng = np.random.default_rng(M + ak + K + N)
    A = rng.standard_normal((M, ak + K + 3)).astype(dtype)
    B = rng.standard_normal((K + 2, N)).astype(dtype)
    C = rng.standard_normal((M, N)).astype(dtype)
    want = C.astype(np.float64) + A[:, ak:ak + K].astype(np.float64) @ B[:K]
    _gemm_k(A, M, ak, K, B, C)
    atol, rtol = tolerance(dtype)
    np.testing.assert_allclose(C, want, rtol=rtol, atol=atol * K)


def test_tiles_refuse_non_contiguous_arrays():
    A = np.ones((8, 8), np.float32)
    with pytest.raises(Exception, match="C-contiguous"):
        _gemm(A[:, ::2], 4, A, A.copy())


def test_narrow_vectors_in_a_portable_build(tmp_path):
    """With NUMBA_CPU_NAME=generic (no AVX) the tiles use 16-byte vectors: other tile
    widths and leftovers, still exact to the float64 product (in a subprocess, with
    its own compile cache)."""
    import os
    import subprocess
    import sys
    script = (
        "import numpy as np\n"
        "from numba import njit\n"
        "from fastseq.kernels import tile_cpu\n"
        "assert tile_cpu.VECTOR_BYTES == 16, tile_cpu.VECTOR_BYTES\n"
        "g = njit(lambda A, n, B, C: tile_cpu.gemm_rows_acc(A, n, B, C))\n"
        "rng = np.random.default_rng(0)\n"
        "for dt in (np.float32, np.float64):\n"
        "    for M, K, N in ((7, 13, 70), (16, 64, 128), (3, 5, 3)):\n"
        "        A = rng.standard_normal((M, K)).astype(dt)\n"
        "        B = rng.standard_normal((K, N)).astype(dt)\n"
        "        C = rng.standard_normal((M, N)).astype(dt)\n"
        "        want = C.astype(np.float64) + A.astype(np.float64) @ B\n"
        "        g(A, M, B, C)\n"
        "        err = np.abs(C - want).max() / max(1.0, np.abs(want).max())\n"
        "        assert err < (1e-5 if dt == np.float32 else 1e-12), (dt, M, K, N, err)\n"
        "print('ok')\n")
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("NUMBA_CPU_FEATURES", None)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
