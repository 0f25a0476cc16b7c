"""Speed benchmarks that print numbers (python -m vasa_jax.bench.<name>)."""
