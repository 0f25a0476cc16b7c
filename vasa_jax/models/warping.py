"""3-D warps between a posed volume and the canonical volume (VASA-1 sec 3.1, MegaPortraits).

A warp is a sampling grid: the warped volume at voxel p is the input volume read at
grid[p] (`grid_sample_3d`, trilinear). Grid coordinates are (x, y, z) in [-1, 1]
(x along W, y along H, z along D, align_corners=False), as in vasa_jax.ops.grid_sample.

Head pose z_pose = (yaw, pitch, roll, tx, ty, tz, scale), 7 numbers per frame:
  * yaw, pitch, roll in radians: rotations about the y (vertical), x (horizontal) and z
    (depth) axes of the volume; R = Rx(pitch) @ Ry(yaw) @ Rz(roll) (face-vid2vid's order);
  * tx, ty, tz: translation in normalised volume coordinates (1 = half the volume side);
  * scale: multiplicative size factor (1 = the canonical size).
The pose transform T(p) = scale * R @ (p - c) + c + t maps canonical coordinates to posed
coordinates (where that canonical point appears in the posed frame). c = (0, 0, -pivot) is
the centre of rotation, `pivot` half-sides behind the volume centre along -z (a head turns
about its neck, not about its face): on SynthTalk's face crops, the rigid motion of eye and
mouth centres between frames of a clip is predicted best with the face surface 1.0-1.2
half-sides in front of the rotation centre (2.9 px mean error without motion, 1.44 px with
the centre 1.0 behind, 2.4 px with it at the volume centre and features at the centre).

The two warp directions:
  * source -> canonical (removes the source's pose and expression), per canonical voxel p:
        grid_sc(p) = T_s(p + flow_s(p))
    flow_s is a deformation in the canonical frame (pose-independent: expression lives in
    the canonical frame), generated from the source's (z_dyn, z_id);
  * canonical -> driving (applies the driving pose and expression), per driving voxel p:
        q = T_d^-1(p);   grid_cd(p) = q + flow_d(q)
    flow_d is generated from the driving (z_dyn, z_id) in the canonical frame as well and
    read at q (trilinear, border padding), so the same expression code deforms the face
    the same way whatever the pose.
With zero flows and equal poses, grid_cd maps driving to canonical and grid_sc canonical
back to source coordinates: grid_sc(grid_cd(p)) = p, so source -> canonical -> driving is
the identity (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vasa_jax.models import layers
from vasa_jax.ops import grid_sample

POSE_FIELDS = ("yaw", "pitch", "roll", "tx", "ty", "tz", "scale")
POSE_DIM = len(POSE_FIELDS)
ALIGN_CORNERS = False
DIRECTIONS = ("to_canonical", "to_driving")
_HIGHEST = jax.lax.Precision.HIGHEST  # grid coordinates must not be rounded to bf16/tf32


# ----------------------------------------------------------------------------- pose


def bound_pose(
    raw: jax.Array,
    *,
    max_angles: Sequence[float],
    max_translation: float,
    max_log_scale: float,
) -> jax.Array:
    """Unbounded head outputs -> a plausible pose (tanh-bounded).

    Args:
      raw: [B, 7] head outputs.
      max_angles: (yaw, pitch, roll) limits in radians.
      max_translation: limit of |tx|, |ty|, |tz| (normalised coordinates).
      max_log_scale: scale = exp(max_log_scale * tanh(.)), symmetric in log space.

    Returns:
      [B, 7] z_pose (layout in POSE_FIELDS); raw = 0 gives the identity pose.
    """
    if raw.ndim != 2 or raw.shape[-1] != POSE_DIM:
        raise ValueError(f"bound_pose expects [B, {POSE_DIM}], got {raw.shape}")
    t = jnp.tanh(raw.astype(jnp.float32))
    angles = t[:, :3] * jnp.asarray(max_angles, jnp.float32)
    shift = t[:, 3:6] * max_translation
    scale = jnp.exp(t[:, 6:] * max_log_scale)
    return jnp.concatenate([angles, shift, scale], axis=-1)


# Pose labels (data_pipeline.schema: yaw, pitch, roll in degrees in the camera frame, +y
# image up: +yaw turns the face to image right, +pitch tilts it up, +roll turns the head
# counter-clockwise in the image) -> this module's angles. Grid y points down, so a
# positive roll here turns the head clockwise: roll flips sign. Yaw and pitch keep theirs
# once the model puts the face at +z (the volume's depth orientation is learned, and
# flipping it flips yaw and pitch together).
LABEL_ANGLE_SIGNS = (1.0, 1.0, -1.0)


def angles_from_labels(pose_labels: jax.Array) -> jax.Array:
    """Label pose [B, >=3] (yaw, pitch, roll in degrees first) -> [B, 3] z_pose angles
    (radians, this module's convention): the targets of the supervised pose loss."""
    if pose_labels.ndim != 2 or pose_labels.shape[-1] < 3:
        raise ValueError(f"pose labels must be [B, >=3] (yaw, pitch, roll, ...), got "
                         f"{pose_labels.shape}")
    signs = jnp.asarray(LABEL_ANGLE_SIGNS, jnp.float32)
    return jnp.deg2rad(pose_labels[:, :3].astype(jnp.float32)) * signs


def framing_from_labels(
    pose_labels: jax.Array,
    distance: jax.Array,
    half_extent: float,
    jitter: jax.Array | None = None,
) -> jax.Array:
    """Label translation and distance -> [B, 4] z_pose (tx, ty, tz, scale) targets.

    pose_labels [B, 6] (data_pipeline.schema: tx, ty in the camera frame, +y image up, head-
    radius units, after the angles); distance [B] (1 = the dataset's nominal distance);
    half_extent: half the image side in head radii at the nominal distance (SynthTalk's
    dataset.json extra.camera.half_extent); jitter [B, 3] (zoom, dx, dy) of the loader's
    scale/shift augmentation (data_pipeline.transforms.jitter_geometry), None = none.

    The head origin appears at (tx, -ty) / (half_extent * distance) in normalised image
    coordinates (grid y points down) and the face's size goes as 1 / distance; a zoom about
    the frame centre and a shift of (dx, dy) sides then give translation zoom * t + 2 * d
    and scale zoom / distance. tz is 0: depth moves nothing under the orthographic
    projection, scale carries the distance. Rigidly moved with these and the label angles
    (pivot 1.0), SynthTalk's eye and mouth centres land 0.57 px from where they are at 64
    px (2.9 px without motion, 1.4 px with the angles alone): docs/experiments.md.
    """
    if pose_labels.ndim != 2 or pose_labels.shape[-1] < 6:
        raise ValueError(f"framing needs pose labels [B, 6] (angles, tx, ty, tz), got "
                         f"{pose_labels.shape}")
    if half_extent <= 0:
        raise ValueError(f"half_extent must be > 0, got {half_extent}")
    d = jnp.asarray(distance, jnp.float32).reshape(-1)
    t = pose_labels[:, 3:5].astype(jnp.float32) * jnp.asarray([1.0, -1.0]) / (
        half_extent * d[:, None])
    scale = 1.0 / d
    if jitter is not None:
        jitter = jnp.asarray(jitter, jnp.float32)
        t = jitter[:, :1] * t + 2.0 * jitter[:, 1:3]
        scale = jitter[:, 0] * scale
    return jnp.concatenate([t, jnp.zeros_like(t[:, :1]), scale[:, None]], axis=-1)


def detach_angles(z_pose: jax.Array) -> jax.Array:
    """z_pose [B, 7] with yaw, pitch, roll under stop_gradient (translation, scale untouched):
    for angles trained by labels alone while the images train the rest."""
    return jnp.concatenate([jax.lax.stop_gradient(z_pose[:, :3]), z_pose[:, 3:]], axis=-1)


def identity_pose(batch: int) -> jax.Array:
    """[batch, 7] pose with no rotation, no translation, unit scale."""
    return jnp.tile(jnp.asarray([0, 0, 0, 0, 0, 0, 1], jnp.float32), (batch, 1))


def rotation_matrix(yaw: jax.Array, pitch: jax.Array, roll: jax.Array) -> jax.Array:
    """[B] angles in radians -> [B, 3, 3] R = Rx(pitch) @ Ry(yaw) @ Rz(roll) on (x, y, z)."""
    zero, one = jnp.zeros_like(yaw), jnp.ones_like(yaw)

    def mat(rows):
        return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)

    cy, sy = jnp.cos(yaw), jnp.sin(yaw)
    cp, sp = jnp.cos(pitch), jnp.sin(pitch)
    cr, sr = jnp.cos(roll), jnp.sin(roll)
    r_yaw = mat([[cy, zero, sy], [zero, one, zero], [-sy, zero, cy]])
    r_pitch = mat([[one, zero, zero], [zero, cp, -sp], [zero, sp, cp]])
    r_roll = mat([[cr, -sr, zero], [sr, cr, zero], [zero, zero, one]])
    return jnp.einsum("bij,bjk,bkl->bil", r_pitch, r_yaw, r_roll, precision=_HIGHEST)


