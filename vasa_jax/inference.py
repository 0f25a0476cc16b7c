"""Inference: one portrait + a speech clip -> a talking-face video, offline or streaming.

This layer imports no trainer. A model is an *export*, a folder written by

    python -m vasa_jax.inference export --face_workdir W1 --motion_workdir W2 --out DIR

    DIR/pipeline.json   both stages' configs, steps and provenance, the audio frontend
    DIR/face_params     the stage-1 EMA generator's parameters (checkpointing.export_params)
    DIR/motion_params   the stage-2 EMA model's parameters
    DIR/normalization.json   the stage-2 run's normalisation (data_pipeline.stats)

(the built-in demo model, assets/demo_model, is one). Then:

    pipe = Pipeline.load("assets/demo_model")
    video = pipe.generate(portrait, audio, Controls(gaze=(15.0, 0.0)))   # Video
    for frame in pipe.stream(portrait, chunks):                          # Frame, as audio comes
        ...

portrait: uint8 [H, W, 3] RGB, framed like the training crops (data_pipeline.schema's face
crop convention); a non-square image is centre-cropped and any size is resized to the
model's, with a warning. For a photo, cut the face out first, as sample.py does:

    portrait = read_portrait("photo.jpg", pipe.image_size)   # face found, levelled, cropped

(`crop_portrait` for an image in memory; align="auto" | "face" | "none", see there).
audio: mono float32 samples at SAMPLE_RATE (vasa_jax.audio.load_audio reads, down-mixes,
resamples and checks files).

What happens: the portrait is encoded once (V_app, z_id and its own z_pose, z_dyn); motion
is drawn window by window (motion_sampler.MotionStream: each window conditioned on the
previous one's last K frames, one compiled sampler for every window); each window's W
frames are decoded by one compiled call, so nothing recompiles from window to window and
memory stays bounded for any audio length. Streaming draws window i as soon as the audio of
its frames (plus the mel analysis window's 12.5 ms look-ahead) has arrived, and yields the
same frames as `generate` for the same seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging as pylogging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from data_pipeline import schema
from data_pipeline import stats as stats_lib
from data_pipeline import transforms
from vasa_jax import audio as audio_lib
from vasa_jax.models.face_latent import FaceLatentModel
from vasa_jax.models.motion_dit import CONTROL_DIMS, MotionDiT
from vasa_jax.motion_sampler import MotionGenerator

PIPELINE_FILE = "pipeline.json"
FACE_PARAMS = "face_params"
MOTION_PARAMS = "motion_params"
SAMPLE_RATE = schema.SAMPLE_RATE
HEAD_MODES = ("generated", "still")
# The built-in demo model (both stages of scripts/recipe_cpu.sh, SynthTalk faces at 64 px).
DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "assets", "demo_model")


# ----------------------------------------------------------------------------- inputs


def signed_to_uint8(images: jax.Array) -> jax.Array:
    """images in [-1, 1] -> uint8 (clipped, rounded)."""
    return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


# How a portrait is cut to the model's square (`crop_portrait`, sample.py --align).
ALIGN_MODES = ("auto", "face", "none")
# auto: an image at the model's size (square, within 25%) whose face is already framed like
# the training crops is used as it is. "Framed": the face-crop convention's square
# (data_pipeline.face_analysis.crop_box) lies within these bounds of the image's own
# square. Measured on 64 px SynthTalk renders at the data's head poses (|yaw| <= 25,
# |pitch| <= 15, |roll| <= 10 degrees): centre offsets up to 0.23 of the side, side ratios
# 0.85-1.05, eye lines up to 12 degrees; the built-in portrait: 0.09, 0.86, 0.3 degrees;
# astronaut.png aligned by align="face", at 64-256 px: 0.01, 1.01-1.02, 0.2 degrees.
FRAMED_MAX_OFFSET = 0.25  # |crop centre - image centre| / image side
FRAMED_SIDE = (0.75, 1.33)  # crop side / image side
FRAMED_MAX_ANGLE = 15.0  # |eye line|, degrees


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or min(image.shape[:2]) < 8:
        raise ValueError(f"portrait must be an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"portrait must be uint8, got {image.dtype}")
    return np.ascontiguousarray(image[..., :3])


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h != w:
        warnings.warn(f"portrait is {w}x{h}, not square: centre-cropped to a square; the "
                      "model expects a face crop framed like its training data (align='auto' "
                      "finds and crops the face)", stacklevel=3)
    if abs(min(h, w) - size) > size // 4:
        warnings.warn(f"portrait resized from {min(h, w)} to the model's {size} px",
                      stacklevel=3)
    return np.ascontiguousarray(transforms.resize_square(image, size), np.uint8)


def _framing(image: np.ndarray, analyzer) -> tuple[float, float, float] | None:
    """How far the largest face's crop (face-crop convention) is from the image's own
    square: (centre offset / side, crop side / side, |eye line| degrees); None: no face."""
    from data_pipeline import face_analysis as fa

    try:
        det = fa.largest_face(image, analyzer)
    except fa.NoFaceError:
        return None
    n = image.shape[0]
    if analyzer.backend == "tflite":
        lm = analyzer.landmarks(image, det)
        (cx, cy, side), angle = fa.crop_box(lm), fa.eye_line_angle(lm)
    else:
        (cx, cy, side), angle = fa.haar_crop_box(det.box), 0.0
    return float(np.hypot(cx - n / 2, cy - n / 2) / n), side / n, abs(angle)


def crop_portrait(image: np.ndarray, size: int, align: str = "auto",
                  name: str = "the portrait") -> tuple[np.ndarray, str]:
    """A portrait image -> (uint8 [size, size, 3] for the model, a one-line note of what
    was done). The one place where portraits are cut (sample.py --align, `read_portrait`).

    image: RGB uint8 [H, W, 3] ([H, W] gray and RGBA accepted), any size.
    align:
      "face": find the largest face (several: a logged warning), level its eye line and cut
        the square of the face-crop convention (data_pipeline.schema), resized to `size`
        (data_pipeline.face_analysis.align_portrait). No face: NoFaceError (a ValueError)
        "no face found in NAME ...".
      "none": the image as it is: a non-square one centre-cropped to a square, any size
        resized, with warnings (as `prepare_portrait` has always done).
      "auto": "face", except for an image already at the model's size (square, within 25%
        of `size`): if its face is already framed like the training crops (`FRAMED_*`), or
        no face is found in it (a warning), it is used as it is, as "none" would. So a face
        crop at the model's size (the built-in SynthTalk portrait) comes out unchanged, and
        `crop_portrait` of its own output changes nothing; a photo of another size without
        a face is an error, never cropped blindly.
    name: the image's name in messages (sample.py: the file).
    """
    if align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}, got {align!r}")
    image = _check_image(image)
    h, w = image.shape[:2]
    if align == "none":
        return _centre_crop(image, size), f"{w}x{h} used as it is (align none)"
    from data_pipeline import face_analysis as fa

    analyzer = fa.default_analyzer()
    if align == "auto" and h == w and abs(h - size) <= size // 4:
        framing = _framing(image, analyzer)
        if framing is None:
            warnings.warn(f"no face found in {name} ({w}x{h}); it is at the model's size, so "
                          "it is used as it is, as a face crop (align 'face' makes this an "
                          "error)", stacklevel=2)
            return _centre_crop(image, size), f"{w}x{h}, no face found: used as it is"
        offset, side, angle = framing
        lo, hi = FRAMED_SIDE
        if offset <= FRAMED_MAX_OFFSET and lo <= side <= hi and angle <= FRAMED_MAX_ANGLE:
            return _centre_crop(image, size), (
                f"{w}x{h}, already a face crop (face-crop convention: centre "
                f"{offset:.0%} off, side x{side:.2f}, eye line {angle:.1f} deg): used as it is")
    try:
        crop = fa.align_portrait(image, size, analyzer)
    except fa.NoFaceError:
        raise fa.NoFaceError(f"no face found in {name} ({w}x{h}): use a photo with one "
                             "clearly visible face") from None
    return crop, f"{w}x{h}, face found and aligned ({analyzer.backend}), {size} px crop"


def prepare_portrait(image: np.ndarray, size: int, align: str = "none",
                     name: str = "the portrait") -> np.ndarray:
    """RGB uint8 [H, W, 3] (or [H, W], or RGBA) -> uint8 [size, size, 3], cut as `align`
    says (`crop_portrait`). By default ("none") the image is taken as a face crop framed as
    the training data (schema.FACE_CROP_HEIGHT): a non-square image is centre-cropped to a
    square and resized, with a warning; an image already at `size` is used unchanged.
    """
    return crop_portrait(image, size, align, name)[0]


def read_portrait(path: str, size: int | None = None, align: str = "auto") -> np.ndarray:
    """An image file -> RGB uint8 [H, W, 3] (ValueError naming the file otherwise).

    size: the model's (Pipeline.image_size): then the portrait ready for the model, uint8
    [size, size, 3], cut as `align` says (`crop_portrait`; by default the face is found,
    levelled and cropped, NoFaceError if there is none). None: the file's pixels as they are.
    """
    import cv2

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not an image OpenCV can read")
    image = np.ascontiguousarray(image[..., ::-1])
    if size is None:
        return image
    return prepare_portrait(image, size, align, name=path)


def emotion_vector(emotion: str | Sequence[float] | None) -> np.ndarray | None:
    """An emotion name (schema.EMOTIONS) or probabilities [8] -> float32 [8] (None: none)."""
    if emotion is None:
        return None
    if isinstance(emotion, str):
        if emotion not in schema.EMOTIONS:
            raise ValueError(f"emotion {emotion!r} is not one of {schema.EMOTIONS}")
        return np.eye(len(schema.EMOTIONS), dtype=np.float32)[schema.EMOTIONS.index(emotion)]
    x = np.asarray(emotion, np.float32).reshape(-1)
    if x.shape != (CONTROL_DIMS["emotion"],) or np.any(x < 0) or not 0.99 < x.sum() < 1.01:
        raise ValueError(f"emotion must be a name or {CONTROL_DIMS['emotion']} probabilities "
                         f"summing to 1, got {emotion!r}")
    return x


def parse_gaze(text: str) -> tuple[float, float]:
    """"THETA,PHI" (degrees) -> (theta, phi); ValueError otherwise."""
    try:
        theta, phi = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"expected THETA,PHI degrees, got {text!r}") from None
    return theta, phi


def parse_guidance(text: str) -> dict[str, float]:
    """"audio=0.5,gaze=1.0" -> {"audio": 0.5, "gaze": 1.0}; ValueError otherwise."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"expected NAME=SCALE[,NAME=SCALE], got {text!r}") from None
    return out


