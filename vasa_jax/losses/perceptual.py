"""Perceptual loss: weighted L1 between VGG19 feature maps over an image pyramid.

face-vid2vid [FV App. A] / MegaPortraits [MP sec 3.1]: for each pyramid level s (the images
downscaled by 2^s) and each tap l (relu1_1 .. relu5_1),

    L = sum_s sum_l w_l * mean |phi_l(x_s) - phi_l(y_s)|,   w = (1/32, 1/16, 1/8, 1/4, 1)

with y the target (no gradient through its features). face-vid2vid uses 4 levels (the image
and 3 downscales); the pyramid here averages 2x2 blocks per level (an anti-aliasing box
filter), which is simpler than its Gaussian blur and serves the same purpose.

`features` is any callable images -> list of feature maps, e.g. a
`vasa_jax.models.vgg19.VGG19Features` (frozen: the trainer keeps its parameters out of the
optimised state). Inside a jitted step, pass the VGG's state as an argument and
`nnx.merge` it there: a closed-over model's ~50 MB of weights become compile-time constants,
which roughly doubles XLA's compile time.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

VGG_LAYER_WEIGHTS = (0.03125, 0.0625, 0.125, 0.25, 1.0)

FeatureFn = Callable[[jax.Array], Sequence[jax.Array]]


def downsample2(images: jax.Array) -> jax.Array:
    """2x2 average pooling: [B, H, W, C] -> [B, H // 2, W // 2, C] (odd edges dropped)."""
    b, h, w, c = images.shape
    x = images[:, : h - h % 2, : w - w % 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def image_pyramid(images: jax.Array, num_scales: int) -> list[jax.Array]:
    """[images, images / 2, ..., images / 2^(num_scales - 1)], each [B, H / 2^s, W / 2^s, C]."""
    if num_scales < 1:
        raise ValueError(f"num_scales must be >= 1, got {num_scales}")
    levels = [images]
    for _ in range(num_scales - 1):
        levels.append(downsample2(levels[-1]))
    return levels


def perceptual_loss(
    features: FeatureFn,
    x: jax.Array,
    y: jax.Array,
    *,
    layer_weights: Sequence[float] = VGG_LAYER_WEIGHTS,
    num_scales: int = 1,
) -> jax.Array:
    """Weighted L1 between features of x and y over `num_scales` pyramid levels.

    Args:
      features: images [N, H, W, 3] -> list of feature maps [N, h_l, w_l, C_l].
      x: [B, H, W, 3] generated images in [-1, 1] (gradients flow to x).
      y: [B, H, W, 3] target images in [-1, 1] (treated as constant).
      layer_weights: one weight per feature map `features` returns.
      num_scales: pyramid levels (1 = full resolution only; face-vid2vid uses 4). The
        smallest level must still be a valid input of `features` (VGG19: >= 16 px).

    Returns:
      float32 scalar: sum over levels and layers of weight * mean absolute difference.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"perceptual_loss needs x, y of equal shape [B, H, W, C], got "
                         f"{x.shape} and {y.shape}")
    y = jax.lax.stop_gradient(y).astype(x.dtype)
    total = jnp.zeros((), jnp.float32)
    # Two calls rather than one on [x; y]: a batched call would also run the backward pass
    # over y's half of the batch (its cotangent is zero, but XLA still computes it).
    for x_s, y_s in zip(image_pyramid(x, num_scales), image_pyramid(y, num_scales)):
        maps_x, maps_y = features(x_s), features(y_s)
        if len(maps_x) != len(layer_weights):
            raise ValueError(f"features returned {len(maps_x)} maps but {len(layer_weights)} "
                             "layer_weights were given")
        for weight, fx, fy in zip(layer_weights, maps_x, maps_y):
            fy = jax.lax.stop_gradient(fy)
            total = total + weight * jnp.mean(jnp.abs(fx.astype(jnp.float32)
                                                      - fy.astype(jnp.float32)))
    return total
