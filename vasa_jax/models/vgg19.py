"""VGG19 feature extractor for the perceptual loss (frozen), Flax NNX, channels-last.

The conv stack of torchvision's `vgg19().features` (configuration "E", no batch norm) up to
relu5_1, returning the five activations the face-vid2vid / MegaPortraits perceptual loss
compares: relu1_1, relu2_1, relu3_1, relu4_1, relu5_1. Inputs are images in [-1, 1]; the
ImageNet mean/std normalisation torchvision's weights expect happens inside.

Weights. torchvision's layout is `features.{i}.weight` [out, in, 3, 3] / `features.{i}.bias`
[out] for the conv at index i of the nn.Sequential (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23,
25, 28, ...). Reading a .pth needs torch, so a converter CLI rewrites it as a torch-free file
with the same keys and layouts (float32):

    python -m vasa_jax.models.vgg19 convert vgg19-dcbb9e9d.pth vgg19.safetensors   # or .npz

`load_vgg19(path)` then reads .safetensors or .npz (also a torchvision .safetensors as is);
keys without the "features." prefix (the state dict of the nn.Sequential itself) work too.
With no path it returns a frozen randomly initialised VGG19 (He init) and logs a warning:
random conv features still give a usable perceptual distance, but a worse one than ImageNet
features, so runs without weights say so.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from vasa_jax.models.layers import Conv

# (name, index in torchvision's vgg19().features, in channels, out channels); a 2x2 max pool
# precedes the first conv of blocks 2-5. Later convs (conv5_2..conv5_4) feed no tap.
CONVS: tuple[tuple[str, int, int, int], ...] = (
    ("conv1_1", 0, 3, 64),
    ("conv1_2", 2, 64, 64),
    ("conv2_1", 5, 64, 128),
    ("conv2_2", 7, 128, 128),
    ("conv3_1", 10, 128, 256),
    ("conv3_2", 12, 256, 256),
    ("conv3_3", 14, 256, 256),
    ("conv3_4", 16, 256, 256),
    ("conv4_1", 19, 256, 512),
    ("conv4_2", 21, 512, 512),
    ("conv4_3", 23, 512, 512),
    ("conv4_4", 25, 512, 512),
    ("conv5_1", 28, 512, 512),
)
TAPS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".npz")


def _max_pool(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2, floor on odd sizes (torch's MaxPool2d(2, 2)): [B,H,W,C]."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class VGG19Features(nnx.Module):
    """images [B, H, W, 3] in [-1, 1] -> [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1].

    Tap k has shape [B, H / 2^k, W / 2^k, (64, 128, 256, 512, 512)[k]] (floor division).
    Parameters: conv{b}_{l}.kernel [3, 3, in, out] ("conv_in", "conv_out"), .bias [out].
    """

    def __init__(
        self, *, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        for name, _, cin, cout in CONVS:
            # He init (init_scale sqrt 2) keeps a random VGG's activations from shrinking
            # ~2x per ReLU layer, so all five taps contribute to a random-feature loss.
            setattr(self, name, Conv(
                cin, cout, (3, 3), padding=1, weight_std=False, init_scale=float(np.sqrt(2.0)),
                dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            ))

    def __call__(self, images: jax.Array) -> list[jax.Array]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"VGG19Features expects images [B, H, W, 3], got {images.shape}")
        if min(images.shape[1:3]) < 16:
            raise ValueError(f"VGG19Features needs images of at least 16x16, got {images.shape}")
        mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
        std = jnp.asarray(IMAGENET_STD, jnp.float32)
        x = ((images.astype(jnp.float32) + 1.0) * 0.5 - mean) / std
        x = x.astype(self.dtype)
        taps = []
        for name, _, _, _ in CONVS:
            if name.endswith("_1") and name != "conv1_1":
                x = _max_pool(x)
            x = jax.nn.relu(getattr(self, name)(x))
            if name.endswith("_1"):
                taps.append(x)
        return taps


# ----------------------------------------------------------------------------- weights


def _strip_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keys 'features.{i}.weight' or '{i}.weight' -> '{i}.weight'; other keys dropped."""
    out = {}
    for key, value in state.items():
        k = key[len("features."):] if key.startswith("features.") else key
        head = k.split(".", 1)[0]
        if head.isdigit() and k.count(".") == 1:
            out[k] = np.asarray(value)
    return out


