"""Shared config pieces: variant parsing, validation, data sections, mesh presets.

Configs are Python files with `get_config(arg)` (big_vision style). The variant string after
the colon is parsed by `parse_arg`: `configs/face_latent.py:size=tiny`. Any field can then be
overridden on the command line (`--config.data.batch_size=8`); configs are locked, so a
misspelt field is an error, never silently added.
"""

from __future__ import annotations

from typing import Any

import ml_collections

SIZES = ("tiny", "small", "full")


class ConfigError(ValueError):
    """A config value that is out of range, of the wrong kind, or inconsistent."""


def _convert(value: str, like: Any) -> Any:
    if isinstance(like, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"expected a boolean, got {value!r}")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    return value


def parse_arg(arg: str | None, *, choices: dict[str, tuple] | None = None, **defaults):
    """Parses 'key=value,key=value' against `defaults`; unknown keys are errors.

    Values are converted to the type of their default. `choices` restricts values.
    Returns a ConfigDict of the result.
    """
    result = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ConfigError(f"config argument {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise ConfigError(
                f"unknown config argument {key!r}; known: {sorted(defaults)}"
            )
        result[key] = _convert(value, defaults[key])
    for key, allowed in (choices or {}).items():
        if result[key] not in allowed:
            raise ConfigError(f"{key}={result[key]!r} is not one of {allowed}")
    return ml_collections.ConfigDict(result)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_choice(value: Any, allowed: tuple, name: str) -> None:
    check(value in allowed, f"{name}={value!r} is not one of {allowed}")


# ----------------------------------------------------------------------------- data


def data_stage1(size: str) -> ml_collections.ConfigDict:
    """Stage-1 loader: (source, driving same clip, cross-identity driving) frame triplets."""
    d = ml_collections.ConfigDict()
    d.path = ""  # clip-record dataset folder (data_pipeline.schema)
    d.split = "train"
    d.image_size = {"tiny": 64, "small": 256, "full": 512}[size]
    d.batch_size = {"tiny": 8, "small": 16, "full": 16}[size]  # global, over all processes
    d.num_workers = {"tiny": 0, "small": 4, "full": 8}[size]  # grain worker processes
    d.prefetch = 2  # batches each worker keeps ready
    d.seed = 0
    # Share of (source, driving) pairs drawn so that one of `contrast_labels` differs:
    # the driving frame j with probability ~ |l_j - l_i| (loaders.Stage1Sample._pair).
    # The labels only choose frames; nothing supervises the latents with them. A blink is
    # about 5% of a clip's frames: uniform pairs rarely show one. 0 = uniform pairs.
    d.contrast_pairs = 0.0
    d.contrast_labels = ("blink", "mouth_open")
    d.aug = ml_collections.ConfigDict(
        dict(
            scale=0.06,  # random zoom in [1 - s, 1 + s]
            shift=0.04,  # random translation, fraction of the side
            brightness=0.15,
            contrast=0.15,
            saturation=0.15,
            hue=0.03,  # fraction of the colour circle
        )
    )
    return d


def data_stage2(size: str) -> ml_collections.ConfigDict:
    """Stage-2 loader: windows of W motion frames with the K frames before them."""
    d = ml_collections.ConfigDict()
    d.path = ""
    d.split = "train"
    d.batch_size = {"tiny": 16, "small": 64, "full": 128}[size]
    d.num_workers = {"tiny": 0, "small": 4, "full": 8}[size]
    d.prefetch = 2
    d.seed = 0
    d.window = 50  # W frames generated per window (25 fps)
    d.context = 10  # K frames of previous motion/audio given as context
    # Where per-frame motion vectors come from: "labels" (SynthTalk ground truth) or
    # "features:<name>" (e.g. features:motion, written by extract_latents from stage 1).
    d.motion_source = "labels"
    # Audio features: "mel" (computed from the record's audio) or "features:<name>".
    d.audio_source = "mel"
    d.audio = audio_config()
    return d


def audio_config() -> ml_collections.ConfigDict:
    """Audio frontend (vasa_jax.audio) settings; features are aligned to video frames."""
    a = ml_collections.ConfigDict()
    a.frontend = "mel"  # "mel" | "wav2vec2"
    a.sample_rate = 16000
    a.fps = 25.0
    a.n_mels = 80
    a.wav2vec2_path = ""  # local Hugging Face folder (config.json + model.safetensors)
    a.wav2vec2_layer = -1  # hidden-state layer; -1 = last
    # Long audio runs through Wav2Vec2 in windows of chunk + 2 * context seconds; each keeps
    # its middle `chunk` seconds (attention is global: memory ~ length^2).
    a.wav2vec2_chunk_seconds = 20.0
    a.wav2vec2_context_seconds = 2.0
    return a


