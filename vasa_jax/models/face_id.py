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

    python train.py --config configs/face_id.py:size=tiny --workdir OUT \
        --config.data.path=DIR [--config.train.total_steps=N] [--config.model.image_size=64]

(vasa_jax.trainers.face_id, a stage of the shared loop) ends by writing OUT/params
(`vasa_jax.checkpointing.export_params`) and OUT/face_id.json (model config, the run's
config, metrics) next to its checkpoints. `load_face_id(OUT)` gives the frozen embedder the
stage-1 trainer uses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

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
    """Writes PATH/params and PATH/face_id.json ({"model": config, ...extra}):
    checkpointing.export_module."""
    from vasa_jax.checkpointing import export_module  # orbax stays out of plain imports

    export_module(path, model, PARAMS_DIR, CONFIG_FILE,
                  {"model": config.to_json(), **(extra or {})})


def load_face_id_classifier(path: str) -> tuple[FaceIDClassifier, FaceIDConfig, dict]:
    """(classifier, config, the whole face_id.json) of a `save_face_id` export."""
    from vasa_jax.checkpointing import load_params

    meta_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"{meta_path} not found: train a face-ID model with `python train.py --config "
            "configs/face_id.py:size=tiny --workdir PATH --config.data.path=DIR`")
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


# ----------------------------------------------------------------------------- augmentation


def augment(images: jax.Array, key: jax.Array, flip_prob: float, blur_prob: float) -> jax.Array:
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
