"""One thread's share of a config alone, against the whole call on two threads and
ONNX Runtime's call, in one process, the samples interleaved: what the per-core speed
allows, and how much running both cores at once costs.

    python bench/thread_share.py --config C2
    python bench/thread_share.py --config C3 --rounds 5 --calls 1

fastseq splits a batch of B rows into two blocks of B / 2, one per thread, with no
barrier between them; so the first block alone on one thread is the floor of the
two-thread call.  (At C1's B = 1 the "share" is the whole call on one thread; two
threads split it by hidden units.)  Also prints numpy's 1024x1024 sgemm rate on one
and two threads.
"""
import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

import fastseq
from fastseq import benchmark


# issue 3's targets: fastseq's time / ONNX Runtime's
TARGETS = {"C1": 0.70, "C2": 0.85, "C3": 0.95}


def sgemm_rate(threads):
    """The benchmark's sgemm rate (numpy 1024x1024) with BLAS on ``threads`` threads."""
    with threadpool_limits(threads, user_api="blas"):
        return benchmark.measure_sgemm(repeats=5)["gflops"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="C2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=3, help="calls per sample (their mean)")
    args = ap.parse_args()
    wl = benchmark.make_workload(args.config)
    if wl.kind != "lstm":
        raise SystemExit("thread_share: C1-C3 only (C4 splits by direction)")
    fm = fastseq.from_keras(wl.keras_model)
    x = wl.inputs[0]
    share = np.ascontiguousarray(x[:(len(x) + 1) // 2])
    ort = benchmark.make_runner("onnxruntime", wl)

    def one_thread():
        fastseq.set_num_threads(1)
        try:
            fm.predict(share)
        finally:
            fastseq.set_num_threads(2)

    cases = {"share, 1 thread": one_thread, "whole, 2 threads": lambda: fm.predict(x),
             "onnxruntime": ort}
    for fn in cases.values():
        fn()
        fn()
    res = {k: [] for k in cases}
    for i in range(args.rounds):
        for k in (list(cases) if i % 2 == 0 else list(cases)[::-1]):
            time.sleep(0.05)
            cases[k]()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                cases[k]()
            res[k].append((time.perf_counter() - t0) / args.calls)
    flops = wl.flops
    print(f"{args.config}: B = {len(x)}, share = {len(share)} rows; median ms of "
          f"{args.rounds} samples of {args.calls} calls")
    ort_ms = np.median(res["onnxruntime"]) * 1e3
    for k, v in res.items():
        ms = np.median(v) * 1e3
        f = flops * len(share) / len(x) if k.startswith("share") else flops
        print(f"  {k:18s} {ms:9.3f} ms  ({ms / ort_ms:.3f} of onnxruntime)  "
              f"{f / ms / 1e6:7.1f} GFLOP/s")
    if args.config in TARGETS:
        r = TARGETS[args.config]
        print(f"  target, {r:.2f} of onnxruntime: {r * ort_ms:.3f} ms")
    print(f"  numpy sgemm 1024: {sgemm_rate(1):.1f} GFLOP/s on 1 thread, "
          f"{sgemm_rate(2):.1f} on 2")


if __name__ == "__main__":
    main()
