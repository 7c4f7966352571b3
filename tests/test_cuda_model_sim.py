"""``from_keras(model, device="cuda")`` in Numba's CUDA simulator: the Model uploads its
weights once (not per call), re-uploads after its weights change, matches the CPU path,
and ``predict_classes`` runs the fused argmax kernel.  Runs in a subprocess because the
simulator must be enabled before ``numba.cuda`` is first imported."""
import json
import os
import subprocess
import sys

import pytest

WORKER = r'''
import json, os, sys
import numpy as np
import keras
import fastseq
from fastseq import _cuda

keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((None,), dtype="int32"),
    keras.layers.Embedding(20, 4, mask_zero=True),
    keras.layers.Bidirectional(keras.layers.LSTM(3, return_sequences=True)),
    keras.layers.LSTM(5, return_sequences=True),
    keras.layers.TimeDistributed(keras.layers.Dense(6, activation="softmax")),
])
rng = np.random.default_rng(0)
ids = rng.integers(1, 20, size=(3, 4))
ids[0, 2:] = 0
cpu = fastseq.from_keras(model, device="cpu")
gpu = fastseq.from_keras(model, device="cuda")
res = {}
p1 = gpu.predict(ids)
up1 = _cuda.UPLOADS["weights"]
p2 = gpu.predict(ids)
res["uploads_first"] = up1
res["uploads_second"] = _cuda.UPLOADS["weights"] - up1
res["err"] = float(np.abs(p1 - cpu.predict(ids)).max())
res["same_twice"] = bool(np.array_equal(p1, p2))
launches = dict(_cuda.LAUNCHES)
cls = gpu.predict_classes(ids)
res["argmax_launches"] = _cuda.LAUNCHES["dense_argmax"] - launches.get("dense_argmax", 0)
res["classes_equal"] = bool(np.array_equal(cls, np.argmax(cpu.predict(ids), -1)))
w = gpu.get_weights()
gpu.set_weights([a * 0.5 for a in w])
cpu.set_weights([a * 0.5 for a in w])
before = _cuda.UPLOADS["weights"]
p3 = gpu.predict(ids)
res["reuploads"] = _cuda.UPLOADS["weights"] - before
res["err_after_set"] = float(np.abs(p3 - cpu.predict(ids)).max())
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_model_on_cuda_matches_cpu(result):
    assert result["err"] <= 1e-5 and result["same_twice"]


def test_weights_are_uploaded_once_per_model(result):
    # Bidirectional (2 LSTMs) + LSTM + Dense: uploads on the first call only
    assert result["uploads_first"] > 0
    assert result["uploads_second"] == 0


def test_set_weights_triggers_one_reupload(result):
    assert result["reuploads"] > 0
    assert result["err_after_set"] <= 1e-5


def test_predict_classes_uses_the_fused_argmax_kernel(result):
    assert result["argmax_launches"] > 0
    assert result["classes_equal"]
