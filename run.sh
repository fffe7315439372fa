#!/usr/bin/env bash
# One-command set-up and run on a fresh machine with only python3:
#   ./run.sh demo   train a tiny ViT on the embedded Fashion-MNIST subset, then sweep ToMe/EViT/... on it
#                   training-free: the accuracy / GFLOPs / img/s table and plot land in workdirs/quickstart
#   ./run.sh test   the test suite (what CI runs)
#   ./run.sh bench  time dense vs ToMe vs EViT on a jitted ViT-S/16@224 (random weights), workdirs/bench
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
  demo) W="${WORKDIR:-workdirs/quickstart}"
        "$VENV/bin/python" train.py --config "configs/quickstart.py:${DEMO_ARGS:-}" --workdir "$W" "$@"
        exec "$VENV/bin/python" eval.py --mode=sweep --config "configs/quickstart.py:${DEMO_ARGS:-}" --workdir "$W" ;;
  bench) exec "$VENV/bin/python" eval.py --mode=bench --config "configs/bench_vit.py:${DEMO_ARGS:-quick}" \
          --workdir "${WORKDIR:-workdirs/bench}" "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q -n "${TEST_WORKERS:-2}" tests "$@" ;;
  *) echo "usage: ./run.sh [demo|test|bench] [extra args]" >&2; exit 2 ;;
esac
