"""Multi-scale patch discriminator with spectral normalisation (MegaPortraits' GAN loss).

Each scale is a PatchGAN (pix2pixHD's NLayerDiscriminator layout) on the image average-
pooled by 2^scale: 4x4 stride-2 convs (LeakyReLU 0.2), a 4x4 stride-1 conv, and a 4x4
stride-1 conv to one logit per patch. It returns, per scale, the logits and every
intermediate activation (for the feature-matching loss).

Spectral normalisation: W / sigma(W), with sigma estimated by one power-iteration step per
call from a persistent vector u (an nnx.BatchStat, not a Param). flax's nnx.SpectralNorm is
not used: in flax 0.12.8 it writes the normalised kernel back into the wrapped layer's Param
(`orig_param[...] = W / sigma`), so the stored parameter is no longer the one the optimiser
updates. Here the Param stays raw and only u changes, and only when asked
(`update_stats=True`). Functionally, the trainer splits u out with the rest of the non-Param
state, merges it in the step and returns the updated state:

    graphdef, params, stats = nnx.split(disc, nnx.Param, nnx.BatchStat)
    def step(params, stats, images):
        disc = nnx.merge(graphdef, params, stats)
        outputs = disc(images, update_stats=True)
        return loss(outputs), nnx.state(disc, nnx.BatchStat)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vasa_jax.models import layers


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x)), eps))


class SNConv2D(nnx.Module):
    """2-D conv with a spectrally normalised kernel [kh, kw, in, out] (4x4 by default)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 4,
        stride: int = 2,
        padding: int = 1,
        eps: float = 1e-12,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = (stride, stride)
        self.padding = [(padding, padding)] * 2
        self.eps = eps
        self.dtype = dtype
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = layers.make_param(
            rngs, nnx.initializers.variance_scaling(1.0, "fan_in", "uniform"), shape,
            (None, None, "conv_in", "conv_out"), param_dtype,
        )
        self.bias = layers.make_param(
            None, nnx.initializers.zeros_init(), (out_channels,), ("conv_out",), param_dtype
        )
        u = jax.random.normal(rngs.params(), (out_channels,), jnp.float32)
        self.u = nnx.BatchStat(_l2_normalize(u))  # right singular vector estimate

    def sigma(self, update_stats: bool) -> jax.Array:
        """Largest singular value of the [kh*kw*in, out] kernel matrix (one power step)."""
        w = self.kernel[...].astype(jnp.float32).reshape(-1, self.out_channels)
        u = self.u[...]
        v = jax.lax.stop_gradient(_l2_normalize(w @ u, self.eps))
        u = jax.lax.stop_gradient(_l2_normalize(w.T @ v, self.eps))
        if update_stats:
            self.u[...] = u
        # Differentiable in W (as in Miyato et al.): d sigma / dW = v u^T.
        return v @ (w @ u)

    def __call__(self, x: jax.Array, *, update_stats: bool) -> jax.Array:
        """x [B, H, W, in] -> [B, H', W', out]."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"SNConv2D expects [B, H, W, {self.in_channels}], got {x.shape}")
        kernel = self.kernel[...].astype(jnp.float32) / self.sigma(update_stats)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(self.dtype)


class PatchDiscriminator(nnx.Module):
    """One scale: len(channels) stride-2 convs, a stride-1 conv, a stride-1 conv to 1 logit."""

    def __init__(self, *, in_channels: int, channels: Sequence[int], rngs: nnx.Rngs, **kw):
        convs, c = [], in_channels
        for out in channels:
            convs.append(SNConv2D(c, out, stride=2, rngs=rngs, **kw))
            c = out
        convs.append(SNConv2D(c, c, stride=1, rngs=rngs, **kw))
        self.convs = nnx.List(convs)
        self.to_logits = SNConv2D(c, 1, stride=1, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, *, update_stats: bool) -> tuple[jax.Array, list[jax.Array]]:
        features = []
        for conv in self.convs:
            x = jax.nn.leaky_relu(conv(x, update_stats=update_stats), 0.2)
            features.append(x)
        logits = self.to_logits(x, update_stats=update_stats).astype(jnp.float32)
        return logits, features


class MultiScaleDiscriminator(nnx.Module):
    """`scales` PatchDiscriminators on the image at 1, 1/2, 1/4, ... resolution."""

    def __init__(
        self,
        *,
        image_size: int,
        scales: int,
        channels: Sequence[int],
        in_channels: int = 3,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        smallest = image_size >> (scales - 1 + len(channels))
        if scales < 1 or smallest < 2:
            raise ValueError(
                f"MultiScaleDiscriminator: {scales} scales of {len(channels)} stride-2 layers "
                f"do not fit a {image_size}px image"
            )
        self.image_size = image_size
        self.in_channels = in_channels
        self.scales = nnx.List([
            PatchDiscriminator(
                in_channels=in_channels, channels=tuple(channels), dtype=dtype,
                param_dtype=param_dtype, rngs=rngs,
            )
            for _ in range(scales)
        ])

    def __call__(
        self, images: jax.Array, *, update_stats: bool
    ) -> list[tuple[jax.Array, list[jax.Array]]]:
        """images [B, S, S, in_channels] -> per scale (logits [B, h, w, 1], features).

        update_stats: advance the spectral-norm power iteration (True in the discriminator's
        training step; False for the generator's step and evaluation, which must not move it).
        """
        expected = (self.image_size, self.image_size, self.in_channels)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"MultiScaleDiscriminator expects [B, {expected}], got {images.shape}")
        outputs, x = [], images
        for i, disc in enumerate(self.scales):
            if i:
                x = layers.avg_pool(x, (2, 2))
            outputs.append(disc(x, update_stats=update_stats))
        return outputs


def build_discriminator(model_cfg, *, rngs: nnx.Rngs) -> MultiScaleDiscriminator:
    """The discriminator of configs/face_latent.py's `model` section."""
    d = model_cfg.discriminator
    return MultiScaleDiscriminator(
        image_size=model_cfg.image_size, scales=d.scales, channels=tuple(d.channels),
        dtype=jnp.dtype(model_cfg.dtype), param_dtype=jnp.dtype(model_cfg.param_dtype), rngs=rngs,
    )
