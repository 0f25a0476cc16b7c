"""CAPP evaluator: the frame-shift sanity curve of a trained CAPP (VASA-1 Table 3).

    python -m vasa_jax.evaluate capp --workdir runs/capp --data data/synthtalk \
        [--split test] [--max_shift 4] [--stride 5] [--out report/]

For every held-out clip, 3-second windows of its pose (the run's data.motion_source) are
paired with its audio shifted by s frames (s = -max_shift..max_shift); the CAPP score is the
mean cosine similarity of the pairs. A model that learnt audio-pose timing peaks at s = 0
and falls by |s| = 2 (the paper: 0.608, 0.462, 0.206, 0.069, 0.082 for 0..4). Also printed:
the score with the audio of another identity's clip (shuffled: should be near 0).

`CappScorer` is what other evaluators (the video harness) use to score pose sequences.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from data_pipeline import schema
from data_pipeline import stats as stats_lib
from data_pipeline.loaders import clip_sequences, load_clip_index
from vasa_jax.models import capp

DESCRIPTION = "CAPP (contrastive audio-pose): the frame-shift curve and shuffled-audio score"
BATCH = 64  # windows per compiled call (short batches are padded: one compilation)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _embed(graphdef, state, stats, columns, pose, audio):
    pose, audio = capp.normalized_inputs(pose, audio, stats, columns)
    return nnx.merge(graphdef, state)(pose, audio)


@dataclasses.dataclass
class CappScorer:
    """A trained CAPP (EMA weights) and its run's normalisation."""

    config: ml_collections.ConfigDict
    model: capp.CAPP
    norm: stats_lib.Normalization
    columns: tuple[int, ...]
    step: int

    @classmethod
    def load(cls, workdir: str, step: int | None = None) -> "CappScorer":
        """Restores a CAPP run's EMA weights (only the checkpoint's weights item).
        FileNotFoundError / ValueError for a missing run or another stage's run."""
        from vasa_jax import checkpointing  # orbax stays out of plain imports
        from vasa_jax.parallel.mesh import create_mesh_or_data_parallel

        ckpt, step, config = checkpointing.open_run(workdir, "capp", step)
        with ckpt:
            config = ml_collections.ConfigDict(config)
            norm = stats_lib.Normalization.load(workdir)
            if norm is None:
                raise FileNotFoundError(f"{workdir!r} has no {stats_lib.NORMALIZATION_FILE}")
            columns = capp.pose_columns(config.model.pose_dims, norm.motion_dim)
            if not ckpt.has_weights(step):
                raise ValueError(f"the checkpoint of step {step} in {workdir!r} has no weights "
                                 "item")
            mesh = create_mesh_or_data_parallel(config.mesh.axes)
            model = ckpt.restore_module(
                lambda: capp.CAPP(config.model, len(columns), norm.audio_dim,
                                  rngs=nnx.Rngs(0)), mesh, config.mesh.rules, step)
        logging.info("restored CAPP step %d from %s", step, workdir)
        return cls(config, model, norm, columns, step)

    @property
    def window(self) -> int:
        return int(self.config.model.window)

    def embed(self, pose: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw pose windows [N, W, P] (model.pose_dims, the training data's units) and
        audio feature windows [N, W, Da] -> unit embeddings ([N, E], [N, E])."""
        graphdef, state = nnx.split(self.model)
        stats = {k: np.asarray(v, np.float32) for k, v in self.norm.arrays().items()}
        outs = []
        for i in range(0, len(pose), BATCH):
            p, a = pose[i:i + BATCH], audio[i:i + BATCH]
            pad = BATCH - len(p)
            if pad:
                p = np.concatenate([p, np.repeat(p[-1:], pad, 0)])
                a = np.concatenate([a, np.repeat(a[-1:], pad, 0)])
            pe, ae = _embed(graphdef, state, stats, self.columns, p.astype(np.float32),
                            a.astype(np.float32))
            outs.append((np.asarray(pe)[:BATCH - pad], np.asarray(ae)[:BATCH - pad]))
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def score(self, pose: np.ndarray, audio: np.ndarray, stride: int = 25) -> float:
        """Mean CAPP score of a clip: pose [T, P] and audio features [T, Da] cut into
        W-frame windows every `stride` frames. ValueError when T < W."""
        starts = window_starts(len(pose), self.window, 0, stride)
        pe, ae = self.embed(np.stack([pose[s:s + self.window] for s in starts]),
                            np.stack([audio[s:s + self.window] for s in starts]))
        return float(np.mean(capp.score(pe, ae)))


def window_starts(num_frames: int, window: int, margin: int, stride: int) -> list[int]:
    """Starts of W-frame windows that leave `margin` frames free at both ends."""
    last = num_frames - window - margin
    if last < margin:
        raise ValueError(f"a clip of {num_frames} frames has no {window}-frame window with "
                         f"{margin} frames to spare on each side")
    return list(range(margin, last + 1, max(int(stride), 1)))


def shift_curve(scorer: CappScorer, clips: list[tuple[np.ndarray, np.ndarray, int]],
                max_shift: int, stride: int) -> dict[str, Any]:
    """clips: (pose [T, P], audio [T, Da], identity). Returns {"shift": {s: score},
    "shuffled": score, "windows": N}."""
    w = scorer.window
    pose_w, audio_w, owner = [], [], []
    shifted = {s: [] for s in range(-max_shift, max_shift + 1)}
    for c, (pose, audio, _) in enumerate(clips):
        for a in window_starts(len(pose), w, max_shift, stride):
            audio_w.append(audio[a:a + w])
            pose_w.append(pose[a:a + w])
            owner.append(c)
            for s in shifted:
                shifted[s].append(pose[a + s:a + s + w])
    if not audio_w:
        raise ValueError("no clip is long enough for one window")
    audio_w = np.stack(audio_w)
    curve = {}
    for s, poses in shifted.items():
        pe, ae = scorer.embed(np.stack(poses), audio_w)
        curve[s] = float(np.mean(capp.score(pe, ae)))
    # Shuffled: each window's pose with the audio of a window of another identity's clip.
    ids = np.array([clips[c][2] for c in owner])
    rng = np.random.default_rng(0)
    partner = np.empty(len(ids), int)
    for i in range(len(ids)):
        others = np.flatnonzero(ids != ids[i])
        partner[i] = rng.choice(others) if len(others) else (i + 1) % len(ids)
    pe, ae = scorer.embed(np.stack(pose_w), audio_w[partner])
    return {"shift": curve, "shuffled": float(np.mean(capp.score(pe, ae))),
            "windows": int(len(audio_w))}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `evaluate` measures (the CLI flags)."""

    split: str = "test"
    max_shift: int = 4  # largest frame shift of the curve
    stride: int = 5  # frames between windows
    step: int | None = None  # checkpoint step (None: latest)
    progress: bool = True  # (nothing here is slow enough for a bar)

    def __post_init__(self):
        if self.split not in schema.SPLITS:
            raise ValueError(f"split must be one of {schema.SPLITS}, got {self.split!r}")
        if self.max_shift < 0 or self.stride < 1:
            raise ValueError(f"--max_shift must be >= 0 and --stride >= 1, got "
                             f"{self.max_shift}, {self.stride}")


def evaluate(workdir: str, data: str, settings: Settings = Settings()) -> dict[str, Any]:
    """The frame-shift curve and shuffled-audio score of a CAPP run on `data`'s split:
    {"shift": {s: score}, "shuffled", "windows", "clips", "step", ...}."""
    scorer = CappScorer.load(workdir, settings.step)
    d = scorer.config.data
    index = load_clip_index(data, settings.split)
    source = schema.read_records(index.paths)
    clips = []
    for i in range(len(index)):
        clip = schema.decode_clip(source[i])
        if clip.num_frames < scorer.window + 2 * settings.max_shift:
            continue
        motion, audio = clip_sequences(clip, d.motion_source, d.audio_source,
                                       int(d.audio.n_mels))
        clips.append((motion[:, list(scorer.columns)], audio, int(index.identity_id[i])))
    if not clips:
        raise ValueError(f"no {settings.split} clip of {data!r} has {scorer.window} + 2 * "
                         f"{settings.max_shift} frames")
    result = shift_curve(scorer, clips, settings.max_shift, settings.stride)
    result.update(step=scorer.step, clips=len(clips), split=settings.split, data=data)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="a CAPP training run")
    parser.add_argument("--data", required=True, help="clip records (SynthTalk or preprocessed)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--max_shift", type=int, default=4, help="largest frame shift")
    parser.add_argument("--stride", type=int, default=5, help="frames between windows")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    parser.add_argument("--out", default=None, help="also write capp.json (and a plot) here")


def run(args: argparse.Namespace) -> int:
    settings = Settings(split=args.split, max_shift=args.max_shift, stride=args.stride,
                        step=args.step)
    result = evaluate(args.workdir, args.data, settings)
    print(f"CAPP step {result['step']}, {result['clips']} {args.split} clips, "
          f"{result['windows']} windows of 3 s")
    print("| shift (frames) | " + " | ".join(f"{s:+d}" for s in result["shift"]) + " |")
    print("|---|" + "---|" * len(result["shift"]))
    print("| CAPP | " + " | ".join(f"{v:.3f}" for v in result["shift"].values()) + " |")
    print(f"shuffled audio (another identity's clip): {result['shuffled']:.3f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "capp.json"), "w") as f:
            json.dump({**result, "shift": {str(k): v for k, v in result["shift"].items()}}, f,
                      indent=2)
        _plot(result, os.path.join(args.out, "capp_shift.png"))
    return 0


def _plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = list(result["shift"])
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(shifts, [result["shift"][s] for s in shifts], "o-", label="pose vs shifted audio")
    ax.axhline(result["shuffled"], color="grey", ls="--", label="shuffled audio")
    ax.set_xlabel("audio shift (frames)")
    ax.set_ylabel("CAPP score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
