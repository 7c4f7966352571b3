"""Time chunk sizes of the CPU driver on one config, interleaved so the machine's noise
falls on every setting alike: each setting is (CHUNK_BYTES in MiB, CHUNK_MIN_ROWS).

    python bench/chunk_rows.py                    # C3: 2-step chunks vs the default
    python bench/chunk_rows.py --config C2 --settings 1:1,1:512,4:1 --calls 10
"""
import argparse
import time

import numpy as np

import fastseq
from fastseq import benchmark, config


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="C3")
    ap.add_argument("--settings", default="1:1,1:512",
                    help="comma-separated MiB:rows pairs (default: 1:1,1:512)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--calls", type=int, default=2, help="calls per timed sample")
    args = ap.parse_args()
    wl = benchmark.make_workload(args.config)
    fm = fastseq.from_keras(wl.keras_model)
    x = wl.inputs[0]
    settings = [tuple(int(v) for v in s.split(":")) for s in args.settings.split(",")]
    times = {s: [] for s in settings}
    fm.predict(x)
    for _ in range(args.rounds):
        for s in settings:
            config.CHUNK_BYTES, config.CHUNK_MIN_ROWS = s[0] << 20, s[1]
            fm.predict(x)
            time.sleep(0.05)
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fm.predict(x)
            times[s].append((time.perf_counter() - t0) / args.calls * 1e3)
    for s in settings:
        print(f"{args.config}: CHUNK_BYTES {s[0]} MiB, CHUNK_MIN_ROWS {s[1]}: median "
              f"{np.median(times[s]):.1f} ms  (samples: "
              + " ".join(f"{v:.0f}" for v in times[s]) + ")")


if __name__ == "__main__":
    main()
