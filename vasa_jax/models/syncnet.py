"""SyncNet (Chung & Zisserman 2016) in Flax NNX, and the Sc / SD lip-sync scores VASA-1 reports.

The network is the one of joonson/syncnet_python (`SyncNetModel.S`, weights
`syncnet_v2.model`), ported layer for layer, channels-last:

  audio stream  MFCC windows [B, 13, 20] (13 cepstra x 20 steps of 10 ms = 0.2 s)
                -> 6 conv + batch-norm + ReLU layers (3 max pools) -> [B, 512] -> fc -> [B, D]
  lip stream    5 consecutive face crops [B, 5, 224, 224, 3] (BGR, 0..255, as cv2 reads
                them) -> a (5, 7, 7) 3-D conv that consumes the 5 frames, then 5 2-D conv +
                batch-norm + ReLU layers (3 max pools) -> [B, 512] -> fc -> [B, D]

with D = 1024; every fc head is Linear 512 -> 512, batch norm, ReLU, Linear 512 -> D. The
batch norms run in inference mode (the stored running statistics).

Scores, as `SyncNetInstance.evaluate` computes them on a face track:
  1. faces: per frame a face box, its centre and size median-filtered over 13 frames; a
     square of 2.8 box half-sizes cut with the box's top edge 0.4 of a box below the
     square's (the mouth well inside), grey (110) outside the frame, resized to 224 px
     (`syncnet_crops`); frames at 25 fps.
  2. audio: 16 kHz mono as 16-bit PCM values, python_speech_features' MFCC (25 ms
     rectangular frames every 10 ms, pre-emphasis 0.97, 512-point FFT, 26 mel filters, 13
     cepstra, lifter 22, c0 replaced by the log frame energy; `mfcc`), i.e. 4 MFCC steps per
     video frame.
  3. features every frame t = 0 .. L - 6 (L = min(frames, samples / 640); syncnet_python
     stops one window short of the last): the lip stream on frames t..t+4, the audio stream
     on MFCC steps 4t .. 4t + 19.
  4. for each offset in -15..15 frames the Euclidean distance of every frame's lip feature
     to the audio feature that many frames away (zero vectors past either end), averaged
     over time (`offset_distances`); SD = the minimum mean distance, Sc (confidence) =
     median - minimum, AV offset = 15 - argmin (`sync_scores`).

Weights. `syncnet_v2.model` (from syncnet_python's download_model.sh) is a torch state dict
with keys netcnnaud.*, netfcaud.*, netcnnlip.*, netfclip.*. Converting it needs torch once:

    python -m vasa_jax.models.syncnet convert --weights syncnet_v2.model --out DIR

writes DIR/params (`vasa_jax.checkpointing.export_params`) and DIR/syncnet.json;
`load_syncnet(DIR)` / `SyncNetScorer.load(DIR)` read them without torch, and
`python -m vasa_jax.evaluate videos --syncnet DIR` fills the report's Sc and SD columns.

Face boxes here come from the face mesh (its bounding box) rather than syncnet_python's
S3FD detector, and frames decoded straight from the video rather than from JPEGs written by
ffmpeg: both can move the scores a little against published numbers.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vasa_jax.models.layers import Dense, conv3d, make_param

FPS = 25.0
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps
MFCC_PER_FRAME = 4  # 10 ms MFCC steps per 40 ms frame
MFCC_WINDOW = 20  # the audio stream's input: 20 steps (0.2 s, 5 frames)
NUM_CEPSTRA = 13
LIP_FRAMES = 5
CROP_SIZE = 224
CROP_SCALE = 0.4  # syncnet_python's --crop_scale
CROP_PAD_VALUE = 110  # the grey outside the frame
BOX_SMOOTHING = 13  # median filter over frames of the box centre and size
VSHIFT = 15  # offsets searched: -VSHIFT..VSHIFT frames
BN_EPS = 1e-5  # torch's BatchNorm default
EMBED_DIM = 1024
PARAMS_DIR = "params"
CONFIG_FILE = "syncnet.json"
CONVERT_COMMAND = ("python -m vasa_jax.models.syncnet convert --weights syncnet_v2.model "
                   "--out DIR")

# Each stream: ("conv", torch Sequential index, in, out, kernel, stride, padding) or
# ("pool", window, stride, padding). Every conv is followed by batch norm and ReLU (at
# index + 1, + 2). The lip stream's first kernel spans the 5 frames (depth 5, no padding),
# leaving depth 1: the layers after it are 2-D (syncnet_python's (1, k, k) 3-D kernels).
# The audio stream's 1x1 max pool (index 3) is the identity and is left out.
AUDIO_LAYERS = (
    ("conv", 0, 1, 64, (3, 3), (1, 1), (1, 1)),
    ("conv", 4, 64, 192, (3, 3), (1, 1), (1, 1)),
    ("pool", (3, 3), (1, 2), (0, 0)),
    ("conv", 8, 192, 384, (3, 3), (1, 1), (1, 1)),
    ("conv", 11, 384, 256, (3, 3), (1, 1), (1, 1)),
    ("conv", 14, 256, 256, (3, 3), (1, 1), (1, 1)),
    ("pool", (3, 3), (2, 2), (0, 0)),
    ("conv", 18, 256, 512, (5, 4), (1, 1), (0, 0)),
)
LIP_LAYERS = (
    ("conv", 0, 3, 96, (5, 7, 7), (1, 2, 2), (0, 0, 0)),
    ("pool", (3, 3), (2, 2), (0, 0)),
    ("conv", 4, 96, 256, (5, 5), (2, 2), (1, 1)),
    ("pool", (3, 3), (2, 2), (1, 1)),
    ("conv", 8, 256, 256, (3, 3), (1, 1), (1, 1)),
    ("conv", 11, 256, 256, (3, 3), (1, 1), (1, 1)),
    ("conv", 14, 256, 256, (3, 3), (1, 1), (1, 1)),
    ("pool", (3, 3), (2, 2), (0, 0)),
    ("conv", 18, 256, 512, (6, 6), (1, 1), (0, 0)),
)
# our stream name -> (torch conv Sequential, torch fc Sequential)
TORCH_PREFIXES = {"audio": ("netcnnaud", "netfcaud"), "lip": ("netcnnlip", "netfclip")}


def _convs(layers) -> list[tuple]:
    return [spec for spec in layers if spec[0] == "conv"]


# ----------------------------------------------------------------------------- model


def max_pool(x: jax.Array, window: Sequence[int], stride: Sequence[int],
             padding: Sequence[int]) -> jax.Array:
    """torch's MaxPool2d (floor mode, padding counts as -inf): x [B, H, W, C]."""
    pads = ((0, 0), *((p, p) for p in padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *stride, 1),
                                 pads)


