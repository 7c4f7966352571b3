"""The fastseq benchmark: one tagger, several inference providers, timed side by side.

Run it as ``fastseq bench`` (see ``fastseq bench --help``).  The pieces here are also
used by ``bench/bench_*.py`` (pytest-benchmark) and by the tests, so all of them time and
check the same models:

* workloads: :func:`synthetic_workload` (configs C1-C3: random input through
  ``LSTM(H, return_sequences=True) -> TimeDistributed(Dense(K, softmax))``) and
  :func:`ewt_workload` (config C4: the UD English EWT test set through
  ``Embedding -> Bidirectional(LSTM) -> TimeDistributed(Dense(17, softmax))``);
* providers: :func:`make_runner` builds a zero-argument callable that runs a workload's
  whole input through one provider (NumPy in, NumPy out) - fastseq, Keras on TensorFlow
  (``predict_on_batch`` and a warm ``tf.function`` call), PyTorch, ONNX Runtime, and Keras
  on JAX (in a subprocess, since Keras picks its backend once per process);
* :func:`run_benchmark` times them (first call separately, warm-up, then ``repeats``
  rounds interleaving the providers, medians) and compares every output with Keras.

Weights are random (seeded) in Keras layout and gate order (i, f, c, o); every provider
gets the same numbers.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "SyntheticConfig", "TaggerConfig", "CONFIGS", "QUICK_CONFIGS", "PROVIDERS",
    "PROVIDER_PACKAGES", "Workload", "synthetic_workload", "ewt_workload", "make_runner",
    "provider_missing", "machine_info", "measure_sgemm", "run_benchmark", "format_table",
    "write_plot", "compare_outputs", "set_threads",
]

# --- configurations ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Random input [B, T, D] through LSTM(H, return_sequences=True) -> Dense(K, softmax)."""
    name: str
    B: int
    T: int
    D: int
    H: int
    K: int

    def describe(self) -> str:
        return f"B={self.B} T={self.T} D={self.D} H={self.H} K={self.K}"


@dataclasses.dataclass(frozen=True)
class TaggerConfig:
    """The EWT test set through Embedding(V, E, mask_zero) -> Bidirectional(LSTM(H)) ->
    Dense(K, softmax), in length-sorted batches of ``batch_size``."""
    name: str
    batch_size: int = 32
    E: int = 100
    H: int = 128
    K: int = 17
    max_sentences: int | None = None   # None: the whole test set

    def describe(self) -> str:
        n = "all" if self.max_sentences is None else str(self.max_sentences)
        return (f"EWT test ({n} sentences), batch {self.batch_size}, "
                f"E={self.E} BiLSTM H={self.H} K={self.K}")


CONFIGS = {
    "C1": SyntheticConfig("C1", B=1, T=50, D=64, H=128, K=32),
    "C2": SyntheticConfig("C2", B=32, T=100, D=128, H=256, K=50),
    "C3": SyntheticConfig("C3", B=128, T=100, D=256, H=512, K=50),
    "C4": TaggerConfig("C4", batch_size=32, E=100, H=128, K=17),
}
# Tiny versions of the same configurations, for tests and CI (--quick).
QUICK_CONFIGS = {
    "C1": SyntheticConfig("C1", B=1, T=6, D=4, H=8, K=3),
    "C2": SyntheticConfig("C2", B=4, T=8, D=6, H=8, K=5),
    "C3": SyntheticConfig("C3", B=16, T=8, D=8, H=16, K=5),
    "C4": TaggerConfig("C4", batch_size=32, E=16, H=16, K=17, max_sentences=96),
}

# Provider names, in table order.  "keras" (predict_on_batch on TensorFlow) is the
# reference every output is compared with.
PROVIDERS = ("fastseq", "keras", "keras-tf-function", "torch", "onnxruntime", "keras-jax")
# Import names each provider needs (the first missing one is reported).
PROVIDER_PACKAGES = {
    "fastseq": ("numba",),
    "keras": ("keras", "tensorflow"),
    "keras-tf-function": ("keras", "tensorflow"),
    "torch": ("torch",),
    "onnxruntime": ("onnx", "onnxruntime"),
    "keras-jax": ("keras", "jax"),
}
ORT_DEFAULT_THREADS = 2
# ONNX Runtime's own default: its intra-op threads spin-wait for work for a while after
# each run (session.intra_op.allow_spinning = 1).  At C1 that halves its time here
# (0.18 against 0.33 ms a call); the pause before each timed sample (PAUSE_S) lets the
# spinning end before the next provider runs.  ``fastseq bench --ort-no-spin`` turns
# it off (the setting of runs 1-23 in BENCHMARKS.md).
ORT_SPINNING = True


def provider_missing(provider: str) -> str | None:
    """``"missing: <pkg>"`` when a package the provider needs is not installed, else None.
    Checks installation only (no import)."""
    if provider not in PROVIDER_PACKAGES:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    for pkg in PROVIDER_PACKAGES[provider]:
        if importlib.util.find_spec(pkg) is None:
            return f"missing: {pkg}"
    return None


