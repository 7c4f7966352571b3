"""Optimizers for training fastseq models, with Keras 3's update rules and defaults.

The update of each optimizer is the one Keras 3 applies (``keras/src/optimizers``), in
the dtype of the weight, on NumPy arrays updated **in place**::

    opt = optimizers.Adam(learning_rate=1e-3)
    opt.apply(grads, weights)        # weights: list of arrays, changed in place

Order of one ``apply`` (as in Keras's ``BaseOptimizer.apply``): gradients that are None
are skipped; gradients are clipped (``clipnorm`` per gradient, ``global_clipnorm`` over
all, or ``clipvalue``; at most one of them); weight decay ``w -= w * weight_decay * lr``;
the update rule; ``iterations += 1``.

An embedding gradient may be given as :class:`SparseRows` (one row per token occurrence,
duplicates allowed), which is what TensorFlow hands Keras's optimizer for an
``Embedding`` layer (``tf.IndexedSlices``).  Clipping then works on the occurrence rows,
as TensorFlow does (the norm of a SparseRows gradient is the norm of its rows, not of
the summed dense gradient).  The update uses the dense sum of the rows, except Adam's
second moment: Keras on TensorFlow squares IndexedSlices row by row, so ``v`` receives
the sum of the squared rows of each index (not the square of their sum).
"""
import concurrent.futures
import numbers
import os

import numpy as np
from numba import njit

from . import config

__all__ = ["SparseRows", "Optimizer", "Adam", "SGD", "get", "from_keras"]

# Keras holds the learning rate in a variable of dtype backend.floatx() (float32 unless
# changed), and the constants its update rules pass through ``ops.cast`` (Adam's beta_1
# and beta_2 in the bias correction, SGD's momentum, the weight decay) become floatx
# tensors first: a float64 weight sees them rounded to float32.  Set to np.float64 to
# match Keras run with floatx "float64".
KERAS_FLOATX = np.float32


def _cast(value, dtype):
    """A Python constant as Keras's ``ops.cast(value, dtype)`` gives it."""
    return np.dtype(dtype).type(KERAS_FLOATX(value))


class SparseRows:
    """Row-sparse gradient of a [V, E] weight: ``values[n]`` is added at row
    ``indices[n]``; indices may repeat (their rows add up).

    indices: [N] integer;  values: [N, E];  dense_shape: (V, E)
    """

    def __init__(self, indices, values, dense_shape):
        self.indices = np.asarray(indices).reshape(-1)
        self.values = np.asarray(values)
        self.dense_shape = tuple(int(d) for d in dense_shape)
        if self.values.ndim != 2 or len(self.values) != len(self.indices) or \
                len(self.dense_shape) != 2 or self.values.shape[1] != self.dense_shape[1]:
            raise ValueError(f"SparseRows: `values` must be [N, E] with N = len(indices) "
                             f"and E = dense_shape[1]; got indices {self.indices.shape}, "
                             f"values {self.values.shape}, dense_shape {self.dense_shape}")

    @property
    def shape(self):
        return self.dense_shape

    @property
    def dtype(self):
        return self.values.dtype

    def to_dense(self, dtype=None, square=False):
        """The dense [V, E] gradient (duplicates summed); with ``square``, the sum of
        the squared rows at each index instead."""
        out = np.zeros(self.dense_shape, dtype or self.values.dtype)
        vals = np.ascontiguousarray(self.values, dtype=out.dtype)
        if len(vals):
            _scatter_add(np.ascontiguousarray(self.indices, dtype=np.int64), vals, out,
                         bool(square))
        return out

    def with_values(self, values):
        return SparseRows(self.indices, values, self.dense_shape)

    def __repr__(self):
        return (f"SparseRows({len(self.indices)} rows of a {self.dense_shape} gradient, "
                f"{self.values.dtype})")


