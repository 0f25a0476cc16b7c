"""Stage-1 latent extraction: a clip-record dataset -> the same clips with stage-2 inputs.

    python -m data_pipeline.extract_latents --face_workdir W1 --data D --out D2
        [--audio mel|wav2vec2 --wav2vec2_path P] [--step S] [--batch_size 64]
        [--clips_per_shard 128] [--overwrite] [--no_progress]

Restores the stage-1 generator of run W1 (`vasa_jax.inference.restore_face`: the EMA
weights of the latest or --step checkpoint, placed on all local devices) and, for every clip
of both splits of D, writes to D2 the same clip record (frames, audio, labels, ids, attrs
unchanged: the labels hold the stage-2 controls gaze, distance and emotion) with two
per-frame features added:

  features["motion"] float32 [T, 7 + dyn_dim]: [z_pose, z_dyn] of every frame
      (`FaceLatentModel.encode_motion`, frames resized to the model's image size with
      `transforms.resize_square` as the stage-1 loader does; dimension names in
      dataset.json extra.extract_latents.motion_dim_names);
  features["audio"] float32 [T, Da]: audio features aligned to the frames: `--audio mel`
      = `vasa_jax.audio.log_mel_frames` of the clip audio (what the stage-2 loader computes
      with audio_source="mel"), `--audio wav2vec2` = `Wav2Vec2Features(--wav2vec2_path)`.

The stage-2 loader reads D2 with motion_source="features:motion",
audio_source="features:audio". Frames are kept: the record format requires them and the
stage-2 evaluation decodes from them.

Motion encoding is one jitted function (compiled once: every call sees exactly
`batch_size` frames, rounded up to a multiple of the mesh's batch-axis devices, the last
batch of each output shard padded), data-parallel over the mesh's batch axes. Records are
read, JPEG-decoded, resized and (mel) audio-featurised by `--read_threads` threads ahead of
the device. It runs in one process, on all its devices.

Output layout (D2):

  {split}-{k:05d}-of-{n:05d}.array_record + .index.json   output shard k of a split holds
      records [k N, (k + 1) N) of the input split (N = --clips_per_shard; input shards
      concatenated in order), minus unusable ones
  dataset.json   D's DatasetInfo: features += {"motion": [Dm], "audio": [Da]}, clips =
      the written counts, extra["extract_latents"] = provenance (workdir, step, audio
      frontend, motion_dim_names, skipped records); written last: its presence means done
  stats.json     normalisation statistics over the TRAIN split's frames (all of them):
      {"features:motion": {"mean": [Dm], "std": [Dm], "count": frames},
       "features:audio": {...}, "labels": {...}, "label:gaze": {...},
       "label:distance": {...}}
      (std: population std; "labels" = the 13-d ground-truth motion
      `transforms.motion_from_labels`, "label:gaze" [2] / "label:distance" [1] = the
      per-frame control labels (`data_pipeline.stats` normalises the stage-2 conditions
      with them); each label's over the train clips that have it, left out if none has).
      Accumulated in float64 (Chan's parallel mean / M2 merge).
  .extract_latents/run.json        the settings the output was made with
  .extract_latents/done/{split}-{k:05d}.json   one per finished shard: counts + partial
      statistics
  .extract_latents/tmp/            shards being written (moved into place when complete)

Resuming: a shard is written under tmp/, renamed into place, then marked done; re-running
the same command skips done shards and redoes the rest from scratch, so an interrupted run
ends with exactly the records and files of an uninterrupted one (a shard's batches depend
only on its own clips). An existing D2 made with other settings (workdir, step, data,
audio frontend, clips_per_shard, the input's record counts) is an error unless
--overwrite, which deletes the previous output's files (only those this tool writes).

Unusable records (undecodable, inconsistent, frames of the wrong size, bad audio) are
skipped, counted and logged (the first few, then every 1000th), like the loaders do.

Exit status: 0 done; 1 with a one-line `error: ...` for a bad input (missing workdir,
checkpoint or dataset, frames smaller than the model's image size, a mismatched D2);
2 for bad flags.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from data_pipeline import schema
from data_pipeline import transforms as T
from vasa_jax import cli

MOTION_FEATURE = "motion"
AUDIO_FEATURE = "audio"
STATS_FILE = "stats.json"
STATE_DIR = ".extract_latents"  # run.json, done/, tmp/
RUN_FILE = "run.json"
OUTPUT_VERSION = 1  # bump when the output of the same settings changes
AUDIO_FRONTENDS = ("mel", "wav2vec2")
# Keys of stats.json, as the stage-2 loader names its sources.
STATS_MOTION = f"features:{MOTION_FEATURE}"
STATS_AUDIO = f"features:{AUDIO_FEATURE}"
STATS_LABELS = "labels"
# Per-frame control labels whose statistics normalise the stage-2 gaze / distance
# conditions (data_pipeline.stats.CONTROL_LABELS): "label:gaze" [2], "label:distance" [1].
CONTROL_LABELS = ("gaze", "distance")
STATS_KEYS = (STATS_MOTION, STATS_AUDIO, STATS_LABELS) + tuple(f"label:{n}" for n in
                                                                CONTROL_LABELS)
LOGGED_SKIPS = 10  # skipped records logged one by one; then every 1000th


def motion_dim_names(dyn_dim: int) -> list[str]:
    """Names of the [z_pose, z_dyn] dimensions: yaw, pitch, roll, tx, ty, tz, scale,
    dyn0, dyn1, ..."""
    from vasa_jax.models.warping import POSE_FIELDS

    return list(POSE_FIELDS) + [f"dyn{i}" for i in range(dyn_dim)]


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `extract` does besides its paths (the CLI flags)."""

    audio: str = "mel"  # AUDIO_FRONTENDS
    n_mels: int = 80  # mel: bands per 10 ms column (features are 4 * n_mels wide)
    wav2vec2_path: str = ""  # wav2vec2: local Hugging Face folder
    wav2vec2_layer: int = -1  # wav2vec2: hidden-state layer, -1 = last
    step: int | None = None  # stage-1 checkpoint step (None: latest)
    batch_size: int = 64  # frames per device call, rounded up to the batch-axis devices
    clips_per_shard: int = 128  # input records per output shard (the unit of resuming)
    read_threads: int = 4  # threads reading + decoding records ahead of the device
    overwrite: bool = False  # replace an existing output made with other settings
    progress: bool = True  # tqdm bar (only on a terminal)
    # XLA:CPU at -O0 (vasa_jax.trainers.loop.FAST_CPU_COMPILE): faster compiles, slower
    # batches. For smoke tests on CPU.
    fast_cpu_compile: bool = False

    def __post_init__(self):
        if self.audio not in AUDIO_FRONTENDS:
            raise ValueError(f"audio must be one of {AUDIO_FRONTENDS}, got {self.audio!r}")
        if self.audio == "wav2vec2" and not self.wav2vec2_path:
            raise ValueError("--audio wav2vec2 needs --wav2vec2_path (a local Hugging Face "
                             "Wav2Vec2 folder)")
        for name in ("n_mels", "batch_size", "clips_per_shard", "read_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.step is not None and self.step < 0:
            raise ValueError(f"step must be >= 0, got {self.step}")


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class RunningStats:
    """Streaming per-dimension mean and variance in float64 (Chan et al.'s pairwise merge,
    exact up to rounding and independent of how the rows were grouped)."""

    count: int = 0
    mean: np.ndarray | None = None  # float64 [D]
    m2: np.ndarray | None = None  # float64 [D]: sum of squared deviations from the mean

    def add(self, x: np.ndarray) -> None:
        """x: [N, D] rows."""
        x = np.asarray(x, np.float64)
        if len(x):
            x = x.reshape(len(x), -1)
            mean = x.mean(0)
            self.merge(RunningStats(len(x), mean, np.square(x - mean).sum(0)))

    def merge(self, other: "RunningStats") -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
            return
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"statistics of {other.mean.shape[0]}-d rows merged into "
                             f"{self.mean.shape[0]}-d ones")
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + np.square(delta) * (self.count * other.count / n)
        self.count = n

    def result(self) -> dict[str, Any]:
        """{"mean": [D], "std": [D] (population), "count": rows}: the stats.json entry."""
        if self.count == 0:
            raise ValueError("no rows accumulated")
        return {"mean": self.mean.tolist(),
                "std": np.sqrt(np.maximum(self.m2, 0.0) / self.count).tolist(),
                "count": int(self.count)}

    def to_json(self) -> dict[str, Any] | None:
        if self.count == 0:
            return None
        return {"count": int(self.count), "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "RunningStats":
        if d is None:
            return cls()
        # JSON floats round-trip float64 exactly (repr), so resumed merges are bitwise equal.
        return cls(int(d["count"]), np.asarray(d["mean"], np.float64),
                   np.asarray(d["m2"], np.float64))


# ----------------------------------------------------------------------------- motion


def _encode(graphdef, state, frames: jax.Array) -> jax.Array:
    """uint8 frames [B, S, S, 3] -> float32 [B, 7 + dyn_dim] = [z_pose, z_dyn].

    The uint8 -> [-1, 1] conversion (`transforms.to_signed_float`) runs on the device.
    """
    images = T.to_signed_float(frames)
    z_pose, z_dyn = nnx.merge(graphdef, state).encode_motion(images)
    return jnp.concatenate([z_pose, z_dyn], axis=-1).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _jitted_encode(compiler_options: tuple[tuple[str, Any], ...] = ()) -> Callable:
    """`_encode` jitted (graphdef static), once per set of XLA compiler options: encoders
    of the same architecture share the compiled executable."""
    return jax.jit(_encode, static_argnums=0, compiler_options=dict(compiler_options) or None)


class MotionEncoder:
    """A stage-1 model's `encode_motion`, jitted, in fixed-size batches sharded over the
    mesh's batch axes (`sharding.BatchMapper`; the weights stay where `restore` placed them).

    `encoder(frames uint8 [N, S, S, 3])` -> float32 [N, dim] = [z_pose, z_dyn].
    """

    def __init__(self, model, mesh: jax.sharding.Mesh, rules, batch_size: int,
                 compiler_options: dict[str, Any] | None = None):
        from vasa_jax.parallel import sharding

        self.mapper = sharding.BatchMapper(mesh, rules, batch_size)
        self.batch_size, self.mesh = self.mapper.batch_size, mesh
        self.image_size = int(model.image_size)
        self.graphdef, self.state = nnx.split(model)
        self._fn = _jitted_encode(tuple(sorted((compiler_options or {}).items())))
        spec = jax.ShapeDtypeStruct((self.batch_size, self.image_size, self.image_size, 3),
                                    jnp.uint8)
        out = jax.eval_shape(functools.partial(_encode, self.graphdef), self.state, spec)
        self.dim = int(out.shape[-1])

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        s = self.image_size
        if frames.dtype != np.uint8 or frames.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 frames [N, {s}, {s}, 3], got {frames.dtype} "
                             f"{frames.shape}")
        if not len(frames):
            return np.zeros((0, self.dim), np.float32)
        return self.mapper.map(lambda x: self._fn(self.graphdef, self.state, x), [frames])


