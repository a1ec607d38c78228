#!/usr/bin/env bash
# Run the tests whose gloo ranks used to abort at exit ("terminate called without an active
# exception", docs/testing.md) RUNS times in a row (default 30), with two busy loops keeping both
# cores loaded; each run's log goes to OUT_DIR. Exits non-zero if any run failed.
#   scripts/exit_stress.sh OUT_DIR [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/exit_stress.sh OUT_DIR [RUNS]}
runs=${2:-30}
mkdir -p "$out"
hogs=()
for _ in 1 2; do
  (while :; do :; done) &
  hogs+=("$!")
done
trap 'kill "${hogs[@]}"' EXIT
failed=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  status=0
  python -m pytest -q -p no:cacheprovider tests/distributed/test_final_weights.py tests/perf/test_bench_comm.py \
    tests/distributed/test_train_multirank.py -k "rank0_cpu_only or every_mesh or policy" > "$out/run$i.log" 2>&1 || status=$?
  [ "$status" -ne 0 ] && failed=$((failed + 1))
  aborts=$(grep -c "terminate called" "$out/run$i.log" || true)
  echo "run $i: exit $status, $(tail -n 1 "$out/run$i.log"), $(( $(date +%s) - start )) s, aborts $aborts"
done
echo "failed runs: $failed of $runs"
[ "$failed" -eq 0 ]
