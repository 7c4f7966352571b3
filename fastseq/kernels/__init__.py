"""Numba kernels (CPU: ``*_cpu``; CUDA: ``*_cuda``).  No argument checking here: the
public API in ``fastseq.ops`` validates shapes and dtypes before calling a kernel."""
