"""The CUDA backend, run in Numba's CUDA simulator (no GPU needed).

The simulator must be switched on (``NUMBA_ENABLE_CUDASIM=1``) before ``numba.cuda`` is
first imported, and other tests in the same pytest process import Numba normally, so
the CUDA side runs in a subprocess: this file doubles as the worker script
(``python tests/test_cuda_sim.py --worker OUT_DIR``).  The worker runs every case with
the tunables of ``fastseq._cuda`` patched small (several blocks, ragged tail blocks,
several threads per item, batch register tiles) and saves the outputs, the launch
counters and the path taken; the tests here compare them with the CPU path
(``fastseq.lstm(..., device="cpu")``) and the float64 reference (tests/reference.py).

The simulator runs the blocks of a grid one after another, so its grid-wide barrier
does not make blocks wait for each other: the persistent kernel is checked on one-block
grids (the planner only plans a cooperative grid as large as
``max_cooperative_grid_blocks``, which is 1 in the simulator), the per-step fallback on
many blocks.
"""
import json
import os
import subprocess
import sys
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ACTS = ["tanh", "sigmoid", "hard_sigmoid", "relu", "linear", "softsign"]
DENSE_ACTS = [None, "linear", "softmax", "log_softmax", "sigmoid", "tanh", "relu"]

# Tunables for the small simulator runs.
SMALL = dict(GEMM_TILE=8, GEMM_THREADS=4, DENSE_THREADS_PER_BLOCK=8,
             DENSE_ROWS_PER_BLOCK=4, DENSE_K_TILE=4)