def validate_data(d: ml_collections.ConfigDict) -> None:
    check_choice(d.split, ("train", "test"), "data.split")
    check(d.batch_size > 0, f"data.batch_size must be > 0, got {d.batch_size}")
    check(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    if "contrast_pairs" in d:
        check(0.0 <= d.contrast_pairs <= 1.0,
              f"data.contrast_pairs must be in [0, 1], got {d.contrast_pairs}")
    if "window" in d:
        check(d.window > 0, f"data.window must be > 0, got {d.window}")
        check(d.context >= 0, f"data.context must be >= 0, got {d.context}")
        for name in ("motion_source", "audio_source"):
            value = d[name]
            ok = value in ("labels", "mel") or value.startswith("features:")
            check(ok, f"data.{name}={value!r}: use 'labels'/'mel' or 'features:<name>'")
        check_choice(d.audio.frontend, ("mel", "wav2vec2"), "data.audio.frontend")


# ----------------------------------------------------------------------------- parallelism


def mesh_config(kind: str) -> ml_collections.ConfigDict:
    """Mesh axes and logical-axis rules. -1 = all remaining devices.

    Conv-heavy stage 1 is data parallel (fsdp shards big params); the transformer stage
    adds tensor parallelism over heads / mlp.
    """
    m = ml_collections.ConfigDict()
    m.axes = (("data", -1), ("fsdp", 1), ("tensor", 1))
    if kind == "conv":
        m.rules = (
            ("batch", ("data", "fsdp")),
            ("conv_in", None),
            ("conv_out", "fsdp"),
            ("embed", "fsdp"),
            ("mlp", None),
        )
    elif kind == "transformer":
        m.rules = (
            ("batch", ("data", "fsdp")),
            ("embed", "fsdp"),
            ("mlp", "tensor"),
            ("heads", "tensor"),
            ("kv", None),
            ("length", None),
        )
    else:
        raise ConfigError(f"unknown mesh kind {kind!r}")
    return m


# ----------------------------------------------------------------------------- training


def train_config(size: str) -> ml_collections.ConfigDict:
    """The shared training loop (vasa_jax.trainers.loop): length, logging, checkpoints, EMA.

    Every *_every is in train steps; 0 turns the periodic action off (a final checkpoint
    is always written).
    """
    t = ml_collections.ConfigDict()
    t.total_steps = {"tiny": 200, "small": 100_000, "full": 300_000}[size]
    # Wall-clock budget of this run's training loop (compilation excluded): it stops at the
    # first log step past it, saves, and reports stopped_early; running again resumes.
    # The learning-rate schedule still spans total_steps. 0 = no budget.
    t.max_minutes = 0.0
    # A step whose metrics (losses, gradient norms) hold a NaN/inf is discarded (the state
    # stays as it was) and counted (train/skipped_steps); this many in a row stop the run
    # with a checkpoint of the last good state (checked at log steps). 0 = never stop.
    t.max_bad_steps = 10
    t.log_every = {"tiny": 10, "small": 50, "full": 100}[size]
    t.image_every = {"tiny": 100, "small": 1000, "full": 2500}[size]
    t.image_samples = 4  # batch rows shown in image summaries
    t.checkpoint_every = {"tiny": 100, "small": 2500, "full": 5000}[size]
    # Evaluators of the config's `evals` section run every eval_every steps on the newest
    # checkpoint (one is saved then if needed); their numbers go to TensorBoard and
    # metrics.jsonl as eval/<name>/<metric>. 0 = off.
    t.eval_every = 0
    t.keep_checkpoints = 3  # newest checkpoints kept
    t.keep_period = 0  # also keep every checkpoint at a multiple of this step (0 = none)
    t.async_checkpoints = True
    # Exponential moving average of the generator's parameters (the weights to export):
    # ema <- decay * ema + (1 - decay) * params after every step.
    t.ema_decay = {"tiny": 0.99, "small": 0.999, "full": 0.999}[size]
    return t


def validate_train(t: ml_collections.ConfigDict) -> None:
    check(t.total_steps > 0, f"train.total_steps must be > 0, got {t.total_steps}")
    check(t.log_every > 0, f"train.log_every must be > 0, got {t.log_every}")
    check(t.max_minutes >= 0, f"train.max_minutes must be >= 0 (0 = off), got {t.max_minutes}")
    check(isinstance(t.max_bad_steps, int) and t.max_bad_steps >= 0,
          f"train.max_bad_steps must be an integer >= 0 (0 = never stop), got {t.max_bad_steps}")
    for name in ("image_every", "checkpoint_every", "keep_period", "eval_every"):
        check(t[name] >= 0, f"train.{name} must be >= 0 (0 = off), got {t[name]}")
    check(t.image_samples > 0, f"train.image_samples must be > 0, got {t.image_samples}")
    check(t.keep_checkpoints > 0, f"train.keep_checkpoints must be > 0, got {t.keep_checkpoints}")
    if "ema_decay" in t:  # the helper networks keep no EMA (helper_train_config)
        check(0.0 <= t.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")


def evals_config(**evals: dict) -> ml_collections.ConfigDict:
    """The `evals` section (big_vision style): name -> {type: a `python -m vasa_jax.evaluate`
    evaluator, data: its dataset folder ("" = the run's data.path), and any fields of that
    evaluator's Settings}. They run every train.eval_every steps (0 = never)."""
    return ml_collections.ConfigDict({k: dict(v) for k, v in evals.items()})


def validate_evals(evals: ml_collections.ConfigDict, eval_every: int) -> None:
    """Each entry names a known evaluator that can run during training, with options that
    are fields of its Settings (imported only when train.eval_every > 0)."""
    from vasa_jax.evaluate import EVALUATORS

    for name, spec in evals.items():
        check("type" in spec, f"evals.{name} needs a type (one of {sorted(EVALUATORS)})")
        check_choice(spec.type, tuple(EVALUATORS), f"evals.{name}.type")
    if eval_every:
        from vasa_jax.evaluate import training_settings

        for name, spec in evals.items():
            try:
                training_settings(spec.type, {k: v for k, v in spec.items()
                                              if k not in ("type", "data")}, step=0)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"evals.{name}: {e}") from e


def optim_config(size: str) -> ml_collections.ConfigDict:
    """One optimizer (vasa_jax.optim.build_optimizer): AdamW, cosine schedule, clipping.

    Defaults are MegaPortraits': AdamW betas (0.5, 0.999), eps 1e-8, weight decay 1e-2,
    cosine decay of the learning rate from 2e-4 to 1e-6 over train.total_steps.
    """
    del size  # the same recipe at every scale; kept for symmetry with the other sections
    o = ml_collections.ConfigDict()
    o.lr = 2e-4  # peak learning rate (reached after warmup_steps)
    o.end_lr = 1e-6  # learning rate at train.total_steps
    o.warmup_steps = 0  # linear warmup from 0 to lr (0 = start at lr)
    o.b1 = 0.5
    o.b2 = 0.999
    o.eps = 1e-8
    # Decoupled weight decay on weight matrices / kernels only: decaying biases and norm
    # scales towards 0 only fights the normalisation.
    o.weight_decay = 1e-2
    o.grad_clip = 1.0  # clip the global gradient norm to this (0 = no clipping)
    return o


def validate_optim(o: ml_collections.ConfigDict, total_steps: int, name: str = "optim") -> None:
    """Checks an optim section; `total_steps` (train.total_steps) bounds the warmup."""
    check(o.lr > 0, f"{name}.lr must be > 0, got {o.lr}")
    check(0 <= o.end_lr <= o.lr, f"{name}.end_lr must be in [0, lr={o.lr}], got {o.end_lr}")
    check(0 <= o.warmup_steps < total_steps,
          f"{name}.warmup_steps must be in [0, train.total_steps={total_steps}), got "
          f"{o.warmup_steps}")
    check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"{name}.b1, b2 must be in [0, 1), got {o.b1}, {o.b2}")
    check(o.eps > 0, f"{name}.eps must be > 0, got {o.eps}")
    check(o.weight_decay >= 0, f"{name}.weight_decay must be >= 0, got {o.weight_decay}")
    check(o.grad_clip >= 0, f"{name}.grad_clip must be >= 0 (0 = off), got {o.grad_clip}")


