"""Numba CPU kernel for the time-distributed Dense epilogue: bias + activation in place.

The product ``x @ W`` is computed by a BLAS GEMM on a chunk of rows just before this
kernel runs on the same chunk, so the logits are still in cache when the bias and the
activation are applied (one read and one write of each logit after the GEMM).
"""
import math

from numba import njit

from ..config import NJIT_OPTS
from .activations import act_inplace, exp_act

# Dense activation codes beyond the elementwise ones of activations.py
DENSE_SOFTMAX = 100
DENSE_LOG_SOFTMAX = 101


@njit(**NJIT_OPTS)
def bias_act_rows(y, b, act):
    """y <- act(y + b), row by row (one thread; callers split rows across threads).

    y:   [N, K] logits x W of a chunk of rows, overwritten with the activations
    b:   [K] bias (zeros when the layer has none)
    act: an ACT_* code from activations.py, or DENSE_SOFTMAX / DENSE_LOG_SOFTMAX
    """
    N, K = y.shape
    for r in range(N):
        row = y[r]
        if act == DENSE_SOFTMAX or act == DENSE_LOG_SOFTMAX:
            # stable softmax: subtract the row max before exp
            m = row[0] + b[0]
            for k in range(K):
                v = row[k] + b[k]
                row[k] = v
                if v > m:
                    m = v
            s = y.dtype.type(0)  # (row[0] - row[0] is NaN for an infinite row[0])
            if act == DENSE_SOFTMAX:
                for k in range(K):
                    e = exp_act(row[k] - m)
                    row[k] = e
                    s += e
                for k in range(K):
                    row[k] = row[k] / s
            else:
                for k in range(K):
                    s += exp_act(row[k] - m)
                ls = m + math.log(s)
                for k in range(K):
                    row[k] = row[k] - ls
        else:
            # bias first, then the activation in a loop compiled with its code
            # constant (act_inplace), so it vectorises: a test of the code inside
            # the element loop kept it scalar, 3x slower
            for k in range(K):
                row[k] = row[k] + b[k]
            act_inplace(act, row, 0, K)