# LSTM cases: shapes, options and the tunables that force a kernel configuration.
# "path" is the kernel that must have run.
LSTM_CASES = {
    # persistent kernel, one block, 2 rounds of items (18 items, 16 threads, KS=1)
    "persistent_mask_states_seq": dict(
        B=3, T=5, D=4, H=6, mask=True, state=True, seq=True, back=False, zofm=False,
        tun=dict(LSTM_MODE="persistent", THREADS_PER_BLOCK=16), path="persistent",
        staged=True),
    # persistent, several threads per item (KS=2) and a batch register tile of 4 with a
    # ragged tail (B=3), backwards, zero_output_for_mask
    "persistent_ks2_rbb4_back_zofm": dict(
        B=3, T=6, D=5, H=5, mask=True, state=True, seq=True, back=True, zofm=True,
        tun=dict(LSTM_MODE="persistent", THREADS_PER_BLOCK=16, BATCH_REGISTER_TILE=4),
        path="persistent", ks=2),
    # persistent, KS up to 4, no mask, no initial state, last output only
    "persistent_ks4_plain_last": dict(
        B=1, T=4, D=3, H=4, mask=False, state=False, seq=False, back=False, zofm=False,
        tun=dict(LSTM_MODE="persistent", THREADS_PER_BLOCK=32), path="persistent", ks=4),
    # persistent, h read from global memory (H_STAGE_BYTES below B*H), 2 rounds of
    # items (35 items, 32 threads): c and inputs reloaded per round; mask, states,
    # backwards
    "persistent_h_global_rounds": dict(
        B=5, T=4, D=3, H=7, mask=True, state=True, seq=True, back=True, zofm=False,
        tun=dict(LSTM_MODE="persistent", THREADS_PER_BLOCK=32, H_STAGE_BYTES=16),
        path="persistent", staged=False),
    # h from global memory, register tile of 4 (2 groups, the second ragged, x 7 units =
    # 14 items, 8 threads: 2 rounds), zero_output_for_mask, last output only
    "persistent_h_global_rbb4": dict(
        B=5, T=5, D=3, H=7, mask=True, state=True, seq=False, back=False, zofm=True,
        tun=dict(LSTM_MODE="persistent", THREADS_PER_BLOCK=8, BATCH_REGISTER_TILE=4,
                 H_STAGE_BYTES=16),
        path="persistent", staged=False),
    # h from global memory with one round (14 items, 16 threads): the owner keeps c and
    # the last output in registers and loads the next step's inputs before the barrier
    "persistent_h_global_single_round": dict(
        B=5, T=5, D=3, H=7, mask=True, state=True, seq=True, back=True, zofm=False,
        tun=dict(LSTM_MODE="persistent", THREADS_PER_BLOCK=16, BATCH_REGISTER_TILE=4,
                 H_STAGE_BYTES=16),
        path="persistent", staged=False),
    # h staged in shared memory in two passes of up to 8 values per thread (70 values,
    # 8 threads), several rounds of items
    "persistent_staged_two_passes": dict(
        B=5, T=3, D=3, H=14, mask=True, state=True, seq=True, back=False, zofm=False,
        tun=dict(LSTM_MODE="persistent", THREADS_PER_BLOCK=8), path="persistent",
        staged=True),
    # per-step fallback: 3 x 3 blocks, ragged in units (7 = 3+3+1) and batch (5 = 2+2+1)
    "stepwise_ragged_back_mask": dict(
        B=5, T=5, D=4, H=7, mask=True, state=True, seq=True, back=True, zofm=False,
        tun=dict(LSTM_MODE="stepwise", THREADS_PER_BLOCK=8, HIDDEN_PER_BLOCK=3,
                 BATCH_PER_BLOCK=2), path="stepwise"),
    # per-step, KS=4 and register tile 4 with ragged batch (5 rows: 4 + 1), last output
    "stepwise_ks_rbb4_zofm_last": dict(
        B=5, T=4, D=6, H=6, mask=True, state=True, seq=False, back=False, zofm=True,
        tun=dict(LSTM_MODE="stepwise", THREADS_PER_BLOCK=16, HIDDEN_PER_BLOCK=2,
                 BATCH_PER_BLOCK=4, BATCH_REGISTER_TILE=4), path="stepwise"),
    # auto mode: a 3-block cooperative grid cannot be co-resident in the simulator, so it
    # must fall back to the per-step kernel (and say why)
    "auto_falls_back": dict(
        B=2, T=3, D=3, H=5, mask=True, state=False, seq=True, back=True, zofm=False,
        tun=dict(LSTM_MODE="auto", THREADS_PER_BLOCK=8, HIDDEN_PER_BLOCK=2),
        path="stepwise", reason="co-resident"),
    # auto mode, automatic slice size: one block in the simulator -> persistent
    "auto_persistent": dict(
        B=2, T=3, D=3, H=5, mask=False, state=True, seq=True, back=False, zofm=False,
        tun=dict(LSTM_MODE="auto", THREADS_PER_BLOCK=16), path="persistent"),
    # shared-memory cap below the weight slice: auto falls back, persistent refuses
    "auto_smem_cap": dict(
        B=2, T=3, D=3, H=5, mask=False, state=False, seq=True, back=False, zofm=False,
        tun=dict(LSTM_MODE="auto", THREADS_PER_BLOCK=16, MAX_SHARED_BYTES=64),
        path="stepwise", reason="shared memory"),
    # a GEMM and a cell launch per step: mask, states, backwards, zero_output_for_mask;
    # and the last output only
    "gemm_mask_states_back_zofm": dict(
        B=3, T=5, D=4, H=6, mask=True, state=True, seq=True, back=True, zofm=True,
        tun=dict(LSTM_MODE="gemm"), path="gemm"),
    "gemm_plain_last": dict(
        B=2, T=4, D=3, H=5, mask=False, state=False, seq=False, back=False, zofm=False,
        tun=dict(LSTM_MODE="gemm"), path="gemm"),
    # float64 end to end
    "float64_persistent": dict(
        B=3, T=4, D=4, H=5, mask=True, state=True, seq=True, back=True, zofm=False,
        dtype="float64", tun=dict(LSTM_MODE="persistent", THREADS_PER_BLOCK=16),
        path="persistent"),
    "float64_stepwise": dict(
        B=3, T=4, D=4, H=5, mask=True, state=True, seq=True, back=False, zofm=True,
        dtype="float64", tun=dict(LSTM_MODE="stepwise", THREADS_PER_BLOCK=8,
                                  HIDDEN_PER_BLOCK=2), path="stepwise"),
    "float64_gemm": dict(
        B=3, T=4, D=4, H=5, mask=True, state=True, seq=True, back=False, zofm=False,
        dtype="float64", tun=dict(LSTM_MODE="gemm"), path="gemm"),
}
# every activation as `activation` and as `recurrent_activation`
for _i, _a in enumerate(ACTS):
    LSTM_CASES[f"act_{_a}"] = dict(
        B=2, T=4, D=3, H=5, mask=True, state=True, seq=True, back=bool(_i % 2),
        zofm=False, act=_a, rec=ACTS[(_i + 2) % len(ACTS)],
        tun=dict(LSTM_MODE="stepwise", THREADS_PER_BLOCK=8, HIDDEN_PER_BLOCK=2),
        path="stepwise")

