"""Wav2Vec2 hidden states in JAX, from a local Hugging Face folder, aligned to video frames.

VASA-1 conditions the motion model on Wav2Vec2 features (sec 3.2). This module loads a
Hugging Face Wav2Vec2 checkpoint folder (config.json + model.safetensors, or
pytorch_model.bin, or flax_model.msgpack) from local disk only, runs the encoder as a jitted
pure function, and resamples the chosen layer's ~50 Hz output to exactly T video frames.

Why not transformers' FlaxWav2Vec2Model: it implements only the "large" layout
(feat_extract_norm="layer", do_stable_layer_norm=True) and raises NotImplementedError for
the base layout (group-norm feature encoder, post-LN transformer) of wav2vec2-base(-960h),
the checkpoint most talking-head work uses. It also needs a random init on load (~10 s) and
is deprecated (gone in transformers 5). The forward pass below is short, covers both
layouts, loads in about a second, and is tested against the PyTorch reference on random
weights (tests/test_wav2vec2.py). transformers is not needed at run time.

Alignment: the convolutional feature encoder has stride S = prod(conv_stride) (320 samples,
20 ms) and receptive field R (400 samples); output frame i sees samples [i S, i S + R), with
centre i S + R / 2. Video frame t's centre is (t + 0.5) sr / fps, so its feature is the layer
output linearly interpolated at i = ((t + 0.5) sr / fps - R / 2) / S (2t + 0.375 at 16 kHz,
25 fps), clamped to the first/last output frame at the clip edges.

Long audio: attention is global, so memory grows with the square of the length, and the
models were trained on crops of at most ~15 s. Audio longer than chunk + 2 * context seconds
is cut into windows of exactly that length: each window yields the features of its middle
`chunk` seconds and gives the model `context` seconds of audio on both sides (windows at the
clip ends are shifted inwards, so every window has the same shape and compiles once).
Shorter audio runs in one pass; the jitted forward compiles once per distinct input length.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from vasa_jax.audio.io import check_waveform
from vasa_jax.audio.mel import num_video_frames

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_NAME = "pytorch_model.bin"
FLAX_NAME = "flax_model.msgpack"
CONV_NORM_EPS = 1e-5  # torch GroupNorm / LayerNorm defaults in the feature encoder


class Wav2Vec2CheckpointError(ValueError):
    """A Wav2Vec2 folder that is missing, incomplete, or of an unsupported architecture."""


_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Arch:
    """The config.json fields the forward pass needs (hashable: a static jit argument)."""

    conv_kernel: tuple[int, ...]
    conv_stride: tuple[int, ...]
    conv_norm: str  # "group": GroupNorm after conv 0 only (base); "layer": LayerNorm after each
    conv_act: str
    hidden_size: int
    num_layers: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    stable_layer_norm: bool  # pre-LN transformer (large models) vs post-LN (base)
    pos_conv_kernel: int
    pos_conv_groups: int

    @classmethod
    def from_config(cls, cfg: dict, where: str = "config.json") -> "Wav2Vec2Arch":
        if cfg.get("model_type", "wav2vec2") != "wav2vec2":
            raise Wav2Vec2CheckpointError(
                f"{where}: model_type={cfg.get('model_type')!r}; only 'wav2vec2' is supported"
            )
        if cfg.get("adapter_attn_dim") is not None:
            raise Wav2Vec2CheckpointError(f"{where}: attention adapters (MMS) are not supported")
        arch = cls(
            conv_kernel=tuple(cfg.get("conv_kernel", (10, 3, 3, 3, 3, 2, 2))),
            conv_stride=tuple(cfg.get("conv_stride", (5, 2, 2, 2, 2, 2, 2))),
            conv_norm=cfg.get("feat_extract_norm", "group"),
            conv_act=cfg.get("feat_extract_activation", "gelu"),
            hidden_size=int(cfg.get("hidden_size", 768)),
            num_layers=int(cfg.get("num_hidden_layers", 12)),
            num_heads=int(cfg.get("num_attention_heads", 12)),
            hidden_act=cfg.get("hidden_act", "gelu"),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
            stable_layer_norm=bool(cfg.get("do_stable_layer_norm", False)),
            pos_conv_kernel=int(cfg.get("num_conv_pos_embeddings", 128)),
            pos_conv_groups=int(cfg.get("num_conv_pos_embedding_groups", 16)),
        )
        if arch.conv_norm not in ("group", "layer"):
            raise Wav2Vec2CheckpointError(f"{where}: feat_extract_norm={arch.conv_norm!r}")
        for act in (arch.conv_act, arch.hidden_act):
            if act not in _ACTIVATIONS:
                raise Wav2Vec2CheckpointError(f"{where}: unsupported activation {act!r}")
        return arch

    @property
    def stride(self) -> int:
        """Input samples per output frame (320)."""
        return math.prod(self.conv_stride)

    @property
    def receptive_field(self) -> int:
        """Input samples one output frame sees (400)."""
        field, jump = 1, 1
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            field += (kernel - 1) * jump
            jump *= stride
        return field


# ----------------------------------------------------------------------------- forward


def _layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["w"] + p["b"]


def _conv1d(x, w, stride=1, groups=1):
    """x: [B, L, Cin], w: [K, Cin / groups, Cout] -> [B, L', Cout] (VALID)."""
    return jax.lax.conv_general_dilated(
        x, w, (stride,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=groups,
    )


def _attention(x, p, num_heads):
    b, n, h = x.shape
    split = lambda y: y.reshape(b, n, num_heads, h // num_heads)
    q = split(_dense(x, p["q"])) * (h // num_heads) ** -0.5
    k, v = split(_dense(x, p["k"])), split(_dense(x, p["v"]))
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    return _dense(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, h), p["o"])


def hidden_state(params: dict, audio: jax.Array, *, arch: Wav2Vec2Arch, layer: int) -> jax.Array:
    """Hugging Face's `hidden_states[layer]` (output_hidden_states=True) of a Wav2Vec2Model.

    Args:
      params: `Wav2Vec2Features.params` (at least `layer` transformer layers).
      audio: [B, N] normalised waveform, N >= arch.receptive_field.
      layer: 0 (input of the first transformer layer) .. arch.num_layers (the output).
    Returns:
      [B, L, hidden_size], L = (N - R) // S + 1 with the usual conv-length rounding.
    """
    conv_act, act = _ACTIVATIONS[arch.conv_act], _ACTIVATIONS[arch.hidden_act]
    x = audio[:, :, None]
    for i, p in enumerate(params["conv"]):
        x = _conv1d(x, p["w"], arch.conv_stride[i])
        if "b" in p:
            x = x + p["b"]
        if arch.conv_norm == "layer":
            x = _layer_norm(x, p["norm"], CONV_NORM_EPS)
        elif i == 0:  # GroupNorm with one channel per group: normalise each channel over time
            mean = x.mean(1, keepdims=True)
            var = jnp.square(x - mean).mean(1, keepdims=True)
            x = (x - mean) * jax.lax.rsqrt(var + CONV_NORM_EPS)
            x = x * p["norm"]["scale"] + p["norm"]["bias"]
        x = conv_act(x)
    x = _dense(_layer_norm(x, params["proj_norm"], arch.layer_norm_eps), params["proj"])

    k = arch.pos_conv_kernel
    pos = jnp.pad(x, ((0, 0), (k // 2, k // 2), (0, 0)))
    pos = _conv1d(pos, params["pos_conv"]["w"], groups=arch.pos_conv_groups)
    pos = pos + params["pos_conv"]["b"]
    if k % 2 == 0:  # "same" padding of an even kernel yields one extra frame
        pos = pos[:, :-1]
    x = x + conv_act(pos)
    if not arch.stable_layer_norm:
        x = _layer_norm(x, params["enc_norm"], arch.layer_norm_eps)

    eps = arch.layer_norm_eps
    for p in params["layers"][:layer]:
        if arch.stable_layer_norm:  # pre-LN
            x = x + _attention(_layer_norm(x, p["attn_norm"], eps), p, arch.num_heads)
            x = x + _dense(act(_dense(_layer_norm(x, p["ff_norm"], eps), p["ff_in"])), p["ff_out"])
        else:  # post-LN
            x = _layer_norm(x + _attention(x, p, arch.num_heads), p["attn_norm"], eps)
            x = _layer_norm(x + _dense(act(_dense(x, p["ff_in"])), p["ff_out"]), p["ff_norm"], eps)
    if arch.stable_layer_norm and layer == arch.num_layers:
        x = _layer_norm(x, params["enc_norm"], eps)  # HF replaces the last hidden state by this
    return x


# ----------------------------------------------------------------------------- loading


def _flax_to_torch_names(tree: dict) -> dict[str, np.ndarray]:
    """HF Flax params (nested, kernel/scale) -> PyTorch state-dict names and layouts."""
    out = {}

    def visit(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                visit(value, path + [str(key)])
            return
        value, name = np.asarray(node), path[-1]
        if name == "kernel":
            name = "weight"
            # Dense [in, out] -> [out, in]; Conv [K, in, out] -> [out, in, K].
            value = value.T if value.ndim == 2 else value.transpose(2, 1, 0)
        elif name == "scale":
            name = "weight"
        out[".".join(path[:-1] + [name])] = value

    visit(tree, [])
    return out


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Weights of the folder as {PyTorch name: float32 array}, whatever the file format."""
    files = {name: os.path.join(path, name) for name in (SAFETENSORS_NAME, TORCH_NAME, FLAX_NAME)}
    if os.path.isfile(files[SAFETENSORS_NAME]):
        from safetensors.numpy import load_file

        state = load_file(files[SAFETENSORS_NAME])
    elif os.path.isfile(files[FLAX_NAME]):
        from flax import serialization

        with open(files[FLAX_NAME], "rb") as f:
            state = _flax_to_torch_names(serialization.msgpack_restore(f.read()))
    elif os.path.isfile(files[TORCH_NAME]):
        try:
            import torch
        except ImportError:
            raise Wav2Vec2CheckpointError(
                f"{path}: has only {TORCH_NAME}, which needs torch to read; convert it once "
                "elsewhere with `python -m vasa_jax.audio.wav2vec2 SRC DST`"
            ) from None
        raw = torch.load(files[TORCH_NAME], map_location="cpu", weights_only=True)
        state = {k: v.float().numpy() for k, v in raw.items()}
    else:
        raise Wav2Vec2CheckpointError(
            f"{path}: no weights found (expected {SAFETENSORS_NAME}, {FLAX_NAME} or "
            f"{TORCH_NAME}; sharded checkpoints are not supported)"
        )
    # Checkpoints of task models (ForCTC, ForPreTraining) nest the encoder under "wav2vec2.".
    prefix = "wav2vec2."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: np.asarray(v, np.float32) for k, v in state.items()}


def _params_from_state_dict(state: dict, arch: Wav2Vec2Arch, num_layers: int, where: str) -> dict:
    """PyTorch names/layouts -> the nested jnp-layout params of `hidden_state`."""

    def get(name):
        if name not in state:
            raise Wav2Vec2CheckpointError(f"{where}: the checkpoint has no weight {name!r}")
        return state[name]

    def dense(prefix):
        return {"w": get(prefix + ".weight").T, "b": get(prefix + ".bias")}

    def norm(prefix):
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    conv = []
    for i in range(len(arch.conv_kernel)):
        prefix = f"feature_extractor.conv_layers.{i}"
        layer = {"w": get(prefix + ".conv.weight").transpose(2, 1, 0)}  # [Cout, Cin, K] -> WIO
        if prefix + ".conv.bias" in state:
            layer["b"] = state[prefix + ".conv.bias"]
        if arch.conv_norm == "layer" or i == 0:
            layer["norm"] = norm(prefix + ".layer_norm")
        conv.append(layer)

    # Weight norm over every axis but the kernel axis (torch weight_norm dim=2). Torch's
    # parametrizations call g and v original0 and original1.
    pos = "encoder.pos_conv_embed.conv"
    g_name, v_name = pos + ".weight_g", pos + ".weight_v"
    if g_name not in state:
        g_name = pos + ".parametrizations.weight.original0"
        v_name = pos + ".parametrizations.weight.original1"
    g, v = get(g_name), get(v_name)  # [1, 1, K], [H, H / groups, K]
    weight = g * v / np.linalg.norm(v, axis=(0, 1), keepdims=True)

    layers = []
    for i in range(num_layers):
        prefix = f"encoder.layers.{i}"
        layers.append({
            "q": dense(prefix + ".attention.q_proj"),
            "k": dense(prefix + ".attention.k_proj"),
            "v": dense(prefix + ".attention.v_proj"),
            "o": dense(prefix + ".attention.out_proj"),
            "attn_norm": norm(prefix + ".layer_norm"),
            "ff_in": dense(prefix + ".feed_forward.intermediate_dense"),
            "ff_out": dense(prefix + ".feed_forward.output_dense"),
            "ff_norm": norm(prefix + ".final_layer_norm"),
        })
    return {
        "conv": conv,
        "proj_norm": norm("feature_projection.layer_norm"),
        "proj": dense("feature_projection.projection"),
        "pos_conv": {"w": weight.transpose(2, 1, 0), "b": get(pos + ".bias")},
        "enc_norm": norm("encoder.layer_norm"),
        "layers": layers,
    }


def _read_json(path: str, name: str, required: bool) -> dict:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        if required:
            raise Wav2Vec2CheckpointError(
                f"{path}: no {name}; expected a Hugging Face Wav2Vec2 folder"
            )
        return {}
    with open(file) as f:
        return json.load(f)


def _check_folder(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not path:
        raise Wav2Vec2CheckpointError(
            "no Wav2Vec2 folder given (audio.wav2vec2_path is empty); download a Hugging Face "
            "checkpoint such as facebook/wav2vec2-base-960h yourself and pass its local folder"
        )
    if not os.path.isdir(path):
        raise Wav2Vec2CheckpointError(f"{path}: Wav2Vec2 folder not found (nothing is downloaded)")
    return path


def read_arch(path: str | os.PathLike) -> Wav2Vec2Arch:
    """The architecture of a local checkpoint folder, from its config.json alone."""
    path = _check_folder(path)
    config = _read_json(path, CONFIG_NAME, required=True)
    return Wav2Vec2Arch.from_config(config, os.path.join(path, CONFIG_NAME))


def resolve_layer(layer: int, num_layers: int) -> int:
    """Python-style index into the num_layers + 1 hidden states -> 0 .. num_layers."""
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(f"layer {layer} out of range for {num_layers} layers (+1 input state)")
    return layer % (num_layers + 1)


# ----------------------------------------------------------------------------- video frames


def frame_positions(
    num_frames: int, sample_rate: float, fps: float, arch: Wav2Vec2Arch, offset: int = 0
) -> np.ndarray:
    """Fractional output-frame index centred on each video frame's centre, float64 [T].

    `offset`: first sample of the model's input within the clip (chunks).
    """
    centres = (np.arange(num_frames) + 0.5) * (sample_rate / fps) - offset
    return (centres - arch.receptive_field / 2.0) / arch.stride


def interpolate_frames(hidden: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of hidden [L, H] at fractional rows positions [T] -> [T, H].

    Positions outside [0, L - 1] take the edge row.
    """
    pos = np.clip(positions, 0.0, hidden.shape[0] - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, hidden.shape[0] - 1)
    frac = (pos - lo)[:, None].astype(np.float32)
    return hidden[lo] * (1.0 - frac) + hidden[hi] * frac


def chunk_plan(num_frames: int, chunk: int, context: int) -> list[tuple[int, int, int, int]]:
    """Windows over T video frames: (in_start, in_stop, out_start, out_stop) per window.

    Every window has length min(T, chunk + 2 * context); out ranges tile [0, T) exactly once
    and sit at least `context` frames inside their window, except at the clip's ends.
    """
    window = chunk + 2 * context
    if num_frames <= window:
        return [(0, num_frames, 0, num_frames)]
    plan = []
    for out_start in range(0, num_frames, chunk):
        out_stop = min(out_start + chunk, num_frames)
        in_start = min(max(out_start - context, 0), num_frames - window)
        plan.append((in_start, in_start + window, out_start, out_stop))
    return plan


class Wav2Vec2Features:
    """A local Wav2Vec2 checkpoint as an audio frontend: waveform -> [T, hidden_size].

    Usage:
      w2v = Wav2Vec2Features("/data/wav2vec2-base-960h", layer=-1)
      feats = w2v(load_audio("speech.wav"), num_frames=T)  # float32 [T, 768]
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layer: int = -1,
        *,
        fps: float = 25.0,
        chunk_seconds: float = 20.0,
        context_seconds: float = 2.0,
    ):
        """Args:
          path: local Hugging Face folder (config.json + weights); never downloaded.
          layer: which of the num_layers + 1 hidden states; -1 = last, 0 = transformer input.
          fps: video frame rate the output is aligned to.
          chunk_seconds, context_seconds: long-audio windows (module docstring).
        """
        path = _check_folder(path)
        self.arch = read_arch(path)
        self.layer = resolve_layer(layer, self.arch.num_layers)
        pre = _read_json(path, PREPROCESSOR_NAME, False)
        self.sample_rate = int(pre.get("sampling_rate", 16000))
        self.do_normalize = bool(pre.get("do_normalize", True))
        self.fps = float(fps)
        if chunk_seconds <= 0 or context_seconds < 0:
            raise ValueError(
                f"need chunk_seconds > 0 and context_seconds >= 0, got {chunk_seconds}, "
                f"{context_seconds}"
            )
        self.chunk_frames = max(1, int(round(chunk_seconds * self.fps)))
        self.context_frames = int(round(context_seconds * self.fps))
        # Layers above the selected one never run, so they are not even loaded.
        params = _params_from_state_dict(_read_state_dict(path), self.arch, self.layer, path)
        self.params = jax.device_put(params)
        self._forward = jax.jit(functools.partial(hidden_state, arch=self.arch, layer=self.layer))

    @classmethod
    def from_config(cls, cfg) -> "Wav2Vec2Features":
        """From an audio_config() section (configs/common.py)."""
        features = cls(cfg.wav2vec2_path, cfg.wav2vec2_layer, fps=cfg.fps,
                       chunk_seconds=cfg.wav2vec2_chunk_seconds,
                       context_seconds=cfg.wav2vec2_context_seconds)
        if features.sample_rate != cfg.sample_rate:
            raise ValueError(
                f"{cfg.wav2vec2_path} expects {features.sample_rate} Hz audio, "
                f"the config says {cfg.sample_rate}"
            )
        return features

    @property
    def dim(self) -> int:
        return self.arch.hidden_size

    def normalize(self, audio: np.ndarray) -> np.ndarray:
        """Wav2Vec2FeatureExtractor's zero-mean unit-variance normalisation (whole clip)."""
        audio = check_waveform(audio)
        if not self.do_normalize:
            return audio
        x = audio.astype(np.float64)
        return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The selected layer of an already normalised waveform: [n] -> float32 [L, H].

        Zero-padded to one receptive field if shorter. Compiles once per length n.
        """
        if x.shape[0] < self.arch.receptive_field:
            x = np.pad(x, (0, self.arch.receptive_field - x.shape[0]))
        return np.asarray(self._forward(self.params, jnp.asarray(x)[None])[0])

    def hidden_states(self, audio: np.ndarray) -> np.ndarray:
        """The selected layer at the model's own rate: float32 [L, hidden_size], one pass."""
        return self.forward(self.normalize(audio))

    def __call__(self, audio: np.ndarray, num_frames: int | None = None) -> np.ndarray:
        """Mono float32 [N] at self.sample_rate -> float32 [T, hidden_size] at self.fps.

        T = num_frames if given, else round(N * fps / sample_rate). The normalised audio is
        zero-padded or trimmed to T frames before the model sees it.
        """
        x = self.normalize(audio)
        if num_frames is None:
            num_frames = num_video_frames(x.shape[0], self.sample_rate, self.fps)
        if num_frames == 0:
            return np.zeros((0, self.dim), np.float32)
        spf = self.sample_rate / self.fps
        needed = int(math.ceil(num_frames * spf))
        x = np.pad(x[:needed], (0, max(0, needed - x.shape[0])))
        out = np.empty((num_frames, self.dim), np.float32)
        for in_start, in_stop, out_start, out_stop in chunk_plan(
            num_frames, self.chunk_frames, self.context_frames
        ):
            first = int(round(in_start * spf))
            hidden = self.forward(x[first:int(round(in_stop * spf))])
            positions = frame_positions(num_frames, self.sample_rate, self.fps, self.arch, first)
            out[out_start:out_stop] = interpolate_frames(hidden, positions[out_start:out_stop])
        return out


# ----------------------------------------------------------------------------- conversion


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rewrites a Wav2Vec2 folder (any weight format) as config.json + model.safetensors.

    For folders that only have pytorch_model.bin (needs torch to read) or a Flax msgpack:
    after this, loading needs neither torch nor a conversion.
    """
    from safetensors.numpy import save_file

    src = _check_folder(src)
    read_arch(src)
    state = _read_state_dict(src)
    os.makedirs(dst, exist_ok=True)
    save_file(state, os.path.join(dst, SAFETENSORS_NAME), metadata={"format": "pt"})
    for name in (CONFIG_NAME, PREPROCESSOR_NAME):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=convert_checkpoint.__doc__.splitlines()[0])
    parser.add_argument("src", help="Hugging Face Wav2Vec2 folder")
    parser.add_argument("dst", help="output folder")
    args = parser.parse_args()
    convert_checkpoint(args.src, args.dst)
    print(f"wrote {os.path.join(args.dst, SAFETENSORS_NAME)}")
