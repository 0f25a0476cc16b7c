"""Stage-2 evaluator: lip sync, head-motion statistics, control and diversity of generated
motion.

    python -m vasa_jax.evaluate motion --workdir W --data D [--split test] [--num_clips N]
        [--seeds 3] [--num_sample_steps S] [--control_clips 8] [--json PATH] [--step S]
        [--expression_meter M [--face_workdir W1]]

Restores the motion generator of a stage-2 run (`vasa_jax.motion_sampler.MotionGenerator
.from_workdir`) and, for each held-out clip of split --split (evenly spread over it when
--num_clips is set), generates its motion from the clip's audio with the clip's own controls
(main gaze `transforms.main_gaze` of all its frames, mean head distance, averaged emotion;
the config's default CFG scales). Everything is read through linear probes
(`vasa_jax.metrics.motion.MotionProbes`) fitted on ground-truth (motion, label) frames of
the train split (their held-out R^2 on the evaluated clips' ground truth is reported):

- lip-sync proxy: Pearson r between the probe's mouth opening of the generated motion and
  the clip's true `mouth_open` label (the label of THAT audio). Reported: r over all frames
  of all clips pooled (the headline, last line `lip-sync r: X`), the mean per-clip r, the
  best r within +-2 frames of lag (and its lag; > 0: the generated mouth trails), and the
  ceiling: the same r for the ground-truth motion through the probe.
- end-to-end lip sync (only with --expression_meter M, a frozen
  `vasa_jax.models.expression_meter` export, and motion = stage-1 latents [z_pose, z_dyn],
  data.motion_source "features:motion" of `data_pipeline.extract_latents`): the scored
  (seed 0) generated motion of each clip, in raw latent units (what `generate` returns),
  is decoded to frames by the stage-1 model (the EMA generator of --face_workdir W1,
  default: the run and step the latents dataset records in dataset.json
  extra.extract_latents, if that folder exists), with the clip's first frame as the
  portrait (encoded once: v_app, z_id), and the meter reads the mouth off the decoded
  frames. Reported: Pearson r of that reading with the clip's true `mouth_open` pooled
  over all frames (`end_to_end_r`), its mean per clip, and the same r of the meter on the
  clip's real frames (`end_to_end_r_real`, its ceiling); None with the reason where a
  series is constant.
- dP (VASA-1's pose-jitter metric, `pose_jitter_dp`, degrees per frame): of the probe's
  pose angles of the generated motion, of the ground-truth pose labels, and of the
  ground-truth motion through the probe (a probe can only smooth or add noise: compare
  generated with this one when it differs from the labels), and generated / ground truth.
- E_g, gaze-control error (degrees): on --control_clips clips, motion generated for
  requested gaze directions g (the clip's own main gaze, and each --gaze_targets (theta,
  phi)); per generation window (W frames, as the sampler's windows) the main gaze of the
  probe-decoded gaze is compared with g (`angular_error_deg`, the angle between the
  directions); mean over windows, clips and targets. Twice: with the default gaze guidance
  scale l_g (VASA-1: 1) and with l_g = 0 (the condition is still given; only its CFG push
  is off). Probe floor: the same error for the ground-truth motion vs the ground-truth
  label's main gaze of each window.
- E_d, distance-control error (the dataset's normalised distance units): likewise with
  requested distances (the clip's own mean distance and the --distance_quantiles of the
  probe clips' mean distances), window mean of the probe's distance vs the request; with
  the default distance scale l_d and with l_d = 0, or l_d = 1 when the default is 0 (as in
  configs/motion_dit.py). The same rule applies to l_g if its default is 0.
- diversity across --seeds seeds (same audio and controls): the std across seeds per
  frame and motion dimension, divided by that dimension's std over the evaluated
  ground-truth frames, averaged (`metrics.motion.diversity`); also the std across seeds of
  the probe's pose angles in degrees.

Prints a summary whose last line is `lip-sync r: X` and writes every number as JSON to
--json (default W/eval/motion_<split>_step<step>.json). Targets a label does not provide
(no gaze / distance labels) are skipped with the reason in the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Protocol, Sequence

import numpy as np
from absl import logging

from data_pipeline import schema
from data_pipeline import transforms as T
from vasa_jax import cli
from vasa_jax.metrics import motion as M

NAME = "motion"
DESCRIPTION = ("stage 2: lip-sync proxy r, pose jitter dP, gaze / distance control errors "
               "(E_g, E_d), diversity across seeds")
REQUIRED_LABELS = ("mouth_open", "pose")  # lip sync and dP need them in every clip
DEFAULT_GAZE_TARGETS = ((15.0, 0.0), (0.0, 10.0))  # (theta up, phi right) degrees
DEFAULT_DISTANCE_QUANTILES = (0.1, 0.9)
MAX_LAG = 2  # frames either way for the lagged lip-sync diagnostic
# The stage-1 latents [z_pose, z_dyn] of data_pipeline.extract_latents (STATS_MOTION; not
# imported: heavy): the motion the end-to-end lip sync can decode.
LATENTS_SOURCE = "features:motion"


class Generator(Protocol):
    """What `evaluate` needs of a motion generator (`motion_sampler.MotionGenerator`).

    config: the stage-2 ConfigDict (data.window, data.motion_source, data.audio_source,
    data.audio.n_mels, data.path; guidance: the default CFG scales).
    generate(audio [L, Da] raw features, *, gaze [2] | None, distance | None,
    emotion [8] | None, seed, guidance: dict | None (None: config defaults),
    num_sample_steps | None) -> raw motion [L, Dm].
    Optional: generate_batch(audio [N, L, Da], *, gaze [N, 2] | None, distance [N, 1] |
    None, emotion [N, 8] | None, keep {control: bool [N]} | None, seeds [N], guidance,
    num_sample_steps) -> [N, L, Dm], each row as `generate` would give it; used when present
    (all generations of a clip with the same guidance scales in one call).
    """

    config: Any

    def generate(self, audio: np.ndarray, *, gaze: np.ndarray | None, distance: float | None,
                 emotion: np.ndarray | None, seed: int = 0, guidance: dict | None = None,
                 num_sample_steps: int | None = None) -> np.ndarray: ...


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `evaluate` measures (the CLI flags)."""

    split: str = "test"
    num_clips: int | None = None  # evaluated clips (None: the whole split)
    seeds: int = 3  # samples per clip for diversity (seed 0 is the one scored)
    num_sample_steps: int | None = None  # None: the generator's default
    control_clips: int | None = 8  # clips for E_g / E_d (None: every evaluated clip)
    gaze_targets: tuple[tuple[float, float], ...] = DEFAULT_GAZE_TARGETS
    distance_quantiles: tuple[float, ...] = DEFAULT_DISTANCE_QUANTILES
    probe_clips: int = 256  # train-split clips whose ground truth fits the probes
    probe_frames_per_clip: int = 64
    max_frames: int | None = None  # evaluate only the first N frames of each clip
    step: int | None = None  # checkpoint step (None: latest)
    progress: bool = True
    # End-to-end lip sync (None: off): the expression-meter export, and the stage-1 run that
    # made the latents (None: the one the latents dataset records).
    expression_meter: str | None = None
    face_workdir: str | None = None
    decode_batch_size: int = 16  # stage-1 decodes per device call (not a flag)
    # XLA:CPU at -O0 for the stage-1 decode (vasa_jax.trainers.loop.FAST_CPU_COMPILE):
    # faster compiles, slower batches; for tests on CPU (not a flag).
    fast_cpu_compile: bool = False

    def __post_init__(self):
        if self.split not in schema.SPLITS:
            raise ValueError(f"split must be one of {schema.SPLITS}, got {self.split!r}")
        if self.face_workdir and not self.expression_meter:
            raise ValueError("--face_workdir is only used by the end-to-end lip sync, which "
                             "also needs --expression_meter M")
        if self.decode_batch_size < 1:
            raise ValueError(f"decode_batch_size must be >= 1, got {self.decode_batch_size}")
        for name in ("num_clips", "control_clips", "max_frames"):
            value = getattr(self, name)
            if value is not None and value < (2 if name == "max_frames" else 1):
                raise ValueError(f"{name} must be >= {2 if name == 'max_frames' else 1}, "
                                 f"got {value}")
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.num_sample_steps is not None and self.num_sample_steps < 1:
            raise ValueError(f"num_sample_steps must be >= 1, got {self.num_sample_steps}")
        if self.probe_clips < 1 or self.probe_frames_per_clip < 1:
            raise ValueError("probe_clips and probe_frames_per_clip must be >= 1")
        if any(len(g) != 2 for g in self.gaze_targets):
            raise ValueError(f"gaze_targets must be (theta, phi) pairs, got {self.gaze_targets}")
        if any(not 0.0 <= q <= 1.0 for q in self.distance_quantiles):
            raise ValueError(f"distance_quantiles must be in [0, 1], got "
                             f"{self.distance_quantiles}")


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class EvalClip:
    """One clip's ground truth: motion [T, Dm], audio features [T, Da], labels name -> [T, ...];
    frames: its T encoded (JPEG/PNG) frames, only where asked for (end-to-end lip sync)."""

    clip_id: str
    motion: np.ndarray
    audio: np.ndarray
    labels: dict[str, np.ndarray]
    frames: list[bytes] | None = None

    @property
    def num_frames(self) -> int:
        return len(self.motion)

    def controls(self) -> dict[str, Any]:
        """The clip's own control signals: gaze [2] | None, distance | None, emotion [8] | None."""
        gaze = self.labels.get("gaze")
        dist = self.labels.get("distance")
        return {
            "gaze": None if gaze is None else T.main_gaze(gaze),
            "distance": None if dist is None else float(np.mean(dist)),
            "emotion": T.emotion_average(self.labels, slice(None)),
        }


