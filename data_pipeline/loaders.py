"""grain input pipelines for both stages over clip-record datasets (`data_pipeline.schema`).

Both stages build the same pipeline (grain Dataset API)::

    MapDataset.source(ClipRecords)         # (record index, record bytes) of usable clips
      .seed(cfg.seed).shuffle()            # a new order every epoch
      .repeat(num_epochs)                  # None: forever (training)
      .random_map(Stage1Sample | Stage2Window)
      [process_index::process_count]       # this process's share
      .to_iter_dataset(ReadOptions)
      -> _CountSkipped                     # drops unusable records, counts them
      .batch(local batch, drop_remainder=True)
      .mp_prefetch(num_workers)            # when cfg.num_workers > 0

`random_map` comes before the per-process slice on purpose: grain seeds each element's RNG
from its position in the dataset it maps, so mapping the global stream gives every element
of every process its own RNG (mapping after the slice would repeat the same augmentations
on all processes). The map is lazy, so nothing is computed for other processes' elements.

**Clip index.** Cross-identity sampling and the minimum-length filter need each record's
identity and frame count. They come from the `.index.json` sidecars that `ShardWriter`
writes (two ints per clip: ~4 MB of JSON for 500K clips, read once when the dataset is
built). A shard without a valid sidecar is scanned once with `read_record_header` (reads
the whole shard, so it is logged as a warning).

**Damaged shards.** A shard file that cannot be opened (truncated, overwritten) is left out
when the dataset is built, with a warning naming the file and how many records it held
(`ClipIndex.broken`); if no shard of the split is left, that is an error. A record that its
shard cannot deliver (a corrupted chunk) is an unusable record like those below, and its
`Skipped` reason names the file.

**Unusable records** (bad msgpack, undecodable frame, inconsistent lengths, missing labels
the dataset declares, clips shorter than the index said, unreadable bytes) never crash the
pipeline: the map
returns a `Skipped` marker, `_CountSkipped` drops it and adds its count to the next
example's ``num_skipped``. So every batch carries ``num_skipped`` int32 [B]; its sum is the
number of records skipped while that batch was made (log it). More than
`MAX_CONSECUTIVE_SKIPS` unusable records in a row raise an error: the data is broken.
Records skipped after the last example of a finite pass are not reported.
Records the index already knows to be too short (stage 1: < 2 frames; stage 2: < window
frames) are left out when the dataset is built and logged; if none is left, that is an error.

**TFDS.** `stage1_dataset(cfg, source=...)` / `stage2_dataset` also read a TensorFlow
Datasets data source of clip records (`tfds.data_source("synthtalk/tiny", split="train",
data_dir=D)`, any split or slice; the builders and the index they store are in
`data_pipeline.tfds_builders`); cfg.path and cfg.split are then not used. cfg.path may also
name a prepared TFDS dataset folder (D/synthtalk/tiny/1.0.0), read at cfg.split.

**Iterator state.** `it = iter(ds)`; `it.get_state()` / `it.set_state(state)` resume
exactly (also with workers): every step above is deterministic given cfg.seed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping

import grain
import ml_collections
import numpy as np
from absl import logging

from configs.common import validate_data
from data_pipeline import schema
from data_pipeline import transforms as T

MAX_CONSECUTIVE_SKIPS = 1000  # more unusable records than this in a row: stop with an error
MAX_CROSS_TRIES = 8  # cross-identity records tried per stage-1 example before giving up
# Threads per process reading + transforming elements: overlap record reads with JPEG
# decoding (cv2 releases the GIL). More threads mostly add GIL contention; parallelism comes
# from cfg.num_workers processes. The read buffer holds about one batch (bounded memory at
# 512 px).
READ_THREADS = 2
MOTION_LABELS = T.MOTION_LABELS
MOTION_DIM_NAMES = T.MOTION_DIM_NAMES
MOTION_LABEL_DIM = T.MOTION_LABEL_DIM


# ----------------------------------------------------------------------------- clip index


@dataclasses.dataclass(frozen=True)
class ClipIndex:
    """Light per-record metadata of one split, in global record order (shards concatenated).
    `source`: where the records are read instead of `paths` (a TFDS ClipSource), or None.
    `broken`: {path: reason} of the split's shards that could not be opened (left out of
    `paths` and of the record order)."""

    paths: tuple[str, ...]
    identity_id: np.ndarray  # int64 [R]; -1 where the record header is unreadable
    num_frames: np.ndarray  # int64 [R]; 0 where the record header is unreadable
    source: Any = None
    broken: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.identity_id)


def _scan_shard(source: schema.ShardRecords) -> dict[str, np.ndarray]:
    ids, frames = [], []
    for i in range(len(source)):
        try:
            header = schema.read_record_header(source[i])
            ids.append(header["identity_id"])
            frames.append(header["num_frames"])
        except schema.CorruptRecordError:
            ids.append(-1)
            frames.append(0)
    return {"identity_id": np.asarray(ids, np.int64), "num_frames": np.asarray(frames, np.int64)}


def load_clip_index(directory: str, split: str) -> ClipIndex:
    """Reads the split's shard sidecars (scanning shards that have none); damaged shards
    are left out with a warning (`ClipIndex.broken`)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"dataset folder {directory!r} does not exist or is not a folder")
    try:
        paths = schema.list_shards(directory, split)
    except FileNotFoundError:
        found = sorted({os.path.basename(p).split("-")[0] for p in
                        _glob_shards(directory)})
        raise FileNotFoundError(
            f"no {split!r} shards ({split}-*{schema.SHARD_SUFFIX}) in {directory!r}; "
            f"splits present: {found or 'none'}"
        ) from None
    ids, frames, good, broken = [], [], [], {}
    for path in paths:
        index = schema.read_shard_index(path)
        shard = schema.read_records([path])
        if shard.broken:
            broken[path] = shard.broken[path]
            logging.warning("skipping damaged shard %s (%s records left out): %s", path,
                            "?" if index is None else len(index["identity_id"]), broken[path])
            continue
        count = len(shard)
        if index is None or len(index["identity_id"]) != count:
            logging.warning(
                "%s: no valid %s sidecar; scanning its %d records (slow for big shards; "
                "shards written by schema.ShardWriter have one)", path, schema.INDEX_SUFFIX, count,
            )
            index = _scan_shard(shard)
        good.append(path)
        ids.append(index["identity_id"])
        frames.append(index["num_frames"])
    if not good:
        raise ValueError(f"every {split!r} shard of {directory!r} is damaged (first: "
                         f"{paths[0]}: {broken[paths[0]]}); run `python -m data_pipeline.inspect "
                         f"{directory} --check`")
    return ClipIndex(tuple(good), np.concatenate(ids), np.concatenate(frames), broken=broken)


