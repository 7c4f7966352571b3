"""Tunables and numerical tolerances, kept in one place.

Values are read at call time (``config.X``), so tests may patch them, e.g. to force
several chunks or the GEMM path on tiny shapes.
"""
import numpy as np

# --- numerics ---------------------------------------------------------------------------
# Tolerances against the float64 numpy reference (tests) and against Keras (parity tests,
# ``fastseq validate``).  One table, used everywhere.
TOLERANCES = {
    # dtype: (atol, rtol) against the float64 reference
    np.dtype(np.float32): (2e-5, 2e-5),
    np.dtype(np.float64): (1e-11, 1e-11),
}
# fastseq vs Keras predict() in float32 (issue contract: atol 1e-5).
KERAS_PARITY_ATOL = 1e-5


def tolerance(dtype):
    """Return (atol, rtol) for comparing a result of ``dtype`` with the float64 reference."""
    return TOLERANCES[np.dtype(dtype)]


# --- CPU kernels ------------------------------------------------------------------------
# fastmath for the CPU kernels (contractions/reassociation only; no nnan/ninf, so NaN and
# inf inputs propagate the way they do in numpy).
FASTMATH = {"contract", "reassoc", "arcp", "nsz", "afn"}
# Options of every CPU kernel.  error_model="numpy": a division by zero gives inf/nan as
# in numpy instead of raising, which also lets LLVM vectorise loops that divide.
NJIT_OPTS = {"fastmath": FASTMATH, "error_model": "numpy", "nogil": True, "cache": True}
# Helpers inlined into kernels (not cached on their own).
NJIT_INLINE_OPTS = {"fastmath": FASTMATH, "error_model": "numpy"}

