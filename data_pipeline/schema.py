"""The clip record: one format for synthetic (SynthTalk) and real talking-face clips.

A dataset is a folder::

    DIR/dataset.json                         # DatasetInfo: source, fps, rate, size, splits
    DIR/{split}-{i:05d}-of-{n:05d}.array_record   # one record per clip
    DIR/{split}-{i:05d}-of-{n:05d}.index.json     # per-record identity_id / num_frames

Each ArrayRecord record is one clip, msgpack-encoded (`encode_clip` / `decode_clip`):

==============  ==========================  ===========================================
field           type                        meaning
==============  ==========================  ===========================================
version         int                         `FORMAT_VERSION`
clip_id         str                         unique within the dataset
identity_id     int                         speaker / face identity (dense, 0-based)
source          str                         "synthtalk", "voxceleb2", ...
split           str                         "train" or "test"
fps             float                       video frame rate (25)
sample_rate     int                         audio rate (16000)
frame_format    str                         "jpeg" or "png"
height, width   int                         frame size (square crops: H == W)
frames          list[bytes]                 T encoded RGB frames
audio           int16 [N]                   mono PCM; N ~= T / fps * sample_rate
labels          dict[str, array [T, ...]]   per-frame ground truth when known (LABELS,
                                            BOX_LABELS)
features        dict[str, array [T, ...]]   precomputed per-frame features, e.g. stage-1
                                            motion latents "motion" or audio features
attrs           dict                        JSON-able extras (spoken text, voice, ...)
==============  ==========================  ===========================================

The `.index.json` sidecar (written by `ShardWriter`, read by `read_shard_index`) holds each
record's identity and frame count, so loaders can group clips by identity and drop clips
that are too short without reading every record (500K clips x MBs each).

Per-frame labels (all float32 unless noted; any subset may be present):

- ``pose`` [T, 6]: yaw, pitch, roll (degrees), tx, ty, tz (camera frame, head-radius
  units; +x image right, +y image up, +z away from the camera).
- ``gaze`` [T, 2]: theta (vertical, + up), phi (horizontal, + towards image right) of the
  eyes' gaze direction in the camera frame, degrees; (0, 0) looks into the lens.
- ``blink`` [T] 0 open .. 1 closed; ``brow`` [T] 0 rest .. 1 raised.
- ``mouth_open`` [T] 0 closed .. 1 wide; ``mouth_width`` [T] 0 narrow .. 1 wide (smile);
  ``mouth_round`` [T] 0 .. 1 (rounded lips, "oo").
- ``emotion`` int32 [T]: index into EMOTIONS; ``emotion_probs`` [T, len(EMOTIONS)].
- ``distance`` [T]: head-to-camera distance over the dataset's nominal distance (1 = usual).
- ``mouth_box``, ``eyes_box`` [T, 4] (`BOX_LABELS`): where the mouth (the lips and the
  opening between them) and both eyes are in frame t: (x0, y0, x1, y1) in [0, 1] image
  coordinates (x right, y down; 0 and 1 are the frame's edges), clipped to the frame. For
  weighting losses / metrics by region per frame. SynthTalk projects them from its 3D
  geometry; real-video preprocessing can take them from landmarks (the lip contour; the eye
  contours with the lids).

Face crops (how a face is framed in a record's square frames, `FACE_CROP_HEIGHT`,
`FACE_CROP_CENTER`): like the aligned face crops of talking-head datasets (VoxCeleb-style),
the face from the top of the eyebrows to the bottom of the chin spans ~70%
(`FACE_CROP_HEIGHT` = 0.68) of the frame height at a frontal, neutral pose (mouth closed),
and the midpoint of that span sits at the frame centre, horizontally and vertically.
SynthTalk's default "face" framing (data_pipeline/synthtalk/render.py) is built to this
convention. Real-video preprocessing crops the same way: per clip (track), measure with
landmarks the brow-top-to-chin-bottom height h and its midpoint c (the median over the
clip's frames, or a frontal frame), cut the square of side h / FACE_CROP_HEIGHT centred at
c, fixed for the clip (or smoothed slowly), so that head motion moves the face within the
frame as it does in SynthTalk, and resize to the dataset's size. At this scale the turns,
shifts and distance changes of a talking head keep the eyes and mouth inside the frame.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import cv2
import msgpack
import numpy as np

FORMAT_VERSION = 1
FPS = 25.0
SAMPLE_RATE = 16000
SPLITS = ("train", "test")
FRAME_FORMATS = ("jpeg", "png")

# AffectNet's 8 classes (what HSEmotion predicts); fer's 7 are a subset (no contempt).
EMOTIONS = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")

# name -> trailing shape of the per-frame label (after the leading T).
LABELS: dict[str, tuple[int, ...]] = {
    "pose": (6,),
    "gaze": (2,),
    "blink": (),
    "brow": (),
    "mouth_open": (),
    "mouth_width": (),
    "mouth_round": (),
    "emotion": (),
    "emotion_probs": (len(EMOTIONS),),
    "distance": (),
}
POSE_NAMES = ("yaw", "pitch", "roll", "tx", "ty", "tz")
# Per-frame image-space boxes, name -> trailing shape: (x0, y0, x1, y1) in [0, 1] image
# coordinates (x right, y down), 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1. Kept apart
# from LABELS (what a clip's ground truth *is*: the renderer's inputs) because they depend
# on the framing; a record may hold any subset of LABELS and BOX_LABELS.
BOX_LABELS: dict[str, tuple[int, ...]] = {
    "mouth_box": (4,),
    "eyes_box": (4,),
}
# Face crop convention (see the module docstring): brow-top-to-chin-bottom height over the
# frame height at a frontal, neutral pose, and where the brow-chin midpoint sits (x, y).
FACE_CROP_HEIGHT = 0.68
FACE_CROP_CENTER = (0.5, 0.5)

DATASET_INFO = "dataset.json"
SHARD_SUFFIX = ".array_record"
INDEX_SUFFIX = ".index.json"


class CorruptRecordError(ValueError):
    """A record that cannot be decoded or whose fields are inconsistent."""


@dataclasses.dataclass
class Clip:
    """One talking-face clip. Frames stay encoded until `decode_frames` is called."""

    clip_id: str
    identity_id: int
    frames: list[bytes]
    audio: np.ndarray  # float32 [N] in [-1, 1]
    source: str = "synthtalk"
    split: str = "train"
    fps: float = FPS
    sample_rate: int = SAMPLE_RATE
    frame_format: str = "jpeg"
    height: int = 0
    width: int = 0
    labels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps

    def decode_frames(self, indices: Iterable[int] | None = None) -> np.ndarray:
        """Decoded RGB frames: uint8 [len(indices), H, W, 3] (all frames by default)."""
        idx = range(self.num_frames) if indices is None else indices
        return np.stack([decode_frame(self.frames[i]) for i in idx])


# ----------------------------------------------------------------------------- frames


def encode_frame(rgb: np.ndarray, frame_format: str = "jpeg", quality: int = 95) -> bytes:
    """uint8 [H, W, 3] RGB -> JPEG/PNG bytes."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    if frame_format == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    elif frame_format == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        raise ValueError(f"frame_format must be one of {FRAME_FORMATS}, got {frame_format!r}")
    if not ok:
        raise RuntimeError("cv2.imencode failed")
    return buf.tobytes()


