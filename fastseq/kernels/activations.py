"""Elementwise activations shared by the CPU kernels, specialised per dtype at compile time.

``apply_act(code, x)`` is a Numba intrinsic-style function: for float32 ``x`` it uses a
branch-free rational approximation of tanh that LLVM vectorises (max abs error about
4e-7 on the whole line; the coefficients are those of the float32 rational tanh in the
Eigen library, ``generic_fast_tanh_float``), and sigmoid(x) = (1 + tanh(x/2)) / 2.
For float64 it calls the exact libm functions.  NaN inputs give NaN.

``exp_act(x)`` is exp with the same split: for float32 a polynomial that LLVM
vectorises (the softmax loops of the Dense and cross-entropy kernels), libm's exp for
float64.
"""
import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ..config import NJIT_INLINE_OPTS

ACT_LINEAR = 0
ACT_TANH = 1
ACT_SIGMOID = 2
ACT_HARD_SIGMOID = 3
ACT_RELU = 4
ACT_SOFTSIGN = 5

# name -> code, for the Python side
ACTIVATION_CODES = {
    "linear": ACT_LINEAR,
    "tanh": ACT_TANH,
    "sigmoid": ACT_SIGMOID,
    "hard_sigmoid": ACT_HARD_SIGMOID,
    "relu": ACT_RELU,
    "softsign": ACT_SOFTSIGN,
}


def apply_act(code, x):  # pragma: no cover - only used inside @njit code
    raise NotImplementedError("apply_act is a Numba-only function")


def exp_act(x):  # pragma: no cover - only used inside @njit code
    raise NotImplementedError("exp_act is a Numba-only function")


@intrinsic
def _pow2_32(typingctx, n):
    """2.0 ** n as float32 for an integral float32 n in [-126, 127], built from the
    exponent bits (an integer add, a shift and a bitcast, all of which vectorise)."""
    if n != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        k = builder.fptosi(args[0], i32)
        k = builder.shl(builder.add(k, ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(k, ir.FloatType())

    return types.float32(types.float32), codegen


# exp32 range: below EXP32_LO the result is flushed to 0 (exp(-86) = 4.5e-38, near the
# smallest normal float32); above EXP32_HI (log of the largest float32) it is inf.
EXP32_LO = -86.0
EXP32_HI = 88.72283


def _exp32_impl(x):
    # exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, with ln 2 split in
    # two parts so r is exact; exp(r) by the degree-7 polynomial of the Cephes library's
    # expf (S. L. Moshier; coefficients quoted from it).  Max relative error 3.0e-7 over
    # [EXP32_LO, EXP32_HI] (tests/test_activations.py).
    y = x
    if y < np.float32(EXP32_LO):
        y = np.float32(EXP32_LO)
    if y > np.float32(EXP32_HI):
        y = np.float32(EXP32_HI)
    n = np.floor(y * np.float32(1.44269504088896341) + np.float32(0.5))
    r = y - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    # 2^(n - 1) * 2: n reaches 128 at the top of the range
    e = p * _pow2_32(n - np.float32(1.0)) * np.float32(2.0)
    if x < np.float32(EXP32_LO):
        e = np.float32(0.0)
    if x > np.float32(EXP32_HI):
        e = np.float32(np.inf)
    if x != x:  # keep NaN
        e = x
    return e


@overload(exp_act, jit_options=NJIT_INLINE_OPTS)
def _exp_act_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return _exp32_impl

    def impl64(x):
        return math.exp(x)
    return impl64


def _tanh32_impl(x):
    # clamp: tanh(+-7.9) rounds to +-1 in float32
    y = x
    if y > np.float32(7.90531110763549805):
        y = np.float32(7.90531110763549805)
    if y < np.float32(-7.90531110763549805):
        y = np.float32(-7.90531110763549805)
    y2 = y * y
    p = np.float32(-2.76076847742355e-16)
    p = p * y2 + np.float32(2.00018790482477e-13)
    p = p * y2 + np.float32(-8.60467152213735e-11)
    p = p * y2 + np.float32(5.12229709037114e-08)
    p = p * y2 + np.float32(1.48572235717979e-05)
    p = p * y2 + np.float32(6.37261928875436e-04)
    p = p * y2 + np.float32(4.89352455891786e-03)
    p = p * y
    q = np.float32(1.19825839466702e-06)
    q = q * y2 + np.float32(1.18534705686654e-04)
    q = q * y2 + np.float32(2.26843463243900e-03)
    q = q * y2 + np.float32(4.89352518554385e-03)
    r = p / q
    if x != x:  # keep NaN
        r = x
    return r


@overload(apply_act, jit_options=NJIT_INLINE_OPTS)
def _apply_act_overload(code, x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        from numba import njit
        tanh32 = njit(**NJIT_INLINE_OPTS)(_tanh32_impl)

        def impl32(code, x):
            if code == ACT_TANH:
                return tanh32(x)
            elif code == ACT_SIGMOID:
                return np.float32(0.5) + np.float32(0.5) * tanh32(np.float32(0.5) * x)
            elif code == ACT_HARD_SIGMOID:
                y = (x + np.float32(3.0)) / np.float32(6.0)
                if y < np.float32(0.0):
                    y = np.float32(0.0)
                if y > np.float32(1.0):
                    y = np.float32(1.0)
                return y
            elif code == ACT_RELU:
                return x if not x < np.float32(0.0) else np.float32(0.0)
            elif code == ACT_SOFTSIGN:
                return x / (np.float32(1.0) + abs(x))
            return x
        return impl32

    def impl64(code, x):
        if code == ACT_TANH:
            return math.tanh(x)
        elif code == ACT_SIGMOID:
            if x >= 0.0:
                return 1.0 / (1.0 + math.exp(-x))
            e = math.exp(x)
            return e / (1.0 + e)
        elif code == ACT_HARD_SIGMOID:
            y = (x + 3.0) / 6.0
            if y < 0.0:
                y = 0.0
            if y > 1.0:
                y = 1.0
            return y
        elif code == ACT_RELU:
            return x if not x < 0.0 else 0.0
        elif code == ACT_SOFTSIGN:
            return x / (1.0 + abs(x))
        return x
    return impl64
