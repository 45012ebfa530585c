#!/usr/bin/env bash
# Run the numeric tests under every CPU kernel set x torch thread count and print a pass/fail table.
#
#   tools/test_matrix.sh                        # -m "numeric and not slow", capabilities default avx2 avx512, 1 and 2 threads
#   CAPS="default" THREADS="1" tools/test_matrix.sh tests/test_quant_train8.py   # one cell, chosen tests
#
# ATEN_CPU_CAPABILITY makes torch take its kernels for that instruction set (a different summation order and
# FMA use), which is how to try other CPUs on one machine. A capability the CPU lacks falls back to a lower one;
# the table then shows what torch used. Exits non-zero if any cell fails. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
CAPS="${CAPS:-default avx2 avx512}"
THREADS="${THREADS:-1 2}"
MARK="${MARK:-numeric and not slow}"
LOGS="$(mktemp -d)"
fail=0
rows=()
for cap in $CAPS; do
  for t in $THREADS; do
    used="$(ATEN_CPU_CAPABILITY="$cap" "$PY" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')"
    log="$LOGS/${cap}-${t}.log"
    start=$SECONDS
    ATEN_CPU_CAPABILITY="$cap" THRIFTY_TEST_THREADS="$t" OMP_NUM_THREADS="$t" MKL_NUM_THREADS="$t" \
      "$PY" -m pytest -q -p no:cacheprovider -m "$MARK" "$@" >"$log" 2>&1
    rc=$?
    summary="$(grep -E '[0-9]+ (passed|failed|deselected|errors?)|no tests ran' "$log" | tail -1 | tr -d '=' | xargs)"
    case $rc in
      0) status=pass ;;
      5) status="FAIL (no tests collected)"; fail=1 ;;
      *) status=FAIL; fail=1 ;;
    esac
    rows+=("$(printf '%-10s %-10s %-7s %-26s %5ss  %s' "$cap" "$used" "$t" "$status" $((SECONDS - start)) "$summary")")
  done
done
printf '%-10s %-10s %-7s %-26s %6s  %s\n' ATEN_CPU torch threads result time pytest
printf '%s\n' "${rows[@]}"
if [ $fail -ne 0 ]; then
  echo "logs: $LOGS"
  grep -h '^FAILED' "$LOGS"/*.log | sort | uniq -c
  exit 1
fi
rm -rf "$LOGS"
