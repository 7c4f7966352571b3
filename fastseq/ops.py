"""Public ops: ``lstm`` and ``dense``.  Argument checking, dtype/layout handling and the
choice of device happen here; the computation is in ``fastseq._cpu`` / ``fastseq._cuda``.
"""
import numpy as np

from . import _validate as v
from .kernels.activations import ACTIVATION_CODES

LSTM_ACTIVATIONS = dict(ACTIVATION_CODES)
DENSE_ACTIVATIONS = ("linear", "softmax", "log_softmax", "sigmoid", "tanh", "relu")


def _prep(fn, name, a, dtype, device):
    """Host inputs become contiguous NumPy arrays of ``dtype``; device arrays are kept
    as they are for the CUDA backend (after the dtype check)."""
    if device == "cuda" and v.is_device_array(a):
        v.dtype_of(a, fn, name)
        return a
    return v.as_host(a, fn, name, dtype)


def _x_dtype(fn, x):
    if x is None:
        raise TypeError(f"{fn}: `x` must be an array, got None")
    if v.is_device_array(x) or hasattr(x, "dtype"):
        return v.compute_dtype(v.dtype_of(x, fn, "x"))
    # nested lists and the like: numeric content is checked, the default dtype applies
    v.as_host(x, fn, "x", None)
    return v.compute_dtype(np.float32)


def lstm(x, kernel, recurrent_kernel, bias=None, *, initial_state=None, mask=None,
         return_sequences=False, return_state=False, go_backwards=False,
         zero_output_for_mask=False, activation="tanh", recurrent_activation="sigmoid",
         device="auto"):
    """LSTM over ``x`` [B, T, D] with Keras weights and semantics.

    kernel [D, 4H], recurrent_kernel [H, 4H], bias [4H] (gate order i, f, c, o);
    initial_state [h0, c0] each [B, H]; mask [B, T] bool (True = step is computed).
    Returns what ``keras.layers.LSTM`` returns: the last output [B, H], or the sequence
    [B, T, H] with ``return_sequences`` (in processing order, i.e. reversed with
    ``go_backwards``); with ``return_state``, the list ``[output, h, c]``.
    """
    a = _lstm_args("lstm", x, kernel, recurrent_kernel, bias, initial_state, mask,
                   return_sequences, go_backwards, zero_output_for_mask, activation,
                   recurrent_activation, device)
    if a["device"] == "cuda":
        from . import _cuda
        out, h, c = _cuda.lstm_cuda(*a["arrays"], **a["flags"])
    else:
        from . import _cpu
        out, h, c = _cpu.lstm_forward(*a["arrays"], **a["flags"])
    if return_state:
        return [out, h, c]
    return out


def lstm_dense(x, kernel, recurrent_kernel, bias, dense_kernel, dense_bias,
               dense_activation, *, mask=None, go_backwards=False,
               zero_output_for_mask=False, activation="tanh",
               recurrent_activation="sigmoid", device="auto"):
    """``dense(lstm(x, ..., return_sequences=True), dense_kernel, dense_bias,
    dense_activation)`` in one pass: on the CPU the Dense runs on each chunk of time
    steps as the recurrence produces it, so the [B, T, H] sequence is never stored.
    Used by ``Model`` for LSTM -> Dense taggers."""
    a = _lstm_args("lstm_dense", x, kernel, recurrent_kernel, bias, None, mask, True,
                   go_backwards, zero_output_for_mask, activation, recurrent_activation,
                   device)
    if a["device"] == "cuda":
        from . import _cuda
        y = _cuda.lstm_cuda(*a["arrays"], **a["flags"])[0]
        return dense(y, dense_kernel, dense_bias, dense_activation, device="cuda")
    fn = "lstm_dense"
    dtype = a["dtype"]
    H = a["H"]
    act = _dense_activation(fn, dense_activation, "dense_activation")
    Wd = v.as_host(dense_kernel, fn, "dense_kernel", dtype)
    v.check_rank(fn, "dense_kernel", Wd.shape, 2, "[H, K]")
    v.check_shape(fn, "dense_kernel", Wd.shape, (H, None), "[H, K] (H of the LSTM)")
    K = Wd.shape[1]
    bd = (np.zeros(K, dtype) if dense_bias is None
          else v.as_host(dense_bias, fn, "dense_bias", dtype))
    v.check_shape(fn, "dense_bias", bd.shape, (K,), "[K]")
    from . import _cpu
    return _cpu.lstm_forward(*a["arrays"], **a["flags"], epilogue=(Wd, bd, act))[0]


