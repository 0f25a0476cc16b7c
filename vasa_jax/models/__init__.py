"""Flax NNX models. Stage 1 (face latent, VASA-1 sec 3.1):

  face_latent.FaceLatentModel  encoders + warps + G3D + decoder (the generator)
  discriminator                multi-scale spectral-norm patch discriminator
  face_encoders, warping, face_decoder, layers: their parts.
"""

from vasa_jax.models.discriminator import MultiScaleDiscriminator, build_discriminator
from vasa_jax.models.face_latent import (
    FaceLatent,
    FaceLatentModel,
    abstract_model,
    count_params,
    param_counts,
)

__all__ = [
    "FaceLatent",
    "FaceLatentModel",
    "MultiScaleDiscriminator",
    "abstract_model",
    "build_discriminator",
    "count_params",
    "param_counts",
]