class BatchNorm(nnx.Module):
    """Batch norm over the last axis: (x - mean) / sqrt(var + eps) * scale + bias.
    scale, bias: Params [C]; mean, var: BatchStats [C].

    Inference mode (use_running_average True, the default, how the scorer runs): the stored
    mean and var. Training mode (`model.train()`, vasa_jax.trainers.syncnet): the batch's
    own mean and var over every axis but the last, sown as nnx.Intermediate "moments" so
    that `population_statistics` can set the stored ones after training; the stored ones are
    never updated in place (the train step stays a pure function of the Params).
    """

    def __init__(self, channels: int):
        self.scale = make_param(None, nnx.initializers.ones_init(), (channels,), ("conv_out",),
                                jnp.float32)
        self.bias = make_param(None, nnx.initializers.zeros_init(), (channels,), ("conv_out",),
                               jnp.float32)
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))
        self.use_running_average = True

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = x.mean(axes)
            var = jnp.square(x - mean).mean(axes)
            self.sow(nnx.Intermediate, "moments", jnp.stack([mean, var]))
        inv = jax.lax.rsqrt(var + BN_EPS) * self.scale[...]
        return (x - mean) * inv + self.bias[...]


class ConvBN(nnx.Module):
    """Conv (2-D, or 3-D with a kernel spanning the whole input depth) + bias, batch norm, ReLU.

    2-D: x [B, H, W, in] -> [B, H', W', out]; kernel [kh, kw, in, out].
    3-D: x [B, kd, H, W, in] -> [B, H', W', out] (the depth axis is consumed);
         kernel [kd, kh, kw, in, out].
    """

    def __init__(self, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], *, rngs: nnx.Rngs):
        self.stride = tuple(stride)
        self.padding = tuple((p, p) for p in padding)
        init = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform")
        names = (None,) * len(kernel) + ("conv_in", "conv_out")
        self.kernel = make_param(rngs, init, (*kernel, cin, cout), names, jnp.float32)
        self.bias = make_param(None, nnx.initializers.zeros_init(), (cout,), ("conv_out",),
                               jnp.float32)
        self.bn = BatchNorm(cout)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        if kernel.ndim == 5:
            if x.shape[1] != kernel.shape[0]:
                raise ValueError(f"ConvBN: expected {kernel.shape[0]} frames, got {x.shape}")
            y = conv3d(x, kernel, self.stride, self.padding)[:, 0]
        else:
            y = jax.lax.conv_general_dilated(x, kernel, self.stride, self.padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(self.bn(y + self.bias[...]))


class Encoder(nnx.Module):
    """One SyncNet stream: `layers` (AUDIO_LAYERS or LIP_LAYERS) down to [B, 512] (the maps
    end at 1 x 1), then fc1 (512 -> 512), batch norm, ReLU, fc2 (512 -> embed_dim).
    Parameters: conv1..conv6 {kernel, bias, bn}, fc1, fc_bn, fc2."""

    def __init__(self, layers: tuple, embed_dim: int, *, rngs: nnx.Rngs):
        self.layers = layers
        for k, (_, _, cin, cout, kernel, stride, padding) in enumerate(_convs(layers), 1):
            setattr(self, f"conv{k}", ConvBN(cin, cout, kernel, stride, padding, rngs=rngs))
        self.fc1 = Dense(512, 512, names=("embed", "mlp"), rngs=rngs)
        self.fc_bn = BatchNorm(512)
        self.fc2 = Dense(512, embed_dim, names=("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        k = 0
        for spec in self.layers:
            if spec[0] == "conv":
                k += 1
                x = getattr(self, f"conv{k}")(x)
            else:
                x = max_pool(x, *spec[1:])
        if x.shape[1:3] != (1, 1):
            raise ValueError(f"SyncNet stream ended at {x.shape[1:3]}, not 1 x 1: wrong input "
                             "size (audio [B, 13, 20], lip [B, 5, 224, 224, 3])")
        x = x.reshape(x.shape[0], -1)
        return self.fc2(jax.nn.relu(self.fc_bn(self.fc1(x))))


class SyncNet(nnx.Module):
    """syncnet_python's network: `audio` and `lip` streams into one D-dim space."""

    def __init__(self, embed_dim: int = EMBED_DIM, *, rngs: nnx.Rngs):
        self.audio = Encoder(AUDIO_LAYERS, embed_dim, rngs=rngs)
        self.lip = Encoder(LIP_LAYERS, embed_dim, rngs=rngs)

    def audio_features(self, mfcc: jax.Array) -> jax.Array:
        """mfcc [B, 13, 20] (cepstra x 10 ms steps, `mfcc(...).T` windows) -> [B, D]."""
        if mfcc.shape[1:] != (NUM_CEPSTRA, MFCC_WINDOW):
            raise ValueError(f"audio_features expects [B, 13, 20], got {mfcc.shape}")
        return self.audio(mfcc.astype(jnp.float32)[..., None])

    def lip_features(self, frames: jax.Array) -> jax.Array:
        """frames [B, 5, 224, 224, 3]: 5 consecutive face crops, BGR, float 0..255 -> [B, D]."""
        if frames.shape[1:] != (LIP_FRAMES, CROP_SIZE, CROP_SIZE, 3):
            raise ValueError(f"lip_features expects [B, 5, 224, 224, 3], got {frames.shape}")
        return self.lip(frames.astype(jnp.float32))


def population_statistics(model: SyncNet, batches) -> SyncNet:
    """Sets every BatchNorm's stored mean and var to the statistics of its input over
    `batches` ("precise BN": the training-mode net normalises with batch statistics and
    stores none), and returns the model in inference mode.

    batches: iterable of (lips [B, 5, 224, 224, 3] float BGR 0..255, mfcc [B', 13, 20]).
    Per channel: mean = the average of the batch means, var = the average of the batch
    (var + mean^2) minus mean^2 (each layer's input computed with the batch statistics of
    the layers before it, as in training).
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def moments(state, lips, mfcc):
        m = nnx.merge(graphdef, state)
        m.train()
        m.lip_features(lips)
        m.audio_features(mfcc)
        sown = nnx.pop(m, nnx.Intermediate)
        return {path[:-1]: jnp.stack([v[0][0], v[0][1] + jnp.square(v[0][0])])
                for path, v in nnx.to_flat_state(sown)}  # [2, C]: E[x], E[x^2]

    total, count = None, 0
    for lips, mfcc in batches:
        m = moments(state, jnp.asarray(lips, jnp.float32), jnp.asarray(mfcc, jnp.float32))
        total = m if total is None else jax.tree.map(jnp.add, total, m)
        count += 1
    if not count:
        raise ValueError("population_statistics needs at least one batch")
    model.eval()
    for path, module in model.iter_modules():
        if isinstance(module, BatchNorm):
            mean, square = np.asarray(total[tuple(path)]) / count
            module.mean[...] = jnp.asarray(mean, jnp.float32)
            module.var[...] = jnp.asarray(np.maximum(square - mean ** 2, 0.0), jnp.float32)
    return model


# ----------------------------------------------------------------------------- weights


def params_from_torch(state: Mapping[str, np.ndarray]) -> dict:
    """syncnet_python state dict (numpy values) -> the pure dict of `nnx.state(SyncNet)`.

    Conv weights go from [out, in, (kd,) kh, kw] to [(kd,) kh, kw, in, out] (the lip
    stream's (1, k, k) kernels lose their depth axis), Linear weights from [out, in] to
    [in, out]. Keys may carry a "__S__." or "module." prefix. Raises ValueError naming a
    missing tensor or a shape that is not SyncNet's.
    """
    flat = {}
    for key, value in state.items():
        for prefix in ("module.", "__S__."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        flat[key] = np.asarray(value, np.float32)

    def get(key, shape=None):
        if key not in flat:
            raise ValueError(f"SyncNet weights lack {key!r} (keys e.g. {sorted(flat)[:4]}): is "
                           "this syncnet_python's syncnet_v2.model?")
        if shape is not None and flat[key].shape != tuple(shape):
            raise ValueError(f"SyncNet weights: {key} has shape {flat[key].shape}, the "
                             f"architecture needs {tuple(shape)}: wrong file?")
        return flat[key]

    def bn(prefix, c):
        return {"scale": get(f"{prefix}.weight", (c,)), "bias": get(f"{prefix}.bias", (c,)),
                "mean": get(f"{prefix}.running_mean", (c,)),
                "var": get(f"{prefix}.running_var", (c,))}

    embed_dim = get("netfcaud.3.weight").shape[0]
    out = {}
    for stream, layers in (("audio", AUDIO_LAYERS), ("lip", LIP_LAYERS)):
        cnn, fc = TORCH_PREFIXES[stream]
        params = {}
        for k, (_, index, cin, cout, kernel, _, _) in enumerate(_convs(layers), 1):
            torch_kernel = (kernel if stream == "audio" or len(kernel) == 3 else (1, *kernel))
            w = get(f"{cnn}.{index}.weight", (cout, cin, *torch_kernel))
            w = w.reshape(cout, cin, *kernel)
            params[f"conv{k}"] = {
                "kernel": np.ascontiguousarray(np.moveaxis(w, (0, 1), (-1, -2))),
                "bias": get(f"{cnn}.{index}.bias", (cout,)),
                "bn": bn(f"{cnn}.{index + 1}", cout)}
        params["fc1"] = {"kernel": get(f"{fc}.0.weight", (512, 512)).T.copy(),
                         "bias": get(f"{fc}.0.bias", (512,))}
        params["fc_bn"] = bn(f"{fc}.1", 512)
        params["fc2"] = {"kernel": get(f"{fc}.3.weight", (embed_dim, 512)).T.copy(),
                         "bias": get(f"{fc}.3.bias", (embed_dim,))}
        out[stream] = params
    return out


def read_torch_weights(path: str) -> dict[str, np.ndarray]:
    """A torch-saved state dict (syncnet_v2.model) -> {key: float32 numpy}. Needs torch."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights {path!r}: no such file (syncnet_python's "
                                "syncnet_v2.model, from its download_model.sh)")
    try:
        import torch
    except ImportError as e:
        raise ImportError("converting SyncNet weights needs torch (pip install torch)") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"--weights {path!r} holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().float().numpy() for k, v in state.items()
            if hasattr(v, "numpy") and v.dtype.is_floating_point}


def convert(weights: str, out: str) -> dict:
    """Writes OUT/params (export_params of the converted weights) and OUT/syncnet.json.
    Returns the params (pure dict). The output folder must not hold an export yet."""
    params = params_from_torch(read_torch_weights(weights))
    save_syncnet(out, params, {"source": os.path.basename(weights)})
    return params


def save_syncnet(out: str, weights: Any, meta: Mapping[str, Any]) -> None:
    """Writes OUT/params (every weight and batch-norm statistic: the pure dict of
    `nnx.state(SyncNet)`, or that state) and OUT/syncnet.json ({"embed_dim", **meta}), last:
    what `load_syncnet(OUT)` reads. FileExistsError if OUT holds an export already."""
    from vasa_jax.checkpointing import export_params  # orbax stays out of plain imports

    params_path = os.path.join(out, PARAMS_DIR)
    if os.path.exists(params_path):
        raise FileExistsError(f"{out!r} already holds {PARAMS_DIR}/; exports are never "
                              "overwritten")
    os.makedirs(out, exist_ok=True)
    if isinstance(weights, nnx.State):
        weights = nnx.to_pure_dict(weights)
    export_params(os.path.abspath(params_path), weights)
    embed_dim = int(np.shape(weights["audio"]["fc2"]["bias"])[0])
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump({"embed_dim": embed_dim, **meta}, f, indent=2)


def load_syncnet(path: str) -> SyncNet:
    """The SyncNet of a `convert` output folder (FileNotFoundError naming it if it is not one)."""
    from vasa_jax.checkpointing import load_params

    meta_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"SyncNet weights {path!r}: {meta_path} not found; convert "
                                f"syncnet_v2.model with `{CONVERT_COMMAND}`")
    with open(meta_path) as f:
        meta = json.load(f)
    # Restored into an abstract model: no random initialisation of weights about to be replaced.
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: SyncNet(int(meta["embed_dim"]), rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
    state = load_params(os.path.abspath(os.path.join(path, PARAMS_DIR)), target=target)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- pipeline


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


def mel_filterbank(num_filters: int = 26, nfft: int = 512,
                   sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """python_speech_features' triangular mel filters, float64 [num_filters, nfft // 2 + 1]:
    edges evenly spaced in mel from 0 Hz to Nyquist, snapped down to FFT bins (n + 1 scaling)."""
    edges = np.floor((nfft + 1) * _mel_to_hz(np.linspace(0.0, _hz_to_mel(sample_rate / 2),
                                                         num_filters + 2)) / sample_rate)
    bins = np.arange(nfft // 2 + 1)[None]
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = np.where((bins >= lo) & (bins < mid), (bins - lo) / np.maximum(mid - lo, 1e-12), 0)
    fall = np.where((bins >= mid) & (bins < hi), (hi - bins) / np.maximum(hi - mid, 1e-12), 0)
    return rise + fall


def mfcc(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """MFCCs with python_speech_features.mfcc's defaults (what SyncNet was trained on).

    pcm: [N] samples on the 16-bit scale (`to_pcm16`; the scale matters: c0 is the log
    energy). Frames of 25 ms every 10 ms, the last zero-padded (a signal under one frame
    gives one), no window, pre-emphasis 0.97, |512-point FFT|^2 / 512, 26 mel filters, log,
    orthonormal DCT-II, the first 13 cepstra, lifter 22, c0 := log frame energy.
    Returns float64 [frames, 13], frames = 1 + ceil((N - 400) / 160).
    """
    from scipy.fft import dct

    x = np.asarray(pcm, np.float64)
    x = np.append(x[:1], x[1:] - 0.97 * x[:-1])
    length, step, nfft = int(0.025 * sample_rate + 0.5), int(0.01 * sample_rate + 0.5), 512
    count = 1 if len(x) <= length else 1 + int(np.ceil((len(x) - length) / step))
    x = np.pad(x, (0, (count - 1) * step + length - len(x)))
    frames = x[np.arange(count)[:, None] * step + np.arange(length)[None]]
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    tiny = np.finfo(np.float64).eps
    energy = power.sum(1)
    energy = np.where(energy == 0, tiny, energy)
    bands = power @ mel_filterbank(26, nfft, sample_rate).T
    bands = np.where(bands == 0, tiny, bands)
    cep = dct(np.log(bands), type=2, axis=1, norm="ortho")[:, :NUM_CEPSTRA]
    cep *= 1.0 + 11.0 * np.sin(np.pi * np.arange(NUM_CEPSTRA) / 22.0)
    cep[:, 0] = np.log(energy)
    return cep


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] -> float64 values of its 16-bit PCM (what wavfile.read gives)."""
    return np.clip(np.round(np.asarray(audio, np.float64) * 32768.0), -32768, 32767)


def frames_at_25fps(num_frames: int, fps: float) -> np.ndarray:
    """Indices [T'] of the frames shown at each 40 ms step (syncnet_python first re-encodes
    every video at 25 fps; this is that resampling without the re-encode)."""
    if abs(fps - FPS) < 1e-3:
        return np.arange(num_frames)
    count = int(np.floor(num_frames * FPS / fps + 1e-6))
    return np.minimum(np.floor(np.arange(count) * fps / FPS + 1e-6).astype(int), num_frames - 1)


def syncnet_crops(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """syncnet_python's face-track crops (run_pipeline's crop_video), RGB kept.

    frames: uint8 [T, H, W, 3]. boxes: [T, 4] face boxes (x0, y0, x1, y1) pixels, one per
    frame. The box centre and half-size s = max(w, h) / 2 are median-filtered over
    BOX_SMOOTHING frames (scipy's medfilt: the ends see zero padding); each frame is padded with grey 110 and the square rows
    [cy - s, cy + 1.8 s), columns [cx - 1.4 s, cx + 1.4 s) (truncated to whole pixels) is
    resized to 224 px (bilinear). Returns uint8 [T, 224, 224, 3].
    """
    from scipy.signal import medfilt

    boxes = np.asarray(boxes, np.float64)
    # scipy's medfilt zero-pads the ends (as in syncnet_python); a kernel longer than the
    # clip would let the zeros win, so short clips get the longest odd kernel that fits.
    k = min(BOX_SMOOTHING, len(boxes) - (1 - len(boxes) % 2))
    half = medfilt(np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2, k)
    cy = medfilt((boxes[:, 1] + boxes[:, 3]) / 2, k)
    cx = medfilt((boxes[:, 0] + boxes[:, 2]) / 2, k)
    out = np.empty((len(frames), CROP_SIZE, CROP_SIZE, 3), np.uint8)
    for t, frame in enumerate(frames):
        s = half[t]
        pad = int(s * (1 + 2 * CROP_SCALE))
        padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), constant_values=CROP_PAD_VALUE)
        my, mx = cy[t] + pad, cx[t] + pad
        face = padded[int(my - s):int(my + s * (1 + 2 * CROP_SCALE)),
                      int(mx - s * (1 + CROP_SCALE)):int(mx + s * (1 + CROP_SCALE))]
        out[t] = cv2.resize(face, (CROP_SIZE, CROP_SIZE))
    return out


def offset_distances(video: jax.Array, audio: jax.Array, vshift: int = VSHIFT) -> jax.Array:
    """Mean feature distance at every audio-video offset (syncnet_python's calc_pdist + mean).

    video, audio: [N, D] per-frame lip and audio features (same frames). For j = 0..2 vshift
    the distance of video[t] to audio[t + j - vshift] (a zero vector where that is outside
    0..N-1, as syncnet_python pads), ||v - a + 1e-6|| (torch's pairwise_distance), averaged
    over t. Returns [2 vshift + 1]; index j is AV offset vshift - j.
    """
    video, audio = jnp.asarray(video, jnp.float32), jnp.asarray(audio, jnp.float32)
    n = video.shape[0]
    padded = jnp.pad(audio, ((vshift, vshift), (0, 0)))
    return jnp.stack([jnp.linalg.norm(video - padded[j:j + n] + 1e-6, axis=-1).mean()
                      for j in range(2 * vshift + 1)])


def sync_scores(mean_distances: np.ndarray, vshift: int = VSHIFT) -> dict[str, float]:
    """Scores of `offset_distances`' [2 vshift + 1] mean distances (syncnet_python's):
    SD = the minimum, Sc (confidence) = median - minimum, offset = vshift - argmin, i.e.
    video[t] matches audio[t - offset] best (positive: the lips lag the audio). The median
    of an even count is the lower middle value, as torch.median's."""
    d = np.asarray(mean_distances, np.float64)
    j = int(np.argmin(d))
    median = float(np.sort(d)[(len(d) - 1) // 2])
    return {"SD": float(d[j]), "Sc": median - float(d[j]), "offset": float(vshift - j)}


def window_count(num_frames: int, num_samples: int) -> int:
    """Frames t with a lip window (t..t+4) and an audio window, syncnet_python's count:
    min(frames, samples / 640) - 5 (it stops one window short of the last)."""
    return min(num_frames, num_samples // SAMPLES_PER_FRAME) - LIP_FRAMES


def mfcc_windows(audio: np.ndarray, count: int) -> np.ndarray:
    """The audio stream's inputs for frames 0..count-1: float32 [count, 13, 20], window t =
    MFCC steps 4t .. 4t + 19 of the whole waveform's `mfcc` (float [S] at 16 kHz)."""
    cep = mfcc(to_pcm16(audio)).T  # [13, steps]
    steps = np.arange(count)[:, None] * MFCC_PER_FRAME + np.arange(MFCC_WINDOW)[None]
    return cep[:, steps].transpose(1, 0, 2).astype(np.float32)


class SyncNetScorer:
    """Sc / SD of face-crop videos with their audio, on a converted SyncNet.

    `features(crops, audio)` -> (lip [N, D], audio [N, D]); `score(crops, audio)` ->
    {"Sc", "SD", "offset"} (`sync_scores`). Frames go through in chunks of `chunk` windows
    (one compiled shape; the last chunk is padded).
    """

    def __init__(self, model: SyncNet, chunk: int = 20):
        self.graphdef, self.state = nnx.split(model)
        self.chunk = chunk
        graphdef = self.graphdef

        def lips(state, crops):  # crops uint8 [chunk + 4, 224, 224, 3] RGB
            bgr = crops[..., ::-1].astype(jnp.float32)
            windows = jnp.stack([bgr[k:k + chunk] for k in range(LIP_FRAMES)], axis=1)
            return nnx.merge(graphdef, state).lip_features(windows)

        def audio(state, windows):  # [chunk, 13, 20]
            return nnx.merge(graphdef, state).audio_features(windows)

        self._lips, self._audio = jax.jit(lips), jax.jit(audio)

    @classmethod
    def load(cls, path: str, chunk: int = 20) -> "SyncNetScorer":
        return cls(load_syncnet(path), chunk)

    def features(self, crops: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """crops: uint8 [T, 224, 224, 3] RGB face crops at 25 fps (`syncnet_crops`); audio:
        float [S] at 16 kHz. Returns lip and audio features [N, D], N = min(T, S // 640) - 5
        (syncnet_python's count). ValueError when N < 1."""
        if crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
            raise ValueError(f"SyncNet needs [T, 224, 224, 3] crops, got {crops.shape}")
        n = window_count(len(crops), len(audio))
        if n < 1:
            raise ValueError(f"SyncNet needs at least 6 frames (0.24 s) of video and audio, got "
                             f"{len(crops)} frames and {len(audio) / SAMPLE_RATE:.2f} s")
        return self.window_features(crops, mfcc_windows(audio, n))

    def window_features(self, crops: np.ndarray, windows: np.ndarray,
                        lips: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """crops: uint8 [N + 4, 224, 224, 3] RGB; windows: the audio inputs [N, 13, 20]
        (`mfcc_windows`). Returns lip and audio features [N, D] (frames 0..N-1); lips, if
        given, are these crops' lip features already computed (only the audio is run)."""
        n = len(windows)
        if len(crops) < n + LIP_FRAMES - 1:
            raise ValueError(f"{n} audio windows need {n + LIP_FRAMES - 1} crops, got "
                             f"{len(crops)}")
        c = self.chunk
        lip_out, audio_out = [], []
        for i in range(0, n, c):
            m = min(c, n - i)
            if lips is None:
                frames = crops[i:i + m + LIP_FRAMES - 1]
                frames = np.concatenate(
                    [frames, np.repeat(frames[-1:], c + LIP_FRAMES - 1 - len(frames), 0)])
                lip_out.append(np.asarray(self._lips(self.state, frames))[:m])
            w = np.concatenate([windows[i:i + m], np.zeros((c - m, NUM_CEPSTRA, MFCC_WINDOW),
                                                           np.float32)])
            audio_out.append(np.asarray(self._audio(self.state, w))[:m])
        return (np.concatenate(lip_out) if lips is None else lips), np.concatenate(audio_out)

    def score(self, crops: np.ndarray, audio: np.ndarray,
              vshift: int = VSHIFT) -> dict[str, float]:
        lips, aud = self.features(crops, audio)
        return sync_scores(np.asarray(offset_distances(lips, aud, vshift)), vshift)


# ----------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> int:
    from vasa_jax import cli

    return cli.convert_weights_main(
        argv, prog="python -m vasa_jax.models.syncnet", name="SyncNet", description="SyncNet weights for the Sc / SD metrics.",
        weights_help="syncnet_python's syncnet_v2.model", flag="--syncnet", convert=convert)


if __name__ == "__main__":
    sys.exit(main())
