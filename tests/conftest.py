"""Shared pytest helpers for the fastseq tests."""
import os

# Quiet TensorFlow before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest


def check_close(actual, expected, atol, rtol, what="result"):
    """Assert ``actual`` matches ``expected`` within atol + rtol * |expected|.

    Unlike a bare ``np.allclose`` this fails on a shape mismatch, on NaN/inf in one array
    but not the other (same non-finite value at the same place is accepted), and reports
    the max absolute / relative error, where it happens and how many elements fail.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (
        f"{what}: shape {actual.shape} != expected {expected.shape}"
    )
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    fin_a = np.isfinite(a)
    fin_e = np.isfinite(e)
    bad_nonfinite = (fin_a != fin_e) | (~fin_a & ~fin_e & ~(
        (np.isnan(a) & np.isnan(e)) | (a == e)))
    if bad_nonfinite.any():
        idx = tuple(int(i) for i in np.argwhere(bad_nonfinite)[0])
        raise AssertionError(
            f"{what}: {int(bad_nonfinite.sum())} non-finite mismatches; first at {idx}: "
            f"actual={a[idx]!r} expected={e[idx]!r}"
        )
    both = fin_a & fin_e
    if not both.any():
        return
    err = np.where(both, np.abs(a - e), 0.0)
    lim = atol + rtol * np.abs(np.where(both, e, 0.0))
    fail = err > lim
    if fail.any():
        imax = np.unravel_index(int(np.argmax(err)), err.shape)
        rel = err / np.maximum(np.abs(np.where(both, e, 0.0)), np.finfo(np.float64).tiny)
        raise AssertionError(
            f"{what}: {int(fail.sum())}/{fail.size} elements outside atol={atol:g}, "
            f"rtol={rtol:g}; max abs err {err.max():.3e} at {tuple(int(i) for i in imax)} "
            f"(actual={a[imax]!r}, expected={e[imax]!r}); max rel err "
            f"{rel[both].max():.3e}"
        )


@pytest.fixture(scope="session")
def run_sim_worker(tmp_path_factory):
    """``run_sim_worker(script)``: run ``python script --worker OUT_DIR`` in a
    subprocess with Numba's CUDA simulator switched on (it must be on before
    ``numba.cuda`` is first imported, and this process imports Numba normally); return
    the (meta, arrays) it saved in OUT_DIR/meta.json and OUT_DIR/arrays.npz."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(script):
        out = tmp_path_factory.mktemp("cudasim")
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", TF_CPP_MIN_LOG_LEVEL="3")
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker",
                               str(out)], cwd=root, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (
            f"simulator worker failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}")
        with open(out / "meta.json") as f:
            meta = json.load(f)
        return meta, dict(np.load(out / "arrays.npz"))
    return run


@pytest.fixture
def assert_close():
    """The verbose comparison helper, as a fixture: ``assert_close(a, e, atol, rtol)``."""
    return check_close


@pytest.fixture
def rng():
    """A fresh, seeded generator per test (deterministic, independent of test order)."""
    return np.random.default_rng(1234)


# The CPU driver's code paths, forced through fastseq.config (read at call time):
#   fused        - every block takes the fused Numba kernel (one chunk of steps), which
#                  computes each step's input projection itself
#   gemm         - every block takes the per-step BLAS GEMM + pointwise kernel
#   fused-chunks - fused, one time step per chunk, U cut into 4-column blocks, the
#                  projection of each chunk a BLAS GEMM first
#   gemm-chunks  - per-step GEMM, one time step per chunk
#   split        - batches of up to 64 rows on two threads split by hidden units, with
#                  a barrier per step (kernels/lstm_split_cpu.py); other calls fused
#   split-chunks - the same, one time step per chunk
# Every path also splits rows across threads even for tiny problems.
CPU_PATHS = {
    # name: (GEMM_MIN_STEP_MACS, CHUNK_BYTES or None = leave the default, unit split)
    "fused": (1 << 62, None, False),
    "gemm": (0, None, False),
    "fused-chunks": (1 << 62, 1, False),
    "gemm-chunks": (0, 1, False),
    "split": (1 << 62, None, True),
    "split-chunks": (1 << 62, 1, True),
}
# XPROJ_MIN_ROWS per path: "fused" projects every step in the kernel whatever the rows,
# "fused-chunks" never does (a BLAS GEMM per chunk, then the fused kernel)
XPROJ_ROWS = {"fused": 0, "fused-chunks": 1 << 62, "split": 0, "split-chunks": 1 << 62}


@pytest.fixture(params=list(CPU_PATHS))
def cpu_path(request, monkeypatch):
    from fastseq import config
    gemm_min, chunk, unit_split = CPU_PATHS[request.param]
    monkeypatch.setattr(config, "GEMM_MIN_STEP_MACS", gemm_min)
    monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1)
    monkeypatch.setattr(config, "SPLIT_UNITS_MAX_ROWS", 64 if unit_split else 0)
    monkeypatch.setattr(config, "SPLIT_UNITS_MIN_STEP_MACS", 0)
    if request.param in XPROJ_ROWS:
        monkeypatch.setattr(config, "XPROJ_MIN_ROWS", XPROJ_ROWS[request.param])
    if chunk is not None:
        monkeypatch.setattr(config, "CHUNK_BYTES", chunk)
        monkeypatch.setattr(config, "CHUNK_MIN_ROWS", 1)
        monkeypatch.setattr(config, "FUSED_BLOCK_COLUMNS", 4)
        monkeypatch.setattr(config, "FUSED_ONE_BLOCK_COLUMNS", 0)
    return request.param
