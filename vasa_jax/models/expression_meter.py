"""Expression meter: a small CNN that reads SynthTalk's expression labels off a face image.

It measures whether a generator transfers expressions (the evaluator's expression transfer,
`python -m vasa_jax.evaluate face_latent --expression_meter PATH`): read the driver's
mouth, blink and gaze off an image decoded with the driver's motion, and correlate with the
driver's labels. The way `vasa_jax.models.face_id` stands in for ArcFace, this stands in for
a landmark / gaze estimator, trained on the dataset's own per-frame labels:

    images [B, H, W, 3] in [-1, 1] (any H, W)
      -> resize to image_size x image_size (antialiased when shrinking)
      -> len(channels) x (3x3 conv, ReLU), a 2x average pool after all but the last
      -> head: global mean pool [B, C] ("mean"), or the final map flattened
         [B, (image_size / 2^(L-1))^2 C] ("flatten": position-aware, reads gaze)
      -> dense, ReLU -> dense -> [B, 4] scaled outputs

No normalisation layers: a plain conv net learns SynthTalk's small features (a mouth a few
pixels tall) fast at batch 16, GroupNorm was measured to slow that down a lot, and without
batch statistics the frozen meter reads every image alone.

Outputs, scaled to comparable ranges (the loss is a plain MSE over the four): columns
OUTPUT_COLUMNS = (mouth_open, blink, gaze_theta, gaze_phi) with

    mouth_open, blink       the labels as they are (schema: 0 closed/open .. 1 wide/closed)
    gaze_theta, gaze_phi    the labels (degrees) / gaze_scale (default 20 degrees: SynthTalk's
                            glances reach about +-22 degrees, so about [-1, 1])

`ExpressionMeter` (the frozen meter) returns readings in label units: {"mouth_open": [B],
"blink": [B], "gaze": [B, 2] degrees}.

Training (vasa_jax.trainers.expression_meter, a stage of the shared loop): frames from the
stage-1 loader (`data_pipeline.loaders.stage1_dataset`: each example gives a source, a
driving and a cross-identity frame, three labelled faces, with its light scale/shift/colour
jitter) plus random 2x blur (`face_id.augment`), so the meter also reads the slightly soft
frames a generator makes. Held-out evaluation on the test split
(`data_pipeline.loaders.read_frames`: other clips of the training identities): Pearson r
and mean absolute error (label units) per output column.

Measured (2 CPU cores): on tests/testdata.py's corpus (a large drawn mouth), 32 px, batch 8,
lr 1e-2, 60 steps: held-out mouth r 0.81-0.95 over 10 seeds. On SynthTalk (64 px face
framing, 8 identities x 3 clips of 4 s; an open mouth is a few pixels), batch 16, lr 5e-3,
150 steps (5 min): mouth r 0.24, blink 0.04, gaze theta 0.16 / phi 0.06: far from trained.
Budget thousands of steps there (docs/experiments.md: the stage-1 dynamics encoder taught
the mouth directly, without GroupNorm, reached R^2 0.68 after 3000 batch-16 steps).

    python train.py --config configs/expression_meter.py:size=tiny --workdir OUT \
        --config.data.path=DIR [--config.train.total_steps=N] [--config.model.image_size=64]

ends by writing OUT/params (`vasa_jax.checkpointing.export_params`) and
OUT/expression_meter.json (model config, the run's config, metrics) next to its
checkpoints. `load_expression_meter(OUT)` gives the frozen meter.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from vasa_jax.models.layers import Conv, Dense, avg_pool

CONFIG_FILE = "expression_meter.json"
PARAMS_DIR = "params"
LABELS = ("mouth_open", "blink", "gaze")  # the schema labels read (gaze: [2] degrees)
OUTPUT_COLUMNS = ("mouth_open", "blink", "gaze_theta", "gaze_phi")
HEADS = ("mean", "flatten")


@dataclasses.dataclass(frozen=True)
class ExpressionMeterConfig:
    """Architecture and output scaling (saved with the params; the loader rebuilds it)."""

    image_size: int = 64  # side images are resized to
    channels: tuple[int, ...] = (32, 64, 64, 128)  # one 3x3 conv each
    hidden: int = 128  # width of the dense layer after the mean pool
    gaze_scale: float = 20.0  # degrees per output unit of gaze_theta / gaze_phi
    # After the convs: "mean" (global mean pool: where a feature is is lost) or "flatten"
    # (the whole final map into the dense layer: position-aware, so an iris's place in the
    # eye, i.e. gaze, can be read). Exports written before this field read as "mean".
    head: str = "mean"

    def __post_init__(self):
        pools = 2 ** (len(self.channels) - 1)
        if not self.channels or self.image_size < 2 * pools or self.image_size % pools:
            raise ValueError(f"image_size {self.image_size} does not fit {len(self.channels)} "
                             f"conv layers: it must be a multiple of {pools} and >= {2 * pools}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.gaze_scale <= 0 or self.hidden < 1:
            raise ValueError(f"need gaze_scale > 0 and hidden >= 1, got {self.gaze_scale}, "
                             f"{self.hidden}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ExpressionMeterConfig":
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)


def targets_from_labels(labels: Mapping[str, Any], gaze_scale: float) -> np.ndarray:
    """Per-frame labels {mouth_open [N], blink [N], gaze [N, 2]} -> scaled targets [N, 4]."""
    missing = [k for k in LABELS if k not in labels]
    if missing:
        raise ValueError(f"the expression meter needs labels {list(LABELS)}; missing {missing}")
    return np.concatenate([
        np.asarray(labels["mouth_open"], np.float32).reshape(-1, 1),
        np.asarray(labels["blink"], np.float32).reshape(-1, 1),
        np.asarray(labels["gaze"], np.float32).reshape(-1, 2) / gaze_scale,
    ], axis=1)


def readings_from_outputs(outputs: jax.Array, gaze_scale: float) -> dict[str, jax.Array]:
    """Scaled outputs [B, 4] -> readings in label units {mouth_open [B], blink [B],
    gaze [B, 2] degrees}."""
    return {"mouth_open": outputs[:, 0], "blink": outputs[:, 1],
            "gaze": outputs[:, 2:4] * gaze_scale}


class ExpressionMeterNet(nnx.Module):
    """images [B, H, W, 3] in [-1, 1] -> scaled outputs [B, 4] (OUTPUT_COLUMNS)."""

    def __init__(self, cfg: ExpressionMeterConfig, *, rngs: nnx.Rngs):
        self.image_size = cfg.image_size
        ch = cfg.channels
        # He-scaled (ReLU) fan-in init; no weight standardisation (there is no norm either).
        self.convs = nnx.List([
            Conv(cin, cout, (3, 3), weight_std=False, init_scale=2.0**0.5, rngs=rngs)
            for cin, cout in zip((3,) + ch[:-1], ch)
        ])
        self.head = cfg.head
        side = cfg.image_size // 2 ** (len(ch) - 1)  # the final map's side
        fan_in = ch[-1] * (side * side if cfg.head == "flatten" else 1)
        self.hidden = Dense(fan_in, cfg.hidden, names=("embed", "mlp"), init_scale=2.0**0.5,
                            rngs=rngs)
        self.out = Dense(cfg.hidden, len(OUTPUT_COLUMNS), names=("mlp", "embed"), rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ExpressionMeterNet expects images [B, H, W, 3], got "
                             f"{images.shape}")
        x = images.astype(jnp.float32)
        if x.shape[1:3] != (self.image_size, self.image_size):
            x = jax.image.resize(x, (x.shape[0], self.image_size, self.image_size, 3),
                                 "linear", antialias=True)
        for i, conv in enumerate(self.convs):
            x = jax.nn.relu(conv(x))
            if i < len(self.convs) - 1:
                x = avg_pool(x, (2, 2))
        x = x.reshape(x.shape[0], -1) if self.head == "flatten" else jnp.mean(x, axis=(1, 2))
        x = jax.nn.relu(self.hidden(x))
        return self.out(x)


# ----------------------------------------------------------------------------- frozen use


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(images)


class ExpressionMeter:
    """A frozen expression meter: images [B, H, W, 3] in [-1, 1] -> readings in label units
    {"mouth_open": [B], "blink": [B], "gaze": [B, 2] degrees}.

    `meter(images)` closes over the parameters; `apply(params, images)` takes them
    explicitly (to pass them as a jit argument). No gradient reaches the parameters.
    """

    def __init__(self, net: ExpressionMeterNet, config: ExpressionMeterConfig):
        self.config = config
        self.graphdef, self.params = nnx.split(net)

    def apply(self, params: nnx.State, images: jax.Array) -> dict[str, jax.Array]:
        outputs = _apply(self.graphdef, jax.lax.stop_gradient(params), images)
        return readings_from_outputs(outputs, self.config.gaze_scale)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        return self.apply(self.params, images)


def save_expression_meter(path: str, net: ExpressionMeterNet, config: ExpressionMeterConfig,
                          extra: dict | None = None) -> None:
    """Writes PATH/params and PATH/expression_meter.json ({"model": config, ...extra}):
    checkpointing.export_module."""
    from vasa_jax.checkpointing import export_module  # orbax stays out of plain imports

    export_module(path, net, PARAMS_DIR, CONFIG_FILE,
                  {"model": config.to_json(), **(extra or {})})


def load_expression_meter_net(path: str
                              ) -> tuple[ExpressionMeterNet, ExpressionMeterConfig, dict]:
    """(net, config, the whole expression_meter.json) of a `save_expression_meter` export."""
    from vasa_jax.checkpointing import load_params

    meta_path = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"expression meter {path!r}: {meta_path} not found; train one with `python "
            "train.py --config configs/expression_meter.py:size=tiny --workdir PATH "
            "--config.data.path=DIR`")
    with open(meta_path) as f:
        meta = json.load(f)
    config = ExpressionMeterConfig.from_json(meta["model"])
    # Restored into an abstract net: no random initialisation of weights about to be replaced.
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: ExpressionMeterNet(config, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
    net = nnx.merge(graphdef, load_params(os.path.join(path, PARAMS_DIR), target=target))
    return net, config, meta


def load_expression_meter(path: str) -> ExpressionMeter:
    """The frozen meter of a trained export (FileNotFoundError naming `path` if there is
    none)."""
    net, config, meta = load_expression_meter_net(path)
    logging.info("expression meter from %s (held-out Pearson r %s)", path,
                 meta.get("metrics", {}).get("pearson_r"))
    return ExpressionMeter(net, config)


# ----------------------------------------------------------------------------- evaluation


def predict(net: ExpressionMeterNet, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Scaled outputs [N, 4] in fixed-size batches (the last padded: one compilation)."""
    graphdef, state = nnx.split(net)
    out = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        pad = np.zeros((batch - len(x),) + x.shape[1:], x.dtype)
        out.append(np.asarray(_apply(graphdef, state, np.concatenate([x, pad])))[: len(x)])
    return np.concatenate(out)


def evaluate(net: ExpressionMeterNet, config: ExpressionMeterConfig, images: np.ndarray,
             labels: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Held-out metrics per OUTPUT_COLUMNS: Pearson r (None where the labels are constant)
    and mean absolute error in label units (degrees for gaze)."""
    from vasa_jax.metrics.motion import pearson_r

    target = targets_from_labels(labels, config.gaze_scale)
    pred = predict(net, images)
    units = np.array([1.0, 1.0, config.gaze_scale, config.gaze_scale])
    metrics: dict[str, Any] = {"num_eval_frames": int(len(images)), "pearson_r": {}, "mae": {}}
    for k, name in enumerate(OUTPUT_COLUMNS):
        r = pearson_r(pred[:, k], target[:, k])
        metrics["pearson_r"][name] = float(r) if np.isfinite(r) else None
        metrics["mae"][name] = float(np.mean(np.abs(pred[:, k] - target[:, k])) * units[k])
    return metrics