# --- weights and models ----------------------------------------------------------------


def _uniform(rng, shape, fan_in, fan_out):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def lstm_weights(rng, d: int, h: int) -> list[np.ndarray]:
    """Random Keras-layout LSTM weights [kernel [D,4H], recurrent [H,4H], bias [4H]]."""
    kernel = _uniform(rng, (d, 4 * h), d, 4 * h)
    recurrent = _uniform(rng, (h, 4 * h), h, 4 * h)
    bias = (0.1 * rng.standard_normal(4 * h)).astype(np.float32)
    bias[h:2 * h] += 1.0  # forget-gate bias, as Keras's unit_forget_bias
    return [kernel, recurrent, bias]


def dense_weights(rng, h: int, k: int) -> list[np.ndarray]:
    return [_uniform(rng, (h, k), h, k), (0.1 * rng.standard_normal(k)).astype(np.float32)]


def synthetic_weights(cfg: SyntheticConfig, seed: int = 0) -> list[np.ndarray]:
    """Weights of the C1-C3 tagger, in ``keras_model.get_weights()`` order."""
    rng = np.random.default_rng(seed)
    return lstm_weights(rng, cfg.D, cfg.H) + dense_weights(rng, cfg.H, cfg.K)


def tagger_weights(cfg: TaggerConfig, vocab_size: int, seed: int = 0) -> list[np.ndarray]:
    """Weights of the C4 tagger, in ``keras_model.get_weights()`` order."""
    rng = np.random.default_rng(seed)
    emb = (0.5 * rng.standard_normal((vocab_size, cfg.E))).astype(np.float32)
    return ([emb] + lstm_weights(rng, cfg.E, cfg.H) + lstm_weights(rng, cfg.E, cfg.H)
            + dense_weights(rng, 2 * cfg.H, cfg.K))


def build_keras_lstm_tagger(cfg: SyntheticConfig, weights=None):
    """Keras ``LSTM(H, return_sequences=True) -> TimeDistributed(Dense(K, softmax))``."""
    import keras
    model = keras.Sequential([
        keras.Input((cfg.T, cfg.D), dtype="float32"),
        keras.layers.LSTM(cfg.H, return_sequences=True),
        keras.layers.TimeDistributed(keras.layers.Dense(cfg.K, activation="softmax")),
    ], name=f"lstm_tagger_{cfg.name}")
    if weights is not None:
        model.set_weights(weights)
    return model


def build_keras_bilstm_tagger(cfg: TaggerConfig, vocab_size: int, weights=None, *,
                              time_distributed: bool = True):
    """Keras ``Embedding(V, E, mask_zero=True) -> Bidirectional(LSTM(H,
    return_sequences=True)) -> TimeDistributed(Dense(K, softmax))`` on int32 ids [B, T].

    ``time_distributed=False`` applies the Dense directly (Keras's Dense works on the last
    axis, the same computation).  The benchmark runs Keras that way on variable-length
    batches: Keras 3's TimeDistributed, traced with an unknown time dimension (as
    ``predict_on_batch`` does after seeing a second length), maps over the batch size
    instead of the time steps and returns [B, B, K] or fails.
    """
    import keras
    dense = keras.layers.Dense(cfg.K, activation="softmax")
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(vocab_size, cfg.E, mask_zero=True),
        keras.layers.Bidirectional(keras.layers.LSTM(cfg.H, return_sequences=True)),
        keras.layers.TimeDistributed(dense) if time_distributed else dense,
    ], name=f"bilstm_tagger_{cfg.name}")
    if weights is not None:
        model.set_weights(weights)
    return model


