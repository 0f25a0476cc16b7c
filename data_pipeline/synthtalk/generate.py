"""Generating SynthTalk clips and whole clip-record datasets.

Determinism: identity i is drawn from (seed, i); clip j of identity i from
SeedSequence([seed, i, j, _CLIP_STREAM]), split into independent child streams for speech
and motion. Workers only compute records; the parent writes them in task order, so the
same arguments give byte-identical shards whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import glob
import multiprocessing
import os
import sys
from typing import Iterator

import numpy as np

from data_pipeline import schema
from data_pipeline.synthtalk import render, speech, sync
from data_pipeline.synthtalk.identity import sample_identity
from data_pipeline.synthtalk.motion import MOUTH_LAG_FRAMES, generate_labels

SIZES = (64, 128, 256, 512)
_CLIP_STREAM = 0xC1


@dataclasses.dataclass(frozen=True)
class SynthTalkConfig:
    """What to generate. `supersample` 0 picks 2x for sizes <= 128 (small faces alias).
    `framing` (render.FRAMINGS): "face" frames the face like aligned talking-head crops
    (schema.FACE_CROP_HEIGHT); "portrait" is the original head-and-shoulders framing."""

    num_identities: int
    clips_per_identity: int
    seconds: float
    size: int = 64
    seed: int = 0
    test_clips_per_identity: int = 0
    frame_format: str = "jpeg"
    tts: str = "auto"  # speech.ENGINES
    supersample: int = 0
    framing: str = render.DEFAULT_FRAMING

    def __post_init__(self):
        if self.num_identities < 1 or self.clips_per_identity < 1:
            raise ValueError(
                f"need >= 1 identity and clip per identity, got {self.num_identities} x "
                f"{self.clips_per_identity}"
            )
        if not 0 <= self.test_clips_per_identity <= self.clips_per_identity:
            raise ValueError(
                f"test_clips_per_identity={self.test_clips_per_identity} must be in "
                f"[0, clips_per_identity={self.clips_per_identity}]"
            )
        if self.seconds * schema.FPS < 1:
            raise ValueError(f"seconds={self.seconds} gives no video frame at {schema.FPS} fps")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size}")
        if self.frame_format not in schema.FRAME_FORMATS:
            raise ValueError(f"frame_format must be one of {schema.FRAME_FORMATS}")
        if self.tts not in speech.ENGINES:
            raise ValueError(f"tts must be one of {speech.ENGINES}, got {self.tts!r}")
        if self.tts == "espeak" and not speech.espeak_available():
            raise ValueError("tts='espeak' but espeak-ng is not on PATH")
        if self.supersample < 0:
            raise ValueError(f"supersample must be >= 0, got {self.supersample}")
        if self.framing not in render.FRAMINGS:
            raise ValueError(
                f"framing must be one of {tuple(render.FRAMINGS)}, got {self.framing!r}"
            )

    @property
    def num_frames(self) -> int:
        return int(round(self.seconds * schema.FPS))

    @property
    def num_samples(self) -> int:
        return int(round(self.num_frames / schema.FPS * schema.SAMPLE_RATE))

    @property
    def render_supersample(self) -> int:
        return self.supersample or (2 if self.size <= 128 else 1)

    @property
    def tts_engine(self) -> str:
        if self.tts == "auto":
            return "espeak" if speech.espeak_available() else "formant"
        return self.tts

    def split(self, clip_index: int) -> str:
        """The last `test_clips_per_identity` clips of every identity are "test"."""
        test_from = self.clips_per_identity - self.test_clips_per_identity
        return "test" if clip_index >= test_from else "train"


def make_clip(cfg: SynthTalkConfig, identity: int, clip_index: int) -> schema.Clip:
    """Clip `clip_index` of identity `identity` (a pure function of cfg and both indices)."""
    ident = sample_identity(cfg.seed, identity)
    seq = np.random.SeedSequence([cfg.seed, identity, clip_index, _CLIP_STREAM])
    speech_seq, motion_seq = seq.spawn(2)
    audio, speech_attrs = speech.synthesize_speech(
        np.random.default_rng(speech_seq),
        ident,
        cfg.num_samples / schema.SAMPLE_RATE,
        cfg.tts_engine,
    )
    # Labels are computed from the audio as stored (int16), which is what users will read.
    stored = schema.audio_to_pcm16(audio).astype(np.float32) / 32767.0
    labels, motion_attrs = generate_labels(motion_seq, ident, stored, cfg.num_frames)
    renderer = render.HeadRenderer(ident, cfg.size, cfg.render_supersample, cfg.framing)
    frames = []
    boxes = {name: [] for name in schema.BOX_LABELS}
    for t in range(cfg.num_frames):
        frame = {k: v[t] for k, v in labels.items()}
        frames.append(schema.encode_frame(renderer.render(frame), cfg.frame_format))
        for name, box in renderer.boxes(frame).items():
            boxes[name].append(box)
    labels.update({name: np.stack(b).astype(np.float32) for name, b in boxes.items()})
    return schema.Clip(
        clip_id=f"synthtalk-s{cfg.seed}-id{identity:05d}-c{clip_index:03d}",
        identity_id=identity,
        frames=frames,
        audio=stored,
        source="synthtalk",
        split=cfg.split(clip_index),
        frame_format=cfg.frame_format,
        height=cfg.size,
        width=cfg.size,
        labels=labels,
        attrs={
            **speech_attrs,
            **motion_attrs,
            "seed": cfg.seed,
            "clip_index": clip_index,
            "identity": ident.to_attrs(),
        },
    )


def _clip_task(args: tuple[SynthTalkConfig, int, int]):
    """Worker entry point: -> (split, record bytes, mouth_open [T], frame RMS [T])."""
    cfg, identity, clip_index = args
    clip = make_clip(cfg, identity, clip_index)
    env = sync.frame_rms(clip.audio, clip.num_frames)
    return clip.split, schema.encode_clip(clip), clip.labels["mouth_open"], env


def _records(cfg: SynthTalkConfig, workers: int) -> Iterator:
    tasks = [(cfg, i, j) for i in range(cfg.num_identities) for j in range(cfg.clips_per_identity)]
    if workers <= 1:
        yield from map(_clip_task, tasks)
        return
    # spawn, not fork: the parent may hold threads (ArrayRecord writers, BLAS).
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_clip_task, tasks, chunksize=1)  # imap keeps task order


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def generate_dataset(
    cfg: SynthTalkConfig,
    out_dir: str,
    workers: int | None = None,
    num_shards: int = 1,
    preview: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> schema.DatasetInfo:
    """Writes the corpus to `out_dir` (shards + dataset.json [+ preview.mp4]).

    An existing dataset in `out_dir` is an error unless `overwrite` (then its shards,
    sidecars, dataset.json and preview are deleted first: stale shards would otherwise be
    read together with the new ones). Returns the DatasetInfo; its `extra` holds the
    generator arguments, the camera and the measured mouth-audio correlation
    (sync.mouth_audio_correlation).
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    _clear_output(out_dir, overwrite)
    workers = default_workers() if workers is None else workers
    counts = {"train": 0, "test": 0}
    for j in range(cfg.clips_per_identity):
        counts[cfg.split(j)] += cfg.num_identities
    os.makedirs(out_dir, exist_ok=True)
    writers = {
        s: schema.ShardWriter(out_dir, s, min(num_shards, c)) for s, c in counts.items() if c
    }
    preview_ids = _preview_indices(cfg) if preview else set()
    preview_records = {}
    sync_acc = sync.SyncAccumulator()
    total = cfg.num_identities * cfg.clips_per_identity
    try:
        from tqdm import tqdm

        bar = tqdm(
            total=total, desc="synthtalk", unit="clip", disable=not progress, file=sys.stderr
        )
        for k, (split, record, mouth, env) in enumerate(_records(cfg, workers)):
            writers[split].write(record)
            sync_acc.add(mouth, env)
            if k in preview_ids:
                preview_records[k] = record
            bar.update(1)
        bar.close()
    finally:
        for w in writers.values():
            w.close()
    r, lag = sync_acc.result()
    info = schema.DatasetInfo(
        source="synthtalk",
        height=cfg.size,
        width=cfg.size,
        num_identities=cfg.num_identities,
        clips={s: c for s, c in counts.items() if c},
        labels=list(schema.LABELS) + list(schema.BOX_LABELS),
        extra={
            "generator": "data_pipeline.synthtalk",
            "args": dataclasses.asdict(cfg),
            "tts": cfg.tts_engine,
            "supersample": cfg.render_supersample,
            "camera": {
                "framing": cfg.framing,
                "focal_px": render.focal_length(cfg.size, cfg.framing),
                "principal_point_px": list(render.principal_point(cfg.size, cfg.framing)),
                "nominal_distance": render.NOMINAL_DISTANCE,
                "half_extent": render.FRAMINGS[cfg.framing].half_extent,
                "center_y": render.FRAMINGS[cfg.framing].center_y,
                "rotation": "R = Ry(yaw) Rx(pitch) Rz(roll), head-local -> camera",
            },
            "mouth_lag_frames": MOUTH_LAG_FRAMES,
            "mouth_audio_r": round(r, 4),
            "mouth_audio_best_lag": lag,
        },
    )
    info.save(out_dir)
    if preview:
        clips = [schema.decode_clip(preview_records[k]) for k in sorted(preview_records)]
        write_preview(os.path.join(out_dir, "preview.mp4"), clips)
    return info


