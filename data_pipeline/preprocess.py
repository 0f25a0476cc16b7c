"""Real-video preprocessing: talking-face videos -> a clip-record dataset with control labels.

    python -m data_pipeline.preprocess --input DIR|LIST --output OUT [--size 512]
        [--workers N] [--resume] [--overwrite] [--no_progress] [--source voxceleb2]
        [--identity top|parent|file] [--test_fraction F] [--min_seconds 2] [--max_seconds 20]
        [--min_crop_px 128] [--min_brightness 40] [--min_sharpness 20]
        [--frame_format jpeg] [--inputs_per_shard 64]
        [--runner local|beam [--beam_runner DirectRunner] [Beam pipeline options]]

--input is a folder (every video file under it, recursively, sorted) or a text file listing
one video per line (relative paths are relative to the list's folder; '#' starts a
comment). Each input video becomes zero or more clips in the format of data_pipeline/schema.py
(the one SynthTalk writes), so `python -m data_pipeline.inspect OUT`, the stage-1 / stage-2
loaders and `extract_latents` read OUT like a SynthTalk dataset.

Per input (`process_input`; one `FaceAnalyzer` per worker process):

1. Decode. ffprobe reads the streams; ffmpeg decodes the video resampled to 25 fps
   (schema.FPS, ffmpeg's fps filter: frames dropped / repeated by timestamp) as RGB at the
   display size (rotation metadata and non-square pixels applied); the audio goes through
   the project's loader (`vasa_jax.audio.load_audio`: ffmpeg, mono, 16 kHz, soxr), aligned
   to the video by the streams' start times.
2. Track (`track`). BlazeFace detection, then the 468-point mesh + irises tracked from the
   previous frame's landmarks (`FaceAnalyzer.landmarks`); a mesh score below TRACK_SCORE
   re-detects. Every DETECT_EVERY frames the detector also runs to count other faces
   (multi-person) and to sample the face crop's brightness and sharpness.
3. Segment (`segments`). A clip ends where the track is lost (no face, or the mesh score
   stays low after re-detection), at a shot change (consecutive frames differ by more than
   CUT_DIFF; the face is then detected anew), or where the track jumps (the per-frame face
   crop moves by more than CUT_SHIFT of its side or changes size by more than CUT_SCALE in
   one frame). A cut between two shots that frame the same face alike is not seen.
   Segments longer than --max_seconds are cut into equal parts. Each part is kept or
   rejected for one reason, checked in this order (counted per reason in the manifest):
   too_short (< --min_seconds), small_face (median crop side < --min_crop_px source pixels,
   i.e. the face would be upscaled more than --size / min_crop_px), multi_person (another
   face at least MULTI_FACE_SIZE of the tracked one's width in more than MULTI_FACE_SHARE of
   the checked frames), dark (median mean luma of the face crop < --min_brightness, 0..255),
   blurred (median variance of the Laplacian of the face crop at QUALITY_SIZE px <
   --min_sharpness), silent (audio RMS below `vasa_jax.audio.SILENCE_RMS`, -80 dBFS).
4. Crop. One crop per clip, following the face-crop convention of data_pipeline/schema.py:
   the MEDIAN over the clip's frames of the per-frame `face_analysis.crop_box` (centre and
   side), fixed for the clip, axis-aligned (head roll stays in the frames, as in SynthTalk),
   so head motion moves the face within the frame. Cut with `face_analysis.warp_crop`
   (beyond the video's edges the border pixels are repeated; the share of the crop outside
   the video is in the clip's attrs), resized to --size.
5. Label (`clip_labels`), per frame, from the landmarks mapped into the clip's crop (as if
   the crop were the camera image: SynthTalk's face-framing camera, focal
   `face_analysis.DEFAULT_FOCAL` x size, principal point at the centre):

   =============  =========================================================================
   pose [6]       `face_analysis.solve_pose(...).label()`: yaw, pitch, roll (degrees), tx,
                  ty, tz (head radii) in the crop's camera
   distance       `face_analysis.head_distance` in the crop (1 = the convention's framing)
   gaze [2]       `face_analysis.gaze` (theta, phi degrees) with the frame's head pose
   mouth_open     clip(`face_analysis.mouth_open` / MOUTH_OPEN_FULL, 0, 1): the inner-lip
                  gap over the outer eye corners' distance, 1 at SynthTalk's widest mouth
                  (a ~20 mm gap)
   blink          clip(1 - `face_analysis.eye_open` / the clip's open-eye level, 0, 1),
                  the level being the clip's EYE_OPEN_PERCENTILE-th percentile (attrs
                  "eye_open_level"): 0 open .. 1 closed
   emotion_probs  fer's 7 classes mapped to schema.EMOTIONS (`FaceAnalyzer.emotion_probs`
                  on the source frame; contempt 0); emotion [T] int32 = their argmax
   mouth_box,     `face_analysis.region_boxes` in the crop ([0, 1] crop coordinates)
   eyes_box
   =============  =========================================================================

   brow, mouth_width and mouth_round are not measured (absent; the schema allows subsets).
   The clip-level emotion offset of VASA-1 (the emotion probabilities averaged over the
   clip, `transforms.emotion_average`) is in attrs["emotion_offset"] [8]; the stage-2
   loader averages emotion_probs over each window the same way.

Identity ids (--identity): "top" (default) = the first path component under the input
root (VoxCeleb2's speaker folder id00012/...; a file directly in the root is its own
identity), "parent" = the file's folder, "file" = each file. The root is --input (a folder)
or the deepest folder holding every listed file (a list). Ids are dense over the sorted
identity keys of all inputs (dataset.json extra.preprocess.identities lists the keys); an
identity whose every clip was rejected has no clips. Split: an identity goes to "test" when
a hash of its key falls below --test_fraction (identity-disjoint, like VoxCeleb2's dev/test;
stable under resumes and added inputs), else "train".

Output layout (OUT):

  {split}-{i:05d}-of-{n:05d}.array_record + .index.json   the clips (hard links to the
      chunk files below); shard i of a split = the i-th chunk that has clips of that split
  manifest.json   per input: status (done / failed), reason + detail of a failure, source
      streams, frames, segments, clips (ids), rejected segments per reason, warnings,
      seconds; totals over all inputs
  dataset.json    DatasetInfo (source, size, labels, identities, settings, camera, label
      scaling); written last: its presence means done
  .preprocess/run.json       the settings and the input list the output was made with
  .preprocess/chunks/{k:05d}/ the records of inputs [k N, (k + 1) N) (N = --inputs_per_shard)
  .preprocess/done/{k:05d}.json   one per finished chunk: its inputs' manifest entries
  .preprocess/tmp/           chunks being written (renamed into place when complete)

Failures never stop the run: an input that cannot be read (corrupt, truncated, not a
video), has no video or no audio stream, undecodable audio, or no face, is recorded in the
manifest with that reason (`FAILURE_REASONS`) and a detail line. A truncated file (fewer
frames decoded than its header promises, or ffmpeg's "partial file") is rejected whole.

Warnings (manifest "warnings", the input is still used): audio shorter than the video by
more than TRUNCATION_SLACK_S (the rest is silence), a source below MIN_SOURCE_FPS (frames
repeated to reach 25 fps), a clip crop more than MAX_OUTSIDE of whose area lies beyond the
video's edges.

Scale-out: --workers N runs N processes on this machine (spawned; each loads its own
FaceAnalyzer, which cannot be pickled); --runner beam runs the same per-input function
(`process_input`, by chunks: `run_beam`) as an Apache Beam pipeline, DirectRunner by default,
other Beam options passed through (apache-beam lives in its own venv: requirements-beam.txt,
scripts/beam_venv.sh). A worker holds one input's frames (up to FRAME_CACHE_BYTES, else the
video is decoded twice) and its encoded clips in memory.

Stage 2 on this data: the labels lack brow / mouth_width / mouth_round, so
motion_source="labels" does not apply; run `extract_latents` (features:motion) as for any
dataset. The stage-2 loader's gaze / distance / emotion conditions come from these labels.

Resuming: --resume continues a run in OUT made with the same settings and inputs (anything
else is an error naming the differences): done chunks are skipped, the rest is redone from
scratch, so a stopped run re-run ends with the records of an uninterrupted one. The records
depend only on the inputs and the settings, not on --workers (the parent writes them in
input order).

Exit status: 0 done (also when inputs failed: see the manifest); 1 with a one-line
`error: ...` for a bad --input / --output (missing, empty, not writable, a run with other
settings); 2 for bad flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
from absl import logging

from data_pipeline import face_analysis as fa
from data_pipeline import schema
from data_pipeline import transforms as T
from vasa_jax import cli

STATE_DIR = ".preprocess"  # run.json, chunks/, done/, tmp/
RUN_FILE = "run.json"
MANIFEST = "manifest.json"
OUTPUT_VERSION = 1  # bump when the output of the same settings changes

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg",
                    ".ts", ".wmv", ".3gp", ".ogv")
IDENTITY_MODES = ("top", "parent", "file")
# The labels every clip carries (dataset.json `labels`).
WRITTEN_LABELS = ("pose", "gaze", "blink", "mouth_open", "emotion", "emotion_probs",
                  "distance", "mouth_box", "eyes_box")

# Why a whole input gives no clips (manifest "reason").
FAILURE_REASONS = ("missing", "unreadable", "no_video", "no_audio", "bad_audio", "truncated",
                   "decode_error", "no_face", "error")
# Why a segment is rejected, in the order they are checked (manifest "rejected").
REJECT_REASONS = ("too_short", "small_face", "multi_person", "dark", "blurred", "silent")

# Tracking.
TRACK_SCORE = 0.5  # mesh face-presence probability below which the track is lost
DETECT_EVERY = 5  # frames between detector runs while tracking (other faces, quality)
CUT_SHIFT = 0.25  # per-frame crop centre jump (fraction of its side) that splits a clip
CUT_SCALE = 0.25  # per-frame |log| change of the crop side that splits a clip
# Shot changes: mean absolute difference (0..255) between consecutive frames' CUT_THUMB px
# RGB thumbnails above which a new shot starts (talking heads move a few levels a frame).
CUT_DIFF = 30.0
CUT_THUMB = 32
# Multi-person: another detection at least this share of the tracked face's width ...
MULTI_FACE_SIZE = 0.5
MULTI_FACE_IOU = 0.3  # ... not overlapping it by more than this ...
MULTI_FACE_SHARE = 0.3  # ... in more than this share of the checked frames
QUALITY_SIZE = 128  # px: the face crop's side when measuring brightness and sharpness
# Labels.
MOUTH_OPEN_FULL = 0.22  # mouth_open ratio labelled 1: SynthTalk's widest opening (render.
# _lip_shape at mouth_open 1: 0.216 head radii ~ 20 mm) over ~90 mm of outer eye corners
EYE_OPEN_PERCENTILE = 90.0  # the clip's open-eye level for `blink`
# Decoding: a file decoding to fewer frames than its header's duration promises (less this
# slack) is truncated.
TRUNCATION_SLACK_S = 0.5
MIN_SOURCE_FPS = 20.0  # below: a warning (25 fps repeats frames)
MAX_OUTSIDE = 0.2  # a clip crop with more of its area beyond the video's edges: a warning
# Decoded frames kept for the second pass (instead of decoding twice) up to this many bytes.
FRAME_CACHE_BYTES = 512 * 2 ** 20


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the output depends on (besides the inputs): the CLI flags."""

    size: int = 512  # output crop side, px
    source: str = "video"  # dataset.json / record `source`, e.g. "voxceleb2"
    identity: str = "top"  # IDENTITY_MODES
    test_fraction: float = 0.0  # share of identities in the test split
    min_seconds: float = 2.0
    max_seconds: float = 20.0
    min_crop_px: float = 128.0
    min_brightness: float = 40.0
    min_sharpness: float = 20.0
    frame_format: str = "jpeg"
    jpeg_quality: int = 95
    inputs_per_shard: int = 64  # inputs per chunk (the unit of resuming and of shards)

    def __post_init__(self):
        if self.size < 16:
            raise ValueError(f"size must be >= 16, got {self.size}")
        if self.identity not in IDENTITY_MODES:
            raise ValueError(f"identity must be one of {IDENTITY_MODES}, got {self.identity!r}")
        if not 0.0 <= self.test_fraction <= 1.0:
            raise ValueError(f"test_fraction must be in [0, 1], got {self.test_fraction}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError(f"need 0 < min_seconds <= max_seconds, got {self.min_seconds}, "
                             f"{self.max_seconds}")
        if self.frame_format not in schema.FRAME_FORMATS:
            raise ValueError(f"frame_format must be one of {schema.FRAME_FORMATS}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.inputs_per_shard < 1:
            raise ValueError(f"inputs_per_shard must be >= 1, got {self.inputs_per_shard}")
        if not self.source:
            raise ValueError("source must not be empty")

    @property
    def min_frames(self) -> int:
        return max(1, math.ceil(self.min_seconds * schema.FPS - 1e-6))

    @property
    def max_frames(self) -> int:
        return max(self.min_frames, int(self.max_seconds * schema.FPS + 1e-6))


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Task:
    """One input video: its path, its name under the root, identity and split."""

    path: str  # absolute
    name: str  # relative to the input root ("/"-separated): clip ids and the manifest
    identity: str  # identity key
    identity_id: int
    split: str


def find_inputs(source: str) -> tuple[str, list[str]]:
    """--input -> (root folder, absolute video paths).

    A folder: every file with a VIDEO_EXTENSIONS suffix under it, recursively, sorted. A
    file: one path per line (relative to the list's folder; blank lines and '#' comments
    skipped; duplicates dropped, order kept). Raises FileNotFoundError (no such input) or
    ValueError (no videos).
    """
    if os.path.isdir(source):
        root = os.path.abspath(source)
        paths = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [os.path.join(folder, f) for f in files
                      if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith(".")]
        paths.sort()
        if not paths:
            raise ValueError(f"--input {source!r} holds no video files "
                             f"({', '.join(VIDEO_EXTENSIONS)})")
        return root, paths
    if not os.path.isfile(source):
        raise FileNotFoundError(f"--input {source!r}: no such folder or list file")
    base = os.path.dirname(os.path.abspath(source))
    paths, seen = [], set()
    try:
        with open(source) as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--input {source!r} is neither a folder nor a text list of "
                         "videos") from None
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        path = os.path.normpath(os.path.join(base, os.path.expanduser(line)))
        if path not in seen:
            seen.add(path)
            paths.append(path)
    if not paths:
        raise ValueError(f"--input {source!r} lists no videos")
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return root, paths