def decode_frame(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 [H, W, 3] RGB. Raises CorruptRecordError on bad bytes."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise CorruptRecordError("frame bytes do not decode as an image")
    return img[..., ::-1]


# ----------------------------------------------------------------------------- records


def _pack_array(x: np.ndarray) -> dict:
    x = np.ascontiguousarray(x)
    return {"dtype": x.dtype.str, "shape": list(x.shape), "data": x.tobytes()}


def _unpack_array(d: Mapping) -> np.ndarray:
    try:
        return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptRecordError(f"bad array field: {e}") from e


def audio_to_pcm16(audio: np.ndarray) -> np.ndarray:
    return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)


def encode_clip(clip: Clip) -> bytes:
    """Clip -> record bytes. Validates the clip first (see `validate_clip`)."""
    validate_clip(clip)
    rec = {
        "version": FORMAT_VERSION,
        "clip_id": clip.clip_id,
        "identity_id": int(clip.identity_id),
        "source": clip.source,
        "split": clip.split,
        "fps": float(clip.fps),
        "sample_rate": int(clip.sample_rate),
        "frame_format": clip.frame_format,
        "height": int(clip.height),
        "width": int(clip.width),
        "frames": list(clip.frames),
        "audio": _pack_array(audio_to_pcm16(clip.audio)),
        "labels": {k: _pack_array(v) for k, v in clip.labels.items()},
        "features": {k: _pack_array(v) for k, v in clip.features.items()},
        "attrs": json.dumps(clip.attrs),
    }
    return msgpack.packb(rec, use_bin_type=True)


