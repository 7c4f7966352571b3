"""Numba CPU kernels for training an LSTM: a forward pass that saves what backpropagation
through time needs, and the backward recurrence (Keras gate order i, f, c, o).

Layout: everything is **time-major** and indexed by **input time** ``t`` (the position in
the layer's input sequence), whatever the processing direction: with ``reverse`` (Keras
``go_backwards``) processing step ``s`` reads input time ``t = T - 1 - s``.  Saved arrays
of a step are stored at its input time, so the large products of the backward pass are
single GEMMs over all steps, computed outside these kernels::

    dW = X^T dZ      X  [T*B, D],   dZ [T*B, 4H]
    dU = Hp^T dZ     Hp [T*B, H]    (state before each step)
    db = sum_rows dZ
    dX = dZ W^T

Only the recurrent products ``h U`` (forward) and ``dz U^T`` (backward) run per step,
inside the kernels (no BLAS call per step):
- ``h U`` with the register-tiled microkernels of ``tile_cpu`` (4 rows x 4 vectors of
  outputs held in registers over the whole sum over H).  At B = 32, T = 14, H = 128
  the forward kernel took 0.62 ms against 0.91 with the dot products below, whose
  sixteen horizontal additions per tile cost a large share of a sum over only H terms.
- ``dz U^T`` as dot products over contiguous rows (``tile_cpu.dot_rows_acc``), four
  rows by four outputs at a time: sixteen sums in registers, eight loads per sixteen
  multiply-adds.
  Its sums run over 4H and read the rows of U in place: about 100 GFLOP/s at B = 32,
  H = 128-256 on one core here.  The tiles need U^T for this product; with its
  transposed copy per call they took the same time at H = 128 and 10% more at 256.

The step loops allocate nothing; the kernels release the GIL so row groups and the two
directions of a Bidirectional layer can run in threads.

Masking mirrors the forward semantics of Keras (and of ``lstm_cpu``): a masked step keeps
``h`` and ``c``; its output is the previous output of the row (zero before the first
step), or zero with ``zero_output_for_mask``.  Backward: at a masked step the state
gradients pass through unchanged and ``dz = 0``; the gradient of a masked output flows to
the previous output (or is dropped with ``zero_output_for_mask``) through ``carry``.

Activation derivatives are computed from the saved activation outputs ``y``:
tanh 1 - y^2, sigmoid y (1 - y), hard_sigmoid 1/6 inside (0, 1), relu [y > 0],
softsign (1 - |y|)^2, linear 1.
"""
from numba import njit

from ..config import FASTMATH
from .activations import (act_inplace, apply_act, ACT_TANH, ACT_SIGMOID,
                          ACT_HARD_SIGMOID, ACT_RELU, ACT_SOFTSIGN)
from .tile_cpu import dot_rows_acc, gemm_rows_acc


@njit(fastmath=FASTMATH, inline="always", error_model="numpy")
def act_grad(code, y, one, sixth):
    """Derivative of activation ``code`` at the point where it returned ``y``; ``one``
    and ``sixth`` are 1 and 1/6 in the dtype of ``y`` (keeps float32 math in float32)."""
    if code == ACT_TANH:
        return one - y * y
    elif code == ACT_SIGMOID:
        return y * (one - y)
    elif code == ACT_HARD_SIGMOID:
        if y > 0 and y < 1:
            return sixth
        return one - one
    elif code == ACT_RELU:
        return one if y > 0 else one - one
    elif code == ACT_SOFTSIGN:
        a = one - abs(y)
        return a * a
    return one


@njit(fastmath=FASTMATH, inline="always", error_model="numpy")
def grad_range(code, y, s0, dst, d0, n, one, sixth):
    """dst[d0 + j] = act_grad(code, y[s0 + j]) for j < n (y and dst not overlapping),
    the code tested once outside the loops (see activations.act_inplace)."""
    sv = y[s0:s0 + n]       # slices: the index j >= 0 needs no wraparound check
    dv = dst[d0:d0 + n]
    if code == ACT_TANH:
        for j in range(n):
            dv[j] = act_grad(ACT_TANH, sv[j], one, sixth)
    elif code == ACT_SIGMOID:
        for j in range(n):
            dv[j] = act_grad(ACT_SIGMOID, sv[j], one, sixth)
    elif code == ACT_HARD_SIGMOID:
        for j in range(n):
            dv[j] = act_grad(ACT_HARD_SIGMOID, sv[j], one, sixth)
    elif code == ACT_RELU:
        for j in range(n):
            dv[j] = act_grad(ACT_RELU, sv[j], one, sixth)
    elif code == ACT_SOFTSIGN:
        for j in range(n):
            dv[j] = act_grad(ACT_SOFTSIGN, sv[j], one, sixth)
    else:
        for j in range(n):
            dv[j] = one


