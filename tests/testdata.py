"""Tiny procedural clip-record datasets for tests (and the loader benchmark).

Not SynthTalk: no 3D face, no speech. What it guarantees is what tests need to check:

- frames: a background in the identity's colour, a skin ellipse moved by the head pose, two
  eyes (closed when blinking) and a dark mouth whose height follows ``mouth_open``, over a
  per-clip noise texture (so JPEG has something to code);
- audio: a harmonic tone (pitch per identity) plus noise under a syllable-like envelope
  (~4 bumps/s with pauses);
- labels: every `schema.LABELS` entry; ``mouth_open[t]`` is the audio envelope averaged over
  frame t (normalised to [0, 1]), so the mouth-audio correlation is ~1, unless
  ``mouth="random"`` (independent of the audio) or ``mouth_lag`` shifts it;
  ``gaze`` mostly looks at ``clip.attrs["main_gaze"]`` with short glances elsewhere;
- features (optional): ``features[name][t, d] = t + 0.01 * d`` so that window alignment can
  be checked exactly.

Corrupt records for robustness tests: `GARBAGE_RECORD`, `bad_frame_record`,
`inconsistent_record`.
"""

from __future__ import annotations

import colorsys
import zlib
from typing import Sequence

import cv2
import jax
import jax.numpy as jnp
import msgpack
import numpy as np

from data_pipeline import schema

GARBAGE_RECORD = b"\xc1 not a msgpack record"  # 0xc1 is never valid msgpack


def _smooth_noise(rng: np.random.Generator, n: int, knots: int) -> np.ndarray:
    """Smooth random curve in [0, 1]: [n]."""
    values = rng.uniform(0.0, 1.0, knots + 1)
    return np.interp(np.linspace(0, knots, n), np.arange(knots + 1), values).astype(np.float32)