def _clear_output(out_dir: str, overwrite: bool) -> None:
    patterns = [
        schema.DATASET_INFO,
        "preview.mp4",
        f"*{schema.SHARD_SUFFIX}",
        f"*{schema.INDEX_SUFFIX}",
    ]
    existing = sorted({p for pat in patterns for p in glob.glob(os.path.join(out_dir, pat))})
    if not existing:
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_dir!r} already holds a dataset ({len(existing)} files, e.g. "
            f"{os.path.basename(existing[0])}); pass overwrite=True (--overwrite) to replace it"
        )
    for path in existing:
        os.remove(path)


def _preview_indices(cfg: SynthTalkConfig, max_clips: int = 9) -> set[int]:
    """Task indices shown in the preview: first clips of different identities first."""
    order = sorted(
        range(cfg.num_identities * cfg.clips_per_identity),
        key=lambda k: (k % cfg.clips_per_identity, k // cfg.clips_per_identity),
    )
    return set(order[:max_clips])


def write_preview(path: str, clips: list[schema.Clip]) -> None:
    """A grid video of `clips` (cols = ceil(sqrt(n))) with the first clip's audio; tiles
    smaller than 128 px are enlarged by an integer factor."""
    from vasa_jax.video import make_grid, write_video

    if not clips:
        raise ValueError("no clips to preview")
    t = min(c.num_frames for c in clips)
    videos = np.stack([c.decode_frames(range(t)) for c in clips])
    # Small clips are enlarged (nearest neighbour) so the preview is watchable.
    scale = max(1, int(np.ceil(128 / videos.shape[2])))
    videos = videos.repeat(scale, axis=2).repeat(scale, axis=3)
    grid = make_grid(videos, cols=int(np.ceil(np.sqrt(len(clips)))))
    audio = clips[0].audio[: int(round(t / clips[0].fps * clips[0].sample_rate))]
    write_video(path, grid, clips[0].fps, audio=audio, sample_rate=clips[0].sample_rate)
