"""CAPP: the contrastive audio-pose model of VASA-1's evaluation (vasa_jax.models.capp).

    python train.py --config configs/capp.py:size=tiny --workdir runs/capp \
        --config.data.path=data/synthtalk

Variants: `size=tiny` (CPU: SynthTalk in a few minutes on 2 cores), `size=full` (the
paper's 6-layer pose transformer, 3-second windows). Sections:

  data   windows of pose and audio (configs.common.data_stage2 with no context: the
         stage-2 loader, so the same records, splits and audio frontends), each
         model.window + 2 * max|loss.shift_negatives| frames long (the margin the shifted
         negatives read). data.motion_source gives the pose: "labels" (SynthTalk's, or
         the real-video preprocessing's estimated head pose).
  model  vasa_jax.models.capp.CAPP over 3-second windows (model.window = 75 frames);
         model.pose_dims: which MOTION_DIM_NAMES the pose encoder reads (default the
         three angles: what can be re-extracted from a video).
  loss   shift_negatives: frame offsets at which a window's own audio, shifted, is an
         extra negative for its pose (capp.clip_loss): what teaches CAPP timing. Empty:
         in-batch negatives only (other clips), which a model can tell apart by how much
         the head moves, never by when.
  train, optim, mesh: the shared loop's sections.
"""

import ml_collections

from configs import common

POSE_DIM_CHOICES = ("yaw", "pitch", "roll", "tx", "ty", "tz")


def model_config(size: str) -> ml_collections.ConfigDict:
    pick = lambda t, f: {"tiny": t, "small": f, "full": f}[size]  # noqa: E731
    m = ml_collections.ConfigDict()
    m.window = 75  # 3 s at 25 fps (VASA-1); the learned positions are sized by it
    m.pose_dims = ("yaw", "pitch", "roll")
    m.pose_layers = 6  # the paper's 6-layer pose transformer at every size
    m.audio_layers = pick(2, 4)
    m.width = pick(128, 256)
    m.heads = 4
    m.mlp_ratio = 4.0
    m.dropout = 0.1
    m.embed_dim = pick(64, 256)
    # How each tower's frames become one vector: "flatten" keeps every frame in place (the
    # projection sees when things happen: what a frame-shift test asks), "mean" averages
    # them (what happens over the window, whenever it happens).
    m.pool = "flatten"
    m.audio_encoder = ml_collections.ConfigDict(
        dict(kind="conv", hidden=pick(128, 256), layers=2, kernel_size=3))
    return m


def shift_margin(shifts) -> int:
    """Frames a training window reaches past model.window on each side: max |shift|."""
    return max((abs(int(s)) for s in shifts), default=0)


def get_config(arg=None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(arg, size="full", choices={"size": common.SIZES})
    size = arg.size
    c = ml_collections.ConfigDict()
    c.stage = "capp"
    c.size = size
    c.seed = 0
    c.data = common.data_stage2(size)
    c.data.context = 0
    c.data.batch_size = {"tiny": 64, "small": 256, "full": 512}[size]  # negatives per step
    c.model = model_config(size)
    c.loss = ml_collections.ConfigDict()
    c.loss.shift_negatives = (-8, -4, -2, 2, 4, 8)
    c.data.window = c.model.window + 2 * shift_margin(c.loss.shift_negatives)
    c.train = common.train_config(size)
    c.train.total_steps = {"tiny": 1500, "small": 50_000, "full": 100_000}[size]
    c.train.log_every = {"tiny": 50, "small": 100, "full": 100}[size]
    c.train.checkpoint_every = {"tiny": 500, "small": 5000, "full": 5000}[size]
    c.train.image_every = 0
    c.train.ema_decay = {"tiny": 0.99, "small": 0.999, "full": 0.999}[size]
    # The frame-shift curve on the held-out clips, every train.eval_every steps.
    c.evals = common.evals_config(shift=dict(type="capp", data="", max_shift=4, stride=5))
    c.optim = common.optim_config(size)
    c.optim.b1, c.optim.b2 = 0.9, 0.98  # CLIP's
    c.optim.lr = {"tiny": 1e-3, "small": 5e-4, "full": 5e-4}[size]
    c.optim.end_lr = 1e-5
    c.optim.warmup_steps = {"tiny": 100, "small": 2000, "full": 2000}[size]
    c.optim.weight_decay = 0.1
    c.mesh = common.mesh_config("transformer")
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    check = common.check
    common.check_choice(c.size, common.SIZES, "size")
    common.validate_data(c.data)
    check(c.data.context == 0, f"data.context must be 0 for CAPP, got {c.data.context}")
    m = c.model
    shifts = tuple(c.loss.shift_negatives)
    check(all(int(s) != 0 for s in shifts) and len(set(shifts)) == len(shifts),
          f"loss.shift_negatives must be distinct non-zero frame offsets, got {shifts}")
    margin = shift_margin(shifts)
    check(c.data.window == m.window + 2 * margin,
          f"data.window {c.data.window} must be model.window {m.window} + 2 * "
          f"max|loss.shift_negatives| ({margin}) = {m.window + 2 * margin}")
    dims = tuple(m.pose_dims)
    check(len(dims) >= 1 and len(set(dims)) == len(dims)
          and all(d in POSE_DIM_CHOICES for d in dims),
          f"model.pose_dims must be distinct names from {POSE_DIM_CHOICES}, got {dims}")
    for name in ("pose_layers", "audio_layers", "width", "heads", "embed_dim"):
        check(m[name] >= (0 if name == "audio_layers" else 1),
              f"model.{name} must be >= 1, got {m[name]}")
    check(m.width % m.heads == 0, f"model.width={m.width} must be divisible by model.heads="
          f"{m.heads}")
    common.check_choice(m.pool, ("mean", "flatten"), "model.pool")
    check(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    a = m.audio_encoder
    common.check_choice(a.kind, ("conv", "mlp"), "model.audio_encoder.kind")
    check(a.hidden >= 1 and a.layers >= 0 and a.kernel_size >= 1 and a.kernel_size % 2 == 1,
          f"model.audio_encoder: hidden >= 1, layers >= 0, odd kernel_size, got {dict(a)}")
    common.validate_train(c.train)
    common.validate_optim(c.optim, c.train.total_steps)
    rules = dict(c.mesh.rules)
    for name in ("batch", "embed", "mlp", "heads", "kv", "length"):
        check(name in rules, f"mesh.rules lacks the logical axis {name!r}")