def _glob_shards(directory: str) -> list[str]:
    return [p for p in os.listdir(directory) if p.endswith(schema.SHARD_SUFFIX)]


class ClipRecords:
    """Random-access source of (record index, record bytes) over a subset of records.

    A grain data source (len + getitem, picklable to workers). `read` gives any record of
    the split by its global index (stage 1 reads cross-identity clips with it). Records come
    from the shard files `paths`, or from `source` (len + getitem -> record bytes).
    A record that cannot be read comes as its CorruptRecordError instead of bytes (the map
    skips it: `_decode`); `read` raises it.
    """

    def __init__(self, paths: tuple[str, ...], record_ids: np.ndarray, source: Any = None):
        self._source = schema.read_records(paths) if source is None else source
        self._ids = np.asarray(record_ids, np.int64)

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> tuple[int, bytes | schema.CorruptRecordError]:
        rid = int(self._ids[i])
        try:
            return rid, self._source[rid]
        except schema.CorruptRecordError as e:  # a damaged shard: the map skips and counts it
            return rid, e

    def read(self, record_id: int) -> bytes:
        return self._source[int(record_id)]

    def __repr__(self) -> str:
        return f"ClipRecords({len(self)} records)"


# ----------------------------------------------------------------------------- skipping


@dataclasses.dataclass
class Skipped:
    """What a transform returns instead of an example when its record is unusable."""

    reason: str
    count: int = 1  # unusable records behind this marker


class _CountSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive: int):
        super().__init__(parent)
        self._max_consecutive = max_consecutive
        self._logged = 0

    def __next__(self) -> dict:
        skipped, in_a_row = 0, 0
        while True:
            element = next(self._parent)
            if not isinstance(element, Skipped):
                return {**element, "num_skipped": np.int32(element["num_skipped"] + skipped)}
            skipped += element.count
            in_a_row += 1
            self._logged += 1
            if self._logged <= 10 or self._logged % 1000 == 0:
                logging.warning("skipping unusable record (%d so far here): %s",
                                self._logged, element.reason)
            if in_a_row > self._max_consecutive:
                raise RuntimeError(
                    f"{in_a_row} unusable records in a row (last: {element.reason}); the "
                    "dataset looks broken: run `python -m data_pipeline.inspect DIR --check`"
                )

    # Skipped markers are consumed within one __next__, so no count is pending between
    # calls and the parent's state is the whole state.
    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class _CountSkipped(grain.IterDataset):
    """Drops `Skipped` markers and adds their counts to the next example's num_skipped."""

    def __init__(self, parent: grain.IterDataset, max_consecutive: int):
        super().__init__(parent)
        self._max_consecutive = max_consecutive

    def __iter__(self) -> _CountSkippedIterator:
        return _CountSkippedIterator(self._parent.__iter__(), self._max_consecutive)


