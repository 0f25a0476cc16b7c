"""Hinge GAN losses and feature matching for a multi-scale patch discriminator.

MegaPortraits [MP sec 3.1]: L_GAN = 1 * L_adv + 40 * L_FM with a multi-scale patch
discriminator and the hinge loss (face-vid2vid uses the same pair). The discriminator
(`vasa_jax.models.discriminator.MultiScaleDiscriminator`) returns, per scale,
(logits [B, h, w, 1], [feature maps [B, h_k, w_k, C_k], ...]); split them with
`split_outputs` and pass the per-scale lists here.

Reductions: each scale's term is a mean over its patches and batch; terms are averaged over
scales (and, for feature matching, over the layers of all scales), so loss weights mean
the same whatever the number of scales and layers.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def split_outputs(
    outputs: Sequence[tuple[jax.Array, Sequence[jax.Array]]],
) -> tuple[list[jax.Array], list[list[jax.Array]]]:
    """Discriminator output [(logits, features)] per scale -> (logits list, features lists)."""
    return [o[0] for o in outputs], [list(o[1]) for o in outputs]


def _check_scales(*lists: Sequence) -> None:
    if not lists[0] or any(len(x) != len(lists[0]) for x in lists):
        raise ValueError(f"need the same (non-zero) number of scales, got "
                         f"{[len(x) for x in lists]}")


def hinge_d_loss(real_logits: Sequence[jax.Array], fake_logits: Sequence[jax.Array]) -> jax.Array:
    """Discriminator hinge loss: mean over scales of E[relu(1 - D(real))] + E[relu(1 + D(fake))].

    real_logits, fake_logits: per scale, logits [B, h_s, w_s, 1] (any equal shapes).
    Returns a float32 scalar >= 0; it is 0 once real logits >= 1 and fake ones <= -1.
    The caller stops gradients into the generator (fake images are computed outside the
    discriminator's loss or passed through jax.lax.stop_gradient).
    """
    _check_scales(real_logits, fake_logits)
    terms = [
        jnp.mean(jax.nn.relu(1.0 - r.astype(jnp.float32)))
        + jnp.mean(jax.nn.relu(1.0 + f.astype(jnp.float32)))
        for r, f in zip(real_logits, fake_logits)
    ]
    return jnp.mean(jnp.stack(terms))


def hinge_g_loss(fake_logits: Sequence[jax.Array]) -> jax.Array:
    """Generator hinge loss: mean over scales of -E[D(fake)].

    fake_logits: per scale, logits [B, h_s, w_s, 1] of generated images.
    Returns a float32 scalar (unbounded: pushing fake logits up lowers it).
    """
    _check_scales(fake_logits)
    return jnp.mean(jnp.stack([-jnp.mean(f.astype(jnp.float32)) for f in fake_logits]))


def feature_matching_loss(
    real_features: Sequence[Sequence[jax.Array]], fake_features: Sequence[Sequence[jax.Array]]
) -> jax.Array:
    """Mean over scales and layers of mean |F(fake) - F(real)| (pix2pixHD feature matching).

    real_features, fake_features: per scale, a list of the discriminator's intermediate
      maps [B, h_k, w_k, C_k] (the same structure on both sides). Real features are targets:
      no gradient flows into them.
    Returns a float32 scalar >= 0.
    """
    _check_scales(real_features, fake_features)
    terms = []
    for s, (reals, fakes) in enumerate(zip(real_features, fake_features)):
        if len(reals) != len(fakes) or not reals:
            raise ValueError(f"scale {s}: {len(reals)} real vs {len(fakes)} fake feature maps")
        for r, f in zip(reals, fakes):
            if r.shape != f.shape:
                raise ValueError(f"scale {s}: feature shapes differ: {r.shape} vs {f.shape}")
            r = jax.lax.stop_gradient(r).astype(jnp.float32)
            terms.append(jnp.mean(jnp.abs(f.astype(jnp.float32) - r)))
    return jnp.mean(jnp.stack(terms))
