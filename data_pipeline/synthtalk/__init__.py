"""SynthTalk: a synthetic talking-face corpus with exact per-frame ground truth.

Procedural 3D heads (ellipsoid parts, ray-cast through a pinhole camera; render.py) with
identity-specific shape, colours, hair, accessories and background (identity.py) speak
espeak-ng or formant-synthesised speech (speech.py); mouth, head, gaze, blink, brow and
emotion tracks follow the speech (motion.py) and are stored as the record's labels (exactly
the renderer's inputs), with the image boxes of the mouth and the eyes they put on screen.

    python -m data_pipeline.synthtalk --out DIR --num_identities 8 --clips_per_identity 2 \\
        --seconds 4 --size 64 --seed 0 [--framing face|portrait] [--preview]

writes a clip-record dataset (data_pipeline/schema.py). The default "face" framing frames
the face like aligned talking-head crops (schema.FACE_CROP_HEIGHT); "portrait" is the
original head-and-shoulders framing. `sync.mouth_audio_correlation` measures how well
mouth_open follows the audio envelope.
"""

from data_pipeline.synthtalk.generate import (
    SIZES,
    SynthTalkConfig,
    generate_dataset,
    make_clip,
    write_preview,
)
from data_pipeline.synthtalk.identity import Identity, sample_identity
from data_pipeline.synthtalk.render import (
    DEFAULT_FRAMING,
    FRAMINGS,
    Framing,
    HeadRenderer,
    focal_length,
    gaze_angles,
    gaze_vector,
    matrix_to_pose,
    neutral_frame,
    principal_point,
    project,
    rotation_matrix,
)
from data_pipeline.synthtalk.sync import (
    SyncAccumulator,
    clips_mouth_audio_correlation,
    frame_rms,
    mouth_audio_correlation,
)

__all__ = [
    "DEFAULT_FRAMING",
    "FRAMINGS",
    "Framing",
    "SIZES",
    "HeadRenderer",
    "Identity",
    "SyncAccumulator",
    "SynthTalkConfig",
    "clips_mouth_audio_correlation",
    "focal_length",
    "frame_rms",
    "gaze_angles",
    "gaze_vector",
    "generate_dataset",
    "make_clip",
    "matrix_to_pose",
    "mouth_audio_correlation",
    "neutral_frame",
    "principal_point",
    "project",
    "rotation_matrix",
    "sample_identity",
    "write_preview",
]
