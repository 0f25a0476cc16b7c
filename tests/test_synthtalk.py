"""SynthTalk: geometry, rendering, speech, labels, determinism, dataset + CLI."""

import dataclasses
import glob
import os

import numpy as np
import pytest

from data_pipeline import schema
from data_pipeline.synthtalk import generate, motion, render, speech, sync
from data_pipeline.synthtalk.__main__ import main as cli_main
from data_pipeline.synthtalk.identity import sample_identity

needs_espeak = pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng not on PATH")


def _plain_identity(index=0, **overrides):
    """A left-right symmetric setup: frontal light, flat background, no beard/glasses."""
    ident = sample_identity(0, index)
    fields = dict(
        light_dir=(0.0, 0.45, -0.89),
        background="flat",
        beard="none",
        glasses=False,
        hair_style="short",
        skin=(0.9, 0.74, 0.63),
    )
    fields.update(overrides)
    return dataclasses.replace(ident, **fields)


def _pose(yaw=0.0, pitch=0.0, roll=0.0):
    return np.array([yaw, pitch, roll, 0.0, 0.12, render.NOMINAL_DISTANCE], np.float32)


def _part_mask(renderer, frame, names):
    ids, part_names = renderer.segment(frame)
    wanted = [i for i, n in enumerate(part_names) if n in names]
    return np.isin(ids, wanted)


# ----------------------------------------------------------------------------- geometry


def test_rotation_and_gaze_conventions_roundtrip():
    rng = np.random.default_rng(0)
    for yaw, pitch, roll in rng.uniform([-40, -25, -20], [40, 25, 20], (20, 3)):
        r = render.rotation_matrix(yaw, pitch, roll)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(render.matrix_to_pose(r), (yaw, pitch, roll), atol=1e-9)
    # The face direction (0, 0, -1) of a yawed/pitched head has gaze angles (pitch, yaw).
    face = render.rotation_matrix(20.0, 10.0, 0.0) @ np.array([0.0, 0.0, -1.0])
    np.testing.assert_allclose(render.gaze_angles(face), (10.0, 20.0), atol=1e-9)
    ang = rng.uniform(-30, 30, (10, 2))
    np.testing.assert_allclose(
        render.gaze_angles(render.gaze_vector(ang[:, 0], ang[:, 1])), ang, atol=1e-9
    )


def test_identity_is_a_pure_function_of_seed_and_index():
    assert sample_identity(3, 5) == sample_identity(3, 5)
    assert sample_identity(3, 5) != sample_identity(4, 5)
    assert sample_identity(3, 5) != sample_identity(3, 6)
    styles = {sample_identity(0, i).hair_style for i in range(40)}
    assert len(styles) >= 4  # identities really vary


# ----------------------------------------------------------------------------- rendering


def test_yaw_turns_the_head_in_3d():
    ident = _plain_identity()
    r = render.HeadRenderer(ident, 96)
    left = render.neutral_frame(pose=_pose(yaw=-30))
    right = render.neutral_frame(pose=_pose(yaw=30))
    img_l, img_r = r.render(left).astype(float), r.render(right).astype(float)
    # The nose moves towards the side the face turns to (+yaw = image right).
    cols = np.arange(r.n)
    nose_x = [cols[np.nonzero(_part_mask(r, f, ("nose",)))[1]].mean() for f in (left, right)]
    centre = (r.n - 1) / 2
    assert nose_x[0] < centre - 8 and nose_x[1] > centre + 8, nose_x
    # Turning to image right shows the head's left side (image left) and hides the right
    # ear behind the skull (occlusion), and vice versa.
    ear_l = [_part_mask(r, f, ("ear_l",)).sum() for f in (left, right)]
    ear_r = [_part_mask(r, f, ("ear_r",)).sum() for f in (left, right)]
    assert ear_l[1] > 20 and ear_l[0] < 0.3 * ear_l[1], ear_l
    assert ear_r[0] > 20 and ear_r[1] < 0.3 * ear_r[0], ear_r
    # A symmetric head at -30 and +30 degrees is (nearly) a mirror image.
    mirrored = np.abs(img_l[:, ::-1] - img_r).mean()
    different = np.abs(img_l - img_r).mean()
    assert mirrored < 0.25 * different, (mirrored, different)


def test_pitch_moves_nose_vertically_and_distance_scales_head():
    r = render.HeadRenderer(_plain_identity(), 96)
    rows = np.arange(r.n)
    up = rows[np.nonzero(_part_mask(r, render.neutral_frame(pose=_pose(pitch=20)), ("nose",)))[0]]
    down = rows[
        np.nonzero(_part_mask(r, render.neutral_frame(pose=_pose(pitch=-20)), ("nose",)))[0]
    ]
    assert up.mean() < down.mean() - 4  # image rows grow downwards
    near = render.neutral_frame(pose=np.array([0, 0, 0, 0, 0.12, 6.0]))
    far = render.neutral_frame(pose=np.array([0, 0, 0, 0, 0.12, 8.5]))
    skull = ("skull", "face", "hair")
    assert _part_mask(r, near, skull).sum() > 1.5 * _part_mask(r, far, skull).sum()