DENSE_CASES = {}
for _dt, _acts in (("float32", DENSE_ACTS),
                   ("float64", ["linear", "softmax", "log_softmax", "sigmoid"])):
    for _a in _acts:
        # 10 rows (3 row blocks of 4, last ragged), K=13 (2 column chunks of 8, ragged),
        # D=6 (2 staged slices of 4, ragged)
        DENSE_CASES[f"{_dt}_{_a}"] = dict(shape=(2, 5, 6), K=13, act=_a, dtype=_dt)
DENSE_CASES["rank1_softmax"] = dict(shape=(10,), K=13, act="softmax", dtype="float32")
DENSE_CASES["rank2_K1_sigmoid"] = dict(shape=(7, 6), K=1, act="sigmoid", dtype="float32")
DENSE_CASES["wide_K_softmax"] = dict(shape=(5, 4), K=40, act="softmax", dtype="float32")
# the GEMM + bias/activation kernel path (DENSE_GEMM="always"; the tiled Numba GEMM here,
# cuBLAS through CuPy on a GPU with CuPy)
for _dt, _acts in (("float32", DENSE_ACTS), ("float64", ["softmax", "log_softmax"])):
    for _a in _acts:
        DENSE_CASES[f"gemm_{_dt}_{_a}"] = dict(shape=(2, 5, 6), K=13, act=_a, dtype=_dt,
                                              gemm=True)


def lstm_inputs(name):
    c = LSTM_CASES[name]
    dt = np.dtype(c.get("dtype", "float32"))
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    B, T, D, H = c["B"], c["T"], c["D"], c["H"]
    inp = dict(
        x=rng.standard_normal((B, T, D)).astype(dt),
        W=(0.5 * rng.standard_normal((D, 4 * H))).astype(dt),
        U=(0.5 * rng.standard_normal((H, 4 * H))).astype(dt),
        b=(0.3 * rng.standard_normal(4 * H)).astype(dt),
    )
    if c["state"]:
        inp["h0"] = rng.standard_normal((B, H)).astype(dt)
        inp["c0"] = rng.standard_normal((B, H)).astype(dt)
    if c["mask"]:
        m = rng.random((B, T)) > 0.35
        m[0, :2] = False          # leading masked steps (output zeros before first step)
        m[0, 2] = True
        if B > 1:
            m[-1, :] = False      # a fully masked row: states stay the initial ones
        if B > 2:
            m[1, -1] = False      # trailing masked step: output repeats / is zero
        inp["mask"] = m
    return inp


def dense_inputs(name):
    c = DENSE_CASES[name]
    dt = np.dtype(c["dtype"])
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    D = c["shape"][-1]
    K = c["K"]
    x = rng.standard_normal(c["shape"]).astype(dt)
    W = rng.standard_normal((D, K)).astype(dt)
    if K > 3:
        W[:, 3] = W[:, 1]          # duplicate columns: exact ties for argmax
    b = rng.standard_normal(K).astype(dt)
    if K > 3:
        b[3] = b[1]
    return dict(x=x, W=W, b=b)


# ---------------------------------------------------------------------------------------
# worker (runs in the simulator)
# ---------------------------------------------------------------------------------------
def _patched(mod, values):
    old = {k: getattr(mod, k) for k in values}
    for k, v in values.items():
        setattr(mod, k, v)
    return old