class _RowStream:
    """Frames of consecutive clips -> each clip's motion rows, encoded in full batches.

    add(item, frames) queues a clip and returns the (item, motion [T, D]) pairs that are
    complete, in order; finish() encodes the rest (one padded batch) and returns the
    remaining pairs. Batches span clip boundaries, so short clips waste no padding.
    """

    def __init__(self, encoder: MotionEncoder):
        self._encoder = encoder
        self._frames: list[np.ndarray] = []
        self._num_frames = 0
        self._waiting: collections.deque = collections.deque()  # (item, T)
        self._rows: list[np.ndarray] = []
        self._num_rows = 0

    def add(self, item: Any, frames: np.ndarray) -> list[tuple[Any, np.ndarray]]:
        self._waiting.append((item, len(frames)))
        self._frames.append(frames)
        self._num_frames += len(frames)
        full = self._num_frames // self._encoder.batch_size * self._encoder.batch_size
        if full:
            self._encode(full)
        return self._ready()

    def finish(self) -> list[tuple[Any, np.ndarray]]:
        if self._num_frames:
            self._encode(self._num_frames)
        ready = self._ready()
        assert not self._waiting and not self._num_rows, "rows left after finish()"
        return ready

    def _encode(self, n: int) -> None:
        frames = np.concatenate(self._frames) if len(self._frames) > 1 else self._frames[0]
        self._rows.append(self._encoder(frames[:n]))
        self._num_rows += n
        rest = frames[n:]
        self._frames = [rest] if len(rest) else []
        self._num_frames = len(rest)

    def _ready(self) -> list[tuple[Any, np.ndarray]]:
        out = []
        while self._waiting and self._waiting[0][1] <= self._num_rows:
            item, t = self._waiting.popleft()
            rows = np.concatenate(self._rows) if len(self._rows) > 1 else self._rows[0]
            out.append((item, rows[:t]))
            self._rows = [rows[t:]] if len(rows) > t else []
            self._num_rows = len(rows) - t
        return out


