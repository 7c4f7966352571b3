"""One-shot GPU check of the fastseq CUDA backend (run by bench/gpu_check.sh).

On one H100/H200, in a few minutes and without downloads:

1. correctness: the CUDA LSTM (float32) against a float64 reference (PyTorch nn.LSTM in
   float64 on the GPU: same gate order i, f, c/g, o as Keras) and against the fastseq
   CPU path; relative error = max|a - ref| / max|ref| must be <= 1e-5.  Keras
   semantics (mask, go_backwards, zero_output_for_mask, initial state) are checked on
   one configuration against the fastseq CPU path in float32 and float64, on both the
   persistent and the per-step kernel, and the tiled Numba GEMM (no CuPy) once.
2. speed: fastseq (device arrays in and out, weights uploaded once) against PyTorch
   ``nn.LSTM`` (cuDNN) with TF32 off and on (``torch.backends.cuda.matmul.allow_tf32``
   and ``torch.backends.cudnn.allow_tf32``), and the fused Dense+softmax against
   ``Linear`` + ``softmax`` with its achieved memory bandwidth, for B in {1, 8, 64,
   256}, H in {256, 512, 1024}, T=100, D=H, K=50, float32.  Whether cuDNN really used
   TF32 is judged from its error against the float64 reference (TF32 rounds the inputs
   of the products to 10 mantissa bits: errors of about 1e-3 instead of 1e-6).

Prints a markdown table and, when $OUT is set (or --json), writes the results as JSON.
Every configuration runs in its own try/except: errors are reported, not fatal.

``--dry-run``: tiny shapes and the Numba CUDA simulator friendly settings, so the logic
of this script can be exercised without a GPU (NUMBA_ENABLE_CUDASIM=1; PyTorch then
runs on the CPU).
"""
import argparse
import json
import os
import platform
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("CUPY_TF32", "0")        # keep CuPy's GEMM in full FP32
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REL_TOL = 1e-5


def rel_err(a, ref):
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-30)
    return float(np.max(np.abs(a - ref))) / scale if a.size else 0.0


