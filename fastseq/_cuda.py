"""CUDA backend: host-side glue for the Numba CUDA kernels in ``fastseq.kernels``.

Entry points (inputs already validated by ``fastseq.ops``):

* ``is_available()`` / ``unavailable_reason()``
* ``lstm_cuda(x, W, U, b, h0, c0, mask, go_backwards, return_sequences,
  zero_output_for_mask, act, rec, *, weights=None) -> (out, hT, cT)``
* ``dense_cuda(x, W, b, activation, *, weights=None) -> y``
* ``argmax_dense_cuda(x, W, b, activation, *, weights=None) -> idx``
* ``upload_lstm_weights(W, U, b)`` / ``upload_dense_weights(W, b)``: explicit one-time
  upload, pass the result as ``weights=``.

Arrays may be NumPy (copied to the GPU, results copied back) or device arrays (CuPy,
Numba, anything with ``__cuda_array_interface__``): then the results stay on the device
(CuPy in -> CuPy out, otherwise Numba device arrays) with no host round trip.
Weights given as read-only NumPy arrays (``a.flags.writeable == False``, and read-only
bases) are uploaded once and cached, keyed by the identity of the array, for as long as
it lives; writeable arrays are uploaded on every call (they could change in place).

Importing this module does not import ``numba.cuda``; every function imports it lazily,
so ``import fastseq`` never needs CUDA.  Without a GPU/driver (and without the Numba
CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``) the entry points raise ``RuntimeError``
saying why.

The tunables below are read at call time, so tests may patch them (e.g. tiny blocks to
force several blocks and ragged tails).
"""
import collections
import threading
import weakref

import numpy as np

# --- tunables (read at call time) --------------------------------------------------------
# Threads per block of the LSTM kernels (rounded down to a power of two; the persistent
# kernel takes fewer when its items need fewer).
THREADS_PER_BLOCK = 256
# Hidden units per block; None = automatic (persistent: smallest slice whose grid can be
# co-resident, starting from H / (SMs * PERSISTENT_BLOCKS_PER_SM); per-step: 8).
HIDDEN_PER_BLOCK = None
# Batch rows per block of the per-step fallback; None = THREADS_PER_BLOCK*RBB/HB.
BATCH_PER_BLOCK = None
# Batch rows per thread (register tile, 1 or 4); None = 4 when B >= RBB_MIN_BATCH else 1.
BATCH_REGISTER_TILE = None
RBB_MIN_BATCH = 16
# Target blocks per SM for the automatic persistent slice size.
PERSISTENT_BLOCKS_PER_SM = 1
# "auto" (persistent when it fits, else per-step), "persistent" (error if it cannot run),
# "stepwise" (a launch per step that also computes h U), or "gemm" (per step, h U as a
# GEMM, cuBLAS through CuPy when installed, then a cell launch; not yet timed on a GPU).
LSTM_MODE = "auto"
# Training (lstm_train_forward_cuda / lstm_train_backward_cuda): "auto" (the forward
# recurrence by lstm_cuda's kernels, the saved gates from two GEMMs and two scans, the
# backward recurrence in one cooperative launch when it fits, else per step), or
# "stepwise" (a cell launch and a GEMM per step, both ways).
TRAIN_MODE = "auto"
# Rows of dz the persistent backward kernel stages in shared memory at a time (None: as
# many as fit, up to the batch).  It stages dz only when a step's B*4H values take at
# most TRAIN_STAGE_BYTES (None: always); otherwise its dot products read dz from global
# memory.  Measured on an H100 (bench/results/gpu_check_h100_1ef9868.json, backward
# recurrence alone): 1.87 ms staged against 1.97 ms from global memory at B=32, H=256
# (128 KiB per step), 12.4 against 8.7 ms at B=64, H=512 (512 KiB per step).
TRAIN_STAGE_ROWS = None
TRAIN_STAGE_BYTES = 128 * 1024
# Cap on dynamic shared memory per block in bytes; None = the device's opt-in maximum.
MAX_SHARED_BYTES = None
# Persistent kernel: at most this many threads share one item's dot products (power of
# two); h is copied to shared memory at each step when all of it takes at most
# H_STAGE_BYTES (else the dot products read it from global memory).
MAX_THREADS_PER_ITEM = 32
H_STAGE_BYTES = 48 * 1024
# Input projections up to this size reuse one cached device buffer per dtype (larger
# ones are allocated per call).
WORKSPACE_CACHE_BYTES = 64 * 1024 * 1024
# Fused Dense: threads per block (power of two), rows per block, staged D slice.
DENSE_THREADS_PER_BLOCK = 256
DENSE_ROWS_PER_BLOCK = 16
DENSE_K_TILE = 64
# Dense with the logits from a GEMM (cuBLAS through CuPy when installed, else the tiled
# Numba GEMM) and the bias + activation in a second kernel: "auto" (when CuPy can be
# used), "always", "never" (the single fused kernel).
DENSE_GEMM = "auto"
# Tiled GEMM (input projection when CuPy is missing): C tile and thread tile.
GEMM_TILE = 64
GEMM_THREADS = 16
# Use CuPy's matmul (cuBLAS, FP32 compute) for the input projection when importable.
USE_CUPY = True

# --- instrumentation ---------------------------------------------------------------------
# Kernel launches by name ("lstm_persistent", "lstm_step", "gemm", "cupy_gemm", "dense",
# "dense_argmax", "transpose"); host->device uploads by kind ("x", "weights", ...).
LAUNCHES = collections.Counter()
UPLOADS = collections.Counter()
# (path, reason) of the last lstm_cuda call: path "persistent" or "stepwise".
last_lstm_path = None

_JIT = {}
_WCACHE = {}
_WS = {}
_WS_LOCK = threading.Lock()
_DUMMIES = {}
_PLAN_CACHE = {}
_SMEM_SET = {}

_GEMM_MAX_GRID_Y = 65535


# --- availability ------------------------------------------------------------------------
def _import_cuda():
    try:
        from numba import cuda
    except Exception as exc:  # numba-cuda missing or broken
        raise RuntimeError(
            "device='cuda' needs the numba-cuda package (pip install 'numba-cuda[cu13]'); "
            f"importing numba.cuda failed: {exc}") from None
    return cuda


def is_simulator():
    """True when Numba's CUDA simulator is active (NUMBA_ENABLE_CUDASIM=1)."""
    try:
        from numba.cuda.core import config
        return bool(config.ENABLE_CUDASIM)
    except Exception:
        try:
            from numba.core import config
            return bool(getattr(config, "ENABLE_CUDASIM", 0))
        except Exception:
            return False


def unavailable_reason():
    """None when CUDA can be used, else a one-line explanation."""
    try:
        from numba import cuda
    except Exception as exc:
        return f"numba-cuda is not installed or failed to import ({exc})"
    try:
        if cuda.is_available():
            return None
    except Exception:
        pass
    try:
        cuda.current_context()
        msg = "no CUDA GPU was found"
    except Exception as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
    return f"no usable CUDA GPU/driver: {msg}"


def is_available():
    """True when kernels can run: a CUDA GPU with a driver (or the simulator)."""
    try:
        return unavailable_reason() is None
    except Exception:
        return False


def _require():
    cuda = _import_cuda()
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"device='cuda' is not usable here: {reason}. Use device='cpu' "
                           "(or device='auto' with NumPy inputs).")
    return cuda


# --- arrays ------------------------------------------------------------------------------
def is_device_array(a):
    """True for CuPy / Numba device arrays and anything with ``__cuda_array_interface__``
    (also the simulator's device arrays).  Never imports numba.cuda."""
    if a is None:
        return False
    if hasattr(a, "__cuda_array_interface__"):
        return True
    return type(a).__name__ == "FakeCUDAArray"


def _is_cupy(a):
    return type(a).__module__.split(".")[0] == "cupy"


def _is_numba_dev(a):
    return hasattr(a, "copy_to_host") and hasattr(a, "is_c_contiguous")


def _dtype_of(a):
    if hasattr(a, "__cuda_array_interface__"):
        return np.dtype(a.__cuda_array_interface__["typestr"])
    return np.dtype(a.dtype)