# --- workloads -------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    """One configuration's model and input.

    ``kind`` is "lstm" (``inputs`` = [x float32 [B, T, D]]) or "bilstm" (``inputs`` = one
    int32 ids array [B, T] per batch, 0 = padding; ``masks`` the matching bool arrays).
    ``weights`` are the Keras weights (``get_weights()`` order) every provider uses.
    ``keras_model`` is the model fastseq converts; ``keras_run_model`` the one the Keras
    providers run (the same model, or for C4 its twin without the TimeDistributed
    wrapper, see :func:`build_keras_bilstm_tagger`).
    """
    name: str
    kind: str
    config: Any
    keras_model: Any
    weights: list
    inputs: list
    keras_run_model: Any = None
    masks: list | None = None
    gold: list | None = None        # C4: gold tag ids per batch
    n_sentences: int = 0
    n_tokens: int = 0
    flops: float = 0.0              # one pass over all inputs (real tokens only for C4)

    def __post_init__(self):
        if self.keras_run_model is None:
            self.keras_run_model = self.keras_model

    def describe(self) -> str:
        return f"{self.name}: {self.config.describe()}"


def synthetic_workload(cfg: SyntheticConfig, seed: int = 0) -> Workload:
    weights = synthetic_weights(cfg, seed)
    model = build_keras_lstm_tagger(cfg, weights)
    x = np.random.default_rng(seed + 1).standard_normal((cfg.B, cfg.T, cfg.D)).astype(
        np.float32)
    flops = 2.0 * cfg.B * cfg.T * (4 * cfg.H * (cfg.D + cfg.H) + cfg.H * cfg.K)
    return Workload(cfg.name, "lstm", cfg, model, weights, [x], n_sentences=cfg.B,
                    n_tokens=cfg.B * cfg.T, flops=flops)


def ewt_workload(cfg: TaggerConfig, seed: int = 0, model_path=None) -> Workload:
    """C4: the EWT test set, vocabulary from EWT train (:func:`datasets.default_vocab`),
    length-sorted batches.  ``model_path``: a saved Keras model of the same architecture
    (trained with that vocabulary) to use instead of random weights."""
    from . import datasets
    vocab = datasets.default_vocab()
    sentences = datasets.load_ewt("test")
    if cfg.max_sentences is not None:
        sentences = sentences[:cfg.max_sentences]
    if model_path is not None:
        import keras
        model = keras.saving.load_model(model_path)
        emb = [layer for layer in model.layers if layer.__class__.__name__ == "Embedding"]
        if not emb or emb[0].input_dim != len(vocab):
            got = emb[0].input_dim if emb else "no Embedding layer"
            raise ValueError(
                f"{model_path}: the C4 model must start with Embedding(input_dim="
                f"{len(vocab)}) (the vocabulary of datasets.default_vocab()); got {got}")
        weights = model.get_weights()
    else:
        weights = tagger_weights(cfg, len(vocab), seed)
        model = build_keras_bilstm_tagger(cfg, len(vocab), weights)
    e, h, k = weights[0].shape[1], weights[2].shape[0], weights[-1].shape[0]
    run_cfg = dataclasses.replace(cfg, E=e, H=h, K=k)
    run_model = build_keras_bilstm_tagger(run_cfg, len(vocab), weights,
                                          time_distributed=False)
    inputs, masks, gold = [], [], []
    for b in datasets.batches(sentences, vocab, batch_size=cfg.batch_size):
        inputs.append(b.ids)
        masks.append(b.mask)
        gold.append(b.tags)
    n_tok = int(sum(m.sum() for m in masks))
    flops = 2.0 * n_tok * (2 * 4 * h * (e + h) + 2 * h * k)
    return Workload(cfg.name, "bilstm", run_cfg, model, weights, inputs,
                    keras_run_model=run_model, masks=masks, gold=gold,
                    n_sentences=len(sentences), n_tokens=n_tok, flops=flops)


def make_workload(name: str, *, quick: bool = False, seed: int = 0,
                  c4_model=None) -> Workload:
    table = QUICK_CONFIGS if quick else CONFIGS
    if name not in table:
        raise ValueError(f"unknown config {name!r}; expected one of {sorted(table)}")
    cfg = table[name]
    if isinstance(cfg, TaggerConfig):
        return ewt_workload(cfg, seed, model_path=c4_model)
    return synthetic_workload(cfg, seed)


# --- providers -------------------------------------------------------------------------


def set_threads(threads: int | None) -> dict:
    """Apply a thread count to every installed framework (best effort, before use).
    Returns what was set, for the report."""
    done = {}
    if threads is None:
        return done
    n = int(threads)
    try:
        import fastseq
        fastseq.set_num_threads(n)
        done["fastseq"] = n
    except Exception as exc:  # report, don't hide
        done["fastseq"] = f"not set ({exc})"
    if importlib.util.find_spec("torch") is not None:
        import torch
        torch.set_num_threads(n)
        done["torch"] = n
    if importlib.util.find_spec("tensorflow") is not None:
        import tensorflow as tf
        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
            done["tensorflow"] = n
        except RuntimeError as exc:  # TF already initialised in this process
            done["tensorflow"] = f"not set ({exc})"
    done["onnxruntime"] = n
    done["keras-jax"] = "XLA default (not set)"
    return done


def _keras_runner(wl: Workload):
    model = wl.keras_run_model
    if wl.kind == "lstm":
        x = wl.inputs[0]
        return lambda: np.asarray(model.predict_on_batch(x))
    return lambda: [np.asarray(model.predict_on_batch(ids)) for ids in wl.inputs]


def _tf_function_runner(wl: Workload):
    import tensorflow as tf
    model = wl.keras_run_model
    if wl.kind == "lstm":
        sig = [tf.TensorSpec(wl.inputs[0].shape, tf.float32)]
    else:
        sig = [tf.TensorSpec([None, None], tf.int32)]

    @tf.function(jit_compile=False, input_signature=sig)
    def call(x):
        return model(x, training=False)

    if wl.kind == "lstm":
        x = wl.inputs[0]
        return lambda: call(tf.constant(x)).numpy()
    return lambda: [call(tf.constant(ids)).numpy() for ids in wl.inputs]


def _fastseq_runner(wl: Workload):
    import fastseq
    fm = fastseq.from_keras(wl.keras_model)
    if wl.kind == "lstm":
        x = wl.inputs[0]
        return lambda: np.asarray(fm.predict(x))
    return lambda: [np.asarray(fm.predict(ids)) for ids in wl.inputs]


def torch_module(wl: Workload):
    """PyTorch equivalent of the workload's Keras model, with its weights.

    torch.nn.LSTM gate order (i, f, g, o) is Keras's (i, f, c, o); weight_ih = kernel.T,
    weight_hh = recurrent_kernel.T, bias_ih = the Keras bias, bias_hh = 0.
    """
    import torch
    from torch import nn

    def load_lstm(lstm, kernel, recurrent, bias, suffix=""):
        with torch.no_grad():
            getattr(lstm, "weight_ih_l0" + suffix).copy_(torch.from_numpy(kernel.T.copy()))
            getattr(lstm, "weight_hh_l0" + suffix).copy_(torch.from_numpy(recurrent.T.copy()))
            getattr(lstm, "bias_ih_l0" + suffix).copy_(torch.from_numpy(bias))
            getattr(lstm, "bias_hh_l0" + suffix).zero_()

    w = [np.asarray(a, np.float32) for a in wl.weights]
    if wl.kind == "lstm":
        kernel, recurrent, bias, dk, db = w
        d, h = kernel.shape[0], recurrent.shape[0]

        class LstmTagger(nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm = nn.LSTM(d, h, batch_first=True)
                self.dense = nn.Linear(h, dk.shape[1])

            def forward(self, x):
                y, _ = self.lstm(x)
                return torch.softmax(self.dense(y), dim=-1)

        mod = LstmTagger()
        load_lstm(mod.lstm, kernel, recurrent, bias)
    else:
        emb, fk, fr, fb, bk, br, bb, dk, db = w
        e, h = fk.shape[0], fr.shape[0]
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        class BiLstmTagger(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(emb.shape[0], e)
                self.lstm = nn.LSTM(e, h, batch_first=True, bidirectional=True)
                self.dense = nn.Linear(2 * h, dk.shape[1])

            def forward(self, ids, lengths):
                x = self.emb(ids)
                packed = pack_padded_sequence(x, lengths, batch_first=True,
                                              enforce_sorted=False)
                y, _ = self.lstm(packed)
                y, _ = pad_packed_sequence(y, batch_first=True, total_length=ids.shape[1])
                return torch.softmax(self.dense(y), dim=-1)

        mod = BiLstmTagger()
        with torch.no_grad():
            mod.emb.weight.copy_(torch.from_numpy(emb))
        load_lstm(mod.lstm, fk, fr, fb)
        load_lstm(mod.lstm, bk, br, bb, "_reverse")
    with torch.no_grad():
        mod.dense.weight.copy_(torch.from_numpy(dk.T.copy()))
        mod.dense.bias.copy_(torch.from_numpy(db))
    return mod.eval()


def _torch_runner(wl: Workload):
    import torch
    mod = torch_module(wl)
    if wl.kind == "lstm":
        x = wl.inputs[0]

        def run():
            with torch.inference_mode():
                return mod(torch.from_numpy(x)).numpy()
        return run
    lengths = [torch.from_numpy(m.sum(axis=1).astype(np.int64)) for m in wl.masks]

    def run_batches():
        with torch.inference_mode():
            return [mod(torch.from_numpy(ids.astype(np.int64)), n).numpy()
                    for ids, n in zip(wl.inputs, lengths)]
    return run_batches


def onnx_model(wl: Workload):
    """The workload's model as an ONNX graph (:mod:`fastseq.onnx_export`)."""
    from . import onnx_export
    w = [np.asarray(a, np.float32) for a in wl.weights]
    if wl.kind == "lstm":
        return onnx_export.lstm_tagger_onnx(*w)
    emb, fk, fr, fb, bk, br, bb, dk, db = w
    return onnx_export.bilstm_tagger_onnx(emb, (fk, fr, fb), (bk, br, bb), dk, db)


