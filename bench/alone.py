"""Time one provider alone in this process on one config: after a pause, a few calls
back to back, each timed; the median per call index over several rounds.  (In
``fastseq bench`` every provider shares the process with the others.)

    python bench/alone.py --config C2 --provider onnxruntime
    python bench/alone.py --config C2 --set SPLIT_UNITS_MAX_ROWS=32   # fastseq config
"""
import argparse
import time

import numpy as np

from fastseq import benchmark, config


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="C2")
    ap.add_argument("--provider", default="fastseq")
    ap.add_argument("--pause", type=float, default=0.1, help="seconds before each round")
    ap.add_argument("--calls", type=int, default=5, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="set a fastseq.config value (an int) first")
    args = ap.parse_args()
    for item in args.set:
        name, value = item.split("=")
        setattr(config, name, int(value))
    wl = benchmark.make_workload(args.config)
    run = benchmark.make_runner(args.provider, wl)
    for _ in range(3):
        run()
    rows = []
    for _ in range(args.rounds):
        time.sleep(args.pause)
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append(times)
    med = np.median(np.array(rows), axis=0)
    print(f"{args.provider} {args.config}: median ms of call 1..{args.calls} after a "
          f"{args.pause:g} s pause: " + " ".join(f"{v:.3f}" for v in med))


if __name__ == "__main__":
    main()