def _spread(n_total: int, n: int | None) -> np.ndarray:
    """Up to n indices of range(n_total), evenly spread (all of them if n is None)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(int))


def _motion_of(clip: schema.Clip, motion_source: str) -> np.ndarray:
    """Ground-truth per-frame motion [T, Dm] (no audio: what the probes are fitted on)."""
    if motion_source == "labels":
        try:
            return T.motion_from_labels(clip.labels)
        except KeyError as e:
            raise schema.CorruptRecordError(f"{clip.clip_id}: {e}") from e
    name = motion_source[len("features:"):]
    x = clip.features.get(name)
    if x is None or x.ndim != 2 or len(x) != clip.num_frames:
        raise schema.CorruptRecordError(
            f"{clip.clip_id}: no usable feature {name!r} ([{clip.num_frames}, D])")
    return np.asarray(x, np.float32)


def read_clips(
    directory: str, split: str, config: Any, *, max_clips: int | None, with_audio: bool,
    max_frames: int | None = None, frames_per_clip: int | None = None,
    with_frames: bool = False, progress: bool = False,
) -> tuple[list[EvalClip], int]:
    """Clips of a split (evenly spread over it if max_clips is set), with >= 2 frames.

    with_audio: also the audio features (`loaders.clip_sequences`; else audio is [T, 0]).
    with_frames: also the encoded frames of the kept rows (EvalClip.frames).
    max_frames: keep the first N frames; frames_per_clip: keep N evenly spaced frames
    (probe fitting; exclusive with with_audio). Returns (clips, records skipped as
    unreadable, too short or lacking the motion / audio source).
    """
    from data_pipeline.loaders import clip_sequences, load_clip_index

    index = load_clip_index(directory, split)  # FileNotFoundError names the splits present
    usable = np.flatnonzero(index.num_frames >= 2)
    skipped = len(index) - len(usable)
    source = schema.read_records(index.paths)
    d = config.data
    clips = []
    for rid in _progress(usable[_spread(len(usable), max_clips)], f"reading {split} clips",
                         progress):
        try:
            clip = schema.decode_clip(source[int(rid)])
            last = clip.num_frames if max_frames is None else min(max_frames, clip.num_frames)
            if with_audio:
                motion, audio = clip_sequences(clip, d.motion_source, d.audio_source,
                                               int(d.audio.n_mels), 0, last)
                rows = np.arange(last)
            else:
                motion = _motion_of(clip, d.motion_source)
                rows = (np.arange(last) if frames_per_clip is None else
                        _spread(clip.num_frames, frames_per_clip))
                motion = motion[rows]
                audio = np.zeros((len(rows), 0), np.float32)
        except schema.CorruptRecordError as e:
            logging.warning("%s record %d unusable: %s", split, rid, e)
            skipped += 1
            continue
        labels = {k: np.asarray(v)[rows] for k, v in clip.labels.items()}
        frames = [clip.frames[int(i)] for i in rows] if with_frames else None
        clips.append(EvalClip(clip.clip_id, np.asarray(motion, np.float64), audio, labels,
                              frames))
    return clips, skipped


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def _common_targets(clips: Sequence[EvalClip]) -> list[str]:
    """Probe targets (`PROBE_TARGETS`) labelled in every clip."""
    return [n for n in M.PROBE_TARGETS if all(n in c.labels for c in clips)]


def _stack_targets(clips: Sequence[EvalClip], names: Sequence[str]) -> dict[str, np.ndarray]:
    per_clip = [M.probe_targets(c.labels) for c in clips]
    return {n: np.concatenate([t[n] for t in per_clip]) for n in names}


# ----------------------------------------------------------------------------- restoring


def load_generator(workdir: str, step: int | None = None) -> Generator:
    """`MotionGenerator.from_workdir` (its EMA weights; clear errors for a folder that is
    not a stage-2 run)."""
    from vasa_jax.motion_sampler import MotionGenerator

    return MotionGenerator.from_workdir(workdir, step=step)


# ----------------------------------------------------------------------------- end to end


@dataclasses.dataclass
class FaceRun:
    """What the end-to-end lip sync decodes and reads with (`face_run`)."""

    workdir: str  # the stage-1 run
    step: int | None  # its checkpoint (None: latest)
    meter_path: str
    meter: Any  # vasa_jax.models.expression_meter.ExpressionMeter


def face_run(data: str, settings: Settings) -> FaceRun | None:
    """The stage-1 run and expression meter of the end-to-end lip sync (None: not asked for).

    --face_workdir, else the run the latents dataset `data` records (dataset.json extra
    .extract_latents.face_workdir, at the recorded step) if that folder exists. Cheap: the
    stage-1 model is restored later. Raises ValueError (no stage-1 run to use) or
    FileNotFoundError (a path that does not exist) naming the flag to fix.
    """
    if not settings.expression_meter:
        return None
    meta = schema.DatasetInfo.load(data).extra.get("extract_latents") or {}
    recorded = meta.get("face_workdir")
    if settings.face_workdir:
        if not os.path.isdir(settings.face_workdir):
            raise FileNotFoundError(f"--face_workdir {settings.face_workdir!r} does not exist")
        workdir = settings.face_workdir
    elif recorded and os.path.isdir(recorded):
        workdir = recorded
    else:
        why = (f"the latents dataset records {recorded!r}, which does not exist here"
               if recorded else f"{data!r} records none: it was not made by "
               "`python -m data_pipeline.extract_latents`")
        raise ValueError(f"--expression_meter needs the stage-1 run that made the motion "
                         f"latents: pass --face_workdir W1 ({why})")
    same = bool(recorded) and os.path.realpath(workdir) == os.path.realpath(recorded)
    step = meta.get("step") if same else None
    if recorded and not same:
        logging.warning("decoding with stage-1 run %s (latest step); the latents were made "
                        "by %s step %s", workdir, recorded, meta.get("step"))
    from vasa_jax.evaluate.face_latent import load_meter

    # FileNotFoundError naming the path if it is not an export.
    return FaceRun(workdir, None if step is None else int(step), settings.expression_meter,
                   load_meter(settings.expression_meter))


def _encode_portrait(graphdef, state, frames):
    """uint8 portraits [B, S, S, 3] -> (v_app [B, D, H, W, C], z_id [B, id_dim])."""
    from flax import nnx

    latent = nnx.merge(graphdef, state).encode(T.to_signed_float(frames))
    return latent.v_app, latent.z_id


def _decode_mouth(graphdef, meter, state, meter_params, v_app, z_id, z_pose, z_dyn):
    """One portrait's (v_app [1, ...], z_id [1, ...]) with motion [B, 7], [B, dyn_dim] ->
    the meter's mouth_open of the decoded frames [B]."""
    import jax.numpy as jnp
    from flax import nnx

    b = z_pose.shape[0]
    gen = nnx.merge(graphdef, state)
    images = gen.decode(jnp.broadcast_to(v_app, (b,) + v_app.shape[1:]),
                        jnp.broadcast_to(z_id, (b,) + z_id.shape[1:]), z_pose, z_dyn)
    return meter(meter_params, jnp.clip(images, -1.0, 1.0))["mouth_open"]


