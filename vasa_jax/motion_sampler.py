"""Sampling motion from the stage-2 diffusion transformer: one window, and whole clips.

`sample_window` draws one window X0 [B, W, Dm] (normalised space) by DDIM with VASA-1's
classifier-free guidance; every guided and unguided pass of a step is ONE batched network
call (`models.motion_dit.guided_x0`). It is a pure function of the model (merge it inside
your jit) and jittable.

`MotionGenerator` restores a trained run and turns raw audio features of any length into
raw motion, window by window as VASA-1 does: window i covers frames [iW, (i+1)W); it is
conditioned on the previous window's last K generated frames and audio (the first window
has no context, keep_pre False); the last window's audio is zero-padded (in normalised
space, as in training) and its output cut to the audio length. A window's raw inputs are
normalised and made into the model's conditions inside the compiled sampler by the same
functions the train step uses (`models.motion_dit.normalize_inputs`, `model_conditions`).

    gen = MotionGenerator.from_workdir("runs/motion")
    motion = gen.generate(audio_features, gaze=[0.0, 0.0], seed=0)        # [L, Dm] raw
    motions = gen.generate_batch(audio [N, L, Da], seeds=[0, 1, 2, 3])     # [N, L, Dm]
    stream = gen.stream(1, seeds=0); stream.next_window(audio_window)     # [1, <=W, Dm]
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from data_pipeline import stats as stats_lib
from vasa_jax import checkpointing, diffusion
from vasa_jax.models.motion_dit import (
    CONDITIONS,
    CONTROL_DIMS,
    Conditions,
    MotionDiT,
    active_scales,
    denormalize_motion,
    guided_x0,
    model_conditions,
    normalize_inputs,
)
from vasa_jax.parallel import sharding
from vasa_jax.parallel.mesh import create_mesh

NAME = "motion_dit"
DEFAULT_GUIDANCE = {"audio": 0.5, "gaze": 1.0}  # VASA-1's l_A, l_g


def sample_window(model: MotionDiT, cond: Conditions, rng: jax.Array, *,
                  schedule: diffusion.Schedule, num_sample_steps: int = 50,
                  guidance: Mapping[str, float] | None = None, eta: float = 0.0) -> jax.Array:
    """One window of motion x0 [B, W, Dm] (normalised space) by guided DDIM.

    cond: `models.motion_dit.Conditions` for batch B. rng: one key, or one key per example
    ([B]: row b depends only on rng[b]). guidance: {condition: scale} (None: VASA-1's
    defaults l_A = 0.5, l_g = 1.0); scales, num_sample_steps and eta are static.
    """
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance
    active_scales(guidance)  # unknown names fail here, before tracing the loop
    b = cond["audio"].shape[0]
    shape = (b, model.window, model.motion_dim)
    return diffusion.sample(lambda x, t: guided_x0(model, x, t, cond, guidance), shape, rng,
                            schedule, num_sample_steps, eta)


def _single_device_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's mesh axes, all of size 1, on this process's first device (sampling a few
    windows gains nothing from splitting a ~30M-parameter model)."""
    axes = tuple((str(name), 1) for name, _ in config.mesh.axes)
    return create_mesh(axes, devices=jax.local_devices()[:1])


