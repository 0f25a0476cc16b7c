"""vasa_jax: VASA-1 (audio-driven talking faces) in JAX/Flax."""

__version__ = "0.1.0"
