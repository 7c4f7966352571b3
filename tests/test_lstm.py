"""fastseq.lstm against the float64 reference (tests/reference.py), on the CPU backend.

Tolerances come from ``fastseq.config.tolerance(dtype)``.  The CPU driver has two ways of
running the recurrence and a time-chunked input projection; the ``cpu_path`` fixture
forces each of them through ``fastseq.config`` (read at call time):

* ``fused``        - GEMM_MIN_STEP_MACS huge: every block takes the fused Numba kernel
                     (rows four at a time, leftover rows one at a time), which
                     computes each step's input projection itself
                     (XPROJ_MIN_ROWS = 0).
* ``gemm``         - GEMM_MIN_STEP_MACS = 0: every block takes the per-step BLAS GEMM
                     (h @ U) + pointwise kernel path.
* ``fused-chunks`` - fused path with CHUNK_BYTES = 1: one time step per chunk, so the
                     state/mask/"seen" bookkeeping is carried across many chunks, and
                     FUSED_BLOCK_COLUMNS = 4 (FUSED_ONE_BLOCK_COLUMNS = 0): U cut
                     into H column blocks, narrower than a vector; each chunk's
                     projection is a BLAS GEMM (XPROJ_MIN_ROWS huge).
* ``gemm-chunks``  - GEMM path with CHUNK_BYTES = 1.
* ``split``        - batches of up to 64 rows run on two threads, each owning half of
                     the hidden units, with a barrier per step (go_backwards calls
                     take the fused path); ``tests/test_lstm_split.py`` checks that the
                     split kernel really runs and covers its claim protocol.
* ``split-chunks`` - the same with one time step per chunk.
"""
import numpy as np
import pytest

import fastseq
from fastseq import config
from reference import ref_lstm

DEVICE = "cpu"
ACTS = ["tanh", "sigmoid", "hard_sigmoid", "relu", "linear", None, "softsign"]

# the ``cpu_path`` fixture (tests/conftest.py) forces each CPU path; see the docstring


def _data(rng, B, T, D, H, dtype=np.float32, scale=0.5):
    x = rng.standard_normal((B, T, D)).astype(dtype)
    W = (rng.standard_normal((D, 4 * H)) * scale).astype(dtype)
    U = (rng.standard_normal((H, 4 * H)) * scale).astype(dtype)
    b = (rng.standard_normal(4 * H) * scale).astype(dtype)
    return x, W, U, b


def _states(rng, B, H, dtype=np.float32):
    return [rng.standard_normal((B, H)).astype(dtype) for _ in range(2)]


def _check(got, want, dtype, assert_close, return_state):
    """Compare a fastseq result with the reference; check the dtype of every array."""
    atol, rtol = config.tolerance(dtype)
    if return_state:
        assert isinstance(got, (list, tuple)) and len(got) == 3
        for name, g, w in zip(("output", "h", "c"), got, want):
            assert isinstance(g, np.ndarray) and g.dtype == np.dtype(dtype), (name, type(g))
            assert_close(g, w, atol, rtol, what=name)
    else:
        assert isinstance(got, np.ndarray) and got.dtype == np.dtype(dtype)
        assert_close(got, want, atol, rtol)


def _run(x, W, U, b, assert_close, dtype, **kw):
    got = fastseq.lstm(x, W, U, b, device=DEVICE, **kw)
    want = ref_lstm(x, W, U, b, **kw)
    _check(got, want, dtype, assert_close, kw.get("return_state", False))
    return got, want


# ------------------------------------------------------------------------------ basics
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_random(rng, assert_close, cpu_path, dtype, return_sequences, go_backwards):
    x, W, U, b = _data(rng, 3, 5, 4, 7, dtype)
    _run(x, W, U, b, assert_close, dtype, initial_state=_states(rng, 3, 7, dtype),
         return_sequences=return_sequences, return_state=True, go_backwards=go_backwards)


