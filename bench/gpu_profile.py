"""Where the time of a CUDA ``fastseq.lstm`` / ``fastseq.dense`` call goes (one GPU run).

Measures, each in its own try/except:

1. grid-wide barrier cost: Numba's ``cuda.cg.this_grid().sync()`` against an atomic
   counter barrier, n = 1 and n = N barriers per launch (us per barrier);
2. host cost of one Numba kernel launch with 1 and with 17 arguments (launches queued
   back to back, one synchronisation);
3. the persistent LSTM kernel alone (arguments prepared once) for T = 1 and T = 100,
   against the whole ``fastseq.lstm`` call, and PyTorch cuDNN for reference;
4. cProfile of ``fastseq.lstm`` and ``fastseq.dense`` calls on device arrays (top
   functions by own time), and CuPy's matmul for the input projection.

``--dry-run``: tiny shapes for the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1).
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import time
import traceback

import numpy as np
from numba import cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@cuda.jit
def k_gsync(n, out):
    g = cuda.cg.this_grid()
    for i in range(n):
        g.sync()
    if cuda.grid(1) == 0:
        out[0] = n

@cuda.jit
def k_abar(n, base, ctr, out):
    nb = cuda.gridDim.x
    for i in range(n):
        cuda.syncthreads()
        if cuda.threadIdx.x == 0:
            cuda.threadfence()
            cuda.atomic.add(ctr, 0, 1)
            target = base + (i + 1) * nb
            while cuda.atomic.add(ctr, 0, 0) < target:
                pass
            cuda.threadfence()
        cuda.syncthreads()
    if cuda.grid(1) == 0:
        out[0] = n


def median_time(fn, sync, reps=15, warm=2):
    for _ in range(warm):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def profile(fn, sync, calls, keys, rows):
    """cProfile of ``calls`` synchronised calls of fn(): the top ``rows`` functions by
    each of ``keys``."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
        sync()
    pr.disable()
    for key in keys:
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(rows)
        print("\n".join(ln[:150] for ln in s.getvalue().splitlines()[:rows + 18]))


