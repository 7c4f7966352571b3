"""fastseq.dense against the float64 reference (tests/reference.py), on the CPU backend.

Tolerances come from ``fastseq.config.tolerance(dtype)``.  The ``rows_chunk`` fixture sets
``fastseq.config.DENSE_CHUNK_ROWS`` (rows per GEMM + fused-activation chunk):

* ``default`` - the configured chunk size: these small inputs fit in one chunk.
* ``5``       - several chunks, and a size that does not divide the row counts used
                (7, 10, 12, 600, ...): a ragged last chunk.
``test_one_row_chunks`` also runs with one row per chunk.
"""
import numpy as np
import pytest

import fastseq
from fastseq import config
from reference import ref_dense

DEVICE = "cpu"
ACTS = [None, "linear", "softmax", "log_softmax", "sigmoid", "tanh", "relu"]


@pytest.fixture(params=["default", 5])
def rows_chunk(request, monkeypatch):
    if request.param != "default":
        monkeypatch.setattr(config, "DENSE_CHUNK_ROWS", request.param)
        # and split the rows across threads even for tiny inputs
        monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1)
    return request.param


def _data(rng, shape, N, dtype=np.float32, scale=1.0):
    x = rng.standard_normal(shape).astype(dtype)
    W = (rng.standard_normal((shape[-1], N)) * scale).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    return x, W, b


