"""Stage 1: the disentangled face latent model (VASA-1 sec 3.1).

Variants: `configs/face_latent.py:size=tiny` (64x64, CPU tests), `size=small` (256x256),
`size=full` (512x512, the paper's scale: volume 96x16x64x64, ~200M generator parameters).
Sections: data, model, mesh, train, optim (generator), disc_optim (discriminator), loss
(vasa_jax.trainers.face_latent). Parameter counts per module: `python scripts/count_params.py`.
"""

import ml_collections

from configs import common


def model_config(size: str, image_size) -> ml_collections.ConfigDict:
    """Architecture of vasa_jax.models.face_latent.FaceLatentModel and the discriminator.

    Spatial sizes are linked: image_size = volume.size * 2^len(app.channels) (E_app's
    downsampling) = volume.size * 2^len(decoder.up_channels) (G2D's upsampling), and the
    warp seed is the volume shrunk by 2^len(warp.channels).
    """
    full, tiny = size == "full", size == "tiny"
    pick = lambda t, s, f: t if tiny else (f if full else s)  # noqa: E731
    m = ml_collections.ConfigDict()
    m.image_size = image_size
    m.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (norms, warps stay float32)
    m.param_dtype = "float32"
    m.remat = False  # recompute 3-D resblock activations in the backward pass (saves memory)
    # GroupNorm groups (capped at the channel count; 0 = no normalisation). tiny: 0. At
    # 64 px with 16-64 channels GroupNorm cost the stage-1 path 1-1.5 dB of held-out
    # self-reconstruction at equal steps (benchmarks/stage1_bisect.py, docs/experiments.md).
    m.groups = pick(0, 32, 32)
    # Appearance volume, C x D x H x W (MegaPortraits: 96 x 16 x 64 x 64).
    m.volume = ml_collections.ConfigDict(
        dict(channels=pick(16, 64, 96), depth=pick(8, 16, 16), size=pick(16, 64, 64))
    )
    # E_app: 7x7 stem, one downsampling 2-D resblock per entry, then 3-D resblocks.
    # depth_sigma > 0: a learnt depth gate (face_encoders.DepthGate) starts the posed volume
    # on a thin band (this width, normalised units) at the volume centre; 0 = no gate.
    m.app = ml_collections.ConfigDict(
        dict(stem=pick(16, 64, 64), channels=pick((32, 64), (128, 256), (128, 256, 512)),
             blocks_3d=pick(1, 4, 6), depth_sigma=0.0)
    )
    # E_id: ResNet-style stages (the first block of each halves the map) -> z_id.
    m.id = ml_collections.ConfigDict(
        dict(input_size=pick(64, 256, 256), stem=pick(16, 32, 64),
             channels=pick((32, 64), (64, 128, 256, 512), (64, 128, 256, 512)),
             blocks=pick((1, 1), (2, 2, 2, 2), (3, 4, 6, 3)), dim=pick(32, 256, 512))
    )
    # E_mtn: two such encoders (pose, dynamics); z_pose is tanh-bounded to these ranges.
    m.motion = ml_collections.ConfigDict(
        dict(input_size=pick(64, 256, 256), stem=pick(16, 32, 64),
             channels=pick((32, 64), (64, 128, 256, 512), (64, 128, 256, 512)),
             blocks=pick((1, 1), (2, 2, 2, 2), (2, 2, 2, 2)), dyn_dim=pick(16, 128, 128),
             max_angles_deg=(90.0, 60.0, 45.0),  # |yaw|, |pitch|, |roll| limits
             max_translation=0.5,  # |tx|, |ty|, |tz| in normalised volume coordinates
             max_log_scale=0.3,  # scale in [exp(-0.3), exp(0.3)] = [0.74, 1.35]
             # Feature pooling before the heads: "mean" (global average) or "flatten"
             # (the shallow tiny encoders need to know where a feature is to read pose).
             pool=pick("flatten", "mean", "mean"),
             # GroupNorm groups of the dynamics net alone (None: model.groups; 0: no
             # normalisation). Taught SynthTalk's mouth directly (scripts/probe_ceiling.py
             # --targets mouth_open, batch 16, 3000 steps), the tiny net reads it at held-out
             # R^2 0.68 without GroupNorm and 0.08 with it.
             dyn_groups=ml_collections.config_dict.placeholder(int),
             # Pooling of the dynamics net alone (None: `pool`).
             dyn_pool=ml_collections.config_dict.placeholder(str),
             # Widths (fractions of the frame) of the eye and mouth glimpses the dynamics
             # net reads instead of the whole frame (face_encoders.MotionEncoder); () = the
             # whole frame. The pose net then also locates the two regions: it must be
             # pre-trained (pretrained_pose) on data with schema.BOX_LABELS.
             glimpse_widths=(),
             # Turn the glimpses with the pose net's roll (pose-aligned crops, as
             # EMOPortraits' motion encoder sees them): a tilted head reads upright, so
             # z_dyn has less reason to carry roll.
             glimpse_roll=False,
             # One dynamics net per glimpse: z_dyn = [eyes code, mouth code], each region's
             # half read from that region alone (face_encoders.MotionEncoder). The eye state
             # then has its own dimensions instead of hiding in the mouth's variation.
             dyn_split=False,
             # A configs/face_pose.py run (its workdir): the pose net starts
             # from it (MegaPortraits pre-trains its head-pose estimator). "" = random init.
             pretrained_pose="",
             # Keep that pre-trained net fixed (MegaPortraits freezes its pose estimator):
             # the warps see the labels' convention and held-out accuracy is kept (fine-
             # tuned on stage-1 batches, SynthTalk held-out roll R^2 fell 0.84 -> 0.75).
             freeze_pretrained_pose=True)
    )
    # Warping generators (w_s->c and w_c->d, one each): MLP -> seed volume -> adaptive
    # upsampling 3-D resblocks (one per entry) -> tanh-bounded flow. pivot_depth: the head
    # rotates about a point this far behind the volume centre (half-sides; models.warping):
    # in face crops (schema.FACE_CROP_HEIGHT) the face surface sits about one half-side in
    # front of the rotation centre. With the pose net's translation and scale, the rigid
    # warp then moves SynthTalk's eyes and mouth to within 0.5 px (docs/experiments.md).
    m.warp = ml_collections.ConfigDict(
        dict(seed_channels=pick(32, 256, 512),
             channels=pick((16,), (256, 128, 64, 32), (512, 256, 128, 64)),
             hidden=pick(64, 512, 512), max_flow=0.25, pivot_depth=1.0)
    )
    # G3D: 3-D U-Net, one level per entry (each deeper level halves D, H, W).
    m.g3d = ml_collections.ConfigDict(
        dict(channels=pick((16, 32), (64, 128, 256), (96, 192, 384)), blocks=pick(1, 2, 3))
    )
    # G2D: resblocks at `channels`, then one upsampling resblock per up_channels entry.
    # dyn_modulation: G2D's norms are adaptive on z_dyn (a route from the expression code
    # to the pixels besides the warps' flows, as LIA's motion-modulated decoder).
    # dyn_volume_channels E > 0: an expression volume (face_decoder.ExpressionVolume), E
    # channels that are a learnt linear map of z_dyn in canonical space, joins V_app before
    # the driving warp: a local route (features where the mouth is). 0 = off.
    # conv_before_up: each upsampling block's first conv runs before the x2 upsampling
    # (layers.ResBlock): 4x cheaper; the second conv still works at the new resolution.
    m.decoder = ml_collections.ConfigDict(
        dict(channels=pick(128, 256, 512), blocks=pick(1, 6, 8),
             up_channels=pick((64, 32), (128, 64), (256, 128, 64)), dyn_modulation=False,
             dyn_volume_channels=0, conv_before_up=False)
    )
    # Multi-scale patch discriminator (spectral-normalised convs).
    m.discriminator = ml_collections.ConfigDict(
        dict(scales=2, channels=pick((16, 32, 64), (64, 128, 256, 512), (64, 128, 256, 512)))
    )
    return m


