"""Numba CPU kernels for the LSTM recurrence (Keras gate order i, f, c, o).

Notation (matches the docs): ``W`` kernel [D, 4H], ``U`` recurrent kernel [H, 4H],
``b`` bias [4H], ``h``/``c`` hidden/cell state [B, H].  The input projection ``x @ W`` is
computed outside these kernels as a large GEMM over a chunk of time steps; the kernels
run the per-step recurrence on that chunk and allocate nothing per step.

Masking follows Keras: a masked step keeps ``h`` and ``c``; its output is the previous
output (zeros before the first unmasked step of a row), or zero with
``zero_output_for_mask``.  ``seen[b]`` records whether row ``b`` has had an unmasked step,
so "previous output" is ``h`` when ``seen`` and zero otherwise.
"""
from numba import njit

from ..config import NJIT_OPTS, NJIT_INLINE_OPTS
from .activations import apply_act, ACT_TANH, ACT_SIGMOID


@njit(**NJIT_INLINE_OPTS)
def _cell_row(z, hrow, crow, H, act, rec):
    """Gates and state update for one batch row, in place.

    z: [4H] pre-activations (x W + h U + b) for this row and step
    hrow, crow: [H] state of this row (overwritten with the new state)
    """
    if act == ACT_TANH and rec == ACT_SIGMOID:
        # the common case, written out so the loop vectorises
        for j in range(H):
            i = apply_act(ACT_SIGMOID, z[j])
            f = apply_act(ACT_SIGMOID, z[H + j])
            g = apply_act(ACT_TANH, z[2 * H + j])
            o = apply_act(ACT_SIGMOID, z[3 * H + j])
            cn = f * crow[j] + i * g
            crow[j] = cn
            hrow[j] = o * apply_act(ACT_TANH, cn)
    else:
        for j in range(H):
            i = apply_act(rec, z[j])
            f = apply_act(rec, z[H + j])
            g = apply_act(act, z[2 * H + j])
            o = apply_act(rec, z[3 * H + j])
            cn = f * crow[j] + i * g
            crow[j] = cn
            hrow[j] = o * apply_act(act, cn)


@njit(**NJIT_INLINE_OPTS)
def _emit(out, b, s, hrow, H, write, on, seen_b, zero_output):
    """Write the output of row b at chunk step s (see module docstring)."""
    if write:
        if on or (seen_b and not zero_output):
            for j in range(H):
                out[b, s, j] = hrow[j]
        else:
            for j in range(H):
                out[b, s, j] = 0.0


