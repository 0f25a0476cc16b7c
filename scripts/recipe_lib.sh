# Shared by scripts/recipe_cpu.sh and scripts/recipe_gpu.sh (sourced, not run): the set-up
# (recipe_start), the stage-1 options both recipes train with, and every step after stage 1
# (recipe_after_stage1, which also needs STAGE2_STEPS and STAGE2_MINUTES).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# recipe_start SCRIPT WORKDIR [SEED]: sets W (absolute), SEED, D (the corpus), PY; cds to ROOT
# and installs the requirements.
recipe_start() {
  W="${2:?usage: bash $1 WORKDIR [SEED]}"
  SEED="${3:-0}"
  mkdir -p "$W"
  W="$(cd "$W" && pwd)"
  D="$W/synthtalk"
  cd "$ROOT"
  bash scripts/setup.sh requirements.txt
  PY=.venv/bin/python
}

# The dynamics encoder reads zoomed eye and mouth glimpses located by the pose net.
GLIMPSES="(0.65,0.4)"
# The pose net's training turns its images by up to this many degrees (configs/face_pose.py
# data.aug.rotate_deg): without it, it learns the corpus's few roll trajectories by heart.
POSE_ROTATE_DEG=15
# Its training steps: held-out yaw/pitch/roll R^2 0.889 at 2500, 0.941 at 5000 (roll 0.78 ->
# 0.89; docs/experiments.md).
POSE_STEPS="${POSE_STEPS:-5000}"

# Stage 1's model and loss options (docs/experiments.md has what each one bought).
STAGE1_FLAGS=(
  --config.optim.lr=1e-3
  --config.model.motion.glimpse_widths="$GLIMPSES"
  --config.model.motion.glimpse_roll=True
  --config.model.motion.dyn_split=True
  --config.model.decoder.dyn_modulation=True
  --config.model.decoder.dyn_volume_channels=4
  --config.model.decoder.conv_before_up=True
  --config.loss.l1_region_weight=40
  --config.loss.l1_eyes_weight=40
  --config.loss.dyn_std_weight=1.0
  --config.loss.dyn_pose_decorr_weight=1.0
  --config.loss.consist_fraction=0.5
  --config.data.contrast_pairs=0.5
)

stamp() { echo "recipe [$(date +%H:%M:%S)] $*"; }

# Stage-1 evaluation, stage-1 latents, stage 2, its evaluation, the model export (W/export:
# what sample.py --model loads; the built-in assets/demo_model is one) and the summary lines.
recipe_after_stage1() {
  stamp "stage 1 evaluation"
  $PY -m vasa_jax.evaluate face_latent --workdir "$W/face" --data "$D" \
    --expression_meter "$W/meter" --no_progress | tee "$W/face_eval.txt"

  if [ ! -f "$W/latents/dataset.json" ]; then
    stamp "stage-1 latents"
    $PY -m data_pipeline.extract_latents --face_workdir "$W/face" --data "$D" --out "$W/latents"
  fi
  stamp "stage 2 ($STAGE2_STEPS steps or $STAGE2_MINUTES minutes)"
  $PY train.py --config configs/motion_dit.py:size=tiny --workdir "$W/motion" \
    --config.data.path="$W/latents" --config.seed="$SEED" \
    --config.data.motion_source=features:motion --config.data.audio_source=features:audio \
    --config.train.total_steps="$STAGE2_STEPS" --config.train.max_minutes="$STAGE2_MINUTES"
  stamp "stage 2 evaluation"
  $PY -m vasa_jax.evaluate motion --workdir "$W/motion" --data "$W/latents" --no_progress \
    --expression_meter "$W/meter" | tee "$W/motion_eval.txt"
  if [ ! -f "$W/export/pipeline.json" ]; then
    stamp "model export for sample.py (--model $W/export)"
    $PY -m vasa_jax.inference export --face_workdir "$W/face" --motion_workdir "$W/motion" \
      --out "$W/export"
    # sample.py reports lip sync with the meter: its export, not its run
    mkdir -p "$W/export/expression_meter"
    cp -r "$W/meter/params" "$W/meter/expression_meter.json" "$W/export/expression_meter/"
  fi
  stamp "summary"
  tail -n 3 "$W/face_eval.txt"
  tail -n 1 "$W/motion_eval.txt"
}
