"""Elementwise activations shared by the CPU kernels, specialised per dtype at compile time.

``apply_act(code, x)`` is a Numba intrinsic-style function: for float32 ``x`` it uses a
branch-free rational approximation of tanh that LLVM vectorises (max abs error about
4e-7 on the whole line; the coefficients are those of the float32 rational tanh in the
Eigen library, ``generic_fast_tanh_float``), and sigmoid(x) = 1 / (1 + exp(-x)) with
the exp below (relative error under 1e-6 however small the gate: a forget gate
multiplies a cell state that can be large).  For float64 it calls the exact libm
functions.  NaN inputs give NaN.

``exp_act(x)`` is exp with the same split: for float32 a polynomial that LLVM
vectorises (the softmax loops of the Dense and cross-entropy kernels), libm's exp for
float64.

``lstm_cell(zi, zf, zg, zo, c)`` is a whole LSTM unit update (sigmoid gates, tanh),
with two divisions instead of five in float32.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
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


# 1.5 * 2^23: a float32 of magnitude below 2^22 plus this constant is rounded to an
# integer, which then sits in the low bits of the sum's mantissa.
_ROUND_MAGIC = 12582912.0


def _make_round_split(bias):
    """The intrinsic ``split(y) -> (n, s)`` for float32 y: n = y / ln 2 rounded to the
    nearest integer (float32) and s = 2.0 ** (n + bias), for n + bias in [-126, 127].

    One fused multiply-add gives m = y / ln 2 + 1.5 * 2^23, whose low mantissa bits
    hold the integer n (two's complement, as the bits of m minus those of the
    constant); s is those bits shifted into the exponent field.  All in integer
    operations after the multiply-add, so fast-math reassociation cannot fold the
    ``+ c - c`` away, and with no float-to-integer conversion (undefined in LLVM for
    NaN, which here only gives a meaningless n next to a NaN polynomial)."""

    @intrinsic
    def split(typingctx, y):
        if y != types.float32:
            return None

        def codegen(context, builder, signature, args):
            f32 = ir.FloatType()
            i32 = ir.IntType(32)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(f32, [f32, f32, f32]), "llvm.fma.f32")
            magic = ir.Constant(f32, _ROUND_MAGIC)
            m = builder.bitcast(builder.call(fma, [args[0], ir.Constant(
                f32, 1.44269504088896341), magic]), i32)
            n = builder.sitofp(builder.sub(m, ir.Constant(i32, 0x4B400000)), f32)
            k = builder.shl(m, ir.Constant(i32, 23))
            k = builder.add(k, ir.Constant(i32, (127 + bias) << 23))
            s = builder.bitcast(k, f32)
            return context.make_tuple(builder, signature.return_type, (n, s))

        return types.UniTuple(types.float32, 2)(types.float32), codegen

    return split


_round_split_32 = _make_round_split(0)
_round_split_half_32 = _make_round_split(-1)    # s = 2^(n - 1): n reaches 128 in exp


# exp32 range: below EXP32_LO the result is flushed to 0 (exp(-86) = 4.5e-38, near the
# smallest normal float32); above EXP32_HI (log of the largest float32) it is inf.
EXP32_LO = -86.0
EXP32_HI = 88.72283
# Largest argument of exp in the float32 sigmoid: exp(40) = 2.4e17, so a product of
# two (1 + exp) factors and a q stays finite (lstm_cell); sigmoid(-40) = 4.2e-18
# stands for anything below.
SIGMOID32_EXP_MAX = 40.0


def _exp32_mant(y, n):
    """exp(y - n ln 2) for float32 y and the integer n = round(y / ln 2) (from
    ``_round_split_32``): r = y - n ln 2 with ln 2 split in two parts so r is exact,
    |r| <= ln(2) / 2, and exp(r) = 1 + r + r^2 q(r) with q of degree 4.  exp(y) is
    this times 2^n.

    q's coefficients were fitted for this package: a weighted least-squares fit of
    (exp(r) - 1 - r) / r^2 on 40,001 points of [-ln(2)/2, ln(2)/2], reweighted 300
    times towards the largest relative error of exp (a minimax fit).  In exact
    arithmetic the relative error is 3.1e-9; in float32 the rounding of the steps
    sets it (6.5e-8 on that interval), the same as the degree-7 polynomial of
    Cephes' expf with one multiply-add fewer."""
    r = y - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(0.00138146)
    p = p * r + np.float32(0.008368708)
    p = p * r + np.float32(0.04166839)
    p = p * r + np.float32(0.16666521)
    p = p * r + np.float32(0.49999994)
    return p * r * r + r + np.float32(1.0)


def _exp32_impl(x):
    # Max relative error 3.0e-7 over [EXP32_LO, EXP32_HI] (tests/test_activations.py).
    y = x
    if y < np.float32(EXP32_LO):
        y = np.float32(EXP32_LO)
    if y > np.float32(EXP32_HI):
        y = np.float32(EXP32_HI)
    # 2^(n - 1) * 2: n reaches 128 at the top of the range
    n, s = _round_split_half_32(y)
    e = _exp32_mant_nj(y, n) * s * np.float32(2.0)
    if x < np.float32(EXP32_LO):
        e = np.float32(0.0)
    if x > np.float32(EXP32_HI):
        e = np.float32(np.inf)
    if x != x:  # keep NaN
        e = x
    return e


