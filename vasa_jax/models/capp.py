"""CAPP: the contrastive audio-pose model VASA-1 scores head motion with (sec 4.2).

A CLIP-style pair of encoders over a 3-second window (75 frames at 25 fps) that says
whether a head-pose sequence and an audio clip belong together:

    pose  [B, W, P]  (normalised yaw, pitch, roll ...)  -> [pose, pose velocity] per frame
         -> Dense(2P -> width) + learned positions -> `pose_layers` (6) transformer blocks
         -> LayerNorm -> pool (model.pool: "flatten" [B, W * width], the frames in place,
            or "mean" over frames [B, width]) -> Dense(-> embed_dim) -> unit vector
    audio [B, W, Da] (normalised per-frame mel or Wav2Vec2 features)
         -> motion_dit.AudioEncoder (a residual 1-D conv stack) + learned positions
         -> `audio_layers` transformer blocks -> LayerNorm -> pool -> Dense -> unit vector

CAPP score = the cosine similarity of the two unit vectors (VASA-1 reports 0.588 on real
VoxCeleb2 video; its frame-shift sanity curve is 0.608, 0.462, 0.206, 0.069, 0.082 for
shifts of 0..4 frames). Training: the symmetric InfoNCE loss over a batch of windows,
logits = exp(logit_scale) * pose_emb @ audio_emb.T (CLIP; the scale starts at 1 / 0.07 and
is capped at 100).

The paper initialises the audio encoder from a pretrained Wav2Vec2: here the audio input is
whatever per-frame features the data gives (`data.audio_source`: log-mel computed from the
record's audio, or `features:<name>` written by extract_latents with the Wav2Vec2 frontend)
and the encoder on top is learned. Trained by the shared loop (`python train.py --config
configs/capp.py:size=tiny ...`, vasa_jax.trainers.capp); scored by `python -m
vasa_jax.evaluate capp` (the frame-shift curve) and the video harness.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from data_pipeline.transforms import MOTION_DIM_NAMES
from vasa_jax.models.motion_dit import AudioEncoder, Block, Dense, LayerNorm, param

MAX_LOGIT_SCALE = 100.0
POOLS = ("mean", "flatten")


def _positions(length: int, width: int, rngs: nnx.Rngs) -> nnx.Param:
    return param(rngs, nnx.initializers.normal(0.02), (length, width), ("length", "embed"),
                 jnp.float32)


def _pool_project(blocks, norm, proj, h: jax.Array, rng: jax.Array | None,
                  pool: str) -> jax.Array:
    """Transformer blocks, LayerNorm, pooling over time, projection, unit norm: [B, W, width]
    -> [B, embed_dim]. pool "mean": the mean over frames [B, width] (what happens, not
    when); "flatten": every frame in place [B, W * width], so the projection can weigh each
    moment and two embeddings' dot product can depend on how the sequences line up."""
    rngs = [None] * len(blocks) if rng is None else list(jax.random.split(rng, len(blocks)))
    for block, r in zip(blocks, rngs):
        h = block(h, r)
    h = norm(h).astype(jnp.float32)
    z = proj(h.reshape(h.shape[0], -1) if pool == "flatten" else jnp.mean(h, axis=1))
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)


def pose_features(pose: jax.Array) -> jax.Array:
    """pose [B, W, P] -> [B, W, 2P]: the pose less its mean over the window, and its
    frame-to-frame change (zero at the first frame). Removing the mean makes CAPP judge how
    the head moves, not where it points: with it, a model trained on SynthTalk matched
    training clips by their constant head offset (in-batch accuracy 0.99) and scored
    held-out pairs at chance (-0.03, the same at every shift). The change sharpens its
    sense of timing (the frame-shift curve)."""
    pose = pose - jnp.mean(pose, axis=1, keepdims=True)
    vel = jnp.concatenate([jnp.zeros_like(pose[:, :1]), pose[:, 1:] - pose[:, :-1]], axis=1)
    return jnp.concatenate([pose, vel], axis=-1)


