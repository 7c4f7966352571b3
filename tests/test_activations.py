"""The float32 elementwise functions of kernels/activations.py against float64 NumPy:
``exp_act`` (the softmax loops' exp) and ``apply_act``'s tanh and sigmoid."""
import numpy as np
import pytest
from numba import njit

from fastseq.kernels.activations import (ACT_SIGMOID, ACT_TANH, EXP32_HI, EXP32_LO,
                                         apply_act, exp_act)
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
