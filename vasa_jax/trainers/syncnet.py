"""Trains SyncNet (vasa_jax.models.syncnet, syncnet_python's network) in the shared loop,
on the crops a `data_pipeline.sync_crops` folder holds.

    python train.py --config configs/syncnet.py:size=tiny --workdir runs/syncnet \
        --config.data.path=data/sync_crops

A batch (`SyncWindow`, on the host): B lip windows, lips uint8 [B, 5, 224, 224, 3] (RGB
crops of frames t..t+4 of a random clip at a random t), and mfcc float32 [B, 1 + K, 13, 20]:
the audio window of the same clip at frame t, then at K = loss.num_shifted random other
frames t + s, 1 <= |s| <= loss.max_shift, inside the clip.

One jitted step: the lip and audio streams in training mode (batch norms normalise with the
batch's statistics), distances d = ||v - a|| (the scorer's), the softmax cross-entropy of
logits -d / loss.temperature over [own audio at 0 (the target), own audio at the K shifts,
the other rows' audio at 0], AdamW.

At the end (single process): the batch norms' stored statistics from loss.export's
bn_batches training batches (`syncnet.population_statistics`), the held-out scores (Sc, SD,
AV offset on the test split's clips with their own audio and with the next clip's), and the
export into the workdir: <workdir>/params + syncnet.json, what `--syncnet <workdir>` of
`python -m vasa_jax.evaluate videos` reads, as it reads converted syncnet_v2.model weights.

Logged: loss/total, accuracy (the own offset-0 audio nearest), dist/matched, dist/shifted,
dist/other, grad_norm, lr.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from data_pipeline import sync_crops
from vasa_jax import optim
from vasa_jax.models import syncnet
from vasa_jax.trainers import loop

BATCH_KEYS = ("lips", "mfcc")
READ_THREADS = 4


class TrainState(nnx.Module):
    """SyncNet in training mode and its optimizer."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.net = syncnet.SyncNet(config.model.embed_dim, rngs=nnx.Rngs(config.seed))
        self.net.train()
        self.opt = nnx.Optimizer(
            self.net, optim.build_optimizer(config.optim, config.train.total_steps),
            wrt=nnx.Param)


def _clip_arrays(path: str, split: str, entry: dict) -> tuple[np.ndarray, np.ndarray]:
    folder = os.path.join(path, split)
    return (np.load(os.path.join(folder, entry["file"] + ".crops.npy"), mmap_mode="r"),
            np.load(os.path.join(folder, entry["file"] + ".mfcc.npy"), mmap_mode="r"))


class SyncWindow(grain.transforms.RandomMap):
    """A clip number -> {"lips": uint8 [5, 224, 224, 3], "mfcc": float32 [1 + K, 13, 20]}
    (see the module docstring) at a random frame of that clip."""

    def __init__(self, path: str, split: str, clips: list[dict], num_shifted: int,
                 max_shift: int):
        self.path, self.split, self.clips = path, split, clips
        self.num_shifted, self.max_shift = num_shifted, max_shift

    def random_map(self, k: int, rng: np.random.Generator) -> dict:
        crops, mfcc = _clip_arrays(self.path, self.split, self.clips[k])
        n = len(mfcc)
        t = int(rng.integers(n))
        offsets = [s for s in range(-self.max_shift, self.max_shift + 1)
                   if s and 0 <= t + s < n]
        shifts = rng.choice(offsets, self.num_shifted, replace=len(offsets) < self.num_shifted)
        return {"lips": np.array(crops[t:t + syncnet.LIP_FRAMES]),
                "mfcc": np.stack([mfcc[t]] + [mfcc[t + int(s)] for s in shifts])}


