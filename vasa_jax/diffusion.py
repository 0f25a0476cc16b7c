"""Gaussian diffusion for the motion model: noise schedules, forward noising, DDIM sampling.

Conventions (DDPM / DDIM, x0-parameterised as VASA-1's motion model):
  * t in [0, T): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,  abar_t = prod_{s<=t} (1 - beta_s).
  * The network predicts x0 (`denoise_fn(x_t, t) -> x0_pred`); eps follows from x_t and x0.
  * Sampling visits `ddim_timesteps(T, S)` (T-1 down to 0); after the step at t = 0 the
    result is the last x0 prediction (the "previous" noise level is abar = 1).

Everything is a pure function of jax arrays; `sample` is one `lax.fori_loop` over the S
steps (a fixed step count: one compile, jittable).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("cosine", "linear")
MAX_BETA = 0.999  # Nichol & Dhariwal clip the cosine schedule's betas here


class Schedule(NamedTuple):
    """A noise schedule: float32 arrays [T] (a pytree; pass it through jit as an argument).

    betas: beta_t. alphas_cumprod: abar_t (strictly decreasing, in (0, 1)).
    sqrt_alphas_cumprod / sqrt_one_minus_alphas_cumprod: sqrt(abar_t), sqrt(1 - abar_t).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array

    @property
    def num_steps(self) -> int:
        """T (static: from the array shape)."""
        return int(self.alphas_cumprod.shape[0])


