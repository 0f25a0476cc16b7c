"""Stage 2: the audio-conditioned motion diffusion transformer (VASA-1 sec 3.2).

Variants: `configs/motion_dit.py:size=tiny` (CPU tests), `size=full` (8 layers, width 512,
8 heads). Window W and context K live in `data` (defaults W=50, K=10 at 25 fps).
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, size="full", choices={"size": common.SIZES})
    c = ml_collections.ConfigDict()
    c.stage = "motion_dit"
    c.size = arg.size
    c.seed = 0
    c.data = common.data_stage2(arg.size)
    c.mesh = common.mesh_config("transformer")
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    common.check_choice(c.size, common.SIZES, "size")
    common.validate_data(c.data)
