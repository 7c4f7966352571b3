"""The ``fastseq`` command line (also ``python -m fastseq``).

    fastseq bench [--configs C1,C2,C3,C4] [--providers ...] [--repeats N] [--quick]
                  [--threads N] [--ort-no-spin] [--json PATH] [--plot PATH]
                  [--c4-model PATH.keras]
    fastseq validate MODEL.keras [--input X.npy] [--batch-size N]
    fastseq train-tagger [--epochs N] [--compare keras,torch] [--save PATH] [--tag TEXT]

Heavy imports (Keras, TensorFlow, PyTorch, ...) happen inside the subcommands, so
``fastseq --help`` is quick.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

EXIT_OK = 0
EXIT_MISMATCH = 1      # validate: outputs differ beyond tolerance
EXIT_UNSUPPORTED = 2   # validate: fastseq cannot convert the model / bad input


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    from .benchmark import CONFIGS, PROVIDERS  # numpy only, no framework imports
    from ._validate import (positive_int, nonneg_int, positive_float,  # noqa: F401
                            writable_path)
    parser = argparse.ArgumentParser(
        prog="fastseq",
        description="fastseq: Keras-exact LSTM sequence taggers on Numba kernels.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser(
        "bench", help="time fastseq against Keras/TF, PyTorch, ONNX Runtime, Keras/JAX",
        description="Time the same LSTM tagger on every installed provider, side by side. "
                    "Configs: " + "; ".join(f"{k}: {v.describe()}" for k, v in
                                             CONFIGS.items()) + ".")
    b.add_argument("--configs", type=_csv, default=",".join(CONFIGS),
                   help="comma-separated configs to run (default: %(default)s)")
    b.add_argument("--providers", type=_csv, default=",".join(PROVIDERS),
                   help="comma-separated providers (default: all: %(default)s)")
    b.add_argument("--repeats", type=positive_int, default=None,
                   help="timed runs per provider, median reported (default 7; 3 with --quick)")
    b.add_argument("--warmup", type=nonneg_int, default=None,
                   help="untimed runs after the first call (default 2; 1 with --quick)")
    b.add_argument("--quick", action="store_true",
                   help="tiny sizes and a subset of EWT (seconds; for tests and CI)")
    b.add_argument("--threads", type=positive_int, default=None,
                   help="threads for every provider (default: each framework's own; "
                        "ONNX Runtime intra-op threads 2)")
    b.add_argument("--ort-no-spin", action="store_true",
                   help="ONNX Runtime's intra-op threads sleep between runs instead of "
                        "spin-waiting (its default)")
    b.add_argument("--budget", type=positive_float, default=20.0, metavar="SECONDS",
                   help="timed seconds per provider and config: slow providers get fewer "
                        "runs (at least 3) (default %(default)s)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights/input")
    b.add_argument("--c4-model", default=None, metavar="PATH.keras",
                   help="a trained C4 tagger (Embedding over datasets.default_vocab() -> "
                        "Bidirectional(LSTM) -> Dense(17, softmax)) instead of random weights")
    b.add_argument("--json", type=writable_path, default=None, metavar="PATH",
                   help="write the full report as JSON")
    b.add_argument("--plot", type=writable_path, default=None, metavar="PATH",
                   help="write a PNG bar chart of time relative to fastseq")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.add_argument("--no-sgemm", action="store_true",
                   help="skip measuring the machine's float32 GEMM rate")

    v = sub.add_parser(
        "validate", help="check a saved Keras model against fastseq",
        description="Run a saved Keras model through Keras and through fastseq.from_keras "
                    "on the same input and compare. Exit status 0: within tolerance; "
                    "1: outside tolerance; 2: the model cannot be converted (unsupported "
                    "layer) or the input does not fit.")
    v.add_argument("model", help="a saved Keras model (.keras)")
    v.add_argument("--input", default=None, metavar="X.npy",
                   help="input array; default: random valid input from the model's input spec")
    v.add_argument("--batch-size", type=positive_int, default=None,
                   help="predict batch size; also the number of random samples (default 32)")
    v.add_argument("--time-steps", type=positive_int, default=20,
                   help="time steps of the random input when the model leaves T open")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--atol", type=positive_float, default=None,
                   help="absolute tolerance (default fastseq.config.KERAS_PARITY_ATOL)")
    from . import tagger  # numpy only at import time
    tagger.build_parser(sub.add_parser(
        "train-tagger", help="train the UD English EWT POS tagger (optionally vs Keras, "
                             "PyTorch in the same run), evaluate, save, tag a sentence"))
    return parser


# --- bench -----------------------------------------------------------------------------


def cmd_bench(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Keras on TensorFlow is the reference; Keras on JAX runs in its own subprocess.
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "tensorflow"
    from . import benchmark
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    try:
        report = benchmark.run_benchmark(
            args.configs, args.providers, repeats=repeats, warmup=warmup, quick=args.quick,
            seed=args.seed, threads=args.threads, c4_model=args.c4_model,
            progress=not args.no_progress, sgemm=not args.no_sgemm, budget_s=args.budget,
            ort_spinning=not args.ort_no_spin)
    except ValueError as exc:
        print(f"fastseq bench: error: {exc}", file=sys.stderr)
        return 2
    print(benchmark.format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)
        print(f"wrote {args.json}")
    if args.plot:
        benchmark.write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


# --- validate --------------------------------------------------------------------------


def _find_layer(model, class_names):
    for layer in model.layers:
        if layer.__class__.__name__ in class_names:
            return layer
        for inner in ("layer", "forward_layer"):  # TimeDistributed / Bidirectional
            sub = getattr(layer, inner, None)
            if sub is not None and sub.__class__.__name__ in class_names:
                return sub
    return None


def random_input(model, batch_size: int, time_steps: int = 20, seed: int = 0):
    """Random valid input for ``model``'s single input: token ids in range for an
    Embedding (right-padded with 0 at random lengths when it masks), else standard-normal
    floats (right-padded with the mask value when the model has a Masking layer).
    Returns (x, mask or None)."""
    import numpy as np
    if len(model.inputs) != 1:
        raise ValueError(f"the model has {len(model.inputs)} inputs; validate handles "
                         "single-input models (pass --input for others is not supported)")
    shape = list(model.inputs[0].shape)
    dtype = str(model.inputs[0].dtype)
    shape[0] = batch_size
    if len(shape) >= 2 and shape[1] is None:
        shape[1] = time_steps
    if any(s is None for s in shape):
        raise ValueError(f"the model's input shape {tuple(model.inputs[0].shape)} leaves "
                         "feature dimensions open; pass --input")
    rng = np.random.default_rng(seed)
    emb = _find_layer(model, {"Embedding"})
    masking = _find_layer(model, {"Masking"})
    t = shape[1] if len(shape) >= 2 else 1
    lengths = None
    if emb is not None:
        low = 1 if emb.mask_zero else 0
        x = rng.integers(low, emb.input_dim, size=shape)
        if emb.mask_zero and len(shape) == 2:
            lengths = rng.integers(1, t + 1, size=batch_size)
            lengths[0] = t  # at least one full-length row
            x[np.arange(t)[None, :] >= lengths[:, None]] = 0
        x = x.astype("int32" if "int" in dtype else dtype)
    else:
        x = rng.standard_normal(shape).astype(dtype if "float" in dtype else "float32")
        if masking is not None and len(shape) == 3:
            lengths = rng.integers(1, t + 1, size=batch_size)
            lengths[0] = t
            x[np.arange(t)[None, :] >= lengths[:, None]] = masking.mask_value
    mask = None if lengths is None else np.arange(t)[None, :] < lengths[:, None]
    return x, mask


def cmd_validate(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import keras
    import fastseq
    from fastseq import config

    try:
        model = keras.saving.load_model(args.model)
    except Exception as exc:
        print(f"error: cannot load {args.model} as a Keras model: {exc}")
        return EXIT_UNSUPPORTED
    layers = ", ".join(f"{layer.name} ({layer.__class__.__name__})" for layer in model.layers)
    print(f"model: {args.model}: {layers}")
    try:
        fs_model = fastseq.from_keras(model)
    except Exception as exc:
        print(f"error: fastseq does not support this model: {type(exc).__name__}: {exc}")
        print(f"  (model layers: {layers})")
        return EXIT_UNSUPPORTED

    batch_size = args.batch_size or 32
    mask = None
    try:
        if args.input:
            x = np.load(args.input, allow_pickle=False)
            if not isinstance(x, np.ndarray):
                x.close()
                raise ValueError(f"--input {args.input}: expected one array saved with "
                                 f"numpy.save (.npy), got an archive of several")
            emb = _find_layer(model, {"Embedding"})
            if emb is not None and x.ndim == 2 and emb.mask_zero:
                mask = x != 0
        else:
            x, mask = random_input(model, batch_size, args.time_steps, args.seed)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}")
        return EXIT_UNSUPPORTED
    print(f"input: shape {x.shape} dtype {x.dtype}"
          + (f", {int(mask.sum())} of {mask.size} steps unmasked" if mask is not None else ""))

    try:
        t0 = time.perf_counter()
        ref = model.predict(x, batch_size=batch_size, verbose=0)
        t_keras_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = model.predict(x, batch_size=batch_size, verbose=0)
        t_keras = time.perf_counter() - t0
    except Exception as exc:
        print(f"error: keras could not run the model on this input: {type(exc).__name__}: "
              f"{exc}")
        return EXIT_UNSUPPORTED
    try:
        t0 = time.perf_counter()
        out = fs_model.predict(x, batch_size=batch_size)
        t_first = time.perf_counter() - t0
        # on a cold compile cache the worker thread compiles its loop in the
        # background (holding the GIL): not part of a warm call
        from . import _threads
        _threads.wait_for_workers()
        t0 = time.perf_counter()
        out = fs_model.predict(x, batch_size=batch_size)
        t_warm = time.perf_counter() - t0
    except (ValueError, TypeError, NotImplementedError) as exc:
        print(f"error: fastseq could not run this model/input: {type(exc).__name__}: {exc}")
        return EXIT_UNSUPPORTED

    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    outs = out if isinstance(out, (list, tuple)) else [out]
    if len(refs) != len(outs):
        print(f"error: keras returned {len(refs)} outputs, fastseq {len(outs)}")
        return EXIT_MISMATCH
    atol = args.atol if args.atol is not None else config.KERAS_PARITY_ATOL
    ok = True
    for i, (r, o) in enumerate(zip(refs, outs)):
        r = np.asarray(r)
        o = np.asarray(o)
        tag = f"output {i}: " if len(refs) > 1 else ""
        if r.shape != o.shape:
            print(f"{tag}shape mismatch: keras {r.shape}, fastseq {o.shape}")
            ok = False
            continue
        diff = np.abs(o.astype(np.float64) - r.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        max_rel = max_abs / scale if scale > 0 else 0.0
        # Absolute tolerance for outputs of size <= 1 (probabilities); above that it
        # scales with the output's magnitude (float32 carries relative precision).
        tol = atol * max(1.0, scale)
        finite = bool(np.isfinite(o).all() == np.isfinite(r).all())
        within = finite and max_abs <= tol
        ok = ok and within
        print(f"{tag}max abs diff {max_abs:.3e}, max rel diff {max_rel:.3e} "
              f"(to max |keras output| {scale:.3g}); tolerance {tol:.1e} -> "
              f"{'OK' if within else 'OUTSIDE TOLERANCE'}")
        if r.ndim >= 2 and r.shape[-1] > 1:
            agree = o.argmax(-1) == r.argmax(-1)
            m = mask if (mask is not None and agree.shape == mask.shape) else None
            frac = float(agree[m].mean()) if m is not None else float(agree.mean())
            where = " (unmasked steps)" if m is not None else ""
            print(f"{tag}argmax agreement {frac:.4%}{where}")
    print(f"time: keras predict first call {t_keras_first * 1e3:.1f} ms, warm "
          f"{t_keras * 1e3:.1f} ms; fastseq first call {t_first * 1e3:.1f} ms (includes "
          f"compilation), warm {t_warm * 1e3:.1f} ms")
    print("PASS" if ok else "FAIL")
    return EXIT_OK if ok else EXIT_MISMATCH


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__
        print(f"fastseq {__version__}")
        return 0
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "validate":
        return cmd_validate(args)
    if args.command == "train-tagger":
        from . import tagger
        return tagger.run_cli(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