def _ort_runner(wl: Workload, threads: int | None, spinning: bool = ORT_SPINNING):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads) if threads else ORT_DEFAULT_THREADS
    opts.inter_op_num_threads = 1
    # Spinning idle pool threads keep both cores busy for a while after each run and
    # slow whichever provider runs next in this process (up to 100x for PyTorch on a
    # 2-core machine): the benchmark pauses before every timed sample.
    opts.add_session_config_entry("session.intra_op.allow_spinning",
                                  "1" if spinning else "0")
    sess = ort.InferenceSession(onnx_model(wl).SerializeToString(), sess_options=opts,
                                providers=["CPUExecutionProvider"])
    if wl.kind == "lstm":
        x = wl.inputs[0]
        return lambda: sess.run(None, {"x": x})[0]
    lens = [m.sum(axis=1).astype(np.int32) for m in wl.masks]

    def run_batches():
        return [sess.run(None, {"ids": ids.astype(np.int64), "seq_lens": n})[0]
                for ids, n in zip(wl.inputs, lens)]
    return run_batches


def make_runner(provider: str, wl: Workload, *, threads: int | None = None,
                ort_spinning: bool = ORT_SPINNING) -> Callable[[], Any]:
    """Zero-argument callable running all of ``wl``'s input through ``provider``; returns
    the probabilities (one array, or a list of arrays for C4).  ``ort_spinning``: ONNX
    Runtime's intra-op threads spin-wait between runs (its default).  In-process: "keras" and
    "keras-tf-function" need this process's Keras on TensorFlow, "keras-jax" on JAX
    (``fastseq bench`` runs it in a subprocess, see :func:`run_keras_subprocess`)."""
    missing = provider_missing(provider)
    if missing:
        raise ImportError(missing)
    if provider in ("keras", "keras-tf-function", "keras-jax"):
        import keras
        want = "jax" if provider == "keras-jax" else "tensorflow"
        if keras.backend.backend() != want:
            raise RuntimeError(
                f"provider {provider!r} needs Keras on {want}; this process runs Keras on "
                f"{keras.backend.backend()} (KERAS_BACKEND)"
                + (" - use run_keras_subprocess" if want == "jax" else ""))
        if provider == "keras-jax":
            return _keras_runner(wl)
    if provider == "fastseq":
        return _fastseq_runner(wl)
    if provider == "keras":
        return _keras_runner(wl)
    if provider == "keras-tf-function":
        return _tf_function_runner(wl)
    if provider == "torch":
        return _torch_runner(wl)
    if provider == "onnxruntime":
        return _ort_runner(wl, threads, ort_spinning)
    raise ValueError(f"provider {provider!r} does not run in-process")


