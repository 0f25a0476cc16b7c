"""Face-ID embedder for VASA-1's l_cross-id, and its CosFace training on clip records.

VASA-1 compares ArcFace features of a source face and of that face driven by another
person. ArcFace weights cannot be downloaded here, and SynthTalk faces are not real faces
anyway, so this module trains a small identity CNN on the dataset's own identities:

    images [B, H, W, 3] in [-1, 1]
      -> centre crop (`crop` of the side: mostly face, little background)
      -> resize to image_size x image_size
      -> conv stem, pre-activation ResBlocks with 2x average-pool downsampling (GroupNorm,
         no BatchNorm: the frozen embedder must behave the same on any batch)
      -> GroupNorm, ReLU, global average pool, linear -> L2-normalised embedding [B, E]

Training: CosFace (large-margin cosine loss, Wang et al. 2018): logits = s (cos(e, w_c) -
m [c = label]) over the normalised class weights w_c, cross-entropy. Frames come from the
stage-1 loader (`data_pipeline.loaders.stage1_dataset`): each example gives a source and a
driving frame of one clip and a frame of another identity, i.e. three labelled faces. The
embedding is made robust to what l_cross-id feeds it (other poses and expressions of the
same face, rendered by an imperfect generator) by training on all frames of all clips with
geometric + colour jitter (loader), random horizontal flips and random blur (here).

What the embedding looks at matters: in l_cross-id the decoded image keeps the source's
hair and background (they come from V_app^s), so the loss only sees a driver's identity
leaking in if the embedding watches the inner face. Measured on SynthTalk (16 identities,
64 px, 300 steps; held-out accuracy 1.0): pasting another identity's central 40% (eyes,
nose, mouth) into a face drops its cosine to its own embedding to 0.51 (0.56 to the
donor's). Random erasing, tried as extra augmentation, raised that to 0.64 (it teaches the
network to ignore an occluded centre), so it is not used.

Held-out evaluation (the test split: other clips, so other poses and expressions, of the
training identities): identification accuracy of the cosine head, nearest-centroid
accuracy of the embedding alone (centroids from train-split frames), and the mean cosine
similarity of same-identity vs different-identity pairs.

    python -m vasa_jax.models.face_id train --data DIR --out OUT [--steps N] [--image_size 64]

writes OUT/params (`vasa_jax.checkpointing.export_params`) and OUT/face_id.json (model
config, training settings, metrics). `load_face_id(OUT)` gives the frozen embedder the
stage-1 trainer uses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from vasa_jax import cli, optim
from vasa_jax.models.layers import Conv, Dense, GroupNorm, ResBlock, make_param

CONFIG_FILE = "face_id.json"
PARAMS_DIR = "params"


@dataclasses.dataclass(frozen=True)
class FaceIDConfig:
    """Architecture and loss settings (saved with the params; `load_face_id` rebuilds it)."""

    num_classes: int  # training identities (the CosFace head's classes)
    image_size: int = 64  # side the centre crop is resized to
    crop: float = 0.7  # centre crop, fraction of the shorter side
    channels: tuple[int, ...] = (32, 64, 128, 256)  # one 2x-downsampling ResBlock each
    embed_dim: int = 128
    groups: int = 8  # GroupNorm groups
    scale: float = 16.0  # CosFace s
    margin: float = 0.2  # CosFace m

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 < self.crop <= 1.0:
            raise ValueError(f"crop must be in (0, 1], got {self.crop}")
        if not self.channels or self.image_size < 2 ** len(self.channels):
            raise ValueError(f"image_size {self.image_size} is too small for "
                             f"{len(self.channels)} downsampling stages")
        if self.scale <= 0 or not 0.0 <= self.margin < 1.0:
            raise ValueError(f"need scale > 0 and 0 <= margin < 1, got {self.scale}, "
                             f"{self.margin}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "FaceIDConfig":
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def center_crop_resize(images: jax.Array, crop: float, size: int) -> jax.Array:
    """[B, H, W, C] -> centre crop of side round(crop * min(H, W)) -> [B, size, size, C].

    Differentiable (linear interpolation, antialiased when shrinking), so l_cross-id's
    gradients reach the generated image.
    """
    _, h, w, c = images.shape
    side = max(1, int(round(crop * min(h, w))))
    y0, x0 = (h - side) // 2, (w - side) // 2
    x = images[:, y0 : y0 + side, x0 : x0 + side]
    if side != size:
        x = jax.image.resize(x, (x.shape[0], size, size, c), "linear", antialias=True)
    return x


class FaceIDNet(nnx.Module):
    """images [B, H, W, 3] in [-1, 1] (any H, W >= 8) -> unit-norm embeddings [B, E]."""

    def __init__(self, cfg: FaceIDConfig, *, rngs: nnx.Rngs):
        self.image_size = cfg.image_size
        self.crop = cfg.crop
        ch = cfg.channels
        # The first conv sees raw pixels: no weight standardisation (as in layers' convention).
        self.stem = Conv(3, ch[0], (3, 3), weight_std=False, rngs=rngs)
        self.blocks = nnx.List([
            ResBlock(cin, cout, ndim=2, down=(2, 2), groups=cfg.groups, rngs=rngs)
            for cin, cout in zip((ch[0],) + ch[:-1], ch)
        ])
        self.norm = GroupNorm(ch[-1], groups=cfg.groups, rngs=rngs)
        self.proj = Dense(ch[-1], cfg.embed_dim, names=("mlp", "embed"), rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 8:
            raise ValueError(f"FaceIDNet expects images [B, H, W, 3] with H, W >= 8, got "
                             f"{images.shape}")
        x = center_crop_resize(images.astype(jnp.float32), self.crop, self.image_size)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = jnp.mean(jax.nn.relu(self.norm(x)), axis=(1, 2))
        return _l2_normalize(self.proj(x))


class CosFaceHead(nnx.Module):
    """Cosine classifier: unit embeddings [B, E] -> cos(e, w_c) [B, num_classes]."""

    def __init__(self, embed_dim: int, num_classes: int, *, rngs: nnx.Rngs):
        self.weight = make_param(rngs, nnx.initializers.normal(1.0), (embed_dim, num_classes),
                                 ("embed", "mlp"), jnp.float32)

    def __call__(self, embeddings: jax.Array) -> jax.Array:
        w = self.weight[...]
        w = w * jax.lax.rsqrt(jnp.maximum(jnp.sum(w * w, axis=0, keepdims=True), 1e-12))
        return embeddings.astype(jnp.float32) @ w


class FaceIDClassifier(nnx.Module):
    """The embedder plus its training head (both are saved; only `net` is used frozen)."""

    def __init__(self, cfg: FaceIDConfig, *, rngs: nnx.Rngs):
        self.net = FaceIDNet(cfg, rngs=rngs)
        self.head = CosFaceHead(cfg.embed_dim, cfg.num_classes, rngs=rngs)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, 3] -> (embeddings [B, E], cosines [B, num_classes])."""
        emb = self.net(images)
        return emb, self.head(emb)