def identity_key(name: str, mode: str) -> str:
    """The identity of an input named `name` (relative to the root, "/"-separated)."""
    parts = name.split("/")
    stem = os.path.splitext(name)[0]
    if mode == "file":
        return stem
    if mode == "parent":
        return "/".join(parts[:-1]) or "."
    return parts[0] if len(parts) > 1 else stem


def is_test_identity(key: str, test_fraction: float) -> bool:
    """Whether an identity goes to the test split: a stable hash of its key below the share."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:15], 16) / float(16 ** 15)
    return h < test_fraction


def make_tasks(root: str, paths: Sequence[str], settings: Settings) -> list[Task]:
    """Tasks in input order, with dense identity ids over the sorted identity keys."""
    names = [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
    keys = [identity_key(n, settings.identity) for n in names]
    ids = {k: i for i, k in enumerate(sorted(set(keys)))}
    return [Task(p, n, k, ids[k], "test" if is_test_identity(k, settings.test_fraction)
                 else "train") for p, n, k in zip(paths, names, keys)]


# ----------------------------------------------------------------------------- decoding


class InputError(Exception):
    """An input that gives no clips: `reason` (FAILURE_REASONS) and a one-line detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What ffprobe says about a file. width / height: the decoded frames' size (display:
    rotation and pixel aspect applied). duration: seconds (0 when unknown)."""

    width: int
    height: int
    fps: float
    duration: float
    codec: str
    has_audio: bool
    video_start: float
    audio_start: float
    audio_rate: int

    def to_json(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "fps": round(self.fps, 3),
                "duration": round(self.duration, 3), "codec": self.codec,
                "audio": self.has_audio, "audio_rate": self.audio_rate}


def _last_lines(text: bytes | str, path: str = "", n: int = 2) -> str:
    """The last n lines of a tool's message, without ffmpeg's "[demuxer @ 0x...]" prefixes
    (addresses change from run to run) and with `path` shortened to its base name."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = re.sub(r"\[[^\]]* @ 0x[0-9a-fA-F]+\] ", "", text)
    if path:
        text = text.replace(path, os.path.basename(path))
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "no message"


