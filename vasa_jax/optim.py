"""Optimizers from the `optim` config sections (configs.common.optim_config).

    tx = build_optimizer(config.optim, config.train.total_steps)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

One recipe for every network (MegaPortraits'): global-norm gradient clipping, then AdamW
with betas (0.5, 0.999), eps 1e-8 and decoupled weight decay 1e-2 on weight matrices /
kernels, under a cosine learning-rate schedule from `lr` to `end_lr` over the run, with an
optional linear warmup. A GAN stage builds two of them (generator and discriminator), each
from its own config section.
"""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """step -> learning rate: linear 0 -> lr over warmup_steps, then cosine lr -> end_lr.

    The cosine ends at `total_steps` and stays at end_lr after it (a run extended past its
    planned length keeps training at the final rate).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= cfg.warmup_steps < total_steps:
        raise ValueError(f"warmup_steps {cfg.warmup_steps} must be in [0, {total_steps})")
    if cfg.warmup_steps == 0:
        return optax.cosine_decay_schedule(cfg.lr, total_steps, alpha=cfg.end_lr / cfg.lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
        decay_steps=total_steps, end_value=cfg.end_lr,
    )


def decay_mask(params):
    """True for leaves that get weight decay: arrays of rank >= 2 (kernels, embeddings)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(cfg: ml_collections.ConfigDict,
                    total_steps: int) -> optax.GradientTransformation:
    """Clip (if cfg.grad_clip > 0) then AdamW under `learning_rate_schedule`."""
    adamw = optax.adamw(
        learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=decay_mask,
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