# --- Keras on another backend, in a subprocess ------------------------------------------


def run_keras_subprocess(wl: Workload, backend: str, *, warmup: int, repeats: int,
                         timeout: float = 900.0) -> dict:
    """Time ``wl``'s Keras model with ``KERAS_BACKEND=backend`` in a fresh interpreter
    (``predict_on_batch``).  Returns {"first_ms", "times_ms", "output"}."""
    with tempfile.TemporaryDirectory(prefix="fastseq-bench-") as tmp:
        tmp = Path(tmp)
        model_path = tmp / "model.keras"
        wl.keras_run_model.save(model_path)
        np.savez(tmp / "inputs.npz", *wl.inputs)
        spec = {"backend": backend, "model": str(model_path), "inputs": str(tmp / "inputs.npz"),
                "outputs": str(tmp / "outputs.npz"), "warmup": int(warmup),
                "repeats": int(repeats)}
        (tmp / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        # Make this copy of fastseq importable in the child whatever its install state.
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-m", "fastseq.benchmark", "--worker",
                               str(tmp / "spec.json")], env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"keras ({backend}) subprocess failed: " + " | ".join(tail))
        result = json.loads((tmp / "timing.json").read_text())
        with np.load(tmp / "outputs.npz") as out:
            outputs = [out[f"arr_{i}"] for i in range(len(out.files))]
    result["output"] = outputs[0] if wl.kind == "lstm" else outputs
    return result