def _worker(out_dir):
    assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    sys.path.insert(0, ROOT)
    from numba import cuda
    import fastseq
    from fastseq import _cuda
    assert _cuda.is_simulator() and _cuda.is_available()
    arrays = {}
    meta = {}

    def run(name, fn):
        try:
            before = dict(_cuda.LAUNCHES)
            ups = dict(_cuda.UPLOADS)
            info = fn() or {}
            info["launches"] = {k: v - before.get(k, 0) for k, v in _cuda.LAUNCHES.items()
                                if v - before.get(k, 0)}
            info["uploads"] = {k: v - ups.get(k, 0) for k, v in _cuda.UPLOADS.items()
                               if v - ups.get(k, 0)}
            meta[name] = info
        except Exception as exc:  # reported per case by the tests
            import traceback
            meta[name] = {"error": f"{type(exc).__name__}: {exc}\n"
                                   f"{traceback.format_exc()}"}

    base = _patched(_cuda, SMALL)
    defaults = {k: getattr(_cuda, k) for k in (
        "LSTM_MODE", "THREADS_PER_BLOCK", "HIDDEN_PER_BLOCK", "BATCH_PER_BLOCK",
        "BATCH_REGISTER_TILE", "MAX_SHARED_BYTES", "H_STAGE_BYTES")}

    for name, c in LSTM_CASES.items():
        def lstm_case(name=name, c=c):
            _patched(_cuda, defaults)
            _patched(_cuda, c["tun"])
            inp = lstm_inputs(name)
            out, h, cc = _cuda.lstm_cuda(
                inp["x"], inp["W"], inp["U"], inp["b"], inp.get("h0"), inp.get("c0"),
                inp.get("mask"), go_backwards=c["back"], return_sequences=c["seq"],
                zero_output_for_mask=c["zofm"], act=c.get("act", "tanh"),
                rec=c.get("rec", "sigmoid"))
            arrays[f"{name}/out"], arrays[f"{name}/h"], arrays[f"{name}/c"] = out, h, cc
            return {"path": list(_cuda.last_lstm_path),
                    "types": [type(a).__name__ for a in (out, h, cc)]}
        run(name, lstm_case)
    _patched(_cuda, defaults)

    # a persistent kernel that cannot run must raise when forced
    def forced_refuses():
        _patched(_cuda, dict(LSTM_MODE="persistent", THREADS_PER_BLOCK=8,
                             HIDDEN_PER_BLOCK=2))
        inp = lstm_inputs("auto_falls_back")
        try:
            _cuda.lstm_cuda(inp["x"], inp["W"], inp["U"], inp["b"], None, None, None)
        except RuntimeError as exc:
            return {"raised": str(exc)}
        finally:
            _patched(_cuda, defaults)
        return {"raised": None}
    run("forced_persistent_refuses", forced_refuses)


    # the input projection's cached buffer: one per dtype (here: one float32 buffer),
    # freed by release_workspace
    def workspace():
        _patched(_cuda, dict(LSTM_MODE="persistent", THREADS_PER_BLOCK=16))
        try:
            inp = lstm_inputs("persistent_mask_states_seq")
            args = (inp["x"], inp["W"], inp["U"], inp["b"], None, None, None)
            first = _cuda.lstm_cuda(*args, return_sequences=True)[0]
            n_cached = sum(k[1] == np.dtype(np.float32).str for k in _cuda._WS)
            _cuda.release_workspace()
            n_released = len(_cuda._WS)
            again = _cuda.lstm_cuda(*args, return_sequences=True)[0]
            return {"cached": n_cached, "released": n_released,
                    "same": bool(np.array_equal(first, again))}
        finally:
            _patched(_cuda, defaults)
    run("workspace", workspace)

    for name, c in DENSE_CASES.items():
        def dense_case(name=name, c=c):
            inp = dense_inputs(name)
            old = _patched(_cuda, dict(DENSE_GEMM="always" if c.get("gemm") else "auto"))
            try:
                y = _cuda.dense_cuda(inp["x"], inp["W"], inp["b"], c["act"])
            finally:
                _patched(_cuda, old)
            i = _cuda.argmax_dense_cuda(inp["x"], inp["W"], inp["b"], c["act"])
            arrays[f"{name}/y"], arrays[f"{name}/idx"] = y, i
            return {"types": [type(y).__name__, type(i).__name__]}
        run("dense_" + name, dense_case)

    # argmax ties after relu: all logits negative -> every value 0 -> index 0
    def relu_ties():
        x = np.ones((4, 3), np.float32)
        W = -np.abs(np.arange(1, 16, dtype=np.float32)).reshape(3, 5)
        b = np.zeros(5, np.float32)
        arrays["relu_ties/idx"] = _cuda.argmax_dense_cuda(x, W, b, "relu")
        arrays["relu_ties/idx_linear"] = _cuda.argmax_dense_cuda(x, W, b, None)
    run("relu_ties", relu_ties)

    # NaN in a row: NumPy's argmax returns the first NaN
    def nan_row():
        x = np.ones((2, 2), np.float32)
        W = np.array([[1, np.nan, 3, np.nan], [1, 1, 1, 1]], np.float32)
        arrays["nan_row/idx"] = _cuda.argmax_dense_cuda(x, W, np.zeros(4, np.float32),
                                                        "softmax")
    run("nan_row", nan_row)

    # the tiled GEMM directly: ragged in M, N and K
    def gemm():
        rng = np.random.default_rng(7)
        A = rng.standard_normal((19, 10)).astype(np.float32)
        Bm = rng.standard_normal((10, 21)).astype(np.float32)
        C = cuda.device_array((19, 21), np.float32)
        _cuda._matmul(cuda, cuda.to_device(A), cuda.to_device(Bm), C)
        arrays["gemm/A"], arrays["gemm/B"], arrays["gemm/C"] = A, Bm, C.copy_to_host()
    run("gemm", gemm)

    # device arrays in -> device arrays out (no host copies of the data)
    def device_io():
        _patched(_cuda, dict(LSTM_MODE="persistent", THREADS_PER_BLOCK=16))
        try:
            inp = lstm_inputs("persistent_mask_states_seq")
            d = {k: cuda.to_device(v) for k, v in inp.items()}
            ups = dict(_cuda.UPLOADS)
            out, h, cc = _cuda.lstm_cuda(d["x"], d["W"], d["U"], d["b"], d["h0"], d["c0"],
                                         d["mask"], return_sequences=True)
            lstm_ups = {k: v - ups.get(k, 0) for k, v in _cuda.UPLOADS.items()
                        if v - ups.get(k, 0)}
            dn = dense_inputs("float32_softmax")
            dd = {k: cuda.to_device(v) for k, v in dn.items()}
            y = _cuda.dense_cuda(dd["x"], dd["W"], dd["b"], "softmax")
            i = _cuda.argmax_dense_cuda(dd["x"], dd["W"], dd["b"], "softmax")
            types = [type(a).__name__ for a in (out, h, cc, y, i)]
            for k, a in (("out", out), ("h", h), ("c", cc), ("y", y), ("idx", i)):
                arrays[f"device_io/{k}"] = a.copy_to_host()
            return {"types": types, "lstm_uploads": lstm_ups}
        finally:
            _patched(_cuda, defaults)
    run("device_io", device_io)

    # weight cache: read-only weights are uploaded once, writeable ones every call
    def weight_cache():
        _patched(_cuda, dict(LSTM_MODE="persistent", THREADS_PER_BLOCK=16))
        try:
            inp = lstm_inputs("auto_falls_back")
            ro = {k: inp[k].copy() for k in ("W", "U", "b")}
            for a in ro.values():
                a.setflags(write=False)
            counts = []
            for _ in range(3):
                before = _cuda.UPLOADS["weights"]
                _cuda.lstm_cuda(inp["x"], ro["W"], ro["U"], ro["b"], None, None, None)
                counts.append(_cuda.UPLOADS["weights"] - before)
            rw = []
            for _ in range(2):
                before = _cuda.UPLOADS["weights"]
                _cuda.lstm_cuda(inp["x"], inp["W"], inp["U"], inp["b"], None, None, None)
                rw.append(_cuda.UPLOADS["weights"] - before)
            # an explicit upload: no weight transfer per call
            wts = _cuda.upload_lstm_weights(inp["W"], inp["U"], inp["b"])
            before = _cuda.UPLOADS["weights"]
            out, _, _ = _cuda.lstm_cuda(inp["x"], None, None, None, None, None, None,
                                        weights=wts)
            explicit = _cuda.UPLOADS["weights"] - before
            arrays["weight_cache/out"] = out
            return {"readonly": counts, "writeable": rw, "explicit": explicit,
                    "cache_size": len(_cuda._WCACHE)}
        finally:
            _patched(_cuda, defaults)
    run("weight_cache", weight_cache)

    # the public API: device="cuda" with NumPy in -> NumPy out, through fastseq.ops
    def public_api():
        _patched(_cuda, dict(LSTM_MODE="auto", THREADS_PER_BLOCK=16))
        try:
            inp = lstm_inputs("persistent_mask_states_seq")
            before = dict(_cuda.LAUNCHES)
            r = fastseq.lstm(inp["x"], inp["W"], inp["U"], inp["b"],
                             initial_state=[inp["h0"], inp["c0"]], mask=inp["mask"],
                             return_sequences=True, return_state=True, device="cuda")
            lstm_launch = sum(v - before.get(k, 0) for k, v in _cuda.LAUNCHES.items()
                              if k.startswith("lstm"))
            dn = dense_inputs("float32_softmax")
            before = _cuda.LAUNCHES["dense"]
            y = fastseq.dense(dn["x"], dn["W"], dn["b"], activation="softmax",
                              device="cuda")
            dense_launch = _cuda.LAUNCHES["dense"] - before
            arrays["public/out"], arrays["public/h"], arrays["public/c"] = r
            arrays["public/y"] = y
            return {"types": [type(a).__name__ for a in (*r, y)],
                    "lstm_launches": lstm_launch, "dense_launches": dense_launch}
        finally:
            _patched(_cuda, defaults)
    run("public_api", public_api)

    _patched(_cuda, base)
    np.savez(os.path.join(out_dir, "arrays.npz"),
             **{k: np.asarray(v) for k, v in arrays.items()})
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
    sys.exit(0)