def _check_pose(z_pose: jax.Array) -> jax.Array:
    if z_pose.ndim != 2 or z_pose.shape[-1] != POSE_DIM:
        raise ValueError(f"z_pose must be [B, {POSE_DIM}] {POSE_FIELDS}, got {z_pose.shape}")
    return z_pose.astype(jnp.float32)


def _pivot(pivot: float) -> jax.Array:
    return jnp.asarray([0.0, 0.0, -pivot], jnp.float32)


def pose_matrix(z_pose: jax.Array, pivot: float = 0.0) -> jax.Array:
    """z_pose [B, 7] -> [B, 3, 4] affine [scale * R | t + c - scale * R c]: canonical ->
    posed coordinates, rotating about c = (0, 0, -pivot)."""
    z_pose = _check_pose(z_pose)
    rot = rotation_matrix(z_pose[:, 0], z_pose[:, 1], z_pose[:, 2])
    linear = rot * z_pose[:, 6, None, None]
    c = _pivot(pivot)
    shift = z_pose[:, 3:6] + c - jnp.einsum("bij,j->bi", linear, c, precision=_HIGHEST)
    return jnp.concatenate([linear, shift[..., None]], axis=-1)


def inverse_pose_matrix(z_pose: jax.Array, pivot: float = 0.0) -> jax.Array:
    """z_pose [B, 7] -> [B, 3, 4] affine of T^-1: posed -> canonical coordinates.

    T^-1(q) = R^T (q - t - c) / scale + c (R is orthonormal: its inverse is its transpose).
    """
    z_pose = _check_pose(z_pose)
    rot = rotation_matrix(z_pose[:, 0], z_pose[:, 1], z_pose[:, 2])
    linear = jnp.swapaxes(rot, 1, 2) / z_pose[:, 6, None, None]
    c = _pivot(pivot)
    shift = c - jnp.einsum("bij,bj->bi", linear, z_pose[:, 3:6] + c, precision=_HIGHEST)
    return jnp.concatenate([linear, shift[..., None]], axis=-1)


