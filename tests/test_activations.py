"""The float32 elementwise functions of kernels/activations.py against float64 NumPy:
``exp_act`` (the softmax loops' exp), ``apply_act``'s tanh and sigmoid, and
``lstm_cell`` (the gates of one unit, formed with two divisions)."""
import numpy as np
import pytest
from numba import njit

from fastseq.kernels.activations import (ACT_SIGMOID, ACT_TANH, EXP32_HI, EXP32_LO,
                                         apply_act, exp_act, lstm_cell)
from fastseq.config import NJIT_OPTS


@njit(**{k: v for k, v in NJIT_OPTS.items() if k != "cache"})
def _exp_all(x, out):
    for i in range(x.size):     # a plain loop: LLVM vectorises it, as in the kernels
        out[i] = exp_act(x[i])


@njit(**{k: v for k, v in NJIT_OPTS.items() if k != "cache"})
def _act_all(code, x, out):
    for i in range(x.size):
        out[i] = apply_act(code, x[i])


def _exp(x):
    out = np.empty_like(x)
    _exp_all(x, out)
    return out


def test_exp32_relative_error():
    # every float32 step of a dense grid over the whole finite range, and the
    # neighbourhood of 0 (softmax arguments are <= 0) at a finer step
    x = np.concatenate([np.linspace(EXP32_LO, EXP32_HI, 2_000_003),
                        np.linspace(-1.0, 1.0, 200_001)]).astype(np.float32)
    got = _exp(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    rel = np.abs(got - want) / want
    assert rel.max() < 4e-7, f"max relative error {rel.max():.3g} at x = {x[rel.argmax()]}"


def test_exp32_special_values():
    x = np.array([0.0, -0.0, -np.inf, np.inf, np.nan, EXP32_LO - 0.5, -1e30,
                  EXP32_HI + 0.01, 1e30], np.float32)
    got = _exp(x)
    assert got[0] == 1.0 and got[1] == 1.0          # exp(0) is exactly 1
    assert got[2] == 0.0 and got[5] == 0.0 and got[6] == 0.0   # flushed below EXP32_LO
    assert np.isposinf(got[3]) and np.isposinf(got[7]) and np.isposinf(got[8])
    assert np.isnan(got[4])


def test_exp64_matches_numpy():
    x = np.linspace(-700, 700, 10_001)
    np.testing.assert_allclose(_exp(x), np.exp(x), rtol=1e-15, atol=0)


@pytest.mark.parametrize("code, ref", [
    (ACT_TANH, np.tanh),
    (ACT_SIGMOID, lambda v: 0.5 + 0.5 * np.tanh(0.5 * v)),   # = 1 / (1 + exp(-v))
])
def test_tanh_sigmoid32_absolute_error(code, ref):
    x = np.concatenate([np.linspace(-20.0, 20.0, 400_001),
                        [-1e30, 1e30, -np.inf, np.inf]]).astype(np.float32)
    out = np.empty_like(x)
    _act_all(code, x, out)
    err = np.abs(out.astype(np.float64) - ref(x.astype(np.float64)))
    assert err.max() < 6e-7, f"max abs error {err.max():.3g} at x = {x[err.argmax()]}"
    nan = np.array([np.nan], np.float32)
    _act_all(code, nan, nan)
    assert np.isnan(nan[0])


def test_sigmoid32_relative_error_of_small_gates():
    # a gate far below 0.5 multiplies the cell state: its relative error counts, and
    # 0.5 + 0.5 tanh(x / 2) would round sigmoid(-20) = 2e-9 to 0 or to 6e-8
    x = np.linspace(-39.0, 0.0, 400_001).astype(np.float32)
    out = np.empty_like(x)
    _act_all(ACT_SIGMOID, x, out)
    want = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    rel = np.abs(out - want) / want
    assert rel.max() < 1e-6, f"max relative error {rel.max():.3g} at x = {x[rel.argmax()]}"


@njit(**{k: v for k, v in NJIT_OPTS.items() if k != "cache"})
def _cell_all(z, c, cn, hn):
    for j in range(c.size):
        cn[j], hn[j] = lstm_cell(z[0, j], z[1, j], z[2, j], z[3, j], c[j])


def _cell_ref(z, c):
    """(c', h', the scale of c': |f c| + |i g|, the size of its rounding errors)"""
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))    # noqa: E731
    fc, ig = sig(z[1]) * c, sig(z[0]) * np.tanh(z[2])
    cn = fc + ig
    return cn, sig(z[3]) * np.tanh(cn), np.abs(fc) + np.abs(ig)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lstm_cell(rng, dtype):
    n = 200_000
    z = (rng.standard_normal((4, n)) * rng.choice([0.1, 1.0, 5.0, 30.0], (4, n)))
    c = rng.standard_normal(n) * rng.choice([0.01, 1.0, 50.0, 1e6], n)
    z, c = z.astype(dtype), c.astype(dtype)
    cn, hn = np.empty_like(c), np.empty_like(c)
    _cell_all(z, c, cn, hn)
    with np.errstate(over="ignore"):
        want_c, want_h, scale = _cell_ref(z.astype(np.float64), c.astype(np.float64))
    tol = 1e-6 if dtype == np.float32 else 1e-14
    err_c = np.abs(cn - want_c) / (1.0 + scale)
    assert err_c.max() < tol, f"c': error {err_c.max():.3g} (relative to 1 + |f c| + |i g|)"
    # h' = o tanh(c') is bounded by 1; its error follows c''s through tanh
    err_h = np.abs(hn - want_h) - (1.0 - np.tanh(want_c) ** 2) * np.abs(cn - want_c)
    assert err_h.max() < tol, f"h': error {err_h.max():.3g}"


def test_lstm_cell32_special_values():
    # NaN anywhere gives NaN; saturated gates and an infinite cell behave as the five
    # separate activations do
    z = np.zeros((4, 6), np.float32)
    c = np.zeros(6, np.float32)
    z[0, 0] = np.nan                   # NaN input gate
    c[1] = np.nan                      # NaN cell
    z[:, 2] = [1e30, -1e30, 1e30, 1e30]   # i = 1, f = 0, g = 1, o = 1
    c[2] = 5.0
    c[3] = np.inf                      # f = 0.5: c' = inf, h' = o = 0.5
    z[:, 4] = [-np.inf, np.inf, 3.0, -np.inf]   # i = 0, f = 1, o = 0
    c[4] = -2.0
    cn, hn = np.empty_like(c), np.empty_like(c)
    _cell_all(z, c, cn, hn)
    assert np.isnan(cn[0]) and np.isnan(hn[0]) and np.isnan(cn[1]) and np.isnan(hn[1])
    np.testing.assert_allclose([cn[2], hn[2]], [1.0, np.tanh(1.0)], rtol=1e-6)
    assert np.isposinf(cn[3]) and abs(hn[3] - 0.5) < 1e-6
    np.testing.assert_allclose([cn[4], hn[4]], [-2.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(cn[5], 0.0, atol=1e-7)   # all zero: i g = 0.5 * 0
