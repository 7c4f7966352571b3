"""Bad arguments give a ValueError/TypeError naming the argument, what was expected and
what was received - never a Numba typing error, a crash or a silently wrong result."""
import re

import numpy as np
import pytest

import fastseq

B, T, D, H = 3, 4, 2, 5


def _lstm_args(dtype=np.float32):
    rng = np.random.default_rng(0)
    return dict(
        x=rng.standard_normal((B, T, D)).astype(dtype),
        kernel=rng.standard_normal((D, 4 * H)).astype(dtype),
        recurrent_kernel=rng.standard_normal((H, 4 * H)).astype(dtype),
        bias=rng.standard_normal(4 * H).astype(dtype),
    )


def _dense_args(dtype=np.float32):
    rng = np.random.default_rng(0)
    return dict(
        x=rng.standard_normal((B, T, D)).astype(dtype),
        kernel=rng.standard_normal((D, 6)).astype(dtype),
        bias=rng.standard_normal(6).astype(dtype),
    )


def expect_error(exc, call, name, received, *expected):
    """``call()`` raises ``exc``; the message names argument ``name`` and then
    ``received`` (a shape, dtype or value), and contains every ``expected`` fragment."""
    pattern = rf"(?<![\w\[]){re.escape(name)}(?![\w\[]).*{re.escape(received)}"
    with pytest.raises(exc, match=pattern) as info:
        call()
    msg = str(info.value)
    for frag in expected:
        assert frag in msg, f"{frag!r} not in error message {msg!r}"
    return msg


def _lstm(**over):
    args = _lstm_args()
    extra = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return lambda: fastseq.lstm(args["x"], args["kernel"], args["recurrent_kernel"],
                                args["bias"], **extra)


def _dense(**over):
    args = _dense_args()
    extra = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return lambda: fastseq.dense(args["x"], args["kernel"], args["bias"], **extra)


def test_valid_arguments_run():
    # the baseline the error cases below perturb is itself valid
    assert fastseq.lstm(**_lstm_args()).shape == (B, H)
    assert fastseq.dense(**_dense_args()).shape == (B, T, 6)


# ------------------------------------------------------------------------------ lstm shapes
@pytest.mark.parametrize("shape", [(B, T), (B, T, D, 1), (D,)])
def test_lstm_x_rank(shape):
    expect_error(ValueError, _lstm(x=np.zeros(shape, np.float32)), "x", str(shape),
                 "[B, T, D]")


def test_lstm_x_no_time_steps():
    expect_error(ValueError, _lstm(x=np.zeros((B, 0, D), np.float32)), "x",
                 str((B, 0, D)))


def test_lstm_kernel_rows_mismatch_d():
    k = np.zeros((D + 3, 4 * H), np.float32)
    expect_error(ValueError, _lstm(kernel=k), "kernel", str(k.shape), str((D, 4 * H)))


def test_lstm_kernel_columns_not_4h():
    k = np.zeros((D, 4 * H - 4), np.float32)
    expect_error(ValueError, _lstm(kernel=k), "kernel", str(k.shape), str((D, 4 * H)))


@pytest.mark.parametrize("shape", [(H, 4 * H - 1), (H + 1, 4 * H), (4 * H, H), (4 * H,)])
def test_lstm_recurrent_kernel_shape(shape):
    u = np.zeros(shape, np.float32)
    expect_error(ValueError, _lstm(recurrent_kernel=u), "recurrent_kernel", str(shape))


@pytest.mark.parametrize("shape", [(4 * H - 1,), (4 * H + 4,), (1, 4 * H), (H,)])
def test_lstm_bias_shape(shape):
    # expected length shown as (20) or (20,)
    expect_error(ValueError, _lstm(bias=np.zeros(shape, np.float32)), "bias", str(shape),
                 f"({4 * H}")


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("shape", [(B, H + 1), (B + 1, H), (H,), (B, H, 1)])
def test_lstm_initial_state_shape(which, shape):
    st = [np.zeros((B, H), np.float32), np.zeros((B, H), np.float32)]
    st[which] = np.zeros(shape, np.float32)
    expect_error(ValueError, _lstm(initial_state=st), f"initial_state[{which}]",
                 str(shape), str((B, H)))