# ----------------------------------------------------------------------------- audio


class AudioFeatures:
    """The chosen audio frontend: clip -> float32 [T, dim] aligned to its frames.

    `threadsafe`: mel is host numpy (run in the reader threads); wav2vec2 is a jitted
    model (run in the main thread, so each clip length compiles once).
    """

    def __init__(self, settings: Settings, fps: float):
        from vasa_jax import audio

        self.frontend = settings.audio
        self._n_mels = settings.n_mels
        self._fps = float(fps)
        if self.frontend == "mel":
            self.dim = audio.feature_dim_mel(settings.n_mels)
            self.threadsafe = True
            self.settings: dict[str, Any] = {"frontend": "mel", "n_mels": settings.n_mels}
        else:
            self._w2v = audio.Wav2Vec2Features(settings.wav2vec2_path, settings.wav2vec2_layer,
                                               fps=fps)
            self.dim = self._w2v.dim
            self.threadsafe = False
            self.settings = {"frontend": "wav2vec2",
                             "wav2vec2_path": os.path.abspath(settings.wav2vec2_path),
                             "wav2vec2_layer": self._w2v.layer}

    def __call__(self, clip: schema.Clip) -> np.ndarray:
        from vasa_jax.audio import AudioError, log_mel_frames, resample

        t = clip.num_frames
        try:
            if self.frontend == "mel":
                feats = log_mel_frames(clip.audio, clip.sample_rate, clip.fps, self._n_mels,
                                       num_frames=t)
            else:
                if abs(clip.fps - self._fps) > 1e-6:
                    raise schema.CorruptRecordError(
                        f"{clip.clip_id}: {clip.fps} fps, the dataset's is {self._fps}")
                x = resample(clip.audio, clip.sample_rate, self._w2v.sample_rate)
                feats = self._w2v(x, num_frames=t)
        except AudioError as e:
            raise schema.CorruptRecordError(f"{clip.clip_id}: audio: {e}") from e
        feats = np.asarray(feats, np.float32)
        if feats.shape != (t, self.dim):
            raise RuntimeError(f"{self.frontend} gave {feats.shape} for {t} frames")
        return feats


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass
class _Loaded:
    clip: schema.Clip
    frames: np.ndarray  # uint8 [T, S, S, 3]
    audio: np.ndarray | None  # [T, Da], None until computed (wav2vec2: main thread)