def _float(x: Any, default: float = 0.0) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def _ratio(text: Any) -> float:
    num, _, den = str(text or "0/0").partition("/")
    return _float(num) / _float(den, 1.0) if _float(den, 1.0) else 0.0


def probe(path: str) -> MediaInfo:
    """ffprobe of the first video and audio streams. Raises InputError (unreadable, no_video)."""
    cmd = ["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise InputError("unreadable", "ffprobe timed out") from None
    try:
        meta = json.loads(proc.stdout or b"{}")
    except ValueError:
        meta = {}
    if proc.returncode != 0 or "format" not in meta:
        raise InputError("unreadable", f"ffprobe: {_last_lines(proc.stderr, path)}")
    streams = meta.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not s.get("disposition", {}).get("attached_pic")), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if video is None or not video.get("width") or not video.get("height"):
        raise InputError("no_video", "the file has no video stream")
    w, h = int(video["width"]), int(video["height"])
    sar = _ratio(video.get("sample_aspect_ratio"))
    if sar > 0 and abs(sar - 1.0) > 1e-3:  # ffmpeg's scale below makes pixels square
        w = int(round(w * sar / 2)) * 2
    rotation = 0.0
    for side in video.get("side_data_list", []) or []:
        rotation = _float(side.get("rotation"), rotation)
    rotation = _float(video.get("tags", {}).get("rotate"), rotation)
    if int(round(rotation / 90.0)) % 2:  # ffmpeg autorotates: a quarter turn swaps w, h
        w, h = h, w
    duration = _float(video.get("duration")) or _float(meta["format"].get("duration"))
    return MediaInfo(
        width=w, height=h,
        fps=_ratio(video.get("avg_frame_rate")) or _ratio(video.get("r_frame_rate")),
        duration=duration, codec=str(video.get("codec_name", "?")),
        has_audio=audio is not None,
        video_start=_float(video.get("start_time")),
        audio_start=_float(audio.get("start_time")) if audio else 0.0,
        audio_rate=int(_float(audio.get("sample_rate"))) if audio else 0)


class FrameReader:
    """The video's frames at 25 fps: iterate for uint8 [H, W, 3] RGB frames (ffmpeg).

    After the iteration, `count` is the number of frames and `error` ffmpeg's message if it
    reported one (exit status or "partial file" lines), else None. The decoder runs in one
    thread: with frame threads, how many frames of a damaged stream decode depends on the
    thread count, and the output must not depend on the machine or --workers.
    """

    def __init__(self, path: str, info: MediaInfo):
        self.path, self.info = path, info
        self.count = 0
        self.error: str | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        w, h = self.info.width, self.info.height
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-threads", "1",
               "-i", self.path, "-map", "0:v:0", "-an", "-sn",
               "-vf", f"fps={schema.FPS:g},scale={w}:{h},setsar=1",
               "-pix_fmt", "rgb24", "-f", "rawvideo", "-"]
        frame_bytes = w * h * 3
        self.count, self.error = 0, None
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            err = bytearray()
            t = threading.Thread(target=lambda: err.extend(proc.stderr.read()), daemon=True)
            t.start()
            try:
                while True:
                    buf = proc.stdout.read(frame_bytes)
                    if len(buf) < frame_bytes:
                        break
                    self.count += 1
                    yield np.frombuffer(buf, np.uint8).reshape(h, w, 3)
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                t.join()
            message = bytes(err).decode(errors="replace")
            if proc.returncode != 0 or "partial file" in message:
                self.error = _last_lines(message, self.path)

    def check_complete(self) -> None:
        """Raises InputError for a file that decoded to no frame or was cut short."""
        if self.count == 0:
            raise InputError("decode_error", f"no frame decodes: {self.error or 'empty'}")
        expected = self.info.duration * schema.FPS
        if (self.info.duration > 0
                and self.count < expected - TRUNCATION_SLACK_S * schema.FPS) or (
                self.error and "partial file" in self.error):
            raise InputError(
                "truncated", f"decoded {self.count / schema.FPS:.2f} s of "
                f"{self.info.duration:.2f} s" + (f": {self.error}" if self.error else ""))


def load_audio(path: str, info: MediaInfo) -> np.ndarray:
    """The audio track: mono float32 [N] at 16 kHz (`vasa_jax.audio.load_audio`), silence
    allowed (clips are checked one by one). Raises InputError (no_audio, bad_audio)."""
    if not info.has_audio:
        raise InputError("no_audio", "the file has no audio stream")
    from vasa_jax.audio import AudioError
    from vasa_jax.audio import load_audio as _load

    try:
        return _load(path, schema.SAMPLE_RATE, allow_silence=True)
    except AudioError as e:
        raise InputError("bad_audio", str(e).replace(path, os.path.basename(path))) from None