def decode_clip(data: bytes) -> Clip:
    """Record bytes -> Clip. Raises CorruptRecordError for anything malformed."""
    try:
        rec = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise CorruptRecordError(f"record is not valid msgpack: {e!r}") from e
    if not isinstance(rec, dict):
        raise CorruptRecordError("record is not a mapping")
    if rec.get("version") != FORMAT_VERSION:
        raise CorruptRecordError(f"unsupported record version {rec.get('version')!r}")
    try:
        clip = Clip(
            clip_id=str(rec["clip_id"]),
            identity_id=int(rec["identity_id"]),
            source=str(rec["source"]),
            split=str(rec["split"]),
            fps=float(rec["fps"]),
            sample_rate=int(rec["sample_rate"]),
            frame_format=str(rec["frame_format"]),
            height=int(rec["height"]),
            width=int(rec["width"]),
            frames=list(rec["frames"]),
            audio=_unpack_array(rec["audio"]).astype(np.float32) / 32767.0,
            labels={k: _unpack_array(v) for k, v in rec["labels"].items()},
            features={k: _unpack_array(v) for k, v in rec["features"].items()},
            attrs=json.loads(rec["attrs"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, CorruptRecordError):
            raise
        raise CorruptRecordError(f"record field missing or malformed: {e!r}") from e
    validate_clip(clip)
    return clip


def validate_clip(clip: Clip) -> None:
    """Checks field consistency (not the image bytes; `decode_frame` checks those)."""
    t = clip.num_frames
    if t == 0:
        raise CorruptRecordError(f"{clip.clip_id}: clip has no frames")
    if not all(isinstance(f, (bytes, bytearray)) and len(f) > 0 for f in clip.frames):
        raise CorruptRecordError(f"{clip.clip_id}: empty or non-bytes frame")
    if clip.split not in SPLITS:
        raise CorruptRecordError(f"{clip.clip_id}: split {clip.split!r} not in {SPLITS}")
    if clip.frame_format not in FRAME_FORMATS:
        raise CorruptRecordError(f"{clip.clip_id}: frame_format {clip.frame_format!r}")
    if clip.fps <= 0 or clip.sample_rate <= 0 or clip.height <= 0 or clip.width <= 0:
        raise CorruptRecordError(f"{clip.clip_id}: non-positive fps/sample_rate/size")
    if clip.audio.ndim != 1:
        raise CorruptRecordError(f"{clip.clip_id}: audio must be mono [N], got {clip.audio.shape}")
    expected = t / clip.fps * clip.sample_rate
    if abs(len(clip.audio) - expected) > clip.sample_rate / clip.fps + 1:
        raise CorruptRecordError(
            f"{clip.clip_id}: {len(clip.audio)} audio samples for {t} frames "
            f"(expected ~{expected:.0f})"
        )
    for name, arr in clip.labels.items():
        shape = LABELS.get(name, BOX_LABELS.get(name))
        if shape is None:
            raise CorruptRecordError(f"{clip.clip_id}: unknown label {name!r}")
        if arr.shape != (t, *shape):
            raise CorruptRecordError(
                f"{clip.clip_id}: label {name} has shape {arr.shape}, expected {(t, *shape)}"
            )
        if not np.all(np.isfinite(arr)):
            raise CorruptRecordError(f"{clip.clip_id}: label {name} has non-finite values")
        if name in BOX_LABELS and not _valid_boxes(arr):
            raise CorruptRecordError(
                f"{clip.clip_id}: label {name} has boxes outside [0, 1] or with x0 > x1 / y0 > y1"
            )
    for name, arr in clip.features.items():
        if arr.ndim < 1 or arr.shape[0] != t:
            raise CorruptRecordError(
                f"{clip.clip_id}: feature {name} has shape {arr.shape}, needs leading T={t}"
            )


def _valid_boxes(boxes: np.ndarray) -> bool:
    """[T, 4] (x0, y0, x1, y1): all in [0, 1] with x0 <= x1 and y0 <= y1."""
    return bool(
        np.all((boxes >= 0) & (boxes <= 1))
        and np.all(boxes[:, 0] <= boxes[:, 2])
        and np.all(boxes[:, 1] <= boxes[:, 3])
    )


def read_record_header(data: bytes) -> dict[str, Any]:
    """{"clip_id", "identity_id", "num_frames"} of a record, without unpacking its arrays.

    Skips the frame bytes and arrays, so it is cheap even for long clips. Raises
    CorruptRecordError if the record is not a msgpack map holding those fields.
    """
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=0)  # 0: no size limit
    unpacker.feed(data)
    header: dict[str, Any] = {}
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key in ("clip_id", "identity_id"):
                header[key] = unpacker.unpack()
            elif key == "frames":
                header["num_frames"] = unpacker.read_array_header()
                for _ in range(header["num_frames"]):
                    unpacker.skip()
            else:
                unpacker.skip()
        return {
            "clip_id": str(header["clip_id"]),
            "identity_id": int(header["identity_id"]),
            "num_frames": int(header["num_frames"]),
        }
    except Exception as e:  # msgpack raises several unrelated types
        raise CorruptRecordError(f"record header unreadable: {e!r}") from e


# ----------------------------------------------------------------------------- datasets


@dataclasses.dataclass
class DatasetInfo:
    """Contents of DIR/dataset.json."""

    source: str
    height: int
    width: int
    fps: float = FPS
    sample_rate: int = SAMPLE_RATE
    num_identities: int = 0
    clips: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> count
    labels: list[str] = dataclasses.field(default_factory=list)
    features: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # name -> shape[1:]
    emotions: list[str] = dataclasses.field(default_factory=lambda: list(EMOTIONS))
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. generator args

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, DATASET_INFO), "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: str) -> "DatasetInfo":
        if not directory:
            raise FileNotFoundError("no dataset folder given (an empty path): pass a "
                                    "clip-record dataset folder, e.g. --config.data.path=DIR")
        path = os.path.join(directory, DATASET_INFO)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: {directory!r} is not a clip-record dataset "
                "(make one with `python -m data_pipeline.synthtalk` or the preprocessing tools)"
            )
        with open(path) as f:
            d = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def list_shards(directory: str, split: str | None = None) -> list[str]:
    """Sorted shard paths of one split (or all splits). Raises if there are none."""
    splits = SPLITS if split is None else (split,)
    files = sorted(
        p for s in splits for p in glob.glob(os.path.join(directory, f"{s}-*{SHARD_SUFFIX}"))
    )
    if not files:
        raise FileNotFoundError(f"no {split or 'any'}-split shards in {directory!r}")
    return files


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes `obj` as JSON to `path` atomically (a temp file, then a rename): a reader or
    a resumed writer never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def dataset_files(directory: str, extra: Sequence[str] = ()) -> list[str]:
    """Sorted paths of the dataset files in `directory` (shards, their indexes, dataset.json)
    plus those of the `extra` file names that exist: what a dataset writer deletes before
    writing anew."""
    files = [p for split in SPLITS for suffix in (SHARD_SUFFIX, INDEX_SUFFIX)
             for p in glob.glob(os.path.join(directory, f"{split}-*-of-*{suffix}"))]
    files += [p for p in (os.path.join(directory, n) for n in (DATASET_INFO, *extra))
              if os.path.exists(p)]
    return sorted(files)