@functools.lru_cache(maxsize=None)
def _jitted_decode(compiler_options: tuple[tuple[str, Any], ...] = ()) -> dict[str, Any]:
    """`_encode_portrait` and `_decode_mouth` jitted (model graphdef and meter static), once
    per set of XLA compiler options."""
    import jax

    jit = functools.partial(jax.jit, compiler_options=dict(compiler_options) or None)
    return {"encode": jit(_encode_portrait, static_argnums=0),
            "decode": jit(_decode_mouth, static_argnums=(0, 1))}


def end_to_end_lip_sync(run: FaceRun, clips: Sequence[EvalClip], generated: Sequence[np.ndarray],
                        settings: Settings) -> dict[str, Any]:
    """Decodes each clip's generated motion with the stage-1 model and reads the mouth.

    clips: with frames (`read_clips(with_frames=True)`); generated: raw [z_pose, z_dyn]
    motion [T, 7 + dyn_dim] per clip. Portraits (each clip's frame 0) are encoded in
    batches of clips, decodes and meter readings run in fixed-size jitted batches over the
    stage-1 mesh (`face_latent.BatchRunner`). Returns the `lip_sync` entries "end_to_end_r",
    "end_to_end_r_real" and "end_to_end" (details; "none_reason" for None values).
    """
    import jax

    from vasa_jax.evaluate import face_latent as FL
    from vasa_jax.inference import restore_face

    restored = restore_face(run.workdir, run.step)
    options = FL.FAST_CPU_COMPILE if settings.fast_cpu_compile else {}
    runner = FL.BatchRunner(restored.model, restored.mesh, restored.config.mesh.rules,
                            settings.decode_batch_size, compiler_options=options,
                            expression_meter=run.meter)
    dim = 7 + int(restored.config.model.motion.dyn_dim)
    if generated and generated[0].shape[1] != dim:
        raise ValueError(f"the generated motion has {generated[0].shape[1]} dims, stage-1 run "
                         f"{run.workdir!r} decodes [z_pose (7), z_dyn] = {dim}: pass the "
                         "--face_workdir that made the latents")
    fns = _jitted_decode(tuple(sorted(options.items())))
    size = runner.image_size
    replicated = jax.sharding.NamedSharding(restored.mesh, jax.sharding.PartitionSpec())
    gen_mouth, real_mouth = [], []
    groups = range(0, len(clips), runner.batch_size)
    def decoded(frames: Sequence[bytes]) -> np.ndarray:
        return np.stack([T.resize_square(schema.decode_frame(f), size) for f in frames])

    for g in _progress(groups, "end-to-end lip sync", settings.progress):
        group = clips[g:g + runner.batch_size]
        v_app, z_id = runner.map(lambda x: fns["encode"](runner.graphdef, runner.state, x),
                                 [decoded([c.frames[0] for c in group])])
        for k, clip in enumerate(group):
            motion = np.asarray(generated[g + k], np.float32)
            portrait = [jax.device_put(a[k:k + 1], replicated) for a in (v_app, z_id)]
            gen_mouth.append(runner.map(
                lambda p, d: fns["decode"](runner.graphdef, runner.meter, runner.state,
                                           runner.meter_params, *portrait, p, d),
                [motion[:, :7], motion[:, 7:]]).astype(np.float64))
            real_mouth.append(runner.read_expression(decoded(clip.frames))["mouth_open"]
                              .astype(np.float64))
    truth = [c.labels["mouth_open"].astype(np.float64).ravel() for c in clips]
    pooled = np.concatenate(truth)
    r = M.pearson_r(np.concatenate(gen_mouth), pooled)
    r_real = M.pearson_r(np.concatenate(real_mouth), pooled)
    per_clip = [M.pearson_r(a, b) for a, b in zip(gen_mouth, truth)]
    reasons = {}
    constant = "the true mouth_open is constant over the clips" if np.ptp(pooled) == 0 else ""
    for key, value, frames in (("end_to_end_r", r, "decoded"),
                               ("end_to_end_r_real", r_real, "real")):
        if not np.isfinite(value):
            reasons[key] = constant or f"the meter's mouth_open of the {frames} frames is constant"
    details = {
        "face_workdir": os.path.abspath(run.workdir),
        "face_step": int(restored.step),
        "face_weights": restored.weights,
        "expression_meter": os.path.abspath(run.meter_path),
        "image_size": int(size),
        "per_clip_mean_r": _clean(np.nanmean(per_clip) if np.any(np.isfinite(per_clip))
                                  else float("nan")),
        "num_frames": int(len(pooled)),
    }
    if reasons:
        details["none_reason"] = reasons
    return {"end_to_end_r": _clean(r), "end_to_end_r_real": _clean(r_real),
            "end_to_end": details}


