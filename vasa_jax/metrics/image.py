"""Image reconstruction metrics: PSNR and SSIM, batched, in jnp (jit- and vmap-friendly).

Images are float arrays [..., H, W, C] (any leading batch dims; one value per image is
returned, shape [...]). Their value range is given explicitly, because this project
uses two conventions: model inputs and outputs live in [-1, 1] (the default,
`value_range=(-1, 1)`), while many outside tools use [0, 1] (`value_range=(0, 1)`), or
uint8-like [0, 255]. Both metrics are reported as for the same images mapped affinely to
[0, 1], the convention of the literature, so the numbers do not depend on the range used:
PSNR only sees the range's width (its peak), while SSIM's luminance term depends on
absolute intensities, so `ssim` maps images to [0, 1] first. Values outside the range are
NOT clipped here; clip generated images first if the model can overshoot (the evaluators
do).

SSIM follows Wang et al. 2004 ("Image quality assessment: from error visibility to
structural similarity"): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
local statistics over the 'valid' part of the image (no padding), averaged over pixels
and channels. This is also what `skimage.metrics.structural_similarity(...,
gaussian_weights=True, use_sample_covariance=False)` computes, up to its border crop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_RANGE = (-1.0, 1.0)


def _data_range(value_range: tuple[float, float]) -> float:
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    return hi - lo


def _check_pair(x: jax.Array, y: jax.Array, name: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{name}: images have different shapes {x.shape} and {y.shape}")
    if x.ndim < 3:
        raise ValueError(f"{name}: expected images [..., H, W, C], got shape {x.shape}")


def mse(x: jax.Array, y: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error per image: [..., H, W, C] x 2 -> [...] (float32).

    mask: optional [H, W] 0/1 (or non-negative) pixel weights, the same for every image:
    the error is averaged over the weighted pixels only (e.g. a face region's box).
    """
    _check_pair(x, y, "mse")
    d = x.astype(jnp.float32) - y.astype(jnp.float32)
    if mask is None:
        return jnp.mean(d * d, axis=(-3, -2, -1))
    if mask.shape != x.shape[-3:-1]:
        raise ValueError(f"mse: mask {mask.shape} does not match the images' H, W "
                         f"{x.shape[-3:-1]}")
    w = jnp.asarray(mask, jnp.float32)[:, :, None]
    return jnp.sum(d * d * w, axis=(-3, -2, -1)) / (jnp.sum(w) * x.shape[-1])


def psnr(
    x: jax.Array, y: jax.Array, *, value_range: tuple[float, float] = DEFAULT_RANGE,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Peak signal-to-noise ratio in dB per image: [..., H, W, C] x 2 -> [...].

    PSNR = 10 log10(L^2 / MSE) with L = high - low of `value_range`; +inf for identical
    images. Average PSNR over a data set as the mean of the per-image values (the usual
    convention), after dropping or capping infinities if identical pairs can occur.
    mask: [H, W] pixel weights (`mse`): the PSNR of a region, e.g. the mouth's box.
    """
    peak = _data_range(value_range)
    return 10.0 * jnp.log10(peak * peak / mse(x, y, mask=mask))


def gaussian_kernel(size: int = 11, sigma: float = 1.5) -> jax.Array:
    """Normalised 1-D Gaussian window [size] (sums to 1)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"the SSIM window size must be odd and >= 1, got {size}")
    if sigma <= 0:
        raise ValueError(f"the SSIM window sigma must be > 0, got {sigma}")
    t = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
    k = jnp.exp(-0.5 * (t / sigma) ** 2)
    return k / jnp.sum(k)


def _filter_valid(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Separable 'valid' filtering of every channel: [N, H, W, C] -> [N, H-k+1, W-k+1, C]."""
    c = x.shape[-1]
    k = kernel.shape[0]
    # Depthwise convolutions (feature_group_count = C): one window per channel, rows then
    # columns. HIGHEST precision: SSIM subtracts nearly equal local moments.
    dn = ("NHWC", "HWIO", "NHWC")
    rows = jnp.tile(kernel.reshape(k, 1, 1, 1), (1, 1, 1, c))
    cols = jnp.tile(kernel.reshape(1, k, 1, 1), (1, 1, 1, c))
    for w in (rows, cols):
        x = jax.lax.conv_general_dilated(
            x, w, window_strides=(1, 1), padding="VALID", dimension_numbers=dn,
            feature_group_count=c, precision=jax.lax.Precision.HIGHEST,
        )
    return x


def ssim_map(
    x: jax.Array,
    y: jax.Array,
    *,
    value_range: tuple[float, float] = DEFAULT_RANGE,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Local SSIM values: [..., H, W, C] x 2 -> [..., H - f + 1, W - f + 1, C] (f = filter_size)."""
    _check_pair(x, y, "ssim")
    *batch, h, w, c = x.shape
    if min(h, w) < filter_size:
        raise ValueError(f"ssim: images {h}x{w} are smaller than the {filter_size}x{filter_size} "
                         "window; pass a smaller filter_size")
    # SSIM's luminance term (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) is not invariant to
    # an intensity offset: compute it on images mapped to [0, 1] (data range L = 1).
    lo, peak = float(value_range[0]), _data_range(value_range)
    c1, c2 = k1**2, k2**2
    kernel = gaussian_kernel(filter_size, filter_sigma)
    x = ((x.astype(jnp.float32) - lo) / peak).reshape(-1, h, w, c)
    y = ((y.astype(jnp.float32) - lo) / peak).reshape(-1, h, w, c)
    # One filtering pass over the five moment images stacked along the batch axis.
    n = x.shape[0]
    moments = _filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=0), kernel)
    mu_x, mu_y, xx, yy, xy = (moments[i * n:(i + 1) * n] for i in range(5))
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    out = num / den
    return out.reshape(*batch, *out.shape[1:])


def ssim(
    x: jax.Array,
    y: jax.Array,
    *,
    value_range: tuple[float, float] = DEFAULT_RANGE,
    filter_size: int = 11,
    filter_sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Structural similarity per image: [..., H, W, C] x 2 -> [...], 1 for identical images.

    Symmetric in x and y; in [-1, 1] (close to 0 for unrelated images). Computed on the
    images mapped from `value_range` to [0, 1]; see the module docstring. Images need
    H, W >= filter_size.
    """
    local = ssim_map(x, y, value_range=value_range, filter_size=filter_size,
                     filter_sigma=filter_sigma, k1=k1, k2=k2)
    return jnp.mean(local, axis=(-3, -2, -1))