# ----------------------------------------------------------------------------- grids


def source_to_canonical_grid(z_pose: jax.Array, flow: jax.Array, pivot: float = 0.0
                             ) -> jax.Array:
    """grid_sc(p) = T_s(p + flow(p)) for every canonical voxel p.

    Args:
      z_pose: [B, 7] the source frame's pose.
      flow: [B, D, H, W, 3] canonical-frame offsets (x, y, z), normalised units.
      pivot: the centre of rotation's distance behind the volume centre (module doc).

    Returns:
      [B, D, H, W, 3] sampling grid into the posed (source) volume.
    """
    d, h, w = flow.shape[1:4]
    theta = pose_matrix(z_pose, pivot)
    points = grid_sample.identity_grid(d, h, w, ALIGN_CORNERS)[None] + flow.astype(jnp.float32)
    return (
        jnp.einsum("b...j,bij->b...i", points, theta[:, :, :3], precision=_HIGHEST)
        + theta[:, None, None, None, :, 3]
    )


def canonical_to_driving_grid(z_pose: jax.Array, flow: jax.Array, pivot: float = 0.0
                              ) -> jax.Array:
    """grid_cd(p) = q + flow(q), q = T_d^-1(p), for every driving voxel p.

    Args:
      z_pose: [B, 7] the driving frame's pose.
      flow: [B, D, H, W, 3] canonical-frame offsets, read at q with border padding.
      pivot: the centre of rotation's distance behind the volume centre (module doc).

    Returns:
      [B, D, H, W, 3] sampling grid into the canonical volume.
    """
    d, h, w = flow.shape[1:4]
    rigid = grid_sample.affine_grid_3d(inverse_pose_matrix(z_pose, pivot), (d, h, w),
                                        ALIGN_CORNERS)
    offsets = sample_volume(flow.astype(jnp.float32), rigid, padding_mode="border")
    return rigid + offsets


