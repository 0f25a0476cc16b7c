"""Does every sample.py control do what it says? Measured on a model export's output frames.

    python scripts/eval_controls.py --model DIR --data SYNTHTALK [--clips 8] [--meter M]

For held-out SynthTalk clips, each clip's first frame is the portrait and its speech the
audio; every control variant generates a video. The output frames are read back by the
export's own stage-1 encoder (z_pose angles; ridge probes fitted on --probe_clips training
clips' real frames map z_pose to head distance and [z_pose, z_dyn] to the camera-frame
gaze) and by the expression meter (mouth, and gaze: a reader independent of stage 1).
Both gaze readers are calibrated on the held-out clips' real frames
(`vasa_jax.metrics.probes.calibrate`) on each angle they follow (r >= 0.5): a regressor
shrinks toward the mean, so a face looking 15 degrees off reads as ~15 x slope; the
calibration inverts that line, so real frames read their labels on average. How well each
reader follows the labels on the real frames (r, slope) is printed first. The probe also
reads the generated motion itself, before decoding.
Printed as a markdown table, per variant: mouth r (meter vs the clip's true mouth_open),
envelope r (meter vs the speech's frame RMS, best lag within +-3), dP of the motion as
decoded (mean frame-to-frame change of z_pose's yaw/pitch/roll, degrees; for real frames,
of the pose labels), dP of the frames (the same of the re-read angles: this includes the
pose net's reading noise), the mean re-read angle away from the portrait's pose, the gaze
offset on the requested axis (mean reading less the held-out data's mean: compare with
--gaze) read three ways (the probe on the generated motion, the probe on the output frames,
the meter on the output frames), the meter's offset on the other axis, and the mean re-read
head distance. The gaze request is the data's mean gaze plus --gaze degrees on
--gaze_axis: phi (horizontal, the default) spans +-22 degrees in SynthTalk, theta
(vertical) only -12..10, so +15 degrees of theta asks for more than the data shows.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


MIN_R = 0.5  # a gaze reader is calibrated on an angle it follows at least this well


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model export (vasa_jax.inference)")
    p.add_argument("--data", required=True, help="a SynthTalk corpus with a test split")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--probe_clips", type=int, default=24,
                   help="training clips whose real frames fit the gaze / distance probes")
    p.add_argument("--meter", default=None, help="expression meter (default MODEL/expression_meter)")
    p.add_argument("--gaze", type=float, default=15.0, help="requested gaze offset (deg)")
    p.add_argument("--gaze_axis", choices=("theta", "phi"), default="phi",
                   help="the gaze angle offset: theta (vertical) or phi (horizontal)")
    p.add_argument("--gaze_only", action="store_true",
                   help="only the real frames, the default and the two gaze variants")
    args = p.parse_args(argv)

    import jax
    from flax import nnx

    from data_pipeline import schema
    from data_pipeline.loaders import load_clip_index
    from data_pipeline.synthtalk.sync import correlation_from_envelopes, frame_rms
    from data_pipeline.transforms import resize_square, to_signed_float
    from vasa_jax.evaluate.face_latent import load_meter
    from vasa_jax.inference import Controls, Pipeline
    from vasa_jax.metrics.motion import pearson_r
    from vasa_jax.metrics.probes import calibrate, fit_ridge

    pipe = Pipeline.load(args.model)
    meter = load_meter(args.meter or os.path.join(args.model, "expression_meter"))

    @jax.jit
    def read_batch(state, meter_params, frames):
        images = to_signed_float(frames)
        z_pose, z_dyn = nnx.merge(pipe._graphdef, state).encode_motion(images)
        readings = meter.apply(meter_params, images)
        return z_pose, z_dyn, readings["mouth_open"], readings["gaze"]

    def read(frames: np.ndarray):
        """frames uint8 [T, S, S, 3] -> (angles deg [T, 3], z_pose [T, 7], z_dyn [T, D],
        meter mouth [T], meter gaze deg [T, 2])."""
        out = [read_batch(pipe._state, meter.params, frames[i:i + pipe.window])
               for i in range(0, len(frames), pipe.window)]
        z_pose, z_dyn, mouth, gaze = (np.concatenate([np.asarray(o[k]) for o in out])
                                      for k in range(4))
        return np.degrees(z_pose[:, :3]), z_pose, z_dyn, mouth, gaze

    def load_clips(split: str, count: int):
        index = load_clip_index(args.data, split)
        source = schema.read_records(index.paths)
        ids = np.unique(np.linspace(0, len(index) - 1, count).round().astype(int))
        clips = [schema.decode_clip(source[int(i)]) for i in ids]
        out = []
        for clip in clips:
            frames = np.stack([resize_square(f, pipe.image_size) for f in clip.decode_frames()])
            out.append((frames, read(frames)))
        return clips, out

    def motion(codes):  # [z_pose, z_dyn] [T, 7 + D]
        return np.concatenate([codes[1], codes[2]], axis=1)

    # Probes on training clips' re-read codes: [z_pose, z_dyn] -> gaze, z_pose -> distance.
    fit_clips, fit_real = load_clips("train", args.probe_clips)
    gaze_probe = fit_ridge(np.concatenate([motion(r[1]) for r in fit_real]),
                           np.concatenate([c.labels["gaze"] for c in fit_clips])).predict
    dist_probe = fit_ridge(np.concatenate([r[1][1] for r in fit_real]),
                           np.concatenate([c.labels["distance"].reshape(-1, 1)
                                           for c in fit_clips])).predict
    clips, real = load_clips("test", args.clips)
    # Calibrated on the held-out clips' real frames, per gaze angle (None: the reader does
    # not follow that angle).
    gaze_true = np.concatenate([c.labels["gaze"] for c in clips])

    def calibrated_reader(raw: np.ndarray):
        """Per angle, the calibration when the reader follows it (r >= MIN_R on the real
        frames), else None: that angle is read raw (inverting a flat line blows noise up)."""
        cals = []
        for k in range(2):
            try:
                cal = calibrate(raw[:, k:k + 1], gaze_true[:, k:k + 1])
            except ValueError:
                cal = None
            cals.append(cal if cal is not None and float(cal.r[0]) >= MIN_R else None)

        def apply(x):
            return np.stack([c.apply(x[:, k:k + 1])[:, 0] if c else x[:, k]
                             for k, c in enumerate(cals)], 1)
        return cals, apply

    probe_cal, probe_read = calibrated_reader(
        gaze_probe(np.concatenate([motion(r[1]) for r in real])))
    meter_cal, meter_read = calibrated_reader(np.concatenate([r[1][4] for r in real]))
    gaze_mean = np.concatenate([c.labels["gaze"] for c in clips]).mean(0)
    dist_mean = float(np.concatenate([c.labels["distance"].ravel() for c in clips]).mean())
    dist_std = float(np.concatenate([c.labels["distance"].ravel() for c in clips]).std())
    offset = np.array([args.gaze, 0.0] if args.gaze_axis == "theta" else [0.0, args.gaze])
    want_gaze = gaze_mean + offset
    want_dist = dist_mean + 2 * dist_std

    variants = {
        "real frames (reference)": None,
        "default": Controls(),
        "head still": Controls(head="still"),
        "head amplitude 0.5": Controls(head_amplitude=0.5),
        "lip only": Controls(lip_only=True),
        f"gaze {args.gaze_axis} {args.gaze:+g} deg, l_g = 1": Controls(gaze=tuple(want_gaze),
                                                  guidance={"audio": 0.5, "gaze": 1.0}),
        f"gaze {args.gaze_axis} {args.gaze:+g} deg, l_g = 0": Controls(gaze=tuple(want_gaze),
                                                  guidance={"audio": 0.5, "gaze": 0.0}),
        "distance mean + 2 std": Controls(distance=want_dist),
    }
    if args.gaze_only:
        variants = {k: v for k, v in variants.items()
                    if v is None or k == "default" or k.startswith("gaze")}
    print(f"model {args.model}, {len(clips)} held-out clips of {args.data}; requested gaze "
          f"{want_gaze.round(1).tolist()} deg (data mean {args.gaze:+g} {args.gaze_axis}), distance "
          f"{want_dist:.3f} (data mean {dist_mean:.3f})")
    for name, raw in (("probe", gaze_probe(np.concatenate([motion(r[1]) for r in real]))),
                      ("meter", np.concatenate([r[1][4] for r in real]))):
        print(f"gaze {name} on the held-out real frames, (theta, phi): r " + ", ".join(
            f"{pearson_r(raw[:, k], gaze_true[:, k]):.3f}" for k in range(2))
            + "; calibrated: " + ", ".join(
                "no (r < %.1f)" % MIN_R if c is None else f"slope {float(c.slope[0]):.3f}"
                for c in (probe_cal if name == "probe" else meter_cal)))
    axis = 0 if args.gaze_axis == "theta" else 1
    other = 1 - axis

    def offset_cell(readings: list[np.ndarray]) -> str:
        """The mean reading's offset from the data mean on the requested axis (deg)."""
        return f"{np.concatenate(readings)[:, axis].mean() - gaze_mean[axis]:+.1f}"

    print(f"gaze offsets on {args.gaze_axis} from the held-out data mean "
          f"({gaze_mean[axis]:.1f} deg), asked {args.gaze:+g}: read by the probe from the "
          "generated motion, by the probe from the output frames (re-encoded by stage 1), "
          f"by the meter from the frames; and the meter's {('theta', 'phi')[other]} offset")
    print("| variant | mouth r | envelope r | dP motion (deg/frame) | dP frames | angle from "
          f"portrait (deg) | {args.gaze_axis} offset: motion (probe) | frames (probe) | "
          f"frames (meter) | {('theta', 'phi')[other]} offset (meter) | distance |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, controls in variants.items():
        mouth, truth, envs, dps, offs, gazes, dists, dpm, mgazes, mogazes = (
            [] for _ in range(10))
        for clip, (frames, codes) in zip(clips, real):
            if controls is None:
                angles, z_pose, z_dyn, m, mg = codes
                decoded = clip.labels["pose"][:, :3]
                mogazes.append(probe_read(gaze_probe(np.concatenate([z_pose, z_dyn], 1))))
            else:
                video = pipe.generate(frames[0], clip.audio, controls)
                angles, z_pose, z_dyn, m, mg = read(video.frames)
                decoded = np.degrees(video.z_pose[:, :3])
                mogazes.append(probe_read(gaze_probe(np.concatenate(
                    [video.z_pose, video.z_dyn], 1))))
            dpm.append(np.abs(np.diff(decoded, axis=0)).sum(1).mean())
            portrait = codes[0][0]  # the real first frame's re-read angles
            mouth.append(m), truth.append(clip.labels["mouth_open"][:len(m)])
            envs.append(frame_rms(clip.audio, len(m)))
            dps.append(np.abs(np.diff(angles, axis=0)).sum(1).mean())
            offs.append(np.linalg.norm(angles - portrait, axis=1).mean())
            gazes.append(probe_read(gaze_probe(np.concatenate([z_pose, z_dyn], axis=1))))
            mgazes.append(meter_read(mg))
            dists.append(dist_probe(z_pose).mean())
        r_env, _ = correlation_from_envelopes(mouth, envs)
        print(f"| {name} | {pearson_r(np.concatenate(mouth), np.concatenate(truth)):.3f} | "
              f"{r_env:.3f} | {np.mean(dpm):.3f} | {np.mean(dps):.3f} | {np.mean(offs):.2f} | "
              f"{offset_cell(mogazes)} | {offset_cell(gazes)} | {offset_cell(mgazes)} | "
              f"{np.concatenate(mgazes)[:, other].mean() - gaze_mean[other]:+.1f} | "
              f"{np.mean(dists):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
