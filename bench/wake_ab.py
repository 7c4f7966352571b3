"""Paired A/B of config.WORKER_WAKE_ELSEWHERE in ``fastseq bench``'s own pattern: every
provider in this process, rounds that rotate through them, each timed sample after a
0.1 s pause and averaged over ~20 ms of back-to-back calls.  fastseq is timed twice a
round, once with the setting on and once off, as if they were two providers.

    python bench/wake_ab.py --config C1 --rounds 20
"""
import argparse

import numpy as np

from fastseq import _threads, benchmark, config


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="C1")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--providers", default="keras,keras-tf-function,torch,onnxruntime")
    args = ap.parse_args()
    wl = benchmark.make_workload(args.config)
    peers = [p for p in args.providers.split(",") if not benchmark.provider_missing(p)]
    runs = {p: benchmark.make_runner(p, wl) for p in ["fastseq", *peers]}
    for r in runs.values():
        for _ in range(3):
            r()
    _threads.wait_for_workers()
    names = ["fastseq-on", "fastseq-off", *peers]
    times = {n: [] for n in names}
    for r in range(args.rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            config.WORKER_WAKE_ELSEWHERE = n != "fastseq-off"
            run = runs["fastseq" if n.startswith("fastseq") else n]
            times[n].append(benchmark.timed_sample(run))
    config.WORKER_WAKE_ELSEWHERE = True
    med = {n: float(np.median(v)) for n, v in times.items()}
    for n in names:
        print(f"{args.config} {n:18s} median {med[n]:8.3f} ms   samples "
              + " ".join(f"{v:.3f}" for v in times[n]))
    ratio = np.array(times["fastseq-on"]) / np.array(times["fastseq-off"])
    print(f"on/off: ratio of medians {med['fastseq-on'] / med['fastseq-off']:.3f}, "
          f"median paired ratio {np.median(ratio):.3f}")
    if "onnxruntime" in med:
        print(f"fastseq / onnxruntime: on {med['fastseq-on'] / med['onnxruntime']:.3f}, "
              f"off {med['fastseq-off'] / med['onnxruntime']:.3f}")


if __name__ == "__main__":
    main()
