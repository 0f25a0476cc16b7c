"""Stage-1 reconstruction against a plain conv autoencoder: the bisection that finds blur.

A plain conv autoencoder draws SynthTalk's eyes and mouth at 64 px in a few CPU minutes. The
stage-1 path (E_app -> volume -> warps -> G3D -> projection -> G2D) must reconstruct a frame
from itself at least as well in the same steps, or something in it is broken. This script
trains either network on self-reconstruction (source = driving = target) with the same
frames, batch and optimizer, and prints held-out PSNR (whole frame, eye band, mouth box):

    python -m benchmarks.stage1_bisect --data D --net ae                   # the baseline
    python -m benchmarks.stage1_bisect --data D --net stage1 --parts ""    # 2-D path only
    python -m benchmarks.stage1_bisect --data D --net stage1 \
        --parts blocks3d,warp_sc,g3d,warp_cd --optim config --ema 0.99    # the whole model
    python -m benchmarks.stage1_bisect --data D --pairs cross --net ae_motion  # reenactment
    python -m benchmarks.stage1_bisect --data D --pairs cross --net stage1     # baseline, model

--parts adds stage-1 pieces back one at a time (E_app's 2-D blocks, its reshape to a volume,
the projection and G2D are always there): blocks3d (E_app's 3-D resblocks), warp_sc,
g3d, warp_cd (the two warps with the image's own pose and dynamics, so source ->
canonical -> driving should be the identity). --optim adam is plain Adam at --lr; config is
the config's optimizer (AdamW b1 = 0.5, weight decay, clipping, cosine schedule).
--ema evaluates an EMA of the weights. --set overrides any config field.

--pairs cross trains reenactment instead: the source is one frame of a clip, the driving
frame (the target) another frame of the same clip, through the whole FaceLatentModel (both
warps with each frame's own pose, as train.py's recon term; --parts is ignored). Held-out
pairs take each clip's first frame as the source; the floor printed at the end is copying
that frame. With --set model.motion.pretrained_pose=P (either mode) the pose net starts
from that export and stays frozen (model.motion.freeze_pretrained_pose), as in train.py. Its baseline,
--net ae_motion, is the autoencoder on the source with its residual blocks modulated
(FiLM) by a code read off the driving frame: no warps, no volume. --self_fraction F makes
that share of the training pairs self-reconstructions.

Frames: `evaluate face_latent`'s reader (read_clips), --frames_per_clip per train clip held in
memory, uint8 -> [-1, 1] by data_pipeline.transforms.to_signed_float; no augmentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import configs
from data_pipeline.transforms import to_signed_float
from vasa_jax import losses, optim
from vasa_jax.evaluate import face_latent as evaluator
from vasa_jax.models import layers
from vasa_jax.models.face_latent import FaceLatentModel
from vasa_jax.trainers.face_latent import trainable_params

PARTS = ("blocks3d", "warp_sc", "g3d", "warp_cd")
PAIRS = ("self", "cross")


class ConvAutoencoder(nnx.Module):
    """The baseline: 3 convs down to [S/4, S/4, 128], 2 residual blocks, 2 transposed convs.

    images [B, S, S, 3] in [-1, 1] -> [B, S, S, 3] (tanh). 0.92M parameters at width 128.
    """

    def __init__(self, width: int = 128, *, rngs: nnx.Rngs):
        w = width
        self.down = nnx.List([nnx.Conv(3, w // 4, (3, 3), rngs=rngs),
                              nnx.Conv(w // 4, w // 2, (4, 4), strides=2, rngs=rngs),
                              nnx.Conv(w // 2, w, (4, 4), strides=2, rngs=rngs)])
        self.res = nnx.List([nnx.List([nnx.Conv(w, w, (3, 3), rngs=rngs),
                                       nnx.Conv(w, w, (3, 3), rngs=rngs)]) for _ in range(2)])
        self.up = nnx.List([nnx.ConvTranspose(w, w // 2, (4, 4), strides=(2, 2), rngs=rngs),
                            nnx.ConvTranspose(w // 2, 3, (4, 4), strides=(2, 2), rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.down:
            x = jax.nn.relu(conv(x))
        for a, b in self.res:
            x = x + b(jax.nn.relu(a(x)))
        x = jax.nn.relu(self.up[0](x))
        return jnp.tanh(self.up[1](x))


class MotionAutoencoder(nnx.Module):
    """The reenactment baseline: ConvAutoencoder's path on the source, its residual blocks
    modulated (FiLM) by a code read off the driving frame by a small CNN; no warps, no
    volume. source, driving [B, S, S, 3] -> [B, S, S, 3]. The code has the size of
    (z_pose, z_dyn) of the config (7 + model.motion.dyn_dim).
    """

    def __init__(self, code_dim: int, width: int = 128, *, rngs: nnx.Rngs):
        self.ae = ConvAutoencoder(width, rngs=rngs)
        w = width
        self.motion = nnx.List([nnx.Conv(3, w // 8, (4, 4), strides=2, rngs=rngs),
                                nnx.Conv(w // 8, w // 4, (4, 4), strides=2, rngs=rngs),
                                nnx.Conv(w // 4, w // 2, (4, 4), strides=2, rngs=rngs)])
        self.to_code = nnx.Linear(8 * 8 * (w // 2), code_dim, rngs=rngs)
        self.film = nnx.List([nnx.Linear(code_dim, 2 * w, rngs=rngs) for _ in self.ae.res])

    def __call__(self, x: jax.Array, driving: jax.Array) -> jax.Array:
        m = driving
        for conv in self.motion:
            m = jax.nn.relu(conv(m))
        code = self.to_code(jax.image.resize(m, (m.shape[0], 8, 8, m.shape[-1]), "linear")
                            .reshape(m.shape[0], -1))
        for conv in self.ae.down:
            x = jax.nn.relu(conv(x))
        for (a, b), film in zip(self.ae.res, self.film):
            gamma, beta = jnp.split(film(code)[:, None, None, :], 2, axis=-1)
            x = x + b(jax.nn.relu(a(x) * (1 + gamma) + beta))
        x = jax.nn.relu(self.ae.up[0](x))
        return jnp.tanh(self.ae.up[1](x))


class Stage1Path(nnx.Module):
    """The stage-1 generator, reconstructing each image from itself with `parts` switched on.

    Without warps the volume goes straight to the projection; without g3d, V_app is the
    (un-warped) posed volume. The pose and dynamics are the image's own (E_mtn).
    """

    def __init__(self, model_cfg, parts: tuple[str, ...], *, rngs: nnx.Rngs):
        self.model = FaceLatentModel(model_cfg, rngs=rngs)
        self.parts = parts

    def __call__(self, x: jax.Array, driving: jax.Array | None = None) -> jax.Array:
        """x [B, S, S, 3] -> reconstruction; with `driving`, the whole model's reenactment."""
        m = self.model
        if driving is not None:
            return m(x, driving)
        v = m.app_encoder(x)
        modulated = m.decoder.dyn_modulation
        if "warp_sc" in self.parts or "warp_cd" in self.parts or modulated:
            z_pose, z_dyn = m.encode_motion(x)
            z_id = m.id_encoder(x)
        if "warp_sc" in self.parts:
            v = m.warp_to_canonical(v, z_pose, z_dyn, z_id)
        if "g3d" in self.parts:
            v = m.g3d(v)
        if "warp_cd" in self.parts:
            v = m.decoder.warp(v, z_pose, z_dyn, z_id)
        return m.decoder.generator(m.decoder.projection(v), z_dyn if modulated else None)


