#!/usr/bin/env bash
# Download, on the development machine, the wheels bench/gpu_check.sh installs on the lent
# GPU machine (which has no network): NumPy 2.4.6 for CPython 3.12, because numba-cuda
# 0.30.4 on that image cannot compile kernels under its NumPy 2.5.  They go to .whl/,
# which this script adds to .git/info/exclude (keep it out of commits); name .whl in the
# device call's carry.
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# old/: an earlier checkout's fastseq/ for bench/gpu_session.sh's A/B
grep -qx '/old/' .git/info/exclude 2>/dev/null || echo '/old/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl numpy==2.4.6
ls -l .whl