def cosface_loss(cosines: jax.Array, labels: jax.Array, scale: float, margin: float) -> jax.Array:
    """Large-margin cosine loss: CE(softmax(s (cos - m onehot))); cosines [B, N], labels [B]."""
    onehot = jax.nn.one_hot(labels, cosines.shape[-1], dtype=jnp.float32)
    logits = scale * (cosines - margin * onehot)
    return jnp.mean(optax.softmax_cross_entropy(logits, onehot))


# ----------------------------------------------------------------------------- frozen use


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array):
    """The module `graphdef` with `state`, applied (compiled once per graph and shape)."""
    return nnx.merge(graphdef, state)(images)


class FaceIDEmbedder:
    """A frozen face-ID embedding function: images [B, H, W, 3] in [-1, 1] -> [B, E].

    `embedder(images)` closes over the parameters (fine for this small network: inside a
    jitted step they become constants). `apply(params, images)` takes them explicitly, to
    pass them as a jit argument instead. No gradient ever reaches the parameters.
    """

    def __init__(self, net: FaceIDNet, config: FaceIDConfig):
        self.config = config
        self.graphdef, self.params = nnx.split(net)

    def apply(self, params: nnx.State, images: jax.Array) -> jax.Array:
        return _apply(self.graphdef, jax.lax.stop_gradient(params), images)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.apply(self.params, images)


