"""The ``fastseq`` command line (bench, validate) and the benchmark's building blocks."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastseq import benchmark, cli, config
from fastseq.benchmark import SyntheticConfig

ROOT = Path(__file__).resolve().parent.parent

# Keras's model.save() converts TF variables with np.array(copy=False) under NumPy 2.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _run(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fastseq", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_console_script():
    exe = shutil.which("fastseq")
    if exe is None:
        pytest.skip("the fastseq console script is not installed (pip install -e .)")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "validate" in r.stdout


def test_module_help():
    r = _run("--help", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "bench" in r.stdout and "validate" in r.stdout
    r = _run("bench", "--help", timeout=60)
    assert r.returncode == 0 and "--quick" in r.stdout and "--json" in r.stdout
    r = _run("--version", timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("fastseq ")


def test_bench_quick_end_to_end(tmp_path):
    out_json = tmp_path / "bench.json"
    out_png = tmp_path / "bench.png"
    # keras-jax (a subprocess per config) is left out to keep this test short; its
    # subprocess path is covered by test_keras_in_subprocess.
    providers = [p for p in benchmark.PROVIDERS if p != "keras-jax"]
    r = _run("bench", "--quick", "--json", str(out_json), "--plot", str(out_png),
             "--providers", ",".join(providers))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    text = r.stdout
    assert "machine:" in text and "GFLOP/s" in text
    report = json.loads(out_json.read_text())
    assert report["quick"] is True and report["sgemm"]["gflops"] > 0
    # ONNX Runtime runs with its own default, spin-waiting threads
    assert report["onnxruntime_spinning"] is True and "(spin-waiting on)" in text
    assert report["machine"]["versions"]["numpy"] == np.__version__
    rows = {(x["config"], x["provider"]): x for x in report["results"]}
    for cfg in ("C1", "C2", "C3", "C4"):
        # The table has a fastseq and a keras row for every config...
        for prov in ("fastseq", "keras"):
            line = next((ln for ln in text.splitlines()
                         if re.match(rf"{cfg}\s+{prov}\s", ln)), None)
            assert line is not None, f"no {cfg}/{prov} row in\n{text}"
            assert rows[(cfg, prov)]["status"] == "ok", rows[(cfg, prov)]
            assert rows[(cfg, prov)]["median_ms"] > 0
        fs = rows[(cfg, "fastseq")]
        # ...fastseq matches Keras (the table shows the same figure as the JSON)...
        assert fs["max_abs_diff"] <= config.KERAS_PARITY_ATOL
        assert fs["tag_agreement"] == 1.0
        assert fs["ratio_to_fastseq"] == 1.0
        fs_line = next(ln for ln in text.splitlines() if re.match(rf"{cfg}\s+fastseq\s", ln))
        assert f"{fs['max_abs_diff']:.2e}" in fs_line
        # ...and a provider that is not installed is reported as missing, never timed.
        for prov in providers:
            missing = benchmark.provider_missing(prov)
            if missing:
                assert rows[(cfg, prov)]["status"] == missing
                assert "median_ms" not in rows[(cfg, prov)]
                assert re.search(rf"{cfg}\s+{prov}\s+{missing}", text)
            else:
                assert rows[(cfg, prov)]["status"] == "ok", rows[(cfg, prov)]
                assert rows[(cfg, prov)]["max_abs_diff"] < 1e-4
    c4 = report["configs"]["C4"]
    assert c4["sentences"] == 96 and c4["tokens"] > 96
    assert rows[("C4", "fastseq")]["sentences_per_s"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flag,spinning", [([], True), (["--ort-no-spin"], False)])
def test_bench_ort_spinning_option(monkeypatch, flag, spinning):
    seen = {}

    def fake_run(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")
    monkeypatch.setattr(benchmark, "run_benchmark", fake_run)
    assert cli.main(["bench", "--no-progress", "--no-sgemm"] + flag) == 2
    assert seen["ort_spinning"] is spinning


def test_bench_rejects_unknown_config(capsys):
    assert cli.main(["bench", "--configs", "C9", "--no-sgemm", "--no-progress"]) == 2
    assert "C9" in capsys.readouterr().err


# --- validate --------------------------------------------------------------------------

keras = pytest.importorskip("keras", reason="missing: keras")


@pytest.fixture(scope="module")
def tagger_path(tmp_path_factory):
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(40, 6, mask_zero=True),
        keras.layers.LSTM(8, return_sequences=True),
        keras.layers.TimeDistributed(keras.layers.Dense(5, activation="softmax")),
    ])
    path = tmp_path_factory.mktemp("models") / "tagger.keras"
    model.save(path)
    return path


def _numbers(text, label):
    m = re.search(label + r" ([0-9.e+-]+)", text)
    assert m, f"{label!r} not in output:\n{text}"
    return float(m.group(1))


def test_validate_saved_tagger(tagger_path, capsys):
    rc = cli.main(["validate", str(tagger_path), "--batch-size", "6"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert _numbers(out, "max abs diff") <= config.KERAS_PARITY_ATOL
    assert "max rel diff" in out and "argmax agreement" in out and "PASS" in out
    # random ragged input: some steps masked
    m = re.search(r"shape \(6, 20\) dtype int32, (\d+) of 120 steps unmasked", out)
    assert m and 6 <= int(m.group(1)) < 120, out


def test_validate_with_input_file(tmp_path, capsys):
    model = keras.Sequential([keras.Input((None, 3)), keras.layers.LSTM(4),
                              keras.layers.Dense(2)])
    mpath = tmp_path / "m.keras"
    model.save(mpath)
    x = np.random.default_rng(1).standard_normal((5, 9, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rc = cli.main(["validate", str(mpath), "--input", str(tmp_path / "x.npy")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "shape (5, 9, 3)" in out
    assert _numbers(out, "max abs diff") <= config.KERAS_PARITY_ATOL


def test_validate_outside_tolerance_exits_nonzero(tagger_path, capsys, monkeypatch):
    import fastseq

    real = fastseq.from_keras

    class Off:
        def __init__(self, model):
            self.inner = real(model)

        def predict(self, x, batch_size=None):
            return self.inner.predict(x, batch_size=batch_size) + 1e-3

    monkeypatch.setattr(fastseq, "from_keras", Off, raising=False)
    rc = cli.main(["validate", str(tagger_path), "--batch-size", "4"])
    out = capsys.readouterr().out
    assert rc == cli.EXIT_MISMATCH, out
    assert "OUTSIDE TOLERANCE" in out and "FAIL" in out
    assert abs(_numbers(out, "max abs diff") - 1e-3) < 1e-5


def test_validate_unsupported_layer_names_it(tmp_path, capsys):
    model = keras.Sequential([keras.Input((7, 3)), keras.layers.GRU(4, return_sequences=True),
                              keras.layers.Dense(2)])
    mpath = tmp_path / "gru.keras"
    model.save(mpath)
    rc = cli.main(["validate", str(mpath)])
    out = capsys.readouterr().out
    assert rc == cli.EXIT_UNSUPPORTED
    assert "error" in out and "GRU" in out


def test_validate_not_a_model(tmp_path, capsys):
    p = tmp_path / "junk.keras"
    p.write_bytes(b"not a zip")
    assert cli.main(["validate", str(p)]) == cli.EXIT_UNSUPPORTED
    assert "cannot load" in capsys.readouterr().out


# --- benchmark building blocks ----------------------------------------------------------

TINY = SyntheticConfig("tiny", B=3, T=7, D=5, H=6, K=4)


@pytest.fixture(scope="module")
def tiny():
    return benchmark.synthetic_workload(TINY, seed=3)


@pytest.fixture(scope="module")
def c4_quick():
    return benchmark.make_workload("C4", quick=True, seed=2)


def test_workloads_match_their_keras_models(tiny, c4_quick):
    assert tiny.inputs[0].shape == (3, 7, 5)
    assert all(np.array_equal(a, b) for a, b in zip(tiny.keras_model.get_weights(),
                                                     tiny.weights))
    # C4's Keras run model (plain Dense) equals the TimeDistributed model fastseq converts.
    for ids in c4_quick.inputs[:2]:
        a = np.asarray(c4_quick.keras_model(ids, training=False))
        b = np.asarray(c4_quick.keras_run_model(ids, training=False))
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert c4_quick.n_sentences == 96
    assert c4_quick.n_tokens == sum(int(m.sum()) for m in c4_quick.masks)
    assert c4_quick.keras_model.layers[-1].__class__.__name__ == "TimeDistributed"


def test_compare_outputs_detects_differences(tiny, c4_quick):
    ref = benchmark.make_runner("keras", tiny)()
    assert benchmark.compare_outputs(tiny, ref, ref)["max_abs_diff"] == 0
    bad = ref.copy()
    bad[0, 0, 0] += 0.25
    assert benchmark.compare_outputs(tiny, bad, ref)["max_abs_diff"] == pytest.approx(0.25)
    refs = benchmark.make_runner("keras", c4_quick)()
    pad = [r.copy() for r in refs]
    pad[0][~c4_quick.masks[0]] = 9.0     # padding is ignored
    assert benchmark.compare_outputs(c4_quick, pad, refs)["max_abs_diff"] == 0


@pytest.mark.parametrize("provider", ["onnxruntime", "torch"])
def test_peer_providers_match_keras(provider, tiny, c4_quick):
    missing = benchmark.provider_missing(provider)
    if missing:
        pytest.skip(missing)
    for wl, atol in ((tiny, 1e-6), (c4_quick, 1e-6)):
        out = benchmark.make_runner(provider, wl)()
        ref = benchmark.make_runner("keras", wl)()
        cmp = benchmark.compare_outputs(wl, out, ref)
        assert cmp["max_abs_diff"] < atol, (provider, wl.name, cmp)
        assert cmp["argmax_agreement"] == 1.0


def test_onnx_graph_gate_order_and_bias_split(tiny):
    pytest.importorskip("onnx", reason="missing: onnx")
    from fastseq import onnx_export
    k, rk, b = tiny.weights[:3]
    w, r, bb = onnx_export.keras_lstm_to_onnx_weights(k, rk, b)
    h = TINY.H
    assert w.shape == (1, 4 * h, TINY.D) and r.shape == (1, 4 * h, h)
    assert bb.shape == (1, 8 * h) and not bb[0, 4 * h:].any()
    # ONNX order i, o, f, c from Keras i, f, c, o
    np.testing.assert_array_equal(w[0, h:2 * h], k[:, 3 * h:].T)        # o
    np.testing.assert_array_equal(w[0, 2 * h:3 * h], k[:, h:2 * h].T)   # f
    np.testing.assert_array_equal(bb[0, 3 * h:4 * h], b[2 * h:3 * h])   # c
    with pytest.raises(ValueError, match="kernel must be"):
        onnx_export.keras_lstm_to_onnx_weights(k[:, :-1], rk, b)


def test_keras_in_subprocess(tiny):
    # The Keras-on-JAX provider runs Keras in a child interpreter.  Where JAX is not
    # installed the same path runs with the TensorFlow backend.
    backend = "tensorflow" if benchmark.provider_missing("keras-jax") else "jax"
    res = benchmark.run_keras_subprocess(tiny, backend, warmup=0, repeats=2)
    assert len(res["times_ms"]) == 2 and res["first_ms"] > 0
    ref = benchmark.make_runner("keras", tiny)()
    assert benchmark.compare_outputs(tiny, res["output"], ref)["max_abs_diff"] < 1e-6


def test_format_table_and_missing_provider():
    report = {
        "machine": {"cpu": "X CPU", "logical_cores": 2, "usable_cores": 2, "platform": "p",
                    "versions": {"numpy": "1"}},
        "threads": "framework defaults", "onnxruntime_threads": 2, "repeats": 3,
        "warmup": 1, "sgemm": {"n": 8, "gflops": 10.0},
        "configs": {"C1": {"description": "d", "flops": 1e9}},
        "results": [
            {"config": "C1", "provider": "fastseq", "status": "ok", "median_ms": 2.0,
             "runs": 5, "first_call_ms": 9.0, "ratio_to_fastseq": 1.0, "max_abs_diff": 1e-8,
             "tag_agreement": 1.0, "gflops": 500.0, "pct_sgemm": 5000.0},
            {"config": "C1", "provider": "torch", "status": "missing: torch"},
        ]}
    text = benchmark.format_table(report)
    assert "X CPU" in text and "10.0 GFLOP/s" in text
    assert re.search(r"C1\s+fastseq\s+2\.000\s+5\s+9\.0\s+1\.00\s+1\.00e-08", text)
    assert re.search(r"C1\s+torch\s+missing: torch", text)
    with pytest.raises(ValueError, match="unknown provider"):
        benchmark.provider_missing("tensorrt")
    assert benchmark.provider_missing("keras") is None