def sample_volume(volume: jax.Array, grid: jax.Array, *, padding_mode: str = "zeros") -> jax.Array:
    """grid_sample_3d applied per example: volume [B, D, H, W, C], grid [B, Do, Ho, Wo, 3].

    The per-example vmap keeps the gather's batch dimension explicit (the sampler folds the
    batch into flat indices), so a batch-sharded volume stays sharded under data
    parallelism instead of being all-gathered for the lookup.
    """
    sample = grid_sample.grid_sample_3d

    def one(v, g):
        return sample(v[None], g[None], padding_mode=padding_mode, align_corners=ALIGN_CORNERS)[0]

    return jax.vmap(one)(volume, grid)


# ----------------------------------------------------------------------------- flow generator


class FlowGenerator(nnx.Module):
    """Non-rigid 3-D deformation from a motion + identity code (MegaPortraits' warping generator).

        cond [B, K] -> MLP -> seed [B, d0, h0, w0, C0]
          -> adaptive 3-D resblocks (AdaGN on cond), each doubling H, W (and D until it
             reaches the volume depth)
          -> GroupNorm, ReLU, 3x3x3 conv -> 3 channels -> max_flow * tanh
        -> flow [B, D, H, W, 3] (x, y, z offsets, normalised units)

    The output conv is initialised small, so an untrained warp is nearly rigid while every
    layer still receives gradient.
    """

    def __init__(
        self,
        cond_dim: int,
        *,
        volume_shape: Sequence[int],
        seed_channels: int,
        channels: Sequence[int],
        hidden: int,
        max_flow: float,
        groups: int,
        remat: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.volume_shape = tuple(int(s) for s in volume_shape)  # (D, H, W)
        depth, height, width = self.volume_shape
        n_up = len(channels)
        if height != width or height % (2**n_up):
            raise ValueError(
                f"FlowGenerator: volume {self.volume_shape} must be square in H, W and divisible "
                f"by 2^{n_up} ({n_up} upsampling blocks)"
            )
        self.seed_shape = (max(1, depth >> n_up), height >> n_up, width >> n_up, seed_channels)
        if self.seed_shape[0] * 2**n_up < depth:
            raise ValueError(f"FlowGenerator: depth {depth} is not reachable from the seed")
        self.cond_dim = cond_dim
        self.max_flow = float(max_flow)
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = layers.Dense(cond_dim, hidden, names=("embed", "mlp"), **kw)
        self.fc2 = layers.Dense(hidden, int(np.prod(self.seed_shape)), names=("mlp", "embed"), **kw)
        blocks = []
        d, c = self.seed_shape[0], seed_channels
        for out in channels:
            factor_d = 2 if d < depth else 1
            blocks.append(
                layers.ResBlock(
                    c, out, ndim=3, cond_dim=cond_dim, up=(factor_d, 2, 2), groups=groups,
                    remat=remat, **kw,
                )
            )
            d, c = d * factor_d, out
        self.blocks = nnx.List(blocks)
        self.norm = layers.GroupNorm(c, groups=groups, **kw)
        # The network's last conv: no weight standardisation (it would force zero-mean
        # filters on the flow), small init (see class docstring).
        self.out = layers.Conv(c, 3, (3, 3, 3), weight_std=False, init_scale=0.1, **kw)

    def __call__(self, cond: jax.Array) -> jax.Array:
        """cond: [B, cond_dim] -> flow [B, D, H, W, 3] float32, |flow| < max_flow."""
        if cond.ndim != 2 or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"FlowGenerator expects cond [B, {self.cond_dim}], got {cond.shape}")
        x = self.fc2(layers.relu(self.fc1(cond)))
        x = x.reshape((cond.shape[0],) + self.seed_shape)
        for block in self.blocks:
            x = block(x, cond)
        x = self.out(layers.relu(self.norm(x)))
        return self.max_flow * jnp.tanh(x.astype(jnp.float32))