def save_face_id(path: str, model: FaceIDClassifier, config: FaceIDConfig,
                 extra: dict | None = None) -> None:
    """Writes PATH/params (export_params) and PATH/face_id.json ({"model": config, ...extra})."""
    from vasa_jax.checkpointing import export_params  # orbax stays out of plain imports

    params_path = os.path.join(path, PARAMS_DIR)
    if os.path.exists(params_path):
        raise FileExistsError(f"{params_path} exists; face-ID exports are never overwritten")
    os.makedirs(path, exist_ok=True)
    export_params(params_path, nnx.state(model, nnx.Param))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"model": config.to_json(), **(extra or {})}, f, indent=2, sort_keys=True)


def load_face_id_classifier(path: str) -> tuple[FaceIDClassifier, FaceIDConfig, dict]:
    """(classifier, config, the whole face_id.json) of a `save_face_id` export."""
    from vasa_jax.checkpointing import load_params

    meta_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"{meta_path} not found: train a face-ID model with `python -m "
            "vasa_jax.models.face_id train --data DIR --out PATH`")
    with open(meta_path) as f:
        meta = json.load(f)
    config = FaceIDConfig.from_json(meta["model"])
    # Restore into an abstract model: no random initialisation of weights about to be
    # replaced (that costs more than the restore for a frozen helper loaded at start-up).
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: FaceIDClassifier(config,
                                                                           rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
    model = nnx.merge(graphdef, load_params(os.path.join(path, PARAMS_DIR), target=target))
    return model, config, meta


def load_face_id(path: str) -> FaceIDEmbedder:
    """The frozen embedder of a trained face-ID export (for l_cross-id)."""
    model, config, meta = load_face_id_classifier(path)
    logging.info("face-ID embedder from %s (held-out accuracy %s)", path,
                 meta.get("metrics", {}).get("head_accuracy"))
    return FaceIDEmbedder(model.net, config)


# ----------------------------------------------------------------------------- data


def _embed_all(model: FaceIDClassifier, images: np.ndarray, batch: int = 64):
    """(embeddings [N, E], cosines [N, C]) in fixed-size batches (one compilation)."""
    graphdef, state = nnx.split(model)
    embs, coss = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        pad = batch - len(x)
        e, c = _apply(graphdef, state, np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]))
        embs.append(np.asarray(e)[: len(x)])
        coss.append(np.asarray(c)[: len(x)])
    return np.concatenate(embs), np.concatenate(coss)


def evaluate(model: FaceIDClassifier, eval_images: np.ndarray, eval_ids: np.ndarray,
             gallery_images: np.ndarray | None = None,
             gallery_ids: np.ndarray | None = None) -> dict[str, float]:
    """Held-out identification metrics (see the module docstring); chance = 1 / classes."""
    emb, cos = _embed_all(model, eval_images)
    metrics = {
        "num_eval_frames": int(len(eval_ids)),
        "head_accuracy": float(np.mean(np.argmax(cos, -1) == eval_ids)),
    }
    sim = emb @ emb.T
    same = eval_ids[:, None] == eval_ids[None, :]
    off_diag = ~np.eye(len(eval_ids), dtype=bool)
    if (same & off_diag).any():
        metrics["same_identity_cos"] = float(sim[same & off_diag].mean())
    if (~same).any():
        metrics["other_identity_cos"] = float(sim[~same].mean())
    if gallery_images is not None:
        g_emb, _ = _embed_all(model, gallery_images)
        classes = np.unique(gallery_ids)
        centroids = np.stack([g_emb[gallery_ids == c].mean(0) for c in classes])
        centroids /= np.linalg.norm(centroids, axis=-1, keepdims=True) + 1e-12
        metrics["centroid_accuracy"] = float(
            np.mean(classes[np.argmax(emb @ centroids.T, -1)] == eval_ids))
    return metrics


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 3000
    batch_size: int = 32  # stage-1 examples per step; each gives 3 labelled faces
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 5e-4
    seed: int = 0
    num_workers: int = 2  # grain worker processes (0: read in this process)
    flip_prob: float = 0.5
    blur_prob: float = 0.3  # 2x down/up-sampling: robustness to soft generator output
    log_every: int = 100
    eval_frames_per_clip: int = 10
    eval_max_clips: int = 2000