def speech_like_audio(
    num_samples: int, sample_rate: int, pitch_hz: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(audio float32 [N] in [-1, 1], envelope float32 [N] in [0, 1])."""
    t = np.arange(num_samples) / sample_rate
    envelope = np.zeros(num_samples, np.float64)
    pos = int(rng.uniform(0.0, 0.15) * sample_rate)
    while pos < num_samples:
        length = int(rng.uniform(0.12, 0.25) * sample_rate)
        seg = np.hanning(length) * rng.uniform(0.35, 1.0)
        end = min(pos + length, num_samples)
        envelope[pos:end] = np.maximum(envelope[pos:end], seg[: end - pos])
        # Mostly back-to-back syllables, sometimes a pause.
        gap = rng.uniform(0.0, 0.05) if rng.uniform() < 0.8 else rng.uniform(0.2, 0.4)
        pos += int(length * 0.8 + gap * sample_rate)
    carrier = (
        0.6 * np.sin(2 * np.pi * pitch_hz * t)
        + 0.3 * np.sin(2 * np.pi * 2 * pitch_hz * t + 0.5)
        + 0.1 * rng.standard_normal(num_samples)
    )
    audio = 0.8 * envelope * carrier
    return audio.astype(np.float32), envelope.astype(np.float32)


def _frame_means(x: np.ndarray, num_frames: int, sample_rate: int, fps: float) -> np.ndarray:
    bounds = np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(int)
    return np.array([x[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])], np.float32)


def _labels(
    rng: np.random.Generator, num_frames: int, envelope: np.ndarray, sample_rate: int,
    fps: float, mouth: str, mouth_lag: int,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All schema.LABELS for one clip, and the clip's main gaze direction [2]."""
    T = num_frames
    t = np.arange(T) / fps
    pose = np.zeros((T, 6), np.float32)
    for k, amp in enumerate((15.0, 8.0, 5.0)):  # yaw, pitch, roll in degrees
        f1, f2 = rng.uniform(0.1, 0.4), rng.uniform(0.5, 1.2)
        pose[:, k] = amp * (0.7 * np.sin(2 * np.pi * f1 * t + rng.uniform(0, 6.3))
                            + 0.3 * np.sin(2 * np.pi * f2 * t + rng.uniform(0, 6.3)))
    pose[:, 3] = 0.1 * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * t)  # tx
    pose[:, 4] = 0.1 * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * t)  # ty
    pose[:, 5] = 10.0 + 0.3 * (_smooth_noise(rng, T, 2) - 0.5)  # tz, head radii

    main_gaze = rng.uniform(-10.0, 10.0, 2).astype(np.float32)
    gaze = np.tile(main_gaze, (T, 1)) + rng.normal(0.0, 1.0, (T, 2)).astype(np.float32)
    for _ in range(max(1, T // 60)):  # short glances away (< 20% of frames)
        start, length = int(rng.integers(0, T)), int(rng.integers(3, 8))
        gaze[start : start + length] = rng.uniform(-25.0, 25.0, 2)

    blink = np.zeros(T, np.float32)
    for start in range(int(rng.integers(0, 40)), T, int(rng.integers(50, 90))):
        blink[start : start + 4] = (0.5, 1.0, 1.0, 0.5)[: len(blink[start : start + 4])]

    if mouth == "follow":
        mouth_open = _frame_means(envelope, T, sample_rate, fps)
        mouth_open = mouth_open / max(float(mouth_open.max()), 1e-6)
        if mouth_lag:  # mouth_open[t] = envelope at frame t - lag (mouth trails the audio)
            mouth_open = np.roll(mouth_open, mouth_lag)
    elif mouth == "random":
        mouth_open = _smooth_noise(rng, T, max(2, T // 6))
    else:
        raise ValueError(f"mouth must be 'follow' or 'random', got {mouth!r}")

    emotion = int(rng.integers(0, len(schema.EMOTIONS)))
    probs = np.full(len(schema.EMOTIONS), 0.3 / (len(schema.EMOTIONS) - 1), np.float32)
    probs[emotion] = 0.7
    labels = {
        "pose": pose,
        "gaze": gaze.astype(np.float32),
        "blink": blink,
        "brow": _smooth_noise(rng, T, max(2, T // 25)),
        "mouth_open": mouth_open.astype(np.float32),
        "mouth_width": _smooth_noise(rng, T, max(2, T // 10)),
        "mouth_round": _smooth_noise(rng, T, max(2, T // 10)),
        "emotion": np.full(T, emotion, np.int32),
        "emotion_probs": np.tile(probs, (T, 1)),
        "distance": (pose[:, 5] / 10.0).astype(np.float32),
    }
    return labels, main_gaze


def _draw_frame(
    size: int, background: tuple[int, int, int], texture: np.ndarray, pose: np.ndarray,
    blink: float, mouth_open: float,
) -> np.ndarray:
    img = np.empty((size, size, 3), np.uint8)
    img[:] = background
    img = cv2.add(img, texture)
    s = size / 64.0  # drawing is designed at 64 px
    cx = size / 2 + pose[0] / 15.0 * 6 * s  # yaw moves the face sideways
    cy = size / 2 - pose[1] / 8.0 * 4 * s  # pitch moves it up/down
    c = lambda x, y: (int(round(cx + x * s)), int(round(cy + y * s)))  # noqa: E731
    cv2.ellipse(img, c(0, 0), (int(18 * s), int(24 * s)), float(pose[2]), 0, 360,
                (224, 180, 150), -1)
    eye_h = max(1, int(round(3 * s * (1.0 - blink))))
    for x in (-7, 7):
        cv2.ellipse(img, c(x, -6), (int(3 * s), eye_h), 0, 0, 360, (40, 30, 30), -1)
    half_h = max(1, int(round((1 + 7 * mouth_open) * s)))
    x0, y0 = c(-7, 11)
    x1, _ = c(7, 11)
    cv2.rectangle(img, (x0, y0 - half_h), (x1, y0 + half_h), (90, 20, 30), -1)
    return img


def _boxes(size: int, pose: np.ndarray, mouth_open: float) -> dict[str, np.ndarray]:
    """mouth_box / eyes_box (schema.BOX_LABELS) of what `_draw_frame` draws, roll ignored."""
    s = size / 64.0
    cx, cy = size / 2 + pose[0] / 15.0 * 6 * s, size / 2 - pose[1] / 8.0 * 4 * s
    half_h = max(1, int(round((1 + 7 * mouth_open) * s)))
    mouth = (cx - 7 * s, cy + 11 * s - half_h, cx + 7 * s + 1, cy + 11 * s + half_h + 1)
    eyes = (cx - 10 * s, cy - 9 * s, cx + 10 * s + 1, cy - 3 * s + 1)
    return {name: np.clip(np.asarray(box, np.float32) / size, 0.0, 1.0)
            for name, box in (("mouth_box", mouth), ("eyes_box", eyes))}


def identity_color(identity_id: int) -> tuple[int, int, int]:
    """The background colour of an identity, uint8 RGB."""
    r, g, b = colorsys.hsv_to_rgb((identity_id * 0.618034) % 1.0, 0.7, 0.8)
    return int(r * 255), int(g * 255), int(b * 255)


def make_clip(
    clip_id: str,
    identity_id: int,
    *,
    num_frames: int = 50,
    size: int = 32,
    seed: int = 0,
    split: str = "train",
    fps: float = schema.FPS,
    sample_rate: int = schema.SAMPLE_RATE,
    labels: bool | Sequence[str] = True,
    mouth: str = "follow",
    mouth_lag: int = 0,
    features: dict[str, int] | None = None,
    frame_format: str = "jpeg",
) -> schema.Clip:
    """One procedural clip. `labels`: True (all schema.LABELS), False (none) or the names to
    keep (schema.BOX_LABELS too)."""
    rng = np.random.default_rng([seed, identity_id, zlib.crc32(clip_id.encode())])
    num_samples = int(round(num_frames / fps * sample_rate))
    audio, envelope = speech_like_audio(num_samples, sample_rate, 110.0 + 15 * identity_id, rng)
    all_labels, main_gaze = _labels(rng, num_frames, envelope, sample_rate, fps, mouth, mouth_lag)
    texture = rng.integers(0, 24, (size, size, 3), dtype=np.uint8)
    background = identity_color(identity_id)
    frames = [
        schema.encode_frame(
            _draw_frame(size, background, texture, all_labels["pose"][t],
                        all_labels["blink"][t], all_labels["mouth_open"][t]),
            frame_format,
        )
        for t in range(num_frames)
    ]
    for name in schema.BOX_LABELS:  # only kept when asked for by name
        all_labels[name] = np.stack([
            _boxes(size, all_labels["pose"][t], all_labels["mouth_open"][t])[name]
            for t in range(num_frames)])
    if labels is True:
        keep = [k for k in all_labels if k not in schema.BOX_LABELS]
    elif labels is False:
        keep = []
    else:
        keep = list(labels)
    feats = {
        name: (np.arange(num_frames, dtype=np.float32)[:, None]
               + 0.01 * np.arange(dim, dtype=np.float32)[None, :])
        for name, dim in (features or {}).items()
    }
    return schema.Clip(
        clip_id=clip_id,
        identity_id=identity_id,
        frames=frames,
        audio=audio,
        source="testdata",
        split=split,
        fps=fps,
        sample_rate=sample_rate,
        frame_format=frame_format,
        height=size,
        width=size,
        labels={k: all_labels[k] for k in keep},
        features=feats,
        attrs={"main_gaze": [float(g) for g in main_gaze]},
    )


def make_dataset(
    directory: str,
    *,
    identities: int = 4,
    clips_per_identity: int = 2,
    seconds: float | Sequence[float] = 2.0,
    size: int = 32,
    num_shards: int = 2,
    test_clips_per_identity: int = 0,
    seed: int = 0,
    extra_records: Sequence[bytes] = (),
    **clip_kwargs,
) -> list[schema.Clip]:
    """Writes a dataset folder (shards + sidecar indices + dataset.json); returns its clips.

    `seconds` may be a sequence, cycled over the clips (for datasets with short clips).
    `extra_records` are raw bytes appended to the train split (corrupt-record tests).
    Other keyword arguments go to `make_clip`.
    """
    lengths = [seconds] if np.isscalar(seconds) else list(seconds)
    fps = clip_kwargs.get("fps", schema.FPS)
    clips = []
    for split, per_identity in (("train", clips_per_identity), ("test", test_clips_per_identity)):
        for ident in range(identities):
            for k in range(per_identity):
                n = len(clips)
                clips.append(make_clip(
                    f"{split}-id{ident:03d}-{k:02d}", ident, split=split, seed=seed + n,
                    num_frames=int(round(lengths[n % len(lengths)] * fps)), size=size,
                    **clip_kwargs,
                ))
    for split in schema.SPLITS:
        records = [schema.encode_clip(c) for c in clips if c.split == split]
        if split == "train":
            records += list(extra_records)
        if records:
            with schema.ShardWriter(directory, split, min(num_shards, len(records))) as w:
                for r in records:
                    w.write(r)
    first = clips[0]
    schema.DatasetInfo(
        source="testdata",
        height=size,
        width=size,
        fps=first.fps,
        sample_rate=first.sample_rate,
        num_identities=identities,
        clips={s: sum(c.split == s for c in clips) for s in schema.SPLITS
               if any(c.split == s for c in clips)},
        labels=sorted(first.labels),
        features={k: list(v.shape[1:]) for k, v in first.features.items()},
    ).save(directory)
    return clips


def bad_frame_record(clip: schema.Clip, frame: int = 1) -> bytes:
    """A well-formed record whose `frame`-th image bytes do not decode."""
    frames = list(clip.frames)
    frames[frame] = b"definitely not a jpeg"
    bad = schema.Clip(**{**clip.__dict__, "frames": frames, "clip_id": clip.clip_id + "-badframe"})
    return schema.encode_clip(bad)


def inconsistent_record(clip: schema.Clip) -> bytes:
    """A record with 3 frames fewer than its audio (and labels): fails `validate_clip`."""
    rec = msgpack.unpackb(schema.encode_clip(clip), raw=False)
    rec["frames"] = rec["frames"][:-3]
    rec["clip_id"] = clip.clip_id + "-inconsistent"
    return msgpack.packb(rec, use_bin_type=True)


def filled_state(abstract, seed=0):
    """Concrete values for an abstract train state, placed with its shardings.

    Fan-in-scaled normal kernels, unit norm scales, zero biases, zero counters and keys:
    the structure the trainer checkpoints without compiling its initialiser (which takes
    ~40 s on a 2-core CPU), and an untrained-looking generator with finite outputs.
    """
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = str(getattr(path[-2], "key", "")) if len(path) > 1 else ""
        if not jnp.issubdtype(x.dtype, jnp.floating):
            value = np.zeros(x.shape, x.dtype)
        elif name == "kernel":
            value = rng.normal(0, 1 / np.sqrt(np.prod(x.shape[:-1])), x.shape)
        elif name == "scale":
            value = np.ones(x.shape)
        elif name == "bias":
            value = np.zeros(x.shape)
        else:
            value = rng.normal(0, 0.1, x.shape)
        return jax.device_put(np.asarray(value, x.dtype), x.sharding)

    return jax.tree_util.tree_map_with_path(fill, abstract)
