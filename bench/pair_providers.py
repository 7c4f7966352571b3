"""Providers on one config in one process, sample by sample in alternating order, with
the median of the per-round ratios to the first provider (the machine's slow phases
then fall on all of them alike; ``fastseq bench`` reports ratios of medians).

    python bench/pair_providers.py --config C2 --providers fastseq,torch,onnxruntime

Each round: for every provider (order reversed every other round) a 50 ms pause, one
untimed call, then the mean of ``--calls`` back-to-back calls.
"""
import argparse
import time

import numpy as np

from fastseq import benchmark


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="C2")
    ap.add_argument("--providers", default="fastseq,torch,onnxruntime")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    provs = args.providers.split(",")
    wl = benchmark.make_workload(args.config)
    runs = {p: benchmark.make_runner(p, wl) for p in provs}
    for r in runs.values():
        for _ in range(3):
            r()
    from fastseq import _threads
    _threads.wait_for_workers()
    res = {p: [] for p in provs}
    for i in range(args.rounds):
        for p in (provs if i % 2 == 0 else provs[::-1]):
            time.sleep(0.05)
            run = runs[p]
            run()
            t = time.perf_counter()
            for _ in range(args.calls):
                run()
            res[p].append((time.perf_counter() - t) / args.calls)
    base = np.array(res[provs[0]])
    for p in provs:
        a = np.array(res[p])
        print(f"{args.config} {p:12s} median {np.median(a) * 1e3:8.3f} ms  min "
              f"{a.min() * 1e3:8.3f}  median ratio to {provs[0]} {np.median(a / base):.3f}")


if __name__ == "__main__":
    main()
