"""VASA-1's disentangled face latent model (sec 3.1): encoders, warps, G3D and the decoder.

    encode(I)  -> FaceLatent(v_app, z_id, z_pose, z_dyn)
                  v_app = G3D(w_s->c(E_app(I); z_pose, z_dyn, z_id))    [B, D, H, W, C]
    decode(v_app, z_id, z_pose, z_dyn) -> image                          [B, S, S, 3]
    model(source, driving) = decode(appearance + identity of source,
                                    pose + dynamics of driving)

Built from the `model` section of configs/face_latent.py:

    model = FaceLatentModel(config.model, rngs=nnx.Rngs(config.seed))   # eager init
    model = create_model(config.model, config.seed)                     # one jitted init

For inference, encode the portrait once (v_app, z_id) and decode each frame from the motion
(z_pose, z_dyn) the diffusion model generates. Full size (512 px, 190M parameters): encode
~1.4 TFLOP per portrait, decode ~0.57 TFLOP per frame (scripts/count_params.py --flops).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, struct

from vasa_jax.models import face_decoder, face_encoders, warping


@struct.dataclass
class FaceLatent:
    """The four factors of a face image (a pytree).

    v_app: [B, D, H, W, C] canonical appearance volume.
    z_id: [B, id_dim] identity code.
    z_pose: [B, 7] head pose (warping.POSE_FIELDS; angles in radians).
    z_dyn: [B, dyn_dim] facial dynamics code.
    """

    v_app: jax.Array
    z_id: jax.Array
    z_pose: jax.Array
    z_dyn: jax.Array


def dtypes(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Compute and parameter dtypes of a model config ("float32" / "bfloat16")."""
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def warp_kwargs(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    w = cfg.warp
    return dict(
        seed_channels=w.seed_channels, channels=tuple(w.channels), hidden=w.hidden,
        max_flow=w.max_flow, pivot_depth=w.get("pivot_depth", 0.0),
    )


def motion_encoder(cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs
                   ) -> face_encoders.MotionEncoder:
    """E_mtn as the model config `cfg` builds it (also for pre-training its pose net alone:
    vasa_jax.models.face_pose)."""
    m = cfg.motion
    return face_encoders.MotionEncoder(
        image_size=cfg.image_size, input_size=m.input_size, stem=m.stem,
        channels=tuple(m.channels), blocks=tuple(m.blocks), dyn_dim=m.dyn_dim,
        max_angles_deg=tuple(m.max_angles_deg), max_translation=m.max_translation,
        max_log_scale=m.max_log_scale, groups=cfg.groups, pool=m.pool,
        dyn_groups=m.get("dyn_groups"), dyn_pool=m.get("dyn_pool"),
        glimpse_widths=tuple(m.get("glimpse_widths", ())),
        glimpse_roll=bool(m.get("glimpse_roll", False)),
        dyn_split=bool(m.get("dyn_split", False)), **dtypes(cfg),
        rngs=rngs,
    )


class FaceLatentModel(nnx.Module):
    """The generator of stage 1. Submodules (parameter groups):

    app_encoder (E_app), id_encoder (E_id), motion_encoder (E_mtn: pose_net + dyn_net),
    warp_to_canonical (w_s->c), g3d (G3D), decoder (w_c->d, projection, G2D).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        kw = dict(**dtypes(cfg), rngs=rngs)
        v = cfg.volume
        volume_shape = (v.depth, v.size, v.size)
        self.image_size = cfg.image_size
        self.volume_shape = volume_shape
        self.volume_channels = v.channels
        self.app_encoder = face_encoders.AppearanceEncoder(
            image_size=cfg.image_size, stem=cfg.app.stem, channels=tuple(cfg.app.channels),
            volume_shape=volume_shape, volume_channels=v.channels, blocks_3d=cfg.app.blocks_3d,
            groups=cfg.groups, depth_sigma=cfg.app.get("depth_sigma", 0.0), remat=cfg.remat,
            **kw,
        )
        self.id_encoder = face_encoders.IdentityEncoder(
            image_size=cfg.image_size, input_size=cfg.id.input_size, stem=cfg.id.stem,
            channels=tuple(cfg.id.channels), blocks=tuple(cfg.id.blocks), out_dim=cfg.id.dim,
            groups=cfg.groups, **kw,
        )
        m = cfg.motion
        self.motion_encoder = motion_encoder(cfg, rngs=rngs)
        self.warp_to_canonical = warping.WarpGenerator(
            "to_canonical", dyn_dim=m.dyn_dim, id_dim=cfg.id.dim, volume_shape=volume_shape,
            groups=cfg.groups, remat=cfg.remat, **warp_kwargs(cfg), **kw,
        )
        self.g3d = face_encoders.CanonicalVolumeGenerator(
            volume_channels=v.channels, volume_shape=volume_shape, channels=tuple(cfg.g3d.channels),
            blocks=cfg.g3d.blocks, groups=cfg.groups, remat=cfg.remat, **kw,
        )
        d = cfg.decoder
        self.decoder = face_decoder.FaceDecoder(
            volume_channels=v.channels, volume_shape=volume_shape, dyn_dim=m.dyn_dim,
            id_dim=cfg.id.dim, warp=warp_kwargs(cfg), channels=d.channels, blocks=d.blocks,
            up_channels=tuple(d.up_channels), groups=cfg.groups,
            dyn_modulation=d.get("dyn_modulation", False),
            dyn_volume_channels=d.get("dyn_volume_channels", 0),
            conv_before_up=d.get("conv_before_up", False), remat=cfg.remat, **kw,
        )

    def encode_motion(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, S, S, 3] in [-1, 1] -> (z_pose [B, 7], z_dyn [B, dyn_dim])."""
        return self.motion_encoder(images)

    def encode_appearance(
        self, images: jax.Array, z_pose: jax.Array, z_dyn: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """images + their motion codes -> (v_app [B, D, H, W, C], z_id [B, id_dim]).

        The posed volume is un-warped with the image's own pose and dynamics, then refined
        by G3D.
        """
        z_id = self.id_encoder(images)
        posed = self.app_encoder(images)
        canonical = self.warp_to_canonical(posed, z_pose, z_dyn, z_id)
        return self.g3d(canonical), z_id

    def encode(self, images: jax.Array) -> FaceLatent:
        """images [B, S, S, 3] in [-1, 1] -> FaceLatent of every image."""
        z_pose, z_dyn = self.encode_motion(images)
        v_app, z_id = self.encode_appearance(images, z_pose, z_dyn)
        return FaceLatent(v_app=v_app, z_id=z_id, z_pose=z_pose, z_dyn=z_dyn)

    def decode(
        self, v_app: jax.Array, z_id: jax.Array, z_pose: jax.Array, z_dyn: jax.Array
    ) -> jax.Array:
        """Factors (possibly from different frames) -> images [B, S, S, 3] in [-1, 1]."""
        return self.decoder(v_app, z_id, z_pose, z_dyn)

    def __call__(self, source: jax.Array, driving: jax.Array) -> jax.Array:
        """Reenactment: source's appearance and identity with driving's pose and dynamics.

        source, driving: [B, S, S, 3] -> [B, S, S, 3]. With driving = source this is
        the reconstruction of the source.
        """
        if source.shape != driving.shape:
            raise ValueError(f"source {source.shape} and driving {driving.shape} differ in shape")
        # One motion-encoder pass over both batches (half the calls, one compiled copy).
        z_pose, z_dyn = self.encode_motion(jnp.concatenate([source, driving], axis=0))
        b = source.shape[0]
        v_app, z_id = self.encode_appearance(source, z_pose[:b], z_dyn[:b])
        return self.decode(v_app, z_id, z_pose[b:], z_dyn[b:])


# ----------------------------------------------------------------------------- parameter counts


def count_params(module: nnx.Module) -> int:
    """Number of scalars in the module's nnx.Param variables (works on abstract modules)."""
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    return int(sum(np.prod(x.shape) for x in leaves))


def abstract_model(cfg: ml_collections.ConfigDict) -> FaceLatentModel:
    """The model with ShapeDtypeStruct parameters: no memory allocated, no FLOPs."""
    return nnx.eval_shape(lambda: FaceLatentModel(cfg, rngs=nnx.Rngs(0)))


def create_model(cfg: ml_collections.ConfigDict, key: jax.Array | int = 0) -> FaceLatentModel:
    """The model with real parameters, initialised by one jitted function (single device).

    Eager NNX init dispatches every initializer op on its own, which takes minutes for
    even the tiny model on a busy CPU. For sharded multi-device state use
    vasa_jax.parallel.sharding.create_sharded_state instead.
    key: an int seed or a PRNG key (e.g. jax.random.key(0, impl="unsafe_rbg"), whose
    init compiles several times faster on CPU than the default threefry).
    """
    graphdef = nnx.graphdef(abstract_model(cfg))
    state = jax.jit(lambda k: nnx.state(FaceLatentModel(cfg, rngs=nnx.Rngs(k))))(
        jax.random.key(key) if isinstance(key, int) else key
    )
    return nnx.merge(graphdef, state)


def param_counts(model: FaceLatentModel) -> dict[str, int]:
    """Parameter count of every group of the generator, and the total."""
    groups = {
        "app_encoder": model.app_encoder,
        "id_encoder": model.id_encoder,
        "motion_encoder.pose": model.motion_encoder.pose_net,
        "motion_encoder.dyn": model.motion_encoder.dyn_net,
        "warp_to_canonical": model.warp_to_canonical,
        "g3d": model.g3d,
        "decoder.warp_to_driving": model.decoder.warp,
        "decoder.projection": model.decoder.projection,
        "decoder.g2d": model.decoder.generator,
    }
    if model.decoder.expression is not None:
        groups["decoder.expression"] = model.decoder.expression
    counts = {name: count_params(m) for name, m in groups.items()}
    counts["total"] = count_params(model)
    if sum(v for k, v in counts.items() if k != "total") != counts["total"]:
        raise AssertionError(f"parameter groups do not cover the model: {counts}")
    return counts