def _compute_dtype(x):
    return np.dtype(np.float64) if _dtype_of(x) == np.float64 else np.dtype(np.float32)


def _to_dev(cuda, a, dt, what):
    """Contiguous Numba device array of dtype ``dt`` holding ``a``."""
    if is_device_array(a):
        if _is_cupy(a):
            import cupy
            a = cupy.ascontiguousarray(a, dtype=dt)
            return _numba_view(cuda, a)
        d = a if _is_numba_dev(a) else _numba_view(cuda, a)
        if d.dtype == dt and d.is_c_contiguous():
            return d
        # Rare: a non-contiguous / other-dtype Numba device array; convert via the host.
        UPLOADS["convert"] += 1
        return cuda.to_device(np.ascontiguousarray(d.copy_to_host(), dtype=dt))
    UPLOADS[what] += 1
    return cuda.to_device(np.ascontiguousarray(a, dtype=dt))


def _numba_view(cuda, a):
    """Numba view of a ``__cuda_array_interface__`` array.  An array on a default stream
    (legacy or per-thread, or none named) needs no stream synchronisation: fastseq's
    kernels run on the legacy default stream, which waits for work on those.  Such a
    view names no stream either, because CuPy synchronises that stream (waits for the
    whole GPU) each time it imports an array that names one: that cost 0.5 ms per
    GEMM in training (bench/results/gpu_check_h100_8f651e4.log)."""
    desc = a.__cuda_array_interface__
    if desc.get("stream") in (None, 1, 2):
        return cuda.from_cuda_array_interface(dict(desc, stream=None), owner=a, sync=False)
    return cuda.as_cuda_array(a, sync=True)


def _empty(cuda, shape, dt):
    """A new C-contiguous device array: from CuPy's memory pool when CuPy may be used
    (then allocating and freeing it is no driver call and no synchronisation), else a
    Numba allocation."""
    cupy = _cupy()
    if cupy is not None and int(np.prod(shape)) > 0:
        return _numba_view(cuda, cupy.empty(shape, dt))
    return cuda.device_array(shape, dtype=dt)


def _upload(cuda, a, dt):
    """A new device array holding the host array ``a`` as C-contiguous ``dt``."""
    a = np.ascontiguousarray(a, dtype=dt)
    d = _empty(cuda, a.shape, a.dtype)
    if a.size:
        d.copy_to_device(a)
    return d


def _zeros(cuda, shape, dt):
    cupy = _cupy()
    if cupy is not None and int(np.prod(shape)) > 0:
        return _numba_view(cuda, cupy.zeros(shape, dt))
    return cuda.to_device(np.zeros(shape, dt))


def _out_kind(x):
    if not is_device_array(x):
        return "host"
    return "cupy" if _is_cupy(x) else "device"


def _finish(a, kind):
    if kind == "host":
        return a.copy_to_host()
    if kind == "cupy":
        import cupy
        return cupy.asarray(a)
    return a


def _pow2floor(n):
    n = max(1, int(n))
    return 1 << (n.bit_length() - 1)


def _pow2ceil(n):
    n = max(1, int(n))
    return 1 << (n - 1).bit_length()


# --- kernels -----------------------------------------------------------------------------
def _jit(cuda, key, pyfunc, argtypes):
    k = _JIT.get(key)
    if k is None:
        from numba import types as nbt
        try:
            k = cuda.jit(nbt.void(*argtypes))(pyfunc)
        except AttributeError as exc:
            err = _toolchain_error(exc)
            if err is exc:
                raise
            raise err from exc
        _JIT[key] = k
    return k


def _toolchain_error(exc):
    """A clear error for a known numba-cuda / NumPy mismatch (seen with numba-cuda
    0.30.4 and NumPy 2.5, which removed ``np.row_stack``); other errors unchanged."""
    if "row_stack" not in str(exc):
        return exc
    try:
        from importlib.metadata import version
        nc = version("numba-cuda")
    except Exception:
        nc = "?"
    return RuntimeError(
        f"device='cuda': numba-cuda {nc} cannot compile kernels with NumPy "
        f"{np.__version__} ({exc}; NumPy 2.5 removed np.row_stack). Install "
        "'numpy<2.5' or a numba-cuda release that supports this NumPy.")


def _lstm_kernel(cuda, name, dt, rbb):
    from .kernels import lstm_cuda
    ks = lstm_cuda.lstm_kernels(dt, rbb)
    fn = {"persistent": ks.persistent, "step": ks.step, "init_state": ks.init_state,
          "transpose": ks.transpose, "cell_gemm": ks.cell_gemm}[name]
    sig = ks.signatures[name]
    return _jit(cuda, ("lstm", name, dt.str, rbb), fn, sig), sig


def _overload(kernel, sig):
    try:
        return kernel.overloads[tuple(sig)]
    except KeyError:
        return next(iter(kernel.overloads.values()))


def _smem_limit(cuda):
    if MAX_SHARED_BYTES is not None:
        return int(MAX_SHARED_BYTES)
    try:
        return int(cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    except Exception:
        return 48 * 1024


def _enable_smem(cuda, kernel, sig, nbytes):
    """Allow ``nbytes`` of dynamic shared memory (> 48 KiB needs an opt-in per kernel)."""
    if nbytes <= 48 * 1024 or is_simulator():
        return
    key = id(kernel)
    if _SMEM_SET.get(key, 0) >= nbytes:
        return
    from numba.cuda.cudadrv.driver import binding, driver
    cufunc = _overload(kernel, sig)._codelibrary.get_cufunc()
    attr = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attr, int(nbytes), cufunc.handle, cufunc.device.id)
    _SMEM_SET[key] = nbytes


def _kernel_max_threads(kernel, sig, default):
    """The most threads per block the compiled kernel can be launched with (its
    registers bound it), as a power of two."""
    try:
        return _pow2floor(int(_overload(kernel, sig).max_threads_per_block))
    except Exception:   # the simulator has no such attribute
        return default


def _coop_blocks(kernel, sig, tpb, smem):
    ov = _overload(kernel, sig)
    try:
        return int(ov.max_cooperative_grid_blocks(tpb, smem))
    except TypeError:  # the simulator's version takes no shared-memory size
        return int(ov.max_cooperative_grid_blocks(tpb))


def _coop_capacity(cuda, kernel, sig, tpb, smem):
    """(blocks of ``tpb`` threads and ``smem`` bytes of dynamic shared memory that can
    be co-resident in a cooperative launch, None), or (None, reason) when the driver
    refuses the shared-memory attribute or the occupancy query."""
    try:
        _enable_smem(cuda, kernel, sig, smem)
        return _coop_blocks(kernel, sig, tpb, smem), None
    except Exception as exc:
        return None, (f"occupancy query failed for {smem} bytes of shared memory "
                      f"({type(exc).__name__}: {exc})")


def _choose_ks(nthr, nitems, H, cap=None):
    """Threads per item: a power of two, as many as the block has to spare, <= H (and
    <= cap)."""
    ks = 1
    while ks * 2 <= nthr and ks * 2 * nitems <= nthr and ks * 2 <= H and \
            (cap is None or ks * 2 <= cap):
        ks *= 2
    return ks


def _pad_rows(H, ks):
    """Row stride of the shared weight slice: rows of the items sharing a warp start in
    different banks (stride = KS mod 32)."""
    if ks >= 32:
        return H
    return H + ((ks - H) % 32)


def _h_stride(B, H, itemsize, budget):
    """Row stride (odd, >= H) of h staged in shared memory each step, or 0 when h is
    read from global memory instead (B*H values do not fit in ``budget`` bytes)."""
    hs = H + 1 - H % 2
    return hs if B * hs * itemsize <= budget else 0


