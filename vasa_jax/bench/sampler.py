"""Speed of generation: the inference pipeline with random weights, offline and streaming.

    python -m vasa_jax.bench.sampler --size full --resolution 512 --steps 50 --seconds 10

Prints the device, compile time, offline fps, streaming fps, first-frame latency (p50/p95
over --latency_runs streams), where the time goes (motion generation vs decoding; host:
audio features and numpy glue, vs the jitted device calls) and the decoder's achieved
FLOP/s (XLA's cost analysis of the compiled decode / its time) against the device's peak
where it is known. Random weights cost the same as trained ones.

First-frame latency: a stream is handed the first window's audio (W frames plus the mel
look-ahead) at once; the latency is the time until its first frame comes out (one window
of motion sampling + one batched decode), compiled functions warm.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np
from flax import nnx

# Dense bf16 / fp32 peak FLOP/s of accelerators people run this on (vendor data sheets).
PEAK_FLOPS = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12),
              "RTX 4090": (165e12, 82.6e12), "L4": (121e12, 30.3e12)}


def build(size: str, resolution: int, steps: int, window: int | None, dtype: str):
    """A random-weight inference.Pipeline of the given configs."""
    import configs
    from data_pipeline import stats as stats_lib
    from vasa_jax import audio as audio_lib
    from vasa_jax.inference import Pipeline
    from vasa_jax.models.face_latent import FaceLatentModel
    from vasa_jax.models.motion_dit import MotionDiT
    from vasa_jax.motion_sampler import MotionGenerator

    face_config = configs.load(f"configs/face_latent.py:size={size}",
                               data__image_size=resolution, model__dtype=dtype)
    overrides = {"diffusion__sample_steps": steps}
    if window:
        overrides["data__window"] = window
    motion_config = configs.load(f"configs/motion_dit.py:size={size}", **overrides)
    n_mels = int(motion_config.data.audio.n_mels)
    dm = 7 + int(face_config.model.motion.dyn_dim)
    da = audio_lib.feature_dim_mel(n_mels)
    z = lambda d: np.zeros(d, np.float32)  # noqa: E731
    o = lambda d: np.ones(d, np.float32)  # noqa: E731
    norm = stats_lib.Normalization("features:motion", "features:audio", z(dm), o(dm) * 0.1,
                                   z(da), o(da), z(2), o(2), z(1), o(1))
    face = FaceLatentModel(face_config.model, rngs=nnx.Rngs(0))
    dit = MotionDiT(motion_config.model, dm, da, rngs=nnx.Rngs(1))
    motion = MotionGenerator(motion_config, dit, norm)
    return Pipeline(face, face_config, motion, {"frontend": "mel", "n_mels": n_mels, "fps": 25.0})


def _speech(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000.0
    return (0.2 * np.sin(2 * np.pi * 180 * t) * (1.2 + np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def _decoder_flops(pipe, portrait) -> float | None:
    from vasa_jax import inference

    w = pipe.window
    args = (pipe._graphdef, pipe._state, portrait.v_app, portrait.z_id,
            np.zeros((w, 7), np.float32), np.zeros((w, pipe.dyn_dim), np.float32))
    try:
        cost = inference._RENDER.lower(*args).compile().cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) / w if flops else None


def run(args: argparse.Namespace) -> dict:
    from vasa_jax.inference import Controls

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    pipe = build(args.size, args.resolution, args.steps, args.window, args.dtype)
    image = np.random.default_rng(0).integers(0, 256, (pipe.image_size,) * 2 + (3,), np.uint8)
    audio = _speech(args.seconds)
    controls = Controls(seed=0)
    w, spf = pipe.window, pipe.samples_per_frame

    t0 = time.perf_counter()
    pipe.generate(image, audio[:w * spf], controls)  # compiles encode, sampler, render
    compile_s = time.perf_counter() - t0

    # Offline, instrumented: host features, motion windows, decodes.
    portrait = pipe.encode_portrait(image)
    total = pipe.num_frames(len(audio))
    t0 = time.perf_counter()
    feats = pipe.features(audio, 0, total)
    t_feat = time.perf_counter() - t0
    stream = pipe._stream(controls)
    t_motion = t_render = t_glue = 0.0
    for start in range(0, total, w):
        a = time.perf_counter()
        motion = stream.next_window(feats[None, start:start + w])[0]
        b = time.perf_counter()
        z_pose, z_dyn = pipe.apply_controls(motion, portrait, controls, start)
        c = time.perf_counter()
        pipe.render(portrait, z_pose, z_dyn)
        d = time.perf_counter()
        t_motion, t_glue, t_render = t_motion + b - a, t_glue + c - b, t_render + d - c
    offline_s = t_feat + t_motion + t_glue + t_render

    # Streaming throughput: 40 ms chunks, fed as fast as frames are consumed.
    chunks = [audio[i:i + spf] for i in range(0, len(audio), spf)]
    t0 = time.perf_counter()
    n = sum(1 for _ in pipe.stream(image, chunks, controls))
    stream_s = time.perf_counter() - t0

    # First-frame latency: the first window's audio at once, time to the first frame.
    first = audio[:w * spf + spf]
    latencies = []
    for _ in range(args.latency_runs):
        t0 = time.perf_counter()
        next(iter(pipe.stream(image, [first], controls)))
        latencies.append(time.perf_counter() - t0)

    flops = _decoder_flops(pipe, portrait)
    render_fps = total / t_render
    result = {
        "device": f"{device.platform} ({kind}), {jax.device_count()} device(s)",
        "size": args.size, "resolution": pipe.image_size, "steps": args.steps, "window": w,
        "seconds": args.seconds, "frames": total, "compile_s": compile_s,
        "offline_fps": total / offline_s, "stream_fps": n / stream_s,
        "latency_p50_ms": 1e3 * float(np.percentile(latencies, 50)),
        "latency_p95_ms": 1e3 * float(np.percentile(latencies, 95)),
        "share_motion": t_motion / offline_s, "share_decode": t_render / offline_s,
        "share_host": (t_feat + t_glue) / offline_s,
        "decoder_gflop_per_frame": None if flops is None else flops / 1e9,
        "decoder_tflops": None if flops is None else flops * render_fps / 1e12,
    }
    peak = next((v for k, v in PEAK_FLOPS.items() if k.lower() in str(kind).lower()), None)
    if peak and flops:
        result["decoder_peak_fraction"] = flops * render_fps / peak[0 if args.dtype == "bfloat16" else 1]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "small", "full"), default="full")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per window")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--window", type=int, default=None, help="frames per window (config's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the face model's compute dtype")
    p.add_argument("--latency_runs", type=int, default=5)
    args = p.parse_args(argv)
    r = run(args)
    print(f"device: {r['device']}")
    print(f"models: {r['size']} (random weights), {r['resolution']} px, {r['steps']} DDIM steps, "
          f"window {r['window']} frames, {r['seconds']:g} s of audio ({r['frames']} frames)")
    print(f"compile (encode + sampler + decode, first window): {r['compile_s']:.1f} s")
    print(f"offline: {r['offline_fps']:.1f} fps   streaming: {r['stream_fps']:.1f} fps")
    print(f"first-frame latency: p50 {r['latency_p50_ms']:.0f} ms, p95 {r['latency_p95_ms']:.0f} ms")
    print(f"time split (offline): motion {100 * r['share_motion']:.0f}%, decode "
          f"{100 * r['share_decode']:.0f}%, host (features, glue) {100 * r['share_host']:.0f}%")
    if r["decoder_tflops"] is not None:
        peak = r.get("decoder_peak_fraction")
        print(f"decoder: {r['decoder_gflop_per_frame']:.1f} GFLOP/frame, achieved "
              f"{r['decoder_tflops']:.2f} TFLOP/s"
              + (f" = {100 * peak:.1f}% of the device's peak" if peak else " (peak unknown)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