@njit(cache=True, nogil=True, error_model="numpy")
def _scatter_add(ids, rows, out, square):
    """out[ids[n]] += rows[n] (or rows[n]**2 with square).
    ids: [N];  rows: [N, E];  out: [V, E] (in place)."""
    N, E = rows.shape
    for n in range(N):
        k = ids[n]
        if square:
            for j in range(E):
                out[k, j] += rows[n, j] * rows[n, j]
        else:
            for j in range(E):
                out[k, j] += rows[n, j]


@njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _adam_block(w, g, g2, m, v, vhat, c1, c2, alpha, eps, amsgrad, has_g2):
    """One block of the Adam update, in three simple loops that vectorise (few arrays
    per loop).  All arguments as in _adam_kernel, 1-D views of equal length."""
    n = w.shape[0]
    for j in range(n):
        m[j] = m[j] + (g[j] - m[j]) * c1
    if has_g2:
        for j in range(n):
            v[j] = v[j] + (g2[j] - v[j]) * c2
    else:
        for j in range(n):
            v[j] = v[j] + (g[j] * g[j] - v[j]) * c2
    if amsgrad:
        for j in range(n):
            if v[j] > vhat[j]:
                vhat[j] = v[j]
        for j in range(n):
            w[j] -= (m[j] * alpha) / (np.sqrt(vhat[j]) + eps)
    else:
        for j in range(n):
            w[j] -= (m[j] * alpha) / (np.sqrt(v[j]) + eps)


@njit(cache=True, nogil=True, error_model="numpy")
def _adam_kernel(w, g, g2, m, v, vhat, c1, c2, alpha, eps, amsgrad, has_g2):
    """Keras 3 Adam on flat arrays, in place, block by block::

        m += (g - m) c1;  v += (g^2 - v) c2;  w -= m alpha / (sqrt(v) + eps)

    w, g, m, v: [N] weight, gradient, first and second moments
    g2: [N] the "squared gradient" when has_g2, else unused ([0])
    vhat: [N] running max of v (amsgrad) or [0]
    c1, c2: 1 - beta_1, 1 - beta_2;  alpha: lr sqrt(1 - beta_2^t) / (1 - beta_1^t)
    """
    N = w.shape[0]
    blk = 512
    for lo in range(0, N, blk):
        hi = min(N, lo + blk)
        _adam_block(w[lo:hi], g[lo:hi], g2[lo:hi] if has_g2 else g2,
                    m[lo:hi], v[lo:hi], vhat[lo:hi] if amsgrad else vhat,
                    c1, c2, alpha, eps, amsgrad, has_g2)


@njit(cache=True, nogil=True, error_model="numpy")
def _sum_rows(ids, rows, slot, gsum, g2sum):
    """Per distinct index, the sum of its gradient rows and of their squares.

    ids: [N] row indices (repeats allowed);  rows: [N, E]
    slot: [V] int64, -1 on entry; written: slot[k] = position of index k in gsum/g2sum
    gsum, g2sum: [N, E] written (the first n_distinct rows); returns n_distinct
    """
    E = rows.shape[1]
    n_u = 0
    for n in range(ids.shape[0]):
        k = ids[n]
        s = slot[k]
        if s < 0:
            s = n_u
            slot[k] = s
            n_u += 1
            for j in range(E):
                gsum[s, j] = 0
                g2sum[s, j] = 0
        for j in range(E):
            r = rows[n, j]
            gsum[s, j] += r
            g2sum[s, j] += r * r
    return n_u


