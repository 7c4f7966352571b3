"""Instruction counts in the sm_90 PTX of fastseq's persistent CUDA kernels, compiled
on the CPU with ``numba.cuda.compile_ptx`` (no GPU needed; numba-cuda with NVVM, e.g.
``numba-cuda[cu13]``).  For comparing revisions' code without timing it:

    python bench/ptx_counts.py [ROOT]        # ROOT: a checkout (default: this one)

Prints, per kernel, the 64-bit integer div/rem count and the counts of a few opcodes
(bra, ex2, div.rn, fma)."""
import collections
import os
import re
import sys


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                           os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, root)
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda

    class _Device:                       # compile for sm_90 without a device
        compute_capability = (9, 0)

    dispatcher.get_current_device = lambda: _Device()
    from fastseq import _cuda
    for name, fn, sig in _cuda.kernel_catalog():
        if "persistent" not in name or "float64" in name:
            continue
        ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
        ops = collections.Counter(
            m.group(1) for m in re.finditer(r"^\s+(?:@!?%p\d+\s+)?([a-z][\w]*)", ptx, re.M))
        div64 = len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx))
        print(f"{name:40s} div/rem.64 {div64:3d}  bra {ops['bra']:4d}  "
              f"ex2 {ptx.count('ex2.')}  div.rn {ptx.count('div.rn')}  "
              f"fma {ops['fma']}")


if __name__ == "__main__":
    main()
