"""Stage-1 evaluator: how well the face latent model reconstructs, transfers and disentangles.

    python -m vasa_jax.evaluate face_latent --workdir W --data D [--split test]
        [--max_clips N] [--out DIR] [--step S] [--face_id PATH] [--expression_meter PATH]

Restores the latest (or --step) checkpoint of a stage-1 run in W (the EMA generator; the
live one if the checkpoint has no EMA) and measures, on the clips of split --split
(held-out "test" by default):

- Self-reenactment (VASA-1 sec 3.1's reconstruction): source = frame 0 of a clip,
  driving = `frames_per_clip` other frames of the same clip (evenly spaced), output =
  D(V_app, z_id of the source; z_pose, z_dyn of the driving frame), target = the driving
  frame. PSNR (dB) and SSIM (`vasa_jax.metrics.image`, images in [-1, 1], outputs clipped
  to it), averaged over all (source, driving) pairs; the PSNR inside the eye and mouth
  boxes (`vasa_jax.losses.FACE_REGIONS`); and all of these for copying the source frame
  (the floor of a model that moves nothing: a rendered blink or mouth beats it in its box).
- Cross-reenactment identity similarity (what l_cross-id trains for): source = frame 0 of
  clip c, motion from the driving frames of the next clip (in split order) of ANOTHER
  identity. Reported: the mean cosine similarity between the face-ID embeddings of the
  output and of the source, next to two references: the same for the self-reenacted
  outputs (same identity: the ceiling) and between the cross driver frames and the
  source (another identity: the floor). Embeddings come from the face-ID network of the
  run's config (loss.face_id_path, or --face_id). Without one the FALLBACK is the cosine
  similarity of the model's own z_id of output and source, labelled as such: it checks
  that the generator keeps its own identity code, not that a face recogniser would agree.
- Expression transfer (only with --expression_meter PATH, a frozen
  `vasa_jax.models.expression_meter` export): on the cross-reenactment pairs above (held-out
  clips, driver of another identity), the meter reads mouth_open, blink and gaze off the
  outputs and the Pearson r with the DRIVER's labels is reported per label (gaze: the mean
  of the theta and phi r), for the full transfer (driver pose + dynamics), for a
  dynamics-only transfer (the source's own z_pose, the driver's z_dyn: gaze there is the
  driver's eye-in-head gaze under the source's head pose, so its camera-frame r is lower
  by construction), and for the meter on the real driver frames (its ceiling). None where
  the labels are constant over the pairs or missing.
- Linear probes (`vasa_jax.metrics.probes`, closed-form ridge, held-out R^2) of the
  ground-truth labels from the latent codes of single frames:
    pose (yaw, pitch, roll) <- z_pose        should be HIGH
    pose (yaw, pitch, roll) <- z_dyn         the disentanglement check: should be LOW
                                             (pose leaks into z_dyn without l_consist)
    mouth_open, blink, gaze <- z_dyn         should be high
    emotion <- z_dyn                         accuracy vs the majority-class rate
  Probes are fitted on frames of train-split clips (ridge strength chosen by k-fold
  cross-validation over those clips) and scored on `probe_eval_frames_per_clip` (50)
  evenly spaced frames of each evaluated clip (more than the reenactment's 9: brief events
  like blinks need them for a stable R^2). If the
  dataset has no train split (or --split is train), they are k-fold cross-validated on
  the evaluated frames with folds split by clip (frames of one clip are never on both
  sides). A probe whose labels some clip lacks is skipped, with the reason in the output.
- A figure (PNG): one column per clip, rows: source, driving (a frame of another
  identity), pose-only transfer (source dynamics + driving pose), dynamics-only transfer
  (source pose + driving dynamics), full transfer (driving pose + dynamics).

Writes <out>/face_latent_<split>_step<step>.png and .json (all numbers; default out =
W/eval) and prints a summary whose last line is `psnr: X`. All model calls are jitted, in
fixed-size batches (the last padded) sharded over the mesh's batch axes; clips are read
directly from the shards (no augmentation). It runs in one process, on all its devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from data_pipeline import schema
from data_pipeline import transforms as T
from vasa_jax import cli, losses
from vasa_jax.inference import restore_face  # a run's EMA generator (its weights only)
from vasa_jax.metrics import image as image_metrics
from vasa_jax.metrics import probes
from vasa_jax.parallel import sharding
from vasa_jax.trainers.loop import FAST_CPU_COMPILE

NAME = "face_latent"
DESCRIPTION = "stage 1: reconstruction PSNR/SSIM, cross-reenactment identity, latent probes"
ANGLES = schema.POSE_NAMES[:3]  # yaw, pitch, roll (degrees)
FIGURE_ROWS = ("source", "driving", "pose only", "dynamics only", "full transfer")
MIN_CLIPS = 2


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class ClipFrames:
    """Frames of one clip chosen for evaluation, already resized.

    frames: uint8 [K, S, S, 3]; frame_ids: int [K] (positions in the clip; for held-out
    clips frame_ids[0] = 0 is the source, the rest are driving frames); labels: name ->
    [K, ...] for the labels the clip has.
    """

    clip_id: str
    identity: int
    frames: np.ndarray
    frame_ids: np.ndarray
    labels: dict[str, np.ndarray]


def _spread(n_total: int, n: int | None) -> np.ndarray:
    """Up to n indices of range(n_total), evenly spread (all of them if n is None)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(int))


