"""Stage 1: trains VASA-1's face latent model (sec 3.1) with MegaPortraits' losses.

    python train.py --config configs/face_latent.py:size=tiny --workdir runs/face \
        --config.data.path=data/synthtalk

Each example is a triplet from `data_pipeline.loaders.stage1_dataset`: a source frame i and a
driving frame j of one clip, and a cross frame d of another identity. One jitted step
updates the generator G (FaceLatentModel) and then the discriminator D:

  generator loss (weights: config.loss; a zero weight removes the term)
    recon  = G.decode(V_app^i, z_id^i, z_pose^j, z_dyn^j)      self-reenactment, target frame j
    l1 * L1(recon, j)  +  perceptual * VGG19(recon, j)
    + adv * hinge_G(D(recon))  +  fm * FM(D(j), D(recon))       from loss.gan_start_step on
    + consist * L1(G.decode(V_app^j, z_id^j, z_pose^i, z_dyn^j),
                   G.decode(V_app^i, z_id^i, z_pose^i, z_dyn^j))   VASA-1 l_consist
    + cross_id * (1 - cos(E(G.decode(V_app^i, z_id^i, z_pose^d, z_dyn^d)), E(frame i)))
                                                                VASA-1 l_cross-id (E: face-ID)
    + dyn_std * mean_k max(0, 1 - std(z_dyn_k over [sources; driving]))   no collapse of z_dyn
    + dyn_pose_decorr * mean corr(z_dyn, sg(z_pose angles))^2 over [sources; driving; cross]
    + pose * L1(angles of z_pose^i, z_pose^j; the frames' pose labels)
        MegaPortraits' pose encoder is pre-trained on head-pose labels; here it learns from
        the dataset's per-frame pose labels (SynthTalk ground truth, or the real-video
        preprocessing's PnP pose) while everything trains, optionally starting from a
        pre-trained pose net (model.motion.pretrained_pose, vasa_jax.models.face_pose).
        With loss.pose_detach the other terms see the angles through stop_gradient (the
        labels alone train them); translation and scale learn from the images. Needs
        the `pose` label. With model.motion.freeze_pretrained_pose the pre-trained net
        stays fixed instead (as MegaPortraits' pose estimator): no pose term.
  discriminator loss
    hinge_D(D(j), D(stop_gradient(recon)))                      from loss.gan_start_step on

Every decoder input of the step goes through ONE decoder call (concatenated along the
batch): the compiled step then holds a single copy of the decoder, which keeps XLA's
compile time down. The frozen networks (VGG19, face-ID) are the loop's replicated `frozen`
argument. The loop keeps an EMA of the generator (config.train.ema_decay) in `ema`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx

from data_pipeline.loaders import stage1_dataset
from data_pipeline.schema import BOX_LABELS, DatasetInfo
from vasa_jax import losses, optim
from vasa_jax.models.discriminator import build_discriminator
from vasa_jax.models.face_id import load_face_id
from vasa_jax.models.face_pose import load_pose_params
from vasa_jax.models import warping
from vasa_jax.models.face_latent import FaceLatentModel
from vasa_jax.models.vgg19 import load_vgg19
from vasa_jax.trainers import loop

PROGRESS_KEYS = ("loss/g_total", "loss/l1", "loss/perceptual", "loss/d", "psnr/recon",
                 "z_dyn/std")


class TrainState(nnx.Module):
    """generator, its EMA copy, the discriminator, and their two optimizers."""

    def __init__(self, config: ml_collections.ConfigDict, pose_params: nnx.State | None = None):
        rngs = nnx.Rngs(config.seed)
        trainable = trainable_params(config)
        total = config.train.total_steps
        self.generator = FaceLatentModel(config.model, rngs=rngs)
        if pose_params is not None:  # pre-trained pose net (vasa_jax.models.face_pose)
            nnx.update(self.generator.motion_encoder.pose_net, pose_params)
        self.ema = nnx.clone(self.generator)
        self.discriminator = build_discriminator(config.model, rngs=rngs)
        self.g_opt = nnx.Optimizer(
            self.generator, optim.build_optimizer(config.optim, total), wrt=trainable)
        self.d_opt = nnx.Optimizer(
            self.discriminator, optim.build_optimizer(config.disc_optim, total), wrt=nnx.Param)


def pose_frozen(config: ml_collections.ConfigDict) -> bool:
    """Whether the generator's pose net is a fixed pre-trained one (no updates, no pose loss)."""
    m = config.model.motion
    return bool(m.pretrained_pose) and bool(m.freeze_pretrained_pose)