def _run(x, W, b, activation, dtype, assert_close):
    got = fastseq.dense(x, W, b, activation=activation, device=DEVICE)
    want = ref_dense(x, W, b, activation)
    assert isinstance(got, np.ndarray) and got.dtype == np.dtype(dtype)
    atol, rtol = config.tolerance(dtype)
    assert_close(got, want, atol, rtol, what=f"dense activation={activation}")
    return got


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("shape", [(7, 5), (2, 5, 3), (2, 3, 2, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense(rng, assert_close, rows_chunk, activation, shape, dtype):
    x, W, b = _data(rng, shape, 9, dtype)
    got = _run(x, W, b, activation, dtype, assert_close)
    assert got.shape == shape[:-1] + (9,)


@pytest.mark.parametrize("activation", ACTS)
def test_one_row_chunks(rng, assert_close, monkeypatch, activation):
    monkeypatch.setattr(config, "DENSE_CHUNK_ROWS", 1)
    x, W, b = _data(rng, (2, 2, 3), 4)
    _run(x, W, b, activation, np.float32, assert_close)


@pytest.mark.parametrize("activation", ACTS)
def test_dense_no_bias(rng, assert_close, activation):
    x, W, _ = _data(rng, (3, 4, 5), 6)
    got = fastseq.dense(x, W, activation=activation, device=DEVICE)
    atol, rtol = config.tolerance(np.float32)
    assert_close(got, ref_dense(x, W, None, activation), atol, rtol)
    got = fastseq.dense(x, W, None, activation=activation, device=DEVICE)
    assert_close(got, ref_dense(x, W, None, activation), atol, rtol)


@pytest.mark.parametrize(
    "shape,N",
    [((1, 1), 1), ((1, 1, 1), 1), ((5, 1), 3), ((3, 70), 1), ((2, 3, 33), 17),
     ((1, 600, 8), 5)],
)
@pytest.mark.parametrize("activation", ["softmax", "log_softmax", "relu", None])
def test_dense_shapes(rng, assert_close, rows_chunk, shape, N, activation):
    x, W, b = _data(rng, shape, N)
    _run(x, W, b, activation, np.float32, assert_close)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [10000, 100])
def test_softmax_stable_large_logits(rng, assert_close, rows_chunk, dtype, scale):
    # Logits of order +-scale; a naive exp overflows (exp(1e4) = inf in any float).
    # Integer x and W keep every logit exact in float32 (|z| << 2**24), so the comparison
    # measures the softmax itself, not the (ill-conditioned) rounding of huge logits.
    x = rng.integers(-2, 3, size=(6, 4)).astype(dtype)
    W = np.zeros((4, 5), dtype=dtype)
    W[0] = [scale, -scale, 0, scale - 1, -scale // 2]
    W[1] = [-scale, scale, 1, 0, scale]
    W[2:] = rng.integers(-3, 4, size=(2, 5))
    b = np.zeros(5, dtype=dtype)
    got = _run(x, W, b, "softmax", dtype, assert_close)
    assert np.all(np.isfinite(got))
    atol, rtol = config.tolerance(dtype)
    np.testing.assert_allclose(got.sum(axis=-1, dtype=np.float64), 1.0, atol=10 * atol)
    assert np.all(got >= 0.0)

    lsm = fastseq.dense(x, W, b, activation="log_softmax", device=DEVICE)
    assert np.all(np.isfinite(lsm))
    want = ref_dense(x, W, b, "log_softmax")
    # values of size ~scale: allow the relative error of the dtype on top of atol
    assert_close(lsm, want, atol, max(rtol, 4 * np.finfo(dtype).eps))


def test_softmax_single_class(rng):
    # softmax over one unit is exactly 1, log_softmax exactly 0, whatever the logit.
    x = rng.standard_normal((4, 3)).astype(np.float32) * 1e3
    W = rng.standard_normal((3, 1)).astype(np.float32)
    sm = fastseq.dense(x, W, activation="softmax", device=DEVICE)
    lsm = fastseq.dense(x, W, activation="log_softmax", device=DEVICE)
    np.testing.assert_allclose(sm, 1.0, atol=1e-7)
    np.testing.assert_allclose(lsm, 0.0, atol=1e-6)


def test_sigmoid_tanh_extremes(rng, assert_close):
    x = np.array([[1.0], [-1.0], [0.0]], dtype=np.float32)
    W = np.array([[1e4, -200.0, 50.0, 0.5]], dtype=np.float32)
    for act in ("sigmoid", "tanh", "relu"):
        got = _run(x, W, None, act, np.float32, assert_close)
        assert np.all(np.isfinite(got))


@pytest.mark.parametrize("in_dtype", [np.int32, np.int64, np.uint8, np.float16])
def test_non_float_input_computes_float32(rng, assert_close, in_dtype):
    x = np.abs(rng.integers(-3, 4, size=(3, 4))).astype(in_dtype)
    _, W, b = _data(rng, (3, 4), 5)
    _run(x, W, b, "softmax", np.float32, assert_close)


def test_int_weights_compute_float32(rng, assert_close):
    x = rng.integers(-2, 3, size=(2, 3, 4))
    W = rng.integers(-2, 3, size=(4, 5))
    b = rng.integers(-2, 3, size=5)
    _run(x, W, b, "tanh", np.float32, assert_close)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous(rng, assert_close, rows_chunk, dtype):
    x = rng.standard_normal((6, 2, 3, 8)).astype(dtype).transpose(1, 2, 0, 3)[..., ::2]
    W = rng.standard_normal((7, 6)).astype(dtype).T          # [6, 7] transposed view
    W = W[::-1][:4][::-1]                                      # [4, 7] negative strides
    b = rng.standard_normal(14).astype(dtype)[1::2]
    assert not x.flags.c_contiguous and not W.flags.c_contiguous
    for act in ("softmax", "log_softmax", None):
        got = _run(x, W, b, act, dtype, assert_close)
        assert got.shape == (2, 3, 6, 7)


def test_empty_rows(rng):
    x, W, b = _data(rng, (0, 3, 4), 5)
    for act in ACTS:
        y = fastseq.dense(x, W, b, activation=act, device=DEVICE)
        assert y.shape == (0, 3, 5) and y.dtype == np.float32


def test_nan_stays_in_its_row(rng):
    x, W, b = _data(rng, (4, 3), 5)
    x[2, 1] = np.nan
    for act in ACTS:
        y = fastseq.dense(x, W, b, activation=act, device=DEVICE)
        assert np.isnan(y[2]).all(), act
        assert np.isfinite(np.delete(y, 2, axis=0)).all(), act


def test_inputs_not_modified(rng):
    x, W, b = _data(rng, (2, 3, 4), 5)
    copies = [a.copy() for a in (x, W, b)]
    for act in ACTS:
        fastseq.dense(x, W, b, activation=act, device=DEVICE)
    for a, c in zip((x, W, b), copies):
        np.testing.assert_array_equal(a, c)