def _gate_exp32_impl(x):
    """exp(-x) for the float32 sigmoid 1 / (1 + exp(-x)): the argument clamped to
    [EXP32_LO, SIGMOID32_EXP_MAX], so no range checks are needed after that (NaN
    passes through the clamps)."""
    t = -x
    if t > np.float32(SIGMOID32_EXP_MAX):
        t = np.float32(SIGMOID32_EXP_MAX)
    if t < np.float32(EXP32_LO):
        t = np.float32(EXP32_LO)
    n, s = _round_split_32(t)
    return _exp32_mant_nj(t, n) * s


def _sigmoid32_impl(x):
    return np.float32(1.0) / (np.float32(1.0) + gate_exp(x))


_exp32_mant_nj = njit(inline="always", **NJIT_INLINE_OPTS)(_exp32_mant)
gate_exp = njit(inline="always", **NJIT_INLINE_OPTS)(_gate_exp32_impl)
_sigmoid32 = njit(inline="always", **NJIT_INLINE_OPTS)(_sigmoid32_impl)


@overload(exp_act, jit_options=NJIT_INLINE_OPTS)
def _exp_act_overload(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return _exp32_impl

    def impl64(x):
        return math.exp(x)
    return impl64


def lstm_cell(zi, zf, zg, zo, c):  # pragma: no cover - only used inside @njit code
    raise NotImplementedError("lstm_cell is a Numba-only function")


def _tanh32_pq(x):
    """tanh(x) = p / q for float32 x, the rational approximation undivided.  The
    argument is clamped to +-7.9 first (tanh(+-7.9) rounds to +-1 in float32); NaN
    gives NaN: the clamps are selects that keep it."""
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
    return p, q


_tanh32_pq_nj = njit(inline="always", **NJIT_INLINE_OPTS)(_tanh32_pq)


def _tanh32_impl(x):
    p, q = _tanh32_pq_nj(x)
    r = p / q
    if x != x:  # keep NaN
        r = x
    return r


@overload(lstm_cell, inline="always", jit_options=NJIT_INLINE_OPTS)
def _lstm_cell_overload(zi, zf, zg, zo, c):
    """(c', h') of one unit from its pre-activations, with sigmoid gates and tanh:
    c' = sigmoid(zf) c + sigmoid(zi) tanh(zg), h' = sigmoid(zo) tanh(c').

    float32: sigmoid(z) = 1 / (1 + e) with e = exp(-z) (exp_act), tanh = p / q (the
    rational tanh), and c' and h' are each formed as one fraction::

        c' = (c (1 + ei) qg + pg (1 + ef)) / ((1 + ef) (1 + ei) qg)
        h' = pc / ((1 + eo) qc)

    two divisions per unit instead of five (the divisions are the slowest part of the
    gate loop).  e is computed from min(-z, SIGMOID32_EXP_MAX), so no product
    overflows.  The exp keeps a small gate's relative accuracy: f c stays accurate for
    a large cell state c where f is tiny (0.5 + 0.5 tanh(z / 2) rounds such an f to a
    multiple of 6e-8).  (Inlined at the Numba level: as a call, LLVM's inliner found it
    too big and the gate loop did not vectorise.)  float64: libm, as apply_act."""
    if isinstance(zi, types.Float) and zi.bitwidth == 32:
        pq = _tanh32_pq_nj
        one = np.float32(1.0)

        def impl32(zi, zf, zg, zo, c):
            ai = one + gate_exp(zi)
            af = one + gate_exp(zf)
            ao = one + gate_exp(zo)
            pg, qg = pq(zg)
            cn = (c * ai * qg + pg * af) / (af * ai * qg)
            pc, qc = pq(cn)
            hn = pc / (ao * qc)
            return cn, hn
        return impl32

    def impl64(zi, zf, zg, zo, c):
        cn = apply_act(ACT_SIGMOID, zf) * c + apply_act(ACT_SIGMOID, zi) * apply_act(
            ACT_TANH, zg)
        return cn, apply_act(ACT_SIGMOID, zo) * apply_act(ACT_TANH, cn)
    return impl64


@overload(apply_act, jit_options=NJIT_INLINE_OPTS)
def _apply_act_overload(code, x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        tanh32 = njit(**NJIT_INLINE_OPTS)(_tanh32_impl)

        def impl32(code, x):
            if code == ACT_TANH:
                return tanh32(x)
            elif code == ACT_SIGMOID:
                return _sigmoid32(x)
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


@njit(**NJIT_INLINE_OPTS)
def act_inplace(code, v, s0, n):
    """v[s0 + j] = apply_act(code, v[s0 + j]) for j < n (a linear or unknown code
    leaves v as it is).

    The branch on ``code`` is taken once, outside the loops, so each loop is compiled
    with a constant code and vectorises: with the code tested inside one loop (a
    runtime code) the loop stayed scalar, 3-7x slower (hard_sigmoid, relu, softsign).
    In place on purpose: a loop from one view into another vectorises only after a
    run-time overlap check, and an exact overlap sends it to the scalar loop."""
    w = v[s0:s0 + n]     # a slice: the index j >= 0 needs no wraparound check
    if code == ACT_TANH:
        for j in range(n):
            w[j] = apply_act(ACT_TANH, w[j])
    elif code == ACT_SIGMOID:
        for j in range(n):
            w[j] = apply_act(ACT_SIGMOID, w[j])
    elif code == ACT_HARD_SIGMOID:
        for j in range(n):
            w[j] = apply_act(ACT_HARD_SIGMOID, w[j])
    elif code == ACT_RELU:
        for j in range(n):
            w[j] = apply_act(ACT_RELU, w[j])
    elif code == ACT_SOFTSIGN:
        for j in range(n):
            w[j] = apply_act(ACT_SOFTSIGN, w[j])