def make_dataset(config: ml_collections.ConfigDict, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
    """SyncWindow batches of this process's config.data.batch_size / process_count rows."""
    d = config.data
    clips = sync_crops.read_clips(d.path, d.split)
    if not clips:
        raise ValueError(f"{d.path!r} has no usable {d.split!r} clip")
    if d.batch_size % process_count:
        raise ValueError(f"data.batch_size {d.batch_size} is not divisible by {process_count} "
                         "processes")
    local_batch = d.batch_size // process_count
    ds = grain.MapDataset.source(list(range(len(clips)))).seed(d.seed).shuffle().repeat()
    ds = ds.random_map(SyncWindow(d.path, d.split, clips, config.loss.num_shifted,
                                  config.loss.max_shift))
    ds = ds[process_index::process_count].to_iter_dataset(grain.ReadOptions(
        num_threads=READ_THREADS, prefetch_buffer_size=max(local_batch, READ_THREADS)))
    ds = ds.batch(local_batch, drop_remainder=True)
    if d.num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
    return ds


def bgr(lips: jax.Array) -> jax.Array:
    """uint8 RGB crops [..., 3] -> float32 BGR 0..255, SyncNet's input (as the scorer)."""
    return lips[..., ::-1].astype(jnp.float32)


def distances(video: jax.Array, audio: jax.Array) -> jax.Array:
    """The scorer's feature distance ||v - a + 1e-6||: video [..., D], audio [..., D]."""
    return jnp.linalg.norm(video - audio + 1e-6, axis=-1)


def sync_loss(video: jax.Array, audio: jax.Array, temperature: float
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """video [B, D] lip features; audio [B, 1 + K, D] (own audio at 0, then at K shifts).
    Returns the mean cross-entropy of the own offset-0 audio among [own 0, own shifts,
    the other rows' offset-0 audio] with logits -distance / temperature, and metrics."""
    b = video.shape[0]
    own = distances(video[:, None], audio)  # [B, 1 + K]
    other = distances(video[:, None], audio[None, :, 0])  # [B, B]
    other_masked = jnp.where(jnp.eye(b, dtype=bool), jnp.inf, other)
    logits = -jnp.concatenate([own, other_masked], axis=1) / temperature
    loss = -jax.nn.log_softmax(logits, axis=1)[:, 0].mean()
    off_diagonal = jnp.sum(jnp.where(jnp.eye(b, dtype=bool), 0.0, other)) / max(b * (b - 1), 1)
    metrics = {"accuracy": jnp.mean(jnp.argmax(logits, axis=1) == 0),
               "dist/matched": own[:, 0].mean(), "dist/other": off_diagonal}
    if own.shape[1] > 1:
        metrics["dist/shifted"] = own[:, 1:].mean()
    return loss, metrics


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
    sync_crops.read_clips(config.data.path, config.data.split)  # a clear error up front
    lr_schedule = optim.learning_rate_schedule(config.optim, config.train.total_steps)
    temperature = float(config.loss.temperature)

    def train_step(ts: TrainState, batch, rng, frozen):
        del rng, frozen
        lips = bgr(batch["lips"])
        mfcc = batch["mfcc"]
        b, k = mfcc.shape[:2]

        def loss_fn(net):
            video = net.lip_features(lips)
            audio = net.audio_features(mfcc.reshape(b * k, *mfcc.shape[2:])).reshape(b, k, -1)
            return sync_loss(video, audio, temperature)

        return loop.optimizer_step(ts.net, ts.opt, loss_fn, lr_schedule)

    return loop.Stage(
        create_state=lambda: TrainState(config),
        train_step=train_step,
        make_dataset=lambda index, n: make_dataset(config, index, n),
        batch_keys=BATCH_KEYS,
        progress_keys=("loss/total", "accuracy"),
    )


def held_out_scores(scorer: syncnet.SyncNetScorer, path: str, split: str,
                    max_clips: int) -> dict[str, float]:
    """Mean Sc, SD and share of AV offset 0 on up to max_clips clips of `split`, with their
    own audio ("matched") and with the next clip's ("other audio", both cut to the shorter)."""
    clips = sync_crops.read_clips(path, split)[:max_clips]
    rows = {"matched": [], "other audio": []}
    for k, entry in enumerate(clips):
        crops, mfcc = _clip_arrays(path, split, entry)
        _, other = _clip_arrays(path, split, clips[(k + 1) % len(clips)])
        n = min(len(mfcc), len(other))
        lips, audio = scorer.window_features(np.asarray(crops[:n + 4]), np.asarray(mfcc[:n]))
        other_audio = scorer.window_features(np.asarray(crops[:n + 4]), np.asarray(other[:n]),
                                             lips=lips)[1]
        for name, features in (("matched", audio), ("other audio", other_audio)):
            rows[name].append(syncnet.sync_scores(np.asarray(
                syncnet.offset_distances(lips, features))))
    out: dict[str, float] = {"clips": len(clips)}
    for name, scores in rows.items():
        out[f"{name}/Sc"] = float(np.mean([s["Sc"] for s in scores]))
        out[f"{name}/SD"] = float(np.mean([s["SD"] for s in scores]))
        out[f"{name}/offset 0"] = float(np.mean([s["offset"] == 0 for s in scores]))
    return out


def export(workdir: str, result: loop.TrainResult, seconds: float) -> None:
    """Sets the batch norms' statistics, scores the held-out split and writes the export."""
    config = result.config
    net = nnx.merge(result.graphdef, result.state).net
    batches = iter(make_dataset(config))
    bn_batches = [next(batches) for _ in range(config.export.bn_batches)]
    syncnet.population_statistics(net, ((bgr(jnp.asarray(b["lips"])),
                                         b["mfcc"].reshape(-1, *b["mfcc"].shape[2:]))
                                        for b in bn_batches))
    metrics: dict[str, Any] = {}
    try:
        metrics = held_out_scores(syncnet.SyncNetScorer(net), config.data.path, "test",
                                  config.final_eval.max_clips)
        logging.info("SyncNet held-out: %s", metrics)
    except FileNotFoundError:
        logging.warning("syncnet: %s has no test split; no held-out evaluation",
                        config.data.path)
    syncnet.save_syncnet(workdir, nnx.state(net), {
        "source": "trained (vasa_jax.trainers.syncnet)",
        "train": {"steps": result.step, "data": os.path.abspath(config.data.path),
                  "seconds": seconds, "config": loop.config_json(config)},
        "history": loop.logged_history(workdir, {"loss": "loss/total",
                                                 "accuracy": "accuracy"}, result.step),
        "metrics": metrics,
    })


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       compiler_options=None) -> loop.TrainResult:
    """Trains SyncNet in `workdir` (resuming from its latest checkpoint, if any); a finished
    run ends with its held-out scores and export (loop.train_and_export)."""
    return loop.train_and_export(
        config, workdir, make_stage,
        meta_file=syncnet.CONFIG_FILE, params_dir=syncnet.PARAMS_DIR,
        export=lambda result, seconds: export(workdir, result, seconds),
        compiler_options=compiler_options)
