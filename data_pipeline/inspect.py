"""Summarise and verify a clip-record dataset.

    python -m data_pipeline.inspect DIR [--split train] [--check]

Prints, per split: clip count, identities, total frames, audio seconds, frame size, label
ranges (min / mean / max per label dimension) and feature shapes. Reads every record
(frames stay encoded unless --check).

--check also decodes every frame and verifies each record: it decodes, its frames decode to
the size in dataset.json, its split / fps / sample rate match, its labels and features are
finite. Then it measures lip sync of the ground truth: Pearson r between `mouth_open` and
the audio RMS envelope per video frame (frame t covers samples [t*sr/fps, (t+1)*sr/fps)),
pooled over all clips, at the best lag within +-3 frames. The last line printed is
``mouth-audio correlation: X``. Damaged shard files (truncated, corrupted chunks) are
listed with the broken records. Exit status 1 if a record is broken, r < 0.6 or no clip
has mouth_open labels; 2 if DIR is not a dataset.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import sys
from typing import Sequence

import numpy as np

from data_pipeline import schema
from data_pipeline import transforms
from vasa_jax import cli

MIN_MOUTH_AUDIO_R = 0.6
MAX_LAG = 3  # frames
MAX_BROKEN_LISTED = 20


@dataclasses.dataclass
class _Range:
    """Streaming min / mean / max per label dimension."""

    lo: np.ndarray
    hi: np.ndarray
    total: np.ndarray
    count: int = 0

    @classmethod
    def of(cls, x: np.ndarray) -> "_Range":
        x = x.reshape(len(x), -1).astype(np.float64)
        return cls(x.min(0), x.max(0), x.sum(0), len(x))

    def add(self, x: np.ndarray) -> None:
        x = x.reshape(len(x), -1).astype(np.float64)
        if x.shape[1] != self.lo.shape[0]:
            raise ValueError(f"label dimension changed: {x.shape[1]} vs {self.lo.shape[0]}")
        self.lo = np.minimum(self.lo, x.min(0))
        self.hi = np.maximum(self.hi, x.max(0))
        self.total += x.sum(0)
        self.count += len(x)


@dataclasses.dataclass
class _SplitStats:
    shards: int = 0
    records: int = 0
    clips: int = 0
    identities: set = dataclasses.field(default_factory=set)
    frames: int = 0
    audio_seconds: float = 0.0
    sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    labels: dict = dataclasses.field(default_factory=dict)  # name -> _Range
    label_clips: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    features: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def _dim_names(name: str, dims: int) -> list[str]:
    if name == "pose" and dims == len(schema.POSE_NAMES):
        return [f"pose.{n}" for n in schema.POSE_NAMES]
    if name == "gaze" and dims == 2:
        return ["gaze.theta", "gaze.phi"]
    if name == "emotion_probs" and dims == len(schema.EMOTIONS):
        return [f"emotion_probs.{e}" for e in schema.EMOTIONS]
    return [name] if dims == 1 else [f"{name}[{i}]" for i in range(dims)]


def _verify(clip: schema.Clip, info: schema.DatasetInfo, split: str) -> None:
    """Raises CorruptRecordError for anything --check rejects (beyond decode_clip's checks)."""
    if clip.split != split:
        raise schema.CorruptRecordError(f"record says split {clip.split!r} in a {split!r} shard")
    if (clip.height, clip.width) != (info.height, info.width):
        raise schema.CorruptRecordError(
            f"frame size {clip.height}x{clip.width}, dataset.json says {info.height}x{info.width}")
    if abs(clip.fps - info.fps) > 1e-6 or clip.sample_rate != info.sample_rate:
        raise schema.CorruptRecordError(
            f"{clip.fps} fps / {clip.sample_rate} Hz, dataset.json says "
            f"{info.fps} fps / {info.sample_rate} Hz")
    for t, data in enumerate(clip.frames):
        try:
            frame = schema.decode_frame(data)
        except schema.CorruptRecordError as e:
            raise schema.CorruptRecordError(f"frame {t}: {e}") from None
        if frame.shape != (info.height, info.width, 3):
            raise schema.CorruptRecordError(
                f"frame {t} decodes to {frame.shape}, expected {(info.height, info.width, 3)}")
    for kind, arrays in (("label", clip.labels), ("feature", clip.features)):
        for name, x in arrays.items():
            if np.issubdtype(x.dtype, np.number) and not np.all(np.isfinite(x)):
                raise schema.CorruptRecordError(f"{kind} {name} has non-finite values")


def _print_split(split: str, s: _SplitStats) -> None:
    sizes = ", ".join(f"{h}x{w}" + (f" ({n} clips)" if len(s.sizes) > 1 else "")
                      for (h, w), n in sorted(s.sizes.items())) or "-"
    print(f"split {split}: {s.clips} clips in {s.shards} shard(s)"
          + (f" ({s.records - s.clips} unreadable records)" if s.records != s.clips else ""))
    print(f"  identities: {len(s.identities)}")
    print(f"  frames: {s.frames} ({s.frames / max(s.clips, 1):.1f} per clip)")
    print(f"  audio: {s.audio_seconds:.1f} s")
    print(f"  frame size: {sizes}")
    if s.labels:
        print("  labels (min / mean / max):" + "".join(
            f" {n} in {s.label_clips[n]} clips;" for n in sorted(s.labels)
            if s.label_clips[n] != s.clips))
        for name in sorted(s.labels):
            r = s.labels[name]
            for d, dim in enumerate(_dim_names(name, len(r.lo))):
                print(f"    {dim:26s} {r.lo[d]:10.4g} {r.total[d] / r.count:10.4g} "
                      f"{r.hi[d]:10.4g}")
    else:
        print("  labels: none")
    if s.features:
        for (name, shape), n in sorted(s.features.items()):
            print(f"  feature {name}: [T, {', '.join(map(str, shape))}] in {n} clips")
    else:
        print("  features: none")


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m data_pipeline.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="clip-record dataset folder")
    parser.add_argument("--split", choices=schema.SPLITS, help="only this split")
    parser.add_argument("--check", action="store_true",
                        help="decode and verify every record; measure mouth-audio sync")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    try:
        info = schema.DatasetInfo.load(args.directory)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = [args.split] if args.split else list(schema.SPLITS)
    shards = {}
    for split in splits:
        try:
            shards[split] = schema.list_shards(args.directory, split)
        except FileNotFoundError:
            if args.split:
                print(f"error: no {split!r} shards in {args.directory!r}", file=sys.stderr)
                return 2
    if not shards:
        print(f"error: no shards in {args.directory!r}", file=sys.stderr)
        return 2

    print(f"dataset {args.directory}: source {info.source}, {info.height}x{info.width}, "
          f"{info.fps:g} fps, {info.sample_rate} Hz, format v{info.version}; dataset.json "
          f"declares clips {info.clips}, {info.num_identities} identities, "
          f"labels {info.labels or 'none'}, features {info.features or 'none'}")

    broken: list[str] = []
    mouths, envelopes = [], []
    stats = {}
    for split, paths in shards.items():
        s = stats[split] = _SplitStats(shards=len(paths))
        sources = [schema.read_records([p]) for p in paths]
        for src in sources:
            for path, reason in src.broken.items():  # cannot be opened: no record counted
                broken.append(f"{os.path.basename(path)}: damaged shard, not read ({reason})")
        with tqdm(total=sum(len(src) for src in sources), desc=f"{split} records",
                  unit="rec", disable=args.no_progress, file=sys.stderr) as bar:
            for path, src in zip(paths, sources):
                for i in range(len(src)):
                    bar.update(1)
                    s.records += 1
                    where = f"{os.path.basename(path)}[{i}]"
                    try:
                        clip = schema.decode_clip(src[i])
                        if args.check:
                            _verify(clip, info, split)
                    except schema.CorruptRecordError as e:
                        broken.append(f"{where}: {e}")
                        continue
                    s.clips += 1
                    s.identities.add(clip.identity_id)
                    s.frames += clip.num_frames
                    s.audio_seconds += len(clip.audio) / clip.sample_rate
                    s.sizes[(clip.height, clip.width)] += 1
                    for name, x in clip.labels.items():
                        s.label_clips[name] += 1
                        if name in s.labels:
                            s.labels[name].add(x)
                        else:
                            s.labels[name] = _Range.of(x)
                    for name, x in clip.features.items():
                        s.features[(name, tuple(x.shape[1:]))] += 1
                    if args.check and "mouth_open" in clip.labels:
                        mouths.append(clip.labels["mouth_open"])
                        envelopes.append(transforms.audio_frame_rms(
                            clip.audio, clip.sample_rate, clip.fps, clip.num_frames))

    for split, s in stats.items():
        _print_split(split, s)
    if broken:
        print(f"{len(broken)} broken record(s):")
        for line in broken[:MAX_BROKEN_LISTED]:
            print(f"  {line}")
        if len(broken) > MAX_BROKEN_LISTED:
            print(f"  ... and {len(broken) - MAX_BROKEN_LISTED} more")
    if not args.check:
        if broken:
            print("run with --check to verify every frame as well")
        return 0

    failures = []
    if broken:
        failures.append(f"{len(broken)} broken record(s)")
    if mouths:
        r, lag, per_lag = transforms.lagged_correlation(mouths, envelopes, MAX_LAG)
        print("mouth-audio r by lag (frames; + = audio after mouth): " + ", ".join(
            f"{k:+d}: {v:.3f}" for k, v in sorted(per_lag.items())))
        relation = ("in step" if lag == 0 else
                    f"mouth {'trails' if lag < 0 else 'leads'} audio by {abs(lag)} frame(s)")
        print(f"best lag {lag:+d} frames ({relation}) over {len(mouths)} clips")
        if math.isnan(r) or r < MIN_MOUTH_AUDIO_R:
            failures.append(f"mouth-audio correlation {r:.3f} < {MIN_MOUTH_AUDIO_R}: the "
                            "ground-truth mouth does not follow the audio")
        last = f"mouth-audio correlation: {r:.3f}"
    else:
        failures.append("no clip has mouth_open labels, so lip sync cannot be checked")
        last = "mouth-audio correlation: n/a (no mouth_open labels)"
    for f in failures:
        print(f"check FAILED: {f}")
    if not failures:
        print(f"check passed: {sum(s.clips for s in stats.values())} records verified")
    print(last)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