# ---------------------------------------------------------------------------------------
# tests (normal pytest process)
# ---------------------------------------------------------------------------------------
import pytest  # noqa: E402

import fastseq  # noqa: E402
from fastseq import config  # noqa: E402
from reference import ref_dense, ref_lstm  # noqa: E402


@pytest.fixture(scope="module")
def sim(run_sim_worker):
    return run_sim_worker(__file__)


def _meta(sim, name):
    meta = sim[0]
    assert name in meta, f"case {name} did not run in the simulator"
    assert "error" not in meta[name], meta[name]["error"]
    return meta[name]


@pytest.mark.parametrize("name", list(LSTM_CASES))
def test_lstm_matches_cpu_and_reference(sim, name, assert_close):
    c = LSTM_CASES[name]
    info = _meta(sim, name)
    arrays = sim[1]
    # the simulator really ran the expected kernel (no silent CPU fallback)
    path, reason = info["path"]
    assert path == c["path"], (path, reason)
    launches = info["launches"]
    if path == "persistent":
        assert launches.get("lstm_persistent") == 1 and "lstm_step" not in launches
        if "ks" in c:
            assert f"KS={c['ks']}" in reason, reason
        if "staged" in c:
            want = "h staged in shared memory" if c["staged"] else "h from global memory"
            assert want in reason, reason
    elif path == "gemm":
        # a GEMM for h U and a cell launch per step (plus the input projection's GEMM)
        assert launches.get("lstm_cell_gemm") == c["T"] and launches.get("gemm") == c["T"] + 1
        assert "lstm_persistent" not in launches and "lstm_step" not in launches
    else:
        assert launches.get("lstm_step") == c["T"] and "lstm_persistent" not in launches
    if "reason" in c:
        assert c["reason"] in reason, reason
    assert launches.get("gemm", 0) >= 1, launches
    assert info["types"] == ["ndarray"] * 3

    inp = lstm_inputs(name)
    dt = inp["x"].dtype
    kw = dict(mask=inp.get("mask"), return_sequences=c["seq"], return_state=True,
              go_backwards=c["back"], zero_output_for_mask=c["zofm"],
              activation=c.get("act", "tanh"),
              recurrent_activation=c.get("rec", "sigmoid"))
    state = [inp["h0"], inp["c0"]] if c["state"] else None
    got = [arrays[f"{name}/{k}"] for k in ("out", "h", "c")]
    for g in got:
        assert g.dtype == dt
    ref = ref_lstm(inp["x"], inp["W"], inp["U"], inp["b"], initial_state=state, **kw)
    cpu = fastseq.lstm(inp["x"], inp["W"], inp["U"], inp["b"], initial_state=state,
                       device="cpu", **kw)
    atol, rtol = config.tolerance(dt)
    for what, g, r, cp in zip(("output", "h", "c"), got, ref, cpu):
        assert_close(g, r, atol, rtol, f"{name}: {what} vs float64 reference")
        assert_close(g, cp, 2 * atol, 2 * rtol, f"{name}: {what} vs CPU path")
    if c["mask"] and c["seq"]:
        # masked steps before the first unmasked one output zeros (row 0, processing
        # order), whatever the initial state
        first = np.flatnonzero(inp["mask"][0, ::-1] if c["back"] else inp["mask"][0])[0]
        assert np.all(got[0][0, :first] == 0)


