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


# ----------------------------------------------------------------------------- framing


def _rows_cols(renderer, frame, names):
    """Rows and columns (supersampled pixels) where the parts `names` are seen."""
    mask = _part_mask(renderer, frame, names)
    return np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))


def _lower_face(renderer, frame):
    """[size, size]: output pixels wholly on the lower face (where the mouth decal lives)."""
    mask = _part_mask(renderer, frame, ("face", "jaw", "chin", "muzzle"))
    k = renderer.ss
    return mask.reshape(renderer.size, k, renderer.size, k).all((1, 3))


def _mouth_interior(img):
    """[H, W]: dark red pixels (mouth cavity / tongue; skin and natural lips are paler)."""
    img = img.astype(float)
    return (img[..., 1] < 0.45 * img[..., 0]) & (img.mean(-1) < 90)


_NATURAL_LIPS = (0.874, 0.449, 0.395)  # the lip colour of skin (0.9, 0.74, 0.63), no lipstick


def test_face_framing_frames_brow_to_chin_like_a_face_crop():
    """Default "face" framing: brow-to-chin ~70% of the height (schema.FACE_CROP_HEIGHT),
    centred; "portrait" (the original) shows the face at under half the height."""
    assert render.DEFAULT_FRAMING == "face"
    frame = render.neutral_frame()
    for i in range(3):
        ident = _plain_identity(i)
        r = render.HeadRenderer(ident, 64, 2)
        brows, _ = _rows_cols(r, frame, ("brow_l", "brow_r"))
        face, _ = _rows_cols(r, frame, ("face", "jaw", "chin", "muzzle"))
        _, nose = _rows_cols(r, frame, ("nose",))
        top, bottom = brows.min(), face.max() + 1
        frac = (bottom - top) / r.n
        assert 0.6 <= frac <= 0.8, (i, frac)
        assert abs(frac - schema.FACE_CROP_HEIGHT) < 0.06, (i, frac)
        assert abs((top + bottom) / 2 / r.n - 0.5) < 0.04, (i, top, bottom)  # centred ...
        assert abs((nose.min() + nose.max() + 1) / 2 / r.n - 0.5) < 0.02  # ... both ways
        # The geometric extent (part_boxes) agrees with the pixels.
        boxes = r.part_boxes(frame, ("brow_l", "brow_r", "chin"))
        geo_top = min(boxes["brow_l"][1], boxes["brow_r"][1])
        assert abs(geo_top - top / r.n) < 1.5 / r.n
        assert abs(boxes["chin"][3] - bottom / r.n) < 1.5 / r.n
        portrait = render.HeadRenderer(ident, 64, 2, "portrait")
        brows, _ = _rows_cols(portrait, frame, ("brow_l", "brow_r"))
        face, _ = _rows_cols(portrait, frame, ("face", "jaw", "chin", "muzzle"))
        assert (face.max() + 1 - brows.min()) / portrait.n < 0.5


def test_face_stays_in_frame_at_the_motion_generators_extremes():
    """Each of motion.py's largest excursions alone, with the mouth closed or wide open:
    brow-to-chin stays in the frame at the nominal distance, and the eyes, nose and mouth
    stay in it with the head at the nearest distance too (per-clip distance >= 0.88, plus
    a small drift)."""
    yaw, pitch, roll = motion.POSE_LIMITS  # soft bounds: the angles never reach them
    extremes = [(0, yaw), (0, -yaw), (1, pitch), (1, -pitch), (2, roll), (2, -roll),
                (3, 0.25), (3, -0.25), (4, -0.01), (4, 0.28)]  # tx, ty: head radii
    for i in range(3):
        r = render.HeadRenderer(sample_identity(0, i), 64, 1)
        for axis, value in extremes:
            for distance, parts in ((1.0, ("brow_l", "brow_r", "chin")), (0.8, ("nose",))):
                for mouth_open in (0.0, 1.0):
                    pose = np.array(_pose(), np.float32)
                    pose[axis] = value
                    pose[5] = distance * render.NOMINAL_DISTANCE
                    frame = render.neutral_frame(pose=pose, mouth_open=mouth_open)
                    boxes = [*r.part_boxes(frame, parts).values(),
                             *r.boxes(frame, clip=False).values()]
                    b = np.stack(boxes)
                    where = (i, axis, value, distance, mouth_open)
                    assert b[:, :2].min() >= 0.0 and b[:, 2:].max() <= 1.0, (where, b)