def _worker(spec_path: str) -> int:
    """Subprocess side of :func:`run_keras_subprocess`."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ["KERAS_BACKEND"] = spec["backend"]
    import keras
    if keras.backend.backend() != spec["backend"]:
        raise RuntimeError(f"Keras started with backend {keras.backend.backend()!r}, "
                           f"not {spec['backend']!r}")
    model = keras.saving.load_model(spec["model"])
    with np.load(spec["inputs"]) as f:
        inputs = [f[f"arr_{i}"] for i in range(len(f.files))]

    def run():
        return [np.asarray(model.predict_on_batch(x)) for x in inputs]

    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    for _ in range(spec["warmup"]):
        out = run()
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    np.savez(spec["outputs"], *out)
    timing = {"first_ms": first * 1e3, "times_ms": [t * 1e3 for t in times],
              "version": keras.__version__}
    Path(spec["outputs"]).with_name("timing.json").write_text(json.dumps(timing))
    return 0


# --- machine ---------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    from . import __version__ as fastseq_version
    versions = {"python": platform.python_version(), "fastseq": fastseq_version}
    for dist, key in [("numpy", "numpy"), ("numba", "numba"), ("keras", "keras"),
                      ("tensorflow-cpu", "tensorflow"), ("torch", "torch"),
                      ("onnxruntime", "onnxruntime"), ("onnx", "onnx"), ("jax", "jax")]:
        v = _version(dist)
        if v == "missing" and key == "tensorflow":
            v = _version("tensorflow")
        versions[key] = v
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
            "platform": platform.platform(), "versions": versions}


def measure_sgemm(n: int = 1024, repeats: int = 30) -> dict:
    """Float32 GEMM rate of this machine: best of ``repeats`` numpy ``a @ b`` with
    [n, n] operands (numpy's BLAS, its default threads)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "seconds": best, "gflops": 2.0 * n ** 3 / best / 1e9}


# --- comparison ------------------------------------------------------------------------


def compare_outputs(wl: Workload, out, ref) -> dict:
    """Max abs difference of ``out`` to the Keras reference ``ref`` (real tokens only for
    C4) and argmax (tag) agreement."""
    if wl.kind == "lstm":
        out, ref = np.asarray(out), np.asarray(ref)
        if out.shape != ref.shape:
            raise ValueError(f"output shape {out.shape} != keras {ref.shape}")
        return {"max_abs_diff": float(np.max(np.abs(out.astype(np.float64) - ref))),
                "argmax_agreement": float(np.mean(out.argmax(-1) == ref.argmax(-1)))}
    diff, agree, total = 0.0, 0, 0
    for o, r, m in zip(out, ref, wl.masks):
        o, r = np.asarray(o), np.asarray(r)
        if o.shape != r.shape:
            raise ValueError(f"batch output shape {o.shape} != keras {r.shape}")
        diff = max(diff, float(np.max(np.abs(o[m].astype(np.float64) - r[m]))))
        agree += int(np.sum(o.argmax(-1)[m] == r.argmax(-1)[m]))
        total += int(m.sum())
    return {"max_abs_diff": diff, "argmax_agreement": agree / max(total, 1)}


def gold_accuracy(wl: Workload, out) -> float | None:
    if wl.gold is None:
        return None
    ok = sum(int(np.sum(np.asarray(o).argmax(-1)[m] == g[m]))
             for o, g, m in zip(out, wl.gold, wl.masks))
    return ok / max(wl.n_tokens, 1)


# --- the benchmark ---------------------------------------------------------------------


def _progress(total: int, enabled: bool):
    class _Null:
        def update(self, n=1):
            pass

        def set_description(self, s):
            pass

        def close(self):
            pass
    if not enabled:
        return _Null()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Null()
    return tqdm(total=total, file=sys.stderr, unit="call", leave=False, dynamic_ncols=True)


PAUSE_S = 0.1  # idle time before each timed sample (see run_benchmark)
SAMPLE_S = 0.02  # a timed sample: back-to-back calls for at least this long


def timed_sample(run) -> float:
    """One timed sample of ``run``, in ms per call: after PAUSE_S of idle time (the
    previous provider's worker threads stop spinning first: TF, PyTorch and ONNX
    Runtime pools spin-wait for a while after a call), the mean of back-to-back calls
    lasting at least SAMPLE_S (at least one call), so sub-millisecond calls are not
    timed one by one."""
    time.sleep(PAUSE_S)
    t0 = time.perf_counter()
    n = 0
    while n == 0 or time.perf_counter() - t0 < SAMPLE_S:
        run()
        n += 1
    return (time.perf_counter() - t0) * 1e3 / n


def run_benchmark(configs=("C1", "C2", "C3", "C4"), providers=PROVIDERS, *, repeats: int = 7,
                  warmup: int = 2, quick: bool = False, seed: int = 0,
                  threads: int | None = None, c4_model=None, progress: bool = True,
                  sgemm: bool = True, budget_s: float = 20.0,
                  ort_spinning: bool = ORT_SPINNING) -> dict:
    """Run the benchmark; returns a JSON-able dict (machine, sgemm rate, one result per
    config x provider).

    Per config: every provider's first call is timed on its own (compilation, tracing),
    then ``warmup`` untimed calls, then up to ``repeats`` timed rounds that interleave the
    providers.  A provider whose warm call takes long gets fewer timed runs - about
    ``budget_s`` seconds' worth, but at least 3 (or ``repeats`` if smaller).
    ``ort_spinning``: ONNX Runtime's intra-op threads spin-wait between runs (its
    default; False makes them sleep).
    """
    providers = list(providers)
    for p in providers:
        if p not in PROVIDERS:
            raise ValueError(f"unknown provider {p!r}; expected some of {', '.join(PROVIDERS)}")
    configs = list(configs)
    table = QUICK_CONFIGS if quick else CONFIGS
    for c in configs:
        if c not in table:
            raise ValueError(f"unknown config {c!r}; expected some of {', '.join(table)}")
    repeats = max(1, int(repeats))
    threads_set = set_threads(threads)
    report = {"machine": machine_info(), "threads": threads_set or "framework defaults",
              "onnxruntime_threads": int(threads) if threads else ORT_DEFAULT_THREADS,
              "onnxruntime_spinning": bool(ort_spinning),
              "quick": bool(quick), "repeats": repeats, "warmup": warmup, "seed": seed,
              "budget_s": budget_s, "results": [], "configs": {}}
    # Short GEMMs, many tries: on a shared machine the best try is the least disturbed.
    gemm_n, gemm_reps = (512, 5) if quick else (1024, 30)
    if sgemm:
        report["sgemm"] = measure_sgemm(gemm_n, gemm_reps)
    bar = _progress(len(configs) * len(providers) * (1 + warmup + repeats), progress)
    for cname in configs:
        bar.set_description(f"{cname}: building")
        wl = make_workload(cname, quick=quick, seed=seed, c4_model=c4_model)
        report["configs"][cname] = {"description": wl.config.describe(),
                                    "flops": wl.flops, "sentences": wl.n_sentences,
                                    "tokens": wl.n_tokens, "batches": len(wl.inputs)}
        rows = {p: {"config": cname, "provider": p, "status": "ok"} for p in providers}
        runners, outputs, times = {}, {}, {p: [] for p in providers}
        n_runs = {}
        steps_per_provider = 1 + warmup + repeats
        for p in providers:
            missing = provider_missing(p)
            if missing:
                rows[p]["status"] = missing
                bar.update(steps_per_provider)
                continue
            bar.set_description(f"{cname}: {p} first call")
            try:
                if p == "keras-jax":
                    res = run_keras_subprocess(wl, "jax", warmup=warmup, repeats=repeats)
                    rows[p]["first_call_ms"] = res["first_ms"]
                    times[p] = list(res["times_ms"])
                    outputs[p] = res["output"]
                    bar.update(steps_per_provider)
                    continue
                runners[p] = make_runner(p, wl, threads=threads,
                                         ort_spinning=ort_spinning)
                t0 = time.perf_counter()
                outputs[p] = runners[p]()
                warm_s = time.perf_counter() - t0
                rows[p]["first_call_ms"] = warm_s * 1e3
                bar.update(1)
                for _ in range(warmup):
                    t0 = time.perf_counter()
                    outputs[p] = runners[p]()
                    warm_s = time.perf_counter() - t0
                    bar.update(1)
                if p == "fastseq":
                    # on a cold compile cache, fastseq's worker thread is still
                    # compiling its loop (holding the GIL for seconds): let it finish,
                    # so that it is not timed as part of another framework's calls
                    from . import _threads
                    _threads.wait_for_workers()
                n_runs[p] = min(repeats, max(3, int(budget_s / max(warm_s, 1e-9))))
                bar.update(repeats - n_runs[p])
            except Exception as exc:  # a provider failing is a result, not a crash
                rows[p]["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
                runners.pop(p, None)
                outputs.pop(p, None)
                bar.update(steps_per_provider)
        # Timed rounds: every round runs each provider once; the start rotates so no
        # provider always follows the same one.
        live = [p for p in providers if p in runners]
        bar.set_description(f"{cname}: timing")
        for r in range(repeats):
            now = [p for p in live if n_runs[p] > r]
            k = r % max(len(now), 1)
            for p in now[k:] + now[:k]:
                times[p].append(timed_sample(runners[p]))
                bar.update(1)
        # The reference: Keras predict_on_batch (computed here when it was not timed).
        ref = outputs.get("keras")
        if ref is None and provider_missing("keras") is None:
            try:
                ref = _keras_runner(wl)()
            except Exception as exc:
                report["configs"][cname]["reference_error"] = f"{type(exc).__name__}: {exc}"
        for p in providers:
            row = rows[p]
            if p not in outputs:
                report["results"].append(row)
                continue
            med = statistics.median(times[p])
            row["median_ms"] = med
            row["min_ms"] = min(times[p])
            row["runs"] = len(times[p])
            row["times_ms"] = times[p]
            row["gflops"] = wl.flops / (med / 1e3) / 1e9
            if "sgemm" in report:
                row["pct_sgemm"] = 100.0 * row["gflops"] / report["sgemm"]["gflops"]
            if wl.kind == "bilstm":
                row["sentences_per_s"] = wl.n_sentences / (med / 1e3)
                row["gold_accuracy"] = gold_accuracy(wl, outputs[p])
            if ref is not None:
                try:
                    cmp = compare_outputs(wl, outputs[p], ref)
                    row["max_abs_diff"] = cmp["max_abs_diff"]
                    row["tag_agreement"] = cmp["argmax_agreement"]
                except ValueError as exc:
                    row["status"] = f"error: {exc}"
            report["results"].append(row)
        base = rows.get("fastseq", {}).get("median_ms")
        for p in providers:
            if base and "median_ms" in rows[p]:
                rows[p]["ratio_to_fastseq"] = rows[p]["median_ms"] / base
    bar.close()
    if sgemm:
        # Measured again at the end; the better figure is the machine's rate (a busy
        # machine lowers it).
        again = measure_sgemm(gemm_n, gemm_reps)
        report["sgemm_start_gflops"] = report["sgemm"]["gflops"]
        if again["gflops"] > report["sgemm"]["gflops"]:
            report["sgemm"] = again
        for row in report["results"]:
            if "gflops" in row:
                row["pct_sgemm"] = 100.0 * row["gflops"] / report["sgemm"]["gflops"]
    return report


# --- output ----------------------------------------------------------------------------


def _fmt(v, spec, dash="-"):
    return dash if v is None else format(v, spec)


def format_table(report: dict) -> str:
    """The benchmark report as a plain-text table (plus a header naming the machine)."""
    m = report["machine"]
    v = m["versions"]
    lines = [
        f"machine: {m['cpu']}, {m['logical_cores']} logical cores "
        f"({m['usable_cores']} usable), {m['platform']}",
        "versions: " + ", ".join(f"{k} {v[k]}" for k in v),
        f"threads: {report['threads']}; onnxruntime intra_op threads "
        f"{report['onnxruntime_threads']} (spin-waiting "
        f"{'on' if report.get('onnxruntime_spinning', False) else 'off'})",
    ]
    if "sgemm" in report:
        s = report["sgemm"]
        lines.append(f"float32 GEMM rate (numpy matmul {s['n']}x{s['n']}, best of the "
                     f"start and end of the run): {s['gflops']:.1f} GFLOP/s; '% sgemm' = "
                     f"model GFLOP/s / this rate")
    for name, c in report["configs"].items():
        lines.append(f"{name}: {c['description']}; {c['flops'] / 1e9:.3g} GFLOP per pass")
    lines.append(f"median of up to {report['repeats']} timed runs (column 'runs'; fewer when "
                 f"a call takes over {report.get('budget_s', 0) / report['repeats']:.3g} s) "
                 f"after {report['warmup']} warm-up runs, the providers interleaved, each "
                 f"timed sample after a {PAUSE_S:g} s pause and averaged over back-to-back "
                 f"calls lasting ~20 ms; 'first ms': the first call "
                 f"(compilation/tracing); 'x fastseq' = median / fastseq median (>1: slower "
                 f"than fastseq); 'max abs diff' to keras predict_on_batch")
    head = ["config", "provider", "median ms", "runs", "first ms", "x fastseq",
            "max abs diff",
            "argmax agree", "GFLOP/s", "% sgemm", "sent/s"]
    body, notes = [], []
    for r in report["results"]:
        if "median_ms" not in r:
            notes.append(len(body))
            body.append([r["config"], r["provider"], r["status"]])
            continue
        body.append([
            r["config"], r["provider"], _fmt(r.get("median_ms"), ".3f"),
            _fmt(r.get("runs"), "d"), _fmt(r.get("first_call_ms"), ".1f"), _fmt(r.get("ratio_to_fastseq"), ".2f"),
            _fmt(r.get("max_abs_diff"), ".2e"), _fmt(r.get("tag_agreement"), ".4f"),
            _fmt(r.get("gflops"), ".2f"), _fmt(r.get("pct_sgemm"), ".1f"),
            _fmt(r.get("sentences_per_s"), ".0f"),
        ] + ([r["status"]] if r["status"] != "ok" else []))
    widths = [len(h) for h in head]
    for i, b in enumerate(body):
        cells = b[:2] if i in notes else b[:len(head)]
        for j, c in enumerate(cells):
            widths[j] = max(widths[j], len(str(c)))

    def fmt_row(cells, is_note=False):
        out = [str(cells[0]).ljust(widths[0]), str(cells[1]).ljust(widths[1])]
        if is_note:
            return "  ".join(out + [str(cells[2])])
        out += [str(c).rjust(widths[j + 2]) for j, c in enumerate(cells[2:len(head)])]
        line = "  ".join(out)
        return line + ("  " + cells[len(head)] if len(cells) > len(head) else "")

    lines.append(fmt_row(head))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt_row(b, i in notes) for i, b in enumerate(body))
    return "\n".join(lines)


def write_plot(report: dict, path) -> None:
    """Bar chart (PNG, Agg backend) of each provider's median time relative to fastseq."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = list(report["configs"])
    providers = []
    for r in report["results"]:
        if r["provider"] not in providers:
            providers.append(r["provider"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(configs) + 2), 4))
    width = 0.8 / max(len(providers), 1)
    for j, p in enumerate(providers):
        vals = []
        for c in configs:
            row = next((r for r in report["results"]
                        if r["config"] == c and r["provider"] == p), {})
            vals.append(row.get("ratio_to_fastseq", np.nan))
        xs = np.arange(len(configs)) + (j - (len(providers) - 1) / 2) * width
        label = p if any(np.isfinite(vals)) else f"{p} (not run)"
        ax.bar(xs, vals, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(configs)), configs)
    ax.set_yscale("log")
    ax.set_ylabel("median time / fastseq median (log)")
    ax.set_title(f"fastseq bench - {report['machine']['cpu']}, "
                 f"{report['machine']['usable_cores']} cores")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # subprocess worker (keras on another backend)
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2]))
    sys.exit("usage: python -m fastseq.benchmark --worker SPEC.json (internal); "
             "run the benchmark with `fastseq bench`")
