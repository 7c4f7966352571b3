"""Start-up costs of fastseq, each measured in a fresh process:

* ``import fastseq``;
* the first ``lstm_dense`` call (a C2-sized LSTM -> Dense(softmax) tagger, or C1-sized
  with ``--config C1``, which runs on two threads split by hidden units) minus a later one
  (the median of the next 7),
  with the compiled-kernel cache warm (Numba ``cache=True``, in ``__pycache__``);
* the same with a cold cache (a fresh, empty ``NUMBA_CACHE_DIR``): the compile time;
* the wait, after the first call, for the worker thread that the C1 path starts (it
  loads or compiles its loop in the background, holding the GIL meanwhile).

    python bench/startup.py [--runs 3] [--config C2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import time, json, os
t0 = time.perf_counter()
import fastseq
t1 = time.perf_counter()
import numpy as np
from fastseq.ops import lstm_dense
B, T, D, H, K = map(int, os.environ['FASTSEQ_STARTUP_SHAPE'].split(','))
rng = np.random.default_rng(0)
x = rng.standard_normal((B, T, D)).astype(np.float32)
W = (rng.standard_normal((D, 4 * H)) * .1).astype(np.float32)
U = (rng.standard_normal((H, 4 * H)) * .1).astype(np.float32)
b = np.zeros(4 * H, np.float32)
Wd = (rng.standard_normal((H, K)) * .1).astype(np.float32)
bd = np.zeros(K, np.float32)
t2 = time.perf_counter(); lstm_dense(x, W, U, b, Wd, bd, "softmax"); t3 = time.perf_counter()
# a worker thread started by the first call compiles (cold cache) or loads its loop in
# the background, holding the GIL meanwhile: wait for it before the later call
from fastseq import _threads
_threads.wait_for_workers(); t3w = time.perf_counter()
later = []
for _ in range(7):  # the worker's first job can take a few ms once: the median
    t = time.perf_counter(); lstm_dense(x, W, U, b, Wd, bd, "softmax")
    later.append(time.perf_counter() - t)
print(json.dumps({"import_s": t1 - t0, "first_s": t3 - t2, "worker_s": t3w - t3,
                  "later_s": sorted(later)[3]}))
'''


# B, T, D, H, K of the configs
SHAPES = {"C1": "1,50,64,128,32", "C2": "32,100,128,256,50"}


def run(env):
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--config", choices=sorted(SHAPES), default="C2")
    args = p.parse_args(argv)
    env = dict(os.environ, FASTSEQ_STARTUP_SHAPE=SHAPES[args.config])
    run(env)  # make sure the default cache is warm
    warm = [run(env) for _ in range(args.runs)]
    cold = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as d:
            cold.append(run(dict(env, NUMBA_CACHE_DIR=d)))

    def med(rows, key):
        return sorted(r[key] for r in rows)[len(rows) // 2]

    print(f"import fastseq:                          {med(warm, 'import_s'):.3f} s")
    print(f"first predict - later one (warm cache):  "
          f"{med(warm, 'first_s') - med(warm, 'later_s'):.3f} s")
    print(f"first predict - later one (cold cache):  "
          f"{med(cold, 'first_s') - med(cold, 'later_s'):.3f} s  (compilation)")
    print(f"then the worker thread's loop (warm/cold): "
          f"{med(warm, 'worker_s'):.3f} / {med(cold, 'worker_s'):.3f} s  (background, "
          f"C1 only)")
    print(f"later predict ({args.config} size):                 "
          f"{med(warm, 'later_s') * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