def _load(data: bytes, image_size: int, audio: AudioFeatures) -> _Loaded:
    """Record bytes -> decoded clip, resized frames (and mel features). Raises
    CorruptRecordError for anything unusable."""
    clip = schema.decode_clip(data)
    frames = clip.decode_frames()
    if frames.shape[1:3] != (clip.height, clip.width):
        raise schema.CorruptRecordError(
            f"{clip.clip_id}: frames decode to {frames.shape[2]}x{frames.shape[1]}, the record "
            f"says {clip.width}x{clip.height}")
    if min(frames.shape[1:3]) < image_size:
        raise schema.CorruptRecordError(
            f"{clip.clip_id}: {frames.shape[2]}x{frames.shape[1]} frames are smaller than the "
            f"stage-1 model's {image_size}px")
    if frames.shape[1:3] != (image_size, image_size):
        frames = np.stack([T.resize_square(f, image_size) for f in frames])
    return _Loaded(clip, frames, audio(clip) if audio.threadsafe else None)


def _prefetch(fn: Callable[[int], Any], ids: Sequence[int],
              pool: concurrent.futures.ThreadPoolExecutor, depth: int
              ) -> Iterator[tuple[int, concurrent.futures.Future]]:
    """(id, future of fn(id)) in order, with at most `depth` submitted ahead."""
    queue: collections.deque = collections.deque()
    it = iter(ids)
    for i in it:
        queue.append((i, pool.submit(fn, i)))
        if len(queue) >= depth:
            break
    while queue:
        yield queue.popleft()
        nxt = next(it, None)
        if nxt is not None:
            queue.append((nxt, pool.submit(fn, nxt)))


# ----------------------------------------------------------------------------- output files


