"""Numba CPU kernels for the LSTM recurrence (Keras gate order i, f, c, o).

Notation (matches the docs): ``W`` kernel [D, 4H], ``U`` recurrent kernel [H, 4H],
``b`` bias [4H], ``h``/``c`` hidden/cell state [B, H].  The kernels run the per-step
recurrence over a chunk of time steps and allocate nothing per step.  The input
projection ``x @ W`` is computed step by step inside ``lstm_chunk_xfused``; the other
kernels read it from rows computed before them (a GEMM over the chunk, or the
(embeddings @ W) table of an Embedding).  W and U may be cut into column blocks
(``_cpu.block_columns``).

Masking follows Keras: a masked step keeps ``h`` and ``c``; its output is the previous
output (zeros before the first unmasked step of a row), or zero with
``zero_output_for_mask``.  ``seen[b]`` records whether row ``b`` has had an unmasked step,
so "previous output" is ``h`` when ``seen`` and zero otherwise.
"""
from numba import njit

from ..config import NJIT_OPTS, NJIT_INLINE_OPTS
from .activations import act_inplace, lstm_cell, ACT_TANH, ACT_SIGMOID
from .tile_cpu import scalar_cols, tile_row1, tile_rows4, vector_width


@njit(**NJIT_INLINE_OPTS)
def _cell_gates(zi, zf, zg, zo, hrow, crow, n, act, rec, orow, emit):
    """Gates and state update of n units of one batch row, in place; with ``emit``,
    the new h is also written to orow (the step's output).

    zi, zf, zg, zo: [n] pre-activations of the units' four gates (x W + h U + b; may
    be overwritten: the gate activations, with activations other than tanh/sigmoid)
    hrow, crow: [n] the units' state (overwritten with the new state)
    orow: [n] the output (written when emit; any [n] array otherwise)

    In the common case the output is written in the gate loop itself: with a second
    loop copying h, the gates of a [32, 128] step took 2.1-2.2 ns per unit against
    1.65 (scratch A/B, one Zen 4 core).
    """
    if act == ACT_TANH and rec == ACT_SIGMOID:
        # the common case, written out so the loop vectorises (two divisions per
        # unit in float32, see activations.lstm_cell)
        if emit:
            for j in range(n):
                cn, hn = lstm_cell(zi[j], zf[j], zg[j], zo[j], crow[j])
                crow[j] = cn
                hrow[j] = hn
                orow[j] = hn
        else:
            for j in range(n):
                cn, hn = lstm_cell(zi[j], zf[j], zg[j], zo[j], crow[j])
                crow[j] = cn
                hrow[j] = hn
        return
    # other activations: each one in its own loop, in place (act_inplace), so that
    # every loop vectorises
    act_inplace(rec, zi, 0, n)
    act_inplace(rec, zf, 0, n)
    act_inplace(act, zg, 0, n)
    act_inplace(rec, zo, 0, n)
    for j in range(n):
        cn = zf[j] * crow[j] + zi[j] * zg[j]
        crow[j] = cn
        hrow[j] = cn
    act_inplace(act, hrow, 0, n)
    for j in range(n):
        hrow[j] = zo[j] * hrow[j]
    if emit:
        for j in range(n):
            orow[j] = hrow[j]


@njit(**NJIT_INLINE_OPTS)
def _cell_row(z, hrow, crow, H, act, rec, orow, emit):
    """Gates and state update for one batch row, in place (and its output, as
    _cell_gates).

    z: [4H] pre-activations (x W + h U + b) for this row and step (may be
       overwritten, see _cell_gates)
    hrow, crow: [H] state of this row (overwritten with the new state)
    orow: [H] the row's output at this step (written when emit)
    """
    _cell_gates(z[0:H], z[H:2 * H], z[2 * H:3 * H], z[3 * H:4 * H], hrow, crow, H,
                act, rec, orow, emit)


@njit(**NJIT_INLINE_OPTS)
def _emit_masked(out, b, s, hrow, H, seen_b, zero_output):
    """Write the output of row b at chunk step s, a masked step (see module
    docstring); an unmasked step's output is written by _cell_row."""
    if seen_b and not zero_output:
        for j in range(H):
            out[b, s, j] = hrow[j]
    else:
        for j in range(H):
            out[b, s, j] = 0.0


