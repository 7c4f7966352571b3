"""fastseq at an older git revision against the working tree, in one process, the two
alternating call by call (or step by step) on the same inputs, so that the machine's
noise falls on both alike.  The old revision's ``fastseq/`` is exported with
``git archive`` into a temporary directory as the package ``fastseq_old``.

    python bench/ab_revs.py --old 8a3f8a6 --what train          # EWT tagger steps
    python bench/ab_revs.py --old 8a3f8a6 --what C3 --rounds 15  # inference configs
    python bench/ab_revs.py --old 8a3f8a6 --what C1 --threads 1   # both on one thread

``train``: the tagger of bench/bench_train.py (Embedding -> Bidirectional(LSTM(128)) ->
Dense(17, softmax), Adam, batch 32) built twice from the same initial weights; each
round runs every batch once on both, in alternating order.  C1-C4: the benchmark
workloads of ``fastseq bench``, each round one sample of each after a 50 ms pause (both
packages' worker threads are told to stop spinning before it): the mean of ``--calls``
back-to-back calls (1 by default; ``fastseq bench`` averages calls over ~20 ms).

Prints the medians of both and the median of the per-pair ratios new / old (below 1:
the working tree is faster), and the largest difference between their results.
"""
import argparse
import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def export_old(rev, dest):
    """Write revision ``rev``'s fastseq/ package to dest/fastseq_old."""
    data = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev, "fastseq"],
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    os.rename(os.path.join(dest, "fastseq"), os.path.join(dest, "fastseq_old"))


def rest_workers(*pkgs):
    for p in pkgs:
        for w in list(p._threads._workers.values()):
            if w is not None:
                w.rest()


def ab_train(old, new, rounds, n_batches):
    sys.path.insert(0, HERE)
    from bench_train import make_batches, initial_weights
    batches, V, sizes = make_batches(n=n_batches)
    w = initial_weights(V, *sizes)
    steps = {}
    for pkg in (old, new):
        tagger = importlib.import_module(pkg.__name__ + ".tagger")
        training = importlib.import_module(pkg.__name__ + ".training")
        m = tagger.build_model(V, *sizes, weights=[a.copy() for a in w])
        training.compile(m, optimizer="adam")
        steps[pkg] = (lambda tr, mm: lambda ids, tags: tr.train_on_batch(mm, ids, tags))(
            training, m)
    for b in batches[:3]:
        for pkg in (old, new):
            steps[pkg](b[0], b[1])
    t_old, t_new, diff = [], [], 0.0
    i = 0
    for _ in range(rounds):
        for b in batches:
            order = (old, new) if i % 2 == 0 else (new, old)
            i += 1
            res = {}
            for pkg in order:
                t0 = time.perf_counter()
                loss = steps[pkg](b[0], b[1])
                res[pkg] = (time.perf_counter() - t0, loss)
            t_old.append(res[old][0])
            t_new.append(res[new][0])
            diff = max(diff, abs(res[old][1] - res[new][1]))
    return np.array(t_old), np.array(t_new), f"largest loss difference {diff:.2e}"


def ab_infer(old, new, config, rounds, calls):
    from fastseq import benchmark
    wl = benchmark.make_workload(config)
    models = {pkg: pkg.from_keras(wl.keras_model) for pkg in (old, new)}

    def runner(pkg):
        fm = models[pkg]
        if wl.kind == "lstm":
            return lambda: np.asarray(fm.predict(wl.inputs[0]))
        return lambda: np.concatenate([np.asarray(fm.predict(ids)).reshape(-1)
                                       for ids in wl.inputs])
    runs = {pkg: runner(pkg) for pkg in (old, new)}
    outs = {}
    for pkg in (old, new):
        for _ in range(2):
            outs[pkg] = runs[pkg]()
        pkg._threads.wait_for_workers()
    t_old, t_new = [], []
    for i in range(rounds):
        order = (old, new) if i % 2 == 0 else (new, old)
        res = {}
        for pkg in order:
            rest_workers(old, new)
            time.sleep(0.05)
            t0 = time.perf_counter()
            for _ in range(calls):
                runs[pkg]()
            res[pkg] = (time.perf_counter() - t0) / calls
        t_old.append(res[old])
        t_new.append(res[new])
    diff = float(np.max(np.abs(outs[old].astype(np.float64) - outs[new])))
    return np.array(t_old), np.array(t_new), f"largest output difference {diff:.2e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="git revision to compare against")
    ap.add_argument("--what", default="train", help="train, C1, C2, C3 or C4")
    ap.add_argument("--rounds", type=int, default=None,
                    help="train: passes over the batches (default 3); C1-C4: calls of "
                         "each (default 15)")
    ap.add_argument("--batches", type=int, default=100, help="train: batches per pass")
    ap.add_argument("--calls", type=int, default=1,
                    help="C1-C4: back-to-back calls per timed sample (their mean)")
    ap.add_argument("--threads", type=int, default=None,
                    help="fastseq.set_num_threads(n) in both packages first")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", args.old],
                         check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="fastseq-ab-") as tmp:
        export_old(args.old, tmp)
        sys.path.insert(0, tmp)
        old = importlib.import_module("fastseq_old")
        importlib.import_module("fastseq_old._threads")
        new = importlib.import_module("fastseq")
        importlib.import_module("fastseq._threads")
        if args.threads is not None:
            old.set_num_threads(args.threads)
            new.set_num_threads(args.threads)
        if args.what == "train":
            t_old, t_new, extra = ab_train(old, new, args.rounds or 3, args.batches)
            unit = "ms per step"
        else:
            t_old, t_new, extra = ab_infer(old, new, args.what, args.rounds or 15,
                                           args.calls)
            unit = "ms per call"
    ratio = np.median(t_new / t_old)
    print(f"{args.what}: old {rev} median {np.median(t_old) * 1e3:.3f} {unit}, working "
          f"tree median {np.median(t_new) * 1e3:.3f} ({len(t_old)} pairs); median ratio "
          f"new / old {ratio:.3f}; {extra}")


if __name__ == "__main__":
    main()