def section(name, fn):
    print(f"\n## {name}", flush=True)
    t0 = time.perf_counter()
    try:
        fn()
    except Exception:
        traceback.print_exc(limit=6)
    print(f"({time.perf_counter() - t0:.1f} s)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    dry = args.dry_run
    import fastseq
    from fastseq import _cuda
    sync = cuda.synchronize
    try:
        import cupy
        if dry:
            cupy = None
    except Exception:
        cupy = None
    try:
        import torch
        tdev = "cuda" if torch.cuda.is_available() else None
    except Exception:
        torch, tdev = None, None
    dev = cuda.get_current_device()
    sms = 2 if dry else int(dev.MULTIPROCESSOR_COUNT)
    print(f"device {getattr(dev, 'name', '?')}, SMs {sms}, cupy {cupy is not None}, "
          f"torch {tdev}")
    N = 5 if dry else 2000
    reps = 1 if dry else 15

    def barriers():
        out = cuda.device_array(1, np.int64)
        ctr = cuda.to_device(np.zeros(1, np.int64))
        for nblk in ([1, 2] if dry else [sms, 2 * sms]):
            tpb = 128
            t1 = median_time(lambda: k_gsync[nblk, tpb](1, out), sync, reps)
            tn = median_time(lambda: k_gsync[nblk, tpb](N + 1, out), sync, reps)
            print(f"grid.sync  {nblk} blocks x {tpb}: {1e6 * (tn - t1) / N:.3f} us per "
                  f"barrier (launch+1: {1e6 * t1:.1f} us)")
            state = {"base": 0}

            def run_abar(n):
                k_abar[nblk, tpb](n, state["base"], ctr, out)
                state["base"] += n * nblk

            t1 = median_time(lambda: run_abar(1), sync, reps)
            tn = median_time(lambda: run_abar(N + 1), sync, reps)
            print(f"atomic bar {nblk} blocks x {tpb}: {1e6 * (tn - t1) / N:.3f} us per "
                  f"barrier (launch+1: {1e6 * t1:.1f} us)")

    section("1. grid barrier", barriers)

    def launches():
        @cuda.jit
        def k1(a):
            pass

        @cuda.jit
        def k17(a, b, c, d, e, f, g, h, i1, i2, i3, i4, i5, i6, i7, i8, i9):
            pass

        a3 = cuda.device_array((2, 2, 2), np.float32)
        a2 = cuda.device_array((2, 2), np.float32)
        a1 = cuda.device_array(2, np.float32)
        m2 = cuda.device_array((2, 2), np.uint8)
        n = 20 if dry else 400
        for name, fn in (("1 arg", lambda: k1[1, 32](a1)),
                         ("17 args", lambda: k17[1, 32](a3, a2, a1, a3, a2, a2, a3, m2,
                                                        1, 2, 3, 4, 5, 6, 7, 8, 9))):
            fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            print(f"empty kernel, {name}: {1e6 * (time.perf_counter() - t0) / n:.1f} us "
                  "per launch (queued)")
        if not dry:
            ov = next(iter(k17.overloads.values()))
            a17 = [a3, a2, a1, a3, a2, a2, a3, m2, 1, 2, 3, 4, 5, 6, 7, 8, 9]
            ov.launch(a17, (1, 1, 1), (32, 1, 1), cuda.default_stream(), 0)
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                ov.launch(a17, (1, 1, 1), (32, 1, 1), cuda.default_stream(), 0)
            sync()
            print(f"empty kernel, 17 args, overload.launch directly: "
                  f"{1e6 * (time.perf_counter() - t0) / n:.1f} us per launch (queued)")
            t = median_time(lambda: cuda.get_current_device(), sync, reps)
            print(f"cuda.get_current_device: {1e6 * t:.1f} us")
            big = cuda.device_array(1 << 16, np.float32)
            t = median_time(lambda: big[:4096].reshape(64, 64), sync, reps)
            print(f"numba slice + reshape: {1e6 * t:.1f} us")
        d = cuda.device_array((64, 64), np.float32)
        t = median_time(lambda: cuda.device_array((64, 64), np.float32), sync, reps)
        print(f"cuda.device_array: {1e6 * t:.1f} us")
        z = np.zeros((64, 64), np.float32)
        t = median_time(lambda: d.copy_to_device(z), sync, reps)
        print(f"copy_to_device 16 KB: {1e6 * t:.1f} us")
        if cupy is not None:
            t = median_time(lambda: cupy.asarray(d), sync, reps)
            print(f"cupy.asarray(numba array): {1e6 * t:.1f} us")
            c = cupy.zeros((64, 64), np.float32)
            t = median_time(lambda: cuda.as_cuda_array(c), sync, reps)
            print(f"cuda.as_cuda_array(cupy array): {1e6 * t:.1f} us")

    section("2. launch and allocation costs", launches)

    configs = [(1, 4, 3), (4, 8, 3)] if dry else [(1, 256, 100), (8, 512, 100),
                                                   (256, 1024, 100)]

    def kernel_alone():
        for B, H, T in configs:
            rng = np.random.default_rng(B + H)
            D = H
            x = rng.standard_normal((B, T, D)).astype(np.float32)
            s = 1 / np.sqrt(H)
            W = rng.uniform(-s, s, (D, 4 * H)).astype(np.float32)
            U = rng.uniform(-s, s, (H, 4 * H)).astype(np.float32)
            b = rng.uniform(-s, s, 4 * H).astype(np.float32)
            for a in (W, U, b):
                a.setflags(write=False)
            xd = cupy.asarray(x) if cupy is not None else cuda.to_device(x)
            fs = lambda: fastseq.lstm(xd, W, U, b, return_sequences=True, device="cuda")
            t_call = median_time(fs, sync, reps)
            dt = np.dtype(np.float32)
            wts = _cuda.upload_lstm_weights(W, U, b)
            tpb = _cuda._pow2floor(_cuda.THREADS_PER_BLOCK)
            rbb = 4 if B >= _cuda.RBB_MIN_BATCH else 1
            kp, sig = _cuda._lstm_kernel(cuda, "persistent", dt, rbb)
            plan = _cuda._persistent_plan(cuda, kp, sig, B, H, 4, tpb, rbb)
            hb, ks, hp, hs, ptpb, smem, nblk = plan
            from fastseq.kernels.activations import ACTIVATION_CODES as AC
            flags = 1 << 3 | AC["tanh"] << 8 | AC["sigmoid"] << 16
            d11 = cuda.to_device(np.zeros((1, 1), np.float32))
            res = {}
            for TT in (1, T):
                G = cuda.device_array((B, TT, 4 * H), np.float32)
                G.copy_to_device(np.zeros((B, TT, 4 * H), np.float32))
                st = cuda.to_device(np.zeros((4, B, H), np.float32))
                out = cuda.device_array((B, TT, H), np.float32)
                m = cuda.to_device(np.ones((1, 1), np.uint8))

                def launch():
                    kp[nblk, ptpb, 0, smem](G, wts.Ut, wts.b, st, out, m, d11, d11,
                                            hb | ks << 20 | hp << 40, hs, flags)
                res[TT] = median_time(launch, sync, reps)
                nq = 3 if dry else 50
                launch()
                sync()
                t0 = time.perf_counter()
                for _ in range(nq):
                    launch()
                t_q = (time.perf_counter() - t0) / nq
                sync()
                t_all = (time.perf_counter() - t0) / nq
                print(f"B={B} H={H} T={TT}: kernel {1e3 * res[TT]:.3f} ms synced; queued: "
                      f"{1e6 * t_q:.1f} us host per launch, {1e3 * t_all:.3f} ms per launch")
            per_step = (res[T] - res[1]) / max(1, T - 1)
            print(f"B={B} H={H}: plan {nblk} blocks x {ptpb}, HB={hb}, KS={ks}, RBB={rbb}, "
                  f"Hs={hs}, smem {smem}; per step {1e6 * per_step:.2f} us; whole fastseq.lstm "
                  f"{1e3 * t_call:.3f} ms; kernel T={T} {1e3 * res[T]:.3f} ms")
            if cupy is not None:
                xm = cupy.asarray(x.reshape(B * T, D))
                Wc = cupy.asarray(W)
                Gc = cupy.empty((B * T, 4 * H), np.float32)
                t = median_time(lambda: cupy.matmul(xm, Wc, out=Gc), sync, reps)
                print(f"  cupy matmul [{B * T},{D}]x[{D},{4 * H}]: {1e3 * t:.3f} ms")
            if torch is not None and tdev is not None:
                mt = torch.nn.LSTM(D, H, batch_first=True).cuda()
                xt = torch.as_tensor(x, device="cuda")
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
                with torch.inference_mode():
                    t = median_time(lambda: mt(xt), torch.cuda.synchronize, reps)
                print(f"  torch cuDNN fp32: {1e3 * t:.3f} ms")
            if (B, H, T) != configs[0]:
                continue
            profile(fs, sync, 3 if dry else 30, ("tottime", "cumulative"), 22)

    section("3. persistent kernel alone, whole call, cProfile", kernel_alone)

    def dense():
        for rows, H, K in ([(3, 4, 5)] if dry else [(100, 256, 50), (25600, 1024, 50)]):
            rng = np.random.default_rng(rows)
            x = rng.standard_normal((rows, H)).astype(np.float32)
            W = (rng.standard_normal((H, K)) / np.sqrt(H)).astype(np.float32)
            b = rng.standard_normal(K).astype(np.float32)
            W.setflags(write=False)
            b.setflags(write=False)
            xd = cupy.asarray(x) if cupy is not None else cuda.to_device(x)
            fn = lambda: fastseq.dense(xd, W, b, activation="softmax", device="cuda")
            t = median_time(fn, sync, reps)
            print(f"dense rows={rows} H={H} K={K}: whole call {1e3 * t:.3f} ms")
            if cupy is not None:
                Wc = cupy.asarray(W)
                bc = cupy.asarray(b)

                def cp():
                    z = xd @ Wc
                    z += bc
                    z -= z.max(axis=1, keepdims=True)
                    cupy.exp(z, out=z)
                    z /= z.sum(axis=1, keepdims=True)
                    return z
                t = median_time(lambda: cupy.matmul(xd, Wc), sync, reps)
                print(f"  cupy matmul alone {1e3 * t:.3f} ms")
                t = median_time(cp, sync, reps)
                print(f"  cupy matmul + softmax {1e3 * t:.3f} ms")
            if rows > 1000:
                continue
            profile(fn, sync, 3 if dry else 30, ("tottime",), 15)

    section("4. dense", dense)


if __name__ == "__main__":
    main()