@pytest.mark.parametrize(
    "B,T,D,H",
    [
        (1, 1, 1, 1),     # everything minimal
        (1, 1, 3, 5),     # T = 1
        (2, 3, 1, 7),     # D = 1, odd H
        (3, 4, 5, 33),    # H not a multiple of any SIMD/block width
        (2, 2, 70, 3),    # D > H
        (17, 3, 2, 7),    # blocks of 8 and 9 rows: 4-row tiles plus leftover rows
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shapes(rng, assert_close, cpu_path, B, T, D, H, dtype):
    x, W, U, b = _data(rng, B, T, D, H, dtype)
    _run(x, W, U, b, assert_close, dtype, return_sequences=True, return_state=True)
    _run(x, W, U, b, assert_close, dtype)


@pytest.mark.parametrize("block", [16, 32, 48, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_column_blocks(rng, assert_close, monkeypatch, block, dtype):
    """The fused kernel on U cut into several blocks, each one or more whole vectors
    wide (the register tiles: 4 x 4 vectors, 4 x 1, one row; with block 48 and float32
    a block is 3 vectors, so no 4 x 4 tile fits), with masked rows; the gates read the
    blocks in place when the block width divides H (16, 48), else gather each row
    (32, 64).  The default blocking (64 columns) applies from H = 256 up."""
    monkeypatch.setattr(config, "FUSED_BLOCK_COLUMNS", block)
    monkeypatch.setattr(config, "FUSED_ONE_BLOCK_COLUMNS", 0)
    monkeypatch.setattr(config, "MIN_MACS_PER_THREAD", 1 << 62)   # one thread, one block
    B, T, D, H = 6, 7, 5, 48
    x, W, U, b = _data(rng, B, T, D, H, dtype, scale=0.3)
    mask = np.ones((B, T), dtype=bool)
    mask[4:, 3:] = False          # two rows padded: a masked group and single rows
    mask[0, :2] = False
    _run(x, W, U, b, assert_close, dtype, mask=mask, return_sequences=True,
         return_state=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_sequence(rng, assert_close, cpu_path, dtype):
    # T = 300: error must not accumulate; with CHUNK_BYTES=1 also 300 chunks.
    B, T, D, H = 2, 300, 3, 6
    x, W, U, b = _data(rng, B, T, D, H, dtype)
    mask = np.ones((B, T), dtype=bool)
    mask[1, 250:] = False
    _run(x, W, U, b, assert_close, dtype, mask=mask, return_sequences=True,
         return_state=True)


def test_default_chunking_many_chunks(rng, assert_close):
    # Default config, but a sequence long enough for the default CHUNK_BYTES to split it
    # (B*T*4H*4 bytes = 2*600*4*64*4 = 1.2 MiB > 1 MiB).  Default GEMM_MIN_STEP_MACS: fused.
    B, T, D, H = 2, 600, 2, 64
    x, W, U, b = _data(rng, B, T, D, H, np.float32, scale=0.3)
    _run(x, W, U, b, assert_close, np.float32, return_state=True)


def test_no_bias(rng, assert_close, cpu_path):
    x, W, U, _ = _data(rng, 2, 4, 3, 5)
    got = fastseq.lstm(x, W, U, device=DEVICE, return_sequences=True)
    _check(got, ref_lstm(x, W, U, None, return_sequences=True), np.float32,
           assert_close, False)
    got = fastseq.lstm(x, W, U, None, device=DEVICE, return_sequences=True)
    _check(got, ref_lstm(x, W, U, None, return_sequences=True), np.float32,
           assert_close, False)


@pytest.mark.parametrize("as_tuple", [False, True])
def test_initial_state(rng, assert_close, cpu_path, as_tuple):
    x, W, U, b = _data(rng, 3, 4, 2, 5)
    st = _states(rng, 3, 5)
    got = fastseq.lstm(x, W, U, b, initial_state=tuple(st) if as_tuple else st,
                       return_state=True, device=DEVICE)
    want = ref_lstm(x, W, U, b, initial_state=st, return_state=True)
    _check(got, want, np.float32, assert_close, True)
    # the initial state matters (guards against it being ignored)
    no_st = fastseq.lstm(x, W, U, b, return_state=True, device=DEVICE)
    assert not np.allclose(no_st[2], got[2])


def test_inputs_not_modified(rng, cpu_path):
    x, W, U, b = _data(rng, 2, 4, 3, 5)
    st = _states(rng, 2, 5)
    mask = np.array([[True, False, True, True], [False, False, True, True]])
    copies = [a.copy() for a in (x, W, U, b, st[0], st[1], mask)]
    fastseq.lstm(x, W, U, b, initial_state=st, mask=mask, return_sequences=True,
                 return_state=True, device=DEVICE)
    for a, c in zip((x, W, U, b, st[0], st[1], mask), copies):
        np.testing.assert_array_equal(a, c)


def test_repeat_calls_independent(rng, assert_close, cpu_path):
    # No state leaks between calls (e.g. a reused workspace not reset).
    x, W, U, b = _data(rng, 2, 5, 3, 4)
    first = fastseq.lstm(x, W, U, b, return_sequences=True, device=DEVICE)
    x2, *_ = _data(rng, 2, 5, 3, 4)
    fastseq.lstm(x2, W, U, b, return_sequences=True, device=DEVICE)
    again = fastseq.lstm(x, W, U, b, return_sequences=True, device=DEVICE)
    np.testing.assert_array_equal(first, again)


# ------------------------------------------------------------------------------ masking
def _mask(kind, B, T, rng):
    m = np.ones((B, T), dtype=bool)
    if kind == "left":
        for i in range(B):
            m[i, : (i % (T - 1)) + 1] = False
    elif kind == "right":
        for i in range(B):
            m[i, T - (i % (T - 1)) - 1:] = False
    elif kind == "random":
        m = rng.random((B, T)) < 0.5
    elif kind == "row-all-false":
        m = rng.random((B, T)) < 0.7
        m[1] = False
    elif kind == "all-false":
        m[:] = False
    elif kind == "all-true":
        pass
    return m


@pytest.mark.parametrize(
    "kind", ["left", "right", "random", "row-all-false", "all-false"])
@pytest.mark.parametrize("zero_output_for_mask", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("return_sequences", [False, True])
def test_mask(rng, assert_close, cpu_path, kind, zero_output_for_mask, go_backwards,
              return_sequences):
    B, T, D, H = 4, 6, 3, 5
    x, W, U, b = _data(rng, B, T, D, H)
    _run(x, W, U, b, assert_close, np.float32, mask=_mask(kind, B, T, rng),
         initial_state=_states(rng, B, H), return_sequences=return_sequences,
         return_state=True, go_backwards=go_backwards,
         zero_output_for_mask=zero_output_for_mask)


@pytest.mark.parametrize("kind", ["left", "right", "random", "row-all-false"])
def test_mask_float64_no_initial_state(rng, assert_close, cpu_path, kind):
    B, T, D, H = 3, 5, 2, 4
    x, W, U, b = _data(rng, B, T, D, H, np.float64)
    _run(x, W, U, b, assert_close, np.float64, mask=_mask(kind, B, T, rng),
         return_sequences=True, return_state=True)


@pytest.mark.parametrize("zero_output_for_mask", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_nan_input(rng, assert_close, cpu_path, zero_output_for_mask, go_backwards):
    # NaN at a masked step must not leak into the row (Keras ignores that step's input);
    # NaN at an unmasked step makes the rest of that row NaN and leaves other rows alone.
    B, T, D, H = 3, 5, 2, 4
    x, W, U, b = _data(rng, B, T, D, H)
    mask = np.ones((B, T), dtype=bool)
    mask[0, 1] = False
    x[0, 1, 0] = np.nan
    x[1, 2, 1] = np.nan
    got, _ = _run(x, W, U, b, assert_close, np.float32, mask=mask,
                  return_sequences=True, return_state=True, go_backwards=go_backwards,
                  zero_output_for_mask=zero_output_for_mask)
    assert np.all(np.isfinite(got[0][0])) and np.all(np.isfinite(got[0][2]))
    assert np.isnan(got[1][1]).all() and np.isfinite(got[1][[0, 2]]).all()


@pytest.mark.parametrize("return_sequences", [False, True])
def test_empty_batch(rng, return_sequences):
    _, W, U, b = _data(rng, 1, 1, 3, 4)
    x = np.zeros((0, 5, 3), np.float32)
    out, h, c = fastseq.lstm(x, W, U, b, return_sequences=return_sequences,
                             return_state=True, device=DEVICE)
    assert out.shape == ((0, 5, 4) if return_sequences else (0, 4))
    assert h.shape == c.shape == (0, 4) and out.dtype == np.float32


def test_mask_gemm_batch(rng, assert_close, cpu_path):
    # A batch large enough for the default GEMM path as well, with a mixed mask.
    B, T, D, H = 20, 4, 3, 5
    x, W, U, b = _data(rng, B, T, D, H)
    _run(x, W, U, b, assert_close, np.float32, mask=_mask("random", B, T, rng),
         initial_state=_states(rng, B, H), return_sequences=True, return_state=True)


# ------------------------------------------------------------------------------ activations
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("recurrent_activation", ACTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations(rng, assert_close, activation, recurrent_activation, dtype):
    # Default config (fused path for B=2); pre-activations span both hard_sigmoid kinks.
    x, W, U, b = _data(rng, 2, 4, 3, 5, dtype, scale=1.5)
    _run(x, W, U, b, assert_close, dtype, mask=np.array([[1, 1, 0, 1], [0, 1, 1, 1]], bool),
         return_sequences=True, return_state=True, activation=activation,
         recurrent_activation=recurrent_activation)


@pytest.mark.parametrize("activation,recurrent_activation",
                         [("relu", "hard_sigmoid"), ("linear", "sigmoid")])
@pytest.mark.parametrize("H", [5, 8])
def test_activations_other_paths(rng, assert_close, cpu_path, activation,
                                 recurrent_activation, H):
    # H = 8: on the paths with 4-column blocks the gates read the blocks in place
    # (4 divides H); H = 5: they gather each row first
    x, W, U, b = _data(rng, 3, 4, 3, H, scale=1.5)
    _run(x, W, U, b, assert_close, np.float32, return_sequences=True, return_state=True,
         activation=activation, recurrent_activation=recurrent_activation)


def test_tanh_sigmoid_saturation(rng, assert_close, cpu_path):
    # Large pre-activations: the float32 tanh/sigmoid must saturate cleanly, not overflow.
    x, W, U, b = _data(rng, 2, 5, 3, 4, scale=30.0)
    got, _ = _run(x, W, U, b, assert_close, np.float32, return_sequences=True,
                  return_state=True)
    assert all(np.all(np.isfinite(g)) for g in got)


# ------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("in_dtype", [np.int32, np.int64, np.int8, np.uint8, np.float16])
def test_non_float_input_computes_float32(rng, assert_close, in_dtype):
    xf = rng.integers(-2, 3, size=(2, 3, 4))
    if np.dtype(in_dtype).kind == "u":
        xf = np.abs(xf)
    x = xf.astype(in_dtype)
    _, W, U, b = _data(rng, 2, 3, 4, 5)
    _run(x, W, U, b, assert_close, np.float32, return_sequences=True, return_state=True)


def test_int_weights_compute_float32(rng, assert_close):
    x = rng.integers(-1, 2, size=(2, 3, 2))
    W = rng.integers(-1, 2, size=(2, 12))
    U = rng.integers(-1, 2, size=(3, 12))
    b = rng.integers(-1, 2, size=12)
    _run(x, W, U, b, assert_close, np.float32, return_state=True)


def test_list_input_and_int_mask(rng, assert_close):
    # A Python list of ints computes in float32; weights may be lists too; a 0/1 integer
    # mask means the same as a bool one (Keras casts the mask to bool).
    _, W, U, b = _data(rng, 2, 3, 2, 4)
    x = rng.integers(-2, 3, size=(2, 3, 2))
    mask = np.array([[1, 0, 1], [0, 1, 1]])
    got = fastseq.lstm(x.tolist(), W.tolist(), U.tolist(), b.tolist(),
                       mask=mask.astype(np.int32), return_sequences=True, device=DEVICE)
    want = ref_lstm(x, W, U, b, mask=mask.astype(bool), return_sequences=True)
    _check(got, want, np.float32, assert_close, False)


def test_float64_kept(rng, assert_close):
    x, W, U, b = _data(rng, 2, 3, 2, 4, np.float64)
    got, _ = _run(x, W, U, b, assert_close, np.float64, return_sequences=True,
                  return_state=True)
    # float64 really is computed in float64, not rounded through float32
    x32 = fastseq.lstm(x.astype(np.float32), W.astype(np.float32), U.astype(np.float32),
                       b.astype(np.float32), return_sequences=True, device=DEVICE)
    assert not np.array_equal(got[0], x32.astype(np.float64))


# ------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous(rng, assert_close, cpu_path, dtype):
    B, T, D, H = 3, 5, 4, 6
    x = rng.standard_normal((T, 2 * D, B)).astype(dtype).transpose(2, 0, 1)[:, :, ::2]
    W = np.asfortranarray((rng.standard_normal((D, 4 * H)) * 0.5).astype(dtype))
    U = (rng.standard_normal((4 * H, H)) * 0.5).astype(dtype).T        # transposed view
    b = (rng.standard_normal(8 * H) * 0.5).astype(dtype)[::2]          # strided view
    h0 = rng.standard_normal((H, B)).astype(dtype).T
    c0 = rng.standard_normal((B, 2 * H)).astype(dtype)[:, 1::2]
    mask = (rng.random((T, B)) < 0.7).T
    assert not x.flags.c_contiguous and not U.flags.c_contiguous
    assert not b.flags.c_contiguous and not mask.flags.c_contiguous
    for gb in (False, True):
        _run(x, W, U, b, assert_close, dtype, initial_state=[h0, c0], mask=mask,
             return_sequences=True, return_state=True, go_backwards=gb)


def test_reversed_view_input(rng, assert_close, cpu_path):
    x, W, U, b = _data(rng, 2, 6, 3, 4)
    xr = x[:, ::-1]   # negative strides
    _run(xr, W, U, b, assert_close, np.float32, return_sequences=True)


def test_output_writable_and_owned(rng):
    x, W, U, b = _data(rng, 2, 3, 2, 4)
    out, h, c = fastseq.lstm(x, W, U, b, return_sequences=True, return_state=True,
                             device=DEVICE)
    assert out.shape == (2, 3, 4) and h.shape == (2, 4) and c.shape == (2, 4)
    for a in (out, h, c):
        assert a.flags.writeable
    # the returned arrays do not share memory with the inputs or each other
    assert not np.shares_memory(out, h) and not np.shares_memory(h, c)
    assert not np.shares_memory(out, x)
