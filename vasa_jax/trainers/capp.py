"""Trains CAPP, the contrastive audio-pose model (vasa_jax.models.capp), in the shared loop.

    python train.py --config configs/capp.py:size=tiny --workdir runs/capp \
        --config.data.path=data/synthtalk

Each example is a window of a clip from the stage-2 loader
(`data_pipeline.loaders.stage2_dataset`, no context), M = max |loss.shift_negatives| frames
longer than the model's 3 s at both ends: its motion (data.motion_source; the model reads
the model.pose_dims columns) and its audio features. One jitted step: normalise both with
the train split's per-dimension statistics (the same `data_pipeline.stats.Normalization`
stage 2 uses, kept in <workdir>/normalization.json for the evaluators); embed the centre
3 s of pose, the centre 3 s of audio and the audio shifted by each of
loss.shift_negatives (one batched pass); symmetric InfoNCE over the batch with the shifted
audio as extra negatives for its own pose (`capp.clip_loss`); AdamW. The loop keeps an EMA
of the model, which is what the evaluators restore.

Logged: loss/total, accuracy (in-batch top-1 retrieval), shift/accuracy (the true timing
beats every shifted one), cos/positive, cos/negative, cos/shifted, logit_scale, grad_norm,
lr.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from data_pipeline import stats as stats_lib
from data_pipeline.loaders import stage2_dataset
from vasa_jax import optim
from vasa_jax.models import capp
from vasa_jax.trainers import loop
from vasa_jax.trainers.motion_dit import load_normalization

BATCH_KEYS = ("motion", "audio")
PROGRESS_KEYS = ("loss/total", "accuracy", "shift/accuracy", "cos/positive")


class TrainState(nnx.Module):
    """The model, its EMA copy and its optimizer."""

    def __init__(self, config: ml_collections.ConfigDict, pose_dim: int, audio_dim: int):
        rngs = nnx.Rngs(config.seed)
        self.model = capp.CAPP(config.model, pose_dim, audio_dim, rngs=rngs)
        self.ema = nnx.clone(self.model)
        self.opt = nnx.Optimizer(
            self.model, optim.build_optimizer(config.optim, config.train.total_steps),
            wrt=nnx.Param)


def make_stage(config: ml_collections.ConfigDict, workdir: str | None = None) -> loop.Stage:
    """The CAPP stage for the shared loop (normalisation computed/loaded here)."""
    norm: stats_lib.Normalization = load_normalization(config, workdir)
    columns = capp.pose_columns(config.model.pose_dims, norm.motion_dim)
    audio_dim = norm.audio_dim
    lr_schedule = optim.learning_rate_schedule(config.optim, config.train.total_steps)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(nnx.eval_shape(
        lambda: capp.CAPP(config.model, len(columns), audio_dim, rngs=nnx.Rngs(0))), nnx.Param)))
    logging.info("CAPP: pose %s, audio %s (%d dims); %.2fM parameters",
                 list(config.model.pose_dims), config.data.audio_source, audio_dim, count / 1e6)

    window, shifts = int(config.model.window), tuple(int(s) for s in config.loss.shift_negatives)

    def train_step(ts: TrainState, batch, rng, frozen):
        motion = jnp.asarray(batch["motion"])[..., jnp.asarray(columns)]  # [B, W + 2M, P]
        pose, audio = capp.normalized_inputs(motion, batch["audio"], frozen, columns)
        pose, _ = capp.shifted_windows(pose, window, shifts)  # [B, W, P]: the centre window
        audio, shifted = capp.shifted_windows(audio, window, shifts)  # [B, W, Da], [B, S, W, Da]

        def loss_fn(model):
            r_pose, r_audio = jax.random.split(rng)
            pose_emb = model.encode_pose(pose, r_pose)
            if shifted is None:
                audio_emb, shifted_emb = model.encode_audio(audio, r_audio), None
            else:  # one pass over the true and the shifted audio windows
                b, s = shifted.shape[:2]
                both = jnp.concatenate([audio[:, None], shifted], axis=1)  # [B, 1 + S, W, Da]
                emb = model.encode_audio(both.reshape(b * (1 + s), *both.shape[2:]), r_audio)
                emb = emb.reshape(b, 1 + s, -1)
                audio_emb, shifted_emb = emb[:, 0], emb[:, 1:]
            return capp.clip_loss(pose_emb, audio_emb, model.scale(), shifted_emb)

        metrics = loop.optimizer_step(ts.model, ts.opt, loss_fn, lr_schedule)
        return {**metrics, "logit_scale": ts.model.scale()}

    return loop.Stage(
        create_state=lambda: TrainState(config, len(columns), audio_dim),
        train_step=train_step,
        make_dataset=lambda index, n: stage2_dataset(
            config.data, process_index=index, process_count=n),
        batch_keys=BATCH_KEYS,
        frozen=norm.arrays(),
        image_summary=None,
        ema=loop.EMA(source="model", target="ema", decay=config.train.ema_decay),
        progress_keys=PROGRESS_KEYS,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       compiler_options=None) -> loop.TrainResult:
    """Trains CAPP in `workdir` (resuming from its latest checkpoint, if any)."""
    os.makedirs(workdir, exist_ok=True)
    return loop.train(config, workdir, functools.partial(make_stage, workdir=workdir),
                      compiler_options=compiler_options)
