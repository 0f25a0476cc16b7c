"""SyncNet training data: the face crops and MFCC windows SyncNet's scorer reads, cut from
a clip-record dataset.

    python -m data_pipeline.sync_crops --data data/synthtalk --out data/sync_crops \
        [--max_clips 96] [--analysis_size 256] [--no_progress]

For each split of --data (train, and test when there is one; at most --max_clips clips of
each, in record order) every clip is tracked and cropped exactly as `python -m
vasa_jax.evaluate videos --syncnet` crops a video (`videos.track_faces` on frames upscaled
to --analysis_size px, `videos.sync_face_crops`: 224 px crops around the face mesh's box at
25 fps) and its audio cut into the audio stream's inputs (`syncnet.mfcc_windows`). A SyncNet
trained on these (`python train.py --config configs/syncnet.py --config.data.path=OUT`)
sees at training time what the scorer shows it.

Output (OUT), one folder per split:

  <split>/<k:06d>.crops.npy  uint8 [n + 4, 224, 224, 3]  clip k's crops (RGB), frames 0..n+3
  <split>/<k:06d>.mfcc.npy   float32 [n, 13, 20]        its MFCC window of each frame 0..n-1
  <split>/clips.json         [{"file", "clip_id", "identity_id", "windows": n}], n =
                             syncnet.window_count (lip window t = crops t..t+4, audio
                             window t = mfcc[t]); written last per split
  sync_crops.json            {"data", "analysis_size", "max_clips", "splits": {split:
                             {"clips", "windows", "skipped": {reason: count}}}}: written
                             last, its presence means the folder is complete

Resuming: a clip's two files are written under temporary names and renamed, so re-running
the same command keeps the clips already written and does the rest. Clips that cannot be
used (an unreadable record, a face in too few frames, under 2 windows) are skipped,
counted and listed in sync_crops.json. Exit status: 0 done; 1 with one `error: ...` line
for bad input (no dataset, an output that is a file, no usable clip in the train split);
2 for bad flags.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Sequence

import numpy as np

from vasa_jax import cli

MANIFEST = "sync_crops.json"
CLIPS_FILE = "clips.json"
SPLITS = ("train", "test")


def _save(path: str, array: np.ndarray) -> None:
    tmp = path[:-len(".npy")] + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def clip_windows(clip, analyzer, analysis_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One clip (schema.Clip) -> (crops uint8 [n + 4, 224, 224, 3], mfcc float32
    [n, 13, 20]). ValueError when its face is tracked in too few frames or n < 2."""
    from vasa_jax.audio.io import resample
    from vasa_jax.evaluate import videos
    from vasa_jax.models import syncnet

    frames, obs = videos.track_faces(clip.decode_frames(), analyzer, analysis_size,
                                     clip.clip_id)
    crops = videos.sync_face_crops(frames, obs, clip.fps)
    audio = np.asarray(clip.audio, np.float32)
    if clip.sample_rate != syncnet.SAMPLE_RATE:
        audio = resample(audio, clip.sample_rate, syncnet.SAMPLE_RATE)
    n = syncnet.window_count(len(crops), len(audio))
    if n < 2:
        raise ValueError(f"{clip.clip_id!r}: {max(n, 0)} SyncNet windows (needs 2: 0.28 s)")
    return crops[:n + syncnet.LIP_FRAMES - 1], syncnet.mfcc_windows(audio, n)