def trainable_params(config: ml_collections.ConfigDict):
    """The nnx filter of the generator parameters the optimizer updates."""
    if pose_frozen(config):
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("pose_net")))
    return nnx.Param


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean over the batch of the PSNR (dB) of images in [-1, 1]: [B, H, W, C] -> scalar."""
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
    return jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))


def decode_all(model: FaceLatentModel, jobs: dict[str, tuple]) -> dict[str, jax.Array]:
    """One decoder call for several (v_app, z_id, z_pose, z_dyn) inputs of batch B each.

    Returns {name: images [B, S, S, 3]}. The decoder treats batch elements independently
    (GroupNorm), so this equals separate calls.
    """
    names = list(jobs)
    sizes = [jobs[n][0].shape[0] for n in names]
    inputs = [jnp.concatenate([jobs[n][k] for n in names], axis=0) for k in range(4)]
    out = model.decode(*inputs)
    ends = [sum(sizes[:k + 1]) for k in range(len(sizes))]
    return {n: out[end - size:end] for n, size, end in zip(names, sizes, ends)}


def consist_pairs(batch: int, fraction: float) -> int:
    """How many of a batch's (source, driving) pairs l_consist uses: round(fraction * batch),
    at least 1. Each pair costs an appearance encoding and two decodes; the term's mean over
    fewer pairs estimates the same expectation (loss.consist_fraction)."""
    return max(1, min(batch, int(round(fraction * batch))))


def _halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = x.shape[0] // 2
    return x[:n], x[n:]


def _d_accuracy(real_logits, fake_logits) -> tuple[jax.Array, jax.Array]:
    """Share of patches D gets right, averaged over scales: (on real, on fake)."""
    real = jnp.mean(jnp.stack([jnp.mean(r > 0) for r in real_logits]))
    fake = jnp.mean(jnp.stack([jnp.mean(f < 0) for f in fake_logits]))
    return real, fake


def effective_weights(loss_cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """The loss weights the step uses: cross_id is 0 without a face-ID model (warned)."""
    w = {name: float(loss_cfg[f"{name}_weight"])
         for name in ("l1", "perceptual", "adv", "fm", "consist", "cross_id", "pose",
                      "dyn_std", "dyn_pose_decorr")}
    if w["cross_id"] > 0 and not loss_cfg.face_id_path:
        logging.warning(
            "loss.cross_id_weight=%g but loss.face_id_path is empty: l_cross-id is OFF. Train "
            "a face-ID model (`python train.py --config configs/face_id.py --workdir OUT "
            "--config.data.path=DIR`) and pass --config.loss.face_id_path=OUT to enable it.",
            w["cross_id"])
        w["cross_id"] = 0.0
    return w


def region_weights(lc: ml_collections.ConfigDict) -> dict[str, float]:
    """{"eyes": w, "mouth": w}: the extra L1 weights of the two face regions
    (loss.l1_region_weight; loss.l1_eyes_weight, if set, is the eyes' own)."""
    eyes = lc.get("l1_eyes_weight")
    return {"eyes": float(lc.l1_region_weight if eyes is None else eyes),
            "mouth": float(lc.l1_region_weight)}


def l1_regions(lc: ml_collections.ConfigDict, dataset_labels, image_size: int):
    """Where the L1's region weights come from: (boxes, box_weight, fixed_map).

    boxes: the schema.BOX_LABELS the dataset has (the driving frames' own boxes, moved with
    the augmentation), box_weight: one weight per box; fixed_map [S, S, 1]
    (losses.face_region_weights, fixed face-crop boxes) when the data has no boxes; all
    empty / None when no region is weighted.
    """
    weights = region_weights(lc)
    if max(weights.values()) <= 0:
        return (), (), None
    boxes = tuple(n for n in BOX_LABELS if n in dataset_labels)
    box_weight = tuple(weights[n.removesuffix("_box")] for n in boxes)
    fixed = None if boxes else losses.face_region_weights(image_size, region_weight=weights)
    return boxes, box_weight, fixed


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
    """The face latent stage for the shared loop (loads the frozen VGG19 / face-ID nets)."""
    lc = config.loss
    w = effective_weights(lc)
    trainable = trainable_params(config)
    if pose_frozen(config) and w["pose"] > 0:
        logging.info("the pre-trained pose net %s is frozen: no pose loss "
                     "(model.motion.freeze_pretrained_pose)", config.model.motion.pretrained_pose)
        w["pose"] = 0.0
    # The config saved with the checkpoints records the weights that run, not those asked.
    ran = config.copy_and_resolve_references()
    ran.loss.cross_id_weight, ran.loss.pose_weight = w["cross_id"], w["pose"]
    use_gan = w["adv"] > 0 or w["fm"] > 0
    gan_start = int(lc.gan_start_step)
    total = config.train.total_steps
    g_schedule = optim.learning_rate_schedule(config.optim, total)
    d_schedule = optim.learning_rate_schedule(config.disc_optim, total)
    # Region weights on the L1: from the driving frames' own mouth / eye boxes when the data
    # has them (schema.BOX_LABELS, moved with the augmentation), else fixed face-crop boxes.
    use_regions = max(region_weights(lc).values()) > 0
    dataset_labels = (DatasetInfo.load(config.data.path).labels
                      if w["pose"] > 0 or use_regions else [])
    boxes, box_weight, region = l1_regions(lc, dataset_labels, config.model.image_size)

    if w["pose"] > 0:
        labels = dataset_labels
        if "pose" not in labels:
            raise ValueError(
                f"loss.pose_weight={w['pose']:g} needs per-frame `pose` labels, but "
                f"{config.data.path!r} has labels {labels}. Label the data (the real-video "
                "preprocessing writes pose) or pass --config.loss.pose_weight=0.")

    # With pose labels, the warps can see z_pose's angles through stop_gradient: the labels
    # alone train them, as a pre-trained pose estimator would be (loss.pose_detach).
    detach = (warping.detach_angles if w["pose"] > 0 and lc.pose_detach
              else lambda z_pose: z_pose)
    path = config.model.motion.pretrained_pose
    if config.model.motion.glimpse_widths and not pose_frozen(config):
        raise ValueError(
            "model.motion.glimpse_widths: the glimpses are placed by a pose net pre-trained "
            "to locate the eyes and mouth and kept fixed. Train one (`python train.py "
            "--config configs/face_pose.py --workdir OUT --config.data.path=DIR "
            "--config.model.motion.glimpse_widths=...`) and pass --config.model.motion."
            "pretrained_pose=OUT with model.motion.freeze_pretrained_pose=True.")
    pose_params = load_pose_params(path, config.model) if path else None

    frozen, vgg_graphdef, face_id = {}, None, None
    if w["perceptual"] > 0:
        vgg, _ = load_vgg19(lc.vgg19_path or None, dtype=jnp.dtype(config.model.dtype))
        vgg_graphdef, frozen["vgg"] = nnx.split(vgg)
    if w["cross_id"] > 0:
        face_id = load_face_id(lc.face_id_path)
        frozen["face_id"] = face_id.params

    def generator_loss(g_params, g_graphdef, g_rest, disc, batch, frozen, gan_on):
        src, drv, crs = batch["source"], batch["driving"], batch["cross"]
        gen = nnx.merge(g_graphdef, g_params, g_rest)
        b = src.shape[0]
        k = consist_pairs(b, lc.consist_fraction) if w["consist"] > 0 else 0
        frames = jnp.concatenate([src, drv], axis=0)
        z_pose, z_dyn = gen.encode_motion(frames)
        pose_in = detach(z_pose)  # what the warps see
        (pose_s, pose_d), dyn_d = _halves(pose_in), _halves(z_dyn)[1]
        # Appearance of every source, and of the first k driving frames: l_consist's
        # V_app^j, z_id^j (k = 0 without l_consist).
        v_app, z_id = gen.encode_appearance(frames[:b + k], pose_in[:b + k], z_dyn[:b + k])
        v_s, id_s, v_d, id_d = v_app[:b], z_id[:b], v_app[b:], z_id[b:]
        jobs = {"recon": (v_s, id_s, pose_d, dyn_d)}
        if k:  # losses.consistency_pair with i = source, j = driving, on k of the b pairs
            jobs["consist_a"] = (v_d, id_d, pose_s[:k], dyn_d[:k])
            jobs["consist_b"] = (v_s[:k], id_s[:k], pose_s[:k], dyn_d[:k])
        if w["cross_id"] > 0 or w["dyn_pose_decorr"] > 0:
            pose_c, dyn_c = gen.encode_motion(crs)
        if w["cross_id"] > 0:
            jobs["cross"] = (v_s, id_s, detach(pose_c), dyn_c)
        out = decode_all(gen, jobs)
        recon = out["recon"]

        weights = region
        if boxes:  # [B, len(boxes), 4] of the driving frames -> [B, S, S, 1]
            frame_boxes = jnp.stack([batch["labels"]["driving"][n] for n in boxes], axis=1)
            weights = losses.box_weights(frame_boxes, drv.shape[1], region_weight=box_weight)
        terms = {"l1": losses.l1_loss(recon, drv, weights)}
        if w["pose"] > 0:  # z_pose angles of [source; driving] against their labels
            labels = batch["labels"]
            target = warping.angles_from_labels(jnp.concatenate(
                [labels["source"]["pose"], labels["driving"]["pose"]], axis=0))
            terms["pose"] = jnp.mean(jnp.abs(z_pose[:, :3] - target))
        if w["perceptual"] > 0:
            vgg = nnx.merge(vgg_graphdef, frozen["vgg"])
            terms["perceptual"] = losses.perceptual_loss(
                vgg, recon, drv, layer_weights=tuple(lc.perceptual_layer_weights),
                num_scales=lc.perceptual_scales)
        if w["consist"] > 0:
            terms["consist"] = losses.l1_loss(out["consist_a"], out["consist_b"])
        if w["dyn_std"] > 0:  # over the sources and driving frames (2B codes)
            terms["dyn_std"] = losses.spread_loss(z_dyn)
        if w["dyn_pose_decorr"] > 0:  # over the source, driving and cross frames (3B)
            terms["dyn_pose_decorr"] = losses.cross_correlation_loss(
                jnp.concatenate([z_dyn, dyn_c], axis=0),
                jax.lax.stop_gradient(jnp.concatenate([z_pose, pose_c], axis=0)[:, :3]))
        if w["cross_id"] > 0:
            embed = functools.partial(face_id.apply, frozen["face_id"])
            terms["cross_id"] = losses.cross_identity_loss(embed, out["cross"], src)
        if use_gan:
            def gan_terms(recon):
                outputs = disc(jnp.concatenate([drv, recon], axis=0), update_stats=False)
                logits, features = losses.split_outputs(outputs)
                fake_logits = [_halves(x)[1] for x in logits]
                real_f = [[_halves(f)[0] for f in fs] for fs in features]
                fake_f = [[_halves(f)[1] for f in fs] for fs in features]
                return (losses.hinge_g_loss(fake_logits),
                        losses.feature_matching_loss(real_f, fake_f))

            if gan_start > 0:  # only the taken branch runs: no D forward before the start
                zero = jnp.zeros((), jnp.float32)
                terms["adv"], terms["fm"] = jax.lax.cond(
                    gan_on, gan_terms, lambda _: (zero, zero), recon)
            else:
                terms["adv"], terms["fm"] = gan_terms(recon)
        total_loss = sum(w[k] * v for k, v in terms.items())
        # Mean over z_dyn's dimensions of their std over the batch: near 0 = collapsed.
        dyn_std = jnp.mean(jnp.std(z_dyn.astype(jnp.float32), axis=0))
        return total_loss, (terms, recon, dyn_std)

    def discriminator_update(disc_state, opt_state, disc_graphdef, opt_graphdef, real, fake):
        disc, opt = nnx.merge(disc_graphdef, disc_state), nnx.merge(opt_graphdef, opt_state)
        params, rest = nnx.state(disc, nnx.Param), nnx.state(disc, nnx.Not(nnx.Param))

        def loss_fn(params):
            # Copies of `rest` made in this trace: the power iteration writes u into them.
            d = nnx.merge(disc_graphdef, params, jax.tree.map(lambda x: x, rest))
            # One call on real + fake: one spectral-norm power iteration per step.
            outputs = d(jnp.concatenate([real, fake], axis=0), update_stats=True)
            logits, _ = losses.split_outputs(outputs)
            real_l, fake_l = [_halves(x)[0] for x in logits], [_halves(x)[1] for x in logits]
            return (losses.hinge_d_loss(real_l, fake_l),
                    (_d_accuracy(real_l, fake_l), nnx.state(d, nnx.Not(nnx.Param))))

        (loss, (acc, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        nnx.update(disc, new_rest)
        updates = opt.update(disc, grads)
        metrics = {"loss/d": loss, "d/acc_real": acc[0], "d/acc_fake": acc[1],
                   "grad_norm/d": optax.global_norm(grads),
                   "update_norm/d": optax.global_norm(updates)}
        return nnx.state(disc), nnx.state(opt), metrics

    def train_step(ts: TrainState, batch, rng, frozen):
        del rng  # the step is deterministic given the batch
        step = ts.g_opt.step[...]
        gan_on = step >= gan_start
        g_graphdef, g_params, g_rest = nnx.split(ts.generator, trainable, ...)
        disc = ts.discriminator  # read-only here (update_stats=False)
        (g_total, (terms, recon, dyn_std)), g_grads = jax.value_and_grad(
            lambda p: generator_loss(p, g_graphdef, g_rest, disc, batch, frozen, gan_on),
            has_aux=True)(g_params)
        g_updates = ts.g_opt.update(ts.generator, g_grads)

        metrics = {"loss/g_total": g_total, **{f"loss/{k}": v for k, v in terms.items()},
                   "psnr/recon": psnr(recon, batch["driving"]), "z_dyn/std": dyn_std,
                   "grad_norm/g": optax.global_norm(g_grads),
                   "update_norm/g": optax.global_norm(g_updates),
                   "lr/g": g_schedule(step), "gan/on": gan_on.astype(jnp.float32)}
        if use_gan:
            metrics["lr/d"] = d_schedule(ts.d_opt.step[...])
            disc_graphdef, disc_state = nnx.split(ts.discriminator)
            opt_graphdef, opt_state = nnx.split(ts.d_opt)
            update = functools.partial(
                discriminator_update, disc_graphdef=disc_graphdef, opt_graphdef=opt_graphdef,
                real=batch["driving"], fake=jax.lax.stop_gradient(recon))
            if gan_start > 0:
                zero = jnp.zeros((), jnp.float32)
                skip = {k: zero for k in ("loss/d", "d/acc_real", "d/acc_fake", "grad_norm/d",
                                          "update_norm/d")}
                disc_state, opt_state, d_metrics = jax.lax.cond(
                    gan_on, update, lambda s, o: (s, o, skip), disc_state, opt_state)
            else:
                disc_state, opt_state, d_metrics = update(disc_state, opt_state)
            nnx.update(ts.discriminator, disc_state)
            nnx.update(ts.d_opt, opt_state)
            metrics.update(d_metrics)
        return metrics

    def image_summary(ts: TrainState, batch, frozen):
        """Rows: source, driving, reconstruction (live / EMA), cross driver, cross-reenactment
        (source appearance with the cross frame's motion; live / EMA)."""
        del frozen
        src, drv, crs = batch["source"], batch["driving"], batch["cross"]
        graphdef, live = nnx.split(ts.generator)
        ema = nnx.state(ts.ema)
        both = jax.tree.map(lambda a, b: jnp.stack([a, b]), live, ema)

        def render(state):  # lax.map over [live, EMA]: one compiled copy of the generator
            gen = nnx.merge(graphdef, state)
            lat = gen.encode(src)
            pose, dyn = gen.encode_motion(jnp.concatenate([drv, crs], axis=0))
            (pose_d, pose_c), (dyn_d, dyn_c) = _halves(pose), _halves(dyn)
            out = decode_all(gen, {"recon": (lat.v_app, lat.z_id, pose_d, dyn_d),
                                   "cross": (lat.v_app, lat.z_id, pose_c, dyn_c)})
            return out["recon"], out["cross"]

        recon, cross = jax.lax.map(render, both)
        return {"source": src, "driving": drv, "reconstruction": recon[0],
                "reconstruction_ema": recon[1], "cross_driver": crs,
                "cross_reenactment": cross[0], "cross_reenactment_ema": cross[1]}

    return loop.Stage(
        create_state=lambda: TrainState(config, pose_params),
        train_step=train_step,
        make_dataset=lambda index, count: stage1_dataset(
            config.data, process_index=index, process_count=count),
        batch_keys=("source", "driving", "cross")
        + (("labels",) if w["pose"] > 0 or boxes else ()),
        frozen=frozen,
        image_summary=image_summary,
        ema=loop.EMA(source="generator", target="ema", decay=config.train.ema_decay),
        progress_keys=PROGRESS_KEYS,
        config=ran,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       compiler_options=None) -> loop.TrainResult:
    """Trains stage 1 in `workdir` (resuming from its latest checkpoint, if any).

    compiler_options: XLA options for the step (e.g. loop.FAST_CPU_COMPILE in tests).
    """
    return loop.train(config, workdir, make_stage, compiler_options=compiler_options)
