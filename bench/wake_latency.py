"""How long a dozing fastseq worker takes to spin again after a caller wakes it: the
worker is put to rest, left dozing for ``--pause`` seconds, then woken
(``_threads.Worker.wake``), and the time until it reports spinning is taken.

    python bench/wake_latency.py --rounds 40
"""
import argparse
import time

import numpy as np

from fastseq import _threads
from fastseq.kernels import worker_cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--pause", type=float, default=0.05)
    args = ap.parse_args()
    w = _threads.worker(np.float32)
    _threads.wait_for_workers()
    w.wake()            # loads the poke function (compiled on a cold cache)
    lat = []
    for _ in range(args.rounds):
        w.rest()
        while w.mb[worker_cpu.MB_STATE] != 2:
            time.sleep(0.001)
        time.sleep(args.pause)
        t0 = time.perf_counter()
        w.wake()
        while w.mb[worker_cpu.MB_STATE] != 1:
            pass
        lat.append((time.perf_counter() - t0) * 1e6)
    w.rest()
    print(f"wake to spinning, {args.rounds} rounds: median {np.median(lat):.1f} us, "
          f"10th percentile {np.percentile(lat, 10):.1f}, 90th {np.percentile(lat, 90):.1f}, "
          f"max {max(lat):.1f}")


if __name__ == "__main__":
    main()