def _persistent_plan(cuda, kernel, sig, B, H, itemsize, tpb_max, rbb):
    """(HB, KS, Hp, Hs, threads, smem_bytes, nblocks) for the persistent kernel, or
    (None, reason); Hs = 0 when h is not staged in shared memory."""
    key = (B, H, itemsize, tpb_max, rbb, HIDDEN_PER_BLOCK, PERSISTENT_BLOCKS_PER_SM,
           MAX_SHARED_BYTES, MAX_THREADS_PER_ITEM, H_STAGE_BYTES, id(kernel))
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        return hit
    limit = _smem_limit(cuda)
    start, stop = _slice_range(cuda, H)
    ngrp = -(-B // rbb)
    tpb_max = min(tpb_max, _kernel_max_threads(kernel, sig, tpb_max))
    result = None
    for hb in range(start, stop + 1):
        nblk = -(-H // hb)
        nitems = ngrp * hb
        ks = _choose_ks(tpb_max, nitems, H, cap=max(1, int(MAX_THREADS_PER_ITEM)))
        tpb = min(tpb_max, max(min(32, tpb_max), _pow2ceil(nitems * ks)))
        hp = _pad_rows(H, ks)
        fixed = itemsize * (4 * hb * hp + (4 * rbb * tpb if ks > 1 else 0))
        # h staged in shared memory when it is small and fits beside the weights
        hs = _h_stride(B, H, itemsize, min(int(H_STAGE_BYTES), max(0, limit - fixed)))
        smem = fixed + itemsize * B * hs
        if smem > limit:
            result = (None, f"the recurrent weight slice for {hb} hidden units and the "
                            f"staged h need {smem} bytes of shared memory, more than the "
                            f"{limit} available per block")
            break
        maxb, why = _coop_capacity(cuda, kernel, sig, tpb, smem)
        if maxb is None:
            result = (None, why)
            break
        if nblk <= maxb:
            result = (hb, ks, hp, hs, tpb, smem, nblk)
            break
        result = (None, f"a cooperative grid of {nblk} blocks ({hb} hidden units each, "
                        f"{smem} bytes of shared memory) cannot be co-resident "
                        f"(at most {maxb})")
    if result is None:
        result = (None, "no hidden-unit slice fits")
    _PLAN_CACHE[key] = result
    return result


def _cupy():
    """CuPy when it may be used for GEMMs (installed, USE_CUPY, not the simulator)."""
    if not USE_CUPY or is_simulator():
        return None
    try:
        import cupy
    except Exception:
        return None
    return cupy


def _slice_range(cuda, H):
    """(first, last) hidden units per block a persistent plan tries: HIDDEN_PER_BLOCK,
    else from H / (SMs * PERSISTENT_BLOCKS_PER_SM) up to H."""
    if HIDDEN_PER_BLOCK is not None:
        n = max(1, min(int(HIDDEN_PER_BLOCK), H))
        return n, n
    try:
        sms = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:
        sms = 1
    return max(1, -(-H // max(1, sms * int(PERSISTENT_BLOCKS_PER_SM)))), H


def _matmul(cuda, A, Bm, C, ta=False, tb=False):
    """C = op(A) @ op(Bm) for contiguous 2-D device arrays (CuPy or Numba arrays), op
    the transpose where ``ta`` / ``tb``: cuBLAS through CuPy when available (which takes
    the transposes as views), else the tiled Numba GEMM on transposed copies."""
    M = int(A.shape[1] if ta else A.shape[0])
    N = int(Bm.shape[0] if tb else Bm.shape[1])
    if M == 0 or N == 0:
        return
    cupy = _cupy()
    if cupy is not None:
        Ac, Bc = cupy.asarray(A), cupy.asarray(Bm)
        cupy.matmul(Ac.T if ta else Ac, Bc.T if tb else Bc, out=cupy.asarray(C))
        LAUNCHES["cupy_gemm"] += 1
        return
    if ta:
        A = _transpose_dev(cuda, A)
    if tb:
        Bm = _transpose_dev(cuda, Bm)
    from .kernels import gemm_cuda
    dt = np.dtype(A.dtype)
    tile, thr = int(GEMM_TILE), int(GEMM_THREADS)
    fn = gemm_cuda.gemm_kernel(dt, tile, thr)
    k = _jit(cuda, ("gemm", dt.str, tile, thr), fn, gemm_cuda.signature(dt))
    rows = _GEMM_MAX_GRID_Y * tile
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        grid = (-(-N // tile), -(-(r1 - r0) // tile))
        k[grid, (thr, thr)](A[r0:r1], Bm, C[r0:r1])
        LAUNCHES["gemm"] += 1


def _as_cupy(cupy, d):
    """CuPy view of the Numba device array d, made once per array (kept on d)."""
    c = getattr(d, "_fastseq_cupy", None)
    if c is None:
        c = cupy.asarray(d)
        try:
            d._fastseq_cupy = c
        except AttributeError:
            pass
    return c


def _device_key(cuda):
    try:
        return int(cuda.get_current_device().id)
    except Exception:
        return 0


def _dummy(cuda, shape, dt, dev=None):
    """A small constant device array (zeros) for arguments a kernel does not read;
    made once per device (``dev``: the current device's id, when known)."""
    key = (_device_key(cuda) if dev is None else dev, np.dtype(dt).str, shape)
    d = _DUMMIES.get(key)
    if d is None:
        d = cuda.to_device(np.zeros(shape, dt))
        _DUMMIES[key] = d
    return d


def _workspace(cuda, cupy, shape, dt, dev):
    """(numba, cupy or None) C-contiguous device arrays of ``shape`` and dtype ``dt``
    (the CuPy one only when ``cupy``, from _cupy(), is given).  Sizes up to
    WORKSPACE_CACHE_BYTES are views of one grow-only buffer per (device, dtype), the
    views cached per shape: the caller must hold _WS_LOCK until its last use of the
    buffer is enqueued (every kernel runs on the default stream, so later users wait
    for it)."""
    dt = np.dtype(dt)
    n = int(np.prod(shape))
    if n * dt.itemsize > int(WORKSPACE_CACHE_BYTES):
        if cupy is not None:
            c = cupy.empty(shape, dt)
            return _numba_view(cuda, c), c
        return cuda.device_array(shape, dtype=dt), None
    key = (dev, dt.str)
    ent = _WS.get(key)
    if ent is None or ent["size"] < n:
        size = max(n, 2 * ent["size"] if ent is not None else 0)
        size = max(n, min(size, int(WORKSPACE_CACHE_BYTES) // dt.itemsize))
        ent = {"size": size, "buf": cuda.device_array(size, dtype=dt), "views": {}}
        _WS[key] = ent
    views = ent["views"]
    v = views.get((shape, cupy is not None))
    if v is None:
        d = ent["buf"][:n].reshape(shape)
        v = (d, cupy.asarray(d) if cupy is not None else None)
        if len(views) > 64:
            views.clear()
        views[(shape, cupy is not None)] = v
    return v


def release_workspace():
    """Free the cached input-projection buffers and constant arrays of the CUDA path."""
    with _WS_LOCK:
        _WS.clear()
        _DUMMIES.clear()


# --- weights -----------------------------------------------------------------------------
def _immutable_host(a):
    """A NumPy array that cannot change in place: it and all its array bases are
    read-only."""
    if not isinstance(a, np.ndarray):
        return False
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return True


def _transpose_dev(cuda, d):
    """[R, C] device array -> a new [C, R] device array."""
    R, C = (int(n) for n in d.shape)
    out = _empty(cuda, (C, R), d.dtype)
    if R * C:
        k, _ = _lstm_kernel(cuda, "transpose", np.dtype(d.dtype), 1)
        k[min(-(-(R * C) // 256), 4096), 256](d, out)
        LAUNCHES["transpose"] += 1
    return out


def _upload_weight(cuda, a, dt, transpose):
    if not is_device_array(a):
        arr = np.ascontiguousarray(a, dtype=dt)
        if transpose:
            arr = np.ascontiguousarray(arr.T)
        UPLOADS["weights"] += 1
        return cuda.to_device(arr)
    d = _to_dev(cuda, a, dt, "weights")
    return _transpose_dev(cuda, d) if transpose else d


def _weight(cuda, a, dt, transpose=False):
    """Device copy of weight ``a`` (transposed if asked); cached for immutable arrays."""
    if not _immutable_host(a):
        return _upload_weight(cuda, a, dt, transpose)
    key = (id(a), dt.str, bool(transpose))
    ent = _WCACHE.get(key)
    if ent is not None and ent[0]() is a:
        return ent[1]

    def _drop(ref, key=key):
        cur = _WCACHE.get(key)
        if cur is not None and cur[0] is ref:
            del _WCACHE[key]

    d = _upload_weight(cuda, a, dt, transpose)
    _WCACHE[key] = (weakref.ref(a, _drop), d)
    return d


def clear_weight_cache():
    """Forget every cached device copy of weights."""
    _WCACHE.clear()


class LSTMWeights:
    """LSTM weights on the device: W [D, 4H], Ut [4H, H] (recurrent kernel transposed),
    b [4H]; from ``upload_lstm_weights``."""

    def __init__(self, W, Ut, b, dtype):
        self.W, self.Ut, self.b, self.dtype = W, Ut, b, np.dtype(dtype)
        self.D = int(W.shape[0])
        self.H = int(Ut.shape[1])


class DenseWeights:
    """Dense weights on the device: W [D, K], b [K]; from ``upload_dense_weights``."""

    def __init__(self, W, b, dtype):
        self.W, self.b, self.dtype = W, b, np.dtype(dtype)


def upload_lstm_weights(W, U, b=None, dtype=np.float32):
    """Upload LSTM weights once (kernel [D, 4H], recurrent_kernel [H, 4H], bias [4H])."""
    cuda = _require()
    dt = np.dtype(dtype)
    H = int(U.shape[0])
    bias = np.zeros(4 * H, dt) if b is None else b
    return LSTMWeights(_weight(cuda, W, dt), _weight(cuda, U, dt, transpose=True),
                       _weight(cuda, bias, dt), dt)


def upload_dense_weights(W, b=None, dtype=np.float32):
    """Upload Dense weights once (kernel [D, K], bias [K])."""
    cuda = _require()
    dt = np.dtype(dtype)
    K = int(W.shape[1])
    bias = np.zeros(K, dt) if b is None else b
    return DenseWeights(_weight(cuda, W, dt), _weight(cuda, bias, dt), dt)


# --- LSTM --------------------------------------------------------------------------------
def _act_code(value, what):
    from .kernels.lstm_cuda import ACTIVATION_CODES
    if value is None:
        return ACTIVATION_CODES["linear"]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if int(value) in ACTIVATION_CODES.values():
            return int(value)
    elif isinstance(value, str) and value in ACTIVATION_CODES:
        return ACTIVATION_CODES[value]
    raise ValueError(f"lstm: unsupported `{what}` {value!r} on CUDA; expected one of "
                     f"{sorted(ACTIVATION_CODES)}")


def _mask_dev(cuda, mask):
    """[B, T] uint8 device array (1 = step computed)."""
    if is_device_array(mask):
        if _is_cupy(mask):
            import cupy
            m = cupy.ascontiguousarray(mask != 0).view(cupy.uint8)
            return _numba_view(cuda, m)
        d = mask if _is_numba_dev(mask) else _numba_view(cuda, mask)
        if np.dtype(d.dtype) in (np.dtype(np.bool_), np.dtype(np.uint8)) \
                and d.is_c_contiguous():
            return d.view(np.uint8) if np.dtype(d.dtype) == np.bool_ else d
        UPLOADS["convert"] += 1
        mask = d.copy_to_host()
    m = np.ascontiguousarray(np.asarray(mask) != 0).view(np.uint8)
    UPLOADS["mask"] += 1
    return cuda.to_device(m)


def lstm_cuda(x, W, U, b, h0, c0, mask, go_backwards=False, return_sequences=False,
              zero_output_for_mask=False, act="tanh", rec="sigmoid", *, rec_act=None,
              weights=None):
    """LSTM forward pass on the GPU, Keras semantics (see fastseq.lstm).

    x [B, T, D]; W [D, 4H]; U [H, 4H]; b [4H] (or None); h0, c0 [B, H] or None (zeros);
    mask [B, T] bool/0-1 or None; act / rec: activation name or code ("tanh",
    "sigmoid", "hard_sigmoid", "relu", "linear", "softsign").  ``rec_act`` is an alias
    of ``rec``.  ``weights``: an ``LSTMWeights`` from ``upload_lstm_weights`` (then W, U,
    b are ignored and may be None).
    Returns (out, hT, cT): out [B, T, H] (processing order) with return_sequences, else
    the last output [B, H].  NumPy in -> NumPy out; device x -> device arrays out.
    """
    global last_lstm_path
    cuda = _require()
    if rec_act is not None:
        rec = rec_act
    a_code = _act_code(act, "activation")
    r_code = _act_code(rec, "recurrent_activation")
    kind = _out_kind(x)
    dt = _compute_dtype(x)
    cupy = _cupy()
    if cupy is not None and kind == "cupy":
        # the kernel never reads x: keep it as CuPy for the GEMM (no Numba view)
        xd = cupy.ascontiguousarray(x, dtype=dt)
    else:
        xd = _to_dev(cuda, x, dt, "x")
    B, T, D = (int(n) for n in xd.shape)
    dev = _device_key(cuda)
    if weights is None:
        H = int(U.shape[0])
        bias = _dummy(cuda, (4 * H,), dt, dev) if b is None else _weight(cuda, b, dt)
        weights = LSTMWeights(_weight(cuda, W, dt), _weight(cuda, U, dt, transpose=True),
                              bias, dt)
    elif weights.dtype != dt:
        raise ValueError(f"lstm: weights were uploaded as {weights.dtype}, input computes "
                         f"in {dt}")
    H = weights.H
    G4 = 4 * H
    if weights.D != D:
        raise ValueError(f"lstm: `kernel` must have shape [D, 4H] = ({D}, {G4}), got "
                         f"({weights.D}, {int(weights.W.shape[1])})")
    h0d = _dummy(cuda, (1, 1), dt, dev) if h0 is None else _to_dev(cuda, h0, dt, "state")
    c0d = _dummy(cuda, (1, 1), dt, dev) if c0 is None else _to_dev(cuda, c0, dt, "state")
    flags = (int(mask is not None) | int(bool(go_backwards)) << 1
             | int(bool(zero_output_for_mask)) << 2 | int(bool(return_sequences)) << 3
             | int(h0 is not None) << 4 | int(c0 is not None) << 5
             | a_code << 8 | r_code << 16)
    # what is returned: the sequence (if asked) and the state st [4, B, H] (h double
    # buffer, c, last output)
    res, st, out = _lstm_alloc(cuda, cupy, kind, B, T, H, return_sequences, dt, dev)
    if B == 0 or T == 0:
        if B * H:
            _launch_init_state(cuda, dt, st, h0d, c0d, flags)
        return _lstm_outputs(res, 0, return_sequences)
    maskd = _dummy(cuda, (1, 1), np.uint8, dev) if mask is None else _mask_dev(cuda, mask)

    tpb = _pow2floor(THREADS_PER_BLOCK)
    if BATCH_REGISTER_TILE is not None:
        rbb = int(BATCH_REGISTER_TILE)
    else:
        rbb = 4 if B >= RBB_MIN_BATCH else 1
    from .kernels.lstm_cuda import RBB_CHOICES
    if rbb not in RBB_CHOICES:
        raise ValueError(f"BATCH_REGISTER_TILE must be one of {RBB_CHOICES}, got {rbb}")
    mode = LSTM_MODE
    if mode not in ("auto", "persistent", "stepwise", "gemm"):
        raise ValueError(f"LSTM_MODE must be 'auto', 'persistent', 'stepwise' or 'gemm', "
                         f"got {mode!r}")

    with _WS_LOCK:
        G3, Gc = _workspace(cuda, cupy, (B, T, G4), dt, dev)
        if Gc is not None:
            cupy.matmul(cupy.asarray(xd).reshape(B * T, D), _as_cupy(cupy, weights.W),
                        out=Gc.reshape(B * T, G4))
            LAUNCHES["cupy_gemm"] += 1
        else:
            _matmul(cuda, xd.reshape(B * T, D), weights.W, G3.reshape(B * T, G4))
        reason = f"LSTM_MODE={mode!r}"
        if mode in ("auto", "persistent"):
            try:
                kp, sigp = _lstm_kernel(cuda, "persistent", dt, rbb)
                plan = _persistent_plan(cuda, kp, sigp, B, H, dt.itemsize, tpb, rbb)
            except Exception as exc:   # e.g. the device runtime library cannot be linked
                if mode == "persistent":
                    raise
                plan = (None, f"the persistent kernel is unavailable "
                              f"({type(exc).__name__}: {exc})")
            if plan[0] is not None:
                hb, ks, hp, hs, ptpb, smem, nblk = plan
                try:
                    kp[nblk, ptpb, 0, smem](G3, weights.Ut, weights.b, st, out, maskd,
                                            h0d, c0d, hb | ks << 20 | hp << 40, hs, flags)
                    LAUNCHES["lstm_persistent"] += 1
                    last_lstm_path = ("persistent",
                                      f"{nblk} blocks x {ptpb} threads, {hb} hidden units "
                                      f"per block, KS={ks}, RBB={rbb}, h "
                                      f"{'staged in shared memory' if hs else 'from global memory'}"
                                      f", {smem} bytes shared")
                    return _lstm_outputs(res, T, return_sequences)
                except Exception as exc:
                    if mode == "persistent":
                        raise
                    reason = f"cooperative launch failed ({type(exc).__name__}: {exc})"
            else:
                reason = plan[1]
                if mode == "persistent":
                    raise RuntimeError(f"lstm: the persistent CUDA kernel cannot run: "
                                       f"{reason}")

        # per-step fallback (the state is (re)initialised: a failed cooperative launch
        # may have run partly)
        _launch_init_state(cuda, dt, st, h0d, c0d, flags)
        if mode == "gemm":
            _gemm_steps(cuda, dt, weights, G3, st, out, maskd, flags, a_code, r_code)
            last_lstm_path = ("gemm", "a GEMM and a cell launch per step")
            return _lstm_outputs(res, T, return_sequences)
        ksf, sigs = _lstm_kernel(cuda, "step", dt, rbb)
        tpb = min(tpb, _kernel_max_threads(ksf, sigs, tpb))
        hb = max(1, min(int(HIDDEN_PER_BLOCK) if HIDDEN_PER_BLOCK is not None else 8, H))
        if BATCH_PER_BLOCK is not None:
            bb = max(1, min(int(BATCH_PER_BLOCK), B))
        else:
            bb = max(1, min(B, (tpb * rbb) // hb))
        ks = _choose_ks(tpb, (-(-bb // rbb)) * hb, H)
        smem = max(dt.itemsize * 4 * rbb * tpb if ks > 1 else 0, 64)
        _enable_smem(cuda, ksf, sigs, smem)   # only needed above 48 KiB (tpb > 384)
        grid = (-(-H // hb), -(-B // bb))
        Ut1 = weights.Ut.reshape(G4 * H)
        hv = (st[0], st[1])
        cbuf, ylast = st[2], st[3]
        has_mask, gb = flags & 1, (flags >> 1) & 1
        zofm, rs = (flags >> 2) & 1, (flags >> 3) & 1
        for s in range(T):
            t = T - 1 - s if gb else s
            p = s % 2
            ksf[grid, tpb, 0, smem](G3, Ut1, weights.b, hv[p], hv[1 - p], cbuf, ylast,
                                    out, maskd, s, t, hb, bb, ks, has_mask, zofm, rs,
                                    a_code, r_code)
        LAUNCHES["lstm_step"] += T
    last_lstm_path = ("stepwise", reason)
    return _lstm_outputs(res, T, return_sequences)


def _gemm_steps(cuda, dt, weights, G3, st, out, maskd, flags, a_code, r_code):
    """LSTM_MODE "gemm": per step, zu = h U as a GEMM (cuBLAS through CuPy when
    installed), then one ``cell_gemm`` launch.  st [4, B, H] holds the initial state."""
    B, T, G4 = (int(n) for n in G3.shape)
    H = G4 // 4
    zu = _empty(cuda, (B, G4), dt)
    hv = (st[0], st[1])
    cupy = _cupy()
    if cupy is not None:
        # CuPy views made once, outside the loop: U^T [4H, H] read transposed by cuBLAS
        hc = (cupy.asarray(hv[0]), cupy.asarray(hv[1]))
        Utc, zuc = _as_cupy(cupy, weights.Ut).T, cupy.asarray(zu)

        def product(p):
            cupy.matmul(hc[p], Utc, out=zuc)
            LAUNCHES["cupy_gemm"] += 1
    else:
        U = _transpose_dev(cuda, weights.Ut)

        def product(p):
            _matmul(cuda, hv[p], U, zu)
    k, _ = _lstm_kernel(cuda, "cell_gemm", dt, 1)
    tpb, nb = _cell_grid(B * H)
    launch = k[nb, tpb]
    has_mask, gb = flags & 1, (flags >> 1) & 1
    zofm, rs = (flags >> 2) & 1, (flags >> 3) & 1
    for s in range(T):
        t = T - 1 - s if gb else s
        p = s % 2
        product(p)
        launch(zu, G3, weights.b, hv[p], hv[1 - p], st[2], st[3], out, maskd, s, t,
               has_mask, zofm, rs, a_code, r_code)
    LAUNCHES["lstm_cell_gemm"] += T


def _launch_init_state(cuda, dt, st, h0d, c0d, flags):
    k, _ = _lstm_kernel(cuda, "init_state", dt, 1)
    tpb, nb = _cell_grid(int(st.shape[1]) * int(st.shape[2]))
    k[nb, tpb](st, h0d, c0d, flags)
    LAUNCHES["init_state"] += 1


def _lstm_alloc(cuda, cupy, kind, B, T, H, return_sequences, dt, dev):
    """(res, st, out): the arrays a call returns, as ``res`` for _lstm_outputs, and the
    Numba views the kernels write: st [4, B, H], out [B, T, H] (a dummy without
    return_sequences).  CuPy in -> CuPy arrays from CuPy's pool; else one Numba
    allocation for both."""
    if kind == "cupy" and cupy is not None:
        stc = cupy.empty((4, B, H), dt)
        outc = cupy.empty((B, T, H), dt) if return_sequences else None
        st = _numba_view(cuda, stc)
        out = _numba_view(cuda, outc) if return_sequences \
            else _dummy(cuda, (1, 1, 1), dt, dev)
        return ("pool", outc, stc), st, out
    nseq = B * T * H if return_sequences else 0
    buf = _empty(cuda, nseq + 4 * B * H, dt)
    st = buf[nseq:].reshape(4, B, H)
    out = buf[:nseq].reshape(B, T, H) if return_sequences \
        else _dummy(cuda, (1, 1, 1), dt, dev)
    return (kind, buf, (nseq, B, T, H)), st, out


def _lstm_outputs(res, steps, return_sequences):
    """(out, hT, cT) from _lstm_alloc's ``res`` after ``steps`` steps."""
    kind, a, b = res
    if kind == "pool":
        seq, st = a, b
    else:
        nseq, B, T, H = b
        if kind == "host":
            a = a.copy_to_host()
        elif kind == "cupy":
            import cupy
            a = cupy.asarray(a)
        st = a[nseq:].reshape(4, B, H)
        seq = a[:nseq].reshape(B, T, H) if return_sequences else None
    out = seq if return_sequences else st[3]
    return out, st[steps % 2], st[2]


def _train_kernel(cuda, name, dt):
    from .kernels import lstm_bwd_cuda
    ks = lstm_bwd_cuda.train_kernels(dt)
    return _jit(cuda, ("train", name, dt.str), getattr(ks, name), ks.signatures[name])


def _train_mode():
    if TRAIN_MODE not in ("auto", "stepwise"):
        raise ValueError(f"TRAIN_MODE must be 'auto' or 'stepwise', got {TRAIN_MODE!r}")
    return TRAIN_MODE


def lstm_train_forward_cuda(x, W, U, b, m8, h0, c0, *, go_backwards=False,
                            zero_output_for_mask=False, act="tanh", rec="sigmoid"):
    """Forward pass of one LSTM layer on the GPU, saving what backpropagation through
    time needs (kernels/lstm_bwd_cuda.py); the CUDA counterpart of
    ``training._LSTM.run_forward``, time-major host arrays in.

    x [T, B, D]; W [D, 4H]; U [H, 4H]; b [4H] or None; m8 [T, B] uint8; h0, c0 [B, H]
    or None (zeros).  Returns (out [T, B, H] NumPy, at input times; saved: the device
    arrays ``lstm_train_backward_cuda`` needs).

    With TRAIN_MODE "auto" the recurrence runs in ``lstm_cuda``'s kernels (one
    persistent launch where it fits).  The gates are then recomputed for all steps at
    once: h before each step from the outputs (``scan_h``), hprev U and x W as two
    GEMMs, and the cell state along the steps (``scan_c``).
    """
    cuda = _require()
    out, saved = _train_forward_dev(cuda, _upload(cuda, x, x.dtype), None, W, U, b, m8,
                                    h0, c0, go_backwards, zero_output_for_mask, act, rec)
    return out.copy_to_host(), saved


def _train_forward_dev(cuda, xd3, xbm, W, U, b, m8, h0, c0, go_backwards,
                       zero_output_for_mask, act, rec):
    """``lstm_train_forward_cuda`` on x already on the device: xd3 [T, B, D]
    (time-major), xbm the same batch-major [B, T, D] or None (then made from xd3 when
    needed).  Returns (out [T, B, H] device array, saved)."""
    dt = np.dtype(xd3.dtype)
    T, B, D = (int(n) for n in xd3.shape)
    H = int(U.shape[0])
    G4 = 4 * H
    a_code = _act_code(act, "activation")
    r_code = _act_code(rec, "recurrent_activation")
    gb, zofm = int(bool(go_backwards)), int(bool(zero_output_for_mask))
    xd = xd3.reshape(T * B, D)
    Ud = _upload(cuda, U, dt)
    bd = _dev_or_zeros(cuda, b, (G4,), dt)
    md = _upload(cuda, m8, np.uint8)
    h, c = _dev_or_zeros(cuda, h0, (B, H), dt), _dev_or_zeros(cuda, c0, (B, H), dt)
    xw = _empty(cuda, (T * B, G4), dt)
    hprev = _empty(cuda, (T * B, H), dt)
    cprev = _empty(cuda, (T, B, H), dt)
    gates = _empty(cuda, (T, B, G4), dt)
    actc = _empty(cuda, (T, B, H), dt)
    out = _empty(cuda, (T, B, H), dt)
    Wd = _upload(cuda, W, dt)
    _matmul(cuda, xd, Wd, xw)
    xw3 = xw.reshape(T, B, G4)
    hprev3 = hprev.reshape(T, B, H)
    tpb, nblk = _cell_grid(B * H)
    if _train_mode() == "auto" and T > 0 and B * H > 0:
        # the weights lstm_cuda needs, from the uploads above (U transposed on the GPU)
        weights = LSTMWeights(Wd, _transpose_dev(cuda, Ud), bd, dt)
        # x batch-major for it, rearranged on the GPU
        if xbm is None:
            xbm = _empty(cuda, (B, T, D), dt)
            _swap01(cuda, xd3, xbm)
        outs, _, _ = lstm_cuda(xbm, None, None, None, h, c, np.asarray(m8).T, go_backwards=gb,
                               return_sequences=True, zero_output_for_mask=zofm,
                               act=a_code, rec=r_code, weights=weights)
        _train_kernel(cuda, "scan_h", dt)[nblk, tpb](outs, md, h, hprev3, out, gb)
        _matmul(cuda, hprev, Ud, gates.reshape(T * B, G4))
        _train_kernel(cuda, "scan_c", dt)[nblk, tpb](xw3, gates, bd, md, c, cprev, actc,
                                                     gb, a_code, r_code)
        LAUNCHES["train_scan"] += 2
    else:
        zu = _empty(cuda, (B, G4), dt)
        kf = _train_kernel(cuda, "fwd_cell", dt)
        for s in range(T):
            t = T - 1 - s if gb else s
            tp = min(t + 1, T - 1) if gb else max(t - 1, 0)   # used only when s > 0
            _matmul(cuda, h, Ud, zu)
            kf[nblk, tpb](xw3, zu, bd, md, t, tp, s, h, c, hprev3, cprev, gates, actc,
                          out, zofm, a_code, r_code)
        LAUNCHES["train_fwd_cell"] += T
    saved = dict(x=xd, Wd=Wd, Ud=Ud, m=md, hprev=hprev, cprev=cprev, gates=gates,
                 actc=actc, shape=(T, B, D, H), dtype=dt, go_backwards=gb, zofm=zofm,
                 act=a_code, rec=r_code)
    return out, saved


def _stage_dz(B, H, itemsize):
    """Whether the backward kernel stages dz[t] (B*4H values) in shared memory
    (TRAIN_STAGE_BYTES), else it reads dz from global memory."""
    return TRAIN_STAGE_BYTES is None or B * 4 * H * itemsize <= int(TRAIN_STAGE_BYTES)


def _train_bwd_plan(cuda, kernel, sig, B, H, itemsize):
    """(HB, KS, RC, Up, Zs, threads, smem_bytes, nblocks) for ``bwd_persistent``, or
    (None, reason): HB hidden units per block, KS threads per item (4 rows x 1 unit),
    RC rows of dz staged at a time, Up and Zs the padded row strides of U and dz in
    shared memory."""
    key = ("train_bwd", B, H, itemsize, THREADS_PER_BLOCK, HIDDEN_PER_BLOCK,
           PERSISTENT_BLOCKS_PER_SM, MAX_SHARED_BYTES, MAX_THREADS_PER_ITEM,
           TRAIN_STAGE_ROWS, TRAIN_STAGE_BYTES, id(kernel))
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        return hit
    limit = _smem_limit(cuda)
    start, stop = _slice_range(cuda, H)
    tpb_max = _pow2floor(THREADS_PER_BLOCK)
    tpb_max = min(tpb_max, _kernel_max_threads(kernel, sig, tpb_max))
    H4 = 4 * H
    result = (None, "no hidden-unit slice fits")
    for hb in range(start, stop + 1):
        nblk = -(-H // hb)
        # the rows staged at a time from what the weights leave of the shared memory
        # (with the largest reduction buffer), then KS from the items of one chunk
        # (4 rows x 1 unit each)
        staged = _stage_dz(B, H, itemsize)
        rc = min(B, max(0, limit - itemsize * (hb * (H4 + 31) + 4 * tpb_max))
                 // (itemsize * (H4 + 31)))
        if TRAIN_STAGE_ROWS is not None:
            rc = min(rc, max(1, int(TRAIN_STAGE_ROWS)))
        if not staged:
            rc = 0
        elif rc < 1:
            result = (None, f"the rows of U for {hb} hidden units and one row of dz need "
                            f"more than the {limit} bytes of shared memory available "
                            f"per block")
            break
        nitems = -(-(rc if staged else B) // 4) * hb
        ks = _choose_ks(tpb_max, nitems, H4, cap=max(1, int(MAX_THREADS_PER_ITEM)))
        tpb = min(tpb_max, max(min(32, tpb_max), _pow2ceil(nitems * ks)))
        up = _pad_rows(H4, ks)
        zs = _pad_rows(H4, min(32, ks * hb))
        fixed = itemsize * (hb * up + 4 * tpb)
        smem = fixed + itemsize * rc * zs
        if smem > limit:
            result = (None, f"the rows of U for {hb} hidden units need {smem} bytes of "
                            f"shared memory, more than the {limit} available per block")
            break
        maxb, why = _coop_capacity(cuda, kernel, sig, tpb, smem)
        if maxb is None:
            result = (None, why)
            break
        if nblk <= maxb:
            result = (hb, ks, rc, up, zs, tpb, smem, nblk)
            break
        result = (None, f"a cooperative grid of {nblk} blocks ({hb} hidden units each) "
                        f"cannot be co-resident (at most {maxb})")
    _PLAN_CACHE[key] = result
    return result


# the path the last lstm_train_backward_cuda took: ("persistent" | "stepwise", detail)
last_train_path = None


def _bwd_recurrence(cuda, saved, doutd, dhd, dcd):
    """The backward recurrence on device arrays: returns dz [T, B, 4H] and leaves dhd,
    dcd [B, H] holding the gradients wrt the initial state (one cooperative launch of
    ``bwd_persistent`` when it fits, else a cell launch and a GEMM per step)."""
    global last_train_path
    T, B, D, H = saved["shape"]
    dt = saved["dtype"]
    gb, zofm = saved["go_backwards"], saved["zofm"]
    md, gates, actc, cprev = saved["m"], saved["gates"], saved["actc"], saved["cprev"]
    dz = _empty(cuda, (T, B, 4 * H), dt)
    carry = _zeros(cuda, (B, H), dt)
    plan = (None, "TRAIN_MODE='stepwise'")
    if _train_mode() == "auto" and T > 0 and B * H > 0:
        try:
            # dz staged in shared memory, or read from global memory (_train_bwd_plan's
            # rule, from TRAIN_STAGE_BYTES)
            name = "bwd_persistent" if _stage_dz(B, H, dt.itemsize) \
                else "bwd_persistent_global"
            kp = _train_kernel(cuda, name, dt)
            from .kernels import lstm_bwd_cuda
            sig = lstm_bwd_cuda.signatures(dt)[name]
            plan = _train_bwd_plan(cuda, kp, sig, B, H, dt.itemsize)
        except Exception as exc:   # e.g. the device runtime library cannot be linked
            plan = (None, f"the persistent kernel is unavailable "
                          f"({type(exc).__name__}: {exc})")
    if plan[0] is not None:
        hb, ks, rc, up, zs, tpb_p, smem, nblk = plan
        flags = gb | zofm << 1 | saved["act"] << 8 | saved["rec"] << 16
        kp[nblk, tpb_p, 0, smem](doutd, gates, actc, cprev, md, saved["Ud"], dz, dhd, dcd,
                                 carry, hb | ks << 16 | rc << 32, up | zs << 32, flags)
        LAUNCHES["train_bwd_persistent"] += 1
        how = f"dz staged {rc} rows at a time" if rc else "dz read from global memory"
        last_train_path = ("persistent", f"{nblk} blocks x {tpb_p} threads, {hb} hidden "
                                         f"units per block, KS={ks}, {how}, {smem} bytes "
                                         "shared")
    else:
        UTd = _transpose_dev(cuda, saved["Ud"])
        dhu = _empty(cuda, (B, H), dt)
        tpb, nblk = _cell_grid(B * H)
        kb = _train_kernel(cuda, "bwd_cell", dt)
        kh = _train_kernel(cuda, "bwd_dh", dt)
        for s in range(T - 1, -1, -1):
            t = T - 1 - s if gb else s
            kb[nblk, tpb](doutd, carry, dhd, dcd, gates, actc, cprev, dz, md, t, zofm,
                          saved["act"], saved["rec"])
            _matmul(cuda, dz[t], UTd, dhu)
            kh[nblk, tpb](dhu, dhd, md, t)
        LAUNCHES["train_bwd_cell"] += T
        last_train_path = ("stepwise", plan[1])
    return dz


def lstm_train_backward_cuda(saved, dout, dh=None, dc=None, need_dx=True):
    """Backpropagation through time on the GPU from ``lstm_train_forward_cuda``'s
    saved arrays; the CUDA counterpart of ``training._LSTM.run_backward``.

    dout [T, B, H]: gradient wrt the outputs at their input times; dh, dc [B, H] or None:
    gradient wrt the final state.  Returns NumPy (dx [T, B, D] or None, dW, dU, db,
    dh0, dc0).
    """
    cuda = _require()
    dx, grads = _train_backward_dev(cuda, saved, _upload(cuda, dout, saved["dtype"]), dh,
                                    dc, need_dx)
    return (None if dx is None else dx.copy_to_host(),) + grads


def _train_backward_dev(cuda, saved, doutd, dh, dc, need_dx):
    """``lstm_train_backward_cuda`` with the output gradient on the device (doutd
    [T, B, H]).  Returns (dx [T, B, D] device array or None, (dW, dU, db, dh0, dc0) as
    NumPy arrays)."""
    T, B, D, H = saved["shape"]
    dt = saved["dtype"]
    G4 = 4 * H
    dhd, dcd = _dev_or_zeros(cuda, dh, (B, H), dt), _dev_or_zeros(cuda, dc, (B, H), dt)
    dz = _bwd_recurrence(cuda, saved, doutd, dhd, dcd)
    dz2 = dz.reshape(T * B, G4)
    dW = _empty(cuda, (D, G4), dt)
    _matmul(cuda, saved["x"], dz2, dW, ta=True)
    dU = _empty(cuda, (H, G4), dt)
    _matmul(cuda, saved["hprev"], dz2, dU, ta=True)
    db = _empty(cuda, G4, dt)
    cupy = _cupy()
    if cupy is not None:
        cupy.sum(cupy.asarray(dz2), axis=0, out=cupy.asarray(db))
    else:
        tpc, nbc = _cell_grid(G4)
        _train_kernel(cuda, "col_sum", dt)[nbc, tpc](dz2, db)
    dx = None
    if need_dx:
        dxd = _empty(cuda, (T * B, D), dt)
        _matmul(cuda, dz2, saved["Wd"], dxd, tb=True)
        dx = dxd.reshape(T, B, D)
    return dx, (dW.copy_to_host(), dU.copy_to_host(), db.copy_to_host(),
                dhd.copy_to_host(), dcd.copy_to_host())


def lstm_vjp_cuda(x, W, U, b, m8, h0, c0, d_out, dh, dc, *, return_sequences,
                  go_backwards=False, zero_output_for_mask=False, act="tanh",
                  rec="sigmoid"):
    """The backward pass of one LSTM layer for ``training.lstm_vjp``, batch-major host
    arrays in and out, rearranged on the GPU: x [B, T, D]; d_out [B, T, H] (in output
    order) with ``return_sequences``, else [B, H] (the last output), or None; dh, dc
    [B, H] or None; m8 [T, B] uint8.  Returns NumPy (dx [B, T, D], dW, dU, db, dh0,
    dc0)."""
    cuda = _require()
    dt = np.dtype(x.dtype)
    B, T, D = x.shape
    H = int(U.shape[0])
    xbm = _upload(cuda, x, dt)
    xd3 = _empty(cuda, (T, B, D), dt)
    _swap01(cuda, xbm, xd3)
    _, saved = _train_forward_dev(cuda, xd3, xbm, W, U, b, m8, h0, c0, go_backwards,
                                  zero_output_for_mask, act, rec)
    gb = bool(go_backwards)
    if d_out is not None and return_sequences:
        doutd = _empty(cuda, (T, B, H), dt)      # input order: reversed with go_backwards
        _swap01(cuda, _upload(cuda, d_out, dt), doutd, rev=gb)
    else:
        doutd = _zeros(cuda, (T, B, H), dt)
        if d_out is not None:
            doutd[0 if gb else T - 1].copy_to_device(np.ascontiguousarray(d_out, dt))
    dxd, grads = _train_backward_dev(cuda, saved, doutd, dh, dc, True)
    dx = _empty(cuda, (B, T, D), dt)
    _swap01(cuda, dxd, dx)
    return (dx.copy_to_host(),) + grads


def _dev_or_zeros(cuda, a, shape, dt):
    return _zeros(cuda, shape, dt) if a is None else _upload(cuda, a, dt)


def _swap01(cuda, src, dst, rev=False):
    """dst[q, p, :] = src[p, q, :] (src[p, Q-1-q, :] with ``rev``) for device arrays
    src [P, Q, R], dst [Q, P, R]."""
    P, Q, R = (int(n) for n in src.shape)
    if P * Q * R:
        _train_kernel(cuda, "swap01", np.dtype(src.dtype))[min(P * Q, 8192),
                                                           min(256, _pow2ceil(R))](
            src, dst, int(bool(rev)))
        LAUNCHES["swap01"] += 1


def _cell_grid(n):
    """(threads per block, blocks) of a 1-D grid-stride launch over n items."""
    tpb = _pow2floor(THREADS_PER_BLOCK)
    return tpb, max(1, min(-(-n // tpb), 4096))


# --- Dense -------------------------------------------------------------------------------
def _dense_code(activation):
    from .kernels.dense_cuda import DENSE_CODES
    key = "linear" if activation is None else activation
    if not isinstance(key, str) or key not in DENSE_CODES:
        raise ValueError(f"dense: unknown `activation` {activation!r}; expected None or "
                         f"one of {sorted(DENSE_CODES)}")
    return DENSE_CODES[key]


def _dense_weights(cuda, W, b, weights, dt):
    """The Dense weights on the device: ``weights`` (checked against ``dt``) or W and b
    (cached uploads; no bias: constant zeros)."""
    if weights is None:
        K = int(W.shape[1])
        bias = _dummy(cuda, (K,), dt) if b is None else _weight(cuda, b, dt)
        return DenseWeights(_weight(cuda, W, dt), bias, dt)
    if weights.dtype != dt:
        raise ValueError(f"dense: weights were uploaded as {weights.dtype}, input computes "
                         f"in {dt}")
    return weights


def _dense_setup(cuda, x, W, b, weights):
    dt = _compute_dtype(x)
    xd = _to_dev(cuda, x, dt, "x")
    weights = _dense_weights(cuda, W, b, weights, dt)
    shape = tuple(int(n) for n in xd.shape)
    D = shape[-1]
    M = int(np.prod(shape[:-1], dtype=np.int64))
    K = int(weights.W.shape[1])
    x2 = xd.reshape(M, D)
    return dt, x2, weights, shape[:-1], M, K


def _dense_launch_cfg(dt, K):
    from .kernels import dense_cuda
    rb = int(DENSE_ROWS_PER_BLOCK)
    kt = int(DENSE_K_TILE)
    ks = dense_cuda.dense_kernels(dt, rb, kt)
    tpb = _pow2floor(DENSE_THREADS_PER_BLOCK)
    nthr = min(tpb, max(min(32, tpb), _pow2ceil(K)))
    smem = dt.itemsize * (2 * nthr + 2 * rb)
    return ks, rb, kt, nthr, smem


def dense_cuda(x, W, b, activation=None, *, weights=None):
    """Time-distributed Dense with fused activation on the GPU: x [..., D], W [D, K],
    b [K] or None -> act(x @ W + b) [..., K].  ``activation``: None, "linear",
    "softmax", "log_softmax", "sigmoid", "tanh", "relu".  ``weights``: a
    ``DenseWeights`` from ``upload_dense_weights``.  NumPy in -> NumPy out."""
    cuda = _require()
    code = _dense_code(activation)
    kind = _out_kind(x)
    mode = DENSE_GEMM
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"DENSE_GEMM must be 'auto', 'always' or 'never', got {mode!r}")
    cupy = _cupy()
    use_gemm = mode == "always" or (mode == "auto" and cupy is not None)
    if use_gemm and cupy is not None and kind == "cupy":
        return _dense_gemm_cupy(cuda, cupy, x, W, b, weights, code)
    dt, x2, weights, lead, M, K = _dense_setup(cuda, x, W, b, weights)
    y = cuda.device_array((M, K), dtype=dt)
    if M and K:
        if use_gemm:
            _matmul(cuda, x2, weights.W, y)
            _launch_epilogue(cuda, dt, y, weights.b, code)
        else:
            ks, rb, kt, nthr, smem = _dense_launch_cfg(dt, K)
            k = _jit(cuda, ("dense", dt.str, rb, kt), ks.dense, ks.signatures["dense"])
            k[-(-M // rb), nthr, 0, smem](x2, weights.W, weights.b, y, code)
            LAUNCHES["dense"] += 1
    return _finish(y.reshape(*lead, K), kind)


def _launch_epilogue(cuda, dt, y, b, code):
    from .kernels import dense_cuda
    ks = dense_cuda.dense_kernels(dt, int(DENSE_ROWS_PER_BLOCK), int(DENSE_K_TILE))
    k = _jit(cuda, ("dense_epilogue", dt.str), ks.epilogue, ks.signatures["epilogue"])
    tpb, nb = _cell_grid(int(y.shape[0]))
    k[nb, tpb](y, b, code)
    LAUNCHES["dense_epilogue"] += 1


def _dense_gemm_cupy(cuda, cupy, x, W, b, weights, code):
    """dense_cuda for a CuPy input: CuPy arrays in and out, cuBLAS GEMM into a CuPy
    output, then the bias + activation kernel on a Numba view of it."""
    dt = _compute_dtype(x)
    xc = cupy.ascontiguousarray(x, dtype=dt)
    weights = _dense_weights(cuda, W, b, weights, dt)
    lead = tuple(int(n) for n in xc.shape[:-1])
    D = int(xc.shape[-1])
    M = int(np.prod(lead, dtype=np.int64))
    K = int(weights.W.shape[1])
    y = cupy.empty((M, K), dt)
    if M and K:
        if D:
            cupy.matmul(xc.reshape(M, D), _as_cupy(cupy, weights.W), out=y)
        else:
            y.fill(0)
        LAUNCHES["cupy_gemm"] += 1
        _launch_epilogue(cuda, dt, _numba_view(cuda, y), weights.b, code)
    return y.reshape(*lead, K)


def argmax_dense_cuda(x, W, b, activation=None, *, weights=None):
    """argmax over the last axis of act(x @ W + b), fused: no probabilities are written.
    x [..., D] -> int64 indices [...].  Ties go to the lowest index (NumPy's rule)."""
    cuda = _require()
    code = _dense_code(activation)
    kind = _out_kind(x)
    dt, x2, weights, lead, M, K = _dense_setup(cuda, x, W, b, weights)
    if K == 0:
        raise ValueError("argmax_dense: the kernel has K = 0 output columns")
    idx = cuda.device_array((M,), dtype=np.int64)
    if M:
        ks, rb, kt, nthr, smem = _dense_launch_cfg(dt, K)
        k = _jit(cuda, ("dense_argmax", dt.str, rb, kt), ks.argmax,
                 ks.signatures["argmax"])
        k[-(-M // rb), nthr, 0, smem](x2, weights.W, weights.b, idx, code)
        LAUNCHES["dense_argmax"] += 1
    if lead:
        return _finish(idx.reshape(*lead), kind)
    if kind == "host":
        return idx.copy_to_host().reshape(())
    return _finish(idx, kind)   # 1-D x on the device: shape (1,)


def kernel_catalog():
    """Every (name, python function, argument types) the CUDA backend compiles, for
    the default tunables and both float dtypes (used by the compile test)."""
    from .kernels import dense_cuda, gemm_cuda, lstm_bwd_cuda, lstm_cuda
    cat = []
    for dt in (np.dtype(np.float32), np.dtype(np.float64)):
        for rbb in lstm_cuda.RBB_CHOICES:
            ks = lstm_cuda.lstm_kernels(dt, rbb)
            cat.append((f"lstm_persistent[{dt.name},RBB={rbb}]", ks.persistent,
                        ks.signatures["persistent"]))
            cat.append((f"lstm_step[{dt.name},RBB={rbb}]", ks.step,
                        ks.signatures["step"]))
        ks1 = lstm_cuda.lstm_kernels(dt, 1)
        cat.append((f"transpose[{dt.name}]", ks1.transpose, ks1.signatures["transpose"]))
        cat.append((f"lstm_cell_gemm[{dt.name}]", ks1.cell_gemm,
                    ks1.signatures["cell_gemm"]))
        cat.append((f"init_state[{dt.name}]", ks1.init_state, ks1.signatures["init_state"]))
        cat.append((f"gemm[{dt.name}]", gemm_cuda.gemm_kernel(dt, GEMM_TILE, GEMM_THREADS),
                    gemm_cuda.signature(dt)))
        dk = dense_cuda.dense_kernels(dt, DENSE_ROWS_PER_BLOCK, DENSE_K_TILE)
        cat.append((f"dense[{dt.name}]", dk.dense, dk.signatures["dense"]))
        cat.append((f"dense_argmax[{dt.name}]", dk.argmax, dk.signatures["argmax"]))
        cat.append((f"dense_epilogue[{dt.name}]", dk.epilogue, dk.signatures["epilogue"]))
        tk = lstm_bwd_cuda.train_kernels(dt)
        for name in ("fwd_cell", "bwd_cell", "bwd_dh", "col_sum", "scan_h", "scan_c",
                     "swap01", "bwd_persistent", "bwd_persistent_global"):
            cat.append((f"train_{name}[{dt.name}]", getattr(tk, name),
                        tk.signatures[name]))
    return cat
