#!/usr/bin/env bash
# One-call GPU check of the fastseq CUDA backend on an H100/H200 (about 8 minutes at
# most, no downloads): correctness against the CPU path and a float64 reference, and
# timings against PyTorch nn.LSTM (cuDNN, TF32 off and on) and Linear+softmax.
# Prints a markdown table; with $OUT set, writes $OUT/gpu_check.json (and the log).
# Extra arguments go to bench/gpu_check.py (e.g. --quick, --budget 300).
#
# The lent GPU image (2026-11) has NumPy 2.5 with numba-cuda 0.30.4, which cannot compile
# kernels under NumPy 2.5. Before the call, on the development machine, run
#     bash bench/gpu_wheels.sh
# (it downloads a NumPy 2.4 wheel into .whl/, ignored by git), and name .whl in the
# device call's carry: this script then installs the wheels found there into
# /tmp/site and puts that first on PYTHONPATH.
set -u
cd "$(dirname "$0")/.." || exit 2
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export CUPY_TF32=0 TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
unset NUMBA_ENABLE_CUDASIM
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
fi
python - <<'PY' || true
import importlib
for m in ("numpy", "numba", "numba_cuda", "cupy", "torch"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as exc:
        print(f"{m} not importable: {exc}")
PY
log=/dev/null
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; log="$OUT/gpu_check.log"; fi
timeout 510 python bench/gpu_check.py "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ]; then echo "gpu_check.py timed out (510 s)"; fi
exit "$rc"