# ----------------------------------------------------------------------------- helper networks
# The head-pose pre-training, the face-ID net and the expression meter (configs/face_pose.py,
# face_id.py, expression_meter.py) train in the shared loop, and write a params-only export
# into their workdir at the end.


def helper_train_config(total_steps: int, checkpoint_every: int) -> ml_collections.ConfigDict:
    """The loop's train section for a helper network: no EMA, no images, logs every 100."""
    t = train_config("tiny")
    t.total_steps = total_steps
    t.log_every = 100
    t.checkpoint_every = checkpoint_every
    t.image_every = 0
    del t["ema_decay"]  # the trained weights are what the export holds
    return t


def helper_optim_config(lr: float, warmup_steps: int, weight_decay: float
                        ) -> ml_collections.ConfigDict:
    """AdamW (b1 0.9), linear warmup, cosine decay to lr / 100 (it follows an overridden
    lr), no gradient clipping: the helper networks' recipe."""
    o = optim_config("tiny")
    o.lr = lr
    o.end_lr = o.get_ref("lr") * 0.01
    o.warmup_steps = warmup_steps
    o.b1, o.b2 = 0.9, 0.999
    o.weight_decay = weight_decay
    o.grad_clip = 0.0
    return o


def final_eval_config(frames_per_clip: int) -> ml_collections.ConfigDict:
    """Held-out evaluation at the end of training (frames read with
    data_pipeline.loaders.read_frames), written into the export's JSON."""
    return ml_collections.ConfigDict(dict(frames_per_clip=frames_per_clip, max_clips=2000))


def validate_helper(c: ml_collections.ConfigDict) -> None:
    """The sections every helper network's config shares."""
    check_choice(c.size, SIZES, "size")
    validate_data(c.data)
    validate_train(c.train)
    validate_optim(c.optim, c.train.total_steps)
    e = c.final_eval
    check(e.frames_per_clip >= 1 and e.max_clips >= 1,
                 f"final_eval.frames_per_clip and max_clips must be >= 1, got {dict(e)}")
    check("batch" in dict(c.mesh.rules), "mesh.rules lacks the logical axis 'batch'")