class WarpGenerator(nnx.Module):
    """One warp direction: rigid pose transform + generated non-rigid flow, then sampling.

    direction "to_canonical": posed source volume -> canonical (w_s->c, uses the source's
    pose and dynamics); "to_driving": canonical volume -> driving pose (w_c->d).
    """

    def __init__(
        self,
        direction: str,
        *,
        dyn_dim: int,
        id_dim: int,
        volume_shape: Sequence[int],
        seed_channels: int,
        channels: Sequence[int],
        hidden: int,
        max_flow: float,
        groups: int,
        pivot_depth: float = 0.0,
        remat: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if direction not in DIRECTIONS:
            raise ValueError(
                f"WarpGenerator direction must be one of {DIRECTIONS}, got {direction!r}"
            )
        self.direction = direction
        self.pivot_depth = float(pivot_depth)
        self.dyn_dim = dyn_dim
        self.id_dim = id_dim
        self.flow = FlowGenerator(
            dyn_dim + id_dim, volume_shape=volume_shape, seed_channels=seed_channels,
            channels=channels, hidden=hidden, max_flow=max_flow, groups=groups, remat=remat,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )

    def grid(self, z_pose: jax.Array, z_dyn: jax.Array, z_id: jax.Array) -> jax.Array:
        """z_pose [B, 7], z_dyn [B, dyn_dim], z_id [B, id_dim] -> grid [B, D, H, W, 3]."""
        if z_dyn.shape[-1] != self.dyn_dim or z_id.shape[-1] != self.id_dim:
            raise ValueError(
                f"WarpGenerator expects z_dyn [B, {self.dyn_dim}] and z_id [B, {self.id_dim}], "
                f"got {z_dyn.shape} and {z_id.shape}"
            )
        cond = jnp.concatenate([z_dyn.astype(jnp.float32), z_id.astype(jnp.float32)], axis=-1)
        flow = self.flow(cond)
        if self.direction == "to_canonical":
            return source_to_canonical_grid(z_pose, flow, self.pivot_depth)
        return canonical_to_driving_grid(z_pose, flow, self.pivot_depth)

    def __call__(
        self, volume: jax.Array, z_pose: jax.Array, z_dyn: jax.Array, z_id: jax.Array
    ) -> jax.Array:
        """volume [B, D, H, W, C] -> warped volume [B, D, H, W, C] (zeros outside)."""
        expected = self.flow.volume_shape
        if volume.ndim != 5 or volume.shape[1:4] != expected:
            raise ValueError(
                f"WarpGenerator expects a volume [B, {expected}, C], got {volume.shape}"
            )
        return sample_volume(volume, self.grid(z_pose, z_dyn, z_id))
