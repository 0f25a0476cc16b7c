"""3-D convolution speed: XLA's native op vs the depth-stacked 2-D form (layers.conv3d).

    python -m benchmarks.bench_conv3d [--batch 16] [--depth 8] [--size 16] [--channels 16]

Prints forward and forward+backward milliseconds of both on the default backend. On a
2-core CPU (B=16, 16 x 8 x 16 x 16 -> 16, 3x3x3) native took 167 ms fwd+bwd and
depth-stacked 36 ms, which is why `conv3d(impl="auto")` picks depth-stacked on CPU.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from vasa_jax.models.layers import conv3d


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (a.batch, a.depth, a.size, a.size, a.channels))
    k = jax.random.normal(kk, (3, 3, 3, a.channels, a.channels)) * 0.1
    print(f"backend {jax.default_backend()}, x {x.shape}, kernel {k.shape}")
    for impl in ("native", "depth_stacked"):
        fwd = jax.jit(lambda x, k, impl=impl: conv3d(x, k, impl=impl))
        both = jax.jit(jax.grad(lambda x, k, impl=impl: jnp.sum(conv3d(x, k, impl=impl) ** 2),
                                argnums=(0, 1)))
        print(f"{impl:>14}: fwd {_time(fwd, x, k, repeats=a.repeats):7.1f} ms   "
              f"fwd+bwd {_time(both, x, k, repeats=a.repeats):7.1f} ms")


if __name__ == "__main__":
    main()
