#!/usr/bin/env bash
# The main job on built-in defaults: the built-in demo model (assets/demo_model) animates the
# built-in portrait (assets/demo/portrait.png, an identity it never saw) with the built-in
# speech (assets/demo/speech.wav), offline and streaming, and reports the lip sync.
#   bash scripts/demo.sh [OUT_DIR]      (default outputs/demo)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh requirements.txt
OUT="${1:-outputs/demo}"
mkdir -p "$OUT"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
.venv/bin/python sample.py --out "$OUT/talking_face.mp4"
.venv/bin/python sample.py --out "$OUT/talking_face_stream.mp4" --mode stream --no_progress
echo "demo: $OUT/talking_face.mp4 (offline) and $OUT/talking_face_stream.mp4 (streamed)"
