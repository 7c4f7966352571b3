"""The CUDA backpropagation-through-time kernels (``fastseq/kernels/lstm_bwd_cuda.py``,
driven by ``fastseq._cuda.lstm_vjp_cuda``) in Numba's CUDA simulator, against the CPU
kernels (``lstm_vjp(device="cpu")``, checked against ``tf.GradientTape`` in
test_training.py) and, for the output, the float64 reference.

As in test_cuda_sim.py the simulator runs in a subprocess (this file doubles as the
worker: ``python tests/test_cuda_train_sim.py --worker OUT_DIR``), with the launch
tunables patched small so every grid has several blocks and the grid-stride loops go
round more than once.  Every case runs in both training modes: "stepwise" (a cell
launch and a GEMM per step) and "auto" (the forward recurrence in lstm_cuda's kernels
with the saved gates recomputed, and the backward recurrence in one cooperative
launch: one block here, since the simulator runs blocks one after another and its
grid barrier does not make them wait for each other).
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SMALL = dict(GEMM_TILE=8, GEMM_THREADS=4, THREADS_PER_BLOCK=8)

# name: shapes and lstm_vjp options
CASES = {
    "mask_states_seq": dict(B=3, T=5, D=4, H=6, mask=True, state=True, seq=True),
    "back_zofm": dict(B=3, T=6, D=3, H=5, mask=True, state=True, seq=True, back=True,
                      zofm=True),
    "back_mask_last": dict(B=4, T=4, D=2, H=3, mask=True, seq=False, back=True),
    "plain_no_bias": dict(B=2, T=3, D=3, H=4, bias=False, seq=True),
    "one_step_one_row": dict(B=1, T=1, D=2, H=3, state=True, seq=True),
    "hard_sigmoid_relu": dict(B=3, T=4, D=3, H=4, mask=True, seq=True,
                              act="relu", rec="hard_sigmoid"),
    # nine rows: three groups of 4 rows in the backward kernel's dot products (the
    # last one partial), several rounds of items
    "nine_rows": dict(B=9, T=3, D=2, H=3, mask=True, state=True, seq=True),
    "softsign_linear": dict(B=2, T=5, D=2, H=3, seq=False, act="softsign",
                            rec="linear"),
}
DTYPES = ("float64", "float32")
MODES = ("stepwise", "auto", "auto_rows2", "auto_global")
# every case in both dtypes and modes; the 2-row staging and the reads of dz from
# global memory in float32 only
RUNS = [(n, d, m) for n in CASES for d in DTYPES for m in MODES
        if m in ("stepwise", "auto") or d == "float32"]


def inputs(name, dtype):
    c = CASES[name]
    seed = sum(map(ord, name)) + len(dtype)
    rng = np.random.default_rng(seed)
    B, T, D, H = c["B"], c["T"], c["D"], c["H"]
    dt = np.dtype(dtype)
    a = {"x": rng.standard_normal((B, T, D)).astype(dt),
         "W": (rng.standard_normal((D, 4 * H)) * 0.5).astype(dt),
         "U": (rng.standard_normal((H, 4 * H)) * 0.5).astype(dt),
         "b": (rng.standard_normal(4 * H) * 0.5).astype(dt) if c.get("bias", True)
         else None}
    mask = None
    if c.get("mask"):
        mask = np.ones((B, T), bool)
        mask[0, T // 2:] = False        # right padding
        if B > 1:
            mask[1, :1] = False         # left padding
        if B > 3:
            mask[3, :] = False          # a row of padding only
    a["mask"] = mask
    state = None
    if c.get("state"):
        state = [rng.standard_normal((B, H)).astype(dt) for _ in range(2)]
    a["state"] = state
    d_out = rng.standard_normal((B, T, H) if c.get("seq") else (B, H)).astype(dt)
    a["dy"] = [d_out, rng.standard_normal((B, H)).astype(dt),
               rng.standard_normal((B, H)).astype(dt)]
    return a


def run_vjp(name, dtype, device):
    from fastseq import training
    c = CASES[name]
    a = inputs(name, dtype)
    return training.lstm_vjp(
        a["x"], a["W"], a["U"], a["b"], a["dy"], initial_state=a["state"],
        mask=a["mask"], return_sequences=c.get("seq", False), return_state=True,
        go_backwards=c.get("back", False), zero_output_for_mask=c.get("zofm", False),
        activation=c.get("act", "tanh"), recurrent_activation=c.get("rec", "sigmoid"),
        device=device)


def tagger_case():
    """A tiny Embedding -> Bidirectional(LSTM) -> Dense tagger, a batch with padding."""
    from fastseq import tagger
    V, E, H, K = 20, 4, 5, 6
    w = tagger.init_weights(V, E, H, K, seed=0)
    rng = np.random.default_rng(3)
    ids = rng.integers(1, V, size=(3, 6))
    ids[0, 4:] = 0
    ids[1, 5:] = 0
    y = rng.integers(0, K, size=(3, 6))
    return tagger.build_model(V, E, H, K, weights=w), ids, y


def dense(g):
    return np.asarray(g.todense() if hasattr(g, "todense") else g)


def train_model(model, ids, y, steps=3):
    """loss and gradients, then ``steps`` Adam steps: (loss, grads, weights after)."""
    loss, grads = model.loss_and_gradients(ids, y)
    grads = [dense(g) for g in grads]
    model.compile(optimizer="adam")
    for _ in range(steps):
        model.train_on_batch(ids, y)
    return loss, grads, [np.array(a) for a in model.get_weights()]


def _worker(out_dir):
    assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    sys.path.insert(0, ROOT)
    from fastseq import _cuda
    assert _cuda.is_simulator() and _cuda.is_available()
    for k, v in SMALL.items():
        setattr(_cuda, k, v)
    arrays, meta = {}, {}
    for name, dtype, mode in RUNS:
        key = f"{name}/{dtype}/{mode}"
        try:
            # "auto_rows2": the backward kernel stages dz two rows at a time;
            # "auto_global": it reads dz from global memory
            _cuda.TRAIN_MODE = mode.split("_")[0]
            _cuda.TRAIN_STAGE_ROWS = 2 if mode == "auto_rows2" else None
            _cuda.TRAIN_STAGE_BYTES = 0 if mode == "auto_global" else None
            before = dict(_cuda.LAUNCHES)
            g = run_vjp(name, dtype, "cuda")
            for k, v in g.items():
                if v is not None:
                    arrays[f"{key}/{k}"] = np.asarray(v)
            meta[key] = {"launches": {k: v - before.get(k, 0)
                                      for k, v in _cuda.LAUNCHES.items()
                                      if v - before.get(k, 0)},
                         "path": _cuda.last_train_path}
        except Exception as exc:  # reported per case by the tests
            import traceback
            meta[key] = {"error": f"{type(exc).__name__}: {exc}\n"
                                  f"{traceback.format_exc()}"}
    # an unknown TRAIN_MODE is refused with a message that names it
    _cuda.TRAIN_MODE = "bogus"
    try:
        run_vjp("plain_no_bias", "float32", "cuda")
        meta["bad_mode"] = {"raised": None}
    except Exception as exc:
        meta["bad_mode"] = {"raised": f"{type(exc).__name__}: {exc}"}
    _cuda.TRAIN_MODE = "auto"
    _cuda.TRAIN_STAGE_ROWS = None
    _cuda.TRAIN_STAGE_BYTES = None
    try:
        model, ids, y = tagger_case()
        model.device = "cuda"
        before = dict(_cuda.LAUNCHES)
        loss, grads, weights = train_model(model, ids, y)
        arrays["model/loss"] = np.asarray(loss)
        for i, g in enumerate(grads):
            arrays[f"model/grad{i}"] = g
        for i, a in enumerate(weights):
            arrays[f"model/weight{i}"] = a
        meta["model"] = {"launches": {k: v - before.get(k, 0)
                                      for k, v in _cuda.LAUNCHES.items()
                                      if v - before.get(k, 0)}}
    except Exception as exc:
        import traceback
        meta["model"] = {"error": f"{type(exc).__name__}: {exc}\n"
                                  f"{traceback.format_exc()}"}
    np.savez(os.path.join(out_dir, "arrays.npz"), **arrays)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
    sys.exit(0)

# ---------------------------------------------------------------------------------------
# tests (normal pytest process)
# ---------------------------------------------------------------------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def sim(run_sim_worker):
    return run_sim_worker(__file__)


# relative error (max |a - b| / max |b|) allowed between the CUDA and CPU gradients:
# the same float64 arithmetic in another order, or float32 (issue 5: 1e-9 / 1e-4)
RTOL = {"float64": 1e-9, "float32": 1e-4}


@pytest.mark.parametrize("name,dtype,mode", RUNS)
def test_gradients_match_cpu(sim, name, dtype, mode):
    meta, arrays = sim
    key = f"{name}/{dtype}/{mode}"
    assert key in meta, f"case {key} did not run in the simulator"
    assert "error" not in meta[key], meta[key]["error"]
    launches = meta[key]["launches"]
    T = CASES[name]["T"]
    if mode == "stepwise":
        assert launches.get("train_fwd_cell") == T and launches.get("train_bwd_cell") == T
        assert meta[key]["path"][0] == "stepwise"
    else:
        # no per-step training launches: the inference kernel's one persistent launch,
        # two scans, and the backward recurrence in one launch
        assert "train_fwd_cell" not in launches and "train_bwd_cell" not in launches
        assert launches.get("lstm_persistent") == 1 and "lstm_step" not in launches
        assert launches.get("train_scan") == 2
        # batch-major x, the output gradient (a sequence) and dx are rearranged on
        # the GPU, one launch each; the forward reuses the uploaded batch-major x
        assert launches.get("swap01") == (3 if CASES[name].get("seq") else 2)
        assert launches.get("train_bwd_persistent") == 1, meta[key]["path"]
        path, detail = meta[key]["path"]
        assert path == "persistent"
        B = CASES[name]["B"]
        rows = min(B, 2) if mode == "auto_rows2" else B
        if mode == "auto_global":
            assert "dz read from global memory" in detail, detail
        else:
            assert f"dz staged {rows} rows at a time" in detail, detail
    want = run_vjp(name, dtype, "cpu")
    for k, w in want.items():
        if w is None:
            assert f"{key}/{k}" not in arrays, k
            continue
        got = arrays[f"{key}/{k}"]
        assert got.shape == w.shape and got.dtype == w.dtype, (k, got.shape, w.shape)
        scale = max(float(np.abs(w).max()), 1e-30)
        err = float(np.abs(got - w).max()) / scale
        assert err <= RTOL[dtype], f"{k}: relative error {err:.3g}"


def test_model_trains_on_the_gpu_like_on_the_cpu(sim):
    """A model imported with device="cuda" runs its LSTM recurrences on the GPU in
    training: same loss, gradients (every weight) and weights after three Adam steps
    as on the CPU."""
    meta, arrays = sim
    assert "error" not in meta["model"], meta["model"]["error"]
    launches = meta["model"]["launches"]
    # 4 passes (loss_and_gradients + 3 steps) x 2 directions, one persistent launch
    # each way
    assert launches.get("train_bwd_persistent") == 4 * 2
    assert launches.get("lstm_persistent") == 4 * 2
    assert "train_fwd_cell" not in launches and "train_bwd_cell" not in launches
    model, ids, y = tagger_case()
    loss, grads, weights = train_model(model, ids, y)
    assert abs(float(arrays["model/loss"]) - loss) <= 1e-5 * abs(loss)
    for i, g in enumerate(grads):
        got = arrays[f"model/grad{i}"]
        err = float(np.abs(got - g).max()) / max(float(np.abs(g).max()), 1e-30)
        assert err <= 1e-4, f"gradient {i}: relative error {err:.3g}"
    for i, w in enumerate(weights):
        got = arrays[f"model/weight{i}"]
        err = float(np.abs(got - w).max()) / max(float(np.abs(w).max()), 1e-30)
        assert err <= 1e-4, f"weight {i} after 3 Adam steps: relative error {err:.3g}"


def test_unknown_train_mode_is_refused(sim):
    raised = sim[0]["bad_mode"]["raised"]
    assert raised is not None and raised.startswith("ValueError")
    assert "TRAIN_MODE" in raised and "'bogus'" in raised