class Ctx:
    """Device helpers: array upload/download and timing, CuPy when installed."""

    def __init__(self, dry):
        from numba import cuda
        self.cuda = cuda
        self.dry = dry
        try:
            if dry:
                raise ImportError
            import cupy
            self.cupy = cupy
        except Exception:
            self.cupy = None
        try:
            import torch
        except ImportError:
            if not dry:
                raise
            torch = None          # dry run without PyTorch: CPU float64 reference only
        self.torch = torch
        self.tdev = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
        if not dry and self.tdev != "cuda":
            raise RuntimeError("PyTorch cannot see a CUDA GPU")

    def to_dev(self, a):
        if self.cupy is not None:
            return self.cupy.asarray(a)
        return self.cuda.to_device(a)

    def to_host(self, a):
        if self.cupy is not None and isinstance(a, self.cupy.ndarray):
            return self.cupy.asnumpy(a)
        if hasattr(a, "copy_to_host"):
            return a.copy_to_host()
        if hasattr(a, "detach"):
            return a.detach().cpu().numpy()
        return np.asarray(a)

    def sync(self):
        self.cuda.synchronize()
        if self.torch is not None and self.tdev == "cuda":
            self.torch.cuda.synchronize()

    def bench(self, fn, min_time=0.25, max_reps=50, warmup=2):
        """Median wall time of fn() in seconds (device synchronised around each call)."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        t_end = time.perf_counter() + min_time
        while len(times) < max_reps and (len(times) < 3 or time.perf_counter() < t_end):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
            if self.dry:
                break
        return float(np.median(times))


def make_weights(rng, D, H, dt=np.float32):
    s = 1.0 / np.sqrt(H)
    W = rng.uniform(-s, s, (D, 4 * H)).astype(dt)
    U = rng.uniform(-s, s, (H, 4 * H)).astype(dt)
    b = rng.uniform(-s, s, 4 * H).astype(dt)
    for a in (W, U, b):
        a.setflags(write=False)      # read-only: fastseq uploads them once and caches
    return W, U, b


def torch_lstm(ctx, W, U, b, dtype):
    torch = ctx.torch
    D, H = W.shape[0], U.shape[0]
    m = torch.nn.LSTM(D, H, batch_first=True).to(device=ctx.tdev, dtype=dtype)
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.as_tensor(np.ascontiguousarray(W.T)))
        m.weight_hh_l0.copy_(torch.as_tensor(np.ascontiguousarray(U.T)))
        m.bias_ih_l0.copy_(torch.as_tensor(np.array(b)))
        m.bias_hh_l0.zero_()
    m.eval()
    return m


def set_tf32(torch, on):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def run_config(ctx, B, H, T, K, args):
    import fastseq
    from fastseq import _cuda
    torch = ctx.torch
    rec = {"B": B, "H": H, "T": T, "D": H, "K": K}
    rng = np.random.default_rng(1000 * B + H)
    D = H
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    W, U, b = make_weights(rng, D, H)
    s = 1.0 / np.sqrt(H)
    Wd = rng.uniform(-s * 4, s * 4, (H, K)).astype(np.float32)
    bd = rng.uniform(-0.5, 0.5, K).astype(np.float32)
    Wd.setflags(write=False)
    bd.setflags(write=False)

    ref, ref_probs = reference(ctx, x, W, U, b, Wd, bd)

    # fastseq on device arrays (weights: read-only NumPy arrays, uploaded once)
    xd = ctx.to_dev(x)

    def fs_lstm():
        return fastseq.lstm(xd, W, U, b, return_sequences=True, device="cuda")

    out_d = fs_lstm()
    ctx.sync()
    rec["path"] = _cuda.last_lstm_path[0]
    rec["path_detail"] = _cuda.last_lstm_path[1]
    out = ctx.to_host(out_d)
    rec["rel_err_lstm"] = rel_err(out, ref)
    if not args.no_cpu_check and time.perf_counter() < args.deadline_cpu:
        cpu = fastseq.lstm(x, W, U, b, return_sequences=True, device="cpu")
        rec["rel_err_lstm_vs_cpu"] = rel_err(out, cpu)
        rec["rel_err_cpu_lstm"] = rel_err(cpu, ref)
    else:
        rec["rel_err_lstm_vs_cpu"] = None   # reported as skipped
    rec["t_fastseq_lstm_ms"] = 1e3 * ctx.bench(fs_lstm)
    if rec["path"] == "persistent" and not args.quick:
        old = _cuda.LSTM_MODE
        _cuda.LSTM_MODE = "stepwise"
        try:
            o2 = fs_lstm()
            rec["rel_err_lstm_stepwise"] = rel_err(ctx.to_host(o2), ref)
            rec["t_fastseq_lstm_stepwise_ms"] = 1e3 * ctx.bench(fs_lstm)
        finally:
            _cuda.LSTM_MODE = old

    # fused Dense + softmax on the LSTM output (device arrays)
    def fs_dense():
        return fastseq.dense(out_d, Wd, bd, activation="softmax", device="cuda")

    probs = ctx.to_host(fs_dense())
    rec["rel_err_dense"] = rel_err(probs, ref_probs)
    t = ctx.bench(fs_dense)
    rec["t_fastseq_dense_ms"] = 1e3 * t
    M = B * T
    nbytes = 4 * (M * H + H * K + K + M * K)
    rec["dense_GBps"] = nbytes / t / 1e9
    # the single fused kernel (the default with CuPy is cuBLAS + bias/softmax kernel)
    old = _cuda.DENSE_GEMM
    try:
        _cuda.DENSE_GEMM = "never"
        rec["rel_err_dense_fused"] = rel_err(ctx.to_host(fs_dense()), ref_probs)
        rec["t_fastseq_dense_fused_ms"] = 1e3 * ctx.bench(fs_dense)
    finally:
        _cuda.DENSE_GEMM = old
    idx = _cuda.argmax_dense_cuda(out_d, Wd, bd, "softmax")
    rec["argmax_agree"] = float(np.mean(ctx.to_host(idx) == ref_probs.argmax(-1)))
    rec["t_fastseq_argmax_ms"] = 1e3 * ctx.bench(
        lambda: _cuda.argmax_dense_cuda(out_d, Wd, bd, "softmax"))

    if torch is None:
        rec["ok"] = _ok(rec)
        return rec
    # PyTorch nn.LSTM (cuDNN), float32, TF32 off / on
    with torch.no_grad():
        m32 = torch_lstm(ctx, W, U, b, torch.float32)
        xt = torch.as_tensor(x, device=ctx.tdev)
        for tf32 in (False, True):
            set_tf32(torch, tf32)
            tag = "tf32" if tf32 else "fp32"
            o = m32(xt)[0]
            rec[f"rel_err_torch_{tag}"] = rel_err(ctx.to_host(o), ref)
            rec[f"t_torch_lstm_{tag}_ms"] = 1e3 * ctx.bench(lambda: m32(xt))
        set_tf32(torch, False)
    rec["cudnn_used_tf32"] = bool(
        rec["rel_err_torch_tf32"] > 10 * max(rec["rel_err_torch_fp32"], 1e-7))
    with torch.no_grad():
        lin = torch.nn.Linear(H, K).to(ctx.tdev)
        lin.weight.copy_(torch.as_tensor(np.ascontiguousarray(Wd.T)))
        lin.bias.copy_(torch.as_tensor(np.array(bd)))
        yt = torch.as_tensor(out, device=ctx.tdev)
        rec["t_torch_dense_ms"] = 1e3 * ctx.bench(lambda: torch.softmax(lin(yt), -1))
    rec["ok"] = _ok(rec)
    return rec


def _ok(rec):
    return bool(rec["rel_err_lstm"] <= REL_TOL and rec["rel_err_dense"] <= REL_TOL
                and rec.get("rel_err_dense_fused", 0.0) <= REL_TOL
                and (rec["rel_err_lstm_vs_cpu"] is None
                     or rec["rel_err_lstm_vs_cpu"] <= 2 * REL_TOL)
                and rec.get("rel_err_lstm_stepwise", 0.0) <= REL_TOL
                and rec["argmax_agree"] >= 0.999)


def reference(ctx, x, W, U, b, Wd, bd):
    """float64 LSTM sequence and Dense softmax: PyTorch float64 on the GPU (cuDNN does
    not use TF32 for doubles); the fastseq CPU path in float64 when PyTorch is missing
    (dry run only)."""
    torch = ctx.torch
    if torch is None:
        import fastseq
        f = np.float64
        ref = fastseq.lstm(x.astype(f), W.astype(f), U.astype(f), b.astype(f),
                           return_sequences=True, device="cpu")
        z = ref @ Wd.astype(f) + bd.astype(f)
        e = np.exp(z - z.max(-1, keepdims=True))
        return ref, e / e.sum(-1, keepdims=True)
    with torch.no_grad():
        m64 = torch_lstm(ctx, W, U, b, torch.float64)
        xt64 = torch.as_tensor(x, dtype=torch.float64, device=ctx.tdev)
        ref = m64(xt64)[0]
        lin64 = torch.nn.functional.linear(ref, torch.as_tensor(
            Wd.T.astype(np.float64), device=ctx.tdev), torch.as_tensor(
            bd.astype(np.float64), device=ctx.tdev))
        ref_probs = ctx.to_host(torch.softmax(lin64, -1))
        return ctx.to_host(ref), ref_probs


def semantics_check(ctx, B, H, T, args):
    """Masking / go_backwards / zero_output_for_mask / states vs the CPU path, both
    kernels, float32 and float64; plus the Numba tiled GEMM once."""
    import fastseq
    from fastseq import _cuda
    rng = np.random.default_rng(7)
    res = []
    x = rng.standard_normal((B, T, H)).astype(np.float32)
    W, U, b = make_weights(rng, H, H)
    h0 = rng.standard_normal((B, H)).astype(np.float32)
    c0 = rng.standard_normal((B, H)).astype(np.float32)
    mask = rng.random((B, T)) > 0.3
    mask[0, : T // 3] = False
    mask[-1] = False
    for dt in (np.float32, np.float64):
        for mode in ("persistent", "stepwise", "numba_gemm"):
            for back, zofm in ((False, False), (True, True)):
                r = {"dtype": np.dtype(dt).name, "mode": mode, "go_backwards": back,
                     "zero_output_for_mask": zofm}
                old = (_cuda.LSTM_MODE, _cuda.USE_CUPY)
                try:
                    _cuda.LSTM_MODE = "stepwise" if mode == "stepwise" else "auto"
                    _cuda.USE_CUPY = mode != "numba_gemm"
                    kw = dict(initial_state=[h0.astype(dt), c0.astype(dt)], mask=mask,
                              return_sequences=True, return_state=True,
                              go_backwards=back, zero_output_for_mask=zofm)
                    g = fastseq.lstm(x.astype(dt), W.astype(dt), U.astype(dt),
                                     b.astype(dt), device="cuda", **kw)
                    r["path"] = _cuda.last_lstm_path[0]
                    c = fastseq.lstm(x.astype(dt), W.astype(dt), U.astype(dt),
                                     b.astype(dt), device="cpu", **kw)
                    r["rel_err_vs_cpu"] = max(rel_err(gg, cc) for gg, cc in zip(g, c))
                    tol = REL_TOL if dt == np.float32 else 1e-12
                    r["ok"] = r["rel_err_vs_cpu"] <= tol
                except Exception as exc:
                    r["error"] = f"{type(exc).__name__}: {exc}"
                    r["ok"] = False
                finally:
                    _cuda.LSTM_MODE, _cuda.USE_CUPY = old
                res.append(r)
    return res


class _tunables:
    """Set attributes of fastseq._cuda for a block, then restore them."""

    def __init__(self, values):
        from fastseq import _cuda
        self.mod, self.values = _cuda, values

    def __enter__(self):
        self.old = {k: getattr(self.mod, k) for k in self.values}
        for k, v in self.values.items():
            setattr(self.mod, k, v)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            setattr(self.mod, k, v)
        return False


def _time_lstm(ctx, r, B, H, T, rng, weights):
    """Time fastseq.lstm on device arrays [B, T, H] (D = H) into record r."""
    import fastseq
    from fastseq import _cuda
    if H not in weights:
        weights[H] = make_weights(rng, H, H)
    W, U, b = weights[H]
    xd = ctx.to_dev(rng.standard_normal((B, T, H)).astype(np.float32))
    f = lambda: fastseq.lstm(xd, W, U, b, return_sequences=True,  # noqa: E731
                             device="cuda")
    y = ctx.to_host(f())
    r["path"] = " ".join(_cuda.last_lstm_path)
    if _cuda.LSTM_MODE != "auto":
        # the same call in the default mode, as the reference for this mode's output
        mode, _cuda.LSTM_MODE = _cuda.LSTM_MODE, "auto"
        try:
            r["rel_err_vs_auto"] = rel_err(y, ctx.to_host(f()))
        finally:
            _cuda.LSTM_MODE = mode
    r["ms"] = 1e3 * ctx.bench(f, min_time=0.15, max_reps=20)


def tuning(ctx, T, K, args):
    """Timings of the main tunables of fastseq._cuda on a few shapes (for choosing
    defaults); each entry is independent and reports its own error."""
    import fastseq
    out = []
    H = 5 if args.dry_run else 1024
    rng = np.random.default_rng(3)
    s = 1.0 / np.sqrt(H)
    Wd = rng.uniform(-4 * s, 4 * s, (H, K)).astype(np.float32)
    bd = np.zeros(K, np.float32)
    KB = 1024
    lstm_grid = ([(3, 5, {"THREADS_PER_BLOCK": 16}), (3, 5, {"LSTM_MODE": "gemm"})]
                 if args.dry_run else [
        # a cuBLAS GEMM and a cell launch per step (untimed before; the persistent
        # kernel's times for these shapes are in the main table)
        (256, 1024, {"LSTM_MODE": "gemm"}),
        (64, 1024, {"LSTM_MODE": "gemm"}),
        (256, 512, {"LSTM_MODE": "gemm"}),
        (8, 1024, {"LSTM_MODE": "gemm"}),
        (1, 1024, {"THREADS_PER_BLOCK": 256, "PERSISTENT_BLOCKS_PER_SM": 1}),
        (1, 1024, {"THREADS_PER_BLOCK": 256, "PERSISTENT_BLOCKS_PER_SM": 2}),
        (1, 1024, {"THREADS_PER_BLOCK": 128, "PERSISTENT_BLOCKS_PER_SM": 1}),
        (8, 1024, {"H_STAGE_BYTES": 0}),
        (8, 1024, {"H_STAGE_BYTES": 48 * KB}),
        (64, 256, {"H_STAGE_BYTES": 0}),
        (64, 256, {"H_STAGE_BYTES": 96 * KB})])
    weights = {}
    for B, HH, tun in lstm_grid:
        if time.perf_counter() > args.deadline:
            out.append({"what": "lstm", "B": B, "error": "skipped: time budget"})
            continue
        r = {"what": "lstm", "B": B, "H": HH, **tun}
        try:
            with _tunables(tun):
                _time_lstm(ctx, r, B, HH, T, rng, weights)
        except Exception as exc:
            r["error"] = f"{type(exc).__name__}: {exc}"[:300]
        out.append(r)
    Bd = 3 if args.dry_run else 256
    y = ctx.to_dev(rng.standard_normal((Bd, T, H)).astype(np.float32))
    dense_grid = ([{"DENSE_GEMM": "never", "DENSE_ROWS_PER_BLOCK": 4,
                    "DENSE_THREADS_PER_BLOCK": 8}] if args.dry_run else
                  [{"DENSE_GEMM": "auto"}, {"DENSE_GEMM": "always"},
                   {"DENSE_GEMM": "never", "DENSE_ROWS_PER_BLOCK": 16,
                    "DENSE_THREADS_PER_BLOCK": 64},
                   {"DENSE_GEMM": "never", "DENSE_ROWS_PER_BLOCK": 32,
                    "DENSE_THREADS_PER_BLOCK": 64}])
    for tun in dense_grid:
        if time.perf_counter() > args.deadline:
            out.append({"what": "dense", "error": "skipped: time budget"})
            continue
        r = {"what": "dense_softmax", "rows": Bd * T, "H": H, "K": K, **tun}
        try:
            with _tunables(tun):
                f = lambda: fastseq.dense(y, Wd, bd, activation="softmax",  # noqa: E731
                                          device="cuda")
                f()
                t = ctx.bench(f, min_time=0.15, max_reps=20)
            r["ms"] = 1e3 * t
            r["GBps"] = 4 * (Bd * T * H + H * K + K + Bd * T * K) / t / 1e9
        except Exception as exc:
            r["error"] = f"{type(exc).__name__}: {exc}"[:300]
        out.append(r)
    return out


def fmt(v, nd=3):
    if v is None:
        return "skipped"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4):
            return f"{v:.2e}"
        return f"{v:.{nd}f}"
    return str(v)


def table(rows):
    cols = [("B", "B"), ("H", "H"), ("path", "kernel"),
            ("t_fastseq_lstm_ms", "fastseq LSTM ms"),
            ("t_fastseq_lstm_stepwise_ms", "per-step ms"),
            ("t_torch_lstm_fp32_ms", "cuDNN fp32 ms"),
            ("t_torch_lstm_tf32_ms", "cuDNN tf32 ms"),
            ("rel_err_lstm", "fastseq rel err"),
            ("rel_err_lstm_vs_cpu", "vs CPU"),
            ("rel_err_torch_fp32", "cuDNN fp32 err"),
            ("rel_err_torch_tf32", "cuDNN tf32 err"),
            ("cudnn_used_tf32", "cuDNN used TF32"),
            ("t_fastseq_dense_ms", "Dense+softmax ms"),
            ("dense_GBps", "GB/s"),
            ("t_torch_dense_ms", "Linear+softmax ms"),
            ("t_fastseq_dense_fused_ms", "fused kernel ms"),
            ("rel_err_dense", "dense err"), ("ok", "ok")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['B']} | {r['H']} | ERROR: "
                         + r["error"].strip().splitlines()[-1][:200] + " |")
            continue
        lines.append("| " + " | ".join(fmt(r.get(k)) if k in r else "-" for k, _ in cols)
                     + " |")
    return "\n".join(lines)


def training_check(ctx, args):
    """The CUDA BPTT kernels (``lstm_vjp(device="cuda")``) in both training modes
    against the CPU kernels, with a mask, go_backwards and initial states, float32 and
    float64; and the time of one forward + backward against PyTorch's cuDNN LSTM (host
    arrays in and out for fastseq, so its time includes the uploads and downloads; a
    second, larger shape is timed in float32 only)."""
    shapes = [(3, 4, 3, 5)] if args.dry_run else [(32, 50, 128, 256), (64, 100, 256, 512)]
    res = []
    for i, (B, T, D, H) in enumerate(shapes):
        cases = [(np.float32, 1e-4, False)]
        if i == 0:
            cases += [(np.float32, 1e-4, True), (np.float64, 1e-9, False),
                      (np.float64, 1e-9, True)]
        res += _training_cases(ctx, B, T, D, H, cases)
    nbytes = 64 << 10 if args.dry_run else 16 << 20
    try:
        rates = _copy_rates(ctx, nbytes)
    except Exception as exc:
        rates = {"error": f"{type(exc).__name__}: {exc}"}
    print(f"host<->device copies ({nbytes >> 10} KiB): "
          + ", ".join(f"{k}={fmt(v)}" for k, v in rates.items()))
    res.append({"what": "copy_rates", "ok": "error" not in rates, **rates})
    return res


def _host_profile(fn, reps=5, top=14):
    """Where the host time of ``fn`` goes (cProfile over ``reps`` calls after one
    warm-up): the ``top`` functions by own time, as text lines.  Kernel launches are
    asynchronous, so kernel time shows up in the calls that wait for it (copies to
    the host, synchronisations)."""
    import cProfile
    import io
    import pstats
    fn()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(reps):
        fn()
    pr.disable()
    out = []
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).strip_dirs().sort_stats(key).print_stats(top)
        lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        print(f"host profile ({reps} calls, by {key}):")
        for ln in lines[-top - 1:]:
            print("   ", ln[:150])
        out += [f"by {key}:"] + lines[-top - 1:]
    return out


def _time_bwd_recurrence(ctx, _cuda, xtm, W, U, b, mtm, h0, c0, dy, stage_bytes=None):
    """ms of ``_cuda._bwd_recurrence`` (the backward recurrence on device arrays), with
    ``_cuda.TRAIN_STAGE_BYTES = stage_bytes``."""
    from numba import cuda
    _, saved = _cuda.lstm_train_forward_cuda(xtm, W, U, b, mtm, h0, c0)
    doutd = cuda.to_device(np.ascontiguousarray(dy.transpose(1, 0, 2)))
    dh = cuda.to_device(np.zeros_like(h0))
    dc = cuda.to_device(np.zeros_like(c0))
    old = _cuda.TRAIN_STAGE_BYTES
    _cuda.TRAIN_STAGE_BYTES = stage_bytes
    try:
        return 1e3 * ctx.bench(lambda: _cuda._bwd_recurrence(cuda, saved, doutd, dh, dc))
    finally:
        _cuda.TRAIN_STAGE_BYTES = old


def _copy_rates(ctx, nbytes=16 << 20):
    """GB/s of host -> device and device -> host copies of ``nbytes`` through Numba,
    from pageable and from pinned host memory."""
    from numba import cuda
    out = {}
    a = np.ones(nbytes // 4, np.float32)
    d = cuda.to_device(a)
    p = cuda.pinned_array(a.shape, np.float32)
    p[:] = a
    for name, host in (("pageable", a), ("pinned", p)):
        out[f"h2d_{name}_GBps"] = nbytes / ctx.bench(lambda: cuda.to_device(host)) / 1e9
        out[f"d2h_{name}_GBps"] = nbytes / ctx.bench(lambda: d.copy_to_host(host)) / 1e9
    return out


def _training_cases(ctx, B, T, D, H, cases):
    from fastseq import _cuda
    from fastseq.training import lstm_vjp
    rng = np.random.default_rng(11)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    W, U, b = make_weights(rng, D, H)
    mask = rng.random((B, T)) > 0.2
    mask[0, T // 2:] = False
    h0 = rng.standard_normal((B, H)).astype(np.float32)
    c0 = rng.standard_normal((B, H)).astype(np.float32)
    dy = rng.standard_normal((B, T, H)).astype(np.float32)
    res = []
    for dt, tol, back in cases:
        r = {"dtype": np.dtype(dt).name, "B": B, "T": T, "D": D, "H": H,
             "go_backwards": back}
        try:
            kw = dict(initial_state=[h0.astype(dt), c0.astype(dt)], mask=mask,
                      return_sequences=True, go_backwards=back)
            args_ = (x.astype(dt), W.astype(dt), U.astype(dt), b.astype(dt),
                     dy.astype(dt))
            c = lstm_vjp(*args_, device="cpu", **kw)
            r["ok"] = True
            # both training modes: "auto" (persistent recurrences) and "stepwise"
            for mode in ("auto", "stepwise"):
                _cuda.TRAIN_MODE = mode
                try:
                    g = lstm_vjp(*args_, device="cuda", **kw)
                    r[f"path_{mode}"] = _cuda.last_train_path[0]
                    err = max(rel_err(g[k], c[k]) for k in c if c[k] is not None)
                    r[f"rel_err_vs_cpu_{mode}"] = err
                    r["ok"] = r["ok"] and err <= tol
                    if dt == np.float32 and not back:
                        r[f"t_fastseq_vjp_{mode}_ms"] = 1e3 * ctx.bench(
                            lambda: lstm_vjp(*args_, device="cuda", **kw))
                        # the forward pass alone (time-major host arrays, as training
                        # calls it)
                        xtm = np.ascontiguousarray(x.transpose(1, 0, 2))
                        mtm = np.ascontiguousarray(mask.T).view(np.uint8)
                        r[f"t_fastseq_fwd_{mode}_ms"] = 1e3 * ctx.bench(
                            lambda: _cuda.lstm_train_forward_cuda(xtm, W, U, b, mtm, h0,
                                                                  c0))
                        # the backward pass alone (host arrays in and out)
                        _, saved = _cuda.lstm_train_forward_cuda(xtm, W, U, b, mtm, h0, c0)
                        dytm = np.ascontiguousarray(dy.transpose(1, 0, 2))
                        r[f"t_fastseq_bwd_{mode}_ms"] = 1e3 * ctx.bench(
                            lambda: _cuda.lstm_train_backward_cuda(saved, dytm))
                        del saved
                        # the backward recurrence alone, device arrays in and out (in
                        # "auto" mode: dz staged in shared memory, whatever its size)
                        r[f"t_bwd_recurrence_{mode}_ms"] = _time_bwd_recurrence(
                            ctx, _cuda, xtm, W, U, b, mtm, h0, c0, dy)
                        if mode == "auto":   # dz read from global memory
                            r["t_bwd_recurrence_global_ms"] = _time_bwd_recurrence(
                                ctx, _cuda, xtm, W, U, b, mtm, h0, c0, dy, stage_bytes=0)
                            r["path_global"] = _cuda.last_train_path[1]
                finally:
                    _cuda.TRAIN_MODE = "auto"
            if dt == np.float32 and not back:
                r["host_profile_auto"] = _host_profile(
                    lambda: lstm_vjp(*args_, device="cuda", **kw),
                    reps=1 if ctx.dry else 5)
            if dt == np.float32 and not back and ctx.torch is not None \
                    and ctx.tdev == "cuda":
                torch = ctx.torch
                m = torch_lstm(ctx, W, U, b, torch.float32)
                m.train()
                xt = torch.as_tensor(x, device="cuda").requires_grad_(True)
                dyt = torch.as_tensor(dy, device="cuda")

                def step():
                    out, _ = m(xt)
                    out.backward(dyt)
                r["t_torch_fwd_bwd_ms"] = 1e3 * ctx.bench(step)
        except Exception as exc:
            r["error"] = f"{type(exc).__name__}: {exc}"
            r["ok"] = False
        res.append(r)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes (for NUMBA_ENABLE_CUDASIM=1, no GPU)")
    ap.add_argument("--batches", default=None, help="default 1,8,64,256")
    ap.add_argument("--hidden", default=None, help="default 256,512,1024")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds; configurations after it are reported as skipped")
    ap.add_argument("--no-cpu-check", action="store_true")
    ap.add_argument("--quick", action="store_true", help="skip the per-step timings")
    ap.add_argument("--json", default=None, help="JSON path (default $OUT/gpu_check.json)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    T, K = args.steps, args.classes
    batches, hidden = [1, 8, 64, 256], [256, 512, 1024]
    if args.dry_run:
        batches, hidden, T, K = [1, 3], [4, 6], 3, 5
    if args.batches:
        batches = [int(v) for v in args.batches.split(",")]
    if args.hidden:
        hidden = [int(v) for v in args.hidden.split(",")]
    args.deadline = t_start + args.budget
    args.deadline_cpu = t_start + 0.6 * args.budget

    report = {"argv": sys.argv[1:], "python": platform.python_version(),
              "rows": [], "semantics": [], "errors": []}
    try:
        import numba
        from fastseq import _cuda
        report["numba"] = numba.__version__
        report["cuda_available"] = _cuda.is_available()
        report["simulator"] = _cuda.is_simulator()
        if not _cuda.is_available():
            raise RuntimeError(_cuda.unavailable_reason())
        if args.dry_run:
            for k, v in dict(THREADS_PER_BLOCK=16, GEMM_TILE=8, GEMM_THREADS=4,
                             DENSE_THREADS_PER_BLOCK=8, DENSE_ROWS_PER_BLOCK=4,
                             DENSE_K_TILE=4).items():
                setattr(_cuda, k, v)
        ctx = Ctx(args.dry_run)
        report["torch"] = getattr(ctx.torch, "__version__", None)
        report["cupy"] = getattr(ctx.cupy, "__version__", None)
        if ctx.tdev == "cuda":
            report["gpu"] = ctx.torch.cuda.get_device_name(0)
            # an idle GPU starts at low clocks: about 1 s of matrix products first, so
            # the first configuration is not timed while the clocks ramp up
            a = ctx.torch.randn(4096, 4096, device="cuda")
            t_end = time.perf_counter() + 1.0
            while time.perf_counter() < t_end:
                a @ a
                ctx.torch.cuda.synchronize()
            report["cudnn"] = ctx.torch.backends.cudnn.version()
    except Exception as exc:
        report["errors"].append(f"setup: {type(exc).__name__}: {exc}")
        print("setup failed:", report["errors"][-1])
        _write(report, args)
        return 1

    try:
        sb, sh, st = (3, 6, 4) if args.dry_run else (8, 256, T)
        report["semantics"] = semantics_check(ctx, sb, sh, st, args)
    except Exception:
        report["errors"].append("semantics: " + traceback.format_exc())

    try:
        report["training"] = training_check(ctx, args)
    except Exception:
        report["errors"].append("training: " + traceback.format_exc())

    for H in hidden:
        for B in batches:
            if time.perf_counter() > args.deadline:
                report["rows"].append({"B": B, "H": H, "error": "skipped: time budget"})
                continue
            t0 = time.perf_counter()
            try:
                r = run_config(ctx, B, H, T, K, args)
            except Exception:
                r = {"B": B, "H": H, "error": traceback.format_exc()}
            r["wall_s"] = time.perf_counter() - t0
            report["rows"].append(r)
            print(f"B={B} H={H}: " + ("ERROR " + r["error"].strip().splitlines()[-1]
                                      if "error" in r else
                                      f"fastseq {fmt(r['t_fastseq_lstm_ms'])} ms "
                                      f"({r['path']}), cuDNN fp32 "
                                      f"{fmt(r.get('t_torch_lstm_fp32_ms'))} ms, err "
                                      f"{fmt(r['rel_err_lstm'])}"), flush=True)

    if not args.quick:
        try:
            report["tuning"] = tuning(ctx, T, K, args)
        except Exception:
            report["errors"].append("tuning: " + traceback.format_exc())

    report["wall_s"] = time.perf_counter() - t_start
    print()
    print(f"GPU: {report.get('gpu', '?')}, torch {report.get('torch')}, cuDNN "
          f"{report.get('cudnn')}, CuPy {report.get('cupy')}, numba {report['numba']}; "
          f"T={T}, D=H, K={K}, float32; times are medians, device arrays in/out")
    print()
    print(table(report["rows"]))
    print()
    print("Keras semantics vs CPU path (mask, states, go_backwards, zero_output_for_mask):")
    for r in report["semantics"]:
        print("  " + ", ".join(f"{k}={fmt(v)}" for k, v in r.items()))
    print("BPTT kernels (lstm_vjp, device='cuda' vs 'cpu'; fastseq times include "
          "host<->device copies):")
    for r in report.get("training", []):
        print("  " + ", ".join(f"{k}={fmt(v)}" for k, v in r.items()))
    if report.get("tuning"):
        print()
        print("Tunables (fastseq._cuda; informative):")
        for r in report["tuning"]:
            print("  " + ", ".join(f"{k}={fmt(v)}" for k, v in r.items()))
    for e in report["errors"]:
        print("ERROR:", e)
    ok = (all(r.get("ok") for r in report["rows"] if "skipped" not in r.get("error", ""))
          and all(r.get("ok") for r in report["semantics"])
          and all(r.get("ok") for r in report.get("training", []))
          and not report["errors"])
    report["all_ok"] = bool(ok)
    print(f"\nall checks passed: {ok}  (wall {report['wall_s']:.1f} s)")
    _write(report, args)
    return 0 if ok else 1


def _write(report, args):
    path = args.json
    if path is None and os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "gpu_check.json")
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"JSON written to {path}")


if __name__ == "__main__":
    sys.exit(main())