# Time steps per chunk are chosen so a chunk's [B, Tc, 4H] projection buffer (the BLAS
# path for very large blocks; the fused kernel projects each step itself and needs none)
# holds about this many bytes (it stays in cache between the GEMM and the steps).  The
# chunk also sizes the Dense epilogue's buffers.
CHUNK_BYTES = 1 << 20
# ... unless that leaves the chunk's projection GEMM ([rows * Tc, D] @ [D, 4H]) fewer
# rows than this: at C3's sizes (64 rows per thread, 4H = 2048) 1 MiB is two steps, and
# a GEMM of 128 rows re-reads W from L3 every two steps.  `python bench/chunk_rows.py`
# (interleaved samples of C3): 241.7 ms with 2-step chunks, 226.2 ms with 8-step chunks
# (4 MiB per thread); C2 (`--config C2 --calls 10`: 32-step instead of 16-step chunks)
# 15.8 against 15.5 ms, within the noise.
CHUNK_MIN_ROWS = 512
# Multiply-adds of one step's recurrent product h U for a thread's block of rows
# (rows * H * 4H) from which that product runs as a BLAS GEMM called from Python each
# step; below it the fused Numba kernel computes it and loops over the steps itself (no
# Python between steps).  With the register tiles of kernels/tile_cpu.py the fused
# kernel ran at 85-99 GFLOP/s against 80-92 for OpenBLAS + the pointwise kernel at every
# block measured, 64 x 512 up to 512 x 1024 (2.1G multiply-adds a step; one thread,
# scratch A/B), so BLAS is kept only for blocks beyond those.  (Before the tiles the
# limit was 100M: C3 on one thread, 128 rows x H = 512, took the BLAS path.)
GEMM_MIN_STEP_MACS = 4_000_000_000
# Columns of U (and W) per block in the fused kernel, when 4H > FUSED_ONE_BLOCK_COLUMNS:
# one tile width (4 vectors with AVX-512), so a block's rows are contiguous and its
# panel streams from L2 in order.  Kernel A/B on one thread (scratch, T = 100): 64 rows
# at H = 512, 207.6 ms with blocks of 64 columns against 226.2 (128), 237.7 (256) and
# 281.5 (one block); 16 rows at H = 256, 13.1-13.6 against 12.9-13.4 (256) and
# 13.5-14.3 (one block); two threads at once, 16 rows each: 14.8-15.2 ms against
# 15.3-17.0 (one block).  `bench/ab_revs.py --what C3` against blocks of 256: 0.83-0.93.
# When the block width divides H, the gates read the blocks in place.
FUSED_BLOCK_COLUMNS = 64
# Up to this many columns (4H) U stays one block: at H = 128 (32 rows, T = 14, the
# tagger's size) one block took 1.16 ms against 1.19-1.23 for blocks of 64-256.
FUSED_ONE_BLOCK_COLUMNS = 512
# Rows of a block from which the fused kernel computes each step's input projection
# x_t W itself (kernels/lstm_cpu.lstm_chunk_xfused); smaller blocks project each chunk
# of steps with one BLAS GEMM first.  Per step the kernel reads all of W for only that
# many rows.  LSTM alone on one thread (scratch A/B), chunk GEMM against in-kernel:
# 1 row 0.28 against 0.35 ms, 2 rows 0.52 against 0.66 (T = 50, D = 64, H = 128);
# 4 rows 0.51 against 0.47; 8 rows 7.7-8.2 against 7.2-7.4 ms and 16 rows 14.9-15.1
# against 13.4-13.8 (T = 100, D = 128, H = 256).
XPROJ_MIN_ROWS = 4
# Work (multiply-adds) below which a call runs on one thread: handing rows to the pool
# and back costs tens of microseconds, more than small problems take.
MIN_MACS_PER_THREAD = 2_000_000
# Small batches run on two threads split by hidden units, with a spin barrier per step
# (kernels/lstm_split_cpu.py), when the batch has at most this many rows ...
SPLIT_UNITS_MAX_ROWS = 4
# ... and a step's product h U has at least this many multiply-adds (H = 64 at B = 1).
SPLIT_UNITS_MIN_STEP_MACS = 16_384
# Cycle-counter ticks (about 25 us at this machine's 2.6 GHz time-stamp counter) the
# part of a split job that arrives first waits for the other before it runs the whole
# job alone (polls where the target has no counter).
SPLIT_CLAIM_TICKS = 65_000
# How long the split worker thread spins after a job, waiting for the next one, before
# it goes to sleep (_threads.Worker): cycle-counter ticks (about 3 ms at a 3 GHz
# time-stamp counter), and a cap on polls for targets without a counter.
SPLIT_WORKER_IDLE_TICKS = 10_000_000
SPLIT_WORKER_MAX_POLLS = 50_000_000
# A split job of at least this many multiply-adds (about 10 ms on one thread here) that
# finds the worker dozing wakes it and waits up to SPLIT_WAKE_WAIT_S for it, instead of
# running alone (a poke ends the worker's nap at once where naps are futex waits: about
# 0.12 ms to spinning here; elsewhere it wakes at the end of its current nap, up to 1 ms
# in its first second of dozing, 10 ms later).
SPLIT_WAKE_WAIT_MACS = 100_000_000
SPLIT_WAKE_WAIT_S = 0.002
# Whether waking a dozing worker first keeps it off the waking thread's core (for that
# wake-up only; _threads.Worker.wake).  Without it, a worker whose last core is the
# caller's was seen to wake there, queued behind the caller for a scheduler tick (4 ms
# here) while the other core idled: calls ran alone until then, one took 4-6 ms.
WORKER_WAKE_ELSEWHERE = True
# At interpreter exit, how long to wait for each worker thread to stop (one still
# compiling its loop on a cold cache needs seconds; see _threads._stop_workers_at_exit).
WORKER_EXIT_WAIT_S = 120.0
# Rows per chunk in the time-distributed Dense (GEMM + fused activation).
DENSE_CHUNK_ROWS = 512

# --- optimizers -------------------------------------------------------------------------
# Elements of a variable per thread of the Adam update: a variable of fewer than twice
# this runs on one thread.  The update is bound by memory traffic, and on this 2-core
# VM one thread was faster than two at every size measured (scratch script, caches
# flushed between calls; the row-gradient update of a [V, E] embedding): 0.9M elements
# (the EWT tagger's embedding) 0.65 against 1.13 ms, 4M 3.5 against 3.4 ms, 30M 17.6
# against 21.0 ms.  Whole EWT training steps, the two settings alternating over 200
# steps in one process, three runs: medians 6.42, 6.11 and 5.77 ms on one thread
# against 6.73, 5.92 and 6.38 ms split (within this machine's noise; one thread also
# leaves the other core free).  A machine with more memory bandwidth per core may gain
# from a smaller value.
OPTIMIZER_MIN_ITEMS_PER_THREAD = 32_000_000
# With two threads, an optimizer step that has row-sparse gradients (an Embedding's)
# runs the dense variables' updates on a second thread meanwhile, when they hold at
# least this many elements in all (optimizers._split_beside).
OPTIMIZER_BESIDE_MIN_ITEMS = 100_000
