"""Times grid_sample_3d (forward, forward+backward) against torch's CPU grid_sample.

The default shape is the face latent decoder's warp: a MegaPortraits appearance volume
[1, 16, 64, 64, 96] (B, D, H, W, C) read through a [1, 16, 64, 64, 3] grid (the identity
plus a smooth random flow, like a pose + expression warp).

    python -m benchmarks.bench_grid_sample
    python -m benchmarks.bench_grid_sample --padding_mode border --dtype bfloat16 --no_torch

Prints median wall times (jitted, block_until_ready, after two warm-up calls) and XLA's
temporary-buffer size for forward+backward; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from vasa_jax.ops import grid_sample_3d, identity_grid  # noqa: E402


def _median_seconds(fn, iters: int) -> float:
    fn()  # Warm-up (compilation for jax, allocator/thread pool for torch).
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _inputs(shape, seed: int):
    b, d, h, w, c = shape
    rng = np.random.default_rng(seed)
    volume = rng.standard_normal(shape, dtype=np.float32)
    # Identity plus a flow of a few voxels: the access pattern of a real warp (mostly
    # local, some samples leave the volume and hit the padding).
    base = np.asarray(identity_grid(d, h, w))
    flow = rng.standard_normal((b, d, h, w, 3)).astype(np.float32) * np.float32(0.05)
    grid = (base[None] + flow).astype(np.float32)
    cotangent = rng.standard_normal((b, d, h, w, c), dtype=np.float32)
    return volume, grid, cotangent


def bench_jax(volume, grid, cotangent, padding_mode, align_corners, dtype, iters):
    volume = jnp.asarray(volume, dtype)
    grid = jnp.asarray(grid)
    cotangent = jnp.asarray(cotangent, dtype)

    def sample(v, g):
        return grid_sample_3d(v, g, padding_mode=padding_mode, align_corners=align_corners)

    def loss(v, g):
        return jnp.vdot(sample(v, g).astype(jnp.float32), cotangent.astype(jnp.float32))

    forward = jax.jit(sample)
    backward = jax.jit(jax.grad(loss, argnums=(0, 1)))
    t_fwd = _median_seconds(lambda: forward(volume, grid).block_until_ready(), iters)
    t_bwd = _median_seconds(lambda: jax.block_until_ready(backward(volume, grid)), iters)
    mem = backward.lower(volume, grid).compile().memory_analysis()
    temp_mib = None if mem is None else mem.temp_size_in_bytes / 2**20
    return t_fwd, t_bwd, temp_mib


def bench_torch(volume, grid, cotangent, padding_mode, align_corners, iters):
    import torch  # Only for the comparison; the library never imports torch.

    volume = torch.from_numpy(volume).permute(0, 4, 1, 2, 3).contiguous()  # NCDHW.
    grid = torch.from_numpy(grid)
    cotangent = torch.from_numpy(cotangent).permute(0, 4, 1, 2, 3).contiguous()
    kwargs = dict(mode="bilinear", padding_mode=padding_mode, align_corners=align_corners)

    def forward():
        with torch.no_grad():
            torch.nn.functional.grid_sample(volume, grid, **kwargs)

    def forward_backward():
        v = volume.detach().requires_grad_(True)
        g = grid.detach().requires_grad_(True)
        out = torch.nn.functional.grid_sample(v, g, **kwargs)
        torch.autograd.grad(out, (v, g), cotangent)

    return _median_seconds(forward, iters), _median_seconds(forward_backward, iters), torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1,16,64,64,96", help="B,D,H,W,C of the volume")
    parser.add_argument("--padding_mode", default="zeros", choices=("zeros", "border"))
    parser.add_argument("--align_corners", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no_torch", action="store_true", help="skip the torch comparison")
    args = parser.parse_args()

    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 5:
        parser.error(f"--shape needs 5 comma-separated sizes, got {args.shape!r}")
    volume, grid, cotangent = _inputs(shape, seed=0)
    common = (args.padding_mode, args.align_corners)
    print(f"volume {list(shape)} grid {list(grid.shape)} padding={args.padding_mode} "
          f"align_corners={args.align_corners} dtype={args.dtype} median of {args.iters}")

    device = jax.devices()[0]
    t_fwd, t_bwd, temp_mib = bench_jax(
        volume, grid, cotangent, *common, jnp.dtype(args.dtype), args.iters)
    mem = "" if temp_mib is None else f"  (fwd+bwd XLA temp buffers {temp_mib:.0f} MiB)"
    print(f"jax   {jax.__version__} {device.platform} ({device.device_kind}): "
          f"forward {t_fwd * 1e3:8.2f} ms   forward+backward {t_bwd * 1e3:8.2f} ms{mem}")

    if args.no_torch:
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch not importable: no comparison")
        return
    t_fwd, t_bwd, torch = bench_torch(volume, grid, cotangent, *common, args.iters)
    print(f"torch {torch.__version__} cpu ({torch.get_num_threads()} threads, float32): "
          f"forward {t_fwd * 1e3:8.2f} ms   forward+backward {t_bwd * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