def _augment(images: jax.Array, key: jax.Array, flip_prob: float, blur_prob: float) -> jax.Array:
    """Random horizontal flips and 2x blur per image: [N, H, W, 3] -> [N, H, W, 3].

    (Random erasing was tried and dropped: it made the embedding ignore the inner face,
    the very part l_cross-id must watch; see the module docstring.)
    """
    n, h, w, c = images.shape
    k_flip, k_blur = jax.random.split(key)
    flip = jax.random.bernoulli(k_flip, flip_prob, (n, 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1], images)
    small = jax.image.resize(images, (n, max(1, h // 2), max(1, w // 2), c), "linear",
                             antialias=True)
    blurred = jax.image.resize(small, images.shape, "linear")
    blur = jax.random.bernoulli(k_blur, blur_prob, (n, 1, 1, 1))
    return jnp.where(blur, blurred, images)


def _data_config(data_dir: str, split: str, image_size: int, batch_size: int, num_workers: int,
                 seed: int):
    from configs.common import data_stage1

    cfg = data_stage1("tiny")
    cfg.path = data_dir
    cfg.split = split
    cfg.image_size = image_size
    cfg.batch_size = batch_size
    cfg.num_workers = num_workers
    cfg.seed = seed
    # Stronger geometry than the generator's loader (identity must survive framing
    # changes); mild colour, since skin and hair colour are part of who someone is.
    cfg.aug.update(dict(scale=0.10, shift=0.06, brightness=0.2, contrast=0.2,
                        saturation=0.1, hue=0.01))
    return cfg


def train(data_dir: str, out_dir: str, *, image_size: int = 64, crop: float = 0.7,
          channels: Sequence[int] = (32, 64, 128, 256), embed_dim: int = 128,
          settings: TrainSettings = TrainSettings()) -> tuple[FaceIDClassifier, dict[str, Any]]:
    """Trains a face-ID embedder on the train split of `data_dir`, evaluates it on the test
    split (if any) and saves it to `out_dir` (see `save_face_id`).

    Returns (the trained classifier, the contents of face_id.json).
    """
    from data_pipeline import loaders, schema

    if settings.steps < 1 or settings.batch_size < 1:
        raise ValueError(f"need steps >= 1 and batch_size >= 1, got steps={settings.steps}, "
                         f"batch_size={settings.batch_size}")
    if os.path.exists(os.path.join(out_dir, PARAMS_DIR)):
        raise FileExistsError(f"{out_dir} already holds a face-ID export")
    info = schema.DatasetInfo.load(data_dir)
    index = loaders.load_clip_index(data_dir, "train")
    num_classes = max(int(info.num_identities), int(index.identity_id.max()) + 1)
    config = FaceIDConfig(num_classes=num_classes, image_size=image_size, crop=crop,
                          channels=tuple(channels), embed_dim=embed_dim)
    # Frames are read at the size the centre crop needs (capped at the stored size).
    load_size = min(max(info.height, 8), int(math.ceil(image_size / crop)))
    data_cfg = _data_config(data_dir, "train", load_size, settings.batch_size,
                            settings.num_workers, settings.seed)

    model = FaceIDClassifier(config, rngs=nnx.Rngs(settings.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optim.short_run_schedule(settings.lr, settings.warmup_steps, settings.steps)
    optimizer = optax.adamw(schedule, weight_decay=settings.weight_decay)
    opt_state = optimizer.init(params)

    def loss_fn(params, images, labels, key):
        images = _augment(images, key, settings.flip_prob, settings.blur_prob)
        _, cos = nnx.merge(graphdef, params)(images)
        loss = cosface_loss(cos, labels, config.scale, config.margin)
        return loss, jnp.mean(jnp.argmax(cos, -1) == labels)

    @jax.jit
    def train_step(params, opt_state, images, labels, key):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, labels, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    ds = loaders.stage1_dataset(data_cfg)
    key = jax.random.key(settings.seed)
    start = time.perf_counter()
    history = []
    for step, batch in zip(range(1, settings.steps + 1), iter(ds)):
        images = np.concatenate([batch["source"], batch["driving"], batch["cross"]])
        labels = np.concatenate([batch["identity"], batch["identity"], batch["cross_identity"]])
        key, sub = jax.random.split(key)
        params, opt_state, loss, acc = train_step(params, opt_state, images, labels, sub)
        if step % settings.log_every == 0 or step == settings.steps:
            loss, acc = float(loss), float(acc)
            history.append({"step": step, "loss": loss, "train_accuracy": acc})
            logging.info("face-ID step %d/%d: loss %.4f, train acc %.3f (%.1f steps/s)", step,
                         settings.steps, loss, acc, step / (time.perf_counter() - start))
    train_seconds = time.perf_counter() - start
    nnx.update(model, params)

    metrics: dict[str, Any] = {"chance": 1.0 / num_classes}
    try:
        held_out = loaders.read_frames(data_dir, "test", load_size,
                                       frames_per_clip=settings.eval_frames_per_clip,
                                       max_clips=settings.eval_max_clips)
    except FileNotFoundError:
        logging.warning("face-ID: %s has no test split; no held-out evaluation", data_dir)
    else:
        gallery = loaders.read_frames(data_dir, "train", load_size,
                                      frames_per_clip=settings.eval_frames_per_clip,
                                      max_clips=settings.eval_max_clips)
        metrics.update(evaluate(model, held_out.images, held_out.identity, gallery.images,
                                gallery.identity))
        logging.info("face-ID held-out: %s", metrics)
    meta = {
        "train": {**dataclasses.asdict(settings), "data": os.path.abspath(data_dir),
                  "load_size": load_size, "seconds": train_seconds},
        "history": history,
        "metrics": metrics,
    }
    save_face_id(out_dir, model, config, meta)
    return model, {"model": config.to_json(), **meta}


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m vasa_jax.models.face_id",
                                description="Face-ID embedder for l_cross-id.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train on a clip-record dataset's identities")
    p.add_argument("--data", required=True, help="clip-record dataset folder")
    p.add_argument("--out", required=True, help="output folder (params + face_id.json)")
    p.add_argument("--steps", type=int, default=TrainSettings.steps)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--crop", type=float, default=0.7)
    p.add_argument("--channels", type=cli.int_list, default="32,64,128,256",
                   help="comma-separated widths")
    p.add_argument("--embed_dim", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=TrainSettings.batch_size)
    p.add_argument("--lr", type=float, default=TrainSettings.lr)
    p.add_argument("--seed", type=int, default=TrainSettings.seed)
    p.add_argument("--num_workers", type=int, default=TrainSettings.num_workers)
    p.add_argument("--log_every", type=int, default=TrainSettings.log_every)
    args = parser.parse_args(argv)

    def run() -> dict[str, Any]:
        cli.check_output(args.out, "--out folder")  # before training, not after
        settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 seed=args.seed, num_workers=args.num_workers,
                                 log_every=args.log_every)
        return train(args.data, args.out, image_size=args.image_size, crop=args.crop,
                     channels=args.channels, embed_dim=args.embed_dim, settings=settings)[1]

    return cli.run_training(run)


if __name__ == "__main__":
    cli.run_main(main)