@njit(cache=True, nogil=True, error_model="numpy")
def _adam_rows_kernel(w, m, v, vhat, slot, gsum, g2sum, zeros, lo, hi, c1, c2, alpha,
                      eps, amsgrad):
    """Keras 3 Adam on rows [lo, hi) of a [V, E] weight whose gradient is row-sparse
    (summed by _sum_rows), in place, without forming the dense gradient: rows without
    gradient are updated too, as the dense update does (with a zero gradient, and a
    run of such rows as one flat stretch, in blocks of ``len(zeros)``).

    w, m, v: [V, E] weight and moments (C-contiguous);  vhat: [V, E] (amsgrad) or [1, E]
    slot, gsum, g2sum: from _sum_rows;  zeros: [Z] zeros, Z >= E
    c1, c2, alpha, eps, amsgrad: as in _adam_kernel
    """
    E = w.shape[1]
    Z = zeros.shape[0]
    wf = w.reshape(-1)
    mf = m.reshape(-1)
    vf = v.reshape(-1)
    hf = vhat.reshape(-1)
    k = lo
    while k < hi:
        s = slot[k]
        if s >= 0:
            _adam_block(w[k], gsum[s], g2sum[s], m[k], v[k],
                        vhat[k] if amsgrad else vhat[0], c1, c2, alpha, eps, amsgrad,
                        True)
            k += 1
            continue
        k1 = k + 1
        while k1 < hi and slot[k1] < 0:
            k1 += 1
        for a in range(k * E, k1 * E, Z):
            b = min(k1 * E, a + Z)
            n = b - a
            _adam_block(wf[a:b], zeros[:n], zeros[:n], mf[a:b], vf[a:b],
                        hf[a:b] if amsgrad else vhat[0], c1, c2, alpha, eps, amsgrad,
                        True)
        k = k1


_POOL = None
_SIDE = None


def _forget_pool():
    """In a forked child: the parent's pool threads do not exist there."""
    global _POOL, _SIDE
    _POOL = None
    _SIDE = None


def _side_executor():
    """The one-thread executor that runs the dense variables' updates beside the
    row-sparse ones (``_split_beside``)."""
    global _SIDE
    if _SIDE is None:
        _SIDE = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastseq-opt1")
    return _SIDE


def _split_beside(work):
    """(beside, here): the (i, g, v) updates to run on another thread and the ones to
    run on this thread.  With two threads allowed, a step that has both row-sparse
    gradients (an Embedding's) and dense ones of at least
    config.OPTIMIZER_BESIDE_MIN_ITEMS elements in all runs the dense ones beside: the
    row-sparse update of a large embedding streams its weight and both moments through
    memory, which the dense updates (small, mostly in cache) then overlap."""
    from ._threads import get_num_threads
    dense = [u for u in work if not isinstance(u[1], SparseRows)]
    if (len(dense) == len(work) or not dense or get_num_threads() < 2
            or sum(u[2].size for u in dense) < config.OPTIMIZER_BESIDE_MIN_ITEMS):
        return [], work
    return dense, [u for u in work if isinstance(u[1], SparseRows)]


os.register_at_fork(after_in_child=_forget_pool)


