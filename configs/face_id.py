"""The face-ID embedder for l_cross-id, trained with CosFace (vasa_jax.trainers.face_id).

    python train.py --config configs/face_id.py:size=tiny --workdir runs/face_id \
        --config.data.path=data/synthtalk

Variants: `size=tiny` (300 steps: a CPU run on SynthTalk), `size=small` / `size=full`
(3000 steps); the network is the same at every size. Sections:

  data   the stage-1 loader (configs.common.data_stage1) with stronger geometry than the
         generator's (identity must survive framing changes) and mild colour (skin and hair
         colour are part of who someone is); data.image_size 0 = the side the centre crop
         needs (the run's config records the value); data.aug.flip / data.aug.blur: the
         shares of images flipped and blurred 2x in the step (face_id.augment).
  model  vasa_jax.models.face_id.FaceIDConfig's fields (num_classes comes from the data).
  final_eval  held-out identification on the test split, written with the export.
  train, optim, mesh: the shared loop's sections (no EMA: the trained weights are exported).
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, size="full", choices={"size": common.SIZES})
    c = ml_collections.ConfigDict()
    c.stage = "face_id"
    c.size = arg.size
    c.seed = 0
    c.data = common.data_stage1("tiny")
    c.data.image_size = 0  # the side the centre crop needs, at most the stored frames'
    c.data.batch_size = 32  # stage-1 examples per step; each gives 3 labelled faces
    c.data.num_workers = 2
    c.data.aug.update(dict(scale=0.10, shift=0.06, brightness=0.2, contrast=0.2,
                           saturation=0.1, hue=0.01))
    c.data.aug.flip = 0.5
    c.data.aug.blur = 0.3  # 2x down/up-sampling: robustness to soft generator output
    c.model = ml_collections.ConfigDict(dict(
        image_size=64,  # side the centre crop is resized to
        crop=0.7,  # centre crop, fraction of the shorter side
        channels=(32, 64, 128, 256),  # one 2x-downsampling ResBlock each
        embed_dim=128,
        groups=8,  # GroupNorm groups
        scale=16.0,  # CosFace s
        margin=0.2,  # CosFace m
    ))
    c.mesh = common.mesh_config("conv")
    c.train = common.helper_train_config(
        total_steps={"tiny": 300, "small": 3000, "full": 3000}[arg.size], checkpoint_every=1000)
    c.optim = common.helper_optim_config(lr=2e-3, warmup_steps=100, weight_decay=5e-4)
    c.final_eval = common.final_eval_config(frames_per_clip=10)
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    from vasa_jax.models.face_id import FaceIDConfig

    common.validate_helper(c)
    common.check(c.data.image_size >= 0,
                 f"data.image_size must be >= 0 (0 = what the crop needs), got "
                 f"{c.data.image_size}")
    for name in ("flip", "blur"):
        common.check(0.0 <= c.data.aug[name] <= 1.0,
                     f"data.aug.{name} must be in [0, 1], got {c.data.aug[name]}")
    try:
        FaceIDConfig(num_classes=2, **{**c.model.to_dict(), "channels": tuple(c.model.channels)})
    except (TypeError, ValueError) as e:
        raise common.ConfigError(f"model: {e}") from e
