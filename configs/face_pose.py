"""Head-pose pre-training of stage 1's pose net (vasa_jax.trainers.face_pose).

    python train.py --config configs/face_pose.py:size=tiny --workdir runs/pose \
        --config.data.path=data/synthtalk

Variants: `size` is the stage-1 config the pose net is pre-trained for (configs/
face_latent.py:size=...): its `model` section is stage 1's, so the export drops into that
model's `motion_encoder.pose_net` (--config.model.motion.pretrained_pose=runs/pose), and
any of its fields can be overridden the same way (e.g. --config.model.motion
.glimpse_widths="(0.65,0.4)": the net then also locates the eye and mouth glimpses).
Sections:

  data   the stage-1 loader (configs.common.data_stage1): each example gives three
         labelled faces (source, driving, cross); data.aug.rotate_deg adds an in-plane
         rotation of up to that many degrees (face_pose.rotate_batch; 0 = off).
  model  the stage-1 model section (configs.face_latent.model_config); only E_mtn's pose
         net is built and trained.
  final_eval  held-out R^2 on the test split's frames, written with the export.
  train, optim, mesh: the shared loop's sections (no EMA: the trained weights are exported).
"""

import ml_collections

from configs import common, face_latent


def get_config(arg=None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, size="full", choices={"size": common.SIZES})
    c = ml_collections.ConfigDict()
    c.stage = "face_pose"
    c.size = arg.size
    c.seed = 0
    c.data = common.data_stage1(arg.size)
    c.data.batch_size = 12  # stage-1 examples per step; each gives 3 labelled faces
    c.data.num_workers = 2
    c.data.aug.rotate_deg = 0.0
    c.model = face_latent.model_config(arg.size, c.data.get_ref("image_size"))
    c.mesh = common.mesh_config("conv")
    c.train = common.helper_train_config(total_steps=2000, checkpoint_every=500)
    c.optim = common.helper_optim_config(lr=1e-3, warmup_steps=100, weight_decay=1e-4)
    c.final_eval = common.final_eval_config(frames_per_clip=16)
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    common.validate_helper(c)
    common.check(c.model.image_size == c.data.image_size,
                 f"model.image_size {c.model.image_size} != data.image_size "
                 f"{c.data.image_size}")
    face_latent.validate_model(c.model)
    common.check(0.0 <= c.data.aug.rotate_deg <= 90.0,
                 f"data.aug.rotate_deg must be in [0, 90], got {c.data.aug.rotate_deg}")
