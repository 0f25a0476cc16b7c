"""Numerical ops shared by the models (pure jax.numpy, jit/vmap/grad-friendly)."""

from vasa_jax.ops.grid_sample import (
    PADDING_MODES,
    affine_grid_2d,
    affine_grid_3d,
    grid_sample_2d,
    grid_sample_3d,
    identity_grid,
)

__all__ = [
    "PADDING_MODES",
    "affine_grid_2d",
    "affine_grid_3d",
    "grid_sample_2d",
    "grid_sample_3d",
    "identity_grid",
]
