"""Stage 2: the audio-conditioned motion diffusion transformer (VASA-1 sec 3.2).

Variants: `configs/motion_dit.py:size=tiny` (CPU: learns lip sync on ~100 SynthTalk clips in
about 15 minutes on 2 cores), `size=small`, `size=full` (the paper's 8 layers, width 512,
8 heads, ~29M parameters). Sections:

  data       stage-2 windows (configs.common.data_stage2): W = data.window frames generated
             per window, K = data.context frames of the previous window as context.
  model      vasa_jax.models.motion_dit.MotionDiT (window/context follow data).
  diffusion  noise schedule, training steps T, DDIM sampling steps (vasa_jax.diffusion).
  guidance   classifier-free guidance scales l_c at sampling time, per condition.
  loss       x0 loss, CFG condition dropping, audio truncation, velocity/acceleration terms.
  train, optim, mesh: the shared loop's sections.

Ablations are one flag each:
  window / context:  --config.data.window=100 --config.data.context=10
  no context:        --config.data.context=0       (no X_pre / A_pre tokens at all)
  no CFG:            --config.loss.drop_prob=0 --config.loss.pre_drop_prob=0
                     (and sample with zero guidance: --config.guidance.audio=0 ...gaze=0)
  velocity loss:     --config.loss.velocity_weight=1
"""

import ml_collections

from configs import common

CONDITIONS = ("audio", "gaze", "distance", "emotion", "pre")
AUDIO_ENCODER_KINDS = ("conv", "mlp")


