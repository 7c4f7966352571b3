"""One training step of the EWT tagger (Embedding(V, 100, mask_zero) ->
Bidirectional(LSTM(128)) -> Dense(17, softmax), Adam, batch 32, length-bucketed EWT
train batches): fastseq vs Keras ``train_on_batch`` (TensorFlow) vs the same model in
PyTorch (packed sequences, masked mean cross-entropy, Adam).

    python -m pytest bench/bench_train.py --benchmark-only
    python -m pytest bench/bench_train.py --benchmark-only --fastseq-quick   # tiny
    python bench/bench_train.py [--steps 30] [--rounds 3] [--threads 2]
        # side by side: one process per framework and round, the frameworks alternating

Each benchmark round is one step on the next batch of a fixed list of batches (the
same batches for every framework), so rounds cover a spread of sentence lengths.  The
three frameworks start from the same weights.  See bench/conftest.py for the options.
"""
import os
import sys
import time

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# PyTorch before Keras: once TensorFlow is loaded, PyTorch's CPU threads slow down
# badly in the same process (competing OpenMP/Eigen pools); the command-line
# comparison runs every framework in a process of its own.
FRAMEWORKS = ("fastseq", "torch", "keras")


def make_batches(quick=False, n=40, seed=0):
    """``n`` length-bucketed batches of EWT train (ids, tags, mask), the vocabulary size
    and the model sizes (E, H, K)."""
    from fastseq import datasets
    vocab = datasets.default_vocab()
    train = datasets.load_ewt("train")
    batch_size, E, H = (8, 16, 16) if quick else (32, 100, 128)
    bs = list(datasets.batches(train, vocab, batch_size, shuffle=True, seed=seed))[:n]
    return [(b.ids, b.tags, b.mask) for b in bs], len(vocab), (E, H, 17)


def initial_weights(V, E, H, K, seed=0):
    """Keras-style initial weights in ``trainable_weights`` order."""
    from fastseq import tagger
    return tagger.init_weights(V, E, H, K, seed=seed)


def fastseq_step(V, sizes, weights):
    from fastseq import training, tagger
    model = tagger.build_model(V, *sizes, weights=weights)
    training.compile(model, optimizer="adam")
    return lambda ids, tags, mask: training.train_on_batch(model, ids, tags)


def keras_step(V, sizes, weights):
    import keras
    from fastseq import tagger
    model = tagger.build_keras_model(V, *sizes, weights=weights)
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy")
    return lambda ids, tags, mask: float(model.train_on_batch(ids, tags))


def torch_step(V, sizes, weights):
    import torch
    from fastseq.tagger import torch_tagger
    mod, opt, lossf = torch_tagger(V, sizes, weights, 1e-3)

    def step(ids, tags, mask):
        ids_t = torch.from_numpy(ids.astype(np.int64))
        lengths = torch.from_numpy(mask.sum(axis=1).astype(np.int64))
        m = torch.from_numpy(mask)
        logits = mod(ids_t, lengths)
        loss = lossf(logits[m], torch.from_numpy(tags.astype(np.int64))[m]) / m.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


MAKERS = {"fastseq": fastseq_step, "keras": keras_step, "torch": torch_step}


def missing(framework):
    import importlib.util
    need = {"fastseq": "numba", "keras": "tensorflow", "torch": "torch"}[framework]
    return None if importlib.util.find_spec(need) else f"missing: {need}"


# --- pytest-benchmark -----------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(request):
    quick = request.config.getoption("--fastseq-quick", False)
    batches, V, sizes = make_batches(quick)
    return batches, V, sizes, initial_weights(V, *sizes)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_train_step(benchmark, setup, rounds, framework):
    why = missing(framework)
    if why:
        pytest.skip(why)
    batches, V, sizes, weights = setup
    step = MAKERS[framework](V, sizes, weights)
    t0 = time.perf_counter()
    first_loss = step(*batches[0])  # compilation / tracing
    first_ms = (time.perf_counter() - t0) * 1e3
    step(*batches[1])
    it = iter(range(2, 10 ** 9))
    benchmark.group = "EWT tagger train step"
    benchmark.name = f"train-step-{framework}"
    benchmark.extra_info.update({"first_call_ms": first_ms, "first_loss": first_loss,
                                 "batch_size": int(batches[0][0].shape[0])})
    benchmark.pedantic(lambda: step(*batches[next(it) % len(batches)]),
                       rounds=max(rounds, 10), warmup_rounds=1, iterations=1)
    assert np.isfinite(first_loss)


# --- a quick side-by-side from the command line ---------------------------------------
def _time_steps(fw, steps, threads, quick):
    """Median/mean ms per step of ``fw`` (in this process)."""
    if threads:
        if fw == "fastseq":
            import fastseq
            fastseq.set_num_threads(threads)
        elif fw == "torch":
            import torch
            torch.set_num_threads(threads)
        else:
            import tensorflow as tf
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
    batches, V, sizes = make_batches(quick, n=steps + 2)
    step = MAKERS[fw](V, sizes, initial_weights(V, *sizes))
    step(*batches[0])
    step(*batches[1])
    times = []
    for b in batches[2:]:
        t0 = time.perf_counter()
        step(*b)
        times.append(time.perf_counter() - t0)
    return {"median_ms": float(np.median(times) * 1e3),
            "mean_ms": float(np.mean(times) * 1e3), "steps": len(times),
            "times_ms": [t * 1e3 for t in times]}


def main(argv=None):
    import argparse
    import json
    import subprocess
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30,
                   help="timed steps per framework and round")
    p.add_argument("--rounds", type=int, default=3,
                   help="processes per framework, the frameworks alternating")
    p.add_argument("--threads", type=int, default=None, help="threads for every framework")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1:
        p.error(f"--steps and --rounds must be at least 1, got {args.steps} and "
                f"{args.rounds}")
    if args.worker:  # child process: one framework, JSON on stdout's last line
        print(json.dumps(_time_steps(args.worker, args.steps, args.threads, args.quick)))
        return 0
    # the frameworks' processes alternate, round after round, so that a slow spell of
    # this shared machine does not fall on one framework only; each framework's figure
    # is the median over all its timed steps
    fws = []
    for fw in args.frameworks.split(","):
        why = missing(fw)
        if why:
            print(f"{fw}: {why}")
        else:
            fws.append(fw)
    times = {fw: [] for fw in fws}
    rounds = {fw: [] for fw in fws}
    for _ in range(args.rounds):
        for fw in fws:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", fw,
                   "--steps", str(args.steps)] + (["--threads", str(args.threads)]
                                                   if args.threads else []) + \
                (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{fw}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            times[fw] += r["times_ms"]
            rounds[fw].append(r["median_ms"])
    res = {}
    for fw in fws:
        if not times[fw]:
            continue
        res[fw] = float(np.median(times[fw]))
        per = " ".join(f"{m:.2f}" for m in rounds[fw])
        print(f"{fw:8s} median {res[fw]:8.2f} ms/step  mean {np.mean(times[fw]):8.2f} ms "
              f"over {len(times[fw])} steps in {len(rounds[fw])} processes (their "
              f"medians: {per})", flush=True)
    if "fastseq" in res:
        for fw, ms in res.items():
            if fw != "fastseq":
                print(f"fastseq speed-up vs {fw}: {ms / res['fastseq']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