def test_forced_persistent_refuses_when_it_cannot_run(sim):
    info = _meta(sim, "forced_persistent_refuses")
    assert info["raised"] and "persistent" in info["raised"], info
    assert "co-resident" in info["raised"]
    assert not info["launches"].get("lstm_persistent") and \
        not info["launches"].get("lstm_step")


def test_workspace_is_cached_and_released(sim):
    info = _meta(sim, "workspace")
    assert info["cached"] == 1 and info["released"] == 0 and info["same"], info




@pytest.mark.parametrize("name", list(DENSE_CASES))
def test_dense_and_argmax(sim, name, assert_close):
    c = DENSE_CASES[name]
    info = _meta(sim, "dense_" + name)
    if c.get("gemm"):
        assert info["launches"] == {"gemm": 1, "dense_epilogue": 1, "dense_argmax": 1}
    else:
        assert info["launches"] == {"dense": 1, "dense_argmax": 1}
    inp = dense_inputs(name)
    y = sim[1][f"{name}/y"]
    idx = sim[1][f"{name}/idx"]
    dt = inp["x"].dtype
    assert y.dtype == dt and y.shape == inp["x"].shape[:-1] + (c["K"],)
    ref = ref_dense(inp["x"], inp["W"], inp["b"], c["act"])
    atol, rtol = config.tolerance(dt)
    assert_close(y, ref, atol, rtol, f"dense {name} vs float64 reference")
    cpu = fastseq.dense(inp["x"], inp["W"], inp["b"], activation=c["act"], device="cpu")
    assert_close(y, cpu, 2 * atol, 2 * rtol, f"dense {name} vs CPU path")
    if c["act"] == "softmax":
        assert_close(y.sum(-1), np.ones(y.shape[:-1]), 1e-6 if dt == np.float32 else 1e-12,
                     0, "softmax rows sum to 1")
    # fused argmax == argmax of the (float64) activated output; the duplicated column
    # makes exact ties, which go to the first index
    assert idx.dtype == np.int64 and idx.shape == inp["x"].shape[:-1]
    np.testing.assert_array_equal(idx, np.argmax(ref, axis=-1))