@pytest.mark.parametrize("bad", ["array", "one", "three"])
def test_lstm_initial_state_not_a_pair(bad):
    h = np.zeros((B, H), np.float32)
    st = {"array": np.zeros((2, B, H), np.float32), "one": [h], "three": [h, h, h]}[bad]
    with pytest.raises((ValueError, TypeError), match=r"initial_state") as info:
        _lstm(initial_state=st)()
    assert "pair" in str(info.value) or "[h0, c0]" in str(info.value)


@pytest.mark.parametrize("shape", [(B, T + 1), (B + 1, T), (T, B), (B, T, 1), (T,)])
def test_lstm_mask_shape(shape):
    expect_error(ValueError, _lstm(mask=np.ones(shape, bool)), "mask", str(shape),
                 str((B, T)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64])
def test_lstm_mask_float_dtype(dtype):
    expect_error(TypeError, _lstm(mask=np.ones((B, T), dtype)), "mask",
                 str(np.dtype(dtype)), "bool")


# ------------------------------------------------------------------------------ lstm dtypes
NON_NUMERIC = {
    "str": lambda shape: np.full(shape, "a"),
    "object": lambda shape: np.empty(shape, dtype=object),
    "complex": lambda shape: np.zeros(shape, np.complex128),
}


@pytest.mark.parametrize("kind", list(NON_NUMERIC))
@pytest.mark.parametrize("arg", ["x", "kernel", "recurrent_kernel", "bias"])
def test_lstm_non_numeric(kind, arg):
    shape = _lstm_args()[arg].shape
    bad = NON_NUMERIC[kind](shape)
    expect_error(TypeError, _lstm(**{arg: bad}), arg, str(bad.dtype))


@pytest.mark.parametrize("kind", list(NON_NUMERIC))
def test_lstm_non_numeric_initial_state(kind):
    st = [NON_NUMERIC[kind]((B, H)), np.zeros((B, H), np.float32)]
    expect_error(TypeError, _lstm(initial_state=st), "initial_state[0]",
                 str(st[0].dtype))


def test_lstm_x_none_or_ragged():
    with pytest.raises(TypeError, match=r"\bx\b"):
        _lstm(x=None)()
    with pytest.raises(TypeError, match=r"\bx\b"):
        _lstm(x=[[[1.0, 2.0]], [[1.0]]])()


@pytest.mark.parametrize("arg", ["activation", "recurrent_activation"])
@pytest.mark.parametrize("name", ["gelu", "softmax", "Tanh", ""])
def test_lstm_unknown_activation(arg, name):
    msg = expect_error(ValueError, _lstm(**{arg: name}), arg, repr(name))
    assert "tanh" in msg  # lists what is accepted


def test_lstm_activation_not_a_string():
    expect_error(ValueError, _lstm(activation=np.tanh), "activation", "tanh")


def test_lstm_bad_device():
    expect_error(ValueError, _lstm(device="tpu"), "device", "'tpu'")


# ------------------------------------------------------------------------------ dense
def test_dense_scalar_x():
    with pytest.raises(ValueError, match=r"\bx\b"):
        _dense(x=np.float32(1.0))()


@pytest.mark.parametrize("shape", [(D,), (D, 6, 1)])
def test_dense_kernel_rank(shape):
    expect_error(ValueError, _dense(kernel=np.zeros(shape, np.float32)), "kernel",
                 str(shape))


def test_dense_kernel_rows_mismatch():
    k = np.zeros((D + 1, 6), np.float32)
    expect_error(ValueError, _dense(kernel=k), "kernel", str(k.shape), str(D))


@pytest.mark.parametrize("shape", [(5,), (7,), (1, 6)])
def test_dense_bias_shape(shape):
    expect_error(ValueError, _dense(bias=np.zeros(shape, np.float32)), "bias", str(shape),
                 "(6")


@pytest.mark.parametrize("kind", list(NON_NUMERIC))
@pytest.mark.parametrize("arg", ["x", "kernel", "bias"])
def test_dense_non_numeric(kind, arg):
    shape = _dense_args()[arg].shape
    bad = NON_NUMERIC[kind](shape)
    expect_error(TypeError, _dense(**{arg: bad}), arg, str(bad.dtype))


@pytest.mark.parametrize("name", ["gelu", "hard_sigmoid", "Softmax", ""])
def test_dense_unknown_activation(name):
    msg = expect_error(ValueError, _dense(activation=name), "activation", repr(name))
    assert "softmax" in msg


def test_dense_bad_device():
    expect_error(ValueError, _dense(device="gpu0"), "device", "'gpu0'")