def test_blink_closes_the_eyes():
    r = render.HeadRenderer(_plain_identity(), 128)
    open_f = render.neutral_frame(blink=0.0)
    closed_f = render.neutral_frame(blink=1.0)
    eyes = _part_mask(r, open_f, ("eye_l", "eye_r"))
    img_o, img_c = r.render(open_f), r.render(closed_f)

    def whites(img):  # bright, unsaturated pixels: sclera
        img = img.astype(int)
        return ((img.min(-1) > 150) & (img.max(-1) - img.min(-1) < 40) & eyes).sum()

    assert whites(img_o) >= 10
    assert whites(img_c) == 0
    assert np.abs(img_o.astype(float) - img_c)[eyes].mean() > 20


def test_mouth_open_shows_the_dark_mouth_cavity():
    r = render.HeadRenderer(_plain_identity(), 128)

    def dark(mouth_open):
        frame = render.neutral_frame(mouth_open=mouth_open)
        lower_face = _part_mask(r, frame, ("muzzle", "jaw", "chin", "face"))
        img = r.render(frame).astype(float)
        return ((img.mean(-1) < 80) & lower_face).sum()

    closed, half, wide = dark(0.0), dark(0.5), dark(1.0)
    assert closed < half < wide
    assert wide - closed > 50  # the cavity of a wide-open mouth at 128 px


def test_gaze_moves_the_iris():
    r = render.HeadRenderer(_plain_identity(), 128)
    eyes = _part_mask(r, render.neutral_frame(), ("eye_r",))
    cols = np.arange(r.n)[None, :].repeat(r.n, 0)

    def iris_x(phi):
        img = r.render(render.neutral_frame(gaze=(0.0, phi))).astype(float)
        dark = eyes & (img.mean(-1) < 110)
        return cols[dark].mean()

    assert iris_x(25.0) > iris_x(-25.0) + 1.5  # looking towards image right


def test_every_emotion_changes_the_face():
    ident = _plain_identity()
    r = render.HeadRenderer(ident, 64)
    neutral = r.render(render.neutral_frame()).astype(float)
    for i, name in enumerate(schema.EMOTIONS[1:], start=1):
        img = r.render(render.neutral_frame(emotion_probs=np.eye(8)[i])).astype(float)
        assert np.abs(img - neutral).sum() > 100, name


def test_renderer_sizes_and_supersampling():
    ident = sample_identity(0, 1)
    frame = render.neutral_frame(pose=_pose(yaw=10, pitch=5, roll=4))
    for size, ss in ((64, 1), (64, 2), (256, 1)):
        img = render.HeadRenderer(ident, size, ss).render(frame)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
    with pytest.raises(ValueError, match="supersample"):
        render.HeadRenderer(ident, 64, 0)


# ----------------------------------------------------------------------------- speech


def test_formant_fallback_makes_voiced_16k_speech():
    ident = sample_identity(0, 0)
    rng = np.random.default_rng(0)
    audio, attrs = speech.synthesize_speech(rng, ident, 2.0, "formant")
    assert audio.shape == (32000,) and audio.dtype == np.float32
    assert attrs["tts"] == "formant" and attrs["text"]
    assert np.abs(audio).max() < 1.0
    feats = motion.audio_features(audio, 50)
    assert feats["rms"].max() > 0.05  # not silent
    assert (feats["rms"] < 0.01).sum() >= 3  # has pauses
    assert feats["voiced"].sum() >= 10  # has a pitch
    f0 = np.median(feats["f0"][feats["voiced"]])
    assert 0.6 * ident.f0 < f0 < 1.5 * ident.f0
    again, _ = speech.synthesize_speech(np.random.default_rng(0), ident, 2.0, "formant")
    np.testing.assert_array_equal(audio, again)


@needs_espeak
def test_espeak_speech_is_deterministic_and_fits_the_clip():
    ident = sample_identity(0, 2)
    audio, attrs = speech.synthesize_speech(np.random.default_rng(1), ident, 1.5, "espeak")
    assert audio.shape == (24000,) and audio.dtype == np.float32
    assert attrs["tts"] == "espeak-ng" and attrs["voice"].startswith(ident.language)
    assert len(attrs["text"]) > 10
    rms = sync.frame_rms(audio, 37)
    assert rms.max() > 0.05 and np.percentile(rms, 95) == pytest.approx(
        speech.REFERENCE_RMS, rel=0.05
    )
    again, _ = speech.synthesize_speech(np.random.default_rng(1), ident, 1.5, "espeak")
    np.testing.assert_array_equal(audio, again)


