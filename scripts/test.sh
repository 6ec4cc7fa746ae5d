#!/usr/bin/env bash
# The whole test suite, in the environment scripts/setup.sh makes (set up first where missing):
#   make test                       # the same; .ci/run calls exactly this
#   scripts/test.sh -m "not integration"   # extra arguments go to pytest
# The test files are spread over TEST_WORKERS processes (default: one per CPU core; 0 runs them in this process),
# a whole file to one process, so a file's shared fixtures are built once.
# pytest's exit code 5 (no tests collected) is a failure, as any other non-zero code.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --serve
set +e
workers=${TEST_WORKERS:-$(nproc)}
parallel=()
[ "$workers" != 0 ] && parallel=(-n "$workers" --dist loadfile)
# Each worker and the scripts it runs get their share of the cores: two 2-thread processes on 2 cores run each
# about 3x slower than alone (OpenMP threads waiting on each other), two 1-thread ones about 1.7x (measured).
[ "$workers" -gt 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / workers > 1 ? $(nproc) / workers : 1 ))}
"${VENV:-.venv}/bin/python" -m pytest -q "${parallel[@]}" tests "$@"
code=$?
set -e
[ "$code" -eq 5 ] && echo "error: pytest collected no tests" >&2
exit "$code"