def get_config(arg=None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, size="full", choices={"size": common.SIZES})
    c = ml_collections.ConfigDict()
    c.stage = "face_latent"
    c.size = arg.size
    c.seed = 0
    c.data = common.data_stage1(arg.size)
    # A reference: overriding data.image_size moves the model with it (validate() then
    # checks that the volume / resampling sizes still fit).
    c.model = model_config(arg.size, c.data.get_ref("image_size"))
    c.mesh = common.mesh_config("conv")
    c.train = common.train_config(arg.size)
    # Reenactment quality, probes and (with an expression meter) transfer on a few held-out
    # clips, run every train.eval_every steps when that is > 0.
    c.evals = common.evals_config(reenact=dict(
        type="face_latent", data="", max_clips=8, frames_per_clip=4, probe_clips=64,
        probe_frames_per_clip=8, probe_eval_frames_per_clip=16, expression_meter=""))
    c.optim = common.optim_config(arg.size)  # generator
    c.disc_optim = common.optim_config(arg.size)  # discriminator
    if arg.size == "tiny":  # the small CPU model trains faster at a higher rate
        c.optim.lr = 5e-4
    c.loss = loss_config(arg.size)
    return c


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def validate_model(m: ml_collections.ConfigDict) -> None:
    check = common.check
    common.check_choice(m.dtype, ("float32", "bfloat16"), "model.dtype")
    common.check_choice(m.param_dtype, ("float32", "bfloat16"), "model.param_dtype")
    check(m.groups >= 0, f"model.groups must be >= 0 (0: no GroupNorm), got {m.groups}")
    check(m.motion.dyn_groups is None or m.motion.dyn_groups >= 0,
          f"model.motion.dyn_groups must be None or >= 0 (0: no GroupNorm), got "
          f"{m.motion.dyn_groups}")
    v = m.volume
    check(v.channels > 0 and v.depth > 0 and v.size > 0, f"model.volume sizes must be > 0: {v}")
    for name, n_resample in (("app.channels", len(m.app.channels)),
                             ("decoder.up_channels", len(m.decoder.up_channels))):
        check(
            v.size * 2**n_resample == m.image_size,
            f"model.{name} has {n_resample} entries: {v.size} * 2^{n_resample} != "
            f"model.image_size {m.image_size} (volume.size * 2^n must equal the image size)",
        )
    n_up = len(m.warp.channels)
    check(
        n_up > 0 and v.size % 2**n_up == 0 and v.depth <= 2**n_up * max(1, v.depth >> n_up),
        f"model.warp.channels: {n_up} upsampling blocks do not divide volume "
        f"{v.depth}x{v.size}x{v.size}",
    )
    check(0 < m.warp.max_flow <= 2, f"model.warp.max_flow must be in (0, 2], got {m.warp.max_flow}")
    check(m.app.depth_sigma >= 0, f"model.app.depth_sigma must be >= 0, got {m.app.depth_sigma}")
    check(0 <= m.warp.pivot_depth <= 4,
          f"model.warp.pivot_depth must be in [0, 4] half-sides, got {m.warp.pivot_depth}")
    levels = len(m.g3d.channels) - 1
    check(
        levels >= 0 and v.depth % 2**levels == 0 and v.size % 2**levels == 0,
        f"model.g3d.channels: {levels + 1} levels need volume depth and size divisible by "
        f"2^{levels}, got {v.depth}x{v.size}",
    )
    for enc in ("id", "motion"):
        e = m[enc]
        check(
            len(e.channels) == len(e.blocks) and min(e.blocks) >= 1,
            f"model.{enc}.channels and .blocks must pair up with >= 1 block each",
        )
        check(
            e.input_size <= m.image_size and e.input_size % 2 ** (len(e.channels) + 1) == 0,
            f"model.{enc}.input_size {e.input_size} must be <= image_size and divisible by "
            f"2^{len(e.channels) + 1}",
        )
    common.check_choice(m.motion.pool, ("mean", "flatten"), "model.motion.pool")
    check(m.decoder.dyn_volume_channels >= 0,
          f"model.decoder.dyn_volume_channels must be >= 0, got {m.decoder.dyn_volume_channels}")
    check(len(m.motion.glimpse_widths) in (0, 2)
          and all(0.0 < w <= 1.0 for w in m.motion.glimpse_widths),
          f"model.motion.glimpse_widths must be () or (eyes, mouth) widths in (0, 1], got "
          f"{m.motion.glimpse_widths}")
    check(not m.motion.glimpse_widths or m.image_size % 2 == 0,
          "model.motion.glimpse_widths: the two glimpses split image_size rows in half")
    check(not m.motion.dyn_split
          or (m.motion.glimpse_widths and m.motion.dyn_dim % len(m.motion.glimpse_widths) == 0),
          f"model.motion.dyn_split needs glimpse_widths and dyn_dim divisible by their number, "
          f"got {m.motion.glimpse_widths} and dyn_dim {m.motion.dyn_dim}")
    if m.motion.dyn_pool is not None:
        common.check_choice(m.motion.dyn_pool, ("mean", "flatten"), "model.motion.dyn_pool")
    angles = tuple(m.motion.max_angles_deg)
    check(
        len(angles) == 3 and all(0 < a <= 180 for a in angles),
        f"model.motion.max_angles_deg must be 3 limits in (0, 180], got {angles}",
    )
    check(m.motion.max_translation > 0 and m.motion.max_log_scale > 0,
          "model.motion.max_translation and max_log_scale must be > 0")
    d = m.discriminator
    check(d.scales >= 1 and len(d.channels) >= 1,
          f"model.discriminator needs >= 1 scale and >= 1 layer, got {d}")
    smallest = m.image_size >> (d.scales - 1 + len(d.channels))
    check(smallest >= 2, f"model.discriminator: {d.scales} scales x {len(d.channels)} stride-2 "
          f"layers shrink {m.image_size}px below 2px")
    # Every channel count must split into GroupNorm groups (the layers use min(groups, C)).
    widths = [v.channels, m.app.stem, *m.app.channels, m.id.stem, *m.id.channels,
              m.motion.stem, *m.motion.channels, m.warp.seed_channels, *m.warp.channels,
              *m.g3d.channels, m.decoder.channels, *m.decoder.up_channels]
    bad = [w for w in widths if m.groups and w % min(m.groups, w)]
    check(not bad, f"model channel counts {bad} are not divisible by model.groups={m.groups}")
    check(_is_pow2(m.image_size), f"model.image_size must be a power of two, got {m.image_size}")