def test_fit_length_cuts_and_pads():
    x = np.ones(100, np.float32)
    assert speech.fit_length(x, 60, 1000).shape == (60,)
    padded = speech.fit_length(x, 150, 1000)
    assert padded.shape == (150,) and padded[100:].sum() == 0
    with pytest.raises(ValueError, match="engine"):
        speech.synthesize_speech(np.random.default_rng(0), sample_identity(0, 0), 1.0, "tts9")


# ----------------------------------------------------------------------------- labels


def test_labels_match_schema_and_stay_in_range():
    ident = sample_identity(0, 3)
    audio, _ = speech.synthesize_speech(np.random.default_rng(0), ident, 4.0, "formant")
    labels, attrs = motion.generate_labels(np.random.SeedSequence(5), ident, audio, 100)
    assert set(labels) == set(schema.LABELS)
    for name, shape in schema.LABELS.items():
        assert labels[name].shape == (100, *shape), name
        assert np.all(np.isfinite(labels[name])), name
    for name in ("blink", "brow", "mouth_open", "mouth_width", "mouth_round"):
        assert labels[name].min() >= 0 and labels[name].max() <= 1, name
    assert np.all(np.abs(labels["pose"][:, :3]) <= motion.POSE_LIMITS)
    np.testing.assert_allclose(labels["emotion_probs"].sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(labels["emotion"], labels["emotion_probs"].argmax(1))
    np.testing.assert_allclose(
        labels["distance"] * render.NOMINAL_DISTANCE, labels["pose"][:, 5], rtol=1e-6
    )
    assert labels["mouth_open"].std() > 0.1  # the mouth moves
    assert labels["pose"][:, 0].std() > 0.5  # the head moves
    # Eyes never turn further than the eye-in-head limits.
    rots = np.stack([render.rotation_matrix(*p) for p in labels["pose"][:, :3]])
    local = np.einsum(
        "nji,nj->ni", rots, render.gaze_vector(labels["gaze"][:, 0], labels["gaze"][:, 1])
    )
    ang = render.gaze_angles(local)
    assert ang[:, 1].min() >= motion.EYE_LIMITS[1][0] - 1e-3
    assert ang[:, 1].max() <= motion.EYE_LIMITS[1][1] + 1e-3
    assert attrs["mouth_lag_frames"] == motion.MOUTH_LAG_FRAMES


def test_blinks_are_short_and_recurring():
    b = motion.blink_track(np.random.default_rng(0), 25 * 60, interval=3.0)
    closed = b > 0.5
    onsets = np.flatnonzero(closed[1:] & ~closed[:-1])
    assert 8 <= len(onsets) <= 40  # ~one per 3 s over a minute
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], closed, [0]]))))[::2]
    assert runs.max() <= 6  # at most ~250 ms closed


def test_sync_correlation_finds_the_lag():
    rng = np.random.default_rng(0)
    audios, mouths = [], []
    for _ in range(3):
        env = np.abs(rng.normal(size=60)) + 0.05
        audios.append(np.repeat(env, 640) * np.sign(rng.normal(size=60 * 640)))
        mouths.append(np.concatenate([np.zeros(2), env[:-2]]))  # mouth 2 frames late
    r, lag = sync.mouth_audio_correlation(mouths, audios)
    assert lag == 2 and r > 0.99
    # The streaming sums equal Pearson's r of the pooled pairs at every lag.
    noisy = [m + rng.normal(0, 0.3, m.shape) for m in mouths]
    envs = [sync.frame_rms(a, 60) for a in audios]
    acc = sync.SyncAccumulator(max_lag=3)
    for m, e in zip(noisy, envs):
        acc.add(m, e)
    r, lag = acc.result()
    pooled = np.corrcoef(
        np.concatenate([m[lag:] for m in noisy]), np.concatenate([e[: 60 - lag] for e in envs])
    )[0, 1]
    assert r == pytest.approx(pooled, abs=1e-9) and lag == 2
    with pytest.raises(ValueError, match="constant"):
        sync.mouth_audio_correlation([np.zeros(60)], audios[:1])


# ----------------------------------------------------------------------------- clips


@pytest.fixture(scope="module")
def small_cfg():
    return generate.SynthTalkConfig(
        num_identities=2,
        clips_per_identity=2,
        seconds=2.0,
        size=64,
        seed=7,
        test_clips_per_identity=1,
        supersample=1,
    )