def test_open_mouth_is_several_pixels_tall_at_64px():
    """In the face framing a wide-open mouth shows >= 4 px of dark mouth interior at 64 px;
    a closed one at most a 1 px line; all of it inside the mouth_box label."""
    for i in range(3):
        r = render.HeadRenderer(_plain_identity(i, lips=_NATURAL_LIPS), 64)
        spans = {}
        for mouth_open in (0.0, 1.0):
            frame = render.neutral_frame(mouth_open=mouth_open)
            inside = _mouth_interior(r.render(frame)) & _lower_face(r, frame)
            rows, cols = np.nonzero(inside)
            spans[mouth_open] = rows.max() - rows.min() + 1 if rows.size else 0
            x0, y0, x1, y1 = r.boxes(frame)["mouth_box"] * r.size
            assert np.all((cols + 0.5 > x0) & (cols + 0.5 < x1)), (i, mouth_open)
            assert np.all((rows + 0.5 > y0) & (rows + 0.5 < y1)), (i, mouth_open)
        assert spans[1.0] >= 4 and spans[0.0] <= 1, (i, spans)


def test_box_labels_bound_the_mouth_and_the_eyes():
    poses = [_pose(), _pose(yaw=20, pitch=10, roll=6), _pose(yaw=-22, pitch=-12, roll=-8)]
    for i in range(2):
        ident = _plain_identity(i, lips=_NATURAL_LIPS)
        r = render.HeadRenderer(ident, 64)
        for pose in poses:
            frame = render.neutral_frame(pose=pose, mouth_open=0.9)
            boxes = r.boxes(frame)
            assert set(boxes) == set(schema.BOX_LABELS)
            for name, box in boxes.items():
                assert box.dtype == np.float32 and box.shape == (4,)
                assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1, (name, box)
            # Every eye pixel (supersampled, by its centre) lies in eyes_box, which is tight.
            rows, cols = np.nonzero(_part_mask(r, frame, ("eye_l", "eye_r")))
            x0, y0, x1, y1 = boxes["eyes_box"] * r.n
            tol = 1.0  # supersampled pixels
            assert np.all((cols + 0.5 > x0 - tol) & (cols + 0.5 < x1 + tol))
            assert np.all((rows + 0.5 > y0 - tol) & (rows + 0.5 < y1 + tol))
            assert (cols.max() + 1 - cols.min()) > 0.85 * (x1 - x0)
            assert (rows.max() + 1 - rows.min()) > 0.7 * (y1 - y0)
            # What a blink changes lies in eyes_box; the dark mouth interior in mouth_box.
            img = r.render(frame).astype(float)
            blink = r.render(render.neutral_frame(pose=pose, mouth_open=0.9, blink=1.0))
            rows, cols = np.nonzero(np.abs(img - blink).max(-1) > 30)
            assert rows.size > 4
            x0, y0, x1, y1 = boxes["eyes_box"] * r.size
            assert np.all((cols + 0.5 > x0 - 0.5) & (cols + 0.5 < x1 + 0.5))
            assert np.all((rows + 0.5 > y0 - 0.5) & (rows + 0.5 < y1 + 0.5))
            rows, cols = np.nonzero(_mouth_interior(img) & _lower_face(r, frame))
            assert rows.size > 4
            x0, y0, x1, y1 = boxes["mouth_box"] * r.size
            assert np.all((cols + 0.5 > x0) & (cols + 0.5 < x1))
            assert np.all((rows + 0.5 > y0) & (rows + 0.5 < y1))
            # mouth_box is the box of the lips (reddish pixels), open or closed, to ~1 px.
            for mouth_open in (0.0, 0.9):
                f = render.neutral_frame(pose=pose, mouth_open=mouth_open)
                im = r.render(f).astype(float)
                rows, cols = np.nonzero((im[..., 1] < 0.68 * im[..., 0]) & _lower_face(r, f))
                pixels = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
                np.testing.assert_allclose(pixels, r.boxes(f)["mouth_box"] * r.size, atol=1.0)
    # The mouth box opens with the mouth; boxes move with the head.
    r = render.HeadRenderer(_plain_identity(0), 64)
    closed = r.boxes(render.neutral_frame(mouth_open=0.0))["mouth_box"]
    wide = r.boxes(render.neutral_frame(mouth_open=1.0))["mouth_box"]
    assert (wide[3] - wide[1]) * 64 > (closed[3] - closed[1]) * 64 + 4
    right = r.boxes(render.neutral_frame(pose=_pose(yaw=20)))
    assert right["eyes_box"][0] > r.boxes(render.neutral_frame())["eyes_box"][0] + 0.05
    # Out of the frame, the boxes are clipped to it.
    far_right = render.neutral_frame(pose=np.array([0, 0, 0, 1.5, 0.12, 7.0], np.float32))
    assert r.boxes(far_right)["eyes_box"][2] == pytest.approx(1.0)
    assert r.boxes(far_right, clip=False)["eyes_box"][2] > 1.0