def read_clips(
    directory: str, split: str, image_size: int, *, max_clips: int | None,
    frames_per_clip: int, include_first: bool, progress: bool = True,
) -> tuple[list[ClipFrames], int]:
    """Reads clips of a split (evenly spread over it if max_clips is set).

    include_first: frame 0 plus `frames_per_clip` evenly spaced frames of 1..T-1 (a source
    and its driving frames); else `frames_per_clip` evenly spaced frames of 0..T-1.
    Returns (clips, number of records skipped as unreadable or shorter than 2 frames).
    """
    from data_pipeline.loaders import load_clip_index

    index = load_clip_index(directory, split)  # FileNotFoundError names the splits present
    usable = np.flatnonzero((index.num_frames >= 2) & (index.identity_id >= 0))
    skipped = len(index) - len(usable)
    source = schema.read_records(index.paths)
    chosen = usable[_spread(len(usable), max_clips)]
    clips = []
    for rid in _progress(chosen, f"reading {split} clips", progress):
        try:
            clip = schema.decode_clip(source[int(rid)])
            t = clip.num_frames
            if include_first:
                ids = np.concatenate([[0], 1 + _spread(t - 1, frames_per_clip)])
            else:
                ids = _spread(t, frames_per_clip)
            frames = np.stack([T.resize_square(f, image_size) for f in clip.decode_frames(ids)])
        except schema.CorruptRecordError as e:
            logging.warning("%s record %d unusable: %s", split, rid, e)
            skipped += 1
            continue
        clips.append(ClipFrames(clip.clip_id, int(clip.identity_id), frames, ids,
                                {k: v[ids] for k, v in clip.labels.items()}))
    return clips, skipped


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- model calls


def _z_id_embedding(gen, params, images: jax.Array) -> jax.Array:
    """The FALLBACK identity embedding: the generator's own z_id, L2-normalised."""
    del params
    z = gen.id_encoder(images).astype(jnp.float32)
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)


def identity_function(face_id_path: str) -> tuple[Callable, Any, str, str]:
    """How identity embeddings are computed: (fn, params, method, label).

    fn(generator, params, images [B, S, S, 3] in [-1, 1]) -> unit-norm embeddings [B, E].
    method "face_id": the frozen face-ID network (vasa_jax.models.face_id.load_face_id);
    method "z_id": the FALLBACK, the evaluated generator's own identity encoder.
    """
    if not face_id_path:
        return (_z_id_embedding, {}, "z_id", "FALLBACK: cosine of the model's own z_id (no "
                "face-ID weights configured; not an independent identity measure)")
    from vasa_jax.models.face_id import load_face_id

    if not os.path.exists(face_id_path):
        raise FileNotFoundError(
            f"face-ID model {face_id_path!r} (the run's loss.face_id_path, or --face_id) not "
            "found; pass --face_id PATH, or --face_id '' for the z_id fallback")
    embedder = load_face_id(face_id_path)
    return (lambda gen, params, x: embedder.apply(params, x), embedder.params, "face_id",
            f"face-ID cosine ({face_id_path})")


def load_meter(path: str):
    """The frozen expression meter of --expression_meter (None for ''/None); a missing or
    wrong path is a FileNotFoundError naming it."""
    if not path:
        return None
    from vasa_jax.models.expression_meter import load_expression_meter

    return load_expression_meter(path)


class Rows:
    """Rows `index` of `base`, gathered lazily: `Rows(frames, [0, 0, 5])[a:b]`.

    Pairs repeat the same source frame many times; gathering per batch avoids a copy of
    every pair's frames on the host.
    """

    def __init__(self, base: np.ndarray, index: np.ndarray):
        self.base, self.index = base, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, s: slice) -> np.ndarray:
        return self.base[self.index[s]]



# The model functions are jitted once per set of XLA compiler options, with the generator's
# graphdef (and the identity function) static: every BatchRunner of the same architecture,
# e.g. one per evaluated checkpoint of a run, reuses their compiled executables.


def _encode_motion(graphdef, state, frames):
    return nnx.merge(graphdef, state).encode_motion(T.to_signed_float(frames))


def _transfer(graphdef, identity, state, id_params, source, z_pose, z_dyn):
    """Source frames' appearance + identity with the given motion -> (images in [-1, 1],
    their identity embeddings)."""
    gen = nnx.merge(graphdef, state)
    source = T.to_signed_float(source)
    src_pose, src_dyn = gen.encode_motion(source)
    v_app, z_id = gen.encode_appearance(source, src_pose, src_dyn)
    out = jnp.clip(gen.decode(v_app, z_id, z_pose, z_dyn), -1.0, 1.0)
    return out, identity(gen, id_params, out)


def _read_expression(meter, meter_params, images):
    """The expression meter's readings of uint8 frames or of images in [-1, 1]. (Separate
    from _transfer, whose compiled generator is then shared by runners with and without a
    meter.)"""
    if images.dtype == jnp.uint8:
        images = T.to_signed_float(images)
    return meter(meter_params, images)


def _embed(graphdef, identity, state, id_params, frames):
    return identity(nnx.merge(graphdef, state), id_params, T.to_signed_float(frames))


def region_masks(size: int) -> dict[str, np.ndarray]:
    """{region: [S, S] 0/1 mask} of the losses' landmark-free face boxes (eyes, mouth)."""
    return {name: losses.face_region_mask(size, {name: box}).astype(np.float32)
            for name, box in losses.FACE_REGIONS.items()}


