"""Stage 2: trains VASA-1's motion diffusion transformer (sec 3.2).

    python train.py --config configs/motion_dit.py:size=tiny --workdir runs/motion \
        --config.data.path=data/synthtalk

Each example is a window of W motion frames with its audio, the K frames before it, and the
window's control signals (`data_pipeline.loaders.stage2_dataset`). One jitted step:

  1. Normalise (`models.motion_dit.normalize_inputs`, which the sampler runs too; per
     dimension, train-split statistics `data_pipeline.stats.Normalization`, kept in
     <workdir>/normalization.json): motion, audio, gaze, distance. Padded frames past a
     clip's end (valid False) get zero audio, a first window (has_pre False) zero context.
  2. CFG dropping (config.loss): audio, gaze, distance and emotion are each dropped with
     probability drop_prob; X_pre + A_pre together with pre_drop_prob, and always for a
     clip's first window (has_pre False); a control the data lacks (has_gaze False, ...) is
     always dropped. With probability audio_truncate_prob the audio after a random cut
     in [1, W) is zeroed (a short clip's last window). audio_noise_std > 0 adds Gaussian
     noise to the normalised audio features of the real (non-padded) frames.
  3. t ~ U{0..T-1}, X_t = q_sample(X0, t, noise); the model predicts X0:
       loss = x0_weight * ||X0 - H||^2 + velocity_weight * ||dX0 - dH||^2
              + accel_weight * ||d2X0 - d2H||^2
     (mean over the valid frames and the motion dimensions; d = first differences in time).
  4. AdamW (config.optim), EMA of the model (config.train.ema_decay) kept by the loop.

Logged: loss/total, loss/x0, loss/velocity, loss/accel, x0_err/low_noise (x0 error of
the examples with t < T / 10), x0_err/<dim> for the mouth dimensions when motion comes from
labels, grad_norm, update_norm, lr, and the share of kept conditions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from data_pipeline import stats as stats_lib
from data_pipeline.loaders import MOTION_DIM_NAMES, stage2_dataset
from vasa_jax import diffusion, optim
from vasa_jax.models.motion_dit import (
    CONDITIONS,
    KEEP_KEYS,
    MotionDiT,
    model_conditions,
    normalize_inputs,
    param_counts,
)
from vasa_jax.parallel import distributed
from vasa_jax.trainers import loop

BATCH_KEYS = ("motion", "motion_pre", "audio", "audio_pre", "has_pre", "valid", "gaze",
              "distance", "emotion", "has_gaze", "has_distance", "has_emotion")
PROGRESS_KEYS = ("loss/total", "loss/x0", "x0_err/low_noise", "grad_norm")
MOUTH_DIMS = ("mouth_open", "mouth_width", "mouth_round")


class TrainState(nnx.Module):
    """The model, its EMA copy and its optimizer."""

    def __init__(self, config: ml_collections.ConfigDict, motion_dim: int, audio_dim: int):
        rngs = nnx.Rngs(config.seed)
        self.model = MotionDiT(config.model, motion_dim, audio_dim, rngs=rngs)
        self.ema = nnx.clone(self.model)
        self.opt = nnx.Optimizer(
            self.model, optim.build_optimizer(config.optim, config.train.total_steps),
            wrt=nnx.Param)


def load_normalization(config: ml_collections.ConfigDict,
                       workdir: str | None = None) -> stats_lib.Normalization:
    """The run's normalisation: <workdir>/normalization.json if present (a resumed run, or
    a sampler), else from the data folder's statistics (stats.json, computed if missing),
    then saved into the workdir (main process) when one is given."""
    d = config.data
    if workdir:
        norm = stats_lib.Normalization.load(workdir)
        if norm is not None:
            if (norm.motion_source, norm.audio_source) != (d.motion_source, d.audio_source):
                raise ValueError(
                    f"{workdir}/{stats_lib.NORMALIZATION_FILE} is for motion "
                    f"{norm.motion_source!r} / audio {norm.audio_source!r}, the config asks "
                    f"for {d.motion_source!r} / {d.audio_source!r}: use a new workdir")
            return norm
    if not d.path:
        raise ValueError("data.path is empty: set it to a clip-record dataset folder "
                         "(--config.data.path=DIR)")
    norm = stats_lib.Normalization.from_data(d.path, d.motion_source, d.audio_source,
                                             int(d.audio.n_mels), "train")
    if workdir and distributed.is_main_process():
        logging.info("normalisation statistics saved to %s", norm.save(workdir))
    return norm


def training_conditions(batch, inputs, rng, loss_cfg) -> dict[str, jax.Array]:
    """Model conditions with CFG dropping and audio truncation (module docstring, step 2).

    batch: the loader's has_gaze, has_distance, has_emotion, has_pre (bool [B]); inputs:
    `normalize_inputs` of the batch. Returns `model_conditions` (what the sampler builds
    the same way, with its own keep masks)."""
    b, w = inputs["audio"].shape[:2]
    k_drop, k_trunc, k_cut = jax.random.split(rng, 3)
    u = jax.random.uniform(k_drop, (b, len(CONDITIONS)))
    p = float(loss_cfg.drop_prob)
    keep = {
        "audio": u[:, 0] >= p,
        "gaze": (u[:, 1] >= p) & jnp.asarray(batch["has_gaze"], bool),
        "distance": (u[:, 2] >= p) & jnp.asarray(batch["has_distance"], bool),
        "emotion": (u[:, 3] >= p) & jnp.asarray(batch["has_emotion"], bool),
        "pre": (u[:, 4] >= float(loss_cfg.pre_drop_prob)) & jnp.asarray(batch["has_pre"], bool),
    }
    audio, audio_pre = inputs["audio"], inputs["audio_pre"]
    std = float(loss_cfg.audio_noise_std)
    if std > 0:  # on the real frames only: padding stays zero, as the sampler pads
        k_a, k_p = jax.random.split(jax.random.fold_in(rng, 1))
        has_pre = jnp.asarray(batch["has_pre"], bool)[:, None, None]
        audio = audio + std * jax.random.normal(k_a, audio.shape) * inputs["valid"][..., None]
        audio_pre = audio_pre + std * jax.random.normal(k_p, audio_pre.shape) * has_pre
    if loss_cfg.audio_truncate_prob > 0 and w > 1:
        truncate = jax.random.uniform(k_trunc, (b,)) < float(loss_cfg.audio_truncate_prob)
        cut = jax.random.randint(k_cut, (b,), 1, w)
        kept_frames = (jnp.arange(w)[None] < cut[:, None]) | ~truncate[:, None]
        audio = jnp.where(kept_frames[..., None], audio, 0.0)
    return model_conditions({**inputs, "audio": audio, "audio_pre": audio_pre}, keep)


def _masked_mean(sq: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of sq [B, L, D] over D and the frames where mask [B, L]."""
    per_frame = jnp.mean(sq, axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_frame * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def motion_losses(pred: jax.Array, target: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """x0, velocity and acceleration losses of pred vs target [B, W, D] over valid [B, W]."""
    out = {"x0": _masked_mean(jnp.square(pred - target), valid)}
    vel = lambda x: x[:, 1:] - x[:, :-1]  # noqa: E731
    if pred.shape[1] > 1:
        v_mask = valid[:, 1:] & valid[:, :-1]
        out["velocity"] = _masked_mean(jnp.square(vel(pred) - vel(target)), v_mask)
    else:
        out["velocity"] = jnp.zeros((), jnp.float32)
    if pred.shape[1] > 2:
        a_mask = valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]
        out["accel"] = _masked_mean(jnp.square(vel(vel(pred)) - vel(vel(target))), a_mask)
    else:
        out["accel"] = jnp.zeros((), jnp.float32)
    return out


def make_stage(config: ml_collections.ConfigDict, workdir: str | None = None) -> loop.Stage:
    """The motion diffusion stage for the shared loop (normalisation computed/loaded here)."""
    lc = config.loss
    norm = load_normalization(config, workdir)
    motion_dim, audio_dim = norm.motion_dim, norm.audio_dim
    schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.train_steps)
    num_t = schedule.num_steps
    lr_schedule = optim.learning_rate_schedule(config.optim, config.train.total_steps)
    weights = {"x0": float(lc.x0_weight), "velocity": float(lc.velocity_weight),
               "accel": float(lc.accel_weight)}
    mouth = {}
    if config.data.motion_source == "labels" and motion_dim == len(MOTION_DIM_NAMES):
        mouth = {n: MOTION_DIM_NAMES.index(n) for n in MOUTH_DIMS}
    counts = param_counts(nnx.eval_shape(
        lambda: MotionDiT(config.model, motion_dim, audio_dim, rngs=nnx.Rngs(0))))
    logging.info("MotionDiT: motion dim %d (%s), audio dim %d (%s); parameters %s",
                 motion_dim, config.data.motion_source, audio_dim, config.data.audio_source,
                 ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))

    def train_step(ts: TrainState, batch, rng, frozen):
        k_cond, k_t, k_noise, k_drop = jax.random.split(rng, 4)
        inputs = normalize_inputs(batch, frozen)  # the sampler normalises with the same
        cond = training_conditions(batch, inputs, k_cond, lc)
        x0, valid = inputs["motion"], inputs["valid"]
        b = x0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, num_t)
        x_t = diffusion.q_sample(schedule, x0, t, jax.random.normal(k_noise, x0.shape))
        graphdef, params, rest = nnx.split(ts.model, nnx.Param, ...)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest)
            pred = model(x_t, t, cond, deterministic=False, rng=k_drop)
            terms = motion_losses(pred, x0, valid)
            total = sum(weights[k] * terms[k] for k in terms if weights[k] > 0)
            return total, (terms, pred)

        step = ts.opt.step[...]
        (total, (terms, pred)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates = ts.opt.update(ts.model, grads)

        sq = jnp.square(pred - x0)
        per_example = jnp.sum(jnp.mean(sq, -1) * valid, -1) / jnp.maximum(jnp.sum(valid, -1), 1)
        low = t < max(num_t // 10, 1)
        metrics = {
            "loss/total": total, **{f"loss/{k}": v for k, v in terms.items()},
            "x0_err/mean": _masked_mean(sq, valid),
            "x0_err/low_noise": jnp.sum(per_example * low) / jnp.maximum(jnp.sum(low), 1),
            "grad_norm": optax.global_norm(grads), "update_norm": optax.global_norm(updates),
            "lr": lr_schedule(step),
            **{f"kept/{c}": jnp.mean(cond[KEEP_KEYS[c]].astype(jnp.float32))
               for c in CONDITIONS},
        }
        for name, i in mouth.items():
            metrics[f"x0_err/{name}"] = _masked_mean(sq[..., i:i + 1], valid)
        return metrics

    return loop.Stage(
        create_state=lambda: TrainState(config, motion_dim, audio_dim),
        train_step=train_step,
        make_dataset=lambda index, count: stage2_dataset(
            config.data, process_index=index, process_count=count),
        batch_keys=BATCH_KEYS,
        frozen=norm.arrays(),
        image_summary=None,
        ema=loop.EMA(source="model", target="ema", decay=config.train.ema_decay),
        progress_keys=PROGRESS_KEYS,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       compiler_options=None) -> loop.TrainResult:
    """Trains stage 2 in `workdir` (resuming from its latest checkpoint, if any).

    compiler_options: XLA options for the step (e.g. loop.FAST_CPU_COMPILE in tests).
    """
    return loop.train(config, workdir, functools.partial(make_stage, workdir=workdir),
                      compiler_options=compiler_options)