def validate(c: ml_collections.ConfigDict) -> None:
    common.check_choice(c.size, common.SIZES, "size")
    common.validate_data(c.data)
    common.check(
        c.data.image_size in (64, 128, 256, 512),
        f"data.image_size must be 64/128/256/512, got {c.data.image_size}",
    )
    common.check(
        c.model.image_size == c.data.image_size,
        f"model.image_size {c.model.image_size} != data.image_size {c.data.image_size}",
    )
    validate_model(c.model)
    common.validate_train(c.train)
    common.validate_optim(c.optim, c.train.total_steps, "optim")
    common.validate_optim(c.disc_optim, c.train.total_steps, "disc_optim")
    validate_loss(c.loss, c.data.image_size)


def loss_config(size: str) -> ml_collections.ConfigDict:
    """Stage-1 loss weights (vasa_jax.trainers.face_latent; the losses: vasa_jax.losses).

    MegaPortraits' weights: perceptual VGG19 x20, hinge adversarial x1, feature matching
    x40 (here a mean over discriminator layers and scales: pix2pixHD's x10 summed over 4
    layers). VASA-1 gives no weights for its two additions; l_consist is an image L1 like
    the reconstruction term and gets its weight, l_cross-id (1 - cosine, in [0, 2]) that of
    MegaPortraits' face-ID perceptual term (x4). Any weight 0 removes its term from the
    step (e.g. --config.loss.consist_weight=0, the paper's ablation).
    """
    l = ml_collections.ConfigDict()  # noqa: E741
    l.l1_weight = 10.0  # self-reenactment: source appearance + driving motion vs driving
    # Extra L1 weight inside the eye and mouth boxes (0 = plain L1): the driving frame's own
    # boxes when the data has mouth_box / eyes_box labels (SynthTalk), else fixed face-crop
    # boxes (losses.FACE_REGIONS). EMOPortraits weights mouth and eyes 500 to 1.
    l.l1_region_weight = 0.0
    # The eyes box's own extra weight (None: l1_region_weight). A blink moves a few dozen
    # pixels against the mouth's hundreds: a heavier eye weight asks z_dyn for the lids.
    l.l1_eyes_weight = ml_collections.config_dict.placeholder(float)
    # tiny: 0. Its VGG19 is random unless weights are given (no perceptual prior), and at
    # 64 px it is ~85% of a CPU step (64 of ~75 GFLOP at batch 8): PSNR-driven CPU runs
    # are faster without it. Tests switch it on.
    l.perceptual_weight = {"tiny": 0.0, "small": 20.0, "full": 20.0}[size]
    l.perceptual_layer_weights = (0.03125, 0.0625, 0.125, 0.25, 1.0)  # relu1_1 .. relu5_1
    # Image pyramid levels of the perceptual loss (face-vid2vid: 4); the smallest must stay
    # >= 16 px. One level at tiny scale keeps CPU compiles short.
    l.perceptual_scales = {"tiny": 1, "small": 4, "full": 4}[size]
    l.vgg19_path = ""  # converted torchvision VGG19 weights; "" = frozen random VGG19
    l.adv_weight = 1.0
    l.fm_weight = 40.0
    # Steps before the GAN terms and discriminator updates start. At tiny scale the GAN
    # slows down the first reconstructions, so it waits.
    l.gan_start_step = {"tiny": 100, "small": 0, "full": 0}[size]
    l.consist_weight = 10.0  # VASA-1 l_consist
    # Share of a batch's (source, driving) pairs l_consist is computed on (the first
    # round(fraction * B), at least 1). Each pair costs one more appearance encoding and
    # two decodes: at 1.0 the term doubles a tiny CPU step.
    l.consist_fraction = 1.0
    l.cross_id_weight = 4.0  # VASA-1 l_cross-id; needs face_id_path (else forced to 0)
    l.face_id_path = ""  # a configs/face_id.py run (its workdir)
    # Supervised head pose: L1 (radians) between z_pose's yaw/pitch/roll and the frames'
    # `pose` labels. MegaPortraits pre-trains its pose encoder on head-pose labels and
    # face-vid2vid has the same L1 term; labels come from SynthTalk or the real-video
    # preprocessing. 0 = pose learnt from the images alone (data without pose labels).
    l.pose_weight = 10.0
    # The other terms see z_pose's angles through stop_gradient, so only the labels train
    # them (a pre-trained pose estimator's role): reconstruction through the warp cannot
    # flip the label convention (measured: it did, on held-out clips). Needs pose_weight > 0.
    l.pose_detach = True
    # Spread of z_dyn: mean over its dimensions of max(0, 1 - std over the batch's source
    # and driving frames) (VICReg's variance term): keeps the dynamics encoder from
    # collapsing to a near-constant code early on (docs/experiments.md). 0 = off.
    l.dyn_std_weight = 0.0
    # Pose out of z_dyn: mean squared Pearson correlation, over the batch's source,
    # driving and cross frames, between z_dyn's dimensions and the (stop-gradient) z_pose
    # angles (losses.cross_correlation_loss). The decoder otherwise lets z_dyn carry pose
    # corrections, and a linear probe reads the head pose off z_dyn. 0 = off.
    l.dyn_pose_decorr_weight = 0.0
    return l