def build_split(data: str, out: str, split: str, analyzer, *, max_clips: int,
                analysis_size: int, progress: bool = True) -> dict:
    """Writes OUT/<split>/ (see the module docstring). Returns {"clips", "windows",
    "skipped": {reason: count}}."""
    from tqdm import tqdm

    from data_pipeline import loaders, schema

    index = loaders.load_clip_index(data, split)
    records = loaders.ClipRecords(index.paths, np.arange(min(len(index), max_clips)),
                                  index.source)
    folder = os.path.join(out, split)
    os.makedirs(folder, exist_ok=True)
    clips, skipped = [], collections.Counter()
    if index.broken:
        skipped["damaged shard"] += 1
    bar = tqdm(total=len(records), desc=f"sync crops {split}", unit="clip", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    for k in range(len(records)):
        bar.update()
        name = f"{k:06d}"
        crops_path = os.path.join(folder, name + ".crops.npy")
        mfcc_path = os.path.join(folder, name + ".mfcc.npy")
        _, data_bytes = records[k]
        try:
            if isinstance(data_bytes, Exception):
                raise data_bytes
            clip = schema.decode_clip(data_bytes)
            if not (os.path.exists(crops_path) and os.path.exists(mfcc_path)):
                crops, mfcc = clip_windows(clip, analyzer, analysis_size)
                _save(crops_path, crops)
                _save(mfcc_path, mfcc)
            windows = len(np.load(mfcc_path, mmap_mode="r"))
        except (ValueError, schema.CorruptRecordError) as e:
            reason = ("no face" if "a face in only" in str(e) else
                      "too short" if "windows" in str(e) else "unreadable record")
            skipped[reason] += 1
            bar.write(f"skipped {split} record {k}: {cli.error_line(e)}")
            continue
        clips.append({"file": name, "clip_id": clip.clip_id,
                      "identity_id": int(clip.identity_id), "windows": int(windows)})
    bar.close()
    schema.write_json_atomic(os.path.join(folder, CLIPS_FILE), clips)
    return {"clips": len(clips), "windows": int(sum(c["windows"] for c in clips)),
            "skipped": dict(skipped)}


def build(data: str, out: str, *, max_clips: int = 96, analysis_size: int = 256,
          progress: bool = True) -> dict:
    """Builds OUT from the dataset folder DATA (both splits when it has a test split).
    Returns the manifest. FileNotFoundError without a train split, ValueError when no train
    clip is usable."""
    from data_pipeline import face_analysis as fa
    from data_pipeline import loaders, schema

    if max_clips < 1:
        raise ValueError(f"--max_clips must be >= 1, got {max_clips}")
    if analysis_size < 64:
        raise ValueError(f"--analysis_size must be >= 64, got {analysis_size}")
    loaders.load_clip_index(data, "train")  # a missing dataset fails before any work
    cli.check_output(out, "--out folder")
    analyzer = fa.FaceAnalyzer(backend="tflite")
    splits = {}
    for split in SPLITS:
        try:
            splits[split] = build_split(data, out, split, analyzer, max_clips=max_clips,
                                        analysis_size=analysis_size, progress=progress)
        except FileNotFoundError:
            if split == "train":
                raise
    if not splits["train"]["clips"]:
        raise ValueError(f"no usable train clip in {data!r} (skipped: "
                         f"{splits['train']['skipped']})")
    manifest = {"data": os.path.abspath(data), "analysis_size": analysis_size,
                "max_clips": max_clips, "splits": splits}
    schema.write_json_atomic(os.path.join(out, MANIFEST), manifest)
    return manifest


def read_clips(path: str, split: str) -> list[dict]:
    """OUT/<split>/clips.json (FileNotFoundError naming the command that makes it)."""
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise FileNotFoundError(
            f"{path!r} is not a finished SyncNet crops folder (no {MANIFEST}); make one with "
            f"`python -m data_pipeline.sync_crops --data DATASET --out {path}`")
    clips_path = os.path.join(path, split, CLIPS_FILE)
    if not os.path.isfile(clips_path):
        raise FileNotFoundError(f"{path!r} has no {split!r} split ({clips_path})")
    with open(clips_path) as f:
        return json.load(f)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m data_pipeline.sync_crops",
                           description="SyncNet training data (face crops + MFCC windows) "
                                       "from a clip-record dataset; resumable.")
    p.add_argument("--data", required=True, help="input clip-record dataset folder")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--max_clips", type=int, default=96, help="clips per split, at most")
    p.add_argument("--analysis_size", type=int, default=256,
                   help="frames smaller than this (px) are upscaled for face tracking (as "
                        "the video harness does)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)

    def body() -> int:
        manifest = build(args.data, args.out, max_clips=args.max_clips,
                         analysis_size=args.analysis_size, progress=not args.no_progress)
        for split, s in manifest["splits"].items():
            print(f"{split}: {s['clips']} clips, {s['windows']} windows, skipped "
                  f"{s['skipped'] or 'none'}")
        print(f"wrote {args.out}")
        return 0

    return cli.run_guarded(body)


if __name__ == "__main__":
    cli.run_main(main)
