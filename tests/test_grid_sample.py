"""grid_sample_{2,3}d / identity_grid / affine_grid_{2,3}d against torch (values and grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vasa_jax.ops import (
    affine_grid_2d,
    affine_grid_3d,
    grid_sample_2d,
    grid_sample_3d,
    identity_grid,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

SAMPLERS = {2: grid_sample_2d, 3: grid_sample_3d}
MODES = [(p, a) for p in ("zeros", "border") for a in (False, True)]


def _channels_first(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _torch_sample(x, grid, cotangent, padding_mode, align_corners):
    """torch reference on channels-last numpy arrays -> (out, d_x, d_grid), channels-last."""
    xt = _channels_first(x).requires_grad_(True)
    gt = torch.from_numpy(grid).requires_grad_(True)
    out = F.grid_sample(
        xt, gt, mode="bilinear", padding_mode=padding_mode, align_corners=align_corners
    )
    d_x, d_grid = torch.autograd.grad(out, (xt, gt), _channels_first(cotangent))
    return (
        np.moveaxis(out.detach().numpy(), 1, -1),
        np.moveaxis(d_x.numpy(), 1, -1),
        d_grid.numpy(),
    )


def _jax_sample(x, grid, cotangent, padding_mode, align_corners):
    ndim = grid.shape[-1]

    def sample(x, grid):
        return SAMPLERS[ndim](x, grid, padding_mode=padding_mode, align_corners=align_corners)

    out, vjp = jax.vjp(sample, jnp.asarray(x), jnp.asarray(grid))
    d_x, d_grid = vjp(jnp.asarray(cotangent))
    return np.asarray(out), np.asarray(d_x), np.asarray(d_grid)


def _compare(x, grid, padding_mode, align_corners, seed=0):
    out_shape = grid.shape[:-1] + (x.shape[-1],)
    cotangent = np.random.default_rng(seed).standard_normal(out_shape).astype(np.float32)
    ref = _torch_sample(x, grid, cotangent, padding_mode, align_corners)
    got = _jax_sample(x, grid, cotangent, padding_mode, align_corners)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5, rtol=0, err_msg="output")
    np.testing.assert_allclose(got[1], ref[1], atol=1e-5, rtol=0, err_msg="d/d input")
    np.testing.assert_allclose(got[2], ref[2], atol=1e-4, rtol=0, err_msg="d/d grid")
    return got


@pytest.mark.parametrize("ndim", [3, 2])
@pytest.mark.parametrize("padding_mode,align_corners", MODES)
def test_matches_torch_on_random_grid(ndim, padding_mode, align_corners):
    rng = np.random.default_rng(ndim)
    spatial = (5, 6, 7)[-ndim:]
    x = rng.standard_normal((2,) + spatial + (3,)).astype(np.float32)
    grid = rng.uniform(-1.3, 1.3, (2,) + (4, 3, 5)[-ndim:] + (ndim,)).astype(np.float32)
    flat = grid.reshape(-1, ndim)
    # Exactly on the borders and the centre, and far outside (all corners masked/clamped).
    flat[0], flat[1], flat[2], flat[3] = -1.0, 1.0, 0.0, -7.5
    flat[4, 0], flat[4, -1] = -1.0, 1.0
    flat[5, 0], flat[6, -1] = 1e10, -1e10  # Beyond int32 once unnormalised.
    got = _compare(x, grid, padding_mode, align_corners)
    assert np.abs(got[0]).max() > 0.1 and np.abs(got[2]).max() > 0.1  # Not trivially zero.


def _integer_points(sizes, align_corners, rng, count):
    """Grid points that land exactly on voxel indices (and half-way between), from one
    outside the input to one past it. Sizes are chosen so these are exact in float32
    whatever the operation order, hence torch and jax floor them identically."""
    points = []
    for n in sizes[::-1]:  # x (W) first.
        i = rng.integers(-2, 2 * n + 1, count) / 2.0  # Steps of half a voxel in [-1, n].
        if align_corners:
            points.append(2.0 * i / (n - 1) - 1.0)
        else:
            points.append((2.0 * i + 1.0) / n - 1.0)
    return np.stack(points, axis=-1).astype(np.float32)


@pytest.mark.parametrize("padding_mode,align_corners", MODES)
def test_gradients_at_integer_coordinates_match_torch(padding_mode, align_corners):
    """floor() is non-differentiable at integers: torch takes the difference towards the
    next voxel, masks corners outside, and (border) zeroes the gradient at the clamp
    limits. Grids made only of such points must still match torch exactly."""
    rng = np.random.default_rng(1)
    # align_corners=True needs n - 1 a power of two for exact coordinates, False needs n.
    sizes = (3, 5, 9) if align_corners else (2, 4, 8)
    x = rng.standard_normal((2,) + sizes + (4,)).astype(np.float32)
    grid = _integer_points(sizes, align_corners, rng, 2 * 4 * 4 * 6).reshape(2, 4, 4, 6, 3)
    _compare(x, grid, padding_mode, align_corners, seed=2)


@pytest.mark.parametrize("padding_mode,align_corners", MODES)
def test_identity_warp_reproduces_input(padding_mode, align_corners):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 6, 7, 3)).astype(np.float32)
    grid = jnp.broadcast_to(identity_grid(5, 6, 7, align_corners), (2, 5, 6, 7, 3))
    out = grid_sample_3d(x, grid, padding_mode=padding_mode, align_corners=align_corners)
    np.testing.assert_allclose(np.asarray(out), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grids_match_torch(align_corners):
    rng = np.random.default_rng(4)
    size = (5, 6, 7)
    identity = np.eye(3, 4, dtype=np.float32)[None]
    theta = (identity + 0.3 * rng.standard_normal((2, 3, 4))).astype(np.float32)
    for th in (identity, theta):
        ref = F.affine_grid(torch.from_numpy(th), (len(th), 1) + size, align_corners)
        got = affine_grid_3d(th, size, align_corners)
        assert got.shape == (len(th),) + size + (3,)
        np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        np.asarray(identity_grid(*size, align_corners=align_corners)),
        F.affine_grid(torch.from_numpy(identity), (1, 1) + size, align_corners)[0].numpy(),
        atol=1e-7,
        rtol=0,
    )
    theta_2d = (np.eye(2, 3) + 0.3 * rng.standard_normal((2, 2, 3))).astype(np.float32)
    ref = F.affine_grid(torch.from_numpy(theta_2d), (2, 1, 6, 7), align_corners)
    np.testing.assert_allclose(
        np.asarray(affine_grid_2d(theta_2d, (6, 7), align_corners)), ref.numpy(), atol=1e-6
    )
    # A size-1 axis sits at 0 in torch's convention.
    np.testing.assert_array_equal(np.asarray(identity_grid(1, 2, 3))[..., 2], 0.0)


def test_rigid_warp_composes_with_sampling():
    """affine_grid_3d + grid_sample_3d with a random 3x4 theta equals torch's pipeline."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 5, 6, 7, 3)).astype(np.float32)
    theta = (np.eye(3, 4) + 0.2 * rng.standard_normal((2, 3, 4))).astype(np.float32)
    grid = affine_grid_3d(theta, (4, 6, 5))
    ref = F.grid_sample(
        _channels_first(x), F.affine_grid(torch.from_numpy(theta), (2, 3, 4, 6, 5), False),
        mode="bilinear", padding_mode="zeros", align_corners=False,
    )
    np.testing.assert_allclose(
        np.asarray(grid_sample_3d(x, grid)), np.moveaxis(ref.numpy(), 1, -1), atol=1e-5
    )