def test_portrait_framing_is_unchanged():
    """--framing portrait renders exactly what SynthTalk rendered before the face framing
    (checksums computed with the code before it), so old corpora stay reproducible."""
    assert render.focal_length(64, "portrait") == pytest.approx(131.7647058823)
    assert render.focal_length(256, "portrait") == pytest.approx(527.0588235294)
    assert render.principal_point(64, "portrait") == pytest.approx((32.0, 32.0))
    assert render.focal_length(64) == pytest.approx(render.focal_length(64, "face"))
    # (pixel sum, sum weighted by row, by column) per RGB channel, uint8 frames.
    expected = {
        1: ([569509, 539535, 583530], [16726039, 15840984, 17822890],
            [17695638, 16766320, 18129284]),
        2: ([529550, 473148, 464216], [15017038, 13388316, 13685546],
            [16840003, 15129686, 14952405]),
    }
    poses = {1: ((10, 5, 4, 0.05, 0.1, 7.5), 0.8), 2: ((-20, -10, -6, -0.1, 0.15, 6.5), 0.0)}
    for idx, (pose, mouth_open) in poses.items():
        r = render.HeadRenderer(sample_identity(0, idx), 64, 2, "portrait")
        frame = render.neutral_frame(pose=np.array(pose, np.float32), mouth_open=mouth_open)
        img = r.render(frame).astype(np.int64)
        rows = np.arange(64)[:, None, None]
        cols = np.arange(64)[None, :, None]
        got = (img.sum((0, 1)), (img * rows).sum((0, 1)), (img * cols).sum((0, 1)))
        for g, e in zip(got, expected[idx]):
            np.testing.assert_allclose(g, e, rtol=2e-5)
    with pytest.raises(ValueError, match="framing"):
        render.HeadRenderer(sample_identity(0, 0), 64, 1, "closeup")


