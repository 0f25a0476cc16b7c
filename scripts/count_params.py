"""Parameter counts (and optionally forward FLOPs) of the stage-1 face latent model.

Nothing is allocated: the model is built with nnx.eval_shape, FLOPs come from XLA's cost
analysis of the lowered (not compiled) forward pass at batch 1.

    python scripts/count_params.py                     # every size
    python scripts/count_params.py --sizes full --flops
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import configs  # noqa: E402
from configs import common  # noqa: E402
from vasa_jax.models import discriminator, face_latent  # noqa: E402


def forward_gflops(cfg) -> dict[str, float]:
    """GFLOPs of encode (one portrait) and decode (one frame) at batch 1."""
    graphdef, state = nnx.split(face_latent.abstract_model(cfg))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    v = cfg.volume
    image = f32(1, cfg.image_size, cfg.image_size, 3)
    latent = (
        f32(1, v.depth, v.size, v.size, v.channels), f32(1, cfg.id.dim), f32(1, 7),
        f32(1, cfg.motion.dyn_dim),
    )

    def gflops(fn, *args):
        cost = jax.jit(fn).lower(state, *args).cost_analysis()
        return float(cost["flops"]) / 1e9

    return {
        "encode": gflops(lambda s, x: nnx.merge(graphdef, s).encode(x), image),
        "encode_motion": gflops(lambda s, x: nnx.merge(graphdef, s).encode_motion(x), image),
        "decode": gflops(lambda s, *z: nnx.merge(graphdef, s).decode(*z), *latent),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(common.SIZES), choices=common.SIZES)
    parser.add_argument("--flops", action="store_true", help="also report forward GFLOPs")
    args = parser.parse_args()
    for size in args.sizes:
        cfg = configs.load(f"configs/face_latent.py:size={size}").model
        counts = face_latent.param_counts(face_latent.abstract_model(cfg))
        disc = nnx.eval_shape(lambda: discriminator.build_discriminator(cfg, rngs=nnx.Rngs(0)))
        v = cfg.volume
        print(f"== size={size}: image {cfg.image_size}px, volume C x D x H x W = "
              f"{v.channels} x {v.depth} x {v.size} x {v.size}")
        for name, n in counts.items():
            print(f"  {name:<26} {n / 1e6:9.3f} M")
        print(f"  {'discriminator':<26} {face_latent.count_params(disc) / 1e6:9.3f} M")
        if args.flops:
            for name, g in forward_gflops(cfg).items():
                print(f"  {name + ' GFLOPs':<26} {g:9.1f}   (forward, batch 1)")


if __name__ == "__main__":
    main()
