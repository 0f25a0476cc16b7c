"""Stage-1 losses (face latent model), pure functions of arrays and callables.

  perceptual    VGG19 feature L1 over an image pyramid (face-vid2vid / MegaPortraits)
  gan           hinge adversarial losses + discriminator feature matching
  face_latent   (region-weighted) L1, VASA-1's l_consist and l_cross-id, z_dyn spread and pose decorrelation

The frozen networks they use live in vasa_jax.models.vgg19 and vasa_jax.models.face_id.
"""

from vasa_jax.losses.face_latent import (
    FACE_REGIONS,
    box_weights,
    consistency_loss,
    consistency_pair,
    cosine_similarity,
    cross_correlation_loss,
    cross_identity_loss,
    face_region_mask,
    face_region_weights,
    l1_loss,
    spread_loss,
)
from vasa_jax.losses.gan import (
    feature_matching_loss,
    hinge_d_loss,
    hinge_g_loss,
    split_outputs,
)
from vasa_jax.losses.perceptual import (
    VGG_LAYER_WEIGHTS,
    image_pyramid,
    perceptual_loss,
)

__all__ = [
    "FACE_REGIONS",
    "box_weights",
    "VGG_LAYER_WEIGHTS",
    "consistency_loss",
    "consistency_pair",
    "cosine_similarity",
    "cross_correlation_loss",
    "cross_identity_loss",
    "face_region_mask",
    "face_region_weights",
    "feature_matching_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "image_pyramid",
    "l1_loss",
    "perceptual_loss",
    "split_outputs",
]