def test_argmax_tie_and_nan_rules(sim):
    _meta(sim, "relu_ties")
    _meta(sim, "nan_row")
    a = sim[1]
    np.testing.assert_array_equal(a["relu_ties/idx"], np.zeros(4, np.int64))
    np.testing.assert_array_equal(a["relu_ties/idx_linear"], np.zeros(4, np.int64))
    # row 0: x = [1, 1] -> logits [2, nan, 4, nan]: first NaN wins, as in NumPy
    expect = np.argmax(np.ones((2, 2), np.float32) @ np.array(
        [[1, np.nan, 3, np.nan], [1, 1, 1, 1]], np.float32), axis=-1)
    np.testing.assert_array_equal(a["nan_row/idx"], expect)
    assert expect[0] == 1


def test_tiled_gemm(sim, assert_close):
    info = _meta(sim, "gemm")
    assert info["launches"] == {"gemm": 1}
    a = sim[1]
    assert_close(a["gemm/C"], a["gemm/A"].astype(np.float64) @ a["gemm/B"], 1e-5, 1e-5,
                 "tiled GEMM")


def test_device_arrays_stay_on_device(sim, assert_close):
    info = _meta(sim, "device_io")
    assert info["types"] == ["FakeCUDAArray"] * 5, info["types"]
    # nothing was copied from the host for the data (inputs already on the device)
    assert info["lstm_uploads"] == {}, info["lstm_uploads"]
    inp = lstm_inputs("persistent_mask_states_seq")
    ref = ref_lstm(inp["x"], inp["W"], inp["U"], inp["b"],
                   initial_state=[inp["h0"], inp["c0"]], mask=inp["mask"],
                   return_sequences=True, return_state=True)
    atol, rtol = config.tolerance(np.float32)
    for k, r in zip(("out", "h", "c"), ref):
        assert_close(sim[1][f"device_io/{k}"], r, atol, rtol, f"device I/O {k}")
    dn = dense_inputs("float32_softmax")
    ry = ref_dense(dn["x"], dn["W"], dn["b"], "softmax")
    assert_close(sim[1]["device_io/y"], ry, atol, rtol, "device I/O dense")
    np.testing.assert_array_equal(sim[1]["device_io/idx"], ry.argmax(-1))