@njit(fastmath=FASTMATH, inline="always", error_model="numpy")
def _gates_row(zr, gr, cr, ar, hr, H, act, rec):
    """Gates and new state of one row (an unmasked step), in simple loops over
    contiguous rows so that each one vectorises.

    zr: [4H] pre-activations x W + b + h U of the row
    gr: [4H] written: gate activations i, f, g, o
    cr, hr: [H] state (overwritten);  ar: [H] written: act(c)
    """
    G = 4 * H
    if act == ACT_TANH and rec == ACT_SIGMOID:  # constant codes: vectorised activations
        for j in range(2 * H):
            gr[j] = apply_act(ACT_SIGMOID, zr[j])
        for j in range(2 * H, 3 * H):
            gr[j] = apply_act(ACT_TANH, zr[j])
        for j in range(3 * H, G):
            gr[j] = apply_act(ACT_SIGMOID, zr[j])
        for j in range(H):
            cn = gr[H + j] * cr[j] + gr[j] * gr[2 * H + j]
            cr[j] = cn
            ar[j] = apply_act(ACT_TANH, cn)
    else:
        # other activations: the pre-activations copied, then each gate's activation
        # in place in a loop whose code is tested outside it (act_inplace)
        for j in range(G):
            gr[j] = zr[j]
        act_inplace(rec, gr, 0, 2 * H)
        act_inplace(act, gr, 2 * H, H)
        act_inplace(rec, gr, 3 * H, H)
        for j in range(H):
            cn = gr[H + j] * cr[j] + gr[j] * gr[2 * H + j]
            cr[j] = cn
            ar[j] = cn
        act_inplace(act, ar, 0, H)
    for j in range(H):
        hr[j] = gr[3 * H + j] * ar[j]


@njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
def lstm_train_forward(src, idx, U, b, mask, nact, reverse, h, c, hprev, cprev, gates,
                       actc, out, zu, zero_output, act, rec):
    """Forward recurrence saving the BPTT state.  All arrays C-contiguous.

    src:   [N, 4H] rows of the input projection x W (no bias)
    idx:   [T, B] int64: the projection of row r at input time t is src[idx[t, r]] (the
           layer's own [T * B, 4H] projection with idx[t, r] = t * B + r, or, for an
           LSTM fed by an Embedding, the projections of the batch's distinct tokens)
    U:     [H, 4H] the recurrent kernel
    b:     [4H] bias (zeros when the layer has none)
    mask:  [T, B] uint8, input-time order (1 = step computed)
    nact:  [T] rows r >= nact[t] are masked at input time t (the recurrent product of the
           step covers rows [0, nact[t]) only; sorting rows by length helps)
    reverse: 1 to process input times T-1 .. 0 (go_backwards), else 0
    h, c:  [B, H] initial state in, final state out
    hprev, cprev: [T, B, H] written: state before the step at each input time
    gates: [T, B, 4H] written: i, f, g, o activations (rows of masked steps not written)
    actc:  [T, B, H] written: act(c) after the step (masked rows not written)
    out:   [T, B, H] written: the layer's output of each step, at its input time
    zu:    [B, 4H] scratch for the pre-activations
    zero_output: 1 = masked steps output zero, else the previous output
    act, rec: ACT_* codes of activation / recurrent_activation
    """
    T, B = idx.shape
    H = h.shape[1]
    G = 4 * H
    for s in range(T):
        t = T - 1 - s if reverse else s
        tp = t + 1 if reverse else t - 1  # input time of the previous step
        for r in range(B):
            for j in range(H):
                hprev[t, r, j] = h[r, j]
                cprev[t, r, j] = c[r, j]
        n = nact[t]
        # z = x W + b + h U (rows past n are masked: not computed)
        for r in range(n):
            zr = zu[r]
            xr = src[idx[t, r]]
            for j in range(G):
                zr[j] = xr[j] + b[j]
        gemm_rows_acc(h, n, U, zu)
        for r in range(B):
            if r < n and mask[t, r] != 0:
                hr = h[r]
                _gates_row(zu[r], gates[t, r], c[r], actc[t, r], hr, H, act, rec)
                orow = out[t, r]
                for j in range(H):
                    orow[j] = hr[j]
            elif zero_output or s == 0:
                for j in range(H):
                    out[t, r, j] = 0
            else:
                for j in range(H):
                    out[t, r, j] = out[tp, r, j]


