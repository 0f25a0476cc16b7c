#!/usr/bin/env bash
# Installs what the tests need (venv with requirements-dev.txt, Debian packages) and runs them.
#   bash scripts/test.sh [pytest args]     e.g. bash scripts/test.sh -k loaders
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh requirements-dev.txt
export JAX_PLATFORMS=cpu
start=$(date +%s)
status=0
.venv/bin/python -m pytest "$@" || status=$?
echo "test.sh: suite took $(( $(date +%s) - start )) s (exit $status)"
exit $status
