"""VASA-1's motion diffusion transformer (sec 3.2), Flax NNX.

H(X_t, t, C) predicts the clean motion window X0 [B, W, Dm] from its noisy version X_t,
the diffusion step t and the conditions C = [X_pre, A_pre; A, g, d, e]. One transformer
encoder (pre-LN: attention + MLP) runs over a single token sequence, concatenated along time:

    [ t | g | d | e ]          4 condition tokens (diffusion step, gaze, distance, emotion)
    [ X_pre + A_pre ] x K      context: the previous window's last K motion + audio frames
    [ X_t + A ] x W            the noisy frames, each with its own frame's audio feature

plus learned positional embeddings; the output head reads the W frame tokens. Motion frames
enter (and the x0 frames leave) through short temporal convs (model.frame_kernel): one token
per frame that also sees its neighbours, which makes denoising a smooth trajectory easy to
learn. Audio features (mel or Wav2Vec2, per video frame) first pass a learned audio encoder
(Dense, then residual 1-D convs over time, then Dense to the width).

Classifier-free guidance: every condition has a keep mask (bool [B]); where it is False the
condition's tokens are replaced by learned null embeddings, so the network's output does not
depend on the dropped input at all (X_pre and A_pre are one condition, "pre"). `guided_x0`
evaluates the full and all the needed "c dropped" passes in ONE batched call.

Every parameter carries logical axis names from `LOGICAL_AXES` ("embed", "mlp", "heads",
"kv", "length"), mapped to mesh axes by config.mesh.rules (configs/common.py
mesh_config("transformer")).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vasa_jax.models import layers
from vasa_jax.parallel.sharding import with_logical_constraint

LOGICAL_AXES = ("embed", "mlp", "heads", "kv", "length")
# The conditions guidance can drop, and the keep mask of each.
CONDITIONS = ("audio", "gaze", "distance", "emotion", "pre")
KEEP_KEYS = {c: f"keep_{c}" for c in CONDITIONS}
CONTROL_DIMS = {"gaze": 2, "distance": 1, "emotion": 8}
NUM_CONDITION_TOKENS = 4  # t, gaze, distance, emotion

# Conditions: a dict of arrays (a pytree), for batch B, window W, context K:
#   audio [B, W, Da], audio_pre [B, K, Da], motion_pre [B, K, Dm]   (normalised features)
#   gaze [B, 2], distance [B, 1], emotion [B, 8]                    (normalised controls)
#   keep_audio, keep_gaze, keep_distance, keep_emotion, keep_pre: bool [B]
Conditions = dict[str, jax.Array]


def make_conditions(audio: jax.Array, *, audio_pre: jax.Array | None = None,
                    motion_pre: jax.Array | None = None, motion_dim: int,
                    gaze: jax.Array | None = None, distance: jax.Array | None = None,
                    emotion: jax.Array | None = None, context: int = 0) -> Conditions:
    """Conditions for a batch; a None input is dropped (its keep mask False, zeros).

    audio: [B, W, Da]. audio_pre / motion_pre: [B, K, .] (None: no context, keep_pre False;
    K = `context`). gaze [B, 2], distance [B, 1], emotion [B, 8].
    """
    b, _, da = audio.shape
    cond = {"audio": jnp.asarray(audio, jnp.float32),
            "keep_audio": jnp.ones((b,), bool)}
    if (audio_pre is None) != (motion_pre is None):
        raise ValueError("give both audio_pre and motion_pre, or neither")
    if audio_pre is None:
        cond["audio_pre"] = jnp.zeros((b, context, da), jnp.float32)
        cond["motion_pre"] = jnp.zeros((b, context, motion_dim), jnp.float32)
        cond["keep_pre"] = jnp.zeros((b,), bool)
    else:
        cond["audio_pre"] = jnp.asarray(audio_pre, jnp.float32)
        cond["motion_pre"] = jnp.asarray(motion_pre, jnp.float32)
        cond["keep_pre"] = jnp.ones((b,), bool)
    for name, value in (("gaze", gaze), ("distance", distance), ("emotion", emotion)):
        dim = CONTROL_DIMS[name]
        if value is None:
            cond[name] = jnp.zeros((b, dim), jnp.float32)
            cond[KEEP_KEYS[name]] = jnp.zeros((b,), bool)
        else:
            cond[name] = jnp.broadcast_to(jnp.asarray(value, jnp.float32), (b, dim))
            cond[KEEP_KEYS[name]] = jnp.ones((b,), bool)
    return cond


def normalize_inputs(raw: Mapping[str, jax.Array], stats: Mapping[str, jax.Array]
                     ) -> dict[str, jax.Array]:
    """Raw windows -> the model's normalised inputs: the one definition that training and
    sampling share (traced in the train step and in the sampler's compiled window).

    raw: audio [B, W, Da], audio_pre [B, K, Da], motion_pre [B, K, Dm] (raw features);
      optionally motion [B, W, Dm] (the training target); gaze [B, 2] (degrees), distance
      [B, 1], emotion [B, 8] (probabilities, used as they are); valid bool [B, W] (False:
      padding past the clip's end); has_pre bool [B] (the window has context).
    stats: {motion, audio, gaze, distance}_{mean, std} float32 [D]
      (`data_pipeline.stats.Normalization.arrays()`).
    Returns the same keys, float32: (x - mean) / std per dimension, with motion and audio
    zero on padded frames and audio_pre, motion_pre zero without context, so a clip's last
    and first windows look alike in training and sampling; valid and has_pre as bool.
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    valid = jnp.asarray(raw["valid"], bool)
    has_pre = jnp.asarray(raw["has_pre"], bool)

    def norm(x, name):
        return (f32(x) - stats[f"{name}_mean"]) / stats[f"{name}_std"]

    out = {
        "audio": jnp.where(valid[..., None], norm(raw["audio"], "audio"), 0.0),
        "audio_pre": jnp.where(has_pre[:, None, None], norm(raw["audio_pre"], "audio"), 0.0),
        "motion_pre": jnp.where(has_pre[:, None, None], norm(raw["motion_pre"], "motion"), 0.0),
        "gaze": norm(raw["gaze"], "gaze"),
        "distance": norm(raw["distance"], "distance"),
        "emotion": f32(raw["emotion"]),
        "valid": valid,
        "has_pre": has_pre,
    }
    if "motion" in raw:
        out["motion"] = jnp.where(valid[..., None], norm(raw["motion"], "motion"), 0.0)
    return out


def denormalize_motion(x: jax.Array, stats: Mapping[str, jax.Array]) -> jax.Array:
    """Normalised motion [..., Dm] -> raw motion (the inverse of `normalize_inputs`)."""
    return x * stats["motion_std"] + stats["motion_mean"]


def model_conditions(inputs: Mapping[str, jax.Array], keep: Mapping[str, jax.Array]
                     ) -> Conditions:
    """Normalised inputs (`normalize_inputs`, audio possibly augmented) and one keep mask
    bool [B] per condition in CONDITIONS (False = dropped) -> the model's Conditions."""
    missing = [c for c in CONDITIONS if c not in keep]
    if missing:
        raise ValueError(f"keep masks missing for {missing}")
    cond = {k: inputs[k] for k in ("audio", "audio_pre", "motion_pre", "gaze", "distance",
                                   "emotion")}
    cond.update({KEEP_KEYS[c]: jnp.asarray(keep[c], bool) for c in CONDITIONS})
    return cond


def drop_condition(cond: Conditions, name: str) -> Conditions:
    """`cond` with condition `name` dropped for every example (its keep mask all False)."""
    if name not in KEEP_KEYS:
        raise ValueError(f"unknown condition {name!r}; conditions are {CONDITIONS}")
    key = KEEP_KEYS[name]
    return {**cond, key: jnp.zeros_like(cond[key])}


def check_conditions(cond: Mapping[str, jax.Array], batch: int, window: int, context: int,
                     motion_dim: int, audio_dim: int) -> None:
    """Raises ValueError naming the first missing or mis-shaped entry."""
    expected = {
        "audio": (batch, window, audio_dim), "audio_pre": (batch, context, audio_dim),
        "motion_pre": (batch, context, motion_dim), "gaze": (batch, 2),
        "distance": (batch, 1), "emotion": (batch, 8),
        **{k: (batch,) for k in KEEP_KEYS.values()},
    }
    for key, shape in expected.items():
        if key not in cond:
            raise ValueError(f"conditions lack {key!r} (have {sorted(cond)})")
        if tuple(cond[key].shape) != shape:
            raise ValueError(f"condition {key!r} has shape {tuple(cond[key].shape)}, expected "
                             f"{shape} (B={batch}, W={window}, K={context}, Dm={motion_dim}, "
                             f"Da={audio_dim})")


# ----------------------------------------------------------------------------- layers


def param(rngs: nnx.Rngs | None, init: nnx.Initializer, shape: Sequence[int],
          names: Sequence[str | None], dtype: jnp.dtype) -> nnx.Param:
    """`layers.make_param` with this model's logical axis names."""
    return layers.make_param(rngs, init, tuple(int(n) for n in shape), names, dtype,
                             allowed=LOGICAL_AXES)


_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


def _fan_in(scale: float = 1.0) -> nnx.Initializer:
    return nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class Dense(nnx.Module):
    """y = x @ W + b over the last `len(in_shape)` axes: kernel [*in_shape, *out_shape]."""

    def __init__(self, in_shape: int | Sequence[int], out_shape: int | Sequence[int], *,
                 names: Sequence[str | None], init_scale: float = 1.0, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.dtype = dtype
        fan_in = math.prod(self.in_shape)
        init = _fan_in(init_scale) if init_scale > 0 else _zeros
        shape = self.in_shape + self.out_shape
        # variance_scaling reads fan-in from shape[-2]: draw 2-D, reshape.
        value = init(rngs.params(), (fan_in, math.prod(self.out_shape)), param_dtype)
        names = tuple(names)
        self.kernel = param(None, lambda *_: value.reshape(shape), shape, names, param_dtype)
        self.bias = (param(None, _zeros, self.out_shape, names[len(self.in_shape):], param_dtype)
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., *in_shape] -> [..., *out_shape]."""
        n = len(self.in_shape)
        if tuple(x.shape[x.ndim - n:]) != self.in_shape:
            raise ValueError(f"Dense expects inputs [..., {self.in_shape}], got {x.shape}")
        axes = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), axes)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; statistics in float32, output in `dtype`."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(None, _ones, (dim,), ("embed",), param_dtype)
        self.bias = param(None, _zeros, (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when rng is None or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention over all tokens (no mask): [B, N, width] -> [B, N, width]."""

    def __init__(self, width: int, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, width // heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Dense(width, (3, heads, self.head_dim), names=("embed", None, "heads", "kv"),
                         **kw)
        self.out = Dense((heads, self.head_dim), width, names=("heads", "kv", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        qkv = self.qkv(x)  # [B, N, 3, H, Dh]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        weights = jax.nn.softmax(logits / math.sqrt(self.head_dim), axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        return self.out(y)


class Block(nnx.Module):
    """Pre-LN transformer encoder block: x + Attn(LN(x)), then + MLP(LN(x)) (GELU)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout_rate: float, *,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        hidden = int(round(width * mlp_ratio))
        self.dropout_rate = dropout_rate
        self.norm1 = LayerNorm(width, **kw)
        self.attn = Attention(width, heads, rngs=rngs, **kw)
        self.norm2 = LayerNorm(width, **kw)
        self.mlp_in = Dense(width, hidden, names=("embed", "mlp"), rngs=rngs, **kw)
        self.mlp_out = Dense(hidden, width, names=("mlp", "embed"), rngs=rngs, **kw)

    def __call__(self, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        r1, r2 = (None, None) if rng is None else jax.random.split(rng)
        x = x + dropout(self.attn(self.norm1(x)), self.dropout_rate, r1)
        h = self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x))))
        x = x + dropout(h, self.dropout_rate, r2)
        return with_logical_constraint(x, ("batch", "length", "embed"))


class TemporalConv(nnx.Module):
    """1-D convolution over time with zero 'SAME' padding: [B, L, in] -> [B, L, out].

    kernel [k, in, out] (a Dense over k shifted copies); k = 1 is a per-frame Dense.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *,
                 names: tuple[str | None, str | None], init_scale: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.dense = Dense((kernel_size, in_features), out_features, names=(None, *names),
                           init_scale=init_scale, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        k, length = self.kernel_size, x.shape[1]
        if k == 1:
            return self.dense(x[:, :, None, :])
        pad = k // 2
        padded = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
        windows = jnp.stack([padded[:, i:i + length] for i in range(k)], axis=2)  # [B, L, k, C]
        return self.dense(windows)


class AudioEncoder(nnx.Module):
    """Learned encoder of per-frame audio features: [B, L, Da] -> [B, L, width].

    Dense(Da -> hidden) + GELU, then `layers` residual blocks x + Conv1D(GELU(LN(x))) over
    time (kernel `kernel_size`, zero 'SAME' padding; kind "mlp" = kernel 1), then LN +
    Dense(hidden -> width). Each frame's output sees kernel_size // 2 * layers neighbours on
    each side (of the same sequence: the window's audio or the context's, never both).
    """

    def __init__(self, cfg: ml_collections.ConfigDict, audio_dim: int, width: int, *,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        hidden = int(cfg.hidden)
        kernel_size = 1 if cfg.kind == "mlp" else int(cfg.kernel_size)
        self.dtype = dtype
        self.inp = Dense(audio_dim, hidden, names=(None, "mlp"), rngs=rngs, **kw)
        self.norms = nnx.List([LayerNorm(hidden, **kw) for _ in range(cfg.layers)])
        self.convs = nnx.List([
            TemporalConv(hidden, hidden, kernel_size, names=("mlp", "embed"), rngs=rngs, **kw)
            for _ in range(cfg.layers)
        ])
        self.out_norm = LayerNorm(hidden, **kw)
        self.out = Dense(hidden, width, names=("mlp", "embed"), rngs=rngs, **kw)

    def __call__(self, audio: jax.Array) -> jax.Array:
        if audio.shape[1] == 0:
            return jnp.zeros(audio.shape[:2] + (self.out.out_shape[0],), self.dtype)
        h = jax.nn.gelu(self.inp(audio))
        for norm, conv in zip(self.norms, self.convs):
            h = h + conv(jax.nn.gelu(norm(h)))
        return self.out(self.out_norm(h))


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding of integer steps: t [B] -> float32 [B, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


# ----------------------------------------------------------------------------- the model


class MotionDiT(nnx.Module):
    """H(X_t, t, C) -> X0 (see the module docstring).

    cfg: config.model (configs/motion_dit.py): window W, context K, layers, width, heads,
    mlp_ratio, dropout, dtype, param_dtype, frame_kernel, audio_encoder.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, motion_dim: int, audio_dim: int, *,
                 rngs: nnx.Rngs):
        if motion_dim < 1 or audio_dim < 1:
            raise ValueError(f"motion_dim and audio_dim must be >= 1, got {motion_dim}, "
                             f"{audio_dim}")
        self.window, self.context = int(cfg.window), int(cfg.context)
        self.motion_dim, self.audio_dim = int(motion_dim), int(audio_dim)
        self.width = width = int(cfg.width)
        self.dropout_rate = float(cfg.dropout)
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.audio_encoder = AudioEncoder(cfg.audio_encoder, audio_dim, width, **kw)
        # Condition tokens.
        self.time_in = Dense(width, width, names=("embed", "mlp"), **kw)
        self.time_out = Dense(width, width, names=("mlp", "embed"), **kw)
        self.gaze_in = Dense(CONTROL_DIMS["gaze"], width, names=(None, "embed"), **kw)
        self.distance_in = Dense(CONTROL_DIMS["distance"], width, names=(None, "embed"), **kw)
        self.emotion_in = Dense(CONTROL_DIMS["emotion"], width, names=(None, "embed"), **kw)
        # Frame tokens: motion (noisy X_t, or X_pre) + the frame's encoded audio.
        # Temporal convs (kernel model.frame_kernel) for the motion frames in and out: still
        # one token per frame, but each token sees its neighbours, the inductive bias that
        # denoising a smooth trajectory needs (a plain per-frame Dense learns it slowly).
        k = int(cfg.frame_kernel)
        self.motion_in = TemporalConv(motion_dim, width, k, names=(None, "embed"), **kw)
        self.pre_motion_in = TemporalConv(motion_dim, width, k, names=(None, "embed"), **kw)
        # Learned null embeddings that replace dropped conditions.
        normal = nnx.initializers.normal(0.02)
        null = lambda: param(rngs, normal, (width,), ("embed",), param_dtype)  # noqa: E731
        self.null_gaze, self.null_distance, self.null_emotion = null(), null(), null()
        self.null_audio = null()  # added to each frame token instead of its audio
        self.null_pre = null()  # replaces each context token
        num_tokens = NUM_CONDITION_TOKENS + self.context + self.window
        self.pos_embed = param(rngs, normal, (num_tokens, width), ("length", "embed"),
                               param_dtype)
        self.blocks = nnx.List([
            Block(width, int(cfg.heads), float(cfg.mlp_ratio), self.dropout_rate, **kw)
            for _ in range(int(cfg.layers))
        ])
        self.out_norm = LayerNorm(width, dtype=dtype, param_dtype=param_dtype)
        self.head = TemporalConv(width, motion_dim, k, names=("embed", None), init_scale=0.1,
                                 **kw)

    def _tokens(self, x_t: jax.Array, t: jax.Array, cond: Conditions) -> jax.Array:
        """The token sequence [B, 4 + K + W, width]."""
        b = x_t.shape[0]

        def keep(name: str, value: jax.Array, null: nnx.Param) -> jax.Array:
            mask = cond[KEEP_KEYS[name]].astype(bool).reshape((b,) + (1,) * (value.ndim - 1))
            return jnp.where(mask, value, null[...].astype(value.dtype))

        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        t_emb = self.time_out(jax.nn.silu(self.time_in(timestep_embedding(t, self.width))))
        gaze = keep("gaze", self.gaze_in(f32(cond["gaze"])), self.null_gaze)
        distance = keep("distance", self.distance_in(f32(cond["distance"])), self.null_distance)
        emotion = keep("emotion", self.emotion_in(f32(cond["emotion"])), self.null_emotion)
        tokens = [jnp.stack([t_emb, gaze, distance, emotion], axis=1)]
        if self.context:
            pre = (self.pre_motion_in(f32(cond["motion_pre"]))
                   + self.audio_encoder(f32(cond["audio_pre"])))
            tokens.append(keep("pre", pre, self.null_pre))
        audio = keep("audio", self.audio_encoder(f32(cond["audio"])), self.null_audio)
        tokens.append(self.motion_in(f32(x_t)) + audio)
        h = jnp.concatenate([x.astype(self.dtype) for x in tokens], axis=1)
        return h + self.pos_embed[...].astype(self.dtype)[None]

    def __call__(self, x_t: jax.Array, t: jax.Array, cond: Conditions, *,
                 deterministic: bool = True, rng: jax.Array | None = None) -> jax.Array:
        """x_t: [B, W, Dm] (normalised motion + noise); t: int [B] in [0, T); cond:
        `Conditions`. Returns the x0 prediction float32 [B, W, Dm].

        deterministic=False applies dropout (model.dropout) with `rng` (required then).
        """
        b = x_t.shape[0]
        if x_t.ndim != 3 or x_t.shape[1:] != (self.window, self.motion_dim):
            raise ValueError(f"x_t must be [B, W={self.window}, Dm={self.motion_dim}], got "
                             f"{x_t.shape}")
        if t.shape != (b,):
            raise ValueError(f"t must be [B={b}], got {t.shape}")
        check_conditions(cond, b, self.window, self.context, self.motion_dim, self.audio_dim)
        if not deterministic and self.dropout_rate > 0 and rng is None:
            raise ValueError("MotionDiT(deterministic=False) with dropout needs `rng`")
        use_dropout = not deterministic and self.dropout_rate > 0
        h = self._tokens(x_t, t, cond)
        h = with_logical_constraint(h, ("batch", "length", "embed"))
        keys = (jax.random.split(rng, len(self.blocks)) if use_dropout
                else [None] * len(self.blocks))
        for block, key in zip(self.blocks, keys):
            h = block(h, key)
        frames = h[:, NUM_CONDITION_TOKENS + self.context:]
        return self.head(self.out_norm(frames)).astype(jnp.float32)


# ----------------------------------------------------------------------------- guidance


def active_scales(scales: Mapping[str, float] | None) -> tuple[tuple[str, float], ...]:
    """The (condition, scale) pairs with a non-zero scale, in `CONDITIONS` order (static)."""
    scales = dict(scales or {})
    unknown = [k for k in scales if k not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown guidance conditions {unknown}; conditions are {CONDITIONS}")
    return tuple((c, float(scales[c])) for c in CONDITIONS if float(scales.get(c, 0.0)) != 0.0)


def guided_x0(model: MotionDiT, x_t: jax.Array, t: jax.Array, cond: Conditions,
              scales: Mapping[str, float] | None) -> jax.Array:
    """VASA-1's classifier-free guidance:

        X0 = (1 + sum_c l_c) H(X_t, t, C) - sum_c l_c H(X_t, t, C | c dropped)

    over the conditions c with l_c = scales[c] != 0 (Python floats: the number of passes
    is fixed at trace time). All 1 + n passes are ONE network call on the batch
    [full, drop c1, drop c2, ...] (n = number of guided conditions), split afterwards.
    x_t [B, W, Dm], t [B] -> [B, W, Dm].
    """
    guided = active_scales(scales)
    if not guided:
        return model(x_t, t, cond)
    passes = [cond] + [drop_condition(cond, c) for c, _ in guided]
    n = len(passes)
    batched = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *passes)
    out = model(jnp.concatenate([x_t] * n, axis=0), jnp.concatenate([t] * n, axis=0), batched)
    outs = jnp.split(out, n, axis=0)
    total = sum(scale for _, scale in guided)
    x0 = (1.0 + total) * outs[0]
    for (_, scale), dropped in zip(guided, outs[1:]):
        x0 = x0 - scale * dropped
    return x0


# ----------------------------------------------------------------------------- counting


def abstract_model(cfg: ml_collections.ConfigDict, motion_dim: int, audio_dim: int) -> MotionDiT:
    """The model with ShapeDtypeStruct parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: MotionDiT(cfg, motion_dim, audio_dim, rngs=nnx.Rngs(0)))


def param_counts(model: MotionDiT) -> dict[str, int]:
    """Parameters per part: audio_encoder, transformer (blocks), embeddings (the rest),
    and total."""
    def count(tree) -> int:
        return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))

    params = nnx.state(model, nnx.Param)
    total = count(params)
    audio = count(nnx.state(model.audio_encoder, nnx.Param))
    blocks = count(nnx.state(model.blocks, nnx.Param))
    return {"audio_encoder": audio, "transformer": blocks,
            "embeddings_and_head": total - audio - blocks, "total": total}