def _parallel(fn, n_items, min_items=None):
    """Run ``fn(lo, hi)`` over [0, n_items) in chunks on fastseq's threads (the
    kernels release the GIL), at least ``min_items`` per thread (default
    config.OPTIMIZER_MIN_ITEMS_PER_THREAD); smaller sizes run inline."""
    global _POOL
    from ._threads import get_num_threads
    if min_items is None:
        min_items = config.OPTIMIZER_MIN_ITEMS_PER_THREAD
    n = max(1, min(get_num_threads(), n_items // max(1, int(min_items))))
    if n == 1:
        fn(0, n_items)
        return
    if _POOL is None or _POOL._max_workers < n:
        _POOL = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="fastseq-opt")
    futs = [_POOL.submit(fn, i * n_items // n, (i + 1) * n_items // n) for i in range(n)]
    for f in futs:
        f.result()


def _check_positive(fn, name, value, allow_none=True, allow_zero=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        what = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{fn}: `{name}` must be {what} number"
                         f"{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


class Optimizer:
    """Base class: clipping, weight decay, slots and the iteration counter.

    learning_rate: a positive float (learning-rate schedules are not supported).
    weight_decay, clipnorm, clipvalue, global_clipnorm: as in Keras (None = off).
    """

    _name = "optimizer"

    def __init__(self, learning_rate, *, weight_decay=None, clipnorm=None, clipvalue=None,
                 global_clipnorm=None, name=None):
        fn = type(self).__name__
        if callable(learning_rate) or isinstance(learning_rate, dict):
            raise ValueError(f"{fn}: learning-rate schedules are not supported; pass a "
                             f"float `learning_rate`")
        self.learning_rate = _check_positive(fn, "learning_rate", learning_rate,
                                             allow_none=False)
        self.weight_decay = _check_positive(fn, "weight_decay", weight_decay,
                                            allow_zero=True)
        self.clipnorm = _check_positive(fn, "clipnorm", clipnorm, allow_zero=True)
        self.clipvalue = _check_positive(fn, "clipvalue", clipvalue, allow_zero=True)
        self.global_clipnorm = _check_positive(fn, "global_clipnorm", global_clipnorm,
                                               allow_zero=True)
        if sum(a is not None for a in (clipnorm, clipvalue, global_clipnorm)) > 1:
            raise ValueError(f"{fn}: only one of `clipnorm`, `clipvalue` and "
                             f"`global_clipnorm` can be set; got clipnorm={clipnorm}, "
                             f"clipvalue={clipvalue}, global_clipnorm={global_clipnorm}")
        self.name = name or self._name
        self.iterations = 0
        self._shapes = None
        self._slots = None

    # -- public ---------------------------------------------------------------------
    def apply(self, grads, variables):
        """Update ``variables`` (NumPy arrays, in place) with ``grads`` (arrays,
        :class:`SparseRows` or None, one per variable)."""
        fn = f"{type(self).__name__}.apply"
        grads, variables = list(grads), list(variables)
        if len(grads) != len(variables):
            raise ValueError(f"{fn}: got {len(grads)} gradients for {len(variables)} "
                             f"variables")
        for i, (g, v) in enumerate(zip(grads, variables)):
            if not isinstance(v, np.ndarray) or v.dtype.kind != "f":
                raise TypeError(f"{fn}: variable {i} must be a float NumPy array, got "
                                f"{type(v).__name__}")
            if g is not None and tuple(g.shape) != v.shape:
                raise ValueError(f"{fn}: gradient {i} has shape {tuple(g.shape)}, its "
                                 f"variable {v.shape}")
        self._build(variables)
        pairs = [(i, g, v) for i, (g, v) in enumerate(zip(grads, variables))
                 if g is not None]
        if not pairs:
            raise ValueError(f"{fn}: no gradients provided for any variable")
        idx, gs, vs = zip(*pairs)
        gs = self._clip([_as_dtype(g, v.dtype) for g, v in zip(gs, vs)])
        if self.weight_decay is not None:
            for v in vs:
                wd = _cast(self.weight_decay, v.dtype)
                lr = _cast(self.learning_rate, v.dtype)
                v -= v * wd * lr
        step = self.iterations + 1
        beside, here = _split_beside(list(zip(idx, gs, vs)))
        fut = None
        if beside:
            # the dense variables' updates on another thread while this one updates the
            # row-sparse ones: each variable's update is independent of the others
            fut = _side_executor().submit(
                lambda: [self._update(i, g, v, step) for i, g, v in beside])
        try:
            for i, g, v in here:
                self._update(i, g, v, step)
        finally:
            if fut is not None:
                # never return (nor unwind) while the other thread still writes
                concurrent.futures.wait([fut])
        if fut is not None:
            fut.result()
        self.iterations += 1

    def get_config(self):
        return {"name": self.name, "learning_rate": self.learning_rate,
                "weight_decay": self.weight_decay, "clipnorm": self.clipnorm,
                "global_clipnorm": self.global_clipnorm, "clipvalue": self.clipvalue}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items()
                         if v is not None and k != "name")
        return f"{type(self).__name__}({args})"

    # -- internals ------------------------------------------------------------------
    def _build(self, variables):
        shapes = [(v.shape, v.dtype) for v in variables]
        if self._shapes is None:
            self._shapes = shapes
            self._slots = [self._make_slots(v) for v in variables]
        elif shapes != self._shapes:
            raise ValueError(f"{type(self).__name__}.apply: the variables differ from the "
                             f"ones this optimizer was built for ({len(self._shapes)} "
                             f"variables); use a new optimizer for another model")

    def _make_slots(self, v):
        return {}


    def _update(self, i, g, v, step):
        """Update variable ``v`` (slot ``i``) with gradient ``g`` (array or SparseRows)
        at iteration ``step`` (1-based)."""
        raise NotImplementedError

    def _clip(self, grads):
        if self.clipnorm:
            return [_clip_by_norm(g, self.clipnorm) for g in grads]
        if self.global_clipnorm:
            return _clip_by_global_norm(grads, self.global_clipnorm)
        if self.clipvalue:
            c = self.clipvalue
            return [g.with_values(np.clip(g.values, -c, c)) if isinstance(g, SparseRows)
                    else np.clip(g, -c, c) for g in grads]
        return grads


def _as_dtype(g, dtype):
    if isinstance(g, SparseRows):
        return g if g.values.dtype == dtype else g.with_values(g.values.astype(dtype))
    return np.asarray(g, dtype=dtype)


def _clip_by_norm(g, clip):
    """TensorFlow's clip_by_norm: g * clip / max(||g||, clip) (rows of a SparseRows)."""
    vals = g.values if isinstance(g, SparseRows) else g
    dt = vals.dtype.type
    l2sum = np.sum(np.square(vals))
    l2norm = np.sqrt(l2sum) if l2sum > 0 else l2sum
    out = (vals * dt(clip)) / np.maximum(l2norm, dt(clip))
    return g.with_values(out) if isinstance(g, SparseRows) else out


def _clip_by_global_norm(grads, clip):
    """Keras's clip_by_global_norm: every gradient times
    clip * min(1 / norm, 1 / clip), norm over all gradients (NaN for a non-finite norm).
    The norm of a SparseRows counts its rows; scaling makes it dense (TensorFlow turns
    IndexedSlices times a tensor into a dense tensor, duplicates summed)."""
    vals = [g.values if isinstance(g, SparseRows) else g for g in grads]
    sq = np.sum(np.stack([np.sum(np.square(v)) for v in vals]))
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.sqrt(sq)
        dt = norm.dtype.type
        scale = dt(clip) * np.minimum(dt(1) / norm, dt(1) / dt(clip)) + (norm - norm)
    return [g.to_dense() * scale if isinstance(g, SparseRows) else g * scale
            for g in grads]


class Adam(Optimizer):
    """Adam with Keras 3's defaults and update::

        alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)      (t = iterations + 1)
        m += (g - m) * (1 - beta_1);  v += (g^2 - v) * (1 - beta_2)
        w -= m * alpha / (sqrt(v) + epsilon)                   (v_hat = max(v_hat, v)
                                                                 in place of v: amsgrad)
    """

    _name = "adam"

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 amsgrad=False, **kwargs):
        super().__init__(learning_rate, **kwargs)
        for name, b in (("beta_1", beta_1), ("beta_2", beta_2)):
            if isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0 <= b < 1:
                raise ValueError(f"Adam: `{name}` must be a number in [0, 1), got {b!r}")
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = _check_positive("Adam", "epsilon", epsilon, allow_none=False,
                                       allow_zero=True)
        self.amsgrad = bool(amsgrad)

    def _make_slots(self, v):
        # C-contiguous whatever the variable's layout: the kernels run on flat memory
        s = {"m": np.zeros(v.shape, v.dtype), "v": np.zeros(v.shape, v.dtype)}
        if self.amsgrad:
            s["vhat"] = np.zeros(v.shape, v.dtype)
        return s

    def _update(self, i, g, v, step):
        if not v.flags.c_contiguous:
            # the kernels need C-contiguous memory (a Fortran-ordered or strided
            # variable): update a C-contiguous copy, then write it back
            w = np.ascontiguousarray(v)
            self._update(i, g, w, step)
            v[...] = w
            return
        dt = v.dtype.type
        s = self._slots[i]
        b1p = _cast(self.beta_1, v.dtype) ** dt(step)
        b2p = _cast(self.beta_2, v.dtype) ** dt(step)
        alpha = _cast(self.learning_rate, v.dtype) * np.sqrt(dt(1) - b2p) / (dt(1) - b1p)
        if isinstance(g, SparseRows):
            # Keras squares TensorFlow's IndexedSlices row by row: v sees the sum of the
            # squared rows of each index, m the sum of the rows
            if "slot" not in s:
                s["slot"] = np.full(v.shape[0], -1, np.int64)
            V, E = v.shape
            ids = np.ascontiguousarray(g.indices, dtype=np.int64)
            gsum = np.empty((len(ids), E), v.dtype)
            g2sum = np.empty((len(ids), E), v.dtype)
            slot = s["slot"]
            rows = np.ascontiguousarray(g.values, dtype=v.dtype)
            vh = s["vhat"] if self.amsgrad else np.zeros((1, E), v.dtype)
            zeros = np.zeros(max(E, 512), v.dtype)
            try:
                # inside the try: an interrupt as _sum_rows returns must not leave
                # slot entries behind (the next step would read stale gsum rows)
                _sum_rows(ids, rows, slot, gsum, g2sum)
                _parallel(lambda lo, hi: _adam_rows_kernel(
                    v, s["m"], s["v"], vh, slot, gsum, g2sum, zeros, lo, hi,
                    dt(1 - self.beta_1), dt(1 - self.beta_2), dt(alpha), dt(self.epsilon),
                    self.amsgrad), V, max(1, config.OPTIMIZER_MIN_ITEMS_PER_THREAD // E))
            finally:
                slot[ids] = -1
            return
        g2 = np.zeros(0, v.dtype)  # dense gradient: v sees g^2
        flat = v.reshape(-1)
        if not np.shares_memory(flat, v):  # pragma: no cover - weights are contiguous
            raise ValueError("Adam: weights must be contiguous arrays")
        vhat = s["vhat"].reshape(-1) if self.amsgrad else np.zeros(0, v.dtype)
        gf, m, vv = np.ascontiguousarray(g).reshape(-1), s["m"].reshape(-1), \
            s["v"].reshape(-1)
        _parallel(lambda lo, hi: _adam_kernel(
            flat[lo:hi], gf[lo:hi], g2, m[lo:hi], vv[lo:hi],
            vhat[lo:hi] if self.amsgrad else vhat, dt(1 - self.beta_1),
            dt(1 - self.beta_2), dt(alpha), dt(self.epsilon), self.amsgrad, False),
            flat.size)

    def get_config(self):
        c = super().get_config()
        c.update(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon,
                 amsgrad=self.amsgrad)
        return c


class SGD(Optimizer):
    """SGD with Keras 3's defaults and update::

        momentum == 0:  w -= g * lr
        else:           m = m * momentum - g * lr
                        w += m        (nesterov: w += m * momentum - g * lr)
    """

    _name = "SGD"

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, **kwargs):
        super().__init__(learning_rate, **kwargs)
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or \
                not 0 <= momentum <= 1:
            raise ValueError(f"SGD: `momentum` must be a number in [0, 1], got "
                             f"{momentum!r}")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def _make_slots(self, v):
        return {"m": np.zeros_like(v)} if self.momentum != 0 else {}

    def _update(self, i, g, v, step):
        lr = _cast(self.learning_rate, v.dtype)
        if isinstance(g, SparseRows):
            g = g.to_dense(v.dtype)
        if self.momentum == 0:
            v -= g * lr
            return
        mom = _cast(self.momentum, v.dtype)
        m = self._slots[i]["m"]
        m[...] = m * mom - g * lr
        if self.nesterov:
            v += m * mom - g * lr
        else:
            v += m

    def get_config(self):
        c = super().get_config()
        c.update(momentum=self.momentum, nesterov=self.nesterov)
        return c


_CLASSES = {"adam": Adam, "sgd": SGD}


def get(identifier):
    """An optimizer from a name ("adam", "sgd"), a config dict ``{"class_name": ...,
    "config": {...}}``, a Keras optimizer (its class and configuration, see
    :func:`from_keras`), or a fastseq Optimizer (returned as is)."""
    if isinstance(identifier, Optimizer):
        return identifier
    if _is_keras_optimizer(identifier):
        return from_keras(identifier)
    if isinstance(identifier, str):
        cls = _CLASSES.get(identifier.lower())
        if cls is None:
            raise ValueError(f"optimizers.get: unknown optimizer {identifier!r}; "
                             f"supported: {sorted(_CLASSES)}")
        return cls()
    if isinstance(identifier, dict) and "class_name" in identifier:
        cls = _CLASSES.get(str(identifier["class_name"]).lower())
        if cls is None:
            raise ValueError(f"optimizers.get: unknown optimizer class "
                             f"{identifier['class_name']!r}; supported: {sorted(_CLASSES)}")
        return cls.from_config(dict(identifier.get("config", {})))
    raise TypeError(f"optimizers.get: expected an optimizer name, config dict, fastseq "
                    f"Optimizer or Keras optimizer, got {type(identifier).__name__}")


def _is_keras_optimizer(obj):
    """Whether ``obj`` is a Keras optimizer (without importing Keras)."""
    return any(c.__module__.split(".")[0] == "keras" and c.__name__ == "Optimizer"
               for c in type(obj).__mro__)


def from_keras(keras_optimizer):
    """The fastseq optimizer with the class and configuration of a Keras 3 optimizer (or
    of ``keras_model.optimizer`` when given a compiled Keras model).  The optimizer's
    state (moments, iteration count) is not copied."""
    opt = getattr(keras_optimizer, "optimizer", None)
    if opt is not None and hasattr(keras_optimizer, "compile"):
        keras_optimizer = opt
    if not hasattr(keras_optimizer, "get_config"):
        raise TypeError(f"optimizers.from_keras: expected a Keras optimizer or a compiled "
                        f"Keras model, got {type(keras_optimizer).__name__}")
    kind = type(keras_optimizer).__name__
    cls = _CLASSES.get(kind.lower())
    if cls is None:
        raise ValueError(f"optimizers.from_keras: Keras optimizer {kind} is not supported; "
                         f"supported: Adam, SGD")
    cfg = dict(keras_optimizer.get_config())
    if cfg.get("use_ema"):
        raise ValueError("optimizers.from_keras: use_ema=True is not supported")
    if cfg.get("loss_scale_factor") is not None:
        raise ValueError("optimizers.from_keras: loss_scale_factor is not supported")
    if cfg.get("gradient_accumulation_steps"):
        raise ValueError("optimizers.from_keras: gradient_accumulation_steps is not "
                         "supported")
    lr = cfg.get("learning_rate")
    if isinstance(lr, dict) or not isinstance(lr, numbers.Real):
        raise ValueError(f"optimizers.from_keras: the optimizer's learning rate is a "
                         f"schedule ({lr!r}); only a constant learning rate is supported")
    keep = {"learning_rate", "weight_decay", "clipnorm", "clipvalue", "global_clipnorm",
            "name"}
    keep |= {"beta_1", "beta_2", "epsilon", "amsgrad"} if cls is Adam else \
        {"momentum", "nesterov"}
    kwargs = {k: cfg[k] for k in keep if k in cfg}
    for k in ("weight_decay", "clipnorm", "clipvalue", "global_clipnorm"):
        if kwargs.get(k) is not None and kwargs[k] <= 0:
            kwargs[k] = None  # Keras ignores non-positive values
    return cls(**kwargs)
