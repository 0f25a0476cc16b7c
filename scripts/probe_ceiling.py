"""The supervised ceiling of the z_dyn probes: how well the stage-1 dynamics encoder can read
mouth, blink and gaze at all, at this resolution and compute budget.

`evaluate face_latent` probes z_dyn linearly for the ground-truth mouth opening, blink and
gaze; stage 1 must learn those from reconstruction alone. This script gives that number a
ceiling. It trains the same encoder (the config's E_mtn dynamics net, z_dyn [B, dyn_dim])
*directly on the labels* (--targets, default all three), through a linear read-out:

    frames [B, S, S, 3] -> E_mtn.dynamics -> z_dyn [B, D] -> Dense -> [B, K]
    loss = mean squared error against (mouth_open, blink, gaze / 20 deg; K = 4 for all)

and every --eval_every steps runs the evaluator's own probes (`run_probes`: ridge fit on
train-split frames, R^2 on the test split) on z_dyn. If the supervised encoder cannot reach
a probe target in some number of steps, reconstruction-trained z_dyn will not either.

    python scripts/probe_ceiling.py --data D [--config configs/face_latent.py:size=tiny]
        [--steps 1300] [--batch_size 4] [--eval_every 100] [--out ceiling.json]
        [--targets mouth_open,blink,gaze] [--set model.motion.dyn_groups=0 ...]
        (--set: any config field, as train.py's --config.X)

With --set model.motion.glimpse_widths=(0.65,0.4) the encoder reads the eye and mouth
glimpses at the label boxes' centres (what a perfect landmark net would give).

Prints one line per evaluation (step, seconds of training, probe R^2) and writes them as JSON.
Frames come from `read_clips` (the evaluator's reader): --train_clips clips of the train
split, --frames_per_clip frames each, held in memory; no augmentation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import configs  # noqa: E402
from data_pipeline.transforms import to_signed_float  # noqa: E402
from vasa_jax.evaluate import face_latent as evaluator  # noqa: E402
from vasa_jax.models import face_latent, layers  # noqa: E402

TARGETS = ("mouth_open", "blink", "gaze")  # the z_dyn probes' labels (gaze: theta, phi)
GAZE_SCALE = 20.0  # degrees -> about unit range, like mouth_open and blink
PROBES = ("mouth_open_from_z_dyn", "blink_from_z_dyn", "gaze_from_z_dyn")


def check_target_names(names) -> None:
    """Raises ValueError unless `names` is a non-empty subset of TARGETS."""
    if not names or any(t not in TARGETS for t in names):
        raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {names}")


def targets(clips, names=TARGETS) -> np.ndarray:
    """[N, K] float32 of every frame, columns in `names` order: mouth_open, blink (1 each),
    gaze theta / 20 and phi / 20 (2). The probes need all of TARGETS, so all are checked."""
    check_target_names(names)
    for c in clips:
        missing = [t for t in TARGETS if t not in c.labels]
        if missing:
            raise ValueError(f"clip {c.clip_id} has no {missing} labels: the ceiling needs "
                             f"{TARGETS} (SynthTalk data has them)")
    cols = [np.concatenate([c.labels[t] for c in clips]).reshape(-1, 1 if t != "gaze" else 2)
            / (GAZE_SCALE if t == "gaze" else 1.0) for t in names]
    return np.concatenate(cols, axis=1).astype(np.float32)


class Supervised(nnx.Module):
    """E_mtn (only its dynamics net is trained) + a linear read-out of z_dyn."""

    def __init__(self, model_cfg, num_targets: int, *, rngs: nnx.Rngs):
        self.encoder = face_latent.motion_encoder(model_cfg, rngs=rngs)
        self.readout = layers.Dense(model_cfg.motion.dyn_dim, num_targets,
                                    names=("embed", None), rngs=rngs)

    def __call__(self, images: jax.Array, centres: jax.Array | None) -> jax.Array:
        return self.readout(self.encoder.dynamics(images, centres))


def glimpse_centres(model: Supervised, clips) -> np.ndarray | None:
    """With model.motion.glimpse_widths, the glimpses sit at the label boxes' centres (the
    ceiling of a perfect landmark net): [N, R, 2] for every frame of the clips; else None."""
    if not model.encoder.glimpse_widths:
        return None
    from vasa_jax.models.face_pose import GLIMPSE_BOXES, box_centres
    for c in clips:
        if any(n not in c.labels for n in GLIMPSE_BOXES):
            raise ValueError(f"clip {c.clip_id} has no {GLIMPSE_BOXES} labels: glimpses need "
                             "them (SynthTalk data has them)")
    return np.concatenate([np.asarray(box_centres(c.labels)) for c in clips])


@nnx.jit
def _encode(model: Supervised, images: jax.Array, centres: jax.Array | None):
    return model.encoder.pose(images), model.encoder.dynamics(images, centres)


def encode(model: Supervised, clips, batch: int = 64) -> dict[str, np.ndarray]:
    """{"z_pose", "z_dyn"} of every frame of the clips (z_pose untrained: shapes only)."""
    frames = np.concatenate([c.frames for c in clips])
    centres = glimpse_centres(model, clips)
    out = [_encode(model, to_signed_float(frames[i:i + batch]),
                   None if centres is None else centres[i:i + batch])
           for i in range(0, len(frames), batch)]
    return {"z_pose": np.concatenate([np.asarray(p) for p, _ in out]),
            "z_dyn": np.concatenate([np.asarray(d) for _, d in out])}


def run(config, data: str, *, steps: int, batch_size: int, lr: float, eval_every: int,
        train_clips: int, frames_per_clip: int, test_clips: int | None,
        target_names=TARGETS, seed: int = 0, log=print) -> list[dict]:
    """Trains and evaluates; returns one record per evaluation (step 0 = untrained)."""
    size = config.model.image_size
    train, _ = evaluator.read_clips(data, "train", size, max_clips=train_clips,
                                    frames_per_clip=frames_per_clip, include_first=False,
                                    progress=False)
    test, _ = evaluator.read_clips(data, "test", size, max_clips=test_clips,
                                   frames_per_clip=frames_per_clip, include_first=False,
                                   progress=False)
    frames = np.concatenate([c.frames for c in train])
    y = targets(train, target_names)
    targets(test)  # fail before training if the test split lacks a label
    model = Supervised(config.model, y.shape[1], rngs=nnx.Rngs(seed))
    wrt = nnx.Any(nnx.PathContains("dyn_net"), nnx.PathContains("readout"))
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=wrt)

    centres = glimpse_centres(model, train)

    @nnx.jit
    def step(model, opt, x, c, t):
        def loss_fn(m):
            return jnp.mean((m(x, c) - t) ** 2)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    records, trained_s, losses = [], 0.0, []
    for s in range(steps + 1):
        if s % eval_every == 0 or s == steps:
            probes = evaluator.run_probes(test, encode(model, test), train,
                                          encode(model, train), kfold=5)
            rec = {"step": s, "train_seconds": round(trained_s, 1),
                   "loss": float(np.mean(losses)) if losses else None,
                   **{p: probes[p]["r2_mean"] for p in PROBES}}
            records.append(rec)
            losses = []
            log(f"step {s:5d}  {trained_s:6.0f}s  " + "  ".join(
                f"{p.split('_from')[0]} R^2 {rec[p]:.3f}" for p in PROBES))
        if s == steps:
            break
        idx = rng.integers(0, len(frames), batch_size)
        t0 = time.perf_counter()
        losses.append(float(step(model, opt, to_signed_float(frames[idx]),
                                 None if centres is None else centres[idx], y[idx])))
        trained_s += time.perf_counter() - t0
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a SynthTalk dataset (train and test splits)")
    p.add_argument("--config", default="configs/face_latent.py:size=tiny")
    p.add_argument("--steps", type=int, default=1300)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--train_clips", type=int, default=256)
    p.add_argument("--frames_per_clip", type=int, default=16)
    p.add_argument("--test_clips", type=int, default=None)
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="comma-separated labels the encoder is taught (the probes score all)")
    p.add_argument("--out", default=None, help="write the records here as JSON")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field (repeatable); VALUE is a Python literal "
                        "or else a string")
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or args.batch_size < 1:
        p.error("--steps, --eval_every and --batch_size must be >= 1")
    names = tuple(t for t in args.targets.split(",") if t)
    try:
        check_target_names(names)
    except ValueError as e:
        p.error(f"--targets: {e}")
    try:
        config = configs.load(args.config, **configs.parse_overrides(args.set))
    except ValueError as e:  # configs.ConfigError included
        p.error(str(e))
    records = run(config, args.data, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  eval_every=args.eval_every, train_clips=args.train_clips,
                  frames_per_clip=args.frames_per_clip, test_clips=args.test_clips,
                  target_names=names)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "data": args.data, "settings": vars(args),
                       "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