def _output_files(out: str) -> list[str]:
    """The files of `out` this tool writes (what --overwrite deletes), but the state folder."""
    return schema.dataset_files(out, extra=(STATS_FILE,))


def _clear(out: str) -> None:
    for path in _output_files(out):
        os.remove(path)
    shutil.rmtree(os.path.join(out, STATE_DIR), ignore_errors=True)


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _prepare_output(out: str, run: dict[str, Any], overwrite: bool) -> str:
    """Checks `out` against `run` (the settings), clears it if asked; returns the state
    folder (with a clean tmp/)."""
    state_dir = os.path.join(out, STATE_DIR)
    run_path = os.path.join(state_dir, RUN_FILE)
    if os.path.exists(run_path):
        with open(run_path) as f:
            old = json.load(f)
        diffs = _differences(old, run)
        if diffs and not overwrite:
            raise ValueError(
                f"{out!r} holds an extraction made with other settings ({'; '.join(diffs)}); "
                "pass --overwrite to replace it, or choose another --out")
        if overwrite:
            logging.warning("--overwrite: deleting the previous extraction in %s", out)
            _clear(out)
    elif _output_files(out):
        if not overwrite:
            raise ValueError(
                f"{out!r} already holds a dataset that extract_latents did not make (no "
                f"{STATE_DIR}/{RUN_FILE}); pass --overwrite to replace it, or choose another "
                "--out")
        logging.warning("--overwrite: deleting the dataset files in %s", out)
        _clear(out)
    os.makedirs(os.path.join(state_dir, "done"), exist_ok=True)
    shutil.rmtree(os.path.join(state_dir, "tmp"), ignore_errors=True)  # a killed run's
    os.makedirs(os.path.join(state_dir, "tmp"))
    schema.write_json_atomic(run_path, run)
    return state_dir


# ----------------------------------------------------------------------------- extraction


