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
from .tile_cpu import scalar_cols, tile_row1, tile_rows4, vector_width


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
          each block contiguous (nb * JB = 4H)
    b:    [4H] bias (zeros when the layer has none)
    h, c: [Bp, H] state of the rows, updated in place
    seen: [Bp] uint8, updated in place (row has had an unmasked step)
    mask: [Bp, Tc] uint8 (1 = step is computed); all ones when there is no mask
    z3:   [nb, Bp, JB] scratch for the pre-activations, blocked like Ub
    zrow: [4H] scratch: one row's pre-activations gathered for the gates
    out:  [Bp, Tc, H] outputs of the chunk (written when write_out)

    z += h U runs in the register tiles of ``tile_cpu`` (4 rows x 4 vectors of z held
    in registers over the whole sum over H; one-row tiles for leftover rows, plain
    loops for the columns past the last whole vector).  They replaced loops that
    loaded and stored z for every four terms (73 against 106 GFLOP/s on one core for
    16 rows, H = 256, in a scratch A/B).  A group of rows all masked at a step (the
    padding of shorter sequences) skips the product: a masked row's z is never used.
    """
    Bp, Tc = idx.shape
    G = src.shape[1]
    H = G // 4
    nb, _, JB = Ub.shape
    R4 = Bp - Bp % 4
    V = vector_width(h)
    W = 4 * V
    JV = JB - JB % V
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
            # z += h U: register tiles over column ranges of 4 vectors (outer), then
            # the row groups (inner), so a range's rows of U are read from cache by
            # every group in turn
            for q0 in range(0, JV, W):
                q1 = min(q0 + W, JV)
                for r in range(0, R4, 4):
                    if (mask[r, s] == 0 and mask[r + 1, s] == 0 and mask[r + 2, s] == 0
                            and mask[r + 3, s] == 0):
                        continue    # padding: all four rows masked at this step
                    tile_rows4(h, r, Uk, zb, q0, q1)
                for r in range(R4, Bp):
                    if mask[r, s] != 0:
                        tile_row1(h, r, Uk, zb, q0, q1)
            if JV < JB:
                for r in range(Bp):
                    if mask[r, s] != 0:
                        scalar_cols(h, r, Uk, zb, JV, JB)
        # gates and state update (every row read h above before any row writes it)
        for r in range(Bp):
            on = mask[r, s] != 0
            if on:
                if nb == 1:
                    _cell_row(z3[0, r], h[r], c[r], H, act, rec)
                else:
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