class MotionGenerator:
    """A trained stage-2 model (EMA weights) with its normalisation, ready to sample.

    Attributes: config, model (MotionDiT), step (checkpoint step), normalization
    (data_pipeline.stats.Normalization), motion_mean / motion_std [Dm], audio_mean /
    audio_std [Da], window W, context K, motion_dim, audio_dim, schedule, guidance (the
    config's scales), num_sample_steps (config.diffusion.sample_steps), eta.
    """

    def __init__(self, config: ml_collections.ConfigDict, model: MotionDiT,
                 normalization: stats_lib.Normalization, *, step: int | None = None):
        if (model.motion_dim, model.audio_dim) != (normalization.motion_dim,
                                                   normalization.audio_dim):
            raise ValueError(f"model dims ({model.motion_dim}, {model.audio_dim}) != "
                             f"normalisation dims ({normalization.motion_dim}, "
                             f"{normalization.audio_dim})")
        self.config = config
        self.model = model
        self.step = step
        self.normalization = normalization
        n = normalization
        self.motion_mean, self.motion_std = n.motion_mean, n.motion_std
        self.audio_mean, self.audio_std = n.audio_mean, n.audio_std
        self.window, self.context = model.window, model.context
        self.motion_dim, self.audio_dim = model.motion_dim, model.audio_dim
        self.schedule = diffusion.make_schedule(config.diffusion.schedule,
                                                config.diffusion.train_steps)
        self.guidance = {c: float(config.guidance[c]) for c in CONDITIONS}
        self.num_sample_steps = int(config.diffusion.sample_steps)
        self.eta = float(config.diffusion.eta)
        self._graphdef, self._state = nnx.split(model)
        self._stats = jax.device_put(normalization.arrays(), jax.local_devices()[0])
        self._sample = jax.jit(self._sample_fn, static_argnames=("guidance", "steps", "eta"))

    # -------------------------------------------------------------------------- restoring

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, *,
                     mesh: jax.sharding.Mesh | None = None) -> "MotionGenerator":
        """Restores the EMA model of a stage-2 run's latest (or `step`) checkpoint.

        The config comes from the checkpoint; the normalisation from
        <workdir>/normalization.json (written by the trainer), else from the run's data
        folder (config.data.path: its stats.json, or a scan). mesh: where the weights go
        (default: this process's first device).
        """
        ckpt, step, config = checkpointing.open_run(workdir, NAME, step)
        with ckpt:
            config = ml_collections.ConfigDict(config)
            norm = stats_lib.Normalization.load(workdir)
            if norm is None:
                from vasa_jax.trainers import motion_dit as trainer  # old runs only

                logging.warning("%s has no %s; using the statistics of data folder %s", workdir,
                                stats_lib.NORMALIZATION_FILE, config.data.path)
                norm = trainer.load_normalization(config, None)
            mesh = _single_device_mesh(config) if mesh is None else mesh
            if ckpt.has_weights(step):
                model = ckpt.restore_module(
                    lambda: MotionDiT(config.model, norm.motion_dim, norm.audio_dim,
                                      rngs=nnx.Rngs(0)), mesh, config.mesh.rules, step)
            else:
                from vasa_jax.trainers import motion_dit as trainer  # old checkpoints only

                graphdef, abstract, _ = sharding.abstract_state(
                    lambda: trainer.TrainState(config, norm.motion_dim, norm.audio_dim), mesh,
                    config.mesh.rules)
                model = nnx.merge(graphdef, ckpt.restore(abstract, step)).ema
        logging.info("restored the EMA motion model of step %d from %s", step, workdir)
        return cls(config, model, norm, step=step)

    # -------------------------------------------------------------------------- sampling

    def _sample_fn(self, state, raw, keep, keys, schedule, stats, *, guidance, steps, eta):
        """Raw window inputs -> raw motion [N, W, Dm]: normalised, conditioned and
        denormalised inside the compiled function, exactly as the train step normalises."""
        model = nnx.merge(self._graphdef, state)
        cond = model_conditions(normalize_inputs(raw, stats), keep)
        x = sample_window(model, cond, keys, schedule=schedule, num_sample_steps=steps,
                          guidance=dict(guidance), eta=eta)
        return denormalize_motion(x, stats)

    def _controls(self, name: str, value, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(raw values [N, dim], keep [N]) of one control; None = dropped."""
        dim = CONTROL_DIMS[name]
        if value is None:
            return np.zeros((n, dim), np.float32), np.zeros((n,), bool)
        x = np.asarray(value, np.float32)
        if x.size == dim:
            x = np.broadcast_to(x.reshape(1, dim), (n, dim))
        if x.shape != (n, dim):
            raise ValueError(f"{name} must be [{dim}] or [N={n}, {dim}], got {np.shape(value)}")
        return np.ascontiguousarray(x, np.float32), np.ones((n,), bool)

    def generate_batch(self, audio: np.ndarray, *, gaze=None, distance=None, emotion=None,
                       keep: Mapping[str, Sequence[bool]] | None = None,
                       seeds: int | Sequence[int] = 0,
                       guidance: Mapping[str, float] | None = None,
                       num_sample_steps: int | None = None,
                       eta: float | None = None) -> np.ndarray:
        """Motion for N audio tracks at once: raw motion float32 [N, L, Dm].

        audio: raw features float32 [N, L, Da] (the run's audio source, e.g. log-mel).
        gaze [2] or [N, 2] (degrees), distance [1] or [N, 1], emotion [8] or [N, 8]: raw
          controls; None = that condition dropped for every row.
        keep: optional {"gaze" | "distance" | "emotion" | "audio": bool [N]} to drop a
          condition for some rows only (False = dropped).
        seeds: one int per row (or one int s: rows get s, s + 1, ...). A row's result
          depends only on its seed, audio and controls, not on the other rows.
        guidance: {condition: scale} (default: the config's guidance section; missing
          names are 0). num_sample_steps / eta: default from config.diffusion.
        """
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 3 or audio.shape[2] != self.audio_dim or audio.shape[1] < 1:
            raise ValueError(f"audio must be [N, L >= 1, Da={self.audio_dim}], got {audio.shape}")
        if not np.all(np.isfinite(audio)):
            raise ValueError("audio features contain NaN or inf")
        n, length, _ = audio.shape
        stream = self.stream(n, gaze=gaze, distance=distance, emotion=emotion, keep=keep,
                             seeds=seeds, guidance=guidance, num_sample_steps=num_sample_steps,
                             eta=eta)
        w = self.window
        outputs = [stream.next_window(audio[:, i:i + w]) for i in range(0, length, w)]
        return np.concatenate(outputs, axis=1)

    def stream(self, n: int = 1, *, gaze=None, distance=None, emotion=None,
               keep: Mapping[str, Sequence[bool]] | None = None,
               seeds: int | Sequence[int] = 0, guidance: Mapping[str, float] | None = None,
               num_sample_steps: int | None = None, eta: float | None = None
               ) -> "MotionStream":
        """A `MotionStream` of N rows: feed it audio window by window (arguments as
        `generate_batch`, which is this stream fed the whole clip)."""
        seeds = (list(range(seeds, seeds + n)) if isinstance(seeds, (int, np.integer))
                 else [int(s) for s in seeds])
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} rows")
        guidance = self.guidance if guidance is None else dict(guidance)
        guided = active_scales(guidance)
        steps = self.num_sample_steps if num_sample_steps is None else int(num_sample_steps)
        eta = self.eta if eta is None else float(eta)

        controls = {name: self._controls(name, value, n) for name, value in
                    (("gaze", gaze), ("distance", distance), ("emotion", emotion))}
        keep_audio = np.ones((n,), bool)
        for name, mask in (keep or {}).items():
            if name not in ("audio", "gaze", "distance", "emotion"):
                raise ValueError(f"keep: unknown condition {name!r}")
            mask = np.asarray(mask, bool).reshape(-1)
            if mask.shape != (n,):
                raise ValueError(f"keep[{name!r}] must be bool [N={n}], got {np.shape(mask)}")
            if name == "audio":
                keep_audio = keep_audio & mask
            else:
                values, kept = controls[name]
                controls[name] = (values, kept & mask)

        return MotionStream(self, controls, keep_audio, seeds, guidance=guided, steps=steps,
                            eta=eta)

    def generate(self, audio: np.ndarray, *, gaze=None, distance=None, emotion=None,
                 seed: int = 0, guidance: Mapping[str, float] | None = None,
                 num_sample_steps: int | None = None, eta: float | None = None) -> np.ndarray:
        """Raw motion float32 [L, Dm] for raw audio features [L, Da] (see generate_batch;
        gaze [2] degrees, distance float or [1], emotion [8]; None = dropped)."""
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 2:
            raise ValueError(f"audio must be [L, Da], got {audio.shape}")
        if distance is not None:
            distance = np.asarray(distance, np.float32).reshape(1)
        return self.generate_batch(audio[None], gaze=gaze, distance=distance, emotion=emotion,
                                   seeds=[seed], guidance=guidance,
                                   num_sample_steps=num_sample_steps, eta=eta)[0]


class MotionStream:
    """One batch of clips sampled window by window, as audio arrives (what
    `MotionGenerator.generate_batch` loops over, and what streaming inference feeds).

    Each `next_window(audio [N, L <= W, Da])` call draws window i (keys: the row's seed
    folded with i) conditioned on the previous window's last K frames of motion and audio,
    and returns raw motion [N, L, Dm]. A short window (the clip's end) is zero-padded in
    normalised audio space, as in training, and cut back to L; no window may follow it.
    The compiled sampler is shared by every window: nothing recompiles from window to window.
    """

    def __init__(self, gen: MotionGenerator, controls: Mapping[str, tuple[np.ndarray, np.ndarray]],
                 keep_audio: np.ndarray, seeds: Sequence[int], *, guidance, steps: int,
                 eta: float):
        n = len(seeds)
        self.gen, self.n = gen, n
        self._static = dict(guidance=guidance, steps=steps, eta=eta)
        self._controls = {name: values for name, (values, _) in controls.items()}
        self._keep = {"audio": np.asarray(keep_audio, bool),
                      **{name: kept for name, (_, kept) in controls.items()}}
        self._keys = [jax.random.key(s) for s in seeds]
        # The previous window's last K frames, raw (normalised with the window).
        self._motion_pre = np.zeros((n, gen.context, gen.motion_dim), np.float32)
        self._audio_pre = np.zeros((n, gen.context, gen.audio_dim), np.float32)
        self.index = 0  # windows drawn so far
        self._ended = False

    def next_window(self, audio: np.ndarray) -> np.ndarray:
        """Raw audio features [N, L, Da] (1 <= L <= W) -> raw motion float32 [N, L, Dm]."""
        g, w, k = self.gen, self.gen.window, self.gen.context
        audio = np.asarray(audio, np.float32)
        length = audio.shape[1] if audio.ndim == 3 else 0
        if audio.shape != (self.n, length, g.audio_dim) or not 1 <= length <= w:
            raise ValueError(f"a window of audio must be [N={self.n}, 1..{w}, Da={g.audio_dim}], "
                             f"got {audio.shape}")
        if self._ended:
            raise ValueError("the previous window was shorter than W: the clip has ended")
        self._ended = length < w
        padded = np.zeros((self.n, w, g.audio_dim), np.float32)
        padded[:, :length] = audio
        has_pre = np.full((self.n,), self.index > 0)
        raw = dict(self._controls, audio=padded, audio_pre=self._audio_pre,
                   motion_pre=self._motion_pre, has_pre=has_pre,
                   valid=np.broadcast_to(np.arange(w) < length, (self.n, w)))
        keep = dict(self._keep, pre=has_pre)
        keys = jnp.stack([jax.random.fold_in(key, self.index) for key in self._keys])
        x = np.asarray(g._sample(g._state, raw, keep, keys, g.schedule, g._stats,
                                 **self._static), np.float32)
        if k:
            self._motion_pre, self._audio_pre = x[:, w - k:], padded[:, w - k:]
        self.index += 1
        return x[:, :length]
