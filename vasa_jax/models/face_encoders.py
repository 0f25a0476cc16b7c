"""The encoders of the face latent (VASA-1 sec 3.1): one per factor, plus G3D.

  * AppearanceEncoder (E_app): image -> posed appearance volume [B, D, H, W, C]
    (2-D resblocks with average pooling, 1x1 conv to C*D channels, reshape to 3-D,
    3-D resblocks), as MegaPortraits' E_app.
  * IdentityEncoder (E_id): image -> z_id [B, id_dim] (ResNet-style 2-D encoder + global
    average pooling); conditions the warps.
  * MotionEncoder (E_mtn): image -> (z_pose [B, 7], z_dyn [B, dyn_dim]) from separate
    ResNet-style encoders (optionally one dynamics net per face region) (VASA: each factor has its own encoder; MegaPortraits: two
    ResNets for pose and expression). z_pose is tanh-bounded (see warping.bound_pose).
  * CanonicalVolumeGenerator (G3D): 3-D U-Net refining the canonical volume; V_app =
    G3D(w_s->c(posed volume)) is computed once per portrait at inference.

Images are [B, S, S, 3] in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vasa_jax.models import layers, warping
from vasa_jax.ops import grid_sample


def check_images(images: jax.Array, size: int, name: str) -> None:
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"{name} expects images [B, {size}, {size}, 3], got {images.shape}")


def resize_images(images: jax.Array, size: int) -> jax.Array:
    """[B, H, W, 3] -> [B, size, size, 3] (antialiased bilinear); a no-op at the same size."""
    if images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "linear")


class ResNetEncoder(nnx.Module):
    """ResNet-style image -> vector encoder (GroupNorm + weight-standardised convs).

        resize to input_size -> 7x7 stride-2 conv (no WS: first conv)
        -> stages of pre-activation resblocks (the first of each stage halves H, W)
        -> GroupNorm, ReLU, pool -> Dense -> [B, out_dim]

    pool "mean": global average pooling (translation-invariant; enough for a deep
    network whose features already encode where things are). "flatten": the whole final
    map feeds the head, so a shallow network keeps where each feature is: at 64 px, a
    3-stage encoder's held-out head-pose R^2 on SynthTalk rose from ~0.1 (mean) to ~0.8.
    """

    POOLS = ("mean", "flatten")

    def __init__(
        self,
        *,
        image_size: int,
        input_size: int,
        stem: int,
        channels: Sequence[int],
        blocks: Sequence[int],
        out_dim: int,
        groups: int,
        head_init_scale: float = 1.0,
        pool: str = "mean",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if pool not in self.POOLS:
            raise ValueError(f"ResNetEncoder: pool must be one of {self.POOLS}, got {pool!r}")
        if len(channels) != len(blocks) or not channels:
            raise ValueError(f"ResNetEncoder: channels {channels} and blocks {blocks} must pair up")
        if input_size % (2 ** (len(channels) + 1)):
            raise ValueError(
                f"ResNetEncoder: input_size {input_size} is not divisible by 2^{len(channels) + 1}"
            )
        self.image_size = image_size
        self.input_size = input_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stem = layers.Conv(3, stem, (7, 7), stride=2, weight_std=False, **kw)
        stages, c = [], stem
        for out, n in zip(channels, blocks):
            stages.append(layers.ResBlock(c, out, ndim=2, down=(2, 2), groups=groups, **kw))
            stages += [layers.ResBlock(out, out, ndim=2, groups=groups, **kw) for _ in range(n - 1)]
            c = out
        self.blocks = nnx.List(stages)
        self.norm = layers.GroupNorm(c, groups=groups, **kw)
        self.pool = pool
        side = input_size // 2 ** (len(channels) + 1)
        features = c * side * side if pool == "flatten" else c
        self.head = layers.Dense(
            features, out_dim, names=("embed", "mlp"), init_scale=head_init_scale, **kw
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        """images [B, image_size, image_size, 3] -> [B, out_dim] float32."""
        check_images(images, self.image_size, type(self).__name__)
        x = self.stem(resize_images(images, self.input_size))
        for block in self.blocks:
            x = block(x)
        x = layers.relu(self.norm(x)).astype(jnp.float32)
        if self.pool == "flatten":
            x = x.reshape(x.shape[0], -1)
        else:
            x = jnp.mean(x, axis=(1, 2))
        return self.head(x).astype(jnp.float32)


class IdentityEncoder(ResNetEncoder):
    """E_id: image -> z_id [B, out_dim]."""


# Glimpse regions, in the order of MotionEncoder.landmarks: (name, schema.BOX_LABELS name).
GLIMPSE_REGIONS = ("eyes", "mouth")


def glimpse_image(images: jax.Array, centres: jax.Array, widths: Sequence[float],
                  angle: jax.Array | None = None) -> jax.Array:
    """Zoomed crops around face regions, stacked into one image the size of the input.

    images [B, S, S, 3]; centres [B, R, 2] region centres (x, y) in [0, 1] image
    coordinates (x right, y down); widths: R crop widths as fractions of the frame (each
    crop is half as high as wide); angle [B] (radians, optional): the windows turn by it
    (clockwise on screen for angle > 0, the image's x-y order), so a face turned in the
    image plane by `angle` reads upright. Returns [B, S, S, 3]: R horizontal bands of
    S / R rows, band r = the 2:1 window of width widths[r] around centres[:, r], resampled
    bilinearly (border padding). With R = 2 each band is a 2x (eyes) to 3x (mouth) zoom of
    a region a few pixels high in the frame.
    """
    b, s = images.shape[0], images.shape[1]
    r = len(widths)
    if centres.shape != (b, r, 2):
        raise ValueError(f"glimpse_image: centres must be [{b}, {r}, 2], got {centres.shape}")
    if s % r:
        raise ValueError(f"glimpse_image: {r} bands do not split {s} rows")
    rows = s // r
    u = (jnp.arange(s, dtype=jnp.float32) + 0.5) / s - 0.5  # [S] across a band
    v = (jnp.arange(rows, dtype=jnp.float32) + 0.5) / rows - 0.5  # [S / R] down a band
    if angle is None:
        angle = jnp.zeros((b,), jnp.float32)
    cos = jnp.cos(angle)[:, None, None]  # [B, 1, 1]
    sin = jnp.sin(angle)[:, None, None]
    bands = []
    for k, width in enumerate(widths):
        cx, cy = centres[:, k, 0, None, None], centres[:, k, 1, None, None]  # [B, 1, 1]
        du = width * u[None, None, :]  # [1, 1, S] window offsets in [0, 1] image units
        dv = 0.5 * width * v[None, :, None]  # [1, rows, 1]
        x = cx + cos * du - sin * dv  # [B, rows, S]
        y = cy + sin * du + cos * dv
        grid = jnp.stack(jnp.broadcast_arrays(2.0 * x - 1.0, 2.0 * y - 1.0), axis=-1)
        bands.append(grid_sample.grid_sample_2d(images, grid, padding_mode="border"))
    return jnp.concatenate(bands, axis=1)


class MotionEncoder(nnx.Module):
    """E_mtn: image -> (z_pose [B, 7], z_dyn [B, dyn_dim]), two independent encoders.

    The pose head starts small (init_scale 0.1), so an untrained encoder predicts poses
    near the identity instead of random rotations. `dyn_groups` (None: `groups`) sets the
    dynamics net's GroupNorm groups alone; 0 turns its normalisation off. `dyn_pool` (None:
    `pool`) sets its pooling alone.

    `glimpse_widths` (R > 0 widths): the pose net also locates the eyes and the mouth
    (`landmarks`, R more (x, y) outputs; pre-trained with the pose on the data's region
    boxes, vasa_jax.models.face_pose) and the dynamics net reads `glimpse_image` of those
    regions instead of the whole frame. An open mouth is a few pixels of a 64 px face crop
    that the head moves about; zoomed and centred, it is most of the dynamics net's input
    (docs/experiments.md). Framing and head position stay out of z_dyn. `glimpse_roll`
    also turns the glimpses with the pose net's roll (z_pose's roll is the image-plane
    angle, warping's convention), so a tilted head reads upright: pose-aligned crops.

    `dyn_split` (needs glimpses): z_dyn = [eyes code, mouth code], dyn_dim / R dims each,
    from one dynamics net per region that reads only that region's glimpse (its 2:1 window
    resampled to the whole input square); `dyn_net` is then an nnx.List of them. The eye
    state cannot hide among the mouth's larger variation, and the mouth code alone is the
    lip motion (a lip-only control). Without it one net reads both glimpses stacked.
    """

    def __init__(
        self,
        *,
        image_size: int,
        input_size: int,
        stem: int,
        channels: Sequence[int],
        blocks: Sequence[int],
        dyn_dim: int,
        max_angles_deg: Sequence[float],
        max_translation: float,
        max_log_scale: float,
        groups: int,
        pool: str = "mean",
        dyn_groups: int | None = None,
        dyn_pool: str | None = None,
        glimpse_widths: Sequence[float] = (),
        glimpse_roll: bool = False,
        dyn_split: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        common = dict(
            image_size=image_size, input_size=input_size, stem=stem, channels=channels,
            blocks=blocks, groups=groups, pool=pool, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )
        self.glimpse_widths = tuple(float(w) for w in glimpse_widths)
        if self.glimpse_widths and len(self.glimpse_widths) != len(GLIMPSE_REGIONS):
            raise ValueError(f"glimpse_widths: one width per region {GLIMPSE_REGIONS}, got "
                             f"{self.glimpse_widths}")
        self.glimpse_roll = bool(glimpse_roll)
        self.dyn_split = bool(dyn_split)
        regions = len(self.glimpse_widths)
        if self.dyn_split and (not regions or dyn_dim % regions):
            raise ValueError(f"dyn_split needs glimpse_widths and dyn_dim divisible by their "
                             f"number, got {self.glimpse_widths} and dyn_dim {dyn_dim}")
        out = warping.POSE_DIM + 2 * len(self.glimpse_widths)
        self.pose_net = ResNetEncoder(out_dim=out, head_init_scale=0.1, **common)
        if dyn_groups is not None:
            common["groups"] = dyn_groups
        if dyn_pool is not None:
            common["pool"] = dyn_pool
        if self.dyn_split:
            self.dyn_net = nnx.List([ResNetEncoder(out_dim=dyn_dim // regions, **common)
                                     for _ in range(regions)])
        else:
            self.dyn_net = ResNetEncoder(out_dim=dyn_dim, **common)
        self.max_angles = tuple(math.radians(a) for a in max_angles_deg)
        self.max_translation = float(max_translation)
        self.max_log_scale = float(max_log_scale)

    def split_pose_output(self, raw: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """The pose net's raw output [B, 7 + 2R] -> (z_pose [B, 7], landmarks [B, R, 2] in
        [0, 1], or None without glimpses)."""
        z_pose = warping.bound_pose(
            raw[:, :warping.POSE_DIM], max_angles=self.max_angles,
            max_translation=self.max_translation, max_log_scale=self.max_log_scale,
        )
        if not self.glimpse_widths:
            return z_pose, None
        centres = 0.5 + 0.5 * jnp.tanh(raw[:, warping.POSE_DIM:])
        return z_pose, centres.reshape(raw.shape[0], len(self.glimpse_widths), 2)

    def pose(self, images: jax.Array) -> jax.Array:
        """images -> z_pose [B, 7] (yaw, pitch, roll in radians; tx, ty, tz; scale)."""
        return self.split_pose_output(self.pose_net(images))[0]

    def landmarks(self, images: jax.Array) -> jax.Array:
        """images -> centres [B, R, 2] of GLIMPSE_REGIONS (x, y in [0, 1]); needs glimpses."""
        if not self.glimpse_widths:
            raise ValueError("MotionEncoder.landmarks needs glimpse_widths")
        return self.split_pose_output(self.pose_net(images))[1]

    def dynamics(self, images: jax.Array, centres: jax.Array | None = None,
                 roll: jax.Array | None = None) -> jax.Array:
        """images (+ their landmarks and z_pose roll [B], else found here) -> z_dyn
        [B, dyn_dim]. With `glimpse_roll` the glimpses turn with the head's roll."""
        if self.glimpse_widths:
            if centres is None or (self.glimpse_roll and roll is None):
                z_pose, centres = self.split_pose_output(self.pose_net(images))
                roll = z_pose[:, 2]
            # The glimpses are where the dynamics net looks, not something it learns.
            centres = jax.lax.stop_gradient(centres)
            angle = jax.lax.stop_gradient(roll) if self.glimpse_roll else None
            if self.dyn_split:  # each region's net sees its own glimpse, full frame
                return jnp.concatenate([
                    net(glimpse_image(images, centres[:, k:k + 1], (width,), angle))
                    for k, (net, width) in enumerate(zip(self.dyn_net, self.glimpse_widths))
                ], axis=-1)
            images = glimpse_image(images, centres, self.glimpse_widths, angle)
        return self.dyn_net(images)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        z_pose, centres = self.split_pose_output(self.pose_net(images))
        return z_pose, self.dynamics(images, centres, z_pose[:, 2])


