"""Single-thread rates of the per-step recurrent product h U ([M, H] @ [H, 4H], float32)
for the block sizes the LSTM configs produce: OpenBLAS through numpy, PyTorch's
``torch.mm`` when installed, and fastseq's fused Numba recurrence (product + gates, one
call over T steps, counted as the product's flops).

    python bench/gemm_rates.py
"""
import time

import numpy as np
from threadpoolctl import threadpool_limits

from fastseq import _cpu
from fastseq.kernels import lstm_cpu

SHAPES = [(16, 128), (32, 128), (16, 256), (32, 256), (64, 512)]


def rate(fn, flops, min_time=0.3):
    fn()
    n, t = 0, 0.0
    best = []
    while t < min_time or n < 5:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best.append(dt)
        t += dt
        n += 1
    return flops / float(np.median(best)) / 1e9


def main():
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print("M x H      numpy/OpenBLAS  torch.mm  fastseq fused   (GFLOP/s, 1 thread)")
    with threadpool_limits(1):
        for M, H in SHAPES:
            G = 4 * H
            h = rng.random((M, H), dtype=np.float32)
            U = (rng.random((H, G), dtype=np.float32) - 0.5) * 0.1
            z = np.empty((M, G), np.float32)
            flops = 2.0 * M * H * G
            r_np = rate(lambda: np.matmul(h, U, out=z), flops)
            r_t = float("nan")
            if torch is not None:
                ht, Ut, zt = torch.from_numpy(h), torch.from_numpy(U), torch.from_numpy(z)
                r_t = rate(lambda: torch.mm(ht, Ut, out=zt), flops)
            T = 20
            xw = np.zeros((M, T, G), np.float32)
            b = np.zeros(G, np.float32)
            hs, cs = np.zeros((M, H), np.float32), np.zeros((M, H), np.float32)
            seen, mask = np.zeros(M, np.uint8), np.ones((M, T), np.uint8)
            out = np.empty((1, 1, 1), np.float32)
            Ub = _cpu.block_columns(U)
            src = xw.reshape(M * T, G)
            idx = np.arange(M * T, dtype=np.int64).reshape(M, T)
            r_f = rate(lambda: lstm_cpu.lstm_chunk_fused(src, idx, Ub, b, hs, cs, seen,
                                                         mask, z, out, False, False, 1,
                                                         2, False),
                       flops * T)
            print(f"{M:3d} x {H:4d}  {r_np:14.1f}  {r_t:8.1f}  {r_f:13.1f}")


if __name__ == "__main__":
    main()
