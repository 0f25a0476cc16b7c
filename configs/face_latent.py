"""Stage 1: the disentangled face latent model (VASA-1 sec 3.1).

Variants: `configs/face_latent.py:size=tiny` (64x64, CPU tests), `size=small` (256x256),
`size=full` (512x512, the paper's scale). The model and loss sections arrive with the stage-1
trainer; this file already owns the data and parallelism settings.
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, size="full", choices={"size": common.SIZES})
    c = ml_collections.ConfigDict()
    c.stage = "face_latent"
    c.size = arg.size
    c.seed = 0
    c.data = common.data_stage1(arg.size)
    c.mesh = common.mesh_config("conv")
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    common.check_choice(c.size, common.SIZES, "size")
    common.validate_data(c.data)
    common.check(
        c.data.image_size in (64, 128, 256, 512),
        f"data.image_size must be 64/128/256/512, got {c.data.image_size}",
    )