def build(args, config):
    rngs = nnx.Rngs(args.seed)
    if args.net == "ae":
        return ConvAutoencoder(args.ae_width, rngs=rngs)
    if args.net == "ae_motion":
        return MotionAutoencoder(7 + config.model.motion.dyn_dim, args.ae_width, rngs=rngs)
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"--parts: unknown {sorted(unknown)}; choose from {PARTS}")
    if "blocks3d" not in parts:
        config.model.app.blocks_3d = 0
    net = Stage1Path(config.model, parts, rngs=rngs)
    if config.model.motion.pretrained_pose:
        from vasa_jax.models.face_pose import load_pose_params

        nnx.update(net.model.motion_encoder.pose_net,
                   load_pose_params(config.model.motion.pretrained_pose, config.model))
    if args.no_final_norm:  # affine only (layers.GroupNorm with groups 0)
        net.model.app_encoder.norm.groups = 0
        net.model.decoder.generator.norm.groups = 0
    return net


def region_psnr(pred: np.ndarray, target: np.ndarray, masks: dict[str, np.ndarray]) -> dict:
    """Mean over images of the PSNR (dB, range [-1, 1]) in the whole frame and every mask."""
    err = np.square(pred.astype(np.float64) - target)  # [N, S, S, 3]
    out = {}
    for name, mask in {"frame": None, **masks}.items():
        w = np.ones(err.shape[1:3]) if mask is None else mask
        mse = (err * w[None, :, :, None]).sum((1, 2, 3)) / (3 * w.sum())
        out[name] = float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-10))))
    return out