def test_jit_vmap_and_bfloat16():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((3, 2, 5, 6, 7, 4)), jnp.float32)
    grid = jnp.asarray(rng.uniform(-1.2, 1.2, (3, 2, 4, 3, 5, 3)), jnp.float32)
    eager = np.stack([np.asarray(grid_sample_3d(x[i], grid[i])) for i in range(3)])
    batched = jax.jit(jax.vmap(lambda v, g: grid_sample_3d(v, g, padding_mode="zeros")))
    np.testing.assert_allclose(np.asarray(batched(x, grid)), eager, atol=1e-6, rtol=0)

    x_bf16 = x[0].astype(jnp.bfloat16)
    out = jax.jit(grid_sample_3d)(x_bf16, grid[0])
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), eager[0], atol=3e-2, rtol=3e-2)
    # The input gradient is accumulated in float32 and rounded once, so it stays close.
    def loss(v):
        return jnp.sum(grid_sample_3d(v, grid[0]).astype(jnp.float32) ** 2)

    d_bf16 = jax.grad(loss)(x_bf16)
    d_f32 = jax.grad(loss)(x_bf16.astype(jnp.float32))
    assert d_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(d_bf16, np.float32), d_f32, atol=5e-2, rtol=2e-2)


def test_rejects_bad_inputs():
    x = jnp.zeros((2, 5, 6, 7, 3))
    grid = jnp.zeros((2, 4, 3, 5, 3))
    with pytest.raises(ValueError, match="padding_mode"):
        grid_sample_3d(x, grid, padding_mode="reflection")
    with pytest.raises(ValueError, match="batch sizes differ"):
        grid_sample_3d(x, grid[:1])
    with pytest.raises(ValueError, match=r"grid must be \[B, Do, Ho, Wo, 3\]"):
        grid_sample_3d(x, grid[..., :2])
    with pytest.raises(ValueError, match=r"input must be \[B, H, W, C\]"):
        grid_sample_2d(x, grid[:, 0, ..., :2])
    with pytest.raises(TypeError, match="floating"):
        grid_sample_3d(x.astype(jnp.int32), grid)
    with pytest.raises(ValueError, match=r"theta must be \[B, 3, 4\]"):
        affine_grid_3d(jnp.zeros((1, 2, 3)), (4, 5, 6))
    with pytest.raises(ValueError, match="size must have 3 entries"):
        affine_grid_3d(jnp.zeros((1, 3, 4)), (5, 6))
