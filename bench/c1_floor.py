"""A floor for C1 (B=1, T=50, D=64, H=128, K=32) on two threads split by hidden units,
from the pieces of work each thread cannot avoid, each timed alone on this machine with
fastseq's own kernels (tile_cpu, the gate math of lstm_cpu, dense_cpu):

1. its half of the input projection, x [T, D] @ W[:, half] [D, 2H] (compute-bound);
2. T steps of its half of h U: one row times its half of U [H, 2H] (128 KB at C1,
   read from L2 at every step: bandwidth-bound), timed with the other thread doing
   the same at once;
3. T steps of the gates of its H / 2 units;
4. its half of the Dense rows, [T / 2, H] @ [H, K], and their softmax.

floor = 1 + 2 + 3 + 4 (no exchange of h between the threads, no wait, no Python).
Compared with fastseq's and ONNX Runtime's C1 calls, back to back, in the same run.

    python bench/c1_floor.py
"""
import argparse
import threading
import time

import numpy as np
from numba import njit

from fastseq import _threads, benchmark
from fastseq.kernels.activations import ACT_SIGMOID, ACT_TANH
from fastseq.kernels.dense_cpu import bias_act_rows
from fastseq.kernels.lstm_cpu import _cell_row
from fastseq.kernels.tile_cpu import gemm_rows_acc, gemm_rows_acc_k

T, D, H, K = 50, 64, 128, 32
HH = H // 2
G = 4 * HH


@njit(nogil=True, fastmath=True, cache=True)
def _projection(x, Wp, xw, reps):
    for _ in range(reps):
        xw[:] = 0.0
        gemm_rows_acc(x, x.shape[0], Wp, xw)
    return xw[0, 0]


@njit(nogil=True, fastmath=True, cache=True)
def _products(h, Up, z, steps):
    for _ in range(steps):
        z[:] = 0.0
        gemm_rows_acc_k(h, 1, 0, h.shape[1], Up, z)
        h[0, 0] = z[0, 5] * np.float32(1e-30)     # the next step depends on this one
    return z[0, 0]


@njit(nogil=True, fastmath=True, cache=True)
def _gates(z, h, c, steps):
    for _ in range(steps):
        _cell_row(z[0], h[0], c[0], h.shape[1], ACT_TANH, ACT_SIGMOID, h[0], False)
        z[0, 0] = h[0, 1]
    return h[0, 0]


@njit(nogil=True, fastmath=True, cache=True)
def _dense(s, Wd, bd, y, reps, code):
    for _ in range(reps):
        y[:] = 0.0
        gemm_rows_acc(s, s.shape[0], Wd, y)
        bias_act_rows(y, bd, code)
    return y[0, 0]


def _best(fn, *args, rounds=7):
    best = np.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=400)
    args = ap.parse_args()
    from fastseq.kernels.dense_cpu import DENSE_SOFTMAX
    rng = np.random.default_rng(0)
    f32 = np.float32
    x = rng.standard_normal((T, D)).astype(f32)
    Wp = (rng.standard_normal((D, G)) * 0.1).astype(f32)
    xw = np.zeros((T, G), f32)
    n = args.reps
    _projection(x, Wp, xw, 1)
    proj = _best(_projection, x, Wp, xw, n) / n

    ups = [(rng.standard_normal((1, H)).astype(f32),
            (rng.standard_normal((H, G)) * 0.01).astype(f32), np.zeros((1, G), f32))
           for _ in range(2)]
    _products(*ups[0], 1)
    steps = n * T
    times = [0.0, 0.0]

    def one(i):
        times[i] = _best(_products, *ups[i], steps, rounds=3)
    th = threading.Thread(target=one, args=(1,))
    th.start()
    one(0)
    th.join()
    step = max(times) / steps

    z = rng.standard_normal((1, G)).astype(f32)
    hh, cc = np.zeros((1, HH), f32), np.zeros((1, HH), f32)
    _gates(z, hh, cc, 1)
    gates = _best(_gates, z, hh, cc, steps) / steps

    s = rng.standard_normal((T // 2, H)).astype(f32)
    Wd = (rng.standard_normal((H, K)) * 0.1).astype(f32)
    bd = np.zeros(K, f32)
    y = np.zeros((T // 2, K), f32)
    _dense(s, Wd, bd, y, 1, DENSE_SOFTMAX)
    dense = _best(_dense, s, Wd, bd, y, n, DENSE_SOFTMAX) / n

    floor = proj + T * (step + gates) + dense
    wl = benchmark.make_workload("C1")
    calls = {}
    for p in ("fastseq", "onnxruntime"):
        if benchmark.provider_missing(p):
            continue
        run = benchmark.make_runner(p, wl)
        for _ in range(200):
            run()
        _threads.wait_for_workers()
        calls[p] = _best(lambda: [run() for _ in range(200)], rounds=9) / 200
    us = 1e6
    print(f"C1 floor per thread: projection {proj * us:.1f} us + {T} x (h U half "
          f"{step * us:.3f} + gates {gates * us:.3f}) us + Dense half {dense * us:.1f} us "
          f"= {floor * us:.1f} us")
    for p, t in calls.items():
        print(f"{p}: {t * us:.1f} us a call back to back (best of 9 x 200); "
              f"floor / {p} = {floor / t:.2f}")
    if "onnxruntime" in calls:
        print(f"C1 target 0.7 x onnxruntime = {0.7 * calls['onnxruntime'] * us:.1f} us")


if __name__ == "__main__":
    main()