def validate_loss(l: ml_collections.ConfigDict, image_size: int) -> None:  # noqa: E741
    weights = ("l1_weight", "l1_region_weight", "perceptual_weight", "adv_weight", "fm_weight",
               "consist_weight", "cross_id_weight", "pose_weight", "dyn_std_weight",
               "dyn_pose_decorr_weight")
    for name in weights:
        common.check(l[name] >= 0, f"loss.{name} must be >= 0, got {l[name]}")
    common.check(l.get("l1_eyes_weight") is None or l.l1_eyes_weight >= 0,
                 f"loss.l1_eyes_weight must be >= 0 (or None), got {l.get('l1_eyes_weight')}")
    common.check(len(l.perceptual_layer_weights) == 5,
                 f"loss.perceptual_layer_weights needs 5 weights (relu1_1 .. relu5_1), got "
                 f"{l.perceptual_layer_weights}")
    common.check(l.perceptual_scales >= 1 and image_size >> (l.perceptual_scales - 1) >= 16,
                 f"loss.perceptual_scales={l.perceptual_scales}: the smallest level of a "
                 f"{image_size}px pyramid must stay >= 16 px")
    common.check(0.0 < l.consist_fraction <= 1.0,
                 f"loss.consist_fraction must be in (0, 1], got {l.consist_fraction}")
    common.check(l.gan_start_step >= 0, f"loss.gan_start_step must be >= 0, got "
                 f"{l.gan_start_step}")