# ----------------------------------------------------------------------------- helpers


def _decode(data: bytes | schema.CorruptRecordError) -> schema.Clip:
    """`schema.decode_clip`, or the read error `ClipRecords` passed on, raised."""
    if isinstance(data, schema.CorruptRecordError):
        raise data
    return schema.decode_clip(data)


def _check_labels(clip: schema.Clip, names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in clip.labels]
    if missing:
        raise schema.CorruptRecordError(
            f"{clip.clip_id}: lacks labels {missing} that dataset.json declares"
        )


def _labels_at(clip: schema.Clip, names: tuple[str, ...], frame: int) -> dict[str, np.ndarray]:
    return {n: np.asarray(clip.labels[n][frame]) for n in names}


@dataclasses.dataclass(frozen=True)
class _Augment:
    """Plain-float copy of cfg.aug (picklable, cheap to read in workers)."""

    scale: float
    shift: float
    brightness: float
    contrast: float
    saturation: float
    hue: float


class Stage1Sample(grain.transforms.RandomMap):
    """Clip record -> (source, driving, cross) frame triplet with labels.

    source / driving: two different frames of the clip, drawn uniformly. cross: a random
    frame of a random clip of another identity. Augmentation: source and driving share one
    scale/shift jitter and one colour jitter (the reconstruction target must be predictable
    from source appearance + driving motion, and their relative head motion stays the real
    one); cross gets its own. Labels are those of the un-augmented frames,
    except the image-space boxes (schema.BOX_LABELS), which move with the jitter; "jitter"
    [3, 3] holds each frame's geometry (rows source, driving, cross: zoom, dx, dy of
    transforms.jitter_geometry) for labels that must follow it (face_pose's framing).
    """

    def __init__(self, records: ClipRecords, cross_ids: np.ndarray, cross_identities: np.ndarray,
                 image_size: int, aug: _Augment, label_names: tuple[str, ...],
                 contrast: float = 0.0, contrast_labels: tuple[str, ...] = ()):
        self._records = records
        self._contrast = float(contrast)
        self._contrast_labels = tuple(n for n in contrast_labels if n in label_names)
        order = np.argsort(cross_identities, kind="stable")
        self._cross_ids = np.asarray(cross_ids, np.int64)[order]  # record ids by identity
        self._cross_identities = np.asarray(cross_identities, np.int64)[order]
        self._image_size = image_size
        self._aug = aug
        self._label_names = label_names

    def _other_identity_record(self, identity: int, rng: np.random.Generator) -> int | None:
        """Uniform over the cross candidates whose identity differs (O(log N))."""
        lo = int(np.searchsorted(self._cross_identities, identity, "left"))
        hi = int(np.searchsorted(self._cross_identities, identity, "right"))
        n_other = len(self._cross_ids) - (hi - lo)
        if n_other <= 0:
            return None
        r = int(rng.integers(n_other))
        return int(self._cross_ids[r if r < lo else r + (hi - lo)])

    def _augment(self, images: list[np.ndarray], labels: list[dict[str, np.ndarray]],
                 rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
        """Jitters the images with one geometry and colour; their box labels (schema.
        BOX_LABELS) move with the content, in place. Returns (images, geometry [3]: zoom,
        dx, dy)."""
        a = self._aug
        geometry = T.sample_geometry(rng, a.scale, a.shift)
        color = T.sample_color(rng, a.brightness, a.contrast, a.saturation, a.hue)
        for frame_labels in labels:
            for name in schema.BOX_LABELS:
                if name in frame_labels:
                    frame_labels[name] = T.jitter_boxes(frame_labels[name], *geometry)
        return [
            T.jitter_color(T.jitter_geometry(T.resize_square(im, self._image_size), *geometry),
                           *color)
            for im in images
        ], np.asarray(geometry, np.float32)

    def _pair(self, clip: schema.Clip, rng: np.random.Generator) -> tuple[int, int]:
        """Source and driving frame numbers, two different frames of the clip: uniform, or
        with probability `contrast` a driving frame drawn with probability proportional to
        |l_j - l_i| for one of `contrast_labels` l (uniformly chosen): pairs whose mouth or
        eye state differs, so rare events (a blink is ~5% of frames) drive the loss often."""
        i, j = (int(k) for k in rng.choice(clip.num_frames, size=2, replace=False))
        if self._contrast > 0 and self._contrast_labels and rng.random() < self._contrast:
            name = self._contrast_labels[int(rng.integers(len(self._contrast_labels)))]
            values = np.asarray(clip.labels[name], np.float64).reshape(clip.num_frames, -1)
            diff = np.abs(values - values[i]).sum(axis=1)
            diff[i] = 0.0
            if diff.sum() > 0:
                j = int(rng.choice(clip.num_frames, p=diff / diff.sum()))
        return i, j

    def random_map(self, element: tuple[int, bytes], rng: np.random.Generator):
        record_id, data = element
        try:
            clip = _decode(data)
            _check_labels(clip, self._label_names)
            if clip.num_frames < 2:
                raise schema.CorruptRecordError(f"{clip.clip_id}: needs >= 2 frames")
            i, j = self._pair(clip, rng)
            source, driving = clip.decode_frames([i, j])
        except schema.CorruptRecordError as e:
            return Skipped(f"record {record_id}: {e}")

        failures = 0
        for _ in range(MAX_CROSS_TRIES):
            cross_id = self._other_identity_record(clip.identity_id, rng)
            if cross_id is None:
                return Skipped(f"record {record_id}: no clip of another identity", failures)
            try:
                other = schema.decode_clip(self._records.read(cross_id))
                if other.identity_id == clip.identity_id:  # stale index entry
                    continue
                _check_labels(other, self._label_names)
                f = int(rng.integers(other.num_frames))
                cross = other.decode_frames([f])[0]
                break
            except schema.CorruptRecordError as e:
                failures += 1
                logging.log_every_n_seconds(
                    logging.WARNING, "stage 1: cross-identity record %d unusable: %s", 60,
                    cross_id, e)
        else:
            return Skipped(f"record {record_id}: no usable cross-identity clip in "
                           f"{MAX_CROSS_TRIES} tries", failures)

        labels = {"source": _labels_at(clip, self._label_names, i),
                  "driving": _labels_at(clip, self._label_names, j),
                  "cross": _labels_at(other, self._label_names, f)}
        (source, driving), pair_jitter = self._augment(
            [source, driving], [labels["source"], labels["driving"]], rng)
        (cross,), cross_jitter = self._augment([cross], [labels["cross"]], rng)
        return {
            "source": source,
            "driving": driving,
            "cross": cross,
            "identity": np.int32(clip.identity_id),
            "cross_identity": np.int32(other.identity_id),
            "clip_index": np.int32(record_id),
            "cross_clip_index": np.int32(cross_id),
            "frame_index": np.array([i, j, f], np.int32),
            "labels": labels,
            "jitter": np.stack([pair_jitter, pair_jitter, cross_jitter]),
            "num_skipped": np.int32(failures),
        }


def _log_mel(clip: schema.Clip, n_mels: int, first: int, last: int) -> np.ndarray:
    """`vasa_jax.audio.log_mel_frames` of the clip, rows for frames [first, last): [last-first, D].

    The frontend has no per-clip normalisation and each frame's analysis windows reach less
    than one frame into its neighbours, so only the audio of frames [first - 1, last + 1) is
    analysed (4x less work for a 2 s window of a 10 s clip); tests check that this equals
    slicing the whole-clip features. Needs an integer number of samples per frame (16 kHz /
    25 fps = 640); otherwise the whole clip is analysed.
    """
    # Imported here: only audio_source="mel" needs the frontend (and it imports jax).
    from vasa_jax.audio import AudioError, log_mel_frames

    per_frame = clip.sample_rate / clip.fps
    try:
        if per_frame != int(per_frame):
            feats = log_mel_frames(clip.audio, clip.sample_rate, clip.fps, n_mels,
                                   num_frames=clip.num_frames)
            return feats[first:last]
        per_frame = int(per_frame)
        a = max(first - 1, 0)
        segment = clip.audio[a * per_frame : (last + 1) * per_frame]
        feats = log_mel_frames(segment, clip.sample_rate, clip.fps, n_mels, num_frames=last - a)
        return feats[first - a :]
    except AudioError as e:
        raise schema.CorruptRecordError(f"{clip.clip_id}: audio: {e}") from e


def _source_name(source: str, kind: str) -> str:
    if not source.startswith("features:") or not source[len("features:"):]:
        raise ValueError(f"{kind} source {source!r}: use {'labels' if kind == 'motion' else 'mel'}"
                         " or 'features:<name>'")
    return source[len("features:"):]


def clip_sequences(clip: schema.Clip, motion_source: str, audio_source: str, n_mels: int,
                   first: int = 0, last: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame motion float32 [L, Dm] and audio features float32 [L, Da] of frames
    [first, last) of a clip (default: all T frames), L = last - first.

    motion_source: "labels" (`MOTION_LABELS` concatenated, Dm = 13) or "features:<name>".
    audio_source: "mel" (`vasa_jax.audio.log_mel_frames` of the clip audio) or
    "features:<name>". Raises CorruptRecordError if the clip lacks them.
    """
    t = clip.num_frames
    last = t if last is None else last
    if not 0 <= first < last <= t:
        raise ValueError(f"bad frame range [{first}, {last}) for {t} frames")
    if motion_source == "labels":
        try:
            motion = T.motion_from_labels(clip.labels)[first:last]
        except KeyError as e:
            raise schema.CorruptRecordError(f"{clip.clip_id}: {e}") from e
    else:
        motion = _feature(clip, _source_name(motion_source, "motion"), first, last)
    if audio_source == "mel":
        audio = np.asarray(_log_mel(clip, n_mels, first, last), np.float32)
        if audio.ndim != 2 or audio.shape[0] != last - first:
            raise RuntimeError(f"log_mel_frames gave {audio.shape} for {last - first} frames")
    else:
        audio = _feature(clip, _source_name(audio_source, "audio"), first, last)
    return motion, audio


def _feature(clip: schema.Clip, name: str, first: int, last: int) -> np.ndarray:
    x = clip.features.get(name)
    if x is None:
        raise schema.CorruptRecordError(f"{clip.clip_id}: has no feature {name!r}")
    if x.ndim != 2 or x.shape[0] != clip.num_frames:
        raise schema.CorruptRecordError(
            f"{clip.clip_id}: feature {name!r} is {x.shape}, expected [{clip.num_frames}, D]")
    return np.asarray(x[first:last], np.float32)


def _pad_to(x: np.ndarray, length: int) -> np.ndarray:
    if len(x) == length:
        return x
    out = np.zeros((length, *x.shape[1:]), x.dtype)
    out[: len(x)] = x
    return out


def window_example(clip: schema.Clip, motion: np.ndarray, audio: np.ndarray, start: int,
                   window: int, context: int, label_names: tuple[str, ...],
                   offset: int = 0) -> dict:
    """The window [start, start + W) of a clip, with its context and control signals.

    motion / audio: per-frame sequences [L, D] covering frames [offset, offset + L) (all of
    the clip by default; the training path passes only the frames it needs).
    Returns (W = window, K = context):
      motion [W, Dm], audio [W, Da]: zero-padded past the clip's end (see valid [W]).
      motion_pre [K, Dm], audio_pre [K, Da]: frames [start - K, start); zeros and
        has_pre False for the first window (start 0).
      gaze [2]: main gaze direction (`transforms.main_gaze`) over the window's frames;
      distance [1]: mean normalised head distance; emotion [len(EMOTIONS)]: averaged
        emotion probabilities; each zero with has_<name> False when not labelled.
      labels {name: [W, ...]}: the window's per-frame labels (zero-padded like motion).
      identity, start: int32 scalars.
    """
    if 0 < start < context:
        raise ValueError(f"window start {start} needs {context} context frames")
    n = min(window, clip.num_frames - start)
    if n <= 0:
        raise ValueError(f"window start {start} is past the clip end ({clip.num_frames} frames)")
    first_needed = start - context if start > 0 else start
    if first_needed < offset or start + n > offset + len(motion):
        raise ValueError(f"sequences cover frames [{offset}, {offset + len(motion)}), window "
                         f"needs [{first_needed}, {start + n})")
    frames = slice(start, start + n)
    rows = slice(start - offset, start - offset + n)
    has_pre = start > 0
    if has_pre:
        pre = slice(start - context - offset, start - offset)
        motion_pre, audio_pre = motion[pre], audio[pre]
    else:
        motion_pre = np.zeros((context, motion.shape[1]), np.float32)
        audio_pre = np.zeros((context, audio.shape[1]), np.float32)
    labels = {k: clip.labels[k] for k in label_names}
    has_gaze = "gaze" in labels
    has_distance = "distance" in labels
    emotion = T.emotion_average(labels, frames)
    return {
        "motion": _pad_to(motion[rows], window),
        "motion_pre": motion_pre,
        "audio": _pad_to(audio[rows], window),
        "audio_pre": audio_pre,
        "has_pre": np.bool_(has_pre),
        "valid": np.arange(window) < n,
        "gaze": T.main_gaze(labels["gaze"][frames]) if has_gaze else np.zeros(2, np.float32),
        "distance": np.array([labels["distance"][frames].mean() if has_distance else 0.0],
                             np.float32),
        "emotion": emotion if emotion is not None else np.zeros(len(schema.EMOTIONS), np.float32),
        "has_gaze": np.bool_(has_gaze),
        "has_distance": np.bool_(has_distance),
        "has_emotion": np.bool_(emotion is not None),
        "labels": {k: _pad_to(np.asarray(v[frames]), window) for k, v in labels.items()},
        "identity": np.int32(clip.identity_id),
        "start": np.int32(start),
    }


def iterate_windows(clip: schema.Clip, window: int, context: int, *,
                    motion_source: str = "labels", audio_source: str = "mel",
                    n_mels: int = 80) -> Iterator[dict]:
    """Deterministic evaluation windows of one clip: starts 0, W, 2W, ... (as inference).

    Each window's context is the previous window's last K frames; the last window is
    zero-padded to W frames (its `valid` mask says how many are real). Yields
    `window_example` dicts (unbatched). Labels: all the clip has.
    """
    if not 0 <= context <= window:
        raise ValueError(f"need 0 <= context <= window, got context={context}, window={window}")
    motion, audio = clip_sequences(clip, motion_source, audio_source, n_mels)
    names = tuple(sorted(clip.labels))
    for start in range(0, clip.num_frames, window):
        yield window_example(clip, motion, audio, start, window, context, names)


class Stage2Window(grain.transforms.RandomMap):
    """Clip record -> one training window at a random start (`transforms.window_starts`)."""

    def __init__(self, window: int, context: int, motion_source: str, audio_source: str,
                 n_mels: int, label_names: tuple[str, ...]):
        self._window = window
        self._context = context
        self._motion_source = motion_source
        self._audio_source = audio_source
        self._n_mels = n_mels
        self._label_names = label_names

    def random_map(self, element: tuple[int, bytes], rng: np.random.Generator):
        record_id, data = element
        try:
            clip = _decode(data)
            _check_labels(clip, self._label_names)
            starts = T.window_starts(clip.num_frames, self._window, self._context)
            if len(starts) == 0:
                raise schema.CorruptRecordError(
                    f"{clip.clip_id}: {clip.num_frames} frames < window {self._window}")
            start = int(rng.choice(starts))
            first = start - self._context if start > 0 else 0
            motion, audio = clip_sequences(clip, self._motion_source, self._audio_source,
                                           self._n_mels, first, start + self._window)
        except schema.CorruptRecordError as e:
            return Skipped(f"record {record_id}: {e}")
        example = window_example(clip, motion, audio, start, self._window, self._context,
                                 self._label_names, offset=first)
        example["clip_index"] = np.int32(record_id)
        example["num_skipped"] = np.int32(0)
        return example


# ----------------------------------------------------------------------------- datasets


def _open(cfg: ml_collections.ConfigDict, source: Any = None
          ) -> tuple[schema.DatasetInfo, ClipIndex]:
    validate_data(cfg)
    tfds_dir = bool(cfg.path) and os.path.isfile(os.path.join(cfg.path, "dataset_info.json"))
    if source is None and tfds_dir:
        source = cfg.path  # a prepared TFDS dataset folder
    if source is not None:
        from data_pipeline import tfds_builders  # imports tensorflow_datasets

        clips = tfds_builders.clip_source(source, cfg.split)
        return clips.info, ClipIndex((), clips.identity_id, clips.num_frames, clips)
    if not cfg.path:
        raise ValueError("data.path is empty: set it to a clip-record dataset folder "
                         "(--config.data.path=DIR)")
    if not os.path.isdir(cfg.path):
        raise FileNotFoundError(f"data.path {cfg.path!r} does not exist or is not a folder")
    info = schema.DatasetInfo.load(cfg.path)
    return info, load_clip_index(cfg.path, cfg.split)


def _local_batch_size(cfg: ml_collections.ConfigDict, process_index: int,
                      process_count: int) -> int:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size {cfg.batch_size} is not divisible by "
                         f"{process_count} processes")
    return cfg.batch_size // process_count


def _usable(index: ClipIndex, min_frames: int, what: str, cfg) -> np.ndarray:
    """Record ids long enough per the index. Unreadable headers stay in: the map will skip
    and count them (so broken records show up in num_skipped, not only in a log line)."""
    keep = (index.num_frames >= min_frames) | (index.identity_id < 0)
    short = int(np.sum(~keep))
    if short:
        logging.warning("%s/%s: leaving out %d of %d clips shorter than %d frames (%s)",
                        cfg.path, cfg.split, short, len(index), min_frames, what)
    if not keep.any():
        raise ValueError(
            f"no clip in {cfg.path!r} split {cfg.split!r} has >= {min_frames} frames ({what}); "
            f"the longest has {int(index.num_frames.max(initial=0))}"
        )
    return np.flatnonzero(keep)


def _pipeline(records: ClipRecords, transform: grain.transforms.RandomMap,
              cfg: ml_collections.ConfigDict, process_index: int, process_count: int,
              num_epochs: int | None) -> grain.IterDataset:
    local_batch = _local_batch_size(cfg, process_index, process_count)
    ds = grain.MapDataset.source(records).seed(cfg.seed).shuffle()
    ds = ds.repeat(num_epochs).random_map(transform)
    ds = ds[process_index::process_count]
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=READ_THREADS, prefetch_buffer_size=max(local_batch, READ_THREADS)))
    ds = _CountSkipped(ds, MAX_CONSECUTIVE_SKIPS)
    ds = ds.batch(local_batch, drop_remainder=True)
    if cfg.num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.prefetch))
    return ds


def stage1_dataset(cfg: ml_collections.ConfigDict, *, process_index: int = 0,
                   process_count: int = 1, num_epochs: int | None = None,
                   source: Any = None) -> grain.IterDataset:
    """Stage-1 (face latent) batches from cfg = configs.common.data_stage1(...).

    Yields dicts (B = cfg.batch_size // process_count, S = cfg.image_size):
      source, driving [B, S, S, 3] float32 in [-1, 1]: two different frames of one clip;
      cross [B, S, S, 3]: a frame of a clip of another identity;
      identity, cross_identity, clip_index, cross_clip_index [B] int32;
      frame_index [B, 3] int32 (source, driving, cross frame numbers);
      jitter [B, 3, 3] float32: (zoom, dx, dy) of the scale/shift jitter of those frames;
      labels {"source"|"driving"|"cross": {name: [B, ...]}} for every label dataset.json
        declares (none if it declares none);
      num_skipped [B] int32 (see the module docstring).
    num_epochs: None repeats forever (training); an int makes a finite pass.
    source: a TFDS data source of clip records instead of cfg.path (module docstring).
    """
    info, index = _open(cfg, source)
    records = ClipRecords(index.paths, _usable(index, 2, "stage 1 needs 2 frames", cfg),
                          index.source)
    candidates = (index.identity_id >= 0) & (index.num_frames >= 1)
    identities = np.unique(index.identity_id[candidates])
    if len(identities) < 2:
        raise ValueError(
            f"stage 1 needs clips of at least 2 identities (cross-identity frames); "
            f"{cfg.path!r} split {cfg.split!r} has identities {identities.tolist()}"
        )
    contrast = float(cfg.get("contrast_pairs", 0.0))
    contrast_labels = tuple(cfg.get("contrast_labels", ()))
    if contrast > 0 and not set(contrast_labels) & set(info.labels):
        raise ValueError(f"data.contrast_pairs={contrast:g} draws pairs by the labels "
                         f"{contrast_labels}, but {cfg.path!r} has labels {info.labels}; "
                         "set data.contrast_labels or data.contrast_pairs=0")
    transform = Stage1Sample(
        records,
        cross_ids=np.flatnonzero(candidates),
        cross_identities=index.identity_id[candidates],
        image_size=int(cfg.image_size),
        aug=_Augment(**{k: float(cfg.aug[k]) for k in
                        ("scale", "shift", "brightness", "contrast", "saturation", "hue")}),
        label_names=tuple(sorted(info.labels)),
        contrast=contrast,
        contrast_labels=contrast_labels,
    )
    return _pipeline(records, transform, cfg, process_index, process_count, num_epochs)


def stage2_dataset(cfg: ml_collections.ConfigDict, *, process_index: int = 0,
                   process_count: int = 1, num_epochs: int | None = None,
                   source: Any = None) -> grain.IterDataset:
    """Stage-2 (motion diffusion) windows from cfg = configs.common.data_stage2(...).

    One window per clip visit, at a random start in {0} U [K, T - W] (W = cfg.window,
    K = cfg.context). Yields dicts with batch dim B = cfg.batch_size // process_count of
    the `window_example` fields (motion [B, W, Dm], motion_pre [B, K, Dm], audio [B, W, Da],
    audio_pre [B, K, Da], has_pre [B], valid [B, W], gaze [B, 2], distance [B, 1],
    emotion [B, 8], has_gaze / has_distance / has_emotion [B], labels {name: [B, W, ...]},
    identity [B], start [B]) plus clip_index [B] and num_skipped [B].
    Clips shorter than W frames are left out (logged); none left is an error.
    source: a TFDS data source of clip records instead of cfg.path (module docstring).
    """
    info, index = _open(cfg, source)
    if cfg.context > cfg.window:
        raise ValueError(f"data.context ({cfg.context}) must be <= data.window ({cfg.window}): "
                         "the context is the previous window's last K frames")
    if abs(info.fps - cfg.audio.fps) > 1e-6:
        raise ValueError(f"dataset fps {info.fps} != data.audio.fps {cfg.audio.fps}: windows "
                         "are counted in video frames; re-encode the data at the model's fps")
    if cfg.audio_source == "mel" and info.sample_rate != cfg.audio.sample_rate:
        raise ValueError(f"dataset sample rate {info.sample_rate} != data.audio.sample_rate "
                         f"{cfg.audio.sample_rate}")
    if cfg.motion_source == "labels":
        missing = [k for k in MOTION_LABELS if k not in info.labels]
        if missing:
            raise ValueError(f"motion_source='labels' needs labels {list(MOTION_LABELS)}; "
                             f"{cfg.path!r} lacks {missing} (dataset.json labels: {info.labels})")
    for source in (cfg.motion_source, cfg.audio_source):
        if source.startswith("features:") and source[len("features:"):] not in info.features:
            raise ValueError(f"{source!r}: dataset.json lists features "
                             f"{sorted(info.features)}")
    records = ClipRecords(index.paths, _usable(index, cfg.window, f"window {cfg.window}", cfg),
                          index.source)
    transform = Stage2Window(int(cfg.window), int(cfg.context), cfg.motion_source,
                             cfg.audio_source, int(cfg.audio.n_mels), tuple(sorted(info.labels)))
    return _pipeline(records, transform, cfg, process_index, process_count, num_epochs)


def batch_spec(batch: Mapping[str, Any]) -> dict:
    """{key: (shape, dtype)} of a batch (nested), for logging."""
    return {k: batch_spec(v) if isinstance(v, Mapping) else (tuple(v.shape), str(v.dtype))
            for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class Frames:
    """Frames read directly from a split, with their clip's identity and per-frame labels.

    images: float32 [N, S, S, 3] in [-1, 1]; identity, clip: int32 [N] (clip = the
    record's position in the split); labels: {name: [N, ...]} for every label the clips
    carry (those some clip lacks are left out).
    """

    images: np.ndarray
    identity: np.ndarray
    clip: np.ndarray
    labels: dict[str, np.ndarray]


def read_frames(directory: str, split: str, size: int, *, frames_per_clip: int = 10,
                max_clips: int | None = None) -> Frames:
    """`frames_per_clip` evenly spaced frames of every clip of a split (deterministic, no
    augmentation), resized to size x size: held-out sets for the helper networks'
    evaluations. Unreadable records are skipped with a warning."""
    source = schema.read_records(schema.list_shards(directory, split))
    for path, reason in source.broken.items():
        logging.warning("read_frames: skipping damaged shard %s: %s", path, reason)
    n = len(source) if max_clips is None else min(len(source), max_clips)
    images, identity, clips, labels = [], [], [], []
    for r in range(n):
        try:
            clip = schema.decode_clip(source[r])
            idx = np.unique(np.linspace(0, clip.num_frames - 1, frames_per_clip).round())
            idx = idx.astype(int)
            frames = clip.decode_frames(idx)
        except schema.CorruptRecordError as e:
            logging.warning("read_frames: skipping %s record %d: %s", split, r, e)
            continue
        images += [T.to_signed_float(T.resize_square(f, size)) for f in frames]
        identity += [clip.identity_id] * len(frames)
        clips += [r] * len(frames)
        labels.append({k: np.asarray(v)[idx] for k, v in clip.labels.items()})
    if not images:
        raise ValueError(f"no usable {split!r} clips in {directory!r}")
    common = set.intersection(*(set(d) for d in labels))
    return Frames(np.stack(images), np.asarray(identity, np.int32), np.asarray(clips, np.int32),
                  {k: np.concatenate([d[k] for d in labels]) for k in sorted(common)})