@njit(**NJIT_OPTS)
def lstm_chunk_fused(src, idx, Ub, b, h, c, seen, mask, z3, zrow, out, write_out,
                     zero_output, act, rec):
    """Run the recurrence over one chunk of steps for a block of rows (one thread),
    the product h U computed here (no BLAS call, no Python between steps).

    src:  [N, 4H] rows of input projections x W
    idx:  [Bp, Tc] int64: the projection of row r at chunk step s (processing order) is
          src[idx[r, s]]: the chunk's own projection buffer ([Bp * Tc, 4H], idx[r, s] =
          r * Tc + s), or for an LSTM fed by an Embedding the (embeddings @ W) table and
          the token ids, so the lookup is read in place, never copied
    Ub:   [nb, H, JB] the recurrent kernel U [H, 4H] cut into nb blocks of JB columns,
          each block contiguous (nb * JB = 4H): a block's rows stay in L1 with the z tile
    b:    [4H] bias (zeros when the layer has none)
    h, c: [Bp, H] state of the rows, updated in place
    seen: [Bp] uint8, updated in place (row has had an unmasked step)
    mask: [Bp, Tc] uint8 (1 = step is computed); all ones when there is no mask
    z3:   [nb, Bp, JB] scratch for the pre-activations, blocked like Ub
    zrow: [4H] scratch: one row's pre-activations gathered for the gates
    out:  [Bp, Tc, H] outputs of the chunk (written when write_out)

    Rows go four at a time through z += h U with k unrolled by four: each pass over a
    z block loads four rows of U and does sixteen multiply-adds per element (measured
    70-80 GFLOP/s on one EPYC core for 16-32 rows, H = 128-256, bench/gemm_rates.py);
    leftover rows go one at a time.  A group of rows all masked at a step (the padding
    of shorter sequences) skips the product: a masked row's z is never used.
    """
    Bp, Tc = idx.shape
    G = src.shape[1]
    H = G // 4
    nb, _, JB = Ub.shape
    R4 = Bp - Bp % 4
    for s in range(Tc):
        for blk in range(nb):
            Uk = Ub[blk]
            zb = z3[blk]
            j0 = blk * JB
            bb = b[j0:j0 + JB]
            for r in range(Bp):
                if mask[r, s] == 0:
                    continue        # a masked row's z is not used
                zr = zb[r]
                xr = src[idx[r, s], j0:j0 + JB]
                for j in range(JB):
                    zr[j] = xr[j] + bb[j]
            for r in range(0, R4, 4):
                if (mask[r, s] == 0 and mask[r + 1, s] == 0 and mask[r + 2, s] == 0
                        and mask[r + 3, s] == 0):
                    continue        # padding: all four rows masked at this step
                z0 = zb[r]
                z1 = zb[r + 1]
                z2 = zb[r + 2]
                z3r = zb[r + 3]
                k = 0
                while k + 4 <= H:
                    a0 = h[r, k]
                    a1 = h[r + 1, k]
                    a2 = h[r + 2, k]
                    a3 = h[r + 3, k]
                    e0 = h[r, k + 1]
                    e1 = h[r + 1, k + 1]
                    e2 = h[r + 2, k + 1]
                    e3 = h[r + 3, k + 1]
                    f0 = h[r, k + 2]
                    f1 = h[r + 1, k + 2]
                    f2 = h[r + 2, k + 2]
                    f3 = h[r + 3, k + 2]
                    g0 = h[r, k + 3]
                    g1 = h[r + 1, k + 3]
                    g2 = h[r + 2, k + 3]
                    g3 = h[r + 3, k + 3]
                    u0 = Uk[k]
                    u1 = Uk[k + 1]
                    u2 = Uk[k + 2]
                    u3 = Uk[k + 3]
                    for j in range(JB):
                        p = u0[j]
                        q = u1[j]
                        v = u2[j]
                        w = u3[j]
                        z0[j] += (a0 * p + e0 * q) + (f0 * v + g0 * w)
                        z1[j] += (a1 * p + e1 * q) + (f1 * v + g1 * w)
                        z2[j] += (a2 * p + e2 * q) + (f2 * v + g2 * w)
                        z3r[j] += (a3 * p + e3 * q) + (f3 * v + g3 * w)
                    k += 4
                while k < H:
                    u0 = Uk[k]
                    a0 = h[r, k]
                    a1 = h[r + 1, k]
                    a2 = h[r + 2, k]
                    a3 = h[r + 3, k]
                    for j in range(JB):
                        p = u0[j]
                        z0[j] += a0 * p
                        z1[j] += a1 * p
                        z2[j] += a2 * p
                        z3r[j] += a3 * p
                    k += 1
            for r in range(R4, Bp):
                if mask[r, s] == 0:
                    continue
                zr = zb[r]
                k = 0
                while k + 4 <= H:
                    h0 = h[r, k]
                    h1 = h[r, k + 1]
                    h2 = h[r, k + 2]
                    h3 = h[r, k + 3]
                    u0 = Uk[k]
                    u1 = Uk[k + 1]
                    u2 = Uk[k + 2]
                    u3 = Uk[k + 3]
                    for j in range(JB):
                        zr[j] += (h0 * u0[j] + h1 * u1[j]) + (h2 * u2[j] + h3 * u3[j])
                    k += 4
                while k < H:
                    hk = h[r, k]
                    u0 = Uk[k]
                    for j in range(JB):
                        zr[j] += hk * u0[j]
                    k += 1
        # gates and state update (every row read h above before any row writes it)
        for r in range(Bp):
            on = mask[r, s] != 0
            if on:
                for blk in range(nb):
                    zr = z3[blk, r]
                    j0 = blk * JB
                    for j in range(JB):
                        zrow[j0 + j] = zr[j]
                _cell_row(zrow, h[r], c[r], H, act, rec)
                seen[r] = 1
            _emit(out, r, s, h[r], H, write_out, on, seen[r] != 0, zero_output)


@njit(**NJIT_OPTS)
def lstm_step_pointwise(zu, xw, s, b, h, c, seen, mask, out, write_out, zero_output,
                        act, rec):
    """One step of the GEMM path for a block of rows: gates from z = h U + xw[:, s] + b.

    zu:   [Bp, 4H] recurrent product h U of this step (from a BLAS GEMM), overwritten
    xw:   [Bp, Tc, 4H] input projection of the chunk; s is the step within the chunk
    b:    [4H] bias
    h, c: [Bp, H] state, updated in place
    seen: [Bp] uint8, updated in place
    mask: [Bp, Tc] uint8 (1 = step is computed)
    out:  [Bp, Tc, H] outputs of the chunk (written when write_out)
    """
    Bp, G = zu.shape
    H = G // 4
    for r in range(Bp):
        on = mask[r, s] != 0
        if on:
            z = zu[r]
            for j in range(G):
                z[j] += xw[r, s, j] + b[j]
            _cell_row(z, h[r], c[r], H, act, rec)
            seen[r] = 1
        _emit(out, r, s, h[r], H, write_out, on, seen[r] != 0, zero_output)
