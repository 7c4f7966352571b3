"""Numba CPU kernel: one direction of an Embedding-fed LSTM over a whole batch, with the
Dense that follows it applied as an epilogue, in a single call.

The input projection of token ``i`` is row ``i`` of ``table = embeddings @ W`` [V, 4H],
read in place by ``lstm_cpu.lstm_chunk_fused``; the Dense (no bias, no activation: the
caller adds both directions' partial logits, the bias and the activation) runs on each
chunk of outputs while it is in cache, as one product over all the chunk's rows:
the columns that fill whole vectors in the register tiles of ``tile_cpu``, the last
K % V as dot products with the kernel's columns stored contiguously.  One call does
every chunk, so a direction costs one Python-to-Numba call (and one release of the
GIL) per batch, and it can run on a thread that never takes the GIL.
"""
from numba import njit

from ..config import NJIT_OPTS
from .lstm_cpu import lstm_chunk_fused
from .tile_cpu import dot_rows_acc, gemm_rows_acc_vec


@njit(**NJIT_OPTS)
def lstm_table_dense(table, ids, mask, Ub, b, WdX, h, c, seen, reverse, flip_out,
                     zero_output, act, rec, skip_fresh, idx_buf, mask_buf, z, hseq_buf,
                     ybuf, out):
    """Run one LSTM direction over the batch and write its Dense partial logits.

    table:    [V, 4H] embeddings @ W (Keras gate order i, f, c, o)
    ids:      [B, T] int64 token ids, input time order
    mask:     [B, T] uint8 (1 = step is computed), input time order
    Ub:       [nb, H, JB] recurrent kernel cut into column blocks (_cpu.block_columns)
    b:        [4H] bias (zeros when the layer has none)
    WdX:      [H * K + L * H] this direction's rows of the Dense kernel Wd [H, K],
              flattened, followed by its last L = K % V columns transposed ([L, H]; V
              the vector width: _cpu.dense_pack)
    h, c:     [B, H] state (initial state in, final state out); seen: [B] uint8
    reverse:  process time from T - 1 down to 0 (go_backwards)
    flip_out: write the output of processing step p at T - 1 - p instead of p (the
              backward layer of a Bidirectional, whose sequence is flipped before the
              merge; with ``reverse`` each output lands at its input time)
    skip_fresh: h is zero in the rows not yet seen and U is finite: a row's first
              unmasked step skips h U (see ``lstm_cpu.lstm_chunk_fused``)
    idx_buf:  [B * Tc] int64, mask_buf: [B * Tc] uint8, hseq_buf: [B * Tc * H],
              ybuf: [B * Tc * K]: scratch for one chunk of Tc steps
              (Tc = len(idx_buf) // B)
    z:        [B, 4H] scratch
    out:      [B, T, K] <- h Wd of each step at its position (no bias, no activation)
    """
    B, T = ids.shape
    H = h.shape[1]
    K = out.shape[2]
    Wd = WdX[:H * K].reshape((H, K))
    L = (WdX.shape[0] - H * K) // H
    WdL = WdX[H * K:].reshape((L, H))
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
                         zero_output, act, rec, skip_fresh)
        # the chunk's Dense, [B * n, H] @ [H, K], then each row's logits to their place
        rows = B * n
        A = hseq_buf[:rows * H].reshape((rows, H))
        yb = ybuf[:rows * K].reshape((rows, K))
        for i in range(rows):
            for k in range(K):
                yb[i, k] = 0.0
        NV = gemm_rows_acc_vec(A, rows, 0, H, Wd, yb)
        dot_rows_acc(A, rows, WdL, yb[:, NV:])
        for r in range(B):
            for s in range(n):
                t = T - 1 - (s0 + s) if flip_out else s0 + s
                src = yb[r * n + s]
                dst = out[r, t]
                for k in range(K):
                    dst[k] = src[k]