def shard_index_path(shard_path: str) -> str:
    """The `.index.json` sidecar of a shard file."""
    if not shard_path.endswith(SHARD_SUFFIX):
        raise ValueError(f"{shard_path!r} is not a {SHARD_SUFFIX} shard")
    return shard_path[: -len(SHARD_SUFFIX)] + INDEX_SUFFIX


def read_shard_index(shard_path: str) -> dict[str, np.ndarray] | None:
    """The shard's sidecar index: {"identity_id": int64 [R], "num_frames": int64 [R]}.

    One entry per record, in record order; -1 / 0 for a record whose header was unreadable
    when it was written. None if the shard has no (readable) sidecar.
    """
    path = shard_index_path(shard_path)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
        index = {k: np.asarray(d[k], np.int64) for k in ("identity_id", "num_frames")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if index["identity_id"].shape != index["num_frames"].shape:
        return None
    return index


class ShardWriter:
    """Writes encoded clips round-robin into `num_shards` ArrayRecord files of one split.

    Next to each shard it writes the `.index.json` sidecar (see `read_shard_index`).
    Use as a context manager; files are complete only after close().
    """

    def __init__(self, directory: str, split: str, num_shards: int = 1):
        from array_record.python.array_record_module import ArrayRecordWriter

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        os.makedirs(directory, exist_ok=True)
        self.paths = [
            os.path.join(directory, shard_name(split, i, num_shards)) for i in range(num_shards)
        ]
        # group_size:1 keeps random access cheap (grain reads single records).
        self._writers = [ArrayRecordWriter(p, "group_size:1") for p in self.paths]
        self._index: list[dict[str, list[int]]] = [
            {"identity_id": [], "num_frames": []} for _ in self.paths
        ]
        self.count = 0

    def write(self, record: bytes) -> None:
        shard = self.count % len(self._writers)
        self._writers[shard].write(record)
        try:
            header = read_record_header(record)
        except CorruptRecordError:  # written anyway: readers skip and count such records
            header = {"identity_id": -1, "num_frames": 0}
        self._index[shard]["identity_id"].append(header["identity_id"])
        self._index[shard]["num_frames"].append(header["num_frames"])
        self.count += 1

    def close(self) -> None:
        for w, path, index in zip(self._writers, self.paths, self._index):
            w.close()
            with open(shard_index_path(path), "w") as f:
                json.dump(index, f, separators=(",", ":"))

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_clips(directory: str, clips: Sequence[Clip], num_shards: int = 1) -> dict[str, int]:
    """Writes clips into their splits' shards; returns split -> count. Small-data helper."""
    counts: dict[str, int] = {}
    for split in SPLITS:
        chosen = [c for c in clips if c.split == split]
        if not chosen:
            continue
        with ShardWriter(directory, split, min(num_shards, len(chosen))) as w:
            for c in chosen:
                w.write(encode_clip(c))
        counts[split] = len(chosen)
    return counts


class ShardRecords:
    """Random-access source of raw record bytes over shard files (a grain data source: len +
    getitem, picklable), robust to damaged files.

    A shard that cannot be opened (truncated, overwritten, not an ArrayRecord file) is left
    out: `paths` holds the shards that are read, in order, and `broken` {path: reason} the
    others. A record that cannot be read (a corrupted chunk) raises CorruptRecordError naming
    its file, so readers skip and count it like any other unusable record.
    """

    def __init__(self, paths: Sequence[str]):
        import grain

        self.paths: list[str] = []
        self.broken: dict[str, str] = {}
        self._sources = []
        self._starts = [0]  # global index of each read shard's first record, then the total
        for path in paths:
            try:
                source = grain.sources.ArrayRecordDataSource([path])
                count = len(source)
            except RuntimeError as e:  # riegeli's error for a damaged file
                self.broken[path] = " ".join(str(e).split())
                continue
            self.paths.append(path)
            self._sources.append(source)
            self._starts.append(self._starts[-1] + count)

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        return bisect.bisect_right(self._starts, index) - 1

    def locate(self, index: int) -> tuple[str, int]:
        """(shard path, record number in that shard) of global record `index`."""
        k = self._shard(int(index))
        return self.paths[k], int(index) - self._starts[k]

    def __getitem__(self, index: int) -> bytes:
        k = self._shard(int(index))
        position = int(index) - self._starts[k]
        try:
            return self._sources[k][position]
        except RuntimeError as e:
            raise CorruptRecordError(f"{self.paths[k]} record {position}: unreadable "
                                     f"({' '.join(str(e).split())})") from None

    def __repr__(self) -> str:
        return f"ShardRecords({len(self.paths)} shards, {len(self)} records)"


def read_records(paths: Sequence[str]) -> ShardRecords:
    """Random-access source of raw record bytes over shard files (see ShardRecords)."""
    return ShardRecords(paths)
