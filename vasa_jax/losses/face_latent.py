"""Stage-1 face latent losses (VASA-1 sec 3.1): reconstruction L1, l_consist, l_cross-id.

All functions are pure: they take arrays and callables (the decoder, the face-ID embedder),
so they do not depend on how the face latent model is built. A latent is anything with
fields v_app, z_id, z_pose, z_dyn (`vasa_jax.models.face_latent.FaceLatent`):

    v_app [B, D, H, W, C], z_id [B, Di], z_pose [B, Dp], z_dyn [B, Dd]
    decode(v_app, z_id, z_pose, z_dyn) -> images [B, S, S, 3] in [-1, 1]

Region weights. MegaPortraits and VASA-1 emphasise nothing by region, but talking-face
training often up-weights the eyes and mouth (small areas that carry the motion; EMOPortraits
weights them 500 to 1). `box_weights` builds per-image maps from per-frame boxes (SynthTalk's
`mouth_box` / `eyes_box` labels, or boxes from landmarks); without them
`face_region_weights` builds a fixed map from boxes in normalised coordinates of an aligned,
centred face crop. Any per-pixel map [B, H, W, 1] can be passed to `l1_loss`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Decoder = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
Distance = Callable[[jax.Array, jax.Array], jax.Array]

# (x0, y0, x1, y1) in [0, 1] image coordinates (x right, y down) of an aligned face crop
# (data_pipeline.schema.FACE_CROP_HEIGHT: brow-to-chin ~70% of the height, centred; the
# SynthTalk default framing "face"): a band over both eyes and a box around the mouth,
# loose on purpose because heads move. Measured from SynthTalk's per-frame `eyes_box` /
# `mouth_box` labels over 8000 frames (identities 0-39 of seed 0, 8 s each, formant speech,
# the motion generator's head motion; the boxes depend on the geometry only, not on the
# pixels): each side is the 5th (x0, y0) / 95th (x1, y1) percentile of that side over all
# frames, rounded outwards to 0.01. The label box lies wholly inside these boxes in 85%
# (mouth) / 84% (eyes) of those frames, 97% / 98% of its area on average, and its centre
# in 99% / 100%; on a rendered corpus (`python -m data_pipeline.synthtalk --num_identities
# 4 --clips_per_identity 2 --seconds 2 --size 64 --seed 0`, espeak speech, 400 frames):
# 88% / 82% wholly inside, 97% / 99% of the area. Not for "portrait"-framed SynthTalk.
FACE_REGIONS: Mapping[str, tuple[float, float, float, float]] = {
    "eyes": (0.13, 0.12, 0.83, 0.41),
    "mouth": (0.26, 0.50, 0.73, 0.78),
}


def face_region_weights(
    size: int | tuple[int, int],
    *,
    region_weight: float | Mapping[str, float] = 2.0,
    regions: Mapping[str, tuple[float, float, float, float]] = FACE_REGIONS,
) -> np.ndarray:
    """A landmark-free per-pixel weight map: 1 + region_weight inside any region box.

    size: S (square) or (H, W). regions: name -> (x0, y0, x1, y1) in [0, 1]; a pixel is in a
    box if its centre is. region_weight: one weight for every region, or name -> weight.
    Overlapping boxes do not add up (a pixel takes the largest weight of its boxes).
    Returns float32 [H, W, 1], to broadcast against [B, H, W, C] in `l1_loss`.
    """
    weights = ({n: float(region_weight[n]) for n in regions} if isinstance(region_weight, Mapping)
               else dict.fromkeys(regions, float(region_weight)))
    if min(weights.values(), default=0.0) < 0:
        raise ValueError(f"region weights must be >= 0, got {region_weight}")
    extra = np.zeros(face_region_mask(size, {}).shape, np.float32)
    for name, box in regions.items():
        extra = np.maximum(extra, weights[name] * face_region_mask(size, {name: box}))
    return (1.0 + extra).astype(np.float32)[..., None]


def face_region_mask(
    size: int | tuple[int, int],
    regions: Mapping[str, tuple[float, float, float, float]] = FACE_REGIONS,
) -> np.ndarray:
    """bool [H, W]: the pixels (by their centres) inside any of the `regions` boxes
    ((x0, y0, x1, y1) in [0, 1]); size S (square) or (H, W)."""
    h, w = (size, size) if isinstance(size, int) else size
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size}")
    ys = (np.arange(h) + 0.5) / h
    xs = (np.arange(w) + 0.5) / w
    inside = np.zeros((h, w), bool)
    for name, (x0, y0, x1, y1) in regions.items():
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"region {name!r} box {(x0, y0, x1, y1)} is not inside [0, 1]^2")
        inside |= ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return inside


def box_weights(boxes: jax.Array, size: int, *,
                region_weight: float | Sequence[float]) -> jax.Array:
    """Per-image weight maps from per-image region boxes: 1 + region_weight inside any box.

    boxes: [B, K, 4] (x0, y0, x1, y1) in [0, 1] image coordinates (e.g. the stacked
    `mouth_box`, `eyes_box` labels of data_pipeline.schema.BOX_LABELS); a pixel is inside
    if its centre is. region_weight: one weight, or K (one per box; where boxes overlap a
    pixel takes the largest). Returns float32 [B, size, size, 1] for `l1_loss`.
    """
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [B, K, 4], got {boxes.shape}")
    per_box = np.broadcast_to(np.asarray(region_weight, np.float32), (boxes.shape[1],))
    if per_box.min(initial=0.0) < 0:
        raise ValueError(f"region weights must be >= 0, got {region_weight}")
    centres = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
    b = boxes.astype(jnp.float32)[:, :, :, None]  # [B, K, 4, 1]
    in_x = (centres >= b[:, :, 0]) & (centres < b[:, :, 2])  # [B, K, S]
    in_y = (centres >= b[:, :, 1]) & (centres < b[:, :, 3])
    inside = in_y[:, :, :, None] & in_x[:, :, None, :]  # [B, K, S, S]
    extra = jnp.max(inside * jnp.asarray(per_box)[None, :, None, None], axis=1, initial=0.0)
    return (1.0 + extra)[..., None]


def l1_loss(x: jax.Array, y: jax.Array, weights: jax.Array | np.ndarray | None = None) -> jax.Array:
    """(Weighted) mean absolute error between images.

    x, y: [B, H, W, C]. weights: None (plain mean), or a non-negative per-pixel map
      [H, W, 1] or [B, H, W, 1] (e.g. `face_region_weights`, a foreground mask).
    Returns the float32 scalar sum(w |x - y|) / (C * sum(w)): a weighted average, so a
    constant map gives the plain L1 and the scale does not depend on the weights' sum.
    """
    if x.shape != y.shape:
        raise ValueError(f"l1_loss: shapes differ: {x.shape} vs {y.shape}")
    diff = jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))
    if weights is None:
        return jnp.mean(diff)
    w = jnp.asarray(weights, jnp.float32)
    if w.ndim == 3:
        w = w[None]
    if w.ndim != 4 or w.shape[-1] != 1 or w.shape[1:3] != x.shape[1:3] or w.shape[0] not in (
            1, x.shape[0]):
        raise ValueError(f"weights must be [H, W, 1] or [B, H, W, 1] for images {x.shape}, "
                         f"got {jnp.shape(weights)}")
    w = jnp.broadcast_to(w, x.shape[:3] + (1,))
    return jnp.sum(w * diff) / jnp.maximum(jnp.sum(w) * x.shape[-1], 1e-8)


def _field(latent: Any, name: str) -> jax.Array:
    try:
        return getattr(latent, name)
    except AttributeError:
        raise TypeError(f"latent {type(latent).__name__} has no field {name!r}; expected "
                        "v_app, z_id, z_pose, z_dyn (FaceLatent)") from None


def consistency_pair(decode: Decoder, lat_i: Any, lat_j: Any) -> tuple[jax.Array, jax.Array]:
    """The two images VASA-1's l_consist compares, for frames i, j of one video.

        a = D(V_app^j, z_id^j, z_pose^i, z_dyn^j)   frame j re-posed with frame i's pose
        b = D(V_app^i, z_id^i, z_pose^i, z_dyn^j)   frame i given frame j's dynamics

    Both should show pose i with dynamics j: pose transfer and dynamics transfer commute
    only if z_pose carries no expression and z_dyn no pose (the paper's ablation: without
    this loss, dynamics leak into pose). One decode call on the two stacked along the batch
    (the decoder must treat batch elements independently, e.g. GroupNorm, not BatchNorm).

    Returns (a, b), each [B, S, S, 3].
    """
    v_i, id_i, pose_i = (_field(lat_i, n) for n in ("v_app", "z_id", "z_pose"))
    v_j, id_j, dyn_j = (_field(lat_j, n) for n in ("v_app", "z_id", "z_dyn"))
    batch = v_i.shape[0]
    both = decode(
        jnp.concatenate([v_j, v_i], axis=0),
        jnp.concatenate([id_j, id_i], axis=0),
        jnp.concatenate([pose_i, pose_i], axis=0),
        jnp.concatenate([dyn_j, dyn_j], axis=0),
    )
    if both.shape[0] != 2 * batch:
        raise ValueError(f"decode returned batch {both.shape[0]} for {2 * batch} inputs")
    return both[:batch], both[batch:]


def consistency_loss(
    decode: Decoder, lat_i: Any, lat_j: Any, *, distance: Distance | None = None,
) -> jax.Array:
    """VASA-1 l_consist: distance(D(V_app^j, z_id^j, z_pose^i, z_dyn^j),
    D(V_app^i, z_id^i, z_pose^i, z_dyn^j)) for frames i, j of the same video.

    decode: (v_app, z_id, z_pose, z_dyn) -> images [N, S, S, 3].
    lat_i, lat_j: latents (FaceLatent) of frames i and j, batch B.
    distance: (a, b) -> scalar; default `l1_loss`. The paper does not name it; pass e.g.
      `lambda a, b: l1_loss(a, b) + perceptual_loss(vgg, a, b)` to add a perceptual term.
      The comparison is symmetric: gradients flow into both images (neither is a target).
    Returns a float32 scalar; it is 0 exactly when the two transfers give the same image.
    """
    a, b = consistency_pair(decode, lat_i, lat_j)
    return (l1_loss if distance is None else distance)(a, b)


def spread_loss(z: jax.Array, target: float = 1.0, eps: float = 1e-4) -> jax.Array:
    """VICReg's variance term: mean over dimensions of max(0, target - std over the batch).

    z [N, D] (N >= 2) -> float32 scalar, 0 once every dimension's standard deviation over
    the N samples reaches `target`. Keeps a code (z_dyn) from collapsing to a constant; it
    says nothing about what the code carries.
    """
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"spread_loss needs [N >= 2, D], got {z.shape}")
    std = jnp.sqrt(jnp.var(z.astype(jnp.float32), axis=0) + eps)
    return jnp.mean(jax.nn.relu(target - std))


def cross_correlation_loss(a: jax.Array, b: jax.Array, eps: float = 1e-4) -> jax.Array:
    """Mean over (i, j) of corr(a_i, b_j)^2, the Pearson correlations over the batch.

    a [N, D], b [N, E] (N >= 3) -> float32 scalar in [0, 1]; 0 when every column of a is
    uncorrelated with every column of b in the batch. With b = stop_gradient(head pose)
    and a = z_dyn it pushes linear pose information out of z_dyn (what a linear probe of
    pose from z_dyn reads). A batch of N independent columns still scores about 1/(N-1).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0] or a.shape[0] < 3:
        raise ValueError(f"cross_correlation_loss needs [N >= 3, D] and [N, E], got "
                         f"{a.shape}, {b.shape}")

    def standardise(x):
        x = x.astype(jnp.float32)
        x = x - jnp.mean(x, axis=0)
        return x / jnp.sqrt(jnp.mean(jnp.square(x), axis=0) + eps)

    corr = standardise(a).T @ standardise(b) / a.shape[0]  # [D, E]
    return jnp.mean(jnp.square(corr))


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Row-wise cosine similarity of [B, E] and [B, E] -> [B] (inputs need not be unit norm)."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1), eps * eps))
    nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=-1), eps * eps))
    return jnp.sum(a * b, axis=-1) / (na * nb)