# ----------------------------------------------------------------------------- metrics


def _clean(x: float | None) -> float | None:
    """JSON has no NaN: None instead."""
    return None if x is None or not np.isfinite(x) else float(x)


def _window_gaze_errors(gaze: np.ndarray, target: np.ndarray, window: int) -> np.ndarray:
    """Per generation window: angle (deg) between the window's main gaze and target [2].

    gaze: [T, 2] per-frame (theta, phi) degrees."""
    return np.array([float(M.angular_error_deg(T.main_gaze(gaze[s]), target))
                     for s in M.window_slices(len(gaze), window)])


def _window_distance_errors(distance: np.ndarray, target: float, window: int) -> np.ndarray:
    """Per generation window: |window mean distance - target|. distance: [T, 1] or [T]."""
    distance = np.asarray(distance).reshape(len(distance))
    return np.array([abs(float(np.mean(distance[s])) - float(target))
                     for s in M.window_slices(len(distance), window)])


def _compared_scale(default: float) -> float:
    """The guidance scale a control is compared at besides its default: 0 (guidance off)
    when the default guides it, else 1 (VASA-1's l_g)."""
    return 0.0 if default > 0 else 1.0


def evaluate(workdir: str, data: str | None, settings: Settings = Settings(), *,
             generator: Generator | None = None, json_path: str | None = None
             ) -> dict[str, Any]:
    """Runs the evaluation of the module docstring; returns the JSON dict (also written).

    generator: evaluate this object (see `Generator`) instead of the one restored from
    `workdir` (tests use an oracle). data: None = the run config's data.path.
    json_path: where the results go ('' = nowhere; None = W/eval/motion_<split>_step<S>.json,
    or nowhere when there is no workdir).
    Raises FileNotFoundError (no workdir / checkpoint / dataset / split / stage-1 run /
    expression meter) or ValueError (too few usable clips, required labels missing, no
    stage-1 run for --expression_meter) with a message saying what to fix.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    face = None
    if generator is None:
        if data:  # the end-to-end inputs before the (slow) restore: fail fast
            _check_dataset(data)
            face = face_run(data, settings)
        generator = load_generator(workdir, settings.step)
    config = generator.config
    data = data or str(config.data.get("path", "") or "")
    if not data:
        raise ValueError("no dataset: pass --data DIR (the run's config has no data.path)")
    _check_dataset(data)
    if face is None:
        face = face_run(data, settings)
    if face is not None and config.data.motion_source != LATENTS_SOURCE:
        raise ValueError(
            "the end-to-end lip sync (--expression_meter) decodes stage-1 latents: it needs a "
            f"run trained on data.motion_source={LATENTS_SOURCE!r} (`data_pipeline."
            f"extract_latents`), this one's is {config.data.motion_source!r}")
    window = int(config.data.window)
    defaults = {k: float(v) for k, v in dict(config.get("guidance", None) or {}).items()}
    timings["restore"] = time.perf_counter() - start

    # --- ground truth: evaluated clips (with audio) and probe clips (motion only)
    t0 = time.perf_counter()
    clips, skipped = read_clips(data, settings.split, config, max_clips=settings.num_clips,
                                with_audio=True, max_frames=settings.max_frames,
                                with_frames=face is not None, progress=settings.progress)
    if not clips:
        raise ValueError(f"{data!r} split {settings.split!r} has no usable clip (>= 2 frames "
                         f"with the run's motion / audio sources; {skipped} records skipped)")
    missing = [n for n in REQUIRED_LABELS if not all(n in c.labels for c in clips)]
    if missing:
        raise ValueError(f"the evaluated clips lack labels {missing}: lip sync and dP need "
                         f"{list(REQUIRED_LABELS)} in every clip")
    probe_clips = None
    if settings.split != "train":
        try:
            probe_clips, _ = read_clips(data, "train", config, max_clips=settings.probe_clips,
                                        with_audio=False,
                                        frames_per_clip=settings.probe_frames_per_clip,
                                        progress=settings.progress)
        except FileNotFoundError:
            logging.warning("%s has no train split: probes are fitted on the evaluated clips",
                            data)
        if probe_clips is not None and (len(probe_clips) < 2 or
                                        any(n not in _common_targets(probe_clips)
                                            for n in REQUIRED_LABELS)):
            probe_clips = None
    timings["read"] = time.perf_counter() - t0

    # --- probes: ground-truth motion -> labels
    t0 = time.perf_counter()
    targets = _common_targets(clips)
    test_motion = np.concatenate([c.motion for c in clips])
    test_targets = _stack_targets(clips, targets)
    if probe_clips is not None:
        targets = [n for n in targets if n in _common_targets(probe_clips)]
        fit_clips = probe_clips
        protocol = (f"fit on {len(probe_clips)} train clips' ground truth, R^2 on the "
                    "evaluated clips' ground truth")
    else:
        fit_clips = clips
        protocol = ("fit on the evaluated clips' ground truth (no usable train split), R^2 "
                    "cross-validated over clips")
    groups = np.concatenate([np.full(c.num_frames, i) for i, c in enumerate(fit_clips)])
    probe_set = M.MotionProbes.fit(
        np.concatenate([c.motion for c in fit_clips]), _stack_targets(fit_clips, targets),
        groups, test_motion=test_motion if probe_clips is not None else None,
        test_targets=test_targets if probe_clips is not None else None)
    gt_std = test_motion.std(axis=0)
    timings["probes"] = time.perf_counter() - t0

    # --- what each clip is generated with
    requests: dict[str, list[tuple[str, Any]]] = {}  # control -> fixed (target, value)s
    skipped_controls = {}
    if "gaze" in probe_set.models:
        requests["gaze"] = [(f"({t:+g}, {p:+g})", np.array([t, p], np.float32))
                            for t, p in settings.gaze_targets]
    else:
        skipped_controls["gaze"] = "no gaze labels (in every evaluated / probe clip)"
    if "distance" in probe_set.models:
        pool = [c for c in (probe_clips or clips) if "distance" in c.labels] or clips
        means = np.array([float(np.mean(c.labels["distance"])) for c in pool])
        requests["distance"] = [(f"q{q:g}", float(np.quantile(means, q)))
                                for q in settings.distance_quantiles]
    else:
        skipped_controls["distance"] = "no distance labels (in every evaluated / probe clip)"
    scales = {name: {"default": defaults.get(name, 0.0),
                     "compared": _compared_scale(defaults.get(name, 0.0))} for name in requests}
    # guidance key -> scales (None: the generator's defaults, i.e. the config's)
    guidances = {"default": None, **{name: {**defaults, name: scales[name]["compared"]}
                                     for name in requests}}
    control_ids = set(_spread(len(clips), settings.control_clips).tolist())

    # --- generation and per-clip scores
    t0 = time.perf_counter()
    generated, div, pose_div = [], [], []
    errors = {name: {"default": {}, "compared": {}} for name in requests}
    floors: dict[str, list[np.ndarray]] = {name: [] for name in requests}
    window_errors = {"gaze": _window_gaze_errors, "distance": _window_distance_errors}
    for i, clip in enumerate(_progress(clips, "generating", settings.progress)):
        own = clip.controls()
        jobs: dict[tuple, tuple[str, int, dict]] = {
            ("seed", s): ("default", s, {}) for s in range(settings.seeds)}
        todo = requests if i in control_ids else {}
        for name, fixed in todo.items():
            for target, value in [("own", own[name])] + fixed:
                for setting in ("default", "compared"):
                    if (setting, target) != ("default", "own"):  # that one is ("seed", 0)
                        jobs[(name, setting, target)] = (setting if setting == "default"
                                                         else name, 0, {name: value})
        out = _run_jobs(generator, clip, jobs, guidances, settings.num_sample_steps)
        samples = [out[("seed", s)] for s in range(settings.seeds)]
        generated.append(samples[0])
        if settings.seeds >= 2:
            div.append(M.diversity(np.stack(samples), gt_std))
            pose_div.append(M.diversity(np.stack([probe_set.predict(x, "pose")
                                                  for x in samples])))
        for name, fixed in todo.items():
            score = window_errors[name]
            for target, value in [("own", own[name])] + fixed:
                for setting in ("default", "compared"):
                    motion = out.get((name, setting, target), samples[0])
                    errors[name][setting].setdefault(target, []).append(
                        score(probe_set.predict(motion, name), value, window))
            # Probe floor: the ground truth through the probe vs its label, per window.
            truth = clip.labels[name].astype(np.float64)
            decoded = probe_set.predict(clip.motion, name)
            floors[name].append(np.concatenate([
                score(decoded[w], T.main_gaze(truth[w]) if name == "gaze"
                      else float(np.mean(truth[w])), window)
                for w in M.window_slices(clip.num_frames, window)]))
    timings["generate"] = time.perf_counter() - t0

    # --- lip sync and dP
    gt_mouth = [c.labels["mouth_open"].astype(np.float64).ravel() for c in clips]
    gen_mouth = [probe_set.predict(g, "mouth_open")[:, 0] for g in generated]
    gt_probe_mouth = [probe_set.predict(c.motion, "mouth_open")[:, 0] for c in clips]
    per_clip_r = [M.pearson_r(a, b) for a, b in zip(gen_mouth, gt_mouth)]
    lag_r, lag, _ = T.lagged_correlation(gt_mouth, gen_mouth, MAX_LAG)
    lip = {
        "r": _clean(M.pearson_r(np.concatenate(gen_mouth), np.concatenate(gt_mouth))),
        "per_clip_mean_r": _clean(np.nanmean(per_clip_r) if np.any(np.isfinite(per_clip_r))
                                  else float("nan")),
        "best_lag_r": _clean(lag_r),
        "best_lag": int(lag),
        "ground_truth_probe_r": _clean(M.pearson_r(np.concatenate(gt_probe_mouth),
                                                   np.concatenate(gt_mouth))),
        "num_frames": int(sum(len(m) for m in gt_mouth)),
    }
    if face is not None:
        t0 = time.perf_counter()
        lip.update(end_to_end_lip_sync(face, clips, generated, settings))
        timings["end_to_end"] = time.perf_counter() - t0
    dp_gen = M.pose_jitter_dp([probe_set.predict(g, "pose") for g in generated])
    dp_gt = M.pose_jitter_dp([c.labels["pose"] for c in clips])
    dp_probe = M.pose_jitter_dp([probe_set.predict(c.motion, "pose") for c in clips])
    pose = {"generated": _clean(dp_gen), "ground_truth": _clean(dp_gt),
            "ground_truth_probe": _clean(dp_probe),
            "ratio": _clean(dp_gen / dp_gt if dp_gt > 0 else float("nan")),
            "ratio_to_probe": _clean(dp_gen / dp_probe if dp_probe > 0 else float("nan"))}
    control = {name: {"skipped": why} for name, why in skipped_controls.items()}
    for name in requests:
        control[name] = _control_summary(errors[name], scales[name], floors[name],
                                         len(control_ids))
    if "distance" in requests:
        control["distance"]["targets"] = dict(requests["distance"])
    gaze, distance = control["gaze"], control["distance"]
    timings["total"] = time.perf_counter() - start

    step = getattr(generator, "step", None)
    if json_path is None:
        json_path = "" if not workdir else os.path.join(
            workdir, "eval", f"{NAME}_{settings.split}" +
            (f"_step{int(step):08d}" if step is not None else "") + ".json")
    result = {
        "evaluator": NAME,
        "workdir": os.path.abspath(workdir) if workdir else None,
        "step": None if step is None else int(step),
        "data": os.path.abspath(data),
        "split": settings.split,
        "num_clips": len(clips),
        "num_frames": int(sum(c.num_frames for c in clips)),
        "skipped_records": int(skipped),
        "motion_source": str(config.data.motion_source),
        "audio_source": str(config.data.audio_source),
        "window": window,
        "guidance": defaults,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "progress"},
        "probes": {"protocol": protocol, "r2": probe_set.r2},
        "lip_sync": lip,
        "pose_dp": pose,
        "gaze_control": gaze,
        "distance_control": distance,
        "diversity": {
            "seeds": settings.seeds,
            "motion": _clean(float(np.mean(div))) if div else None,
            "pose_deg": _clean(float(np.mean(pose_div))) if pose_div else None,
        },
        "json": json_path or None,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _check_dataset(data: str) -> None:
    if not os.path.isdir(data):
        raise FileNotFoundError(f"dataset folder {data!r} does not exist")
    schema.DatasetInfo.load(data)  # a clear error if `data` is not a clip-record dataset


def _stack_controls(rows: Sequence[dict], name: str) -> tuple[np.ndarray | None,
                                                               np.ndarray | None]:
    """One control over batch rows: (values [N, dim] or None if no row has it, keep [N] or
    None if every row has it)."""
    values = [r[name] for r in rows]
    if all(v is None for v in values):
        return None, None
    filled = [np.asarray(v, np.float32).reshape(-1) for v in values if v is not None]
    dim = filled[0].size
    keep = np.array([v is not None for v in values])
    stacked = np.stack([np.zeros(dim, np.float32) if v is None
                        else np.asarray(v, np.float32).reshape(dim) for v in values])
    return stacked, (None if keep.all() else keep)


def _run_jobs(generator: Generator, clip: EvalClip, jobs: dict[tuple, tuple[str, int, dict]],
              guidances: dict[str, dict | None], num_sample_steps: int | None
              ) -> dict[tuple, np.ndarray]:
    """Generates every job of one clip: key -> raw motion float64 [T, Dm].

    jobs: key -> (guidance key into `guidances`, seed, control overrides of the clip's own
    controls). Jobs sharing a guidance go in one `generate_batch` call (same audio, one row
    each) when the generator has it, else one `generate` call each.
    """
    own = clip.controls()
    by_guidance: dict[str, list[tuple]] = {}
    for key, (g, _, _) in jobs.items():
        by_guidance.setdefault(g, []).append(key)
    out = {}
    for g, keys in by_guidance.items():
        rows = [{**own, **jobs[k][2]} for k in keys]
        seeds = [jobs[k][1] for k in keys]
        if hasattr(generator, "generate_batch"):
            batch, keep = {}, {}
            for name in ("gaze", "distance", "emotion"):
                batch[name], mask = _stack_controls(rows, name)
                if mask is not None:
                    keep[name] = mask
            motions = generator.generate_batch(
                np.repeat(clip.audio[None], len(keys), axis=0), seeds=seeds,
                keep=keep or None, guidance=guidances[g], num_sample_steps=num_sample_steps,
                **batch)
        else:
            motions = [generator.generate(clip.audio, seed=seed, guidance=guidances[g],
                                          num_sample_steps=num_sample_steps, **row)
                       for row, seed in zip(rows, seeds)]
        for key, motion in zip(keys, motions):
            motion = np.asarray(motion, np.float64)
            if motion.shape != clip.motion.shape:
                raise RuntimeError(f"generator returned {motion.shape} for {clip.clip_id}, "
                                   f"expected {clip.motion.shape}")
            if not np.all(np.isfinite(motion)):
                raise RuntimeError(f"generator returned non-finite motion for {clip.clip_id}")
            out[key] = motion
    return out


def _control_summary(errors: dict[str, dict[str, list[np.ndarray]]], scales: dict[str, float],
                     floor: list[np.ndarray], num_clips: int) -> dict[str, Any]:
    """Mean control errors per guidance setting ("default", "compared") and target.

    errors: setting -> target -> per-clip window errors [n_windows]; floor: per-clip window
    errors of the ground truth through the probe."""
    out: dict[str, Any] = {"num_clips": int(num_clips)}
    for setting, per_target in errors.items():
        out[setting] = {
            "scale": scales[setting],
            "mean": _clean(float(np.mean(np.concatenate(
                [e for v in per_target.values() for e in v])))),
            "per_target": {k: _clean(float(np.mean(np.concatenate(v))))
                           for k, v in per_target.items()},
        }
    out["probe_floor"] = _clean(float(np.mean(np.concatenate(floor))))
    return out


# ----------------------------------------------------------------------------- CLI


def _pairs(text: str) -> tuple[tuple[float, float], ...]:
    """'15,0;0,10' -> ((15, 0), (0, 10)); '' -> ()."""
    try:
        pairs = tuple(tuple(float(v) for v in item.split(",")) for item in text.split(";")
                      if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'theta,phi;theta,phi', got {text!r}")
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected 'theta,phi;theta,phi', got {text!r}")
    return pairs


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument("--workdir", required=True, help="stage-2 run folder (checkpoints/)")
    parser.add_argument("--data", default=None,
                        help="clip-record dataset folder (default: the run's data.path)")
    parser.add_argument("--split", default=d.split, choices=schema.SPLITS,
                        help="clips to evaluate (default: the held-out test split)")
    parser.add_argument("--num_clips", type=int, default=None,
                        help="evaluate at most this many clips, spread over the split")
    parser.add_argument("--seeds", type=int, default=d.seeds,
                        help="samples per clip for diversity (1: no diversity)")
    parser.add_argument("--num_sample_steps", type=int, default=None,
                        help="diffusion sampling steps (default: the generator's)")
    parser.add_argument("--control_clips", type=int, default=d.control_clips,
                        help="clips on which gaze / distance control is measured (each costs "
                             "2 x (targets + 1) generations)")
    parser.add_argument("--gaze_targets", type=_pairs,
                        default=";".join(f"{t:g},{p:g}" for t, p in d.gaze_targets),
                        help="requested gaze directions besides each clip's own, "
                             "'theta,phi;theta,phi' degrees (theta up, phi right)")
    parser.add_argument("--distance_quantiles", type=_floats,
                        default=",".join(f"{q:g}" for q in d.distance_quantiles),
                        help="requested distances besides each clip's own: these quantiles "
                             "of the probe clips' mean distances")
    parser.add_argument("--probe_clips", type=int, default=d.probe_clips,
                        help="train-split clips whose ground truth fits the probes")
    parser.add_argument("--probe_frames_per_clip", type=int, default=d.probe_frames_per_clip)
    parser.add_argument("--max_frames", type=int, default=None,
                        help="evaluate only the first N frames of each clip")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--json", default=None,
                        help="results file (default WORKDIR/eval/motion_<split>_step<S>.json; "
                             "'' writes none)")
    parser.add_argument("--expression_meter", default=None,
                        help="expression-meter export (vasa_jax.models.expression_meter): "
                             "also the end-to-end lip sync, the generated latents decoded to "
                             "frames by stage 1 and read by the meter")
    parser.add_argument("--face_workdir", default=None,
                        help="the stage-1 run that made the motion latents, for "
                             "--expression_meter (default: the one the dataset records)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The human-readable report; the last line is `lip-sync r: X`."""
    def fmt(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    guidance = ", ".join(f"l_{k} {v:g}" for k, v in result["guidance"].items()) or "defaults"
    steps = result["settings"]["num_sample_steps"]
    lines = [
        f"{NAME} eval: step {result['step']}, {result['num_clips']} {result['split']} clips "
        f"({result['num_frames']} frames), motion {result['motion_source']!r}, audio "
        f"{result['audio_source']!r}, window {result['window']}, "
        f"{steps if steps else 'default'} sampling steps, guidance {guidance}",
        f"probes: {result['probes']['protocol']}",
    ]
    for name, r in result["probes"]["r2"].items():
        per = ", ".join(f"{k} {fmt(v)}" for k, v in r["r2"].items())
        lines.append(f"  probe {name} <- motion: R^2 {fmt(r['r2_mean'])}"
                     + (f" ({per})" if len(r["r2"]) > 1 else ""))
    lip, dp = result["lip_sync"], result["pose_dp"]
    lines += [
        f"lip-sync (probe mouth_open of generated motion vs the true mouth_open): pooled r "
        f"{fmt(lip['r'])}, per-clip mean r {fmt(lip['per_clip_mean_r'])}, best lag "
        f"{lip['best_lag']:+d} frames r {fmt(lip['best_lag_r'])}; ground truth through the "
        f"probe r {fmt(lip['ground_truth_probe_r'])} ({lip['num_frames']} frames)",
        f"dP (deg/frame): generated {fmt(dp['generated'])}, ground truth {fmt(dp['ground_truth'])}"
        f" (labels), ground truth through the probe {fmt(dp['ground_truth_probe'])}; "
        f"generated / ground truth {fmt(dp['ratio'], '.2f')}",
    ]
    if "end_to_end" in lip:
        e2e = lip["end_to_end"]
        why = "; ".join(f"{k}: {v}" for k, v in e2e.get("none_reason", {}).items())
        lines.append(
            f"end-to-end lip-sync (generated motion decoded by stage 1, meter mouth_open vs "
            f"the true mouth_open): pooled r {fmt(lip['end_to_end_r'])}, per-clip mean r "
            f"{fmt(e2e['per_clip_mean_r'])}; the meter on the real frames r "
            f"{fmt(lip['end_to_end_r_real'])} ({e2e['num_frames']} frames, stage-1 step "
            f"{e2e['face_step']} of {e2e['face_workdir']})" + (f" [n/a: {why}]" if why else ""))
    for key, label, unit, scale in (("gaze_control", "E_g (deg)", ".2f", "l_g"),
                                    ("distance_control", "E_d", ".4f", "l_d")):
        c = result[key]
        if "skipped" in c:
            lines.append(f"{label.split()[0]}: skipped ({c['skipped']})")
            continue
        parts = []
        for setting in ("default", "compared"):
            per = ", ".join(f"{k} {fmt(v, unit)}" for k, v in c[setting]["per_target"].items())
            tag = " (default)" if setting == "default" else ""
            parts.append(f"{scale} = {c[setting]['scale']:g}{tag}: "
                         f"{fmt(c[setting]['mean'], unit)} [{per}]")
        lines.append(f"{label}: " + "; ".join(parts) +
                     f"; probe floor {fmt(c['probe_floor'], unit)} ({c['num_clips']} clips)")
    dv = result["diversity"]
    if dv["motion"] is None:
        lines.append(f"diversity: n/a ({dv['seeds']} seed)")
    else:
        lines.append(f"diversity across {dv['seeds']} seeds: {fmt(dv['motion'])} (std over "
                     f"seeds / ground-truth std, mean over frames and dims); pose "
                     f"{fmt(dv['pose_deg'])} deg")
    if result["json"]:
        lines.append(f"json: {result['json']}")
    r = lip["r"]
    lines.append(f"lip-sync r: {'nan' if r is None else format(r, '.3f')}")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.json:
        cli.check_output(args.json, "--json file", folder=False)  # before the (slow) restore
    settings = Settings(
        split=args.split, num_clips=args.num_clips, seeds=args.seeds,
        num_sample_steps=args.num_sample_steps, control_clips=args.control_clips,
        # argparse converts string defaults with `type` too: both are tuples here.
        gaze_targets=args.gaze_targets, distance_quantiles=args.distance_quantiles,
        probe_clips=args.probe_clips, probe_frames_per_clip=args.probe_frames_per_clip,
        max_frames=args.max_frames, step=args.step, progress=not args.no_progress,
        expression_meter=args.expression_meter, face_workdir=args.face_workdir,
    )
    result = evaluate(args.workdir, args.data, settings, json_path=args.json)
    print("\n".join(summary_lines(result)), flush=True)
    return 0