@njit(**NJIT_INLINE_OPTS)
def _row_step(z, h, c, seen, mask, r, s, out, write_out, zero_output, act, rec):
    """Gates, state update and output of row r at chunk step s (z: [4H], the row's
    pre-activations)."""
    H = h.shape[1]
    if mask[r, s] != 0:
        if write_out:
            _cell_row(z, h[r], c[r], H, act, rec, out[r, s], True)
        else:
            _cell_row(z, h[r], c[r], H, act, rec, h[r], False)
        seen[r] = 1
    elif write_out:
        _emit_masked(out, r, s, h[r], H, seen[r] != 0, zero_output)


@njit(**NJIT_INLINE_OPTS)
def _row_idle(mask, seen, r, s, skip_fresh):
    """True when row r needs no product at chunk step s: masked at the step (its z is
    not used), or, with ``skip_fresh``, not yet seen (its h is still the zero initial
    state, so its h U is zero)."""
    return mask[r, s] == 0 or (skip_fresh and seen[r] == 0)


@njit(**NJIT_INLINE_OPTS)
def _product_masked(A, ak, K, Bk, z, j0, mask, s, seen, skip_fresh):
    """z[r, j0:j0+JB] += A[r, ak:ak+K] @ Bk for the rows r that need it at chunk step s
    (``_row_idle``), in the register tiles of ``tile_cpu``: column ranges of 4 vectors
    outer, row groups inner, so a range's rows of Bk are read from cache by every group
    in turn; a group of four rows all idle at the step (padding, or rows at their first
    step from a zero state) is skipped.  Leftover rows (past the last group of four) go
    across all columns at once, in the wide row tiles.

    A: [Bp, >=ak+K];  Bk: [K, JB];  z: [Bp, >=j0+JB];  mask: [Bp, Tc];  seen: [Bp]
    skip_fresh: A is h, and h is zero in the rows not yet seen (see lstm_chunk_fused)
    """
    Bp = z.shape[0]
    JB = Bk.shape[1]
    R4 = Bp - Bp % 4
    V = vector_width(z)
    W = 4 * V
    JV = JB - JB % V
    for q0 in range(0, JV, W):
        q1 = min(q0 + W, JV)
        for r in range(0, R4, 4):
            if (_row_idle(mask, seen, r, s, skip_fresh)
                    and _row_idle(mask, seen, r + 1, s, skip_fresh)
                    and _row_idle(mask, seen, r + 2, s, skip_fresh)
                    and _row_idle(mask, seen, r + 3, s, skip_fresh)):
                continue
            tile_rows4(A, r, ak, K, Bk, z, q0, q1, j0)
    for r in range(R4, Bp):
        if not _row_idle(mask, seen, r, s, skip_fresh):
            tile_row1(A, r, ak, K, Bk, z, 0, JV, j0)
    if JV < JB:
        for r in range(Bp):
            if not _row_idle(mask, seen, r, s, skip_fresh):
                scalar_cols(A, r, ak, K, Bk, z, JV, JB, j0)


@njit(**NJIT_INLINE_OPTS)
def _gates_step(z, h, c, seen, mask, s, out, write_out, zero_output, act, rec):
    """Gates, state update and outputs of every row at chunk step s, from the
    pre-activations z [Bp, 4H] (each row's gates contiguous: the gate loops run over
    all H units at once)."""
    for r in range(z.shape[0]):
        _row_step(z[r], h, c, seen, mask, r, s, out, write_out, zero_output, act, rec)