@dataclasses.dataclass
class _ShardResult:
    """What one output shard holds (its done/ file)."""

    clips: int = 0
    frames: int = 0
    skipped: int = 0
    # STATS_KEYS -> partial statistics of the written clips' frames (a label's over the
    # clips that have it).
    stats: dict[str, RunningStats] = dataclasses.field(
        default_factory=lambda: {k: RunningStats() for k in STATS_KEYS})
    seconds: float = 0.0  # not part of the output's identity: kept out of to_json

    def to_json(self) -> dict[str, Any]:
        return {"clips": self.clips, "frames": self.frames, "skipped": self.skipped,
                "stats": {k: v.to_json() for k, v in self.stats.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "_ShardResult":
        stats = {k: RunningStats.from_json(d["stats"].get(k)) for k in STATS_KEYS}
        return cls(d["clips"], d["frames"], d["skipped"], stats)


class _Skips:
    """Counts unusable records and logs the first few, then every 1000th."""

    def __init__(self):
        self.count = 0

    def __call__(self, where: str, error: Exception) -> None:
        self.count += 1
        if self.count <= LOGGED_SKIPS or self.count % 1000 == 0:
            logging.warning("skipping unusable record %s (%d so far): %s", where, self.count,
                            error)


def _write_shard(split: str, record_ids: range, source, final_path: str, tmp_dir: str,
                 encoder: MotionEncoder, audio: AudioFeatures,
                 pool: concurrent.futures.ThreadPoolExecutor, depth: int, skips: _Skips,
                 bar) -> _ShardResult:
    """Writes one output shard (records `record_ids` of the split) to tmp_dir, then moves
    it and its sidecar to final_path."""
    result = _ShardResult()
    start = time.perf_counter()
    label_set = set(T.MOTION_LABELS)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    stream = _RowStream(encoder)

    def read(rid: int) -> _Loaded:
        return _load(source[rid], encoder.image_size, audio)

    def write(writer: schema.ShardWriter, loaded: _Loaded, motion: np.ndarray) -> None:
        clip = loaded.clip
        if not np.all(np.isfinite(motion)):
            raise ValueError(f"the stage-1 model gave non-finite latents for clip "
                             f"{clip.clip_id!r}: its checkpoint is broken (diverged run?)")
        clip.features = {**clip.features, MOTION_FEATURE: motion, AUDIO_FEATURE: loaded.audio}
        writer.write(schema.encode_clip(clip))
        result.clips += 1
        result.frames += clip.num_frames
        result.stats[STATS_MOTION].add(motion)
        result.stats[STATS_AUDIO].add(loaded.audio)
        if label_set <= clip.labels.keys():
            result.stats[STATS_LABELS].add(T.motion_from_labels(clip.labels))
        for name in CONTROL_LABELS:
            if name in clip.labels:
                result.stats[f"label:{name}"].add(clip.labels[name])

    with schema.ShardWriter(tmp_dir, split, 1) as writer:
        for rid, future in _prefetch(read, record_ids, pool, depth):
            try:
                loaded = future.result()
                if loaded.audio is None:
                    loaded.audio = audio(loaded.clip)
            except schema.CorruptRecordError as e:
                result.skipped += 1
                skips(f"{split}/{rid}", e)
                bar.update(1)
                continue
            for item, motion in stream.add(loaded, loaded.frames):
                write(writer, item, motion)
            loaded.frames = None  # only the encoder's buffer keeps frames alive
            bar.update(1)
        for item, motion in stream.finish():
            write(writer, item, motion)
    tmp_path = writer.paths[0]
    os.replace(schema.shard_index_path(tmp_path), schema.shard_index_path(final_path))
    os.replace(tmp_path, final_path)
    result.seconds = time.perf_counter() - start
    return result


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="clip", file=sys.stderr,
                dynamic_ncols=True, disable=not (enabled and sys.stderr.isatty()))


def extract(face_workdir: str, data: str, out: str, settings: Settings = Settings(), *,
            restored=None,
            on_shard_done: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Runs the extraction (module docstring); returns a summary dict.

    restored: the `vasa_jax.inference.restore_face(face_workdir, settings.step)` result, if
    the caller already has it.
    on_shard_done(split, k) is called after output shard k of `split` is complete and
    marked done (tests interrupt a run by raising from it).
    Raises FileNotFoundError (no dataset / workdir / checkpoint) or ValueError (bad
    dataset, frames smaller than the model, an output made with other settings).
    """
    from data_pipeline.loaders import load_clip_index
    from vasa_jax.inference import restore_face
    from vasa_jax.trainers.loop import FAST_CPU_COMPILE

    start = time.perf_counter()
    if jax.process_count() > 1:
        raise ValueError("extract_latents runs in one process (on all its devices); got "
                         f"{jax.process_count()} processes")
    if not os.path.isdir(data):
        raise FileNotFoundError(f"dataset folder {data!r} does not exist")
    info = schema.DatasetInfo.load(data)  # a clear error if it is not a clip-record dataset
    if os.path.realpath(out) == os.path.realpath(data):
        raise ValueError(f"--out must differ from --data ({data!r})")
    indices = {}
    for split in schema.SPLITS:
        try:
            indices[split] = load_clip_index(data, split)
        except FileNotFoundError:
            logging.info("%s has no %s split", data, split)
    if not indices:
        raise FileNotFoundError(f"{data!r} has no shards of any split {schema.SPLITS}")

    audio = AudioFeatures(settings, info.fps)  # before the slow restore: fails fast
    if restored is None:
        restored = restore_face(face_workdir, settings.step)
    elif settings.step is not None and settings.step != restored.step:
        raise ValueError(f"settings.step {settings.step} != the restored step {restored.step}")
    encoder = MotionEncoder(restored.model, restored.mesh, restored.config.mesh.rules,
                            settings.batch_size,
                            FAST_CPU_COMPILE if settings.fast_cpu_compile else None)
    size = encoder.image_size
    if min(info.height, info.width) < size:
        raise ValueError(
            f"{data!r} has {info.width}x{info.height} frames, smaller than the stage-1 "
            f"model's {size}x{size} (config model.image_size): extract from a dataset at "
            f"least that size (larger frames are resized like the stage-1 loader does)")
    if (info.height, info.width) != (size, size):
        logging.info("resizing %dx%d frames to the model's %dpx", info.width, info.height, size)

    dim_names = motion_dim_names(encoder.dim - 7)
    run = {
        "version": OUTPUT_VERSION,
        "face_workdir": os.path.abspath(face_workdir),
        "step": restored.step,
        "weights": restored.weights,
        "data": os.path.abspath(data),
        "records": {split: len(index) for split, index in indices.items()},
        "audio": audio.settings,
        "clips_per_shard": settings.clips_per_shard,
        "image_size": size,
        "motion_dim": encoder.dim,
        "audio_dim": audio.dim,
    }
    run = json.loads(json.dumps(run))  # as it reads back from run.json
    state_dir = _prepare_output(out, run, settings.overwrite)
    tmp_root = os.path.join(state_dir, "tmp")
    logging.info("extracting [z_pose, z_dyn] (%d) + %s audio (%d) of %s into %s; batch %d on "
                 "mesh %s", encoder.dim, audio.frontend, audio.dim, data, out,
                 encoder.batch_size, dict(restored.mesh.shape))

    per_split: dict[str, list[_ShardResult]] = {}
    summary_splits: dict[str, dict[str, int]] = {}
    skips = _Skips()
    n = settings.clips_per_shard
    depth = 2 * settings.read_threads
    with concurrent.futures.ThreadPoolExecutor(settings.read_threads) as pool:
        for split, index in indices.items():
            records = len(index)
            num_shards = max(1, math.ceil(records / n))
            source = schema.read_records(index.paths)
            results: list[_ShardResult] = []
            todo: list[int] = []
            for k in range(num_shards):
                final = os.path.join(out, schema.shard_name(split, k, num_shards))
                done = os.path.join(state_dir, "done", f"{split}-{k:05d}.json")
                if (os.path.exists(done) and os.path.exists(final)
                        and os.path.exists(schema.shard_index_path(final))):
                    with open(done) as f:
                        results.append(_ShardResult.from_json(json.load(f)))
                else:
                    results.append(None)
                    todo.append(k)
            resumed = num_shards - len(todo)
            if resumed:
                logging.info("%s: %d of %d shards already done", split, resumed, num_shards)
            finished = records - sum(min(n, records - k * n) for k in todo)
            with _progress_bar(records, finished, f"{split} clips", settings.progress) as bar:
                for k in todo:
                    ids = range(k * n, min((k + 1) * n, records))
                    final = os.path.join(out, schema.shard_name(split, k, num_shards))
                    res = _write_shard(split, ids, source, final,
                                       os.path.join(tmp_root, f"{split}-{k:05d}"), encoder,
                                       audio, pool, depth, skips, bar)
                    schema.write_json_atomic(os.path.join(state_dir, "done", f"{split}-{k:05d}.json"),
                                res.to_json())
                    results[k] = res
                    logging.info(
                        "%s shard %d/%d: %d clips, %d frames, %d skipped in %.1f s (%.1f "
                        "clips/s, %.0f frames/s)", split, k + 1, num_shards, res.clips,
                        res.frames, res.skipped, res.seconds,
                        res.clips / max(res.seconds, 1e-9), res.frames / max(res.seconds, 1e-9))
                    if on_shard_done is not None:
                        on_shard_done(split, k)
            per_split[split] = results
            summary_splits[split] = {
                "clips": sum(r.clips for r in results),
                "frames": sum(r.frames for r in results),
                "skipped": sum(r.skipped for r in results),
                "shards": num_shards,
                "resumed_shards": resumed,
            }
    shutil.rmtree(tmp_root, ignore_errors=True)

    stats_path = None
    if "train" in per_split:
        stats = _merge_stats(per_split["train"])
        if stats:
            stats_path = os.path.join(out, STATS_FILE)
            schema.write_json_atomic(stats_path, stats)
    else:
        logging.warning("%s has no train split: no %s written", data, STATS_FILE)

    new_info = dataclasses.replace(
        info,
        clips={split: s["clips"] for split, s in summary_splits.items()},
        features={**info.features, MOTION_FEATURE: [encoder.dim], AUDIO_FEATURE: [audio.dim]},
        extra={**info.extra, "extract_latents": {
            "face_workdir": run["face_workdir"],
            "step": restored.step,
            "weights": restored.weights,
            "source_data": run["data"],
            "image_size": size,
            "audio": audio.settings,
            "motion_dim_names": dim_names,
            "skipped_records": {split: s["skipped"] for split, s in summary_splits.items()},
        }},
    )
    new_info.save(tmp_root)  # then renamed: dataset.json appears complete or not at all
    os.replace(os.path.join(tmp_root, schema.DATASET_INFO), os.path.join(out, schema.DATASET_INFO))
    shutil.rmtree(tmp_root, ignore_errors=True)
    return {
        "out": os.path.abspath(out),
        "face_workdir": run["face_workdir"],
        "step": restored.step,
        "weights": restored.weights,
        "motion_dim": encoder.dim,
        "audio_dim": audio.dim,
        "audio": audio.frontend,
        "splits": summary_splits,
        "stats": stats_path,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _merge_stats(results: Sequence[_ShardResult]) -> dict[str, Any]:
    """stats.json contents from the train shards' partial statistics (merged in shard
    order). Labels no written clip has are left out."""
    merged = {k: RunningStats() for k in STATS_KEYS}
    for r in results:
        for k in STATS_KEYS:
            merged[k].merge(r.stats[k])
    if merged[STATS_MOTION].count == 0:
        logging.warning("no usable train clip: no %s written", STATS_FILE)
        return {}
    for k in STATS_KEYS:
        if 0 < merged[k].count < merged[STATS_MOTION].count:
            logging.info("%s statistics over the %d of %d train frames whose clips have it", k,
                         merged[k].count, merged[STATS_MOTION].count)
    return {k: v.result() for k, v in merged.items() if v.count}


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = Settings()
    p = cli.ArgumentParser(
        prog="python -m data_pipeline.extract_latents",
        description="Add stage-1 motion latents [z_pose, z_dyn] and audio features to every "
                    "clip of a clip-record dataset (the stage-2 training data); resumable.")
    p.add_argument("--face_workdir", required=True, help="stage-1 run folder (checkpoints/)")
    p.add_argument("--data", required=True, help="input clip-record dataset folder")
    p.add_argument("--out", required=True, help="output dataset folder (created)")
    p.add_argument("--audio", default=d.audio, choices=AUDIO_FRONTENDS,
                   help="audio features: log-mel (default) or a local Wav2Vec2")
    p.add_argument("--wav2vec2_path", default=d.wav2vec2_path,
                   help="local Hugging Face Wav2Vec2 folder (--audio wav2vec2)")
    p.add_argument("--wav2vec2_layer", type=int, default=d.wav2vec2_layer,
                   help="Wav2Vec2 hidden-state layer (-1: last)")
    p.add_argument("--n_mels", type=int, default=d.n_mels, help="mel bands (--audio mel)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--batch_size", type=int, default=d.batch_size,
                   help="frames per device call (rounded up to the batch-axis devices)")
    p.add_argument("--clips_per_shard", type=int, default=d.clips_per_shard,
                   help="input records per output shard (the unit of resuming)")
    p.add_argument("--read_threads", type=int, default=d.read_threads,
                   help="threads reading and decoding records")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output made with other settings (else that is an error)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--fast_cpu_compile", action="store_true",
                   help="XLA:CPU at -O0: faster compiles, slower batches (CPU smoke runs)")
    return p.parse_args(argv)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = [f"extract_latents: step {summary['step']} ({summary['weights']} weights) of "
             f"{summary['face_workdir']}: motion [{summary['motion_dim']}], "
             f"{summary['audio']} audio [{summary['audio_dim']}]"]
    for split, s in summary["splits"].items():
        lines.append(f"{split}: {s['clips']} clips, {s['frames']} frames, {s['skipped']} "
                     f"skipped, {s['shards']} shards ({s['resumed_shards']} already done)")
    lines.append(f"stats: {summary['stats'] or 'none (no usable train clips)'}")
    lines.append(f"wrote {summary['out']} in {summary['seconds']:.1f} s")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    try:
        settings = Settings(
            audio=args.audio, n_mels=args.n_mels, wav2vec2_path=args.wav2vec2_path,
            wav2vec2_layer=args.wav2vec2_layer, step=args.step, batch_size=args.batch_size,
            clips_per_shard=args.clips_per_shard, read_threads=args.read_threads,
            overwrite=args.overwrite, progress=not args.no_progress,
            fast_cpu_compile=args.fast_cpu_compile)
    except ValueError as e:
        return cli.fail(e, 2)

    def body() -> int:
        cli.check_output(args.out, "--out folder")  # before the (slow) restore
        summary = extract(args.face_workdir, args.data, args.out, settings)
        print("\n".join(summary_lines(summary)), flush=True)
        return 0

    return cli.run_guarded(body)


def _show_info_logs() -> None:
    """INFO logging (the per-shard clips/s lines), minus orbax's ~30 INFO lines per restore."""
    import logging as std_logging

    logging.set_verbosity(logging.INFO)
    std_logging.getLogger("absl").addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "orbax" not in r.pathname)


if __name__ == "__main__":
    _show_info_logs()
    sys.exit(main())