class DepthGate(nnx.Module):
    """Concentrates a volume on a band of depth: v * D * softmax_d(prior_d + a(v)).

    volume [B, D, H, W, C] -> same shape. prior_d = -z_d^2 / (2 sigma^2) at the slice
    centres z_d in (-1, 1) (normalised volume units, as models.warping); a(v) is a per-voxel
    logit from the voxel's features, initialised near zero, so an untrained gate puts the
    face on a thin surface at the volume centre (the rigid warps then move it as a surface
    and not as a smear over depth, see configs/face_latent.py model.app.depth_sigma), and
    training carves the surface from the features.
    """

    def __init__(self, channels: int, depth: int, sigma: float, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        z = (2.0 * np.arange(depth) + 1.0) / depth - 1.0
        self.prior = tuple(float(p) for p in -np.square(z) / (2.0 * sigma**2))  # static
        self.logit = layers.Dense(channels, 1, init_scale=1e-3, names=("embed", None),
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, volume: jax.Array) -> jax.Array:
        depth = volume.shape[1]
        logits = self.logit(volume)[..., 0].astype(jnp.float32)  # [B, D, H, W]
        logits = logits + jnp.asarray(self.prior, jnp.float32)[None, :, None, None]
        weight = depth * jax.nn.softmax(logits, axis=1)
        return volume * weight[..., None].astype(volume.dtype)


class AppearanceEncoder(nnx.Module):
    """E_app: image -> posed appearance volume [B, D, H, W, C] (MegaPortraits' v_s).

        7x7 conv (no WS) -> 2-D resblocks, each halving H, W (len(channels) of them, so
        image_size / 2^len(channels) = volume side) -> GroupNorm, ReLU, 1x1 conv to C*D
        -> reshape channels into depth -> 3-D resblocks (at C channels)
    """

    def __init__(
        self,
        *,
        image_size: int,
        stem: int,
        channels: Sequence[int],
        volume_shape: Sequence[int],
        volume_channels: int,
        blocks_3d: int,
        groups: int,
        depth_sigma: float = 0.0,
        remat: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        depth, height, width = (int(s) for s in volume_shape)
        if image_size != height * 2 ** len(channels) or height != width:
            raise ValueError(
                f"AppearanceEncoder: {len(channels)} downsampling blocks take {image_size}px to "
                f"{image_size >> len(channels)}px, but the volume is {height}x{width}"
            )
        self.image_size = image_size
        self.volume_shape = (depth, height, width)
        self.volume_channels = volume_channels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stem = layers.Conv(3, stem, (7, 7), weight_std=False, **kw)
        blocks, c = [], stem
        for out in channels:
            blocks.append(layers.ResBlock(c, out, ndim=2, down=(2, 2), groups=groups, **kw))
            c = out
        self.blocks_2d = nnx.List(blocks)
        self.norm = layers.GroupNorm(c, groups=groups, **kw)
        self.to_volume = layers.Conv(c, volume_channels * depth, (1, 1), **kw)
        self.blocks_3d = nnx.List([
            layers.ResBlock(
                volume_channels, volume_channels, ndim=3, groups=groups, remat=remat, **kw
            )
            for _ in range(blocks_3d)
        ])
        self.depth_gate = (DepthGate(volume_channels, depth, depth_sigma, **kw)
                           if depth_sigma > 0 else None)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images [B, S, S, 3] -> posed volume [B, D, H, W, C]."""
        check_images(images, self.image_size, "AppearanceEncoder")
        x = self.stem(images)
        for block in self.blocks_2d:
            x = block(x)
        x = self.to_volume(layers.relu(self.norm(x)))  # [B, H, W, D * C]
        b, h, w, _ = x.shape
        depth = self.volume_shape[0]
        # Channel index = d * C + c: each depth slice owns a contiguous block of channels.
        x = x.reshape(b, h, w, depth, self.volume_channels).transpose(0, 3, 1, 2, 4)
        for block in self.blocks_3d:
            x = block(x)
        return x if self.depth_gate is None else self.depth_gate(x)


class CanonicalVolumeGenerator(nnx.Module):
    """G3D: a 3-D U-Net on the canonical volume, residual: V_app = v + U(v).

    Level i works at channels[i] and 1 / 2^i of the volume's D, H, W (average-pool down,
    nearest up, skip connections concatenated). channels[0] may differ from the volume's
    channel count (a 1x1x1 conv adapts). The residual form gives E_app an unobstructed path
    to the decoder early in training.
    """

    def __init__(
        self,
        *,
        volume_channels: int,
        volume_shape: Sequence[int],
        channels: Sequence[int],
        blocks: int,
        groups: int,
        remat: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        levels = len(channels) - 1
        if any(s % (2**levels) for s in volume_shape):
            raise ValueError(
                f"G3D: volume {tuple(volume_shape)} is not divisible by 2^{levels} "
                f"({levels} levels)"
            )
        self.volume_channels = volume_channels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        block_kw = dict(ndim=3, groups=groups, remat=remat, **kw)
        self.conv_in = layers.Conv(volume_channels, channels[0], (1, 1, 1), **kw)
        down, skips, c = [], [], channels[0]
        for i, out in enumerate(channels):
            level = []
            for j in range(blocks):
                # The first block of every deeper level pools the previous level's output.
                pool = (2, 2, 2) if (i > 0 and j == 0) else None
                level.append(layers.ResBlock(c, out, down=pool, **block_kw))
                c = out
            down.append(nnx.List(level))
            skips.append(out)
        self.down = nnx.List(down)
        up = []
        for i in reversed(range(levels)):
            # The first block of a decoder level takes [upsampled x, skip] concatenated.
            level = [layers.ResBlock(c + skips[i], channels[i], **block_kw)]
            level += [
                layers.ResBlock(channels[i], channels[i], **block_kw) for _ in range(blocks - 1)
            ]
            up.append(nnx.List(level))
            c = channels[i]
        self.up = nnx.List(up)
        self.norm = layers.GroupNorm(c, groups=groups, **kw)
        self.conv_out = layers.Conv(c, volume_channels, (1, 1, 1), **kw)

    def __call__(self, volume: jax.Array) -> jax.Array:
        """volume [B, D, H, W, C] -> [B, D, H, W, C]."""
        if volume.ndim != 5 or volume.shape[-1] != self.volume_channels:
            raise ValueError(
                f"G3D expects [B, D, H, W, {self.volume_channels}], got {volume.shape}"
            )
        x = self.conv_in(volume)
        skips = []
        for level in self.down:
            for block in level:
                x = block(x)
            skips.append(x)
        skips.pop()  # the deepest level's output is x itself
        for level in self.up:
            skip = skips.pop()
            x = layers.upsample_nearest(x, (2, 2, 2))
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
            for block in level:
                x = block(x)
        x = self.conv_out(layers.relu(self.norm(x)))
        return volume + x.astype(volume.dtype)