def model_config(size: str, data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Architecture of vasa_jax.models.motion_dit.MotionDiT."""
    pick = lambda t, s, f: {"tiny": t, "small": s, "full": f}[size]  # noqa: E731
    m = ml_collections.ConfigDict()
    # References: overriding data.window / data.context moves the model with them (the
    # learned positional embeddings are sized by them).
    m.window = data.get_ref("window")
    m.context = data.get_ref("context")
    m.layers = pick(4, 6, 8)
    m.width = pick(128, 256, 512)
    m.heads = pick(4, 4, 8)
    m.mlp_ratio = 4.0
    # Kernel of the temporal convs that embed motion frames (X_t, X_pre) and read the output
    # (1 = per-frame Dense). Tokens stay one per frame, but each sees its neighbours: the
    # inductive bias that denoising a smooth trajectory needs. With per-frame Dense layers
    # the tiny model left ~2x the ground truth's frame-to-frame pose jitter (dP) after
    # 1500 CPU steps; kernel 3 halved it. At 1500 steps (SynthTalk, x0 loss only): kernel
    # 3 -> 2.74x the ground truth's dP, 7 -> 2.00x, 11 -> 1.74x, lip sync unchanged.
    m.frame_kernel = 11
    m.dropout = pick(0.1, 0.1, 0.1)  # on attention / MLP outputs, training only
    m.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (norms, softmax stay float32)
    m.param_dtype = "float32"
    # Learned audio encoder on top of the raw (normalised) mel / Wav2Vec2 features of each
    # frame: Dense(Da -> hidden), then `layers` residual 1-D convs over time (kernel
    # kernel_size; "mlp" = kernel 1, frame by frame), then Dense(hidden -> width).
    m.audio_encoder = ml_collections.ConfigDict(
        dict(kind="conv", hidden=pick(128, 256, 512), layers=pick(2, 2, 2), kernel_size=3)
    )
    return m


def diffusion_config() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.schedule = "cosine"  # "cosine" (Nichol & Dhariwal) | "linear" (DDPM)
    d.train_steps = 1000  # T: diffusion steps during training
    d.sample_steps = 50  # DDIM steps at sampling time (VASA-1: 50; 10 for 5x speed)
    d.eta = 0.0  # DDIM stochasticity (0 = deterministic DDIM, 1 = DDPM-like)
    return d


def guidance_config() -> ml_collections.ConfigDict:
    """CFG scales: X0 = (1 + sum l_c) H(C) - sum l_c H(C | c dropped). VASA-1: l_A = 0.5,
    l_g = 1.0; 0 = that condition is not guided (no extra network pass)."""
    g = ml_collections.ConfigDict()
    g.audio = 0.5
    g.gaze = 1.0
    g.distance = 0.0
    g.emotion = 0.0
    g.pre = 0.0  # X_pre and A_pre together
    return g


def loss_config() -> ml_collections.ConfigDict:
    l = ml_collections.ConfigDict()  # noqa: E741
    l.drop_prob = 0.1  # CFG: each of audio / gaze / distance / emotion dropped with this prob
    l.pre_drop_prob = 0.5  # X_pre and A_pre together (always dropped for a clip's first window)
    # Random truncation of the last audio frames (short clips / the last window): with this
    # probability the audio after a random cut in [1, W) is zeroed.
    l.audio_truncate_prob = 0.1
    # Gaussian noise (std, in normalised units) on the training windows' audio features:
    # 0 = none (small, full); tiny sets 2.0 (get_config).
    l.audio_noise_std = 0.0
    l.x0_weight = 1.0  # ||X0 - H||^2 over the valid frames
    l.velocity_weight = 0.0  # ||dX0/dt - dH/dt||^2 (first differences), ablation
    l.accel_weight = 0.0  # second differences, ablation
    return l


def get_config(arg=None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, size="full", choices={"size": common.SIZES})
    size = arg.size
    c = ml_collections.ConfigDict()
    c.stage = "motion_dit"
    c.size = size
    c.seed = 0
    c.data = common.data_stage2(size)
    if size == "tiny":
        c.data.batch_size = 32
    c.diffusion = diffusion_config()
    c.model = model_config(size, c.data)
    c.guidance = guidance_config()
    c.loss = loss_config()
    if size == "tiny":
        # Small data (~100 clips): the tiny model otherwise fits per-frame audio detail into
        # the head pose (jitter). Measured at 1500 steps with frame_kernel 11: dP 1.74x the
        # ground truth's without noise, 1.32x at std 1, 1.24x at std 2 (lip-sync r 0.93 ->
        # 0.90).
        c.loss.audio_noise_std = 2.0
    c.train = common.train_config(size)
    # tiny: ~15 min on 2 CPU cores (100 SynthTalk clips of 4 s: lip sync is learned by
    # ~500 steps, gaze control by ~1000).
    c.train.total_steps = {"tiny": 1500, "small": 200_000, "full": 300_000}[size]
    c.train.log_every = {"tiny": 50, "small": 100, "full": 100}[size]
    c.train.checkpoint_every = {"tiny": 500, "small": 5000, "full": 5000}[size]
    c.train.image_every = 0  # stage 2 has no image summary
    c.train.ema_decay = {"tiny": 0.995, "small": 0.999, "full": 0.9999}[size]
    # Lip sync, dP and control errors on a few held-out clips, every train.eval_every steps.
    c.evals = common.evals_config(motion=dict(
        type="motion", data="", num_clips=8, seeds=1, control_clips=4, probe_clips=64))
    c.optim = common.optim_config(size)
    c.optim.b1 = 0.9  # transformer recipe, not MegaPortraits' GAN betas
    c.optim.b2 = 0.999
    c.optim.lr = {"tiny": 1e-3, "small": 3e-4, "full": 1e-4}[size]
    c.optim.end_lr = {"tiny": 1e-5, "small": 1e-6, "full": 1e-6}[size]
    c.optim.warmup_steps = {"tiny": 100, "small": 2000, "full": 5000}[size]
    c.optim.weight_decay = 1e-2
    c.optim.grad_clip = 1.0
    c.mesh = common.mesh_config("transformer")
    return c


def validate_model(m: ml_collections.ConfigDict) -> None:
    check = common.check
    check(m.layers >= 1, f"model.layers must be >= 1, got {m.layers}")
    check(m.width >= 1 and m.heads >= 1, f"model.width and model.heads must be >= 1, got "
          f"{m.width}, {m.heads}")
    check(m.width % m.heads == 0,
          f"model.width={m.width} must be divisible by model.heads={m.heads}")
    check(m.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {m.mlp_ratio}")
    check(m.frame_kernel >= 1 and m.frame_kernel % 2 == 1,
          f"model.frame_kernel must be odd and >= 1, got {m.frame_kernel}")
    check(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    common.check_choice(m.dtype, ("float32", "bfloat16"), "model.dtype")
    common.check_choice(m.param_dtype, ("float32", "bfloat16"), "model.param_dtype")
    a = m.audio_encoder
    common.check_choice(a.kind, AUDIO_ENCODER_KINDS, "model.audio_encoder.kind")
    check(a.hidden >= 1, f"model.audio_encoder.hidden must be >= 1, got {a.hidden}")
    check(a.layers >= 0, f"model.audio_encoder.layers must be >= 0, got {a.layers}")
    check(a.kernel_size >= 1 and a.kernel_size % 2 == 1,
          f"model.audio_encoder.kernel_size must be odd and >= 1, got {a.kernel_size}")


def validate_diffusion(d: ml_collections.ConfigDict) -> None:
    common.check_choice(d.schedule, ("cosine", "linear"), "diffusion.schedule")
    common.check(d.train_steps >= 2, f"diffusion.train_steps must be >= 2, got {d.train_steps}")
    common.check(1 <= d.sample_steps <= d.train_steps,
                 f"diffusion.sample_steps must be in [1, train_steps={d.train_steps}], got "
                 f"{d.sample_steps}")
    common.check(d.eta >= 0, f"diffusion.eta must be >= 0, got {d.eta}")


def validate_guidance(g: ml_collections.ConfigDict) -> None:
    names = tuple(g.keys())
    common.check(set(names) == set(CONDITIONS),
                 f"guidance must have exactly the scales {CONDITIONS}, got {names}")
    for name in CONDITIONS:
        common.check(isinstance(g[name], (int, float)) and g[name] >= 0,
                     f"guidance.{name} must be a number >= 0, got {g[name]!r}")


def validate_loss(l: ml_collections.ConfigDict) -> None:  # noqa: E741
    for name in ("drop_prob", "pre_drop_prob", "audio_truncate_prob"):
        common.check(0.0 <= l[name] <= 1.0, f"loss.{name} must be in [0, 1], got {l[name]}")
    for name in ("x0_weight", "velocity_weight", "accel_weight", "audio_noise_std"):
        common.check(l[name] >= 0, f"loss.{name} must be >= 0, got {l[name]}")
    common.check(l.x0_weight + l.velocity_weight + l.accel_weight > 0,
                 "loss: x0_weight, velocity_weight and accel_weight are all 0: nothing to train")


def validate(c: ml_collections.ConfigDict) -> None:
    common.check_choice(c.size, common.SIZES, "size")
    common.validate_data(c.data)
    common.check(c.data.context <= c.data.window,
                 f"data.context={c.data.context} must be <= data.window={c.data.window} (the "
                 "context is the previous window's last K frames)")
    common.check(c.model.window == c.data.window and c.model.context == c.data.context,
                 f"model.window/context ({c.model.window}, {c.model.context}) must equal "
                 f"data.window/context ({c.data.window}, {c.data.context})")
    validate_model(c.model)
    validate_diffusion(c.diffusion)
    validate_guidance(c.guidance)
    validate_loss(c.loss)
    common.validate_train(c.train)
    common.validate_optim(c.optim, c.train.total_steps, "optim")
    rules = dict(c.mesh.rules)
    for name in ("batch", "embed", "mlp", "heads", "kv", "length"):
        common.check(name in rules, f"mesh.rules lacks the logical axis {name!r}")
