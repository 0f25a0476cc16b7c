#!/usr/bin/env bash
# The main job on built-in defaults. Until the sampler exists (issues #3, #4) it builds a small
# SynthTalk corpus, checks it, and writes its preview video.
#   bash scripts/demo.sh [OUT_DIR]      (default outputs/demo)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh requirements.txt
OUT="${1:-outputs/demo}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
.venv/bin/python -m data_pipeline.synthtalk --out "$OUT/synthtalk" --num_identities 4 \
  --clips_per_identity 2 --seconds 4 --size 256 --seed 0 --preview
.venv/bin/python -m data_pipeline.inspect "$OUT/synthtalk" --check
echo "demo: corpus in $OUT/synthtalk, preview video $OUT/synthtalk/preview.mp4"