def audio_slice(audio: np.ndarray, offset: float, first: int, count: int) -> np.ndarray:
    """Samples under frames [first, first + count): float32 [count * 640], zeros where the
    audio does not reach. offset: the audio sample index of video time 0 (samples)."""
    per_frame = schema.SAMPLE_RATE / schema.FPS
    start = int(round(first * per_frame + offset))
    n = int(round(count * per_frame))
    out = np.zeros(n, np.float32)
    lo, hi = max(start, 0), min(start + n, len(audio))
    if hi > lo:
        out[lo - start:hi - start] = audio[lo:hi]
    return out


# ----------------------------------------------------------------------------- tracking


@dataclasses.dataclass
class FrameObs:
    """What tracking saw in one frame with a face.

    landmarks: the tracked face. crop: float64 [3] its own face crop (cx, cy, side) pixels.
    emotion: float32 [len(EMOTIONS)]. new_track: found by detection (not tracked).
    cut: the frame starts a new shot (`CUT_DIFF`).
    others: another face seen (None: the detector did not run). luma, sharpness: the face
    crop's mean luma (0..255) and variance of the Laplacian at QUALITY_SIZE px (None: not
    measured on this frame).
    """

    landmarks: fa.FaceLandmarks
    crop: np.ndarray
    emotion: np.ndarray
    new_track: bool
    cut: bool = False
    others: bool | None = None
    luma: float | None = None
    sharpness: float | None = None


def _mesh_box(lm: fa.FaceLandmarks) -> np.ndarray:
    xy = lm.mesh[:, :2]
    return np.concatenate([xy.min(0), xy.max(0)]).astype(np.float32)


def _other_face(dets: Sequence[fa.Detection], lm: fa.FaceLandmarks) -> bool:
    """Whether a detection other than the tracked face (mesh) is at least MULTI_FACE_SIZE of
    its width."""
    box = _mesh_box(lm)
    width = float(box[2] - box[0])
    for d in dets:
        if fa._iou(box, d.box[None])[0] <= MULTI_FACE_IOU and d.width >= MULTI_FACE_SIZE * width:
            return True
    return False


def face_quality(gray: np.ndarray, crop: Sequence[float]) -> tuple[float, float]:
    """(mean luma 0..255, variance of the Laplacian) of a face crop (cx, cy, side) of a
    uint8 gray image, measured at QUALITY_SIZE px (so resolution does not change the scale
    of the sharpness: a soft, upscaled face reads as blurred)."""
    cx, cy, side = (float(v) for v in crop)
    patch, _ = fa.warp_crop(gray, (cx, cy), side, 0.0, QUALITY_SIZE, border=cv2.BORDER_REPLICATE)
    return float(patch.mean()), float(cv2.Laplacian(patch, cv2.CV_64F).var())


def _landmarks(analyzer: fa.FaceAnalyzer, frame: np.ndarray,
               face: fa.Detection | fa.FaceLandmarks) -> tuple[fa.FaceLandmarks, np.ndarray] | None:
    """Landmarks and their crop box, or None when the mesh says no face (or degenerate)."""
    lm = analyzer.landmarks(frame, face)
    if lm.score < TRACK_SCORE:
        return None
    try:
        return lm, np.asarray(fa.crop_box(lm), np.float64)
    except ValueError:
        return None


def track(frames: Iterable[np.ndarray], analyzer: fa.FaceAnalyzer,
          keep: list | None = None, keep_bytes: int = FRAME_CACHE_BYTES
          ) -> list[FrameObs | None]:
    """Tracks the main face through the frames: one FrameObs per frame, None where none.

    Detection (largest face) when there is no track or a new shot starts (the frame differs
    from the previous one by more than CUT_DIFF); the mesh then follows the previous
    frame's landmarks; a mesh score below TRACK_SCORE re-detects in the same frame. Every
    DETECT_EVERY frames the detector runs anyway (other faces, crop quality). keep: if a
    list, the frames are appended to it (for `process_input`'s second pass) while they fit
    in keep_bytes; past that it is emptied and no longer filled.
    """
    obs: list[FrameObs | None] = []
    prev: fa.FaceLandmarks | None = None
    thumb_prev = None
    for k, frame in enumerate(frames):
        if keep is not None:
            keep.append(frame)
            if len(keep) * frame.nbytes > keep_bytes:
                keep.clear()
                keep = None
        thumb = cv2.resize(frame, (CUT_THUMB, CUT_THUMB), interpolation=cv2.INTER_AREA)
        thumb = thumb.astype(np.int16)
        cut = thumb_prev is not None and float(np.abs(thumb - thumb_prev).mean()) > CUT_DIFF
        thumb_prev = thumb
        if cut:
            prev = None
        check = prev is None or k % DETECT_EVERY == 0
        dets = analyzer.detect(frame) if check else None
        found, new = None, False
        if prev is not None:
            found = _landmarks(analyzer, frame, prev)
        if found is None:
            if dets is None:
                dets = analyzer.detect(frame)
            if dets:
                found, new = _landmarks(analyzer, frame, dets[0]), True
        if found is None:
            obs.append(None)
            prev = None
            continue
        lm, crop = found
        o = FrameObs(lm, crop, analyzer.emotion_probs(frame, fa.emotion_box(lm)), new, cut)
        if dets is not None:
            o.others = _other_face(dets, lm)
            gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
            o.luma, o.sharpness = face_quality(gray, crop)
        obs.append(o)
        prev = lm
    return obs


# ----------------------------------------------------------------------------- segments


