"""vasa_jax: VASA-1 (audio-driven talking faces) in JAX/Flax."""

import flax

# Parameters carry logical axis names; shardings come from the trainer's jitted init with
# out_shardings (vasa_jax.parallel.sharding), not from Flax's eager sharding, which would
# otherwise demand a mesh context just to build a module (e.g. in unit tests).
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