def cross_identity_loss(
    face_id_embed: Callable[[jax.Array], jax.Array],
    decoded_cross: jax.Array,
    source_images: jax.Array,
) -> jax.Array:
    """VASA-1 l_cross-id: 1 - cos(E(D(V_app^s, z_id^s, z_pose^d, z_dyn^d)), E(I_s)).

    For a source subject s and a driver d of ANOTHER subject, the caller decodes s's
    appearance and identity with d's pose and dynamics (`decoded_cross`); the face-ID
    embedding E of that image must match the one of s's own image I_s, i.e. driving by
    someone else must not change who the face is. The paper uses ArcFace features; here E
    is any images [N, S, S, 3] in [-1, 1] -> [N, E] embedder (`vasa_jax.models.face_id`),
    frozen (the trainer does not optimise it). Gradients flow through E into
    `decoded_cross` only; E(I_s) is a constant target.

    decoded_cross, source_images: [B, S, S, 3] in [-1, 1].
    Returns the float32 scalar mean over the batch of 1 - cosine, in [0, 2]: 0 for the same
    embedding direction, 1 for orthogonal ones, 2 for opposite ones.
    """
    if decoded_cross.shape[0] != source_images.shape[0]:
        raise ValueError(f"batch sizes differ: {decoded_cross.shape} vs {source_images.shape}")
    target = jax.lax.stop_gradient(face_id_embed(jax.lax.stop_gradient(source_images)))
    return jnp.mean(1.0 - cosine_similarity(face_id_embed(decoded_cross), target))