def parse_bool(text: str) -> bool:
    """"true" / "yes" / "1" / "on" -> True, "false" / "no" / "0" / "off" -> False."""
    if text.strip().lower() in ("1", "true", "yes", "y", "on"):
        return True
    if text.strip().lower() in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@dataclasses.dataclass(frozen=True)
class Controls:
    """What to generate besides the audio.

    gaze: (theta, phi) degrees, distance: head distance (the data's units), emotion: a name
    of schema.EMOTIONS or 8 probabilities; None = that condition dropped (the model's own
    choice). guidance: {condition: CFG scale} (None: the stage-2 config's). steps: DDIM
    steps (None: the config's). seed: the motion's noise.
    head: "generated" (the model's head motion) or "still" (the portrait's pose throughout);
    head_amplitude scales generated head motion about the data's mean pose (0.5 about
    halves it). lip_only: the portrait's pose and eyes, only the mouth from the audio
    (needs a stage-1 model with model.motion.dyn_split, whose z_dyn has a mouth half).
    """

    gaze: tuple[float, float] | None = None
    distance: float | None = None
    emotion: str | tuple[float, ...] | None = None
    guidance: Mapping[str, float] | None = None
    steps: int | None = None
    seed: int = 0
    head: str = "generated"
    head_amplitude: float = 1.0
    lip_only: bool = False

    def __post_init__(self):
        if self.head not in HEAD_MODES:
            raise ValueError(f"head must be one of {HEAD_MODES}, got {self.head!r}")
        if not 0.0 <= self.head_amplitude <= 4.0:
            raise ValueError(f"head_amplitude must be in [0, 4], got {self.head_amplitude}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        emotion_vector(self.emotion)  # a bad name fails here

    @classmethod
    def from_text(cls, fields: Mapping[str, str]) -> "Controls":
        """Controls from text values, as forms and CSV cells give them: {"gaze": "15,0",
        "emotion": "happy", "seed": "3", "lip_only": "true", "guidance": "audio=0.5", ...};
        empty values are left at the defaults. ValueError names a bad or unknown field."""
        parsers = {"gaze": parse_gaze, "distance": float, "emotion": str,
                   "guidance": parse_guidance, "steps": int, "seed": int, "head": str,
                   "head_amplitude": float, "lip_only": parse_bool}
        values = {}
        for name, text in fields.items():
            if name not in parsers:
                raise ValueError(f"unknown control {name!r} (known: {', '.join(parsers)})")
            if str(text).strip():
                try:
                    values[name] = parsers[name](str(text).strip())
                except ValueError as e:
                    raise ValueError(f"control {name}: {e}") from None
        return cls(**values)


@dataclasses.dataclass
class Portrait:
    """An encoded portrait (device arrays, batch 1): the appearance volume, identity, and
    its own pose and dynamics (used by the still-head and lip-only controls)."""

    image: np.ndarray  # uint8 [S, S, 3], the model-size portrait
    v_app: jax.Array  # [1, D, H, W, C]
    z_id: jax.Array  # [1, id_dim]
    z_pose: np.ndarray  # [7]
    z_dyn: np.ndarray  # [dyn_dim]


@dataclasses.dataclass
class Frame:
    """One streamed frame: index, its time in the audio (s) and the RGB image."""

    index: int
    time: float
    image: np.ndarray  # uint8 [S, S, 3]


@dataclasses.dataclass
class Window:
    """Frames [start, start + L) of a clip: uint8 frames [L, S, S, 3], the generated motion
    [L, 7 + D] and the codes decoded after the controls, z_pose [L, 7], z_dyn [L, D]."""

    start: int
    frames: np.ndarray
    motion: np.ndarray
    z_pose: np.ndarray
    z_dyn: np.ndarray


@dataclasses.dataclass
class Video:
    """A generated clip: frames uint8 [T, S, S, 3] at fps, the audio, and the motion."""

    frames: np.ndarray
    fps: float
    audio: np.ndarray  # float32 [N] at SAMPLE_RATE
    z_pose: np.ndarray  # [T, 7] as decoded (after the controls)
    z_dyn: np.ndarray  # [T, dyn_dim]
    motion: np.ndarray  # [T, 7 + dyn_dim] as generated (before the controls)


# ----------------------------------------------------------------------------- the model


def _encode(graphdef, state, image):
    latent = nnx.merge(graphdef, state).encode(transforms.to_signed_float(image))
    return latent.v_app, latent.z_id, latent.z_pose, latent.z_dyn


def _encode_pose(graphdef, state, frames):
    return nnx.merge(graphdef, state).encode_motion(transforms.to_signed_float(frames))[0]


def _render(graphdef, state, v_app, z_id, z_pose, z_dyn):
    """One portrait (v_app [1, ...], z_id [1, ...]) with motion [B, 7], [B, D] -> uint8
    frames [B, S, S, 3]."""
    b = z_pose.shape[0]
    gen = nnx.merge(graphdef, state)
    images = gen.decode(jnp.broadcast_to(v_app, (b,) + v_app.shape[1:]),
                        jnp.broadcast_to(z_id, (b,) + z_id.shape[1:]), z_pose, z_dyn)
    return signed_to_uint8(images)


_ENCODE = jax.jit(_encode, static_argnums=0)
_ENCODE_POSE = jax.jit(_encode_pose, static_argnums=0)
_RENDER = jax.jit(_render, static_argnums=0)


def _audio_settings(motion_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The audio frontend the stage-2 run's data was made with (its latents dataset's
    extract_latents record)."""
    data = motion_config.data.path
    info = schema.DatasetInfo.load(data)
    audio = (info.extra.get("extract_latents") or {}).get("audio")
    if not audio:
        raise ValueError(f"the stage-2 run's data {data!r} records no audio frontend: it was "
                         "not made by `python -m data_pipeline.extract_latents`")
    return dict(audio, fps=float(info.fps))


@dataclasses.dataclass
class RestoredFace:
    """A stage-1 run's generator and where it came from."""

    config: ml_collections.ConfigDict
    model: FaceLatentModel  # arrays placed on `mesh`
    step: int
    weights: str  # "ema" (the checkpoint's weights item, or a train state's EMA) or "live"
    mesh: jax.sharding.Mesh


def restore_face(workdir: str, step: int | None = None, *,
                 mesh: jax.sharding.Mesh | None = None) -> RestoredFace:
    """The EMA generator of a stage-1 run's latest (or `step`) checkpoint, on `mesh`
    (default: the run's mesh if it fits this machine, else data parallel).

    Reads only the checkpoint's weights item. Checkpoints written before the trainer saved
    one are read whole (the train state, through the trainer; optimizer moments and the
    discriminator included). Raises FileNotFoundError / ValueError (see
    `checkpointing.open_run`).
    """
    from vasa_jax import checkpointing  # orbax stays out of plain imports
    from vasa_jax.parallel.mesh import create_mesh_or_data_parallel

    ckpt, step, config = checkpointing.open_run(workdir, "face_latent", step)
    with ckpt:
        config = ml_collections.ConfigDict(config)
        mesh = create_mesh_or_data_parallel(config.mesh.axes) if mesh is None else mesh
        rules = config.mesh.rules
        if ckpt.has_weights(step):
            model = ckpt.restore_module(
                lambda: FaceLatentModel(config.model, rngs=nnx.Rngs(0)), mesh, rules, step)
            weights = "ema"
        else:
            from vasa_jax.parallel import sharding
            from vasa_jax.trainers import face_latent as trainer  # old checkpoints only

            graphdef, abstract, _ = sharding.abstract_state(
                lambda: trainer.TrainState(config), mesh, rules)
            train_state = nnx.merge(graphdef, ckpt.restore(abstract, step))
            model, weights = getattr(train_state, "ema", None), "ema"
            if model is None:
                model, weights = train_state.generator, "live"
    logging.info("restored the %s generator of step %d from %s", weights, step, workdir)
    return RestoredFace(config, model, step, weights, mesh)


class Pipeline:
    """Both stages, ready to turn a portrait and speech into frames (see the module doc).

    Attributes: face (FaceLatentModel, EMA weights), motion (motion_sampler.MotionGenerator),
    audio (the frontend's settings), fps, window (frames drawn and decoded per call),
    image_size, dyn_dim, info (pipeline.json).
    """

    def __init__(self, face: FaceLatentModel, face_config: ml_collections.ConfigDict,
                 motion: MotionGenerator, audio: Mapping[str, Any], info: Mapping | None = None):
        self.face, self.face_config, self.motion = face, face_config, motion
        self.audio = dict(audio)
        self.fps = float(self.audio.get("fps", schema.FPS))
        self.image_size = int(face.image_size)
        self.dyn_dim = int(face_config.model.motion.dyn_dim)
        self.dyn_split = bool(face_config.model.motion.get("dyn_split", False))
        self.window = motion.window
        self.info = dict(info or {})
        if motion.motion_dim != 7 + self.dyn_dim:
            raise ValueError(f"the stage-2 model draws {motion.motion_dim}-dim motion, the "
                             f"stage-1 model decodes [z_pose (7), z_dyn ({self.dyn_dim})]: "
                             "the two runs do not belong together")
        spf = SAMPLE_RATE / self.fps
        if spf != int(spf) or int(spf) % audio_lib.COLUMNS_PER_FRAME:
            raise ValueError(f"{self.fps} fps at {SAMPLE_RATE} Hz: streaming needs a whole "
                             "number of samples per mel column")
        self.samples_per_frame = int(spf)
        if self.audio.get("frontend") == "mel":
            n_mels = int(self.audio["n_mels"])
            self._features = lambda x, n: audio_lib.log_mel_frames(x, SAMPLE_RATE, self.fps,
                                                                   n_mels, num_frames=n)
        elif self.audio.get("frontend") == "wav2vec2":
            w2v = audio_lib.Wav2Vec2Features(self.audio["wav2vec2_path"],
                                             self.audio["wav2vec2_layer"], fps=self.fps)
            self._features = lambda x, n: w2v(x, num_frames=n)
        else:
            raise ValueError(f"unknown audio frontend {self.audio!r}")
        self._graphdef, self._state = nnx.split(face)

    # -------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str, *, dtype: str | None = None) -> "Pipeline":
        """An export folder (see the module doc).

        dtype: the face model's compute dtype ("float32" | "bfloat16"; default: as it was
        trained). Its weights, normalisations and warps stay float32; the motion model
        always samples in float32 (it is small, and its 50-step loop accumulates rounding).
        """
        from vasa_jax.checkpointing import load_params  # orbax stays out of plain imports

        meta_path = os.path.join(path, PIPELINE_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(
                f"{path!r} is not a model export ({PIPELINE_FILE} missing): make one with "
                "`python -m vasa_jax.inference export --face_workdir W1 --motion_workdir W2 "
                "--out DIR`")
        with open(meta_path) as f:
            info = json.load(f)
        face_config = ml_collections.ConfigDict(info["face"]["config"])
        if dtype is not None:
            if dtype not in ("float32", "bfloat16"):
                raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
            face_config.model.dtype = dtype
        motion_config = ml_collections.ConfigDict(info["motion"]["config"])
        norm = stats_lib.Normalization.load(path)
        if norm is None:
            raise FileNotFoundError(f"{path!r} lacks {stats_lib.NORMALIZATION_FILE}")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def restore(build, params_dir):
            graphdef, abstract = nnx.split(nnx.eval_shape(build))
            target = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
            return nnx.merge(graphdef, load_params(os.path.join(path, params_dir), target))

        face = restore(lambda: FaceLatentModel(face_config.model, rngs=nnx.Rngs(0)), FACE_PARAMS)
        dit = restore(lambda: MotionDiT(motion_config.model, norm.motion_dim, norm.audio_dim,
                                        rngs=nnx.Rngs(0)), MOTION_PARAMS)
        motion = MotionGenerator(motion_config, dit, norm, step=info["motion"].get("step"))
        return cls(face, face_config, motion, info["audio"], info)

    @classmethod
    def from_workdirs(cls, face_workdir: str, motion_workdir: str, *,
                      face_step: int | None = None, motion_step: int | None = None
                      ) -> "Pipeline":
        """Straight from two training runs (their checkpoints' EMA weights)."""
        face = restore_face(face_workdir, face_step)
        motion = MotionGenerator.from_workdir(motion_workdir, motion_step)
        info = {"face": {"workdir": os.path.abspath(face_workdir), "step": face.step},
                "motion": {"workdir": os.path.abspath(motion_workdir), "step": motion.step}}
        return cls(face.model, face.config, motion, _audio_settings(motion.config), info)

    @classmethod
    def open(cls, model: str = "", face_workdir: str = "", motion_workdir: str = "", *,
             dtype: str | None = None) -> "Pipeline":
        """What the commands load: two training runs (`face_workdir` + `motion_workdir`), else
        the export `model`, else the built-in demo model (DEMO_MODEL). ValueError for a bad
        combination."""
        if face_workdir or motion_workdir:
            if not (face_workdir and motion_workdir):
                raise ValueError("--face_workdir and --motion_workdir go together")
            if model:
                raise ValueError("--model and --face_workdir/--motion_workdir exclude each other")
            if dtype:
                raise ValueError("--dtype applies to a model export (--model); export the "
                                 "runs with `python -m vasa_jax.inference export`")
            return cls.from_workdirs(face_workdir, motion_workdir)
        return cls.load(model or DEMO_MODEL, dtype=dtype)

    def export(self, out: str) -> None:
        """Writes this pipeline as an export folder `out` (never overwrites one)."""
        from vasa_jax.checkpointing import export_params

        if os.path.exists(os.path.join(out, PIPELINE_FILE)):
            raise FileExistsError(f"{out!r} already holds a model export")
        os.makedirs(out, exist_ok=True)
        export_params(os.path.join(out, FACE_PARAMS), nnx.state(self.face, nnx.Param))
        export_params(os.path.join(out, MOTION_PARAMS), nnx.state(self.motion.model, nnx.Param))
        self.motion.normalization.save(out)
        info = {
            "face": dict(self.info.get("face", {}),
                         config=json.loads(self.face_config.to_json_best_effort())),
            "motion": dict(self.info.get("motion", {}),
                           config=json.loads(self.motion.config.to_json_best_effort())),
            "audio": self.audio,
        }
        with open(os.path.join(out, PIPELINE_FILE), "w") as f:  # written last: done
            json.dump(info, f, indent=1, sort_keys=True)

    # -------------------------------------------------------------------------- pieces

    def encode_portrait(self, image: np.ndarray) -> Portrait:
        """RGB uint8 image -> Portrait (see prepare_portrait for sizes)."""
        image = prepare_portrait(image, self.image_size)
        v_app, z_id, z_pose, z_dyn = _ENCODE(self._graphdef, self._state, image[None])
        return Portrait(image, v_app, z_id, np.asarray(z_pose[0]), np.asarray(z_dyn[0]))

    def encode_pose(self, frames: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Driving-video frames uint8 [T, H, W, 3] -> their head poses z_pose [T, 7]."""
        frames = np.stack([prepare_portrait(f, self.image_size) for f in frames])
        out = []
        for i in range(0, len(frames), batch_size):
            chunk = frames[i:i + batch_size]
            pad = batch_size - len(chunk)
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]) if pad else chunk
            out.append(np.asarray(_ENCODE_POSE(self._graphdef, self._state, chunk))[:batch_size - pad])
        return np.concatenate(out)

    def features(self, audio: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Audio features of frames [start, stop) float32 [stop - start, Da], from samples
        up to frame `stop` plus the analysis look-ahead; the same values whatever the audio
        holds beyond that (zeros past its end)."""
        if start == 0:
            return self._features(audio, stop)
        first = (start - 1) * self.samples_per_frame  # one frame of left context
        return self._features(audio[first:], stop - start + 1)[1:]

    def num_frames(self, num_samples: int) -> int:
        return audio_lib.num_video_frames(num_samples, SAMPLE_RATE, self.fps)

    def _stream(self, controls: Controls):
        return self.motion.stream(
            1, gaze=controls.gaze, distance=controls.distance,
            emotion=emotion_vector(controls.emotion), seeds=[controls.seed],
            guidance=controls.guidance, num_sample_steps=controls.steps)

    def apply_controls(self, motion: np.ndarray, portrait: Portrait, controls: Controls,
                       start: int = 0, driving_pose: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Generated raw motion [L, 7 + D] of frames [start, start + L) -> the (z_pose [L, 7],
        z_dyn [L, D]) to decode, after the head / lip-only controls; driving_pose [T', 7]
        (a driving video's poses, `encode_pose`) replaces the head pose, its last one held
        past its end."""
        z_pose, z_dyn = motion[:, :7].copy(), motion[:, 7:].copy()
        length = len(motion)
        if controls.lip_only:
            if not self.dyn_split:
                raise ValueError("lip_only needs a stage-1 model whose z_dyn has a mouth half "
                                 "(model.motion.dyn_split=True)")
            half = self.dyn_dim // 2
            z_dyn[:, :half] = portrait.z_dyn[:half]  # eyes code: the portrait's
            z_pose[:] = portrait.z_pose
        elif driving_pose is not None:
            idx = np.minimum(np.arange(start, start + length), len(driving_pose) - 1)
            z_pose = np.asarray(driving_pose, np.float32)[idx]
        elif controls.head == "still":
            z_pose[:] = portrait.z_pose
        elif controls.head_amplitude != 1.0:
            centre = self.motion.motion_mean[:7]
            z_pose = centre + controls.head_amplitude * (z_pose - centre)
        return z_pose.astype(np.float32), z_dyn.astype(np.float32)

    def render(self, portrait: Portrait, z_pose: np.ndarray, z_dyn: np.ndarray) -> np.ndarray:
        """Decodes L <= window frames of motion: uint8 [L, S, S, 3] (one compiled call for
        every window: short ones are padded to the window)."""
        length = len(z_pose)
        pad = self.window - length
        if pad < 0:
            raise ValueError(f"render takes at most {self.window} frames, got {length}")
        if pad:
            z_pose = np.concatenate([z_pose, np.repeat(z_pose[-1:], pad, 0)])
            z_dyn = np.concatenate([z_dyn, np.repeat(z_dyn[-1:], pad, 0)])
        frames = _RENDER(self._graphdef, self._state, portrait.v_app, portrait.z_id,
                         jnp.asarray(z_pose), jnp.asarray(z_dyn))
        return np.asarray(frames)[:length]

    # -------------------------------------------------------------------------- generation

    def windows(self, image: np.ndarray, audio: np.ndarray, controls: Controls = Controls(),
                *, driving_pose: np.ndarray | None = None) -> Iterator[Window]:
        """The clip window by window (memory bounded for any audio length): portrait uint8
        [H, W, 3] + mono float32 audio [N] at SAMPLE_RATE -> Window per W frames, num_frames(N)
        frames in all."""
        audio = audio_lib.check_waveform(audio)
        total = self.num_frames(len(audio))
        if total < 1:
            raise ValueError(f"audio of {len(audio)} samples is shorter than one frame")
        portrait = self.encode_portrait(image)
        stream = self._stream(controls)
        for start in range(0, total, self.window):
            stop = min(start + self.window, total)
            motion = stream.next_window(self.features(audio, start, stop)[None])[0]
            z_pose, z_dyn = self.apply_controls(motion, portrait, controls, start, driving_pose)
            yield Window(start, self.render(portrait, z_pose, z_dyn), motion, z_pose, z_dyn)

    def generate(self, image: np.ndarray, audio: np.ndarray, controls: Controls = Controls(),
                 *, driving_pose: np.ndarray | None = None) -> Video:
        """The whole clip in memory (`windows` for long audio): Video of num_frames(N)
        frames."""
        parts = list(self.windows(image, audio, controls, driving_pose=driving_pose))
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return Video(cat("frames"), self.fps, audio_lib.check_waveform(audio), cat("z_pose"),
                     cat("z_dyn"), cat("motion"))

    def stream(self, image: np.ndarray, chunks: Iterable[np.ndarray],
               controls: Controls = Controls(), *, driving_pose: np.ndarray | None = None
               ) -> Iterator[Frame]:
        """Frames as the audio arrives: chunks of mono float32 samples at SAMPLE_RATE (any
        sizes). Window i is drawn once the audio of its frames and the analysis look-ahead
        are in; at the end of the chunks, the rest. Same frames as `generate` for the same
        seed (the stream ends where the audio does: num_frames of all samples)."""
        portrait = self.encode_portrait(image)
        stream = self._stream(controls)
        w, spf = self.window, self.samples_per_frame
        lookahead = spf  # > the analysis window's half-width past a frame's end
        buffer = np.zeros((0,), np.float32)
        start = 0

        def emit(stop: int) -> Iterator[Frame]:
            motion = stream.next_window(self.features(buffer, start, stop)[None])[0]
            z_pose, z_dyn = self.apply_controls(motion, portrait, controls, start, driving_pose)
            for k, frame in enumerate(self.render(portrait, z_pose, z_dyn)):
                yield Frame(start + k, (start + k) / self.fps, frame)

        for chunk in chunks:
            chunk = np.asarray(chunk, np.float32).reshape(-1)
            if not np.all(np.isfinite(chunk)):
                raise ValueError("audio chunk contains NaN or inf samples")
            buffer = np.concatenate([buffer, chunk])
            while len(buffer) >= (start + w) * spf + lookahead:
                yield from emit(start + w)
                start += w
        total = self.num_frames(len(buffer))
        while start < total:
            stop = min(start + w, total)
            yield from emit(stop)
            start = stop


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vasa_jax.inference",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a model export folder from two training runs")
    exp.add_argument("--face_workdir", required=True, help="the stage-1 run")
    exp.add_argument("--motion_workdir", required=True, help="the stage-2 run")
    exp.add_argument("--out", required=True, help="a new folder")
    args = parser.parse_args(argv)
    pylogging.basicConfig(level=pylogging.INFO)
    t0 = time.perf_counter()
    try:
        pipe = Pipeline.from_workdirs(args.face_workdir, args.motion_workdir)
        pipe.export(args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
