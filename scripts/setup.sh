#!/usr/bin/env bash
# Installs what vasa_jax needs on a fresh machine; safe to re-run (it skips what is there).
#   bash scripts/setup.sh [requirements-file]     (default requirements.txt)
# - Debian packages ffmpeg (video muxing/encoding) and espeak-ng (SynthTalk speech), when missing
# - a virtual environment in .venv with the pinned requirements (re-installed when they change)
#   plus the weight-only wheels of requirements-nodeps.txt, installed with --no-deps
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
REQ="${1:-requirements.txt}"

missing=()
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="none"; fi
  if [ "$SUDO" = none ]; then
    echo "setup: please install the Debian packages: ${missing[*]} (no root, no sudo)" >&2
  else
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
# Re-install only when a requirements file changed.
stamp=".venv/.installed-$(cat requirements*.txt | sha256sum | cut -c1-16)-$(basename "$REQ")"
if [ ! -f "$stamp" ]; then
  echo "setup: pip install -r $REQ"
  .venv/bin/pip install -q --disable-pip-version-check -r "$REQ"
  if [ -f requirements-nodeps.txt ]; then
    echo "setup: pip install --no-deps -r requirements-nodeps.txt"
    .venv/bin/pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  fi
  touch "$stamp"
fi