class CAPP(nnx.Module):
    """Pose and audio encoders; `__call__(pose, audio)` -> (pose_emb, audio_emb) [B, E]."""

    def __init__(self, cfg: ml_collections.ConfigDict, pose_dim: int, audio_dim: int, *,
                 rngs: nnx.Rngs):
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
        w = int(cfg.width)
        self.window = int(cfg.window)
        self.pose_dim, self.audio_dim = int(pose_dim), int(audio_dim)
        block = lambda: Block(w, int(cfg.heads), float(cfg.mlp_ratio), float(cfg.dropout),  # noqa: E731
                              rngs=rngs, **kw)
        self.pose_in = Dense(2 * pose_dim, w, names=(None, "embed"), rngs=rngs, **kw)
        self.pose_pos = _positions(self.window, w, rngs)
        self.pose_blocks = nnx.List([block() for _ in range(int(cfg.pose_layers))])
        self.pose_norm = LayerNorm(w, **kw)
        self.pool = str(cfg.get("pool", "mean"))  # runs saved before the field pooled by mean
        if self.pool not in POOLS:
            raise ValueError(f"CAPP pool must be one of {POOLS}, got {self.pool!r}")
        fan_in = w * self.window if self.pool == "flatten" else w
        self.pose_proj = Dense(fan_in, int(cfg.embed_dim), names=("embed", None), rngs=rngs, **kw)
        self.audio_in = AudioEncoder(cfg.audio_encoder, audio_dim, w, rngs=rngs, **kw)
        self.audio_pos = _positions(self.window, w, rngs)
        self.audio_blocks = nnx.List([block() for _ in range(int(cfg.audio_layers))])
        self.audio_norm = LayerNorm(w, **kw)
        self.audio_proj = Dense(fan_in, int(cfg.embed_dim), names=("embed", None), rngs=rngs,
                                **kw)
        self.logit_scale = nnx.Param(jnp.asarray(math.log(1.0 / 0.07), jnp.float32))

    def _check(self, x: jax.Array, dim: int, name: str) -> None:
        if x.ndim != 3 or x.shape[1] != self.window or x.shape[2] != dim:
            raise ValueError(f"CAPP {name} must be [B, {self.window}, {dim}], got {x.shape}")

    def encode_pose(self, pose: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Normalised pose [B, W, P] -> unit embeddings [B, E]."""
        self._check(pose, self.pose_dim, "pose")
        h = self.pose_in(pose_features(pose.astype(jnp.float32))) + self.pose_pos[...]
        return _pool_project(self.pose_blocks, self.pose_norm, self.pose_proj, h, rng, self.pool)

    def encode_audio(self, audio: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Normalised audio features [B, W, Da] -> unit embeddings [B, E]."""
        self._check(audio, self.audio_dim, "audio")
        h = self.audio_in(audio.astype(jnp.float32)) + self.audio_pos[...]
        return _pool_project(self.audio_blocks, self.audio_norm, self.audio_proj, h, rng,
                             self.pool)

    def __call__(self, pose: jax.Array, audio: jax.Array, rng: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        r_pose, r_audio = (None, None) if rng is None else jax.random.split(rng)
        return self.encode_pose(pose, r_pose), self.encode_audio(audio, r_audio)

    def scale(self) -> jax.Array:
        """exp(logit_scale), capped at MAX_LOGIT_SCALE."""
        return jnp.minimum(jnp.exp(self.logit_scale[...]), MAX_LOGIT_SCALE)


def clip_loss(pose_emb: jax.Array, audio_emb: jax.Array, scale: jax.Array,
              shifted_emb: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric InfoNCE over a batch of pairs (row i of each is a true pair), with hard
    negatives for the pose side.

    pose_emb, audio_emb [B, E] unit vectors; shifted_emb [B, S, E] or None: the embeddings
    of each pair's own audio shifted by S frame offsets (loss.shift_negatives). Pose i is
    classified among the B audio windows and its S shifted audio windows; audio j among
    the B poses. In-batch negatives (other clips) are told apart by how much the head
    moves; the shifted ones only by when.
    -> (loss, metrics: accuracy (top-1 in-batch retrieval both ways), positive and negative
    cosine means, and with shifted_emb: shift/accuracy (the true offset beats every shifted
    one) and cos/shifted)."""
    sim = pose_emb @ audio_emb.T  # [B, B]
    b = sim.shape[0]
    labels = jnp.arange(b)
    pose_logits = sim
    if shifted_emb is not None:
        shifted = jnp.einsum("be,bse->bs", pose_emb, shifted_emb)  # [B, S]
        pose_logits = jnp.concatenate([sim, shifted], axis=1)  # [B, B + S]
    lp = jax.nn.log_softmax(scale * pose_logits, axis=1)[labels, labels]
    la = jax.nn.log_softmax(scale * sim, axis=0)[labels, labels]
    loss = -0.5 * (jnp.mean(lp) + jnp.mean(la))
    eye = jnp.eye(b, dtype=bool)
    acc = 0.5 * (jnp.mean(jnp.argmax(sim, axis=1) == labels)
                 + jnp.mean(jnp.argmax(sim, axis=0) == labels))
    metrics = {
        "accuracy": acc,
        "cos/positive": jnp.mean(jnp.diagonal(sim)),
        "cos/negative": jnp.sum(jnp.where(eye, 0.0, sim)) / max(b * (b - 1), 1),
    }
    if shifted_emb is not None:
        metrics["shift/accuracy"] = jnp.mean(jnp.diagonal(sim) > jnp.max(shifted, axis=1))
        metrics["cos/shifted"] = jnp.mean(shifted)
    return loss, metrics


def shifted_windows(x: jax.Array, window: int, shifts: Sequence[int]
                    ) -> tuple[jax.Array, jax.Array | None]:
    """x [B, window + 2M, D] (M = max |shift|) -> (the centre window [B, window, D], the
    windows at each offset [B, S, window, D], None without shifts): offset s starts s
    frames after the centre."""
    margin = max((abs(int(s)) for s in shifts), default=0)
    if x.shape[1] != window + 2 * margin:
        raise ValueError(f"expected {window} + 2 * {margin} frames, got {x.shape[1]}")
    centre = x[:, margin:margin + window]
    if not shifts:
        return centre, None
    return centre, jnp.stack([x[:, margin + s:margin + s + window] for s in shifts], axis=1)


def score(pose_emb: jax.Array, audio_emb: jax.Array) -> jax.Array:
    """CAPP score per pair [B]: the cosine similarity of matching rows."""
    return jnp.sum(pose_emb * audio_emb, axis=-1)


def pose_columns(pose_dims: Sequence[str], motion_dim: int) -> tuple[int, ...]:
    """Indices of `pose_dims` (model.pose_dims) in the data's motion vectors: labels
    (MOTION_DIM_NAMES, 13 dims) or stage-1 latents (z_pose's yaw, pitch, roll first)."""
    names = MOTION_DIM_NAMES if motion_dim == len(MOTION_DIM_NAMES) else MOTION_DIM_NAMES[:3]
    missing = [d for d in pose_dims if d not in names]
    if missing:
        raise ValueError(f"model.pose_dims {missing} are not in the data's motion "
                         f"({motion_dim} dims: {names})")
    return tuple(names.index(d) for d in pose_dims)


def normalized_inputs(pose: jax.Array, audio: jax.Array, stats: Mapping[str, jax.Array],
                      columns: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """Raw pose [B, W, P] (the `columns` of the data's motion, in its units: degrees for
    labels) and audio features [B, W, Da] -> the model's normalised inputs; stats:
    `data_pipeline.stats.Normalization.arrays()` of the training data."""
    idx = jnp.asarray(tuple(columns))
    pose = (jnp.asarray(pose, jnp.float32) - stats["motion_mean"][idx]) / stats["motion_std"][idx]
    audio = (jnp.asarray(audio, jnp.float32) - stats["audio_mean"]) / stats["audio_std"]
    return pose, audio
