#!/usr/bin/env bash
# The CPU recipe, one command: a face-framed 64 px SynthTalk corpus, the expression meter,
# the head-pose net, stage 1 (tiny), its evaluation, then stage-1 latents, stage 2 (tiny) and its evaluation.
#   bash scripts/recipe_cpu.sh WORKDIR [SEED]
# Budgets on 2 CPU cores (env overrides): STAGE1_STEPS, STAGE2_STEPS, METER_STEPS, IDS, CLIPS;
# STAGE1_MINUTES (default 55): stage 1's training loop also stops at this wall-clock budget
# (train.max_minutes; a slower machine trains fewer steps, re-running resumes). The step
# count is what 2 free cores of the machine this was measured on fit in that budget (0.25-
# 0.3 s a step; earlier machines took 0.6-0.9 s): the cosine schedule should end before the
# budget does, so on a slower machine set STAGE1_STEPS to 55 minutes / its s/step (printed
# in the first log lines);
# STAGE2_MINUTES (default 18), the same for stage 2;
# CONSIST_WEIGHT (l_consist, default 0: on half the batch it doubles a stage-1 step).
# Every step resumes or skips what WORKDIR already holds, so a stopped recipe can be re-run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/recipe_lib.sh"
recipe_start scripts/recipe_cpu.sh "$@"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
STAGE1_STEPS="${STAGE1_STEPS:-10000}"
STAGE1_MINUTES="${STAGE1_MINUTES:-55}"
CONSIST_WEIGHT="${CONSIST_WEIGHT:-0}"
STAGE2_STEPS="${STAGE2_STEPS:-1500}"
STAGE2_MINUTES="${STAGE2_MINUTES:-18}"
METER_STEPS="${METER_STEPS:-1500}"
IDS="${IDS:-32}"
CLIPS="${CLIPS:-9}"

if [ ! -f "$D/dataset.json" ]; then
  stamp "corpus: $IDS identities x $CLIPS clips of 4 s (one held out per identity), seed $SEED"
  $PY -m data_pipeline.synthtalk --out "$D" --num_identities "$IDS" --clips_per_identity "$CLIPS" \
    --seconds 4 --size 64 --seed "$SEED" --test_clips_per_identity 1 --workers 2 --no_progress
fi

if [ ! -f "$W/meter/expression_meter.json" ]; then
  stamp "expression meter ($METER_STEPS steps)"
  $PY train.py --config configs/expression_meter.py:size=tiny --workdir "$W/meter" \
    --config.data.path="$D" --config.train.total_steps="$METER_STEPS" --config.data.batch_size=16
fi

if [ ! -f "$W/pose/face_pose.json" ]; then
  stamp "head-pose and landmark net ($POSE_STEPS steps; frozen in stage 1)"
  $PY train.py --config configs/face_pose.py:size=tiny --workdir "$W/pose" \
    --config.data.path="$D" --config.train.total_steps="$POSE_STEPS" \
    --config.data.aug.rotate_deg="$POSE_ROTATE_DEG" --config.model.motion.glimpse_widths="$GLIMPSES"
fi

stamp "stage 1 ($STAGE1_STEPS steps or $STAGE1_MINUTES minutes)"
JAX_NUM_CPU_DEVICES=2 $PY train.py --config configs/face_latent.py:size=tiny --workdir "$W/face" \
  --config.data.path="$D" --config.seed="$SEED" "${STAGE1_FLAGS[@]}" \
  --config.model.motion.pretrained_pose="$W/pose" \
  --config.train.total_steps="$STAGE1_STEPS" --config.train.max_minutes="$STAGE1_MINUTES" \
  --config.loss.gan_start_step="$STAGE1_STEPS" --config.data.batch_size=4 \
  --config.loss.consist_weight="$CONSIST_WEIGHT"
recipe_after_stage1