def _cosine_betas(num_steps: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal (2021): abar(t) = cos(((t / T + s) / (1 + s)) * pi / 2)^2."""
    steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return np.clip(1.0 - abar[1:] / abar[:-1], 0.0, MAX_BETA)


def _linear_betas(num_steps: int) -> np.ndarray:
    """Ho et al. (2020): betas linear from 1e-4 to 0.02 at T = 1000, rescaled for other T
    so that the total noise stays comparable (Nichol & Dhariwal's scaling)."""
    scale = 1000.0 / num_steps
    return np.linspace(scale * 1e-4, min(scale * 0.02, MAX_BETA), num_steps, dtype=np.float64)


@functools.lru_cache(maxsize=16)
def schedule_arrays(kind: str, num_steps: int) -> tuple[np.ndarray, ...]:
    """(betas, alphas_cumprod, sqrt(abar), sqrt(1 - abar)) as float32 numpy arrays [T]
    (cached; read-only). `make_schedule` wraps them as jax arrays."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {kind!r}; use one of {SCHEDULES}")
    if num_steps < 2:
        raise ValueError(f"a schedule needs >= 2 steps, got {num_steps}")
    betas = _cosine_betas(num_steps) if kind == "cosine" else _linear_betas(num_steps)
    abar = np.cumprod(1.0 - betas)
    arrays = tuple(np.asarray(x, np.float32) for x in
                   (betas, abar, np.sqrt(abar), np.sqrt(1.0 - abar)))
    for x in arrays:
        x.setflags(write=False)
    return arrays


def make_schedule(kind: str, num_steps: int) -> Schedule:
    """The `kind` ("cosine" | "linear") schedule with T = num_steps steps."""
    return Schedule(*(jnp.asarray(x) for x in schedule_arrays(kind, num_steps)))


def _per_example(v: jax.Array, ndim: int) -> jax.Array:
    """A scalar or [B] vector -> broadcastable against [B, ...] of rank `ndim`."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim)) if v.ndim else v


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    x0, noise: [B, ...]; t: int [B] (or a scalar int), values in [0, T).
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {x0.shape} and noise {noise.shape} differ in shape")
    a = _per_example(schedule.sqrt_alphas_cumprod[t], x0.ndim)
    s = _per_example(schedule.sqrt_one_minus_alphas_cumprod[t], x0.ndim)
    return (a * x0 + s * noise).astype(x0.dtype)


def predict_eps(schedule: Schedule, x_t: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
    """The noise implied by x_t and an x0 estimate: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    a = _per_example(schedule.sqrt_alphas_cumprod[t], x_t.ndim)
    s = _per_example(schedule.sqrt_one_minus_alphas_cumprod[t], x_t.ndim)
    return (x_t - a * x0) / s


def ddim_timesteps(num_steps: int, num_sample_steps: int) -> np.ndarray:
    """The S = num_sample_steps timesteps DDIM visits: int32 [S], T-1 down to 0, evenly
    spaced and distinct (S = T visits every step)."""
    if not 1 <= num_sample_steps <= num_steps:
        raise ValueError(f"num_sample_steps must be in [1, T={num_steps}], got "
                         f"{num_sample_steps}")
    ts = np.round(np.linspace(num_steps - 1, 0, num_sample_steps)).astype(np.int32)
    if len(np.unique(ts)) != len(ts):  # cannot happen for S <= T; guards the rounding
        raise AssertionError(f"ddim_timesteps repeated a step: {ts}")
    return ts


def ddim_step(schedule: Schedule, x_t: jax.Array, x0_pred: jax.Array, t: jax.Array,
              t_prev: jax.Array, eta: float = 0.0, noise: jax.Array | None = None) -> jax.Array:
    """One DDIM update x_t -> x_{t_prev} given an x0 prediction (Song et al. 2021, eq. 12).

    t, t_prev: int scalars or [B]; t_prev < 0 means "clean" (abar = 1: returns x0_pred).
    eta: 0 = deterministic DDIM; > 0 adds sigma_t * noise (noise: like x_t, required then).
    """
    eps = predict_eps(schedule, x_t, x0_pred, t)
    abar_t = _per_example(schedule.alphas_cumprod[t], x_t.ndim)
    t_prev = jnp.asarray(t_prev)
    abar_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)
    abar_prev = _per_example(abar_prev, x_t.ndim)
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
    else:
        sigma = jnp.zeros_like(abar_prev)
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - jnp.square(sigma), 0.0))
    x_prev = jnp.sqrt(abar_prev) * x0_pred + direction * eps
    if eta > 0:
        x_prev = x_prev + sigma * noise
    return x_prev.astype(x_t.dtype)


def normal(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal float32 noise of `shape` = [B, ...] from one key, or from a key per
    example (rng of shape [B]: row b depends only on rng[b], whatever the batch)."""
    if rng.ndim == 0:
        return jax.random.normal(rng, shape, jnp.float32)
    if rng.shape != shape[:1]:
        raise ValueError(f"{rng.shape[0]} keys for a batch of {shape[0]}")
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(rng)


def _split(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    if rng.ndim == 0:
        a, b = jax.random.split(rng)
        return a, b
    pairs = jax.vmap(jax.random.split)(rng)  # [B, 2]
    return pairs[:, 0], pairs[:, 1]


def sample(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array], shape: tuple[int, ...],
           rng: jax.Array, schedule: Schedule, num_sample_steps: int,
           eta: float = 0.0) -> jax.Array:
    """DDIM sampling: x_T ~ N(0, I) of `shape` [B, ...] -> x0 after S steps.

    denoise_fn(x_t [B, ...], t int32 [B]) -> x0_pred [B, ...] (traced once: the loop is a
    `lax.fori_loop` over the static S = num_sample_steps steps).
    rng: one key, or one key per example ([B]: each row's noise depends only on its key).
    eta: DDIM stochasticity (static).
    """
    ts = ddim_timesteps(schedule.num_steps, num_sample_steps)
    ts_prev = np.concatenate([ts[1:], np.array([-1], np.int32)])
    ts, ts_prev = jnp.asarray(ts), jnp.asarray(ts_prev)
    rng, init = _split(rng)
    x = normal(init, shape)
    batch = shape[0]

    def body(i, carry):
        x, key = carry
        t = jnp.full((batch,), ts[i], jnp.int32)
        x0 = denoise_fn(x, t).astype(jnp.float32)
        noise = None
        if eta > 0:
            key, sub = _split(key)
            noise = normal(sub, shape)
        return ddim_step(schedule, x, x0, t, ts_prev[i], eta, noise), key

    x, _ = jax.lax.fori_loop(0, len(ts), body, (x, rng))
    return x