@njit(fastmath=FASTMATH, inline="always", error_model="numpy")
def _dz_row(doutr, carr, dhr, dcr, gr, ar, cpr, dzr, H, act, rec, one, sixth):
    """Gradients of one unmasked row at one step, in simple vectorisable loops.

    doutr, carr: [H] output gradient and carried masked-output gradient (carr zeroed)
    dhr, dcr: [H] in: gradient wrt the state after the step; out: dc wrt the state
              before it (dhr is left holding dL/dh of the step, overwritten later)
    gr: [4H] gate activations;  ar: [H] act(c);  cpr: [H] c before the step
    dzr: [4H] written: gradient wrt the pre-activations
    """
    for j in range(H):
        dhr[j] = doutr[j] + carr[j] + dhr[j]
        carr[j] = 0
    if act == ACT_TANH and rec == ACT_SIGMOID:
        for j in range(H):
            a = ar[j]
            o = gr[3 * H + j]
            dcr[j] = dcr[j] + dhr[j] * o * (one - a * a)
            dzr[3 * H + j] = dhr[j] * a * (o * (one - o))
        for j in range(H):
            i = gr[j]
            f = gr[H + j]
            g = gr[2 * H + j]
            dcn = dcr[j]
            dzr[j] = dcn * g * (i * (one - i))
            dzr[H + j] = dcn * cpr[j] * (f * (one - f))
            dzr[2 * H + j] = dcn * i * (one - g * g)
            dcr[j] = dcn * f
    else:
        # other activations: the derivatives first, each in a loop whose code is
        # tested outside it (grad_range), into dzr and into carr (zero again below)
        grad_range(rec, gr, 0, dzr, 0, 2 * H, one, sixth)
        grad_range(act, gr, 2 * H, dzr, 2 * H, H, one, sixth)
        grad_range(rec, gr, 3 * H, dzr, 3 * H, H, one, sixth)
        grad_range(act, ar, 0, carr, 0, H, one, sixth)
        for j in range(H):
            a = ar[j]
            o = gr[3 * H + j]
            dcr[j] = dcr[j] + dhr[j] * o * carr[j]
            dzr[3 * H + j] = dhr[j] * a * dzr[3 * H + j]
            carr[j] = 0
        for j in range(H):
            i = gr[j]
            f = gr[H + j]
            g = gr[2 * H + j]
            dcn = dcr[j]
            dzr[j] = dcn * g * dzr[j]
            dzr[H + j] = dcn * cpr[j] * dzr[H + j]
            dzr[2 * H + j] = dcn * i * dzr[2 * H + j]
            dcr[j] = dcn * f


@njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
def lstm_train_backward(dout, U, mask, nact, reverse, gates, actc, cprev, dz, dh, dc,
                        carry, dhu, zero_output, act, rec):
    """Backward recurrence (backpropagation through time).  All arrays C-contiguous.

    dout:  [T, B, H] gradient of the loss wrt the outputs ``out`` of lstm_train_forward,
           input-time order (zeros where an output is not used)
    U:     [H, 4H] the recurrent kernel (dz U^T: dot products with its rows)
    mask:  [T, B] uint8, input-time order
    nact:  [T] as in lstm_train_forward
    reverse: 1 when the forward pass ran with reverse
    gates, actc, cprev: [T, B, 4H], [T, B, H], [T, B, H] as saved by lstm_train_forward
    dz:    [T, B, 4H] written: gradient wrt the gate pre-activations (zero at masked steps)
    dh, dc: [B, H] in: gradient wrt the final state; out: gradient wrt the initial state
    carry: [B, H] zeros in; gradient flowing along the chain of masked outputs
    dhu:   [B, H] scratch for dz U^T
    zero_output, act, rec: as in lstm_train_forward
    """
    T, B, G = dz.shape
    H = G // 4
    one = dz.dtype.type(1)
    sixth = dz.dtype.type(1.0 / 6.0)
    for s in range(T - 1, -1, -1):
        t = T - 1 - s if reverse else s
        n = nact[t]
        for r in range(B):
            if r < n and mask[t, r] != 0:
                _dz_row(dout[t, r], carry[r], dh[r], dc[r], gates[t, r], actc[t, r],
                        cprev[t, r], dz[t, r], H, act, rec, one, sixth)
            else:
                for j in range(G):
                    dz[t, r, j] = 0
                if zero_output:
                    for j in range(H):
                        carry[r, j] = 0
                else:
                    for j in range(H):
                        carry[r, j] += dout[t, r, j]
        for r in range(n):
            for j in range(H):
                dhu[r, j] = 0
        dot_rows_acc(dz[t], n, U, dhu)
        for r in range(n):
            if mask[t, r] != 0:
                for j in range(H):
                    dh[r, j] = dhu[r, j]


@njit(fastmath=FASTMATH, cache=True, nogil=True, error_model="numpy")
def sum_rows_by_index(index, rows, out):
    """out[index[p]] += rows[p] for every p (the gradient of a table lookup).

    index: [N] int64 in [0, len(out));  rows: [N, G];  out: [U, G], zeros on entry
    """
    G = rows.shape[1]
    for p in range(index.shape[0]):
        o = out[index[p]]
        r = rows[p]
        for j in range(G):
            o[j] += r[j]
