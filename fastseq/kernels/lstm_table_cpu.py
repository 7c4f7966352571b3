"""Numba CPU kernel: one direction of an Embedding-fed LSTM over a whole batch, with the
Dense that follows it applied as an epilogue, in a single call.

The input projection of token ``i`` is row ``i`` of ``table = embeddings @ W`` [V, 4H],
read in place by ``lstm_cpu.lstm_chunk_fused``; the Dense (no bias, no activation: the
caller adds both directions' partial logits, the bias and the activation) runs on each
chunk of outputs while it is in cache.  One call does every chunk, so a direction costs
one Python-to-Numba call (and one release of the GIL) per batch, and it can run on a
thread that never takes the GIL.
"""
from numba import njit

from ..config import NJIT_OPTS, NJIT_INLINE_OPTS
from .lstm_cpu import lstm_chunk_fused


@njit(**NJIT_INLINE_OPTS)
def _dense4(h0, h1, h2, h3, WdT, y0, y1, y2, y3):
    """y_i = h_i Wd for four rows (h_i: [H], WdT: [K, H] = Wd transposed, y_i: [K]):
    one dot product over H per output, four rows sharing each load of a row of WdT
    (the loop over H vectorises as a reduction; with the outputs as the inner loop
    the compiler must reload and store y every step, at a third of the speed)."""
    K, H = WdT.shape
    for j in range(K):
        w = WdT[j]
        a0 = h0.dtype.type(0)
        a1 = a0
        a2 = a0
        a3 = a0
        for k in range(H):
            wk = w[k]
            a0 += h0[k] * wk
            a1 += h1[k] * wk
            a2 += h2[k] * wk
            a3 += h3[k] * wk
        y0[j] = a0
        y1[j] = a1
        y2[j] = a2
        y3[j] = a3


@njit(**NJIT_INLINE_OPTS)
def _dense1(h0, WdT, y0):
    K, H = WdT.shape
    for j in range(K):
        w = WdT[j]
        a0 = h0.dtype.type(0)
        for k in range(H):
            a0 += h0[k] * w[k]
        y0[j] = a0


@njit(**NJIT_OPTS)
def lstm_table_dense(table, ids, mask, Ub, b, WdT, h, c, seen, reverse, flip_out,
                     zero_output, act, rec, idx_buf, mask_buf, z, hseq_buf, out):
    """Run one LSTM direction over the batch and write its Dense partial logits.

    table:    [V, 4H] embeddings @ W (Keras gate order i, f, c, o)
    ids:      [B, T] int64 token ids, input time order
    mask:     [B, T] uint8 (1 = step is computed), input time order
    Ub:       [nb, H, JB] recurrent kernel cut into column blocks (_cpu.block_columns)
    b:        [4H] bias (zeros when the layer has none)
    WdT:      [K, H] this direction's rows of the Dense kernel, transposed
    h, c:     [B, H] state (initial state in, final state out); seen: [B] uint8
    reverse:  process time from T - 1 down to 0 (go_backwards)
    flip_out: write the output of processing step p at T - 1 - p instead of p (the
              backward layer of a Bidirectional, whose sequence is flipped before the
              merge; with ``reverse`` each output lands at its input time)
    idx_buf:  [B * Tc] int64, mask_buf: [B * Tc] uint8, hseq_buf: [B * Tc * H]: scratch
              for one chunk of Tc steps (Tc = len(idx_buf) // B)
    z:        [B, 4H] scratch
    out:      [B, T, K] <- h Wd of each step at its position (no bias, no activation)
    """
    B, T = ids.shape
    H = h.shape[1]
    Tc = idx_buf.shape[0] // B
    for s0 in range(0, T, Tc):
        n = min(Tc, T - s0)
        idx = idx_buf[:B * n].reshape((B, n))
        mc = mask_buf[:B * n].reshape((B, n))
        for r in range(B):
            for s in range(n):
                t = T - 1 - (s0 + s) if reverse else s0 + s
                idx[r, s] = ids[r, t]
                mc[r, s] = mask[r, t]
        hseq = hseq_buf[:B * n * H].reshape((B, n, H))
        lstm_chunk_fused(table, idx, Ub, b, h, c, seen, mc, z, hseq, True,
                         zero_output, act, rec)
        for r in range(B):
            s = 0
            while s + 4 <= n:
                if flip_out:
                    t = T - 1 - (s0 + s)
                    _dense4(hseq[r, s], hseq[r, s + 1], hseq[r, s + 2], hseq[r, s + 3],
                            WdT, out[r, t], out[r, t - 1], out[r, t - 2], out[r, t - 3])
                else:
                    t = s0 + s
                    _dense4(hseq[r, s], hseq[r, s + 1], hseq[r, s + 2], hseq[r, s + 3],
                            WdT, out[r, t], out[r, t + 1], out[r, t + 2], out[r, t + 3])
                s += 4
            while s < n:
                t = T - 1 - (s0 + s) if flip_out else s0 + s
                _dense1(hseq[r, s], WdT, out[r, t])
                s += 1
