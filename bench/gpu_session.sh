#!/usr/bin/env bash
# One device call for a lent GPU: bench/gpu_check.sh (correctness and timings against
# cuDNN, with the untimed modes in its tunables), then, when old/ holds an earlier
# checkout's fastseq/ package, bench/gpu_train_ab.py old . (lstm_vjp of both, same card).
# Before the call, on the development machine:
#     bash bench/gpu_wheels.sh
#     mkdir -p old && git archive REV fastseq | tar -x -C old     # optional A/B
# then run this with ".whl" and "old" in the call's carry (gpu_wheels.sh keeps both
# out of git).
# Arguments go to bench/gpu_check.sh (e.g. --budget 300).  Everything lands in $OUT.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export OUT
bash bench/gpu_check.sh "$@" > "$OUT/gpu_check.stdout" 2>&1
rc=$?
grep -a "all checks passed\|^ERROR" "$OUT/gpu_check.stdout"
python bench/gpu_table.py "$OUT/gpu_check.json" 2>&1 | tail -20
if [ -d old/fastseq ]; then
    export PYTHONPATH=/tmp/site PYTHONWARNINGS=ignore
    timeout 240 python bench/gpu_train_ab.py old . 2>&1 | tee "$OUT/ab.log"
fi
exit "$rc"