def test_weights_uploaded_once(sim, assert_close):
    info = _meta(sim, "weight_cache")
    assert info["readonly"] == [3, 0, 0], info      # W, U, b once, then cached
    assert info["writeable"] == [3, 3], info        # writeable arrays may change
    assert info["explicit"] == 0, info
    inp = lstm_inputs("auto_falls_back")
    ref = ref_lstm(inp["x"], inp["W"], inp["U"], inp["b"])
    atol, rtol = config.tolerance(np.float32)
    assert_close(sim[1]["weight_cache/out"], ref, atol, rtol, "explicit weights")


def test_public_api_device_cuda(sim, assert_close):
    info = _meta(sim, "public_api")
    assert info["types"] == ["ndarray"] * 4
    assert info["lstm_launches"] >= 1 and info["dense_launches"] == 1
    inp = lstm_inputs("persistent_mask_states_seq")
    ref = ref_lstm(inp["x"], inp["W"], inp["U"], inp["b"],
                   initial_state=[inp["h0"], inp["c0"]], mask=inp["mask"],
                   return_sequences=True, return_state=True)
    atol, rtol = config.tolerance(np.float32)
    for k, r in zip(("out", "h", "c"), ref):
        assert_close(sim[1][f"public/{k}"], r, atol, rtol, f"fastseq.lstm cuda {k}")
    dn = dense_inputs("float32_softmax")
    assert_close(sim[1]["public/y"], ref_dense(dn["x"], dn["W"], dn["b"], "softmax"),
                 atol, rtol, "fastseq.dense cuda")


def test_gpu_check_script_dry_run(tmp_path):
    """bench/gpu_check.py's logic (reference, timing, table, JSON) on tiny shapes in the
    simulator, PyTorch on the CPU."""
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:      # the script then uses the CPU float64 path as reference
        has_torch = False
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", OUT=str(tmp_path),
               TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry-run",
         "--batches", "2", "--hidden", "5", "--no-cpu-check"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "gpu_check.json") as f:
        rep = json.load(f)
    assert rep["all_ok"] and rep["simulator"] and not rep["errors"]
    (row,) = rep["rows"]
    assert row["B"] == 2 and row["H"] == 5 and row["path"] == "persistent"
    keys = ["t_fastseq_lstm_ms", "t_fastseq_lstm_stepwise_ms", "t_fastseq_dense_ms",
            "t_fastseq_argmax_ms", "dense_GBps"]
    if has_torch:
        keys += ["t_torch_lstm_fp32_ms", "t_torch_lstm_tf32_ms", "t_torch_dense_ms"]
    for key in keys:
        assert row[key] > 0, key
    assert row["argmax_agree"] == 1.0
    assert row["rel_err_lstm"] <= 1e-5 and row["rel_err_dense"] <= 1e-5
    assert len(rep["semantics"]) == 12 and all(r["ok"] for r in rep["semantics"])
    # the BPTT kernels against the CPU ones: two dtypes x both directions
    assert len(rep["training"]) == 5 and all(r["ok"] for r in rep["training"])
    assert rep["training"][-1]["what"] == "copy_rates"
    assert rep["training"][0]["t_bwd_recurrence_auto_ms"] > 0
    assert "global memory" in rep["training"][0]["path_global"]
    assert rep["training"][0]["t_bwd_recurrence_global_ms"] > 0
    assert rep["training"][0]["t_fastseq_vjp_auto_ms"] > 0
    assert rep["training"][0]["t_fastseq_vjp_stepwise_ms"] > 0
    assert rep["training"][0]["t_fastseq_bwd_auto_ms"] > 0
    assert [r["path_auto"] for r in rep["training"][:4]] == ["persistent"] * 4
    assert "| B | H | kernel |" in proc.stdout and "BPTT kernels" in proc.stdout
    assert [r["what"] for r in rep["tuning"]] == ["lstm", "lstm", "dense_softmax"]
    assert all(r["ms"] > 0 and "error" not in r for r in rep["tuning"]), rep["tuning"]
    # the per-step GEMM mode ran and matched the default mode
    gemm = rep["tuning"][1]
    assert gemm["path"].startswith("gemm") and gemm["rel_err_vs_auto"] <= 1e-5, gemm
