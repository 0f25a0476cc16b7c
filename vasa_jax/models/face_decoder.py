"""The face decoder D(V_app, z_id, z_pose, z_dyn) -> image (VASA-1 sec 3.1, MegaPortraits).

    V_app [B, D, H, W, C]
      (+ with dyn_volume_channels E: a z_dyn "expression volume" [B, D, H, W, E] concatenated
         along channels: a learnt linear map of z_dyn, one canonical-space basis volume per
         z_dyn dimension, like blendshapes; the warp carries it to the driving pose)
      -> w_c->d: rigid driving pose + non-rigid flow from (z_dyn, z_id)   (warping.py)
      -> projection P: reshape [D, C] into channels, 1x1 conv             [B, H, W, F]
      -> G2D: resblocks at F channels, then upsampling resblocks (x2 each); with
         dyn_modulation their norms are adaptive on z_dyn
      -> GroupNorm, ReLU, 3x3 conv (no WS: the last conv), tanh           [B, S, S, 3]

The output has the encoder's input size S = H * 2^len(up_channels), in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vasa_jax.models import layers, warping


class Projection(nnx.Module):
    """P: volume [B, D, H, W, C] -> feature map [B, H, W, out] (depth folded into channels)."""

    def __init__(self, volume_channels: int, depth: int, out_channels: int, **kw):
        self.volume_channels = volume_channels
        self.depth = depth
        self.conv = layers.Conv(volume_channels * depth, out_channels, (1, 1), **kw)

    def __call__(self, volume: jax.Array) -> jax.Array:
        b, d, h, w, c = volume.shape
        if (d, c) != (self.depth, self.volume_channels):
            raise ValueError(
                f"Projection expects [B, {self.depth}, H, W, {self.volume_channels}], "
                f"got {volume.shape}"
            )
        # Same channel order as AppearanceEncoder's reshape: channel = d * C + c.
        return self.conv(volume.transpose(0, 2, 3, 1, 4).reshape(b, h, w, d * c))


class ImageGenerator(nnx.Module):
    """G2D: [B, H, W, F] -> image [B, H * 2^len(up_channels), ..., 3] in [-1, 1].

    With `cond_dim`, every resblock's norms are adaptive (scale and shift from a code, e.g.
    z_dyn: LIA modulates every decoder conv by its motion code), a route from the code to
    the pixels that does not go through the warps (which can move features but not draw
    what the source does not show, such as an open mouth's interior).
    """

    def __init__(
        self,
        *,
        channels: int,
        blocks: int,
        up_channels: Sequence[int],
        groups: int,
        cond_dim: int | None = None,
        conv_before_up: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        block = dict(ndim=2, groups=groups, cond_dim=cond_dim, **kw)
        self.cond_dim = cond_dim
        self.blocks = nnx.List([
            layers.ResBlock(channels, channels, **block) for _ in range(blocks)
        ])
        ups, c = [], channels
        for out in up_channels:
            ups.append(layers.ResBlock(c, out, up=(2, 2), conv_before_up=conv_before_up,
                                       **block))
            c = out
        self.up_blocks = nnx.List(ups)
        self.norm = layers.GroupNorm(c, groups=groups, **kw)
        self.to_rgb = layers.Conv(c, 3, (3, 3), weight_std=False, **kw)

    def __call__(self, x: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        """x [B, H, W, F] (+ cond [B, cond_dim] when built with cond_dim) -> [B, S, S, 3]."""
        if (cond is None) != (self.cond_dim is None):
            raise ValueError(f"ImageGenerator built with cond_dim={self.cond_dim} got "
                             f"cond {None if cond is None else cond.shape}")
        for block in [*self.blocks, *self.up_blocks]:
            x = block(x, cond)
        x = self.to_rgb(layers.relu(self.norm(x)))
        return jnp.tanh(x.astype(jnp.float32))


class ExpressionVolume(nnx.Module):
    """z_dyn [B, K] -> [B, D, H, W, E] = sum_k z_dyn_k * basis_k (+ a bias volume).

    The bases live in the canonical space of V_app, so each z_dyn dimension can add
    features exactly where the mouth or the eyes are in the canonical face, and the driving
    warp moves them with the head: a local, identity-independent route from z_dyn to the
    pixels (G2D's adaptive norms are global per channel). K * D * H * W * E parameters:
    16 * 8 * 16 * 16 * 4 = 131k for tiny; at full size keep E small.
    """

    def __init__(self, dyn_dim: int, volume_shape: Sequence[int], channels: int, *,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.shape = (*(int(s) for s in volume_shape), channels)
        size = int(np.prod(self.shape))
        self.dense = layers.Dense(dyn_dim, size, names=("embed", None), init_scale=0.1,
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, z_dyn: jax.Array) -> jax.Array:
        return self.dense(z_dyn).reshape((z_dyn.shape[0],) + self.shape)


class FaceDecoder(nnx.Module):
    """D: (V_app, z_id, z_pose, z_dyn) of possibly different frames -> image [B, S, S, 3]."""

    def __init__(
        self,
        *,
        volume_channels: int,
        volume_shape: Sequence[int],
        dyn_dim: int,
        id_dim: int,
        warp: dict,
        channels: int,
        blocks: int,
        up_channels: Sequence[int],
        groups: int,
        dyn_modulation: bool = False,
        dyn_volume_channels: int = 0,
        conv_before_up: bool = False,
        remat: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.volume_shape = tuple(volume_shape)
        self.volume_channels = volume_channels
        self.expression = (ExpressionVolume(dyn_dim, volume_shape, dyn_volume_channels, **kw)
                           if dyn_volume_channels else None)
        self.warp = warping.WarpGenerator(
            "to_driving", dyn_dim=dyn_dim, id_dim=id_dim, volume_shape=volume_shape,
            groups=groups, remat=remat, **dict(warp), **kw,
        )
        self.projection = Projection(volume_channels + dyn_volume_channels, volume_shape[0],
                                     channels, **kw)
        self.dyn_modulation = dyn_modulation
        self.generator = ImageGenerator(
            channels=channels, blocks=blocks, up_channels=up_channels, groups=groups,
            cond_dim=dyn_dim if dyn_modulation else None, conv_before_up=conv_before_up, **kw
        )

    def __call__(
        self, v_app: jax.Array, z_id: jax.Array, z_pose: jax.Array, z_dyn: jax.Array
    ) -> jax.Array:
        """v_app [B, D, H, W, C], z_id [B, I], z_pose [B, 7], z_dyn [B, K] -> [B, S, S, 3]."""
        expected = (*self.volume_shape, self.volume_channels)
        if v_app.ndim != 5 or v_app.shape[1:] != expected:
            raise ValueError(f"FaceDecoder expects v_app [B, {expected}], got {v_app.shape}")
        batch = v_app.shape[0]
        for name, z in (("z_id", z_id), ("z_pose", z_pose), ("z_dyn", z_dyn)):
            if z.ndim != 2 or z.shape[0] != batch:
                raise ValueError(f"FaceDecoder: {name} must be [{batch}, N], got {z.shape}")
        if self.expression is not None:
            v_app = jnp.concatenate([v_app, self.expression(z_dyn).astype(v_app.dtype)], -1)
        posed = self.warp(v_app, z_pose, z_dyn, z_id)
        cond = z_dyn.astype(jnp.float32) if self.dyn_modulation else None
        return self.generator(self.projection(posed), cond)
