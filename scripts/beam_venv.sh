#!/usr/bin/env bash
# A venv for `python -m data_pipeline.preprocess --runner beam`; safe to re-run.
#   bash scripts/beam_venv.sh [VENV]      (default .venv-beam)
# = requirements.txt + requirements-beam.txt (apache-beam, with the protobuf / pillow it
# needs) + the weight-only wheels of requirements-nodeps.txt (--no-deps) + pytest and
# scikit-image for its test:
#   VENV/bin/python -m pytest tests/test_preprocess.py -k beam
# Debian packages (ffmpeg, espeak-ng): scripts/setup.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${1:-.venv-beam}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "beam_venv: creating $VENV with $("$PY" --version)"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat requirements.txt requirements-beam.txt requirements-nodeps.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "beam_venv: pip install -r requirements.txt -r requirements-beam.txt"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.txt \
    -r requirements-beam.txt $(grep -E '^(pytest|scikit-image)==' requirements.txt requirements-dev.txt | cut -d: -f2 | cut -d' ' -f1)
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
  touch "$stamp"
fi
"$VENV/bin/python" -c "import apache_beam, google.protobuf; print('beam_venv: apache-beam', apache_beam.__version__, 'protobuf', google.protobuf.__version__, 'in $VENV')"