def run(args, config, log=print) -> dict:
    """Trains and evaluates; returns {"records": [per evaluation], "copy": the copy floor}."""
    size = config.model.image_size
    train, _ = evaluator.read_clips(args.data, "train", size, max_clips=args.train_clips,
                                    frames_per_clip=args.frames_per_clip, include_first=False,
                                    progress=False)
    cross = args.pairs == "cross"
    # --pairs cross: each held-out clip's first frame is the source of its other frames.
    test, _ = evaluator.read_clips(args.data, "test", size, max_clips=None,
                                   frames_per_clip=args.test_frames_per_clip,
                                   include_first=cross, progress=False)
    # The frame each held-out frame is compared with by the copy floor (and driven from).
    firsts = np.concatenate([np.repeat(c.frames[:1], len(c.frames) - cross, 0) for c in test])
    sources = to_signed_float(firsts)
    if cross:
        test = [dataclasses.replace(c, frames=c.frames[1:]) for c in test]
    frames = np.concatenate([c.frames for c in train])
    per_clip = len(train[0].frames)  # read_clips gives every clip the same frame count
    held_out = to_signed_float(np.concatenate([c.frames for c in test]))
    masks = {name: losses.face_region_mask(size, {name: box}).astype(np.float64)
             for name, box in losses.FACE_REGIONS.items()}
    # The floor of a model that moves nothing: the clip's first frame (skipped in self mode
    # when every held-out frame is a clip's first).
    copy = region_psnr(sources, held_out, masks) if cross or len(test[0].frames) > 1 else {}

    if args.pairs not in {"ae": ("self",), "ae_motion": ("cross",)}.get(args.net, PAIRS):
        raise ValueError(f"--net {args.net} does not do --pairs {args.pairs} (ae: self; "
                         "ae_motion: cross; stage1: both)")
    model = build(args, config)
    if args.optim == "adam":
        tx = optax.adam(args.lr)
    else:
        config.optim.lr = args.lr
        tx = optim.build_optimizer(config.optim, args.steps)
    wrt = trainable_params(config)  # the trainer's: without a frozen pre-trained pose net
    opt = nnx.Optimizer(model, tx, wrt=wrt)
    graphdef, state = nnx.split((model, opt))
    ema = nnx.state(model, nnx.Param) if args.ema else None
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    log(f"{args.net} parts={args.parts!r}: {n_params / 1e6:.2f}M parameters, "
        f"{len(frames)} train frames, {len(held_out)} held-out frames")

    @jax.jit
    def step(state, ema, x, target):
        model, opt = nnx.merge(graphdef, state)

        def loss_fn(m):
            return losses.l1_loss(m(x, target) if cross else m(x), target)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        opt.update(model, grads)
        if ema is not None:
            ema = jax.tree.map(lambda e, p: args.ema * e + (1 - args.ema) * p, ema,
                               nnx.state(model, nnx.Param))
        return nnx.state((model, opt)), ema, loss

    @jax.jit
    def predict(state, ema, x, driving):
        model, _ = nnx.merge(graphdef, state)
        if ema is not None:
            nnx.update(model, ema)
        return model(x, driving) if cross else model(x)

    def evaluate():
        inputs = sources if cross else held_out
        pred = np.concatenate([
            np.asarray(predict(state, ema, inputs[i:i + 64], held_out[i:i + 64]))
            for i in range(0, len(held_out), 64)])
        return pred, region_psnr(pred, held_out, masks)

    rng = np.random.default_rng(args.seed)
    records, trained_s, window = [], 0.0, []
    for s in range(1, args.steps + 1):
        drive = rng.integers(0, len(frames), args.batch_size)
        src = drive
        if cross:  # another frame of the same clip (the frame itself for --self_fraction)
            other = drive - drive % per_clip + rng.integers(0, per_clip, args.batch_size)
            src = np.where(rng.random(args.batch_size) < args.self_fraction, drive, other)
        x, target = to_signed_float(frames[src]), to_signed_float(frames[drive])
        t0 = time.perf_counter()
        state, ema, loss = step(state, ema, x, target)
        window.append(float(loss))
        trained_s += time.perf_counter() - t0
        if s % args.eval_every == 0 or s == args.steps:
            pred, psnr = evaluate()
            rec = {"step": s, "train_seconds": round(trained_s, 1),
                   "loss": float(np.mean(window)), **{f"psnr/{k}": v for k, v in psnr.items()}}
            records.append(rec)
            window = []
            log(f"step {s:5d}  {trained_s:6.0f}s  loss {rec['loss']:.4f}  " + "  ".join(
                f"{k} {v:.2f} dB" for k, v in psnr.items()))
    if copy:
        log("copying the clip's first frame: " + "  ".join(f"{k} {v:.2f} dB"
                                                            for k, v in copy.items()))
    if args.figure:
        _save_figure(args.figure, held_out, pred)
    return {"records": records, "copy": copy}


