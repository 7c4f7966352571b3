"""Thread count for the CPU backend: Numba's parallel kernels and the BLAS GEMMs."""
import numba


def set_num_threads(n):
    """Use ``n`` threads in the CPU kernels and in the BLAS GEMMs they call.

    ``n`` may not exceed Numba's pool size (``NUMBA_NUM_THREADS``, default: all cores).
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: `n` must be an int, got {type(n).__name__}")
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(f"set_num_threads: `n` must be in [1, {limit}] "
                         f"(NUMBA_NUM_THREADS), got {n}")
    numba.set_num_threads(n)
    _blas_limits(n)


def get_num_threads():
    """Threads the CPU kernels use now."""
    return numba.get_num_threads()


def _blas_limits(n):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it only Numba's threads are limited
        return
    threadpool_limits(limits=n, user_api="blas")
