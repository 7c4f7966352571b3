"""Argument checking for the public API.  Every error names the argument, what was
expected and what was received, so a user never sees a Numba typing error."""
import numpy as np

from ._cuda import is_device_array as _is_dev  # imports no CUDA module


def is_device_array(a):
    """True for CuPy / Numba device arrays (anything with ``__cuda_array_interface__``,
    and the CUDA simulator's arrays).  Imports no CUDA module."""
    return _is_dev(a)


def device_dtype(a):
    """dtype of a device array, from ``.dtype`` or the CUDA array interface."""
    if hasattr(a, "dtype"):
        return np.dtype(a.dtype)
    return np.dtype(a.__cuda_array_interface__["typestr"])


def shape_of(a):
    return tuple(int(n) for n in a.shape)


def dtype_of(a, fn, name):
    """The NumPy dtype of ``a`` (host or device array), checked to be real numeric."""
    if is_device_array(a):
        dt = device_dtype(a)
    else:
        dt = np.asarray(a).dtype if not hasattr(a, "dtype") else np.dtype(a.dtype)
    if dt.kind not in "biuf":
        raise TypeError(
            f"{fn}: `{name}` must hold real numbers (bool, int or float), got dtype {dt}")
    return dt


def compute_dtype(x_dtype):
    """float64 input computes in float64; every other numeric input in float32."""
    return np.dtype(np.float64) if np.dtype(x_dtype) == np.float64 else np.dtype(np.float32)


def as_host(a, fn, name, dtype):
    """Contiguous NumPy copy/view of ``a`` in ``dtype`` after the numeric check."""
    try:
        arr = np.asarray(a)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{fn}: `{name}` must be an array of numbers, got "
                        f"{type(a).__name__} ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"{fn}: `{name}` must hold real numbers (bool, int or float), got dtype "
            f"{arr.dtype}")
    # np.asarray with order='C' keeps a 0-d input 0-d (np.ascontiguousarray makes it
    # 1-d, and the error would then blame the wrong argument or shape)
    return np.asarray(arr, dtype=dtype, order="C")


def check_shape(fn, name, shape, expected, meaning):
    """``expected`` is a tuple of ints/None (None = any); ``meaning`` like '[D, 4H]'."""
    ok = len(shape) == len(expected) and all(
        e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = "(" + ", ".join("?" if e is None else str(e) for e in expected) + (
            ",)" if len(expected) == 1 else ")")
        raise ValueError(
            f"{fn}: `{name}` must have shape {meaning} = {want}, got {shape}")


def check_rank(fn, name, shape, rank, meaning):
    if len(shape) != rank:
        raise ValueError(
            f"{fn}: `{name}` must be {rank}-D with shape {meaning}, got shape {shape} "
            f"({len(shape)}-D)")


def check_choice(fn, name, value, choices):
    key = "linear" if value is None else value
    if not isinstance(key, str) or key not in choices:
        raise ValueError(
            f"{fn}: unknown `{name}` {value!r}; expected one of "
            f"{sorted(set(choices) | {'None'}) if 'linear' in choices else sorted(choices)}")
    return choices[key]


def check_device(fn, device):
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{fn}: `device` must be 'auto', 'cpu' or 'cuda', got {device!r}")


def resolve_device(fn, device, *arrays):
    check_device(fn, device)
    if device == "auto":
        return "cuda" if any(is_device_array(a) for a in arrays if a is not None) else "cpu"
    return device


# --- command-line values (argparse ``type=`` functions: a bad value becomes a usage
# error that names the option and the value, never a traceback later on) -------------
def _cli_number(parse, ok, what):
    import argparse
    import math

    def convert(text):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    convert.__name__ = what     # argparse names the type in some messages
    return convert


positive_int = _cli_number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _cli_number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _cli_number(float, lambda v: v > 0, "a finite number > 0")


def writable_path(text):
    """An output file path whose folder exists (checked before a long run, not after)."""
    import argparse
    import os
    folder = os.path.dirname(os.path.abspath(text)) or "."
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder!r} of {text!r} does not "
                                         f"exist")
    return text