def params_from_torch(state: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """torchvision vgg19 state dict (numpy values) -> {conv name: {kernel, bias}} float32.

    Kernels go from torch's [out, in, kh, kw] to [kh, kw, in, out]. Raises KeyError for a
    missing conv and ValueError for a shape that is not VGG19's (e.g. a VGG16 file).
    """
    flat = _strip_prefix(state)
    if not flat:
        raise KeyError(
            f"no 'features.{{i}}.weight' keys found (got e.g. {sorted(state)[:5]}): "
            "is this a torchvision VGG19 state dict?"
        )
    params = {}
    for name, index, cin, cout in CONVS:
        wkey, bkey = f"{index}.weight", f"{index}.bias"
        if wkey not in flat or bkey not in flat:
            raise KeyError(f"VGG19 weights lack features.{index} ({name}); keys: {sorted(flat)}")
        w, b = flat[wkey], flat[bkey]
        if w.shape != (cout, cin, 3, 3) or b.shape != (cout,):
            raise ValueError(
                f"features.{index} ({name}) has weight {w.shape} / bias {b.shape}, VGG19 needs "
                f"{(cout, cin, 3, 3)} / {(cout,)}: wrong architecture?"
            )
        params[name] = {
            "kernel": np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)), np.float32),
            "bias": np.asarray(b, np.float32),
        }
    return params


def read_weights(path: str) -> dict[str, np.ndarray]:
    """A torch-free weights file (.safetensors or .npz) -> {key: numpy array}."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"VGG19 weights file {path!r} not found")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file  # imported here: only this format needs it

        return dict(load_file(path))
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    raise ValueError(
        f"VGG19 weights {path!r}: expected {WEIGHT_SUFFIXES}; convert a .pth first with "
        "`python -m vasa_jax.models.vgg19 convert IN.pth OUT.safetensors`"
    )


def load_vgg19(
    path: str | None, rngs: nnx.Rngs | None = None, *, dtype: jnp.dtype = jnp.float32,
) -> tuple[VGG19Features, bool]:
    """(model, is_pretrained): VGG19 features with the weights at `path`, or random ones.

    path: a .safetensors / .npz file with torchvision keys (see the module docstring), or
      ""/None for a randomly initialised VGG19 (logged as a warning). Parameters are stored
      in float32; `dtype` is the compute dtype.
    rngs: initialiser randomness (default nnx.Rngs(0)); it only matters without `path`.
    """
    rngs = nnx.Rngs(0) if rngs is None else rngs
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: VGG19Features(dtype=dtype, rngs=nnx.Rngs(0))))
    if not path:
        logging.warning(
            "perceptual loss: no VGG19 weights given, using a FROZEN RANDOMLY INITIALISED "
            "VGG19 (random features, not ImageNet ones; quality will be lower). Pass "
            "torchvision vgg19 weights converted with `python -m vasa_jax.models.vgg19 "
            "convert` to use the real perceptual loss."
        )
        # One jitted init: eager initialisation of the 13 convs is ~2x slower on CPU.
        init = jax.jit(lambda key: nnx.state(VGG19Features(dtype=dtype,
                                                           rngs=nnx.Rngs(params=key))))
        return nnx.merge(graphdef, init(rngs.params())), False
    params = params_from_torch(read_weights(path))
    # Fill the abstract state: no random initialisation of weights about to be replaced.
    nnx.replace_by_pure_dict(abstract, jax.tree.map(jnp.asarray, params))
    logging.info("perceptual loss: loaded VGG19 weights from %s", path)
    return nnx.merge(graphdef, abstract), True


# ----------------------------------------------------------------------------- converter


def convert(src: str, dst: str) -> dict[str, np.ndarray]:
    """Rewrites a torchvision VGG19 state dict as a torch-free file with the same keys.

    src: .pth / .pt (needs torch; a full model's or a `features` Sequential's state dict,
      optionally wrapped in {"state_dict": ...}) or .safetensors / .npz.
    dst: .safetensors or .npz. Only the features.{i} conv tensors (as float32) are kept.
    Returns what was written. The result is validated (all 13 convs, right shapes).
    """
    if not dst.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"output {dst!r} must end with one of {WEIGHT_SUFFIXES}")
    if src.endswith((".pth", ".pt", ".bin")):
        try:
            import torch
        except ImportError as e:
            raise ImportError("reading a .pth needs torch (pip install torch); or pass a "
                              ".safetensors file") from e
        state = torch.load(src, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        state = {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "numpy")}
    else:
        state = read_weights(src)
    kept = {f"features.{k}": np.ascontiguousarray(v, np.float32)
            for k, v in _strip_prefix(state).items()}
    params_from_torch(kept)  # fails early on a wrong file
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    if dst.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(kept, dst)
    else:
        np.savez(dst, **kept)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vasa_jax.models.vgg19",
        description="VGG19 weights for the perceptual loss.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="torchvision vgg19 .pth/.safetensors -> "
                          ".safetensors/.npz readable without torch")
    conv.add_argument("src")
    conv.add_argument("dst")
    args = parser.parse_args(argv)
    try:
        kept = convert(args.src, args.dst)
    except (OSError, KeyError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = sum(v.nbytes for v in kept.values()) / 2**20
    print(f"wrote {len(kept)} tensors ({size:.1f} MiB) to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
