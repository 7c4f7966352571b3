"""Time ``lstm_vjp(device="cuda")`` (host arrays in and out) of the fastseq checkout
at ROOT, for an A/B of two revisions on one GPU in one call:

    python bench/gpu_train_ab.py ROOT [ROOT2 ...]

Each ROOT runs in its own subprocess (two fastseq packages cannot share one), in the
order given, twice (A B A B), so drift of the card shows.  Prints one line per run:
median ms per shape of 21 calls after 3 warm-up calls."""
import json
import os
import subprocess
import sys

SHAPES = [(32, 50, 128, 256), (64, 100, 256, 512)]

WORKER = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from fastseq.training import lstm_vjp
from numba import cuda
out = {}
for B, T, D, H in json.loads(sys.argv[2]):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    W = (rng.standard_normal((D, 4 * H)) / np.sqrt(D)).astype(np.float32)
    U = (rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(np.float32)
    b = np.zeros(4 * H, np.float32)
    dy = rng.standard_normal((B, T, H)).astype(np.float32)
    mask = rng.random((B, T)) > 0.2
    f = lambda: lstm_vjp(x, W, U, b, dy, mask=mask, return_sequences=True,
                         device="cuda")
    for _ in range(3):
        f()
    ts = []
    for _ in range(21):
        cuda.synchronize()
        t0 = time.perf_counter()
        f()
        cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    out[f"B={B} T={T} D={D} H={H}"] = 1e3 * float(np.median(ts))
print(json.dumps(out))
"""


def main():
    roots = sys.argv[1:]
    shapes = SHAPES
    if os.environ.get("AB_SHAPES"):          # e.g. "2,3,4,5" for a simulator dry run
        shapes = [[int(v) for v in s.split(",")] for s in os.environ["AB_SHAPES"].split(";")]
    for rnd in range(2):
        for root in roots:
            res = subprocess.run([sys.executable, "-c", WORKER, os.path.abspath(root),
                                  json.dumps(shapes)], capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{root}: failed\n{res.stderr[-2000:]}")
                continue
            ms = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"round {rnd} {root}: " + ", ".join(f"{k}: {v:.2f} ms"
                                                     for k, v in ms.items()), flush=True)


if __name__ == "__main__":
    main()
