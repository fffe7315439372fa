#!/usr/bin/env bash
# One-command set-up and run on a fresh machine with only python3:
#   ./run.sh demo   benchmark dense vs ToMe vs EViT (jitted ViT-S/16, CPU or GPU), tables in workdirs/bench
#   ./run.sh test   the test suite (what CI runs)
# The first call creates .venv and installs tokcomp with its test extras; later calls reuse it.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${TOKCOMP_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$VENV/.tokcomp-installed" ] || [ pyproject.toml -nt "$VENV/.tokcomp-installed" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  touch "$VENV/.tokcomp-installed"
fi
cmd="${1:-demo}"
shift || true
case "$cmd" in
  demo) exec "$VENV/bin/python" eval.py --mode=bench --config "configs/bench_vit.py:${DEMO_ARGS:-quick}" \
          --workdir "${WORKDIR:-workdirs/bench}" "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" tests "$@" ;;
  *) echo "usage: ./run.sh [demo|test] [extra args]" >&2; exit 2 ;;
esac
