"""Differentiable trilinear / bilinear sampling (torch.nn.functional.grid_sample in JAX).

The face latent decoder warps the canonical appearance volume V_app [B, D, H, W, C] with a
dense sampling grid (rigid pose warp composed with a non-rigid flow, as in MegaPortraits).
This module is that sampler, channels-last, plus the grids the rigid warp starts from.

Coordinate convention (identical to torch's grid_sample / affine_grid, mode="bilinear",
which is trilinear for 5-D inputs):
  * grid[..., 0] = x indexes W (the last spatial axis), grid[..., 1] = y indexes H,
    grid[..., 2] = z indexes D. Values are normalised to [-1, 1].
  * align_corners=True: -1 and +1 are the centres of the first and last voxels,
    i.e. voxel i sits at -1 + 2 i / (n - 1).
    align_corners=False: -1 and +1 are the outer edges of the first and last voxels,
    i.e. voxel i sits at (2 i + 1) / n - 1.
  * padding_mode="zeros": the input is zero outside its extent, so a sample that straddles
    the boundary blends towards zero. padding_mode="border": coordinates are clamped to the
    extent first (edge voxels repeat forever).

Implementation: for each of the 2^n corners of the cell around every sample, gather one
C-vector from the flattened input (channels-last makes each corner one contiguous row) and
accumulate it with its weight. Corners outside the input are given weight zero and an
in-range index, so the gathers never go out of bounds. No one-hot or dense interpolation
matrix is built: memory is O(input + output); the backward pass is a scatter-add into the
input gradient.

Gradients match torch's hand-written backward exactly, including its conventions at the
non-differentiable points: floor() is treated as a constant (at an integer coordinate the
derivative is the one-sided difference towards the next voxel), corners outside the input
contribute nothing, and with border padding a coordinate on or beyond the clamp limits gets
zero gradient (torch treats the borders as outside).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PADDING_MODES = ("zeros", "border")

# Flat gather indices are int32 (what accelerators gather with fastest).
_MAX_FLAT_SIZE = 2**31 - 1


def grid_sample_3d(
    volume: jax.Array,
    grid: jax.Array,
    *,
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> jax.Array:
    """Samples a volume at normalised 3-D coordinates with trilinear interpolation.

    Equivalent to `torch.nn.functional.grid_sample(volume, grid, mode="bilinear",
    padding_mode=padding_mode, align_corners=align_corners)` on 5-D inputs, channels-last.

    Args:
      volume: [B, D, H, W, C] float array.
      grid: [B, Do, Ho, Wo, 3] float array of (x, y, z) in [-1, 1] (values outside are
        allowed and handled by `padding_mode`); x indexes W, y indexes H, z indexes D.
        Must be finite.
      padding_mode: "zeros" or "border".
      align_corners: whether +-1 are the centres (True) or outer edges (False) of the
        corner voxels.

    Returns:
      [B, Do, Ho, Wo, C] array with volume's dtype. Interpolation (and the gradient
      w.r.t. volume) is accumulated in at least float32, also for bfloat16 volumes.
    """
    return _grid_sample(volume, grid, 3, padding_mode, align_corners)


def grid_sample_2d(
    image: jax.Array,
    grid: jax.Array,
    *,
    padding_mode: str = "zeros",
    align_corners: bool = False,
) -> jax.Array:
    """Samples an image at normalised 2-D coordinates with bilinear interpolation.

    Equivalent to `torch.nn.functional.grid_sample(image, grid, mode="bilinear", ...)` on
    4-D inputs, channels-last. Same conventions as `grid_sample_3d`.

    Args:
      image: [B, H, W, C] float array.
      grid: [B, Ho, Wo, 2] float array of (x, y); x indexes W, y indexes H.
      padding_mode: "zeros" or "border".
      align_corners: see the module docstring.

    Returns:
      [B, Ho, Wo, C] array with image's dtype.
    """
    return _grid_sample(image, grid, 2, padding_mode, align_corners)


def identity_grid(d: int, h: int, w: int, align_corners: bool = False) -> jax.Array:
    """Normalised coordinates of the voxel centres of a [d, h, w] volume.

    `grid_sample_3d(volume, identity_grid(D, H, W, ac)[None], align_corners=ac)` returns
    `volume` (up to float rounding). Matches torch's affine_grid with the identity theta.

    Returns:
      [d, h, w, 3] float32 array; [..., 0] = x (varies along w), [..., 1] = y (along h),
      [..., 2] = z (along d).
    """
    return jnp.asarray(_identity_grid_np((d, h, w), align_corners))


def affine_grid_3d(
    theta: jax.Array, size: Sequence[int], align_corners: bool = False
) -> jax.Array:
    """Sampling grid of a batch of 3-D affine transforms (torch's affine_grid, 5-D).

    For every output voxel with normalised centre p = (x, y, z), the grid holds
    theta[b] @ (x, y, z, 1): where to read from in the input volume.

    Args:
      theta: [B, 3, 4] float array (rows give x, y, z; last column is the translation).
      size: (D, H, W) of the output grid. (torch takes (B, C, D, H, W); B comes from theta
        and C is irrelevant.)
      align_corners: as in `grid_sample_3d`; use the same value for both calls.

    Returns:
      [B, D, H, W, 3] array, ready for `grid_sample_3d`.
    """
    return _affine_grid(theta, size, 3, align_corners)


def affine_grid_2d(
    theta: jax.Array, size: Sequence[int], align_corners: bool = False
) -> jax.Array:
    """Sampling grid of a batch of 2-D affine transforms (torch's affine_grid, 4-D).

    Args:
      theta: [B, 2, 3] float array.
      size: (H, W) of the output grid.
      align_corners: as in `grid_sample_2d`.

    Returns:
      [B, H, W, 2] array, ready for `grid_sample_2d`.
    """
    return _affine_grid(theta, size, 2, align_corners)


# --------------------------------------------------------------------------- sampling


def _grid_sample(x, grid, ndim, padding_mode, align_corners):
    x = jnp.asarray(x)
    grid = jnp.asarray(grid)
    name = f"grid_sample_{ndim}d"
    layout = "[B, D, H, W, C]" if ndim == 3 else "[B, H, W, C]"
    grid_layout = "[B, Do, Ho, Wo, 3]" if ndim == 3 else "[B, Ho, Wo, 2]"
    if x.ndim != ndim + 2:
        raise ValueError(f"{name}: input must be {layout}, got shape {x.shape}")
    if grid.ndim != ndim + 2 or grid.shape[-1] != ndim:
        raise ValueError(f"{name}: grid must be {grid_layout}, got shape {grid.shape}")
    if grid.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name}: batch sizes differ: input {x.shape[0]} vs grid {grid.shape[0]}"
        )
    if not all(jnp.issubdtype(a.dtype, jnp.floating) for a in (x, grid)):
        raise TypeError(f"{name}: input and grid must be floating: {x.dtype}, {grid.dtype}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"{name}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}"
        )
    if min(x.shape[1:-1]) < 1:
        raise ValueError(f"{name}: input has an empty spatial axis: {x.shape}")
    if int(np.prod(x.shape[:-1])) > _MAX_FLAT_SIZE:
        raise ValueError(f"{name}: input {x.shape} has more than 2^31 - 1 voxels in the batch")
    # Plain autodiff (no jax.checkpoint, no custom_vjp): inside one jit XLA already fuses
    # each corner gather into its consumers, forward and backward. A remat barrier here
    # only blocked that fusion: fwd+bwd temp memory rose from 386 to 506 MiB on CPU at the
    # decoder's shape (benchmarks/bench_grid_sample.py).
    return _sample(
        x, grid, ndim=ndim, padding_mode=padding_mode, align_corners=bool(align_corners)
    )


def _sample(x, grid, *, ndim, padding_mode, align_corners):
    """x: [B, *S, C] with len(S) == ndim; grid: [B, *So, ndim] -> [B, *So, C]."""
    batch, spatial, channels = x.shape[0], x.shape[1:-1], x.shape[-1]
    out_spatial = grid.shape[1:-1]
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    grid = grid.astype(jnp.promote_types(grid.dtype, jnp.float32))

    # Per spatial axis (D, H, W order): the two neighbouring indices and their weights.
    # grid's last axis is reversed: component 0 (x) indexes the last spatial axis (W).
    axes = [
        _axis_corners(grid[..., ndim - 1 - a], spatial[a], padding_mode, align_corners)
        for a in range(ndim)
    ]

    # Upcast before the gather (XLA fuses the convert into it) so that the backward
    # scatter-add also accumulates the input gradient in float32, rounding once at the end.
    flat = x.reshape(batch * int(np.prod(spatial)), channels).astype(acc_dtype)
    batch_index = jnp.arange(batch, dtype=jnp.int32).reshape((batch,) + (1,) * ndim)
    out = jnp.zeros((batch * int(np.prod(out_spatial)), channels), acc_dtype)
    # 2^ndim static iterations (8 for volumes): one gather of C-vectors per cell corner.
    for corner in itertools.product((0, 1), repeat=ndim):
        index = batch_index
        weight = None
        for a, side in enumerate(corner):
            axis_index, axis_weight = axes[a][side]
            index = index * spatial[a] + axis_index
            weight = axis_weight if weight is None else weight * axis_weight
        # Indices are clipped in range above; promising it lets XLA skip bounds handling.
        values = flat.at[index.reshape(-1)].get(mode="promise_in_bounds")
        out = out + weight.reshape(-1, 1).astype(acc_dtype) * values
    return out.reshape((batch,) + out_spatial + (channels,)).astype(x.dtype)


def _axis_corners(coord, size, padding_mode, align_corners):
    """Neighbours of normalised coordinates along one axis of length `size`.

    Returns ((i0, w0), (i1, w1)): int32 indices clipped into [0, size) and float weights,
    with the weight of a neighbour outside the axis set to zero.
    """
    # Same operation order as torch's grid_sampler_unnormalize, so that points which land
    # on integers there land on the same integers here (floor, hence gradients, agree).
    if align_corners:
        pos = (coord + 1) / 2 * (size - 1)
    else:
        pos = ((coord + 1) * size - 1) / 2
    if padding_mode == "border":
        # jnp.where rather than jnp.clip: at the clip limits jnp.clip's gradient is 1/2
        # (lax.max splits ties), torch's is 0 (it counts the borders as outside).
        limit = size - 1
        pos = jnp.where(pos <= 0, 0.0, jnp.where(pos >= limit, float(limit), pos))
    else:
        # Far outside, every neighbour is masked anyway. Clipping to [-2, size + 1] keeps
        # that split intact and the int32 cast below in range (XLA saturates out-of-range
        # casts today, but the `+ 1` after a saturated cast would wrap around).
        pos = jnp.clip(pos, -2.0, size + 1.0)
    lower = jnp.floor(pos)  # zero gradient: torch's convention at integer coordinates.
    w_upper = pos - lower
    w_lower = (lower + 1) - pos
    i_lower = lower.astype(jnp.int32)
    i_upper = i_lower + 1
    result = []
    for index, weight in ((i_lower, w_lower), (i_upper, w_upper)):
        inside = (index >= 0) & (index < size)
        result.append((jnp.clip(index, 0, size - 1), jnp.where(inside, weight, 0.0)))
    return tuple(result)


# --------------------------------------------------------------------------- grids


def _linspace_np(n: int, align_corners: bool) -> np.ndarray:
    """torch's linspace_from_neg_one in float32: n points in [-1, 1], symmetric about 0."""
    if n <= 1:
        return np.zeros((n,), np.float32)
    i = np.arange(n)
    step = np.float32(2) / np.float32(n - 1)
    # Fill each half from its own end (as torch.linspace does) so the result is exactly
    # antisymmetric and ends exactly at +-1.
    values = np.where(
        i < n // 2,
        np.float32(-1) + step * i.astype(np.float32),
        np.float32(1) - step * (n - 1 - i).astype(np.float32),
    ).astype(np.float32)
    if not align_corners:
        values = (values * np.float32(n - 1) / np.float32(n)).astype(np.float32)
    return values


def _identity_grid_np(sizes: Sequence[int], align_corners: bool) -> np.ndarray:
    """sizes: spatial sizes, slowest first (D, H, W) -> [*sizes, len(sizes)], x first."""
    sizes = tuple(int(s) for s in sizes)
    if any(s < 1 for s in sizes):
        raise ValueError(f"identity grid sizes must be positive, got {sizes}")
    axes = np.meshgrid(*[_linspace_np(s, align_corners) for s in sizes], indexing="ij")
    return np.stack(axes[::-1], axis=-1)  # (x, y[, z]): fastest-varying axis first.


def _affine_grid(theta, size, ndim, align_corners):
    theta = jnp.asarray(theta)
    name = f"affine_grid_{ndim}d"
    if theta.ndim != 3 or theta.shape[1:] != (ndim, ndim + 1):
        raise ValueError(f"{name}: theta must be [B, {ndim}, {ndim + 1}], got {theta.shape}")
    if len(size) != ndim:
        raise ValueError(f"{name}: size must have {ndim} entries, got {tuple(size)}")
    base = _identity_grid_np(size, align_corners)
    base = np.concatenate([base, np.ones(base.shape[:-1] + (1,), np.float32)], axis=-1)
    dtype = jnp.promote_types(theta.dtype, jnp.float32)
    # HIGHEST: the default matmul precision on TPU (and TF32 on GPU) would round the
    # coordinates to ~3 significant digits, i.e. sub-voxel errors in the warp.
    return jnp.einsum(
        "...j,bij->b...i",
        jnp.asarray(base, dtype),
        theta.astype(dtype),
        precision=jax.lax.Precision.HIGHEST,
    )
