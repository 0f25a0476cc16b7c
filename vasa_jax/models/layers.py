"""Building blocks of the face latent model (MegaPortraits style), channels-last, Flax NNX.

Tensors: images / feature maps [B, H, W, C]; volumes [B, D, H, W, C]. A conv's spatial rank
(2-D or 3-D) is the length of its kernel size, so one Conv / ResBlock class serves both.

Every parameter carries logical axis names (`nnx.with_partitioning`) from the set the
"conv" mesh rules know (configs/common.py mesh_config("conv")): conv kernels
(..., "conv_in", "conv_out"), per-channel vectors ("conv_out",), dense kernels ("embed",
"mlp") or ("mlp", "embed"). The trainer maps them to mesh axes; changing parallelism is a
config change.

MegaPortraits conventions kept here:
  * weight standardisation (WS) on every conv except a network's first and last (the
    caller passes weight_std=False for those), GroupNorm everywhere;
  * pre-activation residual blocks (norm -> ReLU -> conv, twice) with average pooling for
    downsampling and nearest-neighbour upsampling;
  * adaptive GroupNorm: normalise without affine, then scale/shift predicted from a
    conditioning vector (the warping generators' motion + identity codes).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype
Shape = tuple[int, ...]

# The logical axis names parameters may use; configs/common.py mesh_config("conv") maps
# each of them to mesh axes (tests check that every parameter uses only these).
LOGICAL_AXES = ("conv_in", "conv_out", "embed", "mlp")


def make_param(
    rngs: nnx.Rngs | None,
    init: nnx.Initializer,
    shape: Shape,
    names: Sequence[str | None],
    param_dtype: Dtype,
    *,
    allowed: Sequence[str] = LOGICAL_AXES,
) -> nnx.Param:
    """An nnx.Param of `shape` from `init`, annotated with logical axis `names` (each one
    of `allowed`: the names the model's mesh rules map).

    Flax shards annotated variables eagerly when created inside a mesh context
    (FLIP 4844); outside one (single-device tests, parameter counting) it would raise, so
    eager placement is only requested when a mesh is active. The names are recorded either
    way for the trainer's `state_shardings`.

    Pass rngs=None for deterministic initialisers (zeros, ones): drawing a key advances the
    Rngs counter, and under tracing (nnx.eval_shape, a jitted init) every counter update
    costs time linear in the graph so far, which made building the full model quadratic.
    """
    names = tuple(names)
    if len(names) != len(shape):
        raise ValueError(f"logical axes {names} do not match parameter shape {shape}")
    unknown = [n for n in names if n is not None and n not in allowed]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; use names from {tuple(allowed)}")
    eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
    key = None if rngs is None else rngs.params()
    value = nnx.with_partitioning(init, names)(key, shape, param_dtype)
    return nnx.Param(value, eager_sharding=eager)


def relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def _as_tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must have {n} entries, got {value}")
    return value


# ----------------------------------------------------------------------------- dense / conv


class Dense(nnx.Module):
    """y = x @ W + b. kernel [in, out] with logical axes `names`, bias [out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        names: tuple[str, str] = ("embed", "mlp"),
        init_scale: float = 1.0,
        use_bias: bool = True,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        # init_scale < 1 shrinks the initial output (heads whose output should start near
        # zero but must still pass gradients to the encoder behind them). Uniform rather
        # than (truncated) normal: same variance, and its jitted init compiles faster.
        init = nnx.initializers.variance_scaling(init_scale**2, "fan_in", "uniform")
        self.kernel = make_param(rngs, init, (in_features, out_features), names, param_dtype)
        self.bias = (
            make_param(None, nnx.initializers.zeros_init(), (out_features,), names[1:], param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., in_features] -> [..., out_features]."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Dense expects {self.in_features} input features, got {x.shape}")
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def standardize_kernel(kernel: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Weight standardisation, scaled: zero mean, variance 1 / fan_in per output channel.

    kernel: [*window, in, out]; statistics over everything but `out`. MegaPortraits (after
    BiT) standardises to unit variance; the extra 1 / fan_in (as in NF-Nets' scaled WS)
    keeps a conv's output at its input's scale instead of sqrt(fan_in) times larger, so
    residual streams stay O(1) (bf16-friendly) and biases keep a useful relative size.
    Normalised layers behave the same either way. Computed and returned in float32 (the
    variance of a bf16 kernel is too coarse).
    """
    kernel = kernel.astype(jnp.float32)
    axes = tuple(range(kernel.ndim - 1))
    fan_in = math.prod(kernel.shape[:-1])
    centered = kernel - jnp.mean(kernel, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(centered), axis=axes, keepdims=True)
    return centered * jax.lax.rsqrt((var + eps) * fan_in)


# conv3d's "auto" on the platform a program is traced for: None = jax.default_backend()'s.
_TARGET_PLATFORM: str | None = None


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
    """Within it, platform-dependent layers (conv3d's impl="auto") choose for `platform`
    ("cpu", "gpu", "tpu") instead of jax.default_backend(): for programs traced on one
    platform and compiled for another (bench/aot.py lowers TPU steps on a CPU host)."""
    global _TARGET_PLATFORM
    previous, _TARGET_PLATFORM = _TARGET_PLATFORM, platform
    try:
        yield
    finally:
        _TARGET_PLATFORM = previous


def conv3d(
    x: jax.Array,
    kernel: jax.Array,
    stride: Sequence[int] = (1, 1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
    *,
    impl: str = "auto",
) -> jax.Array:
    """3-D convolution, channels-last: x [B, D, H, W, C], kernel [kd, kh, kw, C, O] ->
    [B, D', H', W', O].

    impl "native" is one 3-D `conv_general_dilated`. "depth_stacked" computes the same
    sums as a 2-D convolution: the kd depth neighbours of every output slice are stacked
    along channels ([B * D', H, W, kd * C]) and convolved with the kernel reshaped to
    [kh, kw, kd * C, O]. XLA:CPU runs that 4-5x faster than its native 3-D convolution
    (`python -m benchmarks.bench_conv3d`), at kd x the input memory, so "auto" picks it
    on CPU (depth stride 1 only) and the native op on GPU / TPU (the platform of
    jax.default_backend(), or of an enclosing `target_platform`).
    """
    if impl not in ("auto", "native", "depth_stacked"):
        raise ValueError(f"conv3d impl must be auto, native or depth_stacked, got {impl!r}")
    stride = tuple(stride)
    if impl == "auto":
        platform = _TARGET_PLATFORM or jax.default_backend()
        impl = "depth_stacked" if platform == "cpu" and stride[0] == 1 else "native"
    if impl == "native":
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides=stride, padding=padding,
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    if stride[0] != 1:
        raise ValueError(f"depth_stacked conv3d needs depth stride 1, got {stride}")
    kd, kh, kw, c, o = kernel.shape
    if padding == "SAME":
        depth_pad, hw_padding = ((kd - 1) // 2, kd // 2), "SAME"
    elif padding == "VALID":
        depth_pad, hw_padding = (0, 0), "VALID"
    else:
        depth_pad, hw_padding = tuple(padding[0]), [tuple(p) for p in padding[1:]]
    b, d = x.shape[:2]
    xp = jnp.pad(x, ((0, 0), depth_pad, (0, 0), (0, 0), (0, 0)))
    d_out = d + sum(depth_pad) - kd + 1
    stacked = jnp.concatenate([xp[:, k:k + d_out] for k in range(kd)], axis=-1)
    stacked = stacked.reshape(b * d_out, *stacked.shape[2:])
    kernel_2d = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * c, o)
    y = jax.lax.conv_general_dilated(
        stacked, kernel_2d, window_strides=stride[1:], padding=hw_padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, d_out, *y.shape[1:])


class Conv(nnx.Module):
    """N-D convolution (N = len(kernel_size)), channels-last, optional weight standardisation.

    kernel [*kernel_size, in, out] with logical axes (None, ..., "conv_in", "conv_out").
    `padding` is "SAME" or an explicit int (same on every side of every spatial axis).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        padding: str | int = "SAME",
        use_bias: bool = True,
        weight_std: bool = True,
        init_scale: float = 1.0,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.kernel_size = tuple(int(k) for k in kernel_size)
        ndim = len(self.kernel_size)
        if ndim not in (1, 2, 3):
            raise ValueError(f"Conv supports 1-3 spatial dims, got kernel {self.kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = _as_tuple(stride, ndim, "stride")
        self.padding = padding if isinstance(padding, str) else [(padding, padding)] * ndim
        self.weight_std = weight_std
        self.dtype = dtype
        spatial = "DHW"[3 - ndim :] if ndim > 1 else "W"
        self._dimension_numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        init = nnx.initializers.variance_scaling(init_scale**2, "fan_in", "uniform")
        shape = self.kernel_size + (in_channels, out_channels)
        names = (None,) * ndim + ("conv_in", "conv_out")
        self.kernel = make_param(rngs, init, shape, names, param_dtype)
        self.bias = (
            make_param(None, nnx.initializers.zeros_init(), (out_channels,), ("conv_out",),
                       param_dtype)
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, *spatial, in_channels] -> [B, *spatial / stride, out_channels]."""
        ndim = len(self.kernel_size)
        if x.ndim != ndim + 2 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"Conv{ndim}D expects [B, *{ndim} spatial, {self.in_channels}], got {x.shape}"
            )
        kernel = self.kernel[...]
        if self.weight_std:
            kernel = standardize_kernel(kernel)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if ndim == 3:
            y = conv3d(x, kernel, self.stride, self.padding)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=self.stride, padding=self.padding,
                dimension_numbers=self._dimension_numbers)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


# ----------------------------------------------------------------------------- norms


def _group_normalize(x: jax.Array, groups: int, eps: float) -> jax.Array:
    """Normalises [B, *spatial, C] over (spatial, C / groups) per group, in float32.

    groups 0: no normalisation (x in float32).
    """
    if groups == 0:
        return x.astype(jnp.float32)
    b, c = x.shape[0], x.shape[-1]
    xg = x.astype(jnp.float32).reshape(b, -1, groups, c // groups)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    return ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)


def _check_groups(channels: int, groups: int) -> int:
    if groups < 0:
        raise ValueError(f"GroupNorm: groups must be >= 0 (0: no normalisation), got {groups}")
    if groups == 0:
        return 0
    groups = min(groups, channels)
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
    return groups


class GroupNorm(nnx.Module):
    """GroupNorm over [B, *spatial, C]; statistics in float32, output in `dtype`.

    Uses min(groups, C) groups so narrow layers of tiny configs still work. groups 0 turns
    the normalisation off and keeps the per-channel scale and bias (same parameters).
    """

    def __init__(
        self,
        channels: int,
        *,
        groups: int = 32,
        eps: float = 1e-5,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.channels = channels
        self.groups = _check_groups(channels, groups)
        self.eps = eps
        self.dtype = dtype
        ones, zeros = nnx.initializers.ones_init(), nnx.initializers.zeros_init()
        self.scale = make_param(None, ones, (channels,), ("conv_out",), param_dtype)
        self.bias = make_param(None, zeros, (channels,), ("conv_out",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.channels:
            raise ValueError(f"GroupNorm expects {self.channels} channels, got {x.shape}")
        y = _group_normalize(x, self.groups, self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class AdaptiveGroupNorm(nnx.Module):
    """GroupNorm whose per-channel scale and shift come from a conditioning vector.

    y = GN(x) * (1 + gamma(cond)) + beta(cond), with [gamma, beta] = Dense(cond). The
    "1 +" and the small init of the projection make an untrained layer close to a plain
    GroupNorm, while gradients still reach the conditioning codes from the first step.
    groups 0: no normalisation, the modulation only.
    """

    def __init__(
        self,
        channels: int,
        cond_dim: int,
        *,
        groups: int = 32,
        eps: float = 1e-5,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.channels = channels
        self.groups = _check_groups(channels, groups)
        self.eps = eps
        self.dtype = dtype
        self.proj = Dense(
            cond_dim, 2 * channels, names=("embed", "conv_out"), init_scale=0.1,
            dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        """x: [B, *spatial, C]; cond: [B, cond_dim] -> [B, *spatial, C]."""
        if x.shape[-1] != self.channels or cond.ndim != 2 or cond.shape[0] != x.shape[0]:
            raise ValueError(
                f"AdaptiveGroupNorm expects x [B, ..., {self.channels}] and cond [B, K], "
                f"got {x.shape} and {cond.shape}"
            )
        gamma, beta = jnp.split(self.proj(cond.astype(jnp.float32)), 2, axis=-1)
        expand = (x.shape[0],) + (1,) * (x.ndim - 2) + (self.channels,)
        y = _group_normalize(x, self.groups, self.eps)
        y = y * (1.0 + gamma.reshape(expand)) + beta.reshape(expand)
        return y.astype(self.dtype)


# ----------------------------------------------------------------------------- resampling


def avg_pool(x: jax.Array, factors: Sequence[int]) -> jax.Array:
    """Average pooling with window = stride = factors over the spatial axes of [B, *S, C]."""
    factors = tuple(int(f) for f in factors)
    spatial = x.shape[1:-1]
    if len(factors) != len(spatial):
        raise ValueError(f"avg_pool: {len(factors)} factors for spatial shape {spatial}")
    if any(s % f for s, f in zip(spatial, factors)):
        raise ValueError(f"avg_pool: spatial shape {spatial} is not divisible by {factors}")
    shape = [x.shape[0]]
    for s, f in zip(spatial, factors):
        shape += [s // f, f]
    pooled_axes = tuple(2 + 2 * i for i in range(len(spatial)))
    return jnp.mean(x.reshape(shape + [x.shape[-1]]), axis=pooled_axes).astype(x.dtype)


def upsample_nearest(x: jax.Array, factors: Sequence[int]) -> jax.Array:
    """Nearest-neighbour upsampling by integer factors over the spatial axes of [B, *S, C]."""
    factors = tuple(int(f) for f in factors)
    if len(factors) != x.ndim - 2:
        raise ValueError(f"upsample_nearest: {len(factors)} factors for shape {x.shape}")
    for axis, f in enumerate(factors, start=1):
        if f > 1:
            x = jnp.repeat(x, f, axis=axis)
    return x


# ----------------------------------------------------------------------------- residual blocks


class ResBlock(nnx.Module):
    """Pre-activation residual block, 2-D or 3-D (`ndim`), optionally adaptive and resampling.

        h = conv(act(norm(x)))          norm = GroupNorm, or AdaptiveGroupNorm(cond)
        h = conv(act(norm(h)))
        y = h + skip(x)

    Resampling: `up` factors upsample x (nearest) before everything, so the convs smooth the
    upsampled map, or, with `conv_before_up`, after the first conv (which then runs at the
    input resolution: 4x cheaper for a 2-D x2 block; the second conv still smooths the
    upsampled map); `down` factors average-pool after the first conv (both paths). `skip`
    is a 1x1 WS conv when the channel count changes, identity otherwise (with `up` it runs
    before the upsampling: the same result, as a 1x1 conv commutes with nearest
    upsampling). With `remat`, the block's
    activations are recomputed in the backward pass (the 3-D blocks on the 16x64x64 volume
    dominate memory).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        ndim: int,
        cond_dim: int | None = None,
        down: Sequence[int] | None = None,
        up: Sequence[int] | None = None,
        conv_before_up: bool = False,
        groups: int = 32,
        remat: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if down is not None and up is not None:
            raise ValueError("ResBlock: give at most one of down / up")
        self.ndim = ndim
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.adaptive = cond_dim is not None
        self.down = None if down is None else _as_tuple(down, ndim, "down")
        self.up = None if up is None else _as_tuple(up, ndim, "up")
        self.conv_before_up = conv_before_up
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        k = (3,) * ndim
        if self.adaptive:
            self.norm1 = AdaptiveGroupNorm(in_channels, cond_dim, groups=groups, **kw)
            self.norm2 = AdaptiveGroupNorm(out_channels, cond_dim, groups=groups, **kw)
        else:
            self.norm1 = GroupNorm(in_channels, groups=groups, **kw)
            self.norm2 = GroupNorm(out_channels, groups=groups, **kw)
        self.conv1 = Conv(in_channels, out_channels, k, **kw)
        self.conv2 = Conv(out_channels, out_channels, k, **kw)
        self.skip = (
            Conv(in_channels, out_channels, (1,) * ndim, use_bias=False, **kw)
            if in_channels != out_channels
            else None
        )

    def _forward(self, x: jax.Array, cond: jax.Array | None) -> jax.Array:
        norm = (lambda n, h: n(h, cond)) if self.adaptive else (lambda n, h: n(h))
        # Nearest upsampling commutes with the norm (same statistics), the activation and the
        # 1x1 skip, so those run at the input resolution; only conv1's place matters.
        up = (lambda h: h) if self.up is None else (lambda h: upsample_nearest(h, self.up))
        h = relu(norm(self.norm1, x))
        h = up(self.conv1(h)) if self.conv_before_up else self.conv1(up(h))
        skip = x
        if self.down is not None:
            # Pool between the two convs: the second conv (and the skip) run at the lower
            # resolution, which halves the block's cost at the 512x512 input.
            h = avg_pool(h, self.down)
            skip = avg_pool(skip, self.down)
        if self.skip is not None:
            skip = self.skip(skip)
        h = self.conv2(relu(norm(self.norm2, h)))
        skip = up(skip)
        return h + skip.astype(h.dtype)

    def __call__(self, x: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        """x [B, *spatial, in] (+ cond [B, cond_dim] if adaptive) -> [B, *spatial', out]."""
        if x.ndim != self.ndim + 2 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResBlock{self.ndim}D expects [B, *{self.ndim} spatial, {self.in_channels}], "
                f"got {x.shape}"
            )
        if self.adaptive != (cond is not None):
            raise ValueError(
                "ResBlock: cond is required for adaptive blocks and not accepted otherwise"
            )
        if self.remat:
            return nnx.remat(ResBlock._forward)(self, x, cond)
        return self._forward(x, cond)