def _jump(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the face crop moved like a shot change between consecutive frames."""
    shift = float(np.hypot(*(b[:2] - a[:2]))) / a[2]
    return shift > CUT_SHIFT or abs(math.log(b[2] / a[2])) > CUT_SCALE


def segments(obs: Sequence[FrameObs | None], max_frames: int) -> list[tuple[int, int]]:
    """Frame ranges [start, end) of continuous tracks: split where there is no face, a shot
    changes (`FrameObs.cut`) or the crop jumps (`_jump`), then cut into equal parts of at
    most max_frames."""
    runs, start = [], None
    for k, o in enumerate(obs):
        if o is None:
            if start is not None:
                runs.append((start, k))
            start = None
            continue
        if start is None:
            start = k
        elif o.cut or _jump(obs[k - 1].crop, o.crop):
            runs.append((start, k))
            start = k
    if start is not None:
        runs.append((start, len(obs)))
    out = []
    for a, b in runs:
        parts = math.ceil((b - a) / max_frames)
        edges = np.round(np.linspace(a, b, parts + 1)).astype(int)
        out += [(int(x), int(y)) for x, y in zip(edges[:-1], edges[1:])]
    return out


def clip_crop(obs: Sequence[FrameObs]) -> np.ndarray:
    """The clip's crop (cx, cy, side): the median of its frames' face crops. float64 [3]."""
    return np.median(np.stack([o.crop for o in obs]), axis=0)


def reject_reason(obs: Sequence[FrameObs], audio: np.ndarray, settings: Settings) -> str | None:
    """Why a segment is rejected (REJECT_REASONS, first that applies), or None."""
    from vasa_jax.audio import SILENCE_RMS

    if len(obs) < settings.min_frames:
        return "too_short"
    if clip_crop(obs)[2] < settings.min_crop_px:
        return "small_face"
    checked = [o.others for o in obs if o.others is not None]
    if checked and np.mean(checked) > MULTI_FACE_SHARE:
        return "multi_person"
    luma = [o.luma for o in obs if o.luma is not None]
    if luma and np.median(luma) < settings.min_brightness:
        return "dark"
    sharp = [o.sharpness for o in obs if o.sharpness is not None]
    if sharp and np.median(sharp) < settings.min_sharpness:
        return "blurred"
    if float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < SILENCE_RMS:
        return "silent"
    return None


# ----------------------------------------------------------------------------- labels


def to_crop(lm: fa.FaceLandmarks, crop: Sequence[float], size: int) -> fa.FaceLandmarks:
    """Landmarks in the pixel frame of the axis-aligned crop (cx, cy, side) resized to size."""
    cx, cy, side = (float(v) for v in crop)
    k = size / side
    origin = np.array([cx - side / 2, cy - side / 2], np.float64)

    def move(p: np.ndarray) -> np.ndarray:
        q = np.asarray(p, np.float64).copy()
        if q.size:
            q[..., :2] = (q[..., :2] - origin) * k
            q[..., 2:] *= k
        return q.astype(np.float32)

    return dataclasses.replace(lm, mesh=move(lm.mesh), eye_contours=move(lm.eye_contours),
                               iris=move(lm.iris), image_size=(size, size))


def clip_labels(obs: Sequence[FrameObs], crop: Sequence[float], size: int
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Per-frame labels of a clip (module docstring) -> ({name: [T, ...]}, attrs)."""
    pose, dist, gaze, mouth, eyes = [], [], [], [], []
    boxes: dict[str, list[np.ndarray]] = {name: [] for name in schema.BOX_LABELS}
    for o in obs:
        lmc = to_crop(o.landmarks, crop, size)
        est = fa.solve_pose(lmc)
        pose.append(est.label())
        dist.append(fa.head_distance(lmc))
        gaze.append(fa.gaze(lmc, est.angles))
        mouth.append(fa.mouth_open(o.landmarks))
        eyes.append(fa.eye_open(o.landmarks))
        for name, box in fa.region_boxes(o.landmarks, crop).items():
            boxes[name].append(box)
    eyes_arr = np.asarray(eyes, np.float64)
    level = float(np.percentile(eyes_arr, EYE_OPEN_PERCENTILE))
    probs = np.stack([o.emotion for o in obs]).astype(np.float32)
    labels = {
        "pose": np.stack(pose).astype(np.float32),
        "distance": np.asarray(dist, np.float32),
        "gaze": np.asarray(gaze, np.float32),
        "mouth_open": np.clip(np.asarray(mouth) / MOUTH_OPEN_FULL, 0, 1).astype(np.float32),
        "blink": np.clip(1.0 - eyes_arr / max(level, 1e-6), 0, 1).astype(np.float32),
        "emotion_probs": probs,
        "emotion": np.argmax(probs, axis=1).astype(np.int32),
        **{name: np.stack(b).astype(np.float32) for name, b in boxes.items()},
    }
    offset = T.emotion_average(labels, slice(None))
    attrs = {
        "emotion_offset": [round(float(v), 6) for v in offset],
        "eye_open_level": round(level, 6),
    }
    return labels, attrs


def _outside(crop: Sequence[float], width: int, height: int) -> float:
    """Share of the crop square's area outside the video frame."""
    cx, cy, side = (float(v) for v in crop)
    x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    inside = max(0.0, min(x1, width) - max(x0, 0)) * max(0.0, min(y1, height) - max(y0, 0))
    return 1.0 - inside / (side * side)


# ----------------------------------------------------------------------------- one input


@dataclasses.dataclass
class InputResult:
    """A processed input: its manifest entry and its records [(split, record bytes)]."""

    entry: dict[str, Any]
    records: list[tuple[str, bytes]]


_ANALYZER: fa.FaceAnalyzer | None = None


def _analyzer() -> fa.FaceAnalyzer:
    """This process's FaceAnalyzer (tflite: preprocessing needs the mesh). Also imports the
    audio loader (jax, ~2 s) so that the per-input seconds measure the work."""
    global _ANALYZER
    if _ANALYZER is None:
        import vasa_jax.audio  # noqa: F401

        _ANALYZER = fa.FaceAnalyzer(backend="tflite")
    return _ANALYZER


def _frames_at(reader_factory: Callable[[], FrameReader], cache: list | None,
               wanted: set[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, frame) of the wanted frames, from the cache or a second decode."""
    source = cache if cache is not None else reader_factory()
    last = max(wanted)
    for k, frame in enumerate(source):
        if k in wanted:
            yield k, frame
        if k >= last:
            break


def process_input(task: Task, settings: Settings) -> InputResult:
    """One video -> its manifest entry and clip records. Never raises for a bad input
    (an InputError or any other exception becomes a failed entry)."""
    start = time.perf_counter()
    entry: dict[str, Any] = {
        "input": task.name, "identity": task.identity, "identity_id": task.identity_id,
        "split": task.split, "status": "failed", "reason": None, "detail": None,
        "frames": 0, "face_frames": 0, "segments": 0, "clips": 0, "clip_frames": 0,
        "clip_ids": [], "rejected": {}, "warnings": [],
    }
    records: list[tuple[str, bytes]] = []
    try:
        if not os.path.isfile(task.path):
            raise InputError("missing", "no such file")
        info = probe(task.path)
        entry["source"] = info.to_json()
        audio = load_audio(task.path, info)
        audio_offset = (info.video_start - info.audio_start) * schema.SAMPLE_RATE
        if info.fps and info.fps < MIN_SOURCE_FPS:
            entry["warnings"].append(f"{info.fps:.1f} fps source: frames repeated to 25 fps")
        reader = FrameReader(task.path, info)
        cache: list | None = []
        obs = track(reader, _analyzer(), cache, FRAME_CACHE_BYTES)
        if len(cache) != len(obs):  # too big to keep: decoded again for the crops
            cache = None
        entry["frames"] = len(obs)
        reader.check_complete()
        covered = (len(audio) - audio_offset) / schema.SAMPLE_RATE
        if covered < len(obs) / schema.FPS - TRUNCATION_SLACK_S:
            entry["warnings"].append(f"audio covers {max(covered, 0):.2f} s of "
                                     f"{len(obs) / schema.FPS:.2f} s of video")
        entry["face_frames"] = sum(o is not None for o in obs)
        if entry["face_frames"] == 0:
            raise InputError("no_face", f"no face in any of the {len(obs)} frames")
        clips = []
        spans = segments(obs, settings.max_frames)
        entry["segments"] = len(spans)
        for a, b in spans:
            clip_audio = audio_slice(audio, audio_offset, a, b - a)
            why = reject_reason(obs[a:b], clip_audio, settings)
            if why is not None:
                entry["rejected"][why] = entry["rejected"].get(why, 0) + 1
                continue
            clips.append((a, b, clip_crop(obs[a:b]), clip_audio))
        entry["status"] = "done"
        if clips:
            records = _encode_clips(task, settings, info, obs, clips,
                                    lambda: FrameReader(task.path, info), cache, entry)
    except InputError as e:
        entry.update(status="failed", reason=e.reason, detail=e.detail)
    except Exception as e:  # a bug or an odd file: recorded, the run goes on
        logging.error("%s: %s", task.name, traceback.format_exc())
        entry.update(status="failed", reason="error", detail=f"{type(e).__name__}: {e}")
    if entry["status"] == "failed":
        entry.update(clips=0, clip_frames=0, clip_ids=[])
        records = []
    entry["rejected"] = dict(sorted(entry["rejected"].items()))
    entry["seconds"] = round(time.perf_counter() - start, 3)
    return InputResult(entry, records)


def _encode_clips(task: Task, settings: Settings, info: MediaInfo,
                  obs: Sequence[FrameObs | None], clips: list, reader_factory,
                  cache: list | None, entry: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The second pass: crops the accepted clips' frames and encodes their records."""
    size = settings.size
    owner = {k: i for i, (a, b, _, _) in enumerate(clips) for k in range(a, b)}
    frames: list[list[bytes]] = [[] for _ in clips]
    n = 0
    for k, frame in _frames_at(reader_factory, cache, set(owner)):
        i = owner[k]
        cx, cy, side = clips[i][2]
        crop, _ = fa.warp_crop(frame, (cx, cy), side, 0.0, size, border=cv2.BORDER_REPLICATE)
        frames[i].append(schema.encode_frame(crop, settings.frame_format, settings.jpeg_quality))
        n += 1
    if n != len(owner):
        raise InputError("truncated", f"the second decode gave {n} of {len(owner)} frames")
    stem = os.path.splitext(task.name)[0]
    out = []
    for (a, b, crop, audio), encoded in zip(clips, frames):
        labels, attrs = clip_labels(obs[a:b], crop, size)
        clip = schema.Clip(
            clip_id=f"{stem}@{a:06d}", identity_id=task.identity_id, frames=encoded,
            audio=audio, source=settings.source, split=task.split,
            frame_format=settings.frame_format, height=size, width=size, labels=labels,
            attrs={
                "input": task.name, "identity": task.identity, "start_frame": a,
                "start_seconds": round(a / schema.FPS, 3),
                "crop": [round(float(v), 3) for v in crop],
                "crop_outside": round(_outside(crop, info.width, info.height), 4),
                "source_size": [info.width, info.height], "source_fps": round(info.fps, 3),
                **attrs,
            })
        out.append((task.split, schema.encode_clip(clip)))
        if clip.attrs["crop_outside"] > MAX_OUTSIDE:
            entry["warnings"].append(f"{clip.clip_id}: {clip.attrs['crop_outside']:.0%} of the "
                                     "crop is beyond the video's edges (border pixels repeated)")
        entry["clip_ids"].append(clip.clip_id)
        entry["clip_frames"] += clip.num_frames
    entry["clips"] = len(out)
    return out


# ----------------------------------------------------------------------------- workers


_WORKER_SETTINGS: Settings | None = None


def _init_worker(settings: Settings) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings
    cv2.setNumThreads(1)
    logging.set_verbosity(logging.WARNING)
    _analyzer()


def _worker(task: Task) -> InputResult:
    return process_input(task, _WORKER_SETTINGS)


def _results(tasks: Sequence[Task], settings: Settings, workers: int) -> Iterator[InputResult]:
    """process_input over tasks, in task order (parallel over `workers` processes)."""
    if workers <= 1:
        for t in tasks:
            yield process_input(t, settings)
        return
    # spawn, not fork: the parent holds threads (ArrayRecord writers, BLAS, tflite).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        yield from pool.imap(_worker, tasks, chunksize=1)


# ----------------------------------------------------------------------------- output


def _output_files(out: str) -> list[str]:
    """The files of `out` this tool writes (what --overwrite deletes), but the state folder."""
    return schema.dataset_files(out, extra=(MANIFEST,))


def _clear(out: str) -> None:
    for path in _output_files(out):
        os.remove(path)
    shutil.rmtree(os.path.join(out, STATE_DIR), ignore_errors=True)


def _prepare_output(out: str, run: dict[str, Any], resume: bool, overwrite: bool) -> str:
    """Checks `out` against `run` (settings + inputs), clears it if asked; returns the
    state folder (with a clean tmp/). Raises ValueError for a run it must not touch."""
    state = os.path.join(out, STATE_DIR)
    run_path = os.path.join(state, RUN_FILE)
    if overwrite:
        if os.path.exists(run_path) or _output_files(out):
            logging.warning("--overwrite: deleting the previous output in %s", out)
        _clear(out)
    elif os.path.exists(run_path):
        with open(run_path) as f:
            old = json.load(f)
        if not resume:
            raise ValueError(f"{out!r} already holds a preprocessing run; pass --resume to "
                             "continue it, --overwrite to start over, or choose another --output")
        diffs = [k for k in sorted(set(old) | set(run)) if old.get(k) != run.get(k)]
        if diffs:
            detail = "; ".join(
                f"{k}: {old.get(k)!r} -> {run.get(k)!r}" if k != "inputs" else
                f"inputs: {len(old.get(k) or [])} -> {len(run.get(k) or [])} files"
                f" (or other files)" for k in diffs)
            raise ValueError(f"{out!r} holds a run made with other settings or inputs "
                             f"({detail}); pass --overwrite to replace it, or choose another "
                             "--output")
    elif _output_files(out):
        raise ValueError(f"{out!r} already holds a dataset that preprocess did not make (no "
                         f"{STATE_DIR}/{RUN_FILE}); pass --overwrite to replace it, or choose "
                         "another --output")
    for sub in ("done", "chunks"):
        os.makedirs(os.path.join(state, sub), exist_ok=True)
    shutil.rmtree(os.path.join(state, "tmp"), ignore_errors=True)  # a killed run's
    os.makedirs(os.path.join(state, "tmp"))
    schema.write_json_atomic(run_path, run)
    return state


def check_writable(out: str) -> None:
    """Creates `out` and writes a probe file; raises OSError naming the folder if it can't."""
    try:
        os.makedirs(out, exist_ok=True)
        probe_path = os.path.join(out, f".write_test{os.getpid()}")
        with open(probe_path, "w") as f:
            f.write("ok")
        os.remove(probe_path)
    except OSError as e:
        raise OSError(f"--output {out!r} is not writable: {e.strerror or e}") from None


def _write_chunk(state: str, k: int, results: Sequence[InputResult]) -> dict[str, Any]:
    """Writes chunk k's records (per split, in input order) and marks it done; returns its
    done/ record."""
    tmp = os.path.join(state, "tmp", f"{k:05d}")
    final = os.path.join(state, "chunks", f"{k:05d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    counts = {}
    for split in schema.SPLITS:
        recs = [r for res in results for s, r in res.records if s == split]
        if recs:
            with schema.ShardWriter(tmp, split, 1) as w:
                for r in recs:
                    w.write(r)
            counts[split] = len(recs)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    done = {"chunk": k, "records": counts, "inputs": [r.entry for r in results]}
    schema.write_json_atomic(os.path.join(state, "done", f"{k:05d}.json"), done)
    return done


def _chunk_done(state: str, k: int) -> dict[str, Any] | None:
    """The done/ record of chunk k if it and its files are complete, else None."""
    path = os.path.join(state, "done", f"{k:05d}.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    folder = os.path.join(state, "chunks", f"{k:05d}")
    for split in done.get("records", {}):
        shard = os.path.join(folder, schema.shard_name(split, 0, 1))
        if not (os.path.exists(shard) and os.path.exists(schema.shard_index_path(shard))):
            return None
    return done


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(src, dst)


def _publish_shards(out: str, state: str, dones: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Links the chunks' shards into OUT under dense names; returns split -> shard count."""
    for path in _output_files(out):
        if path.endswith((schema.SHARD_SUFFIX, schema.INDEX_SUFFIX)):
            os.remove(path)
    shards = {}
    for split in schema.SPLITS:
        chunks = [d["chunk"] for d in dones if d["records"].get(split)]
        for i, k in enumerate(chunks):
            src = os.path.join(state, "chunks", f"{k:05d}", schema.shard_name(split, 0, 1))
            dst = os.path.join(out, schema.shard_name(split, i, len(chunks)))
            _link(src, dst)
            _link(schema.shard_index_path(src), schema.shard_index_path(dst))
        if chunks:
            shards[split] = len(chunks)
    return shards


def manifest_totals(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts over the manifest entries: inputs, done / failed (by reason), segments, clips,
    frames, rejected segments by reason, processing seconds."""
    failed: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for e in entries:
        if e["status"] == "failed":
            failed[e["reason"]] = failed.get(e["reason"], 0) + 1
        for why, n in e["rejected"].items():
            rejected[why] = rejected.get(why, 0) + n
    return {
        "inputs": len(entries),
        "done": sum(e["status"] == "done" for e in entries),
        "failed": sum(e["status"] == "failed" for e in entries),
        "failed_by_reason": dict(sorted(failed.items())),
        "frames": sum(e["frames"] for e in entries),
        "face_frames": sum(e["face_frames"] for e in entries),
        "segments": sum(e["segments"] for e in entries),
        "clips": sum(e["clips"] for e in entries),
        "clip_frames": sum(e["clip_frames"] for e in entries),
        "rejected": dict(sorted(rejected.items())),
        "seconds": round(sum(e.get("seconds", 0.0) for e in entries), 3),
    }


def _dataset_info(settings: Settings, tasks: Sequence[Task], counts: dict[str, int],
                  totals: dict[str, Any]) -> schema.DatasetInfo:
    size = settings.size
    keys = sorted({t.identity for t in tasks})
    return schema.DatasetInfo(
        source=settings.source, height=size, width=size,
        num_identities=len(keys), clips=counts,
        labels=list(WRITTEN_LABELS),
        extra={
            "generator": "data_pipeline.preprocess",
            "preprocess": {
                "settings": dataclasses.asdict(settings),
                "identities": keys,
                "totals": {k: v for k, v in totals.items() if k != "seconds"},
                "manifest": MANIFEST,
            },
            "camera": {
                "framing": "face",
                "focal_px": fa.DEFAULT_FOCAL * size,
                "principal_point_px": [size / 2 - 0.5, size / 2 - 0.5],
                "crop": "median face_analysis.crop_box over the clip, fixed, axis-aligned",
            },
            "label_scaling": {
                "mouth_open": f"clip(face_analysis.mouth_open / {MOUTH_OPEN_FULL}, 0, 1)",
                "blink": f"clip(1 - face_analysis.eye_open / P{EYE_OPEN_PERCENTILE:g} of the "
                         "clip (attrs eye_open_level), 0, 1)",
                "emotion_offset": "attrs emotion_offset: emotion_probs averaged over the clip",
            },
        },
    )


# ----------------------------------------------------------------------------- the run


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="preprocess", unit="video", file=sys.stderr,
                dynamic_ncols=True, disable=not enabled)


RUNNERS = ("local", "beam")


def preprocess(input_path: str, out: str, settings: Settings = Settings(), *, workers: int = 1,
               resume: bool = False, overwrite: bool = False, progress: bool = True,
               runner: str = "local", beam_args: Sequence[str] = (),
               on_chunk_done: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Runs the preprocessing (module docstring); returns a summary dict.

    runner: "local" (`workers` processes on this machine) or "beam" (`run_beam`: an Apache
    Beam pipeline over the chunks, `beam_args` its pipeline options). on_chunk_done(k) is
    called after chunk k is written and marked done (local runner; tests interrupt a run by
    raising from it). Raises FileNotFoundError / ValueError (bad --input, an output holding
    another run) or OSError (--output not writable).
    """
    start = time.perf_counter()
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    root, paths = find_inputs(input_path)
    check_writable(out)
    tasks = make_tasks(root, paths, settings)
    run = json.loads(json.dumps({
        "version": OUTPUT_VERSION,
        "settings": dataclasses.asdict(settings),
        "root": root,
        "inputs": [t.name for t in tasks],
    }))
    state = _prepare_output(out, run, resume, overwrite)
    n = settings.inputs_per_shard
    chunks = [tasks[k:k + n] for k in range(0, len(tasks), n)]
    dones: list[dict[str, Any] | None] = [_chunk_done(state, k) for k in range(len(chunks))]
    todo = [(k, chunk) for k, chunk in enumerate(chunks) if dones[k] is None]
    skipped = sum(len(chunks[k]) for k, d in enumerate(dones) if d is not None)
    if skipped:
        logging.info("resuming: %d of %d inputs already done", skipped, len(tasks))
    if todo and runner == "local" and workers <= 1:
        _analyzer()  # fails fast (no ai-edge-litert / model files) before any work
    elif todo:
        fa.FaceAnalyzer(backend="tflite")  # the same check; workers load their own
    if runner == "beam" and todo:
        run_beam(state, todo, settings, beam_args)
        for k, _ in todo:
            dones[k] = _chunk_done(state, k)
            if dones[k] is None:
                raise RuntimeError(f"the Beam pipeline finished without writing chunk {k}")
        processed = [e for k, _ in todo for e in dones[k]["inputs"]]
    else:
        processed = _run_local(state, todo, settings, workers, dones,
                               _progress_bar(len(tasks), skipped, progress), on_chunk_done)

    entries = [e for d in dones for e in d["inputs"]]
    counts = {s: sum(d["records"].get(s, 0) for d in dones) for s in schema.SPLITS}
    counts = {s: c for s, c in counts.items() if c}
    shards = _publish_shards(out, state, dones)
    totals = manifest_totals(entries)
    schema.write_json_atomic(os.path.join(out, MANIFEST), {
        "settings": dataclasses.asdict(settings), "root": root, "totals": totals,
        "inputs": entries})
    tmp = os.path.join(state, "tmp")
    os.makedirs(tmp, exist_ok=True)
    _dataset_info(settings, tasks, counts, totals).save(tmp)  # dataset.json appears whole
    os.replace(os.path.join(tmp, schema.DATASET_INFO), os.path.join(out, schema.DATASET_INFO))
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "out": os.path.abspath(out),
        "inputs": len(tasks),
        "resumed_inputs": skipped,
        "processed_inputs": len(processed),
        "splits": counts,
        "shards": shards,
        "totals": totals,
        "this_run": totals_of(processed),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _log_failure(entry: dict[str, Any]) -> None:
    if entry["status"] == "failed":
        logging.warning("%s: %s (%s)", entry["input"], entry["reason"], entry["detail"])


def _run_local(state: str, todo: Sequence[tuple[int, list[Task]]], settings: Settings,
               workers: int, dones: list, bar, on_chunk_done) -> list[dict[str, Any]]:
    """Processes the chunks to do with `workers` processes, writing each chunk when its
    inputs are done (in input order); fills `dones`; returns the processed entries."""
    processed: list[dict[str, Any]] = []
    results = _results([t for _, chunk in todo for t in chunk], settings, workers)
    with bar:
        try:
            for k, chunk in todo:
                done = []
                for _ in chunk:
                    res = next(results)
                    done.append(res)
                    processed.append(res.entry)
                    _log_failure(res.entry)
                    bar.update(1)
                    bar.set_postfix(clips=sum(e["clips"] for e in processed), refresh=False)
                dones[k] = _write_chunk(state, k, done)
                if on_chunk_done is not None:
                    on_chunk_done(k)
        finally:
            results.close()  # stops the worker pool
    return processed


def process_chunk(element: tuple[int, list[Task]], state: str, settings: Settings) -> int:
    """Processes and writes one chunk (k, its tasks): the unit of work of `run_beam`."""
    k, chunk = element
    results = []
    for task in chunk:
        results.append(process_input(task, settings))
        _log_failure(results[-1].entry)
    _write_chunk(state, k, results)
    return k


def run_beam(state: str, todo: Sequence[tuple[int, list[Task]]], settings: Settings,
             beam_args: Sequence[str]) -> None:
    """The chunks to do as an Apache Beam pipeline: Create -> Reshuffle -> Map(process_chunk).

    Each chunk is processed and written by one worker (`process_chunk`, the same per-input
    function as the local runner; one FaceAnalyzer per worker process), so no frame goes
    through a shuffle. beam_args: pipeline options, e.g. ["--runner=DirectRunner",
    "--direct_num_workers=4", "--direct_running_mode=multi_processing"]; for Dataflow /
    Flink / Spark their own (workers then need ffmpeg, this repository and the face-model
    wheels, and --output must be a folder every worker can write: a shared mount).
    Needs apache-beam (requirements-beam.txt, its own venv: scripts/beam_venv.sh).
    """
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise ValueError("--runner beam needs apache-beam: make its venv with "
                         "`bash scripts/beam_venv.sh` (requirements-beam.txt)") from None
    options = PipelineOptions(list(beam_args))
    logging.info("Beam pipeline over %d chunks, options %s", len(todo), list(beam_args))
    with beam.Pipeline(options=options) as p:
        _ = (p
             | "chunks" >> beam.Create(list(todo))
             | "spread" >> beam.Reshuffle()
             | "process" >> beam.Map(process_chunk, state=state, settings=settings))


def totals_of(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Throughput of the inputs processed by this run: clips, frames (decoded at 25 fps)
    and the worker-seconds spent on them."""
    seconds = sum(e.get("seconds", 0.0) for e in entries)
    frames = sum(e["frames"] for e in entries)
    return {"inputs": len(entries), "clips": sum(e["clips"] for e in entries),
            "frames": frames, "worker_seconds": round(seconds, 3),
            "frames_per_worker_second": round(frames / seconds, 2) if seconds else 0.0}


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = Settings()
    p = cli.ArgumentParser(
        prog="python -m data_pipeline.preprocess",
        description="Turn talking-face videos into a clip-record dataset (25 fps face crops, "
                    "16 kHz audio, per-frame pose / distance / gaze / emotion / mouth / blink "
                    "labels); resumable, parallel.")
    p.add_argument("--input", required=True, help="folder of videos (recursive) or a text "
                   "file listing one video per line")
    p.add_argument("--output", required=True, help="output dataset folder (created)")
    p.add_argument("--size", type=int, default=d.size, help="crop side in pixels")
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument("--overwrite", action="store_true", help="delete the output's previous "
                   "run first")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--source", default=d.source, help="dataset source name, e.g. voxceleb2")
    p.add_argument("--identity", default=d.identity, choices=IDENTITY_MODES,
                   help="identity per first folder under the input (top: VoxCeleb2's "
                   "speaker id), per folder (parent) or per file")
    p.add_argument("--test_fraction", type=float, default=d.test_fraction,
                   help="share of identities in the test split (hashed, stable)")
    p.add_argument("--min_seconds", type=float, default=d.min_seconds,
                   help="shorter clips are rejected")
    p.add_argument("--max_seconds", type=float, default=d.max_seconds,
                   help="longer tracks are cut into equal clips")
    p.add_argument("--min_crop_px", type=float, default=d.min_crop_px,
                   help="smaller face crops (side, source pixels) are rejected")
    p.add_argument("--min_brightness", type=float, default=d.min_brightness,
                   help="darker face crops (mean luma, 0..255) are rejected")
    p.add_argument("--min_sharpness", type=float, default=d.min_sharpness,
                   help=f"blurrier face crops (Laplacian variance at {QUALITY_SIZE} px) are "
                   "rejected")
    p.add_argument("--frame_format", default=d.frame_format, choices=schema.FRAME_FORMATS)
    p.add_argument("--jpeg_quality", type=int, default=d.jpeg_quality)
    p.add_argument("--inputs_per_shard", type=int, default=d.inputs_per_shard,
                   help="inputs per output shard (the unit of resuming)")
    p.add_argument("--runner", default="local", choices=RUNNERS,
                   help="local: --workers processes; beam: an Apache Beam pipeline (other "
                   "flags go to Beam's PipelineOptions)")
    p.add_argument("--beam_runner", default="DirectRunner",
                   help="Beam runner for --runner beam (DirectRunner, DataflowRunner, ...)")
    args, rest = p.parse_known_args(argv)
    if rest and args.runner != "beam":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.beam_args = [f"--runner={args.beam_runner}", *rest]
    return args


def summary_lines(summary: dict[str, Any]) -> list[str]:
    t, now = summary["totals"], summary["this_run"]
    lines = [f"preprocess: {t['inputs']} inputs ({summary['resumed_inputs']} already done): "
             f"{t['done']} done, {t['failed']} failed {t['failed_by_reason'] or ''}".rstrip()]
    lines.append(f"segments: {t['segments']}, rejected {t['rejected'] or 'none'}; clips "
                 f"{summary['splits'] or 'none'}, {t['clip_frames']} frames")
    if now["inputs"]:
        lines.append(f"this run: {now['inputs']} inputs, {now['frames']} frames in "
                     f"{now['worker_seconds']:.1f} worker-s ({now['frames_per_worker_second']:.1f}"
                     " frames/s per worker)")
    lines.append(f"wrote {summary['out']} (manifest: {MANIFEST}) in {summary['seconds']:.1f} s")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    try:
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        settings = Settings(
            size=args.size, source=args.source, identity=args.identity,
            test_fraction=args.test_fraction, min_seconds=args.min_seconds,
            max_seconds=args.max_seconds, min_crop_px=args.min_crop_px,
            min_brightness=args.min_brightness, min_sharpness=args.min_sharpness,
            frame_format=args.frame_format, jpeg_quality=args.jpeg_quality,
            inputs_per_shard=args.inputs_per_shard)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not on PATH (apt-get install ffmpeg)", file=sys.stderr)
            return 1
    try:
        summary = preprocess(args.input, args.output, settings, workers=args.workers,
                             resume=args.resume, overwrite=args.overwrite,
                             progress=not args.no_progress, runner=args.runner,
                             beam_args=args.beam_args)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(summary)), flush=True)
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    sys.exit(main())
