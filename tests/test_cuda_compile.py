"""Every CUDA kernel of fastseq compiles for real (compute capability 9.0), without a GPU.

The compilation runs in a subprocess with ``NUMBA_ENABLE_CUDASIM`` removed from the
environment (the simulator would replace the compiler); this file doubles as the worker
(``python tests/test_cuda_compile.py --worker OUT.json``).  For each kernel and each
signature the package launches (``fastseq._cuda.kernel_catalog()``: float32 and float64,
both batch register tiles of the LSTM kernels) the worker calls
``numba.cuda.compile_ptx(fn, sig, cc=(9, 0))`` and checks the PTX targets sm_90 and
defines the kernel entry (the persistent kernel must contain the cooperative grid
barrier).  Then, where the toolchain allows it, the PTX is assembled and linked for
sm_90 by nvJitLink (through ``cuda.core``, with the device runtime library for the grid
barrier) and the registers / shared memory / stack it reports are printed (run pytest
with ``-s`` to see the table); that part is informative only.

Numba compiles the device functions a kernel calls (and the cooperative-groups helpers)
for "the current device", which needs a driver even under ``compile_ptx``; the worker
therefore tells Numba's dispatcher that the current device has compute capability 9.0.

The other tests here check the no-GPU behaviour: ``import fastseq`` never imports
``numba.cuda``, and ``device="cuda"`` fails with a RuntimeError that says why.
"""
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CC = (9, 0)


def _resources(ptx, entry):
    """Registers etc. of ``entry`` from an nvJitLink link of ``ptx`` for sm_90."""
    try:
        from cuda.core import Linker, LinkerOptions, ObjectCode
    except ImportError:
        from cuda.core.experimental import Linker, LinkerOptions, ObjectCode
    from numba.cuda.cudadrv.libs import get_cudalib
    objs = [ObjectCode.from_ptx(ptx.encode())]
    with open(get_cudalib("cudadevrt", static=True), "rb") as f:
        objs.append(ObjectCode.from_library(f.read()))
    linker = Linker(*objs, options=LinkerOptions(arch=f"sm_{CC[0]}{CC[1]}", verbose=True))
    linker.link("cubin")
    log = linker.get_info_log()
    lines = log.splitlines()
    out = {}
    # two blocks mention the kernel: ptxas' ("N bytes stack frame, N bytes spill
    # stores") and the linker's ("used N registers, ..., N bytes smem, N bytes lmem")
    for i, line in enumerate(lines[:-1]):
        if "Function properties for" in line and entry in line:
            props = lines[i + 1]
            for key, pat in (("registers", r"used (\d+) registers"),
                             ("stack", r"(\d+) bytes stack frame"),
                             ("spill_stores", r"(\d+) bytes spill stores"),
                             ("smem", r"(\d+) bytes smem"),
                             ("lmem", r"(\d+) bytes lmem")):
                m = re.search(pat, props)
                if m:
                    out[key] = int(m.group(1))
    if out:
        return out
    raise RuntimeError("no resource line for the kernel in the nvJitLink log")


def _worker(out_path):
    assert not os.environ.get("NUMBA_ENABLE_CUDASIM")
    sys.path.insert(0, ROOT)
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda

    class _Device:
        compute_capability = CC

    dispatcher.get_current_device = lambda: _Device()
    from fastseq import _cuda
    results = {}
    for name, fn, sig in _cuda.kernel_catalog():
        r = {}
        try:
            ptx, _ = cuda.compile_ptx(fn, sig, cc=CC)
            m = re.search(r"\.entry\s+(\S+)\s*\(", ptx)
            r.update(ok=True, target=f".target sm_{CC[0]}{CC[1]}" in ptx,
                     entry=m.group(1) if m else None, ptx_chars=len(ptx),
                     grid_sync="cudaCGSynchronize" in ptx)
            try:
                r["resources"] = _resources(ptx, r["entry"])
            except Exception as exc:  # informative only
                r["resources"] = None
                r["resource_error"] = f"{type(exc).__name__}: {exc}"[:300]
        except Exception as exc:
            r.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
        results[name] = r
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
    sys.exit(0)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fastseq import _cuda  # noqa: E402

KERNEL_NAMES = [name for name, _, _ in _cuda.kernel_catalog()]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"compile worker failed:\n{proc.stdout}\n{proc.stderr}"
    with open(out) as f:
        res = json.load(f)
    print("\nCUDA kernels compiled for sm_90 (nvJitLink figures; smem = static shared "
          "memory incl. the 1 KiB the system reserves per block, dynamic shared memory is "
          "sized per launch; stack = local-memory frame, where per-row accumulators are "
          "parked after the register-resident inner loops):")
    for name, r in res.items():
        rs = r.get("resources")
        fig = (", ".join(f"{k}={v}" for k, v in rs.items()) if rs
               else r.get("resource_error", r.get("error", "")))
        print(f"  {name:34s} {fig}")
    return res


