"""The shared-memory row staging of the CUDA kernels (``make_stage_rows``), run in
Numba's CUDA simulator in a subprocess (the simulator must be switched on before
``numba.cuda`` is first imported; other tests import Numba normally).  The cases cover
a row shorter than the block (several rows per step of the threads), longer than the
block, lengths that do not divide the block, one pass and several passes of 8 values
per thread, and a padded destination stride."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (rows, columns, destination row stride, threads per block)
CASES = [(1, 1, 1, 4), (3, 5, 7, 4), (4, 3, 3, 8), (2, 13, 13, 4), (5, 9, 11, 16),
         (7, 2, 3, 32), (6, 40, 41, 8), (1, 70, 70, 8)]

WORKER = r"""
import json, sys
import numpy as np
from numba import cuda
from fastseq.kernels.lstm_cuda import make_stage_rows

out = {}
for dt in (np.float32, np.float64):
    stage_rows = make_stage_rows(dt)

    @cuda.jit
    def kern(src, dst, ds, nthr_used):
        sm = cuda.shared.array(0, dtype=src.dtype)
        n = dst.shape[0]
        tid = cuda.threadIdx.x
        for e in range(tid, n, cuda.blockDim.x):
            sm[e] = -1.0
        cuda.syncthreads()
        stage_rows(src, sm, ds, tid, cuda.blockDim.x)
        cuda.syncthreads()
        for e in range(tid, n, cuda.blockDim.x):
            dst[e] = sm[e]

    for R, C, ds, nthr in json.loads(sys.argv[1]):
        src = (np.arange(R * C, dtype=dt).reshape(R, C) + 1)
        dst = np.zeros(R * ds, dt)
        kern[1, nthr, 0, R * ds * np.dtype(dt).itemsize](src, dst, ds, nthr)
        out[f"{np.dtype(dt).name}-{R}-{C}-{ds}-{nthr}"] = dst.tolist()
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def staged():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", WORKER, json.dumps(CASES)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_stage_rows_copies_every_value_once_into_padded_rows(staged, dtype, case):
    R, C, ds, nthr = case
    got = np.array(staged[f"{dtype}-{R}-{C}-{ds}-{nthr}"])
    want = np.full(R * ds, -1.0)
    for r in range(R):
        want[r * ds:r * ds + C] = np.arange(r * C, (r + 1) * C) + 1
    np.testing.assert_array_equal(got, want)