@njit(**NJIT_OPTS)
def lstm_chunk_fused(src, idx, Ub, b, h, c, seen, mask, z, out, write_out, zero_output,
                     act, rec, skip_fresh):
    """Run the recurrence over one chunk of steps for a block of rows (one thread),
    the product h U computed here (no BLAS call, no Python between steps).

    src:  [N, 4H] rows of input projections x W
    idx:  [Bp, Tc] int64: the projection of row r at chunk step s (processing order) is
          src[idx[r, s]]: for an LSTM fed by an Embedding the (embeddings @ W) table
          and the token ids, so the lookup is read in place, never copied (or any
          buffer of projections: [Bp * Tc, 4H] with idx[r, s] = r * Tc + s)
    Ub:   [nb, H, JB] the recurrent kernel U [H, 4H] cut into nb blocks of JB columns,
          each block contiguous (nb * JB = 4H)
    b:    [4H] bias (zeros when the layer has none)
    h, c: [Bp, H] state of the rows, updated in place
    seen: [Bp] uint8, updated in place (row has had an unmasked step)
    mask: [Bp, Tc] uint8 (1 = step is computed); all ones when there is no mask
    z:    [Bp, 4H] scratch for the pre-activations (block k of Ub adds into columns
          k * JB : (k + 1) * JB)
    out:  [Bp, Tc, H] outputs of the chunk (written when write_out)
    skip_fresh: the caller's promise that h is zero in every row not yet seen (the
          layer has no initial state) and that U is finite, so a row's h U at its
          first unmasked step is exactly zero: a group of four rows (or a leftover
          row) in which every row is masked or not yet seen skips the product.  In
          length-sorted batches a sentence of n tokens then costs n - 1 products
          instead of n (the EWT test set's sentences average 12 tokens).

    z += h U runs in the register tiles of ``tile_cpu`` (4 rows x 4 vectors of z held
    in registers over the whole sum over H; one-row tiles for leftover rows, plain
    loops for the columns past the last whole vector).  They replaced loops that
    loaded and stored z for every four terms (1.2x faster from 32 rows up,
    bench/gemm_rates.py).  A group of rows all masked at a step skips the product: a
    masked row's z is never used.

    z is row-major over all 4H columns, not blocked like Ub, so that the gate loops
    run over whole rows (H units at once): with z in blocks of JB = 64 the gates ran
    once per block, and the kernel of C2's per-thread share (16 rows, D = 128,
    H = 256) took 4-5% longer (scratch A/B, one process).
    """
    Bp, Tc = idx.shape
    nb, H, JB = Ub.shape
    G = 4 * H
    for s in range(Tc):
        for r in range(Bp):
            if mask[r, s] == 0:
                continue        # a masked row's z is not used
            zr = z[r]
            xr = src[idx[r, s]]
            for j in range(G):
                zr[j] = xr[j] + b[j]
        for blk in range(nb):
            _product_masked(h, 0, H, Ub[blk], z, blk * JB, mask, s, seen,
                            skip_fresh)
        # gates and state update (every row read h above before any row writes it)
        _gates_step(z, h, c, seen, mask, s, out, write_out, zero_output, act, rec)


@njit(**NJIT_OPTS)
def lstm_chunk_xfused(x2, D, t0, T, reverse, Wb, Ub, b, h, c, seen, mask, z, out,
                      write_out, zero_output, act, rec):
    """As ``lstm_chunk_fused``, with the input projection computed here too, step by
    step: z = b + x_t W + h U, both products in the register tiles.  No buffer of
    projections exists and the input is read in place.

    x2:   [Bp, >= T * D] the block's rows of the input x [B, T, D] viewed as [B, T * D]
          (input time order)
    D, T: input width and sequence length
    t0:   processing step of the chunk's first step; reverse: processing step p reads
          input time T - 1 - p (go_backwards), else p
    Wb:   [nb, D, JB] the kernel W [D, 4H] cut into column blocks like Ub
    the other arguments as in lstm_chunk_fused (mask: [Bp, Tc], processing order)

    Against the chunk's projection as one OpenBLAS GEMM followed by lstm_chunk_fused,
    16 rows, T = 100, D = 128, H = 256 on one thread: 12.9-13.8 ms against 14.4-14.9
    (scratch A/B): the tiles beat OpenBLAS at these shapes, and the projection is
    never written out and read back.  The price is reading W from cache every step.
    """
    Bp, Tc = mask.shape
    nb, H, JB = Ub.shape
    G = 4 * H
    for s in range(Tc):
        p = t0 + s
        t = T - 1 - p if reverse else p
        for r in range(Bp):
            if mask[r, s] == 0:
                continue
            zr = z[r]
            for j in range(G):
                zr[j] = b[j]
        for blk in range(nb):
            _product_masked(x2, t * D, D, Wb[blk], z, blk * JB, mask, s, seen, False)
            _product_masked(h, 0, H, Ub[blk], z, blk * JB, mask, s, seen, False)
        _gates_step(z, h, c, seen, mask, s, out, write_out, zero_output, act, rec)


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
    for r in range(Bp):
        z = zu[r]
        if mask[r, s] != 0:
            for j in range(G):
                z[j] += xw[r, s, j] + b[j]
        _row_step(z, h, c, seen, mask, r, s, out, write_out, zero_output, act, rec)