def test_catalog_covers_every_kernel():
    kinds = {n.split("[")[0] for n in KERNEL_NAMES}
    assert kinds == {"lstm_persistent", "lstm_step", "lstm_cell_gemm", "init_state",
                     "transpose", "gemm",
                     "dense", "dense_epilogue",
                     "dense_argmax", "train_fwd_cell", "train_bwd_cell", "train_bwd_dh",
                     "train_col_sum", "train_scan_h", "train_scan_c", "train_swap01",
                     "train_bwd_persistent", "train_bwd_persistent_global"}
    for dt in ("float32", "float64"):
        assert sum(f"[{dt}" in n for n in KERNEL_NAMES) == len(KERNEL_NAMES) // 2


@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_kernel_compiles_for_sm90(compiled, name):
    r = compiled[name]
    assert r["ok"], r.get("error")
    assert r["target"], "PTX does not target sm_90"
    assert r["entry"], "no kernel entry in the PTX"
    # the persistent kernels really contain the grid-wide barrier, the others do not
    assert r["grid_sync"] == name.startswith(("lstm_persistent", "train_bwd_persistent"))
    rs = r.get("resources")
    if rs:   # where nvJitLink could assemble it: no register spills
        assert rs.get("spill_stores", 0) == 0, rs


def test_activation_codes_match_cpu_kernels():
    from fastseq.kernels.activations import ACTIVATION_CODES
    from fastseq.kernels.lstm_cuda import ACTIVATION_CODES as CUDA_CODES
    assert CUDA_CODES == ACTIVATION_CODES


_NO_CUDA_SCRIPT = r"""
import sys
import fastseq
assert not [m for m in sys.modules if m.startswith(("numba.cuda", "numba_cuda"))], \
    "import fastseq imported numba.cuda"

class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "numba.cuda" or name.startswith(("numba.cuda.", "numba_cuda")):
            raise ImportError("blocked for the test: no numba-cuda")
        return None

sys.meta_path.insert(0, _Block())
import numpy as np
from fastseq import _cuda
assert _cuda.is_available() is False
x = np.zeros((1, 2, 3), np.float32)
try:
    fastseq.lstm(x, np.zeros((3, 8), np.float32), np.zeros((2, 8), np.float32),
                 device="cuda")
except RuntimeError as exc:
    print("MSG:", exc)
else:
    raise SystemExit("no RuntimeError")
"""


def test_import_never_needs_cuda_and_missing_numba_cuda_is_explained():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _NO_CUDA_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "numba-cuda" in proc.stdout and "device='cuda'" in proc.stdout, proc.stdout


def test_device_cuda_without_gpu_raises_clear_error(rng):
    import fastseq
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    W = rng.standard_normal((4, 20)).astype(np.float32)
    U = rng.standard_normal((5, 20)).astype(np.float32)
    Wd = rng.standard_normal((5, 7)).astype(np.float32)
    assert isinstance(_cuda.is_available(), bool)
    if _cuda.is_available():
        # a machine with a GPU (or the simulator switched on for the whole run): the
        # CUDA path must then actually work
        from reference import ref_lstm
        out = fastseq.lstm(x, W, U, device="cuda")
        np.testing.assert_allclose(out, ref_lstm(x, W, U), atol=2e-5, rtol=2e-5)
        return
    reason = _cuda.unavailable_reason()
    assert reason and ("driver" in reason or "numba-cuda" in reason), reason
    with pytest.raises(RuntimeError, match="device='cuda' is not usable") as ei:
        fastseq.lstm(x, W, U, device="cuda")
    assert reason in str(ei.value)
    with pytest.raises(RuntimeError, match="device='cuda' is not usable"):
        fastseq.dense(x, Wd[:4], device="cuda")
    with pytest.raises(RuntimeError, match="device='cuda' is not usable"):
        _cuda.argmax_dense_cuda(x, Wd[:4], None, "softmax")
    from fastseq.training import lstm_vjp
    dy = np.ones((2, 5), np.float32)
    with pytest.raises(RuntimeError, match="device='cuda' is not usable"):
        lstm_vjp(x, W, U, None, dy, device="cuda")
    with pytest.raises(ValueError, match="`device` must be"):
        lstm_vjp(x, W, U, None, dy, device="gpu")
    # NumPy inputs with device="auto" run on the CPU
    assert isinstance(fastseq.lstm(x, W, U, device="auto"), np.ndarray)


def test_numpy_numba_cuda_mismatch_is_explained():
    """numba-cuda 0.30.4 cannot type any kernel under NumPy 2.5 (np.row_stack is gone):
    seen on the lent H100 image.  The compile step then raises a RuntimeError that says
    what to install; other compile errors pass through unchanged."""
    class _FakeCuda:
        def __init__(self, message):
            self.message = message

        def jit(self, sig):
            def deco(fn):
                raise AttributeError(self.message)
            return deco

    def kernel():
        pass

    with pytest.raises(RuntimeError, match=r"numpy<2\.5"):
        _cuda._jit(_FakeCuda("module 'numpy' has no attribute 'row_stack'"),
                   ("test-mismatch",), kernel, ())
    with pytest.raises(AttributeError, match="something else"):
        _cuda._jit(_FakeCuda("something else"), ("test-other",), kernel, ())
    assert ("test-mismatch",) not in _cuda._JIT and ("test-other",) not in _cuda._JIT