def _lstm_args(fn, x, kernel, recurrent_kernel, bias, initial_state, mask,
               return_sequences, go_backwards, zero_output_for_mask, activation,
               recurrent_activation, device):
    """Check and prepare the LSTM arguments (shared by lstm and lstm_dense)."""
    dev = v.resolve_device(fn, device, x, kernel, recurrent_kernel, bias, mask)
    act = v.check_choice(fn, "activation", activation, LSTM_ACTIVATIONS)
    rec = v.check_choice(fn, "recurrent_activation", recurrent_activation,
                         LSTM_ACTIVATIONS)
    dtype = _x_dtype(fn, x)
    x = _prep(fn, "x", x, dtype, dev)
    xs = v.shape_of(x)
    v.check_rank(fn, "x", xs, 3, "[B, T, D]")
    B, T, D = xs
    if T == 0:
        raise ValueError(f"{fn}: `x` must have at least one time step, got shape {xs}")
    U = _prep(fn, "recurrent_kernel", recurrent_kernel, dtype, dev)
    us = v.shape_of(U)
    v.check_rank(fn, "recurrent_kernel", us, 2, "[H, 4H]")
    H = us[0]
    if H == 0:
        raise ValueError(f"{fn}: `recurrent_kernel` must have H >= 1 rows, got {us}")
    v.check_shape(fn, "recurrent_kernel", us, (H, 4 * H), "[H, 4H]")
    W = _prep(fn, "kernel", kernel, dtype, dev)
    v.check_shape(fn, "kernel", v.shape_of(W), (D, 4 * H),
                  "[D, 4H] (D from x, H from recurrent_kernel)")
    if bias is None:
        b = np.zeros(4 * H, dtype)
    else:
        b = _prep(fn, "bias", bias, dtype, dev)
        v.check_shape(fn, "bias", v.shape_of(b), (4 * H,), "[4H]")
    h0 = c0 = None
    if initial_state is not None:
        if not isinstance(initial_state, (list, tuple)) or len(initial_state) != 2:
            got = (f"{type(initial_state).__name__} of length {len(initial_state)}"
                   if isinstance(initial_state, (list, tuple))
                   else type(initial_state).__name__)
            raise ValueError(f"{fn}: `initial_state` must be a pair [h0, c0] of arrays "
                             f"[B, H] = ({B}, {H}), got {got}")
        h0 = _prep(fn, "initial_state[0]", initial_state[0], dtype, dev)
        c0 = _prep(fn, "initial_state[1]", initial_state[1], dtype, dev)
        v.check_shape(fn, "initial_state[0]", v.shape_of(h0), (B, H), "[B, H]")
        v.check_shape(fn, "initial_state[1]", v.shape_of(c0), (B, H), "[B, H]")
    m = None
    if mask is not None:
        m = _prep_mask(fn, mask, dev)
        v.check_shape(fn, "mask", v.shape_of(m), (B, T), "[B, T]")
    flags = dict(go_backwards=bool(go_backwards), return_sequences=bool(return_sequences),
                 zero_output_for_mask=bool(zero_output_for_mask), act=act, rec=rec)
    return {"device": dev, "dtype": dtype, "H": H, "arrays": (x, W, U, b, h0, c0, m),
            "flags": flags}


def _dense_activation(fn, activation, name="activation"):
    key = "linear" if activation is None else activation
    if not isinstance(key, str) or key not in DENSE_ACTIVATIONS:
        raise ValueError(f"{fn}: unknown `{name}` {activation!r}; expected None or "
                         f"one of {list(DENSE_ACTIVATIONS)}")
    return key


def _prep_mask(fn, mask, dev):
    if dev == "cuda" and v.is_device_array(mask):
        dt = v.device_dtype(mask)
        if dt.kind not in "biu":
            raise TypeError(f"{fn}: `mask` must be bool (or integer 0/1), got dtype {dt}")
        return mask
    try:
        m = np.asarray(mask)
    except Exception:
        raise TypeError(f"{fn}: `mask` must be a bool array [B, T], got "
                        f"{type(mask).__name__}") from None
    if m.dtype.kind not in "biu":
        raise TypeError(f"{fn}: `mask` must be bool (or integer 0/1), got dtype {m.dtype}")
    return np.ascontiguousarray(m != 0)


def dense(x, kernel, bias=None, activation=None, device="auto"):
    """Dense over the last axis of ``x`` (any rank; time-distributed on [B, T, H]) with
    the activation fused: None/"linear", "softmax", "log_softmax", "sigmoid", "tanh",
    "relu".  kernel [D, K], bias [K].  Returns [..., K]."""
    fn = "dense"
    dev = v.resolve_device(fn, device, x, kernel, bias)
    key = _dense_activation(fn, activation)
    dtype = _x_dtype(fn, x)
    x = _prep(fn, "x", x, dtype, dev)
    xs = v.shape_of(x)
    if len(xs) < 1:
        raise ValueError(f"{fn}: `x` must have at least 1 dimension [..., D], got a scalar")
    D = xs[-1]
    W = _prep(fn, "kernel", kernel, dtype, dev)
    ws = v.shape_of(W)
    v.check_rank(fn, "kernel", ws, 2, "[D, K]")
    v.check_shape(fn, "kernel", ws, (D, None), "[D, K] (D = last axis of x)")
    K = ws[1]
    if bias is None:
        b = np.zeros(K, dtype)
    else:
        b = _prep(fn, "bias", bias, dtype, dev)
        v.check_shape(fn, "bias", v.shape_of(b), (K,), "[K]")
    if dev == "cuda":
        from . import _cuda
        return _cuda.dense_cuda(x, W, b, key)
    from . import _cpu
    y = _cpu.dense_forward(x.reshape(int(np.prod(xs[:-1])), D), W, b, key)
    return y.reshape(xs[:-1] + (K,))
