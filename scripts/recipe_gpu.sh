#!/usr/bin/env bash
# The GPU recipe, one command: recipe_cpu.sh's steps at 128 px on one H100/H200.
#   bash scripts/recipe_gpu.sh WORKDIR [SEED]
# A face-framed 128 px SynthTalk corpus (rendered on the host's CPU cores), the expression
# meter, the head-pose net, stage 1 (the tiny architecture at 128 px, batch 32), its
# evaluation, stage-1 latents, stage 2 (tiny) and its evaluation. Training is capped by
# wall clock (train.max_minutes): stage 1 STAGE1_MINUTES (default 7), stage 2
# STAGE2_MINUTES (default 2), so the recipe's training fits 9 minutes whatever the chip;
# the step counts only set the learning-rate schedules. Checkpoints stay far under 16 MB a
# file. Env overrides: STAGE1_STEPS, STAGE2_STEPS, STAGE1_MINUTES, STAGE2_MINUTES,
# METER_STEPS, POSE_STEPS, IDS, CLIPS, WORKERS. Re-running resumes or skips what WORKDIR holds.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/recipe_lib.sh"
recipe_start scripts/recipe_gpu.sh "$@"
STAGE1_STEPS="${STAGE1_STEPS:-6000}"
STAGE1_MINUTES="${STAGE1_MINUTES:-7}"
STAGE2_STEPS="${STAGE2_STEPS:-3000}"
STAGE2_MINUTES="${STAGE2_MINUTES:-2}"
METER_STEPS="${METER_STEPS:-3000}"
IDS="${IDS:-64}"
CLIPS="${CLIPS:-9}"
WORKERS="${WORKERS:-$(nproc)}"
SIZE=128
# The tiny architecture at 128 px: the volume doubles with the image (configs/face_latent.py
# links image_size = volume.size * 2^2), the encoders read the full resolution.
ARCH=(--config.data.image_size=$SIZE --config.model.volume.size=$((SIZE / 4))
      --config.model.motion.input_size=$SIZE --config.model.app.stem=32)

if [ ! -f "$D/dataset.json" ]; then
  stamp "corpus: $IDS identities x $CLIPS clips of 4 s at $SIZE px (one held out per identity)"
  $PY -m data_pipeline.synthtalk --out "$D" --num_identities "$IDS" --clips_per_identity "$CLIPS" \
    --seconds 4 --size "$SIZE" --seed "$SEED" --test_clips_per_identity 1 --workers "$WORKERS" \
    --no_progress
fi

if [ ! -f "$W/meter/expression_meter.json" ]; then
  stamp "expression meter ($METER_STEPS steps)"
  $PY train.py --config configs/expression_meter.py:size=tiny --workdir "$W/meter" \
    --config.data.path="$D" --config.train.total_steps="$METER_STEPS" \
    --config.data.batch_size=32 --config.model.image_size="$SIZE"
fi

if [ ! -f "$W/pose/face_pose.json" ]; then
  stamp "head-pose and landmark net ($POSE_STEPS steps; frozen in stage 1)"
  $PY train.py --config configs/face_pose.py:size=tiny --workdir "$W/pose" "${ARCH[@]}" \
    --config.data.path="$D" --config.train.total_steps="$POSE_STEPS" \
    --config.data.batch_size=32 --config.data.aug.rotate_deg="$POSE_ROTATE_DEG" \
    --config.model.motion.glimpse_widths="$GLIMPSES"
fi

stamp "stage 1 ($STAGE1_STEPS steps or $STAGE1_MINUTES minutes)"
$PY train.py --config configs/face_latent.py:size=tiny --workdir "$W/face" "${ARCH[@]}" \
  --config.data.path="$D" --config.seed="$SEED" "${STAGE1_FLAGS[@]}" \
  --config.model.motion.pretrained_pose="$W/pose" \
  --config.train.total_steps="$STAGE1_STEPS" --config.train.max_minutes="$STAGE1_MINUTES" \
  --config.train.checkpoint_every=1000 --config.loss.gan_start_step="$STAGE1_STEPS" \
  --config.data.batch_size=32 --config.data.num_workers=8 --config.loss.consist_weight=0
recipe_after_stage1
stamp "checkpoint files over 16 MB (none expected):"
find "$W/face/checkpoints" "$W/motion/checkpoints" -type f -size +16M -print
