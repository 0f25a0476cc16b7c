"""Metrics: image reconstruction quality and linear probes of latent codes.

    image   psnr, ssim, ssim_map, mse (jnp, batched; images in [-1, 1] by default)
    probes  fit_ridge, linear_probe, kfold_probe, group_kfold, r2_score, classifier_probe,
            accuracy (numpy float64, closed-form ridge)
    motion  pose_jitter_dp (dP), pearson_r, angular_error_deg, diversity, MotionProbes
    fvd     frechet_distance, fvd and video_clips (the 25-frame clips of FVD25; features:
            models.i3d)

The paper's video metrics are computed over sets of videos by `python -m vasa_jax.evaluate
videos` (Sc/SD: models.syncnet; CAPP: models.capp; dP; FVD25: fvd + models.i3d).
"""

from vasa_jax.metrics.image import mse, psnr, ssim, ssim_map
from vasa_jax.metrics.probes import (
    ClassifierResult,
    ProbeResult,
    RidgeModel,
    accuracy,
    classifier_probe,
    fit_ridge,
    group_kfold,
    kfold_probe,
    linear_probe,
    r2_score,
)

__all__ = [
    "ClassifierResult", "ProbeResult", "RidgeModel", "accuracy", "classifier_probe",
    "fit_ridge", "group_kfold", "kfold_probe", "linear_probe", "mse", "psnr", "r2_score",
    "ssim", "ssim_map",
]