def _save_figure(path: str, target: np.ndarray, pred: np.ndarray, n: int = 8) -> None:
    """Top row: held-out frames; bottom row: their reconstructions (PNG)."""
    import cv2

    idx = np.linspace(0, len(target) - 1, n).astype(int)
    rows = [np.concatenate(list(a[idx]), axis=1) for a in (target, pred)]
    grid = ((np.concatenate(rows, axis=0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    cv2.imwrite(path, cv2.cvtColor(cv2.resize(grid, None, fx=2, fy=2,
                                              interpolation=cv2.INTER_NEAREST),
                                   cv2.COLOR_RGB2BGR))


def main(argv=None) -> int:

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a SynthTalk dataset (train and test splits)")
    p.add_argument("--net", choices=("ae", "ae_motion", "stage1"), default="stage1")
    p.add_argument("--parts", default="", help=f"comma-separated subset of {PARTS}")
    p.add_argument("--config", default="configs/face_latent.py:size=tiny")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--optim", choices=("adam", "config"), default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pairs", choices=PAIRS, default="self",
                   help="self: reconstruct each frame from itself; cross: drive a clip's "
                   "frame from another of its frames (the whole model)")
    p.add_argument("--self_fraction", type=float, default=0.0,
                   help="--pairs cross: share of training pairs whose source is the target")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the evaluated weights")
    p.add_argument("--steps", type=int, default=1300)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--eval_every", type=int, default=432)
    p.add_argument("--train_clips", type=int, default=None)
    p.add_argument("--frames_per_clip", type=int, default=100)
    p.add_argument("--test_frames_per_clip", type=int, default=8)
    p.add_argument("--ae_width", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_ws", action="store_true", help="no weight standardisation")
    p.add_argument("--no_final_norm", action="store_true",
                   help="no GroupNorm before E_app's volume conv and G2D's RGB conv")
    p.add_argument("--figure", default=None, help="write held-out frames / outputs as PNG")
    p.add_argument("--out", default=None, help="append the records as one JSON line")
    args = p.parse_args(argv)
    if args.no_ws:
        layers.standardize_kernel = lambda kernel, eps=1e-5: kernel.astype(jnp.float32)
    try:
        config = configs.load(args.config, **configs.parse_overrides(args.set))
        result = run(args, config)
    except ValueError as e:
        p.error(str(e))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({"settings": vars(args), **result}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