def _quality(images, target_frames):
    """images [B, S, S, 3] in [-1, 1] vs uint8 targets -> {"psnr", "ssim", "psnr_<region>"
    for each face box} [B]: a rendered expression shows in its box's PSNR."""
    target = T.to_signed_float(target_frames)
    out = {"psnr": image_metrics.psnr(images, target), "ssim": image_metrics.ssim(images, target)}
    for name, mask in region_masks(images.shape[-2]).items():
        out[f"psnr_{name}"] = image_metrics.psnr(images, target, mask=mask)
    return out


@functools.lru_cache(maxsize=None)
def _jitted(compiler_options: tuple[tuple[str, Any], ...] = ()) -> dict[str, Callable]:
    """The jitted evaluation functions for one (hashable) set of XLA compiler options."""
    jit = functools.partial(jax.jit, compiler_options=dict(compiler_options) or None)
    return {
        "encode_motion": jit(_encode_motion, static_argnums=0),
        "transfer": jit(_transfer, static_argnums=(0, 1)),
        "embed": jit(_embed, static_argnums=(0, 1)),
        "read_expression": jit(_read_expression, static_argnums=0),
        "quality": jit(_quality),
    }


class BatchRunner:
    """The evaluator's jitted model functions, applied in fixed-size sharded batches.

    Frames go in as uint8 [N, S, S, 3]. Every call sees exactly `batch_size` rows (the
    last batch padded by repeating its first row) laid out over the mesh's batch axes, so
    each function compiles once; results are cut back to the real rows on the host.
    Generated images stay on the device unless asked for.
    """

    def __init__(self, model, mesh: jax.sharding.Mesh, rules, batch_size: int,
                 face_id_path: str = "", compiler_options: dict[str, Any] | None = None,
                 expression_meter=None):
        self.mapper = sharding.BatchMapper(mesh, rules, batch_size)
        self.batch_size, self.mesh = self.mapper.batch_size, mesh
        self.image_size = int(model.image_size)
        self.graphdef, self.state = nnx.split(model)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.identity, params, self.id_method, self.id_label = identity_function(face_id_path)
        self.id_params = jax.device_put(params, replicated)
        # expression_meter: a frozen vasa_jax.models.expression_meter.ExpressionMeter (or
        # None): reenact() then also returns its readings of the outputs.
        self.meter = None if expression_meter is None else expression_meter.apply
        self.meter_params = ({} if expression_meter is None else
                             jax.device_put(expression_meter.params, replicated))
        self._fns = _jitted(tuple(sorted((compiler_options or {}).items())))

    @staticmethod
    def images(frames: np.ndarray) -> np.ndarray:
        """uint8 [..., 3] -> float32 in [-1, 1]."""
        return T.to_signed_float(frames)

    def map(self, fn: Callable, inputs: Sequence[np.ndarray | Rows], desc: str = "",
            progress: bool = False) -> Any:
        """fn(*padded device batches) -> pytree of [batch_size, ...] arrays, over row-aligned
        inputs [N, ...] (numpy or `Rows`); returns the pytree of numpy [N, ...] results
        (`sharding.BatchMapper.map`)."""
        return self.mapper.map(fn, inputs, desc=desc, progress=progress)

    def encode_motion(self, frames: np.ndarray, progress: bool = True
                      ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 frames [N, S, S, 3] -> (z_pose [N, 7], z_dyn [N, dyn_dim])."""
        fn = self._fns["encode_motion"]
        return self.map(lambda x: fn(self.graphdef, self.state, x), [frames],
                        "encoding motion", progress)

    def embed(self, frames: np.ndarray | Rows, progress: bool = False) -> np.ndarray:
        """uint8 frames [N, S, S, 3] -> identity embeddings [N, E]."""
        fn = self._fns["embed"]
        return self.map(lambda x: fn(self.graphdef, self.identity, self.state, self.id_params,
                                     x), [frames],
                        "identity embeddings", progress)

    def read_expression(self, frames: np.ndarray | Rows, progress: bool = False
                        ) -> dict[str, np.ndarray]:
        """uint8 frames [N, S, S, 3] -> the expression meter's readings {"mouth_open" [N],
        "blink" [N], "gaze" [N, 2] degrees}."""
        if self.meter is None:
            raise ValueError("this BatchRunner has no expression meter")
        fn = self._fns["read_expression"]
        return self.map(lambda x: fn(self.meter, self.meter_params, x), [frames],
                        "expression readings", progress)

    def reenact(self, sources: np.ndarray | Rows, z_pose: np.ndarray, z_dyn: np.ndarray,
                targets: np.ndarray | Rows | None = None, *, return_images: bool = False,
                desc: str = "", progress: bool = True) -> dict[str, np.ndarray]:
        """Decodes sources' appearance with the given motion.

        sources, targets: uint8 frames [N, S, S, 3]; z_pose [N, 7]; z_dyn [N, D]. Returns
        {"embedding": [N, E]}, "expression" (the meter's readings of the outputs, as
        `read_expression`; only with a meter), "images" [N, S, S, 3] in [-1, 1] (if
        return_images) and,
        against targets (if given), `_quality`'s [N] metrics ("psnr", "ssim",
        "psnr_<region>") of the outputs and, prefixed "copy_", of the source frames
        themselves (the floor: a model that moves nothing).
        """
        transfer, quality = self._fns["transfer"], self._fns["quality"]
        read = self._fns["read_expression"]

        def fn(src, pose, dyn, *target):
            out, emb = transfer(self.graphdef, self.identity, self.state, self.id_params, src,
                                pose, dyn)
            res = {"embedding": emb}
            if self.meter is not None:
                res["expression"] = read(self.meter, self.meter_params, out)
            if target:
                res.update(quality(out, target[0]))
                copy = quality(T.to_signed_float(src), target[0])
                res.update({f"copy_{k}": v for k, v in copy.items()})
            if return_images:
                res["images"] = out
            return res

        inputs = [sources, z_pose, z_dyn] + ([] if targets is None else [targets])
        return self.map(fn, inputs, desc, progress)


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `evaluate` measures on (the CLI flags)."""

    split: str = "test"
    max_clips: int | None = None  # evaluated clips (None: all of the split)
    frames_per_clip: int = 8  # driving frames per clip (besides the source, frame 0)
    probe_clips: int = 256  # train-split clips whose frames fit the probes
    probe_frames_per_clip: int = 16
    # Frames per evaluated clip the probes are scored on (evenly spaced; more than the
    # reenactment's: a brief event like a blink is in ~6% of SynthTalk's frames, so 9
    # frames a clip hold ~15 blinks over 32 clips and the R^2 moves by +-0.1 between runs).
    probe_eval_frames_per_clip: int = 50
    kfold: int = 5  # folds when probes are cross-validated on the evaluated split
    figure_columns: int = 6
    batch_size: int = 16  # rounded up to a multiple of the batch-axis devices
    face_id: str | None = None  # face-ID export; None: the run's loss.face_id_path
    expression_meter: str | None = None  # expression-meter export (None: no expr. transfer)
    step: int | None = None  # checkpoint step (None: latest)
    progress: bool = True
    # XLA:CPU at -O0 (vasa_jax.trainers.loop.FAST_CPU_COMPILE): ~3x faster compiles, slower
    # batches. For smoke tests on CPU; the numbers are the same up to float rounding.
    fast_cpu_compile: bool = False

    def __post_init__(self):
        if self.split not in schema.SPLITS:
            raise ValueError(f"split must be one of {schema.SPLITS}, got {self.split!r}")
        for name in ("frames_per_clip", "probe_frames_per_clip", "probe_eval_frames_per_clip",
                     "figure_columns", "batch_size", "probe_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_clips is not None and self.max_clips < MIN_CLIPS:
            raise ValueError(f"max_clips must be >= {MIN_CLIPS}, got {self.max_clips}")
        if self.kfold < 2:
            raise ValueError(f"kfold must be >= 2, got {self.kfold}")


def _driver_clip(clips: Sequence[ClipFrames], c: int) -> int | None:
    """The next clip after c (cyclically) of another identity, or None if there is none."""
    n = len(clips)
    for k in range(1, n):
        if clips[(c + k) % n].identity != clips[c].identity:
            return (c + k) % n
    return None


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / np.maximum(
        np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


PROBES = (
    # name, label, latent, target columns (None: all), column names
    ("pose_from_z_pose", "pose", "z_pose", slice(0, 3), ANGLES),
    ("pose_from_z_dyn", "pose", "z_dyn", slice(0, 3), ANGLES),
    ("mouth_open_from_z_dyn", "mouth_open", "z_dyn", None, ("mouth_open",)),
    ("blink_from_z_dyn", "blink", "z_dyn", None, ("blink",)),
    ("gaze_from_z_dyn", "gaze", "z_dyn", None, ("theta", "phi")),
)


# (short name in the JSON, schema label) of what the expression meter reads.
EXPRESSION_LABELS = (("mouth", "mouth_open"), ("blink", "blink"), ("gaze", "gaze"))
EXPRESSION_VARIANTS = (("", "full transfer"), ("_dyn_only", "dynamics only"),
                       ("_real", "real driver frames"))


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson r of two [N] arrays; None if either is constant or not finite."""
    from vasa_jax.metrics.motion import pearson_r

    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return None
    return _finite(pearson_r(a, b))


def expression_correlations(readings: dict[str, np.ndarray], labels: dict[str, np.ndarray]
                            ) -> dict[str, float | None]:
    """{short name: Pearson r of reading vs label} for EXPRESSION_LABELS present in
    `labels` (rows aligned, [N] or [N, 2]); gaze: the mean of its two angles' r (those that
    are defined), None if neither is."""
    out = {}
    for short, name in EXPRESSION_LABELS:
        if name not in labels:
            continue
        y = np.asarray(labels[name], np.float64).reshape(len(labels[name]), -1)
        x = np.asarray(readings[name], np.float64).reshape(len(y), -1)
        rs = [r for r in (_pearson(x[:, k], y[:, k]) for k in range(y.shape[1]))
              if r is not None]
        out[short] = float(np.mean(rs)) if rs else None
    return out


def expression_transfer(runner: BatchRunner, clips: Sequence[ClipFrames], frames: np.ndarray,
                        sources: np.ndarray, z_pose: np.ndarray, z_dyn: np.ndarray,
                        src_clip: np.ndarray, rows: np.ndarray,
                        full_readings: dict[str, np.ndarray], progress: bool
                        ) -> dict[str, Any]:
    """The expression-transfer numbers (module docstring) of the cross-reenactment pairs
    (source clip src_clip[i], driver frame rows[i]; full_readings: the meter on their full
    transfers). Keys "<label>_r", "<label>_r_dyn_only", "<label>_r_real" per
    EXPRESSION_LABELS, "num_pairs", and "skipped" {label: reason} for missing labels."""
    labels, skipped = {}, {}
    for _, name in EXPRESSION_LABELS:
        y = _stack_labels(clips, name)
        if y is None:
            skipped[name] = f"label {name!r} missing from some evaluated clips"
        else:
            labels[name] = y[rows]
    src = sources[src_clip]
    dyn_only = runner.reenact(Rows(frames, src), z_pose[src], z_dyn[rows],
                              desc="dynamics-only transfer", progress=progress)["expression"]
    real = runner.read_expression(Rows(frames, rows), progress=progress)
    out: dict[str, Any] = {"num_pairs": int(len(rows))}
    for suffix, readings in zip((v[0] for v in EXPRESSION_VARIANTS),
                                (full_readings, dyn_only, real)):
        for short, r in expression_correlations(readings, labels).items():
            out[f"{short}_r{suffix}"] = r
    if skipped:
        out["skipped"] = skipped
    return out


def _stack_labels(clips: Sequence[ClipFrames], name: str) -> np.ndarray | None:
    """The label of every frame of the clips, concatenated; None if any clip lacks it."""
    if not clips or any(name not in c.labels for c in clips):
        return None
    return np.concatenate([c.labels[name] for c in clips])


def _clip_groups(clips: Sequence[ClipFrames]) -> np.ndarray:
    """The clip (position in `clips`) of every frame, concatenated: [N]."""
    return np.concatenate([np.full(len(c.frame_ids), i) for i, c in enumerate(clips)])


def _emotion_probe(x_train, y_train, groups_train, x_test, y_test, groups_test, k
                   ) -> dict[str, Any]:
    """Emotion accuracy from z_dyn: train -> test, or (x_train None) pooled over k folds of
    the test set by clip."""
    if x_train is not None:
        return probes.classifier_probe(x_train, y_train, x_test, y_test,
                                       groups_train=groups_train).to_json()
    correct = chance = 0.0
    for tr, te in probes.group_kfold(groups_test, k):
        r = probes.classifier_probe(x_test[tr], y_test[tr], x_test[te], y_test[te],
                                    groups_train=groups_test[tr])
        correct += r.accuracy * len(te)
        chance += r.chance * len(te)
    return {"accuracy": correct / len(y_test), "chance": chance / len(y_test),
            "num_test": int(len(y_test))}


def run_probes(
    test_clips: Sequence[ClipFrames], test_latents: dict[str, np.ndarray],
    train_clips: Sequence[ClipFrames] | None, train_latents: dict[str, np.ndarray] | None,
    kfold: int,
) -> dict[str, Any]:
    """All probes of the module docstring; `train_clips` None: cross-validated.

    latents: {"z_pose": [N, 7], "z_dyn": [N, D]}, rows aligned with the clips' frames
    (concatenated in order). Returns {"protocol", "skipped": {probe: reason}, probe: result}.
    """
    cross_validate = train_clips is None
    groups = _clip_groups(test_clips)
    train_groups = None if cross_validate else _clip_groups(train_clips)
    k = min(kfold, len(test_clips))
    n_eval = sum(len(c.frame_ids) for c in test_clips)
    protocol = (f"{k}-fold cross-validation on {n_eval} frames of the evaluated clips (folds "
                "by clip)" if cross_validate else
                f"fit on {sum(len(c.frame_ids) for c in train_clips)} train-split frames, "
                f"scored on {n_eval} frames of the evaluated clips")
    results: dict[str, Any] = {"protocol": protocol, "skipped": {}}

    def labels(label):
        """(train, test) labels, or a reason why the probe is skipped."""
        y_test = _stack_labels(test_clips, label)
        y_train = None if cross_validate else _stack_labels(train_clips, label)
        if y_test is None or (not cross_validate and y_train is None):
            where = " and ".join(s for s, y in (("evaluated", y_test), ("train", y_train))
                                 if y is None and (s == "evaluated" or not cross_validate))
            return f"label {label!r} missing from some {where} clips"
        return y_train, y_test

    for name, label, latent, cols, names in PROBES:
        ys = labels(label)
        if isinstance(ys, str):
            results["skipped"][name] = ys
            continue
        y_train, y_test = (None if y is None else
                           y.astype(np.float64).reshape(len(y), -1)[:, cols or slice(None)]
                           for y in ys)
        if cross_validate:
            res = probes.kfold_probe(test_latents[latent], y_test, groups, k=k, names=names)
        else:
            res = probes.linear_probe(train_latents[latent], y_train, test_latents[latent],
                                      y_test, names=names, groups_train=train_groups)
        results[name] = res.to_json()

    ys = labels("emotion")
    if isinstance(ys, str):
        results["skipped"]["emotion_from_z_dyn"] = ys
    else:
        try:
            results["emotion_from_z_dyn"] = _emotion_probe(
                None if cross_validate else train_latents["z_dyn"], ys[0], train_groups,
                test_latents["z_dyn"], ys[1], groups, k)
        except ValueError as e:  # e.g. a single emotion among the training frames
            results["skipped"]["emotion_from_z_dyn"] = str(e)
    return results


def evaluate(workdir: str, data: str, settings: Settings = Settings(),
             out_dir: str | None = None) -> dict[str, Any]:
    """Runs the whole evaluation (see the module docstring); returns the JSON dict.

    Raises FileNotFoundError (no workdir / checkpoint / split / face-ID model) or
    ValueError (too few clips, not a stage-1 run) with a message saying what to fix.
    Host memory: the evaluated frames, clips x (frames_per_clip + 1 +
    probe_eval_frames_per_clip) x S x S x 3 bytes.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if not os.path.isdir(data):
        raise FileNotFoundError(f"dataset folder {data!r} does not exist")
    schema.DatasetInfo.load(data)  # a clear error if `data` is not a clip-record dataset
    meter = load_meter(settings.expression_meter)  # before the (slow) restore: fail fast
    restored = restore_face(workdir, settings.step)
    config = restored.config
    face_id_path = (settings.face_id if settings.face_id is not None
                    else str(config.loss.get("face_id_path", "") or ""))
    runner = BatchRunner(restored.model, restored.mesh, config.mesh.rules, settings.batch_size,
                         face_id_path, FAST_CPU_COMPILE if settings.fast_cpu_compile else None,
                         expression_meter=meter)
    size = runner.image_size
    timings["restore"] = time.perf_counter() - start

    t0 = time.perf_counter()
    clips, skipped = read_clips(data, settings.split, size, max_clips=settings.max_clips,
                                frames_per_clip=settings.frames_per_clip, include_first=True,
                                progress=settings.progress)
    if len(clips) < MIN_CLIPS:
        raise ValueError(
            f"{data!r} split {settings.split!r} has {len(clips)} usable clips (>= 2 frames); "
            f"the evaluation needs >= {MIN_CLIPS} ({skipped} records skipped)")
    # The probes' own frames of the evaluated clips (more than the reenactment's).
    probe_clips, _ = read_clips(data, settings.split, size, max_clips=settings.max_clips,
                                frames_per_clip=settings.probe_eval_frames_per_clip,
                                include_first=False, progress=settings.progress)
    train_clips = None
    if settings.split != "train":
        try:
            train_clips, _ = read_clips(
                data, "train", size, max_clips=settings.probe_clips,
                frames_per_clip=settings.probe_frames_per_clip, include_first=False,
                progress=settings.progress)
        except FileNotFoundError:
            logging.warning("%s has no train split: probes are cross-validated", data)
        if train_clips is not None and len(train_clips) < MIN_CLIPS:
            train_clips = None
    timings["read"] = time.perf_counter() - t0

    # Every evaluated frame in one array; clip i owns rows offsets[i]:offsets[i + 1], its
    # source (frame 0) first, then its driving frames.
    frames = np.concatenate([c.frames for c in clips])
    offsets = np.cumsum([0] + [len(c.frame_ids) for c in clips])
    sources = offsets[:-1]

    t0 = time.perf_counter()
    z_pose, z_dyn = runner.encode_motion(frames, settings.progress)
    pp, pd = runner.encode_motion(np.concatenate([c.frames for c in probe_clips]),
                                  settings.progress)
    probe_latents = {"z_pose": pp, "z_dyn": pd}
    train_latents = None
    if train_clips is not None:
        tp, td = runner.encode_motion(np.concatenate([c.frames for c in train_clips]),
                                      settings.progress)
        train_latents = {"z_pose": tp, "z_dyn": td}
    source_emb = runner.embed(Rows(frames, sources))  # [C, E]
    timings["encode"] = time.perf_counter() - t0

    # --- self-reenactment: (source of clip i, driving frame k of clip i)
    t0 = time.perf_counter()
    pair_clip = np.concatenate([np.full(len(c.frame_ids) - 1, i) for i, c in enumerate(clips)])
    drv = np.concatenate([np.arange(offsets[i] + 1, offsets[i + 1]) for i in range(len(clips))])
    res = runner.reenact(Rows(frames, sources[pair_clip]), z_pose[drv], z_dyn[drv],
                         Rows(frames, drv), desc="self-reenactment", progress=settings.progress)
    self_id = _cosine(res["embedding"], source_emb[pair_clip])
    # An exact reconstruction has infinite PSNR: capped at 100 dB in the mean.
    mean_psnr = lambda key: _finite(np.mean(np.minimum(res[key], 100.0)))  # noqa: E731
    regions = list(losses.FACE_REGIONS)
    self_reenactment = {
        "psnr": mean_psnr("psnr"),
        "ssim": float(np.mean(res["ssim"])),
        # PSNR inside the eye / mouth boxes: where expressions change the face.
        "region_psnr": {r: mean_psnr(f"psnr_{r}") for r in regions},
        # The same for the source frame itself (no motion transferred).
        "copy_source": {"psnr": mean_psnr("copy_psnr"), "ssim": float(np.mean(res["copy_ssim"])),
                        "region_psnr": {r: mean_psnr(f"copy_psnr_{r}") for r in regions}},
        "num_pairs": int(len(drv)),
    }
    timings["self_reenactment"] = time.perf_counter() - t0

    # --- cross-reenactment: clip i's source driven by another identity's driving frames
    t0 = time.perf_counter()
    cross: dict[str, Any] = {"method": runner.id_method, "label": runner.id_label}
    pairs = [(i, offsets[d] + 1 + k) for i, d in enumerate(_driver_clip(clips, i)
                                                          for i in range(len(clips)))
             if d is not None for k in range(len(clips[d].frame_ids) - 1)]
    if not pairs:
        cross["skipped"] = "every evaluated clip shows the same identity"
    else:
        src_clip, rows = (np.array(v) for v in zip(*pairs))
        res = runner.reenact(Rows(frames, sources[src_clip]), z_pose[rows], z_dyn[rows],
                             desc="cross-reenactment", progress=settings.progress)
        driver_emb = runner.embed(Rows(frames, rows))
        cross.update({
            "identity_similarity": float(np.mean(_cosine(res["embedding"],
                                                         source_emb[src_clip]))),
            "self_identity_similarity": float(np.mean(self_id)),
            "driver_identity_similarity": float(np.mean(_cosine(driver_emb,
                                                                source_emb[src_clip]))),
            "num_pairs": int(len(rows)),
        })
    timings["cross_reenactment"] = time.perf_counter() - t0

    # --- expression transfer: the meter on the cross-reenactment pairs
    expr = None
    if meter is not None:
        t0 = time.perf_counter()
        expr = {"meter": os.path.abspath(settings.expression_meter),
                "label": "Pearson r of the meter's readings vs the driver's labels"}
        if not pairs:
            expr["skipped"] = cross["skipped"]
        else:
            expr.update(expression_transfer(runner, clips, frames, sources, z_pose, z_dyn,
                                            src_clip, rows, res["expression"],
                                            settings.progress))
        timings["expression_transfer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    probe_results = run_probes(probe_clips, probe_latents, train_clips, train_latents,
                               settings.kfold)
    timings["probes"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    out_dir = out_dir or os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{NAME}_{settings.split}_step{restored.step:08d}")
    grid = figure(runner, clips, frames, offsets, z_pose, z_dyn, settings.figure_columns)
    Image.fromarray(grid).save(stem + ".png")
    timings["figure"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    result = {
        "evaluator": NAME,
        "workdir": os.path.abspath(workdir),
        "step": restored.step,
        "weights": restored.weights,
        "data": os.path.abspath(data),
        "split": settings.split,
        "image_size": size,
        "num_clips": len(clips),
        "num_identities": len({c.identity for c in clips}),
        "skipped_records": int(skipped),
        "num_probe_train_clips": 0 if train_clips is None else len(train_clips),
        "batch_size": runner.batch_size,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "progress"},
        "self_reenactment": self_reenactment,
        "cross_reenactment": cross,
        **({} if expr is None else {"expr_transfer": expr}),
        "probes": probe_results,
        "figure": stem + ".png",
        "json": stem + ".json",
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    return result


def figure(runner: BatchRunner, clips: Sequence[ClipFrames], frames: np.ndarray,
           offsets: np.ndarray, z_pose: np.ndarray, z_dyn: np.ndarray,
           columns: int) -> np.ndarray:
    """The transfer grid, rows FIGURE_ROWS, one column per clip (the first `columns`).

    Column c's driving frame is the middle driving frame of c's driver clip (another
    identity when there is one, else the next clip). Returns uint8
    [5 (S + 2) + 2, label width + n (S + 2) + 2, 3] (`trainers.logger.image_grid`).
    """
    from vasa_jax.trainers.logger import image_grid

    cols = np.arange(min(columns, len(clips)))
    src = offsets[cols]
    drv = []
    for c in cols:
        d = _driver_clip(clips, c)
        d = (c + 1) % len(clips) if d is None else d
        drv.append(offsets[d] + 1 + (offsets[d + 1] - offsets[d] - 1) // 2)
    drv = np.asarray(drv)
    n = len(cols)
    # One call for the three generated rows: pose only, dynamics only, full transfer.
    poses = np.concatenate([z_pose[drv], z_pose[src], z_pose[drv]])
    dyns = np.concatenate([z_dyn[src], z_dyn[drv], z_dyn[drv]])
    out = runner.reenact(Rows(frames, np.tile(src, 3)), poses, dyns, return_images=True,
                         progress=False)["images"]
    rows = dict(zip(FIGURE_ROWS, [runner.images(frames[src]), runner.images(frames[drv]),
                                  out[:n], out[n:2 * n], out[2 * n:]]))
    return image_grid(rows)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument("--workdir", required=True, help="stage-1 run folder (checkpoints/)")
    parser.add_argument("--data", required=True, help="clip-record dataset folder")
    parser.add_argument("--split", default=d.split, choices=schema.SPLITS,
                        help="clips to evaluate on (default: the held-out test split)")
    parser.add_argument("--max_clips", type=int, default=None,
                        help="evaluate on at most this many clips, spread over the split")
    parser.add_argument("--out", default=None, help="output folder (default WORKDIR/eval)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--frames_per_clip", type=int, default=d.frames_per_clip,
                        help="driving frames per clip")
    parser.add_argument("--probe_clips", type=int, default=d.probe_clips,
                        help="train-split clips used to fit the linear probes")
    parser.add_argument("--probe_frames_per_clip", type=int, default=d.probe_frames_per_clip,
                        help="frames per train-split clip that fit the probes")
    parser.add_argument("--probe_eval_frames_per_clip", type=int,
                        default=d.probe_eval_frames_per_clip,
                        help="frames per evaluated clip the probes are scored on")
    parser.add_argument("--kfold", type=int, default=d.kfold,
                        help="folds when probes are cross-validated (no train split)")
    parser.add_argument("--figure_columns", type=int, default=d.figure_columns)
    parser.add_argument("--batch_size", type=int, default=d.batch_size)
    parser.add_argument("--face_id", default=None,
                        help="face-ID export for identity similarity (default: the run's "
                             "loss.face_id_path; '' forces the z_id fallback)")
    parser.add_argument("--expression_meter", default=None,
                        help="expression-meter run (python train.py --config "
                             "configs/expression_meter.py ...): adds expression "
                             "transfer (Pearson r of mouth, blink, gaze readings vs the "
                             "driver's labels)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--fast_cpu_compile", action="store_true",
                        help="XLA:CPU at -O0: ~3x faster compiles, slower batches (CPU smoke "
                             "runs)")


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The human-readable report; the last line is `psnr: X`."""
    fmt = lambda v, spec=".3f": "n/a" if v is None else format(v, spec)  # noqa: E731
    sr, cr, pr = result["self_reenactment"], result["cross_reenactment"], result["probes"]
    cp = sr["copy_source"]
    lines = [
        f"{NAME} eval: step {result['step']} ({result['weights']} weights), "
        f"{result['num_clips']} {result['split']} clips of {result['num_identities']} "
        f"identities, {result['image_size']}px",
        f"self-reenactment: PSNR {fmt(sr['psnr'], '.2f')} dB, SSIM {sr['ssim']:.4f} "
        f"({sr['num_pairs']} pairs); copying the source frame: PSNR "
        f"{fmt(cp['psnr'], '.2f')} dB, SSIM {cp['ssim']:.4f}",
        "self-reenactment PSNR in the face boxes (copying the source): " + ", ".join(
            f"{r} {fmt(v, '.2f')} ({fmt(cp['region_psnr'][r], '.2f')}) dB"
            for r, v in sr["region_psnr"].items()),
    ]
    if "skipped" in cr:
        lines.append(f"cross-reenactment identity similarity: skipped ({cr['skipped']})")
    else:
        lines.append(
            f"cross-reenactment identity similarity: {cr['identity_similarity']:.4f} "
            f"(self-reenactment {cr['self_identity_similarity']:.4f}, other-identity driver "
            f"{cr['driver_identity_similarity']:.4f}; {cr['num_pairs']} pairs) [{cr['label']}]")
    if "expr_transfer" in result:
        ex = result["expr_transfer"]
        if "num_pairs" not in ex:
            lines.append(f"expression transfer: skipped ({ex['skipped']})")
        else:
            per = "; ".join(
                f"{short} r {fmt(ex.get(f'{short}_r'))} (" + ", ".join(
                    f"{what} {fmt(ex.get(f'{short}_r{suffix}'))}"
                    for suffix, what in EXPRESSION_VARIANTS[1:]) + ")"
                for short, _ in EXPRESSION_LABELS if f"{short}_r" in ex)
            lines.append(f"expression transfer ({ex['num_pairs']} other-identity pairs, meter "
                         f"{ex['meter']}): {per or 'no labels'}")
            if ex.get("skipped"):
                lines.append(f"expression transfer skipped labels: {ex['skipped']}")
    lines.append(f"probes: {pr['protocol']}")
    notes = {"pose_from_z_dyn": " (disentanglement: should be LOW)"}
    for name, *_ in PROBES:
        if name in pr:
            r = pr[name]
            per = ", ".join(f"{k} {fmt(v)}" for k, v in r["r2"].items())
            detail = f" ({per})" if len(r["r2"]) > 1 else ""
            if any(v is None for v in r["r2"].values()):
                detail += " [n/a: the held-out target is constant]"
            lines.append(f"probe {name}: R^2 {fmt(r['r2_mean'])}{detail}{notes.get(name, '')}")
        else:
            lines.append(f"probe {name}: skipped ({pr['skipped'][name]})")
    if "emotion_from_z_dyn" in pr:
        r = pr["emotion_from_z_dyn"]
        lines.append(f"probe emotion_from_z_dyn: accuracy {r['accuracy']:.3f} "
                     f"(majority class {r['chance']:.3f})")
    else:
        lines.append(f"probe emotion_from_z_dyn: skipped ({pr['skipped']['emotion_from_z_dyn']})")
    lines += [f"figure: {result['figure']}", f"json: {result['json']}",
              f"psnr: {fmt(sr['psnr'], '.2f')}"]
    return lines


def run(args: argparse.Namespace) -> int:
    if args.out:
        cli.check_output(args.out, "--out folder")  # before the (slow) restore
    settings = Settings(
        split=args.split, max_clips=args.max_clips, frames_per_clip=args.frames_per_clip,
        probe_clips=args.probe_clips, probe_frames_per_clip=args.probe_frames_per_clip,
        probe_eval_frames_per_clip=args.probe_eval_frames_per_clip, kfold=args.kfold, figure_columns=args.figure_columns, batch_size=args.batch_size,
        face_id=args.face_id, expression_meter=args.expression_meter, step=args.step,
        progress=not args.no_progress,
        fast_cpu_compile=args.fast_cpu_compile,
    )
    result = evaluate(args.workdir, args.data, settings, args.out)
    print("\n".join(summary_lines(result)), flush=True)
    return 0