def test_project_matches_the_renderer():
    """render.project puts a head-local point where the renderer draws it (the pupil)."""
    ident = _plain_identity(1)
    for framing in ("face", "portrait"):
        r = render.HeadRenderer(ident, 128, 1, framing)
        pose = _pose(yaw=10, pitch=-5)
        frame = render.neutral_frame(pose=pose)
        eye = next(p for p in r.static.parts if p.name == "eye_r")
        rot = render.rotation_matrix(*pose[:3])
        front = np.asarray(eye.center) + rot.T @ np.array([0, 0, -eye.radii[2]])
        cam = rot @ front + pose[3:6]
        x, y = render.project(cam, 128, framing)
        img = r.render(frame).astype(float)
        mask = _part_mask(r, frame, ("eye_r",)) & (img.mean(-1) < 60)  # pupil
        rows, cols = np.nonzero(mask)
        assert abs(cols.mean() + 0.5 - x) < 1.5 and abs(rows.mean() + 0.5 - y) < 1.5, framing


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


def test_gaze_fixations_spread_over_the_averted_ranges():
    # Ten minutes of gaze targets: about GAZE_AT_CAMERA of the frames look at the camera,
    # the rest spread over GAZE_AVERTED, so each angle varies enough for a 64 px stage 1.
    g = motion.gaze_targets(np.random.default_rng(0), 25 * 600)
    at_camera = np.linalg.norm(g, axis=1) < 5.0
    assert abs(at_camera.mean() - motion.GAZE_AT_CAMERA) < 0.1
    for k in range(2):
        lo, hi = motion.GAZE_AVERTED[k]
        assert g[:, k].min() > lo - 2.0 and g[:, k].max() < hi + 2.0
        assert g[:, k].std() > 0.25 * (hi - lo) * 0.6  # a uniform's std is 0.29 * range
    # Fixations hold: most frame-to-frame steps are fixational jitter, a few are saccades.
    steps = np.linalg.norm(np.diff(g, axis=0), axis=1)
    assert np.median(steps) < 1.0 and (steps > 5.0).mean() < 0.1


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
    assert set(clip.labels) == set(schema.LABELS) | set(schema.BOX_LABELS)
    for name in clip.labels:
        np.testing.assert_array_equal(back.labels[name], clip.labels[name])
    # Per-frame boxes: those of the renderer for that frame's labels.
    renderer = render.HeadRenderer(sample_identity(small_cfg.seed, 1), 64, 1)
    for t in (0, 31):
        frame = {k: clip.labels[k][t] for k in schema.LABELS}
        for name, box in renderer.boxes(frame).items():
            np.testing.assert_allclose(clip.labels[name][t], box, atol=1e-6)
    for name in schema.BOX_LABELS:
        boxes = clip.labels[name]
        assert boxes.shape == (50, 4) and boxes.dtype == np.float32
        assert np.all(boxes[:, :2] < boxes[:, 2:]) and boxes.min() >= 0 and boxes.max() <= 1
    assert clip.labels["mouth_box"][:, 1].min() > clip.labels["eyes_box"][:, 3].max()
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
    with pytest.raises(ValueError, match="framing"):
        generate.SynthTalkConfig(2, 1, 1.0, framing="closeup")
    assert generate.SynthTalkConfig(2, 1, 1.0).framing == "face"


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
    assert set(info.labels) == set(schema.LABELS) | set(schema.BOX_LABELS)
    assert info.extra["camera"]["framing"] == info.extra["args"]["framing"] == "face"
    assert info.extra["camera"]["focal_px"] == pytest.approx(render.focal_length(64))
    np.testing.assert_allclose(
        info.extra["camera"]["principal_point_px"], render.principal_point(64, "face")
    )
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
    with pytest.raises(SystemExit):  # argparse rejects an unknown framing
        cli_main(small + ["--framing", "closeup"])
    assert cli_main(small + ["--overwrite", "--framing", "portrait"]) == 0
    assert [os.path.basename(p) for p in schema.list_shards(out)] == [
        schema.shard_name("train", 0, 1)
    ]
    camera = schema.DatasetInfo.load(out).extra["camera"]
    assert camera["framing"] == "portrait"
    assert camera["focal_px"] == pytest.approx(render.focal_length(64, "portrait"))
    assert not os.path.exists(os.path.join(out, "preview.mp4"))