def test_make_clip_roundtrip_and_labels(small_cfg):
    clip = generate.make_clip(small_cfg, 1, 1)
    assert clip.split == "test" and clip.identity_id == 1
    assert clip.num_frames == 50 and len(clip.audio) == 32000
    back = schema.decode_clip(schema.encode_clip(clip))
    assert back.clip_id == clip.clip_id and back.attrs == clip.attrs
    for name in schema.LABELS:
        np.testing.assert_array_equal(back.labels[name], clip.labels[name])
    np.testing.assert_allclose(back.audio, clip.audio, atol=1e-4)
    frames = back.decode_frames([0, 49])
    assert frames.shape == (2, 64, 64, 3)
    assert frames.std() > 10  # a real picture, not a blank
    assert "text" in clip.attrs and "voice" in clip.attrs and "identity" in clip.attrs


def test_mouth_follows_audio_on_a_small_corpus(small_cfg):
    for tts in ("formant",) + (("espeak",) if speech.espeak_available() else ()):
        cfg = dataclasses.replace(small_cfg, tts=tts)
        clips = [generate.make_clip(cfg, i, j) for i in range(2) for j in range(2)]
        r, lag = sync.clips_mouth_audio_correlation(clips)
        assert r >= 0.6, (tts, r, lag)
        assert lag == motion.MOUTH_LAG_FRAMES, (tts, lag)


def _shard_bytes(directory):
    return {
        os.path.basename(p): open(p, "rb").read()
        for p in sorted(glob.glob(os.path.join(directory, "*.array_record")))
    }


def test_dataset_is_deterministic_across_workers_and_seeds(tmp_path):
    cfg = generate.SynthTalkConfig(
        num_identities=2, clips_per_identity=1, seconds=1.0, size=64, seed=3, supersample=1
    )
    one = generate.generate_dataset(cfg, str(tmp_path / "w1"), workers=1, progress=False)
    two = generate.generate_dataset(cfg, str(tmp_path / "w2"), workers=2, progress=False)
    other = dataclasses.replace(cfg, seed=4)
    generate.generate_dataset(other, str(tmp_path / "s4"), workers=1, progress=False)
    b1, b2, b4 = (_shard_bytes(tmp_path / d) for d in ("w1", "w2", "s4"))
    assert b1 and b1 == b2
    assert b1.keys() == b4.keys() and b1 != b4
    assert one.extra == two.extra


def test_config_rejects_bad_arguments():
    with pytest.raises(ValueError, match="test_clips_per_identity"):
        generate.SynthTalkConfig(2, 1, 1.0, test_clips_per_identity=2)
    with pytest.raises(ValueError, match="size"):
        generate.SynthTalkConfig(2, 1, 1.0, size=100)
    with pytest.raises(ValueError, match="identity"):
        generate.SynthTalkConfig(0, 1, 1.0)


def test_cli_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "ds")
    rc = cli_main(
        [
            "--out",
            out,
            "--num_identities",
            "2",
            "--clips_per_identity",
            "2",
            "--seconds",
            "1",
            "--size",
            "64",
            "--seed",
            "1",
            "--workers",
            "1",
            "--preview",
            "--test_clips_per_identity",
            "1",
            "--frame_format",
            "png",
            "--num_shards",
            "2",
            "--no_progress",
        ]
    )
    assert rc == 0
    assert "mouth-audio r=" in capsys.readouterr().out
    info = schema.DatasetInfo.load(out)
    assert info.source == "synthtalk" and info.height == info.width == 64
    assert info.clips == {"train": 2, "test": 2} and info.num_identities == 2
    assert set(info.labels) == set(schema.LABELS)
    assert info.extra["camera"]["focal_px"] == pytest.approx(render.focal_length(64))
    train = schema.list_shards(out, "train")
    assert len(train) == 2 and len(schema.list_shards(out, "test")) == 2
    source = schema.read_records(schema.list_shards(out))
    clips = [schema.decode_clip(source[i]) for i in range(len(source))]
    assert sorted(c.split for c in clips) == ["test", "test", "train", "train"]
    assert all(c.frame_format == "png" for c in clips)
    assert os.path.getsize(os.path.join(out, "preview.mp4")) > 1000
    small = [
        "--out",
        out,
        "--num_identities",
        "1",
        "--clips_per_identity",
        "1",
        "--seconds",
        "1",
        "--workers",
        "1",
        "--no_progress",
    ]
    assert cli_main(small + ["--test_clips_per_identity", "3"]) == 2  # bad argument
    assert cli_main(small) == 2  # refuses to mix with the existing dataset
    assert cli_main(small + ["--overwrite"]) == 0
    assert [os.path.basename(p) for p in schema.list_shards(out)] == [
        schema.shard_name("train", 0, 1)
    ]
    assert not os.path.exists(os.path.join(out, "preview.mp4"))
