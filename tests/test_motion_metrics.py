"""vasa_jax.metrics.motion: known answers for lip-sync r, dP, gaze/distance errors,
diversity and the motion probes."""

import numpy as np
import pytest

from vasa_jax.metrics import motion as M

# ----------------------------------------------------------------------------- pearson_r


def test_pearson_r_known_values():
    x = np.arange(10.0)
    assert M.pearson_r(x, 3 * x + 2) == pytest.approx(1.0)
    assert M.pearson_r(x, -0.5 * x) == pytest.approx(-1.0)
    # A constructed pair with r = cos(angle) between centred vectors: u, v orthonormal.
    rng = np.random.default_rng(0)
    u, v = np.linalg.qr(rng.standard_normal((200, 3)))[0][:, 1:].T  # orthonormal
    u, v = u - u.mean(), v - v.mean()
    v = v - (v @ u) / (u @ u) * u  # exactly orthogonal after centring
    for r in (0.0, 0.3, 0.8):
        b = r * u / np.linalg.norm(u) + np.sqrt(1 - r * r) * v / np.linalg.norm(v)
        assert M.pearson_r(u + 5.0, 2.0 * b - 1.0) == pytest.approx(r, abs=1e-9)
    # Matches numpy on random data; shapes are flattened.
    a, b = rng.standard_normal((2, 4, 25))
    assert M.pearson_r(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_pearson_r_undefined_and_bad_input():
    assert np.isnan(M.pearson_r(np.ones(5), np.arange(5.0)))
    assert np.isnan(M.pearson_r([1.0], [2.0]))
    with pytest.raises(ValueError, match="values"):
        M.pearson_r(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="non-finite"):
        M.pearson_r([0.0, np.nan, 1.0], [0.0, 1.0, 2.0])


# ----------------------------------------------------------------------------- dP


def test_pose_jitter_dp_linear_ramp():
    t = np.arange(20.0)[:, None]
    # yaw +0.5 / frame, pitch -0.2 / frame, roll constant; translations ignored.
    pose = np.concatenate([0.5 * t, -0.2 * t, np.full_like(t, 3.0), 100 * t, t, t], axis=1)
    assert M.pose_jitter_dp(pose) == pytest.approx((0.5 + 0.2 + 0.0) / 3)
    assert M.pose_jitter_dp(pose[:, :3]) == pytest.approx(0.7 / 3)
    # Pooled over sequences (weighted by pairs), never across a sequence boundary.
    other = np.zeros((6, 3))
    other[:, 0] = 3.0 * np.arange(6)  # 5 pairs of 3 deg yaw steps
    expected = (19 * 0.7 + 5 * 3.0) / (3 * (19 + 5))
    assert M.pose_jitter_dp([pose, other]) == pytest.approx(expected)
    joined = M.pose_jitter_dp(np.concatenate([pose[:, :3], other]))
    assert joined != pytest.approx(expected)  # the jump between clips would count


def test_pose_jitter_dp_edge_cases():
    assert np.isnan(M.pose_jitter_dp(np.zeros((1, 3))))
    assert M.pose_jitter_dp(np.zeros((5, 3))) == 0.0
    with pytest.raises(ValueError, match="yaw, pitch, roll"):
        M.pose_jitter_dp(np.zeros((5, 2)))


def test_window_slices():
    assert M.window_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert M.window_slices(6, 3) == [slice(0, 3), slice(3, 6)]
    with pytest.raises(ValueError):
        M.window_slices(5, 0)


# ----------------------------------------------------------------------------- controls


def test_gaze_vector_matches_synthtalk_convention():
    from data_pipeline.synthtalk.render import gaze_vector as render_gaze_vector

    g = np.array([[0.0, 0.0], [10.0, -20.0], [-35.0, 50.0]])
    np.testing.assert_allclose(M.gaze_vector(g), render_gaze_vector(g[:, 0], g[:, 1]),
                               atol=1e-12)
    np.testing.assert_allclose(M.gaze_vector([0.0, 0.0]), [0.0, 0.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(M.gaze_vector(g), axis=-1), 1.0)


def test_angular_error_known_angles():
    # Along one axis from the camera direction the angle is the difference itself.
    pred = np.array([[0.0, 0.0], [15.0, 0.0], [0.0, 10.0], [0.0, -10.0], [3.0, 0.0]])
    target = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 10.0], [3.0, 0.0]])
    np.testing.assert_allclose(M.angular_error_deg(pred, target), [0, 15, 10, 20, 0],
                               atol=1e-9)
    # Both angles: the spherical law of cosines, cos c = cos a cos b for a right angle at
    # the camera direction (theta = a along "up", phi = b along "right").
    err = M.angular_error_deg(np.array([30.0, 40.0]), np.array([0.0, 0.0]))
    expected = np.degrees(np.arccos(np.cos(np.radians(30)) * np.cos(np.radians(40))))
    assert float(err) == pytest.approx(expected, abs=1e-9)
    # Near the pole, a large phi difference is a small angle (unlike |d phi|).
    near_pole = M.angular_error_deg(np.array([[89.0, 0.0]]), np.array([[89.0, 90.0]]))
    assert near_pole[0] < 2.0
    # Target [2] broadcasts; small angles are accurate.
    tiny = M.angular_error_deg(np.array([[1e-4, 0.0], [0.0, 0.0]]), np.array([0.0, 0.0]))
    np.testing.assert_allclose(tiny, [1e-4, 0.0], rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="theta, phi"):
        M.angular_error_deg(np.zeros((3, 3)), np.zeros(2))


def test_distance_error():
    np.testing.assert_allclose(M.distance_error([1.0, 0.8, 1.3], 1.0), [0.0, 0.2, 0.3])


def test_diversity_known_spread():
    base = np.random.default_rng(0).standard_normal((1, 12, 3))
    same = np.repeat(base, 4, axis=0)
    assert M.diversity(same) == 0.0
    # Two seeds at +-s around a base: std over seeds = s per element.
    offsets = np.array([1.0, 2.0, 4.0])
    two = np.concatenate([base + offsets, base - offsets])  # [2, 12, 3]
    assert M.diversity(two) == pytest.approx(offsets.mean())
    # Relative to a reference std: every dimension counts 0.5 here.
    assert M.diversity(two, reference_std=2.0 * offsets) == pytest.approx(0.5)
    # Constant reference dimensions are left out.
    assert M.diversity(two, reference_std=np.array([2.0, 0.0, 8.0])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="S >= 2"):
        M.diversity(base)
    with pytest.raises(ValueError, match="reference_std"):
        M.diversity(two, reference_std=np.ones(2))


# ----------------------------------------------------------------------------- probes


def _planted(n_clips=12, frames=40, dm=9, noise=0.0, seed=0):
    """Motion [N, Dm] with labels a linear map of it (+ noise), and clip groups [N]."""
    rng = np.random.default_rng(seed)
    n = n_clips * frames
    x = rng.standard_normal((n, dm)) * rng.uniform(0.5, 3.0, dm) + rng.uniform(-2, 2, dm)
    maps = {name: rng.standard_normal((dm, len(cols)))
            for name, cols in M.PROBE_TARGETS.items()}
    offsets = {name: rng.uniform(-5, 5, len(cols)) for name, cols in M.PROBE_TARGETS.items()}
    y = {name: x @ w + offsets[name] + noise * rng.standard_normal((n, w.shape[1]))
         for name, w in maps.items()}
    groups = np.repeat(np.arange(n_clips), frames)
    return x, y, groups, maps, offsets


def test_probes_recover_planted_linear_map():
    x, y, groups, maps, offsets = _planted()
    xt, yt, *_ = _planted(seed=0)  # same maps, same data: exact recovery either way
    probes_ = M.MotionProbes.fit(x, y, groups, test_motion=xt, test_targets=yt)
    assert set(probes_.models) == set(M.PROBE_TARGETS)
    for name, cols in M.PROBE_TARGETS.items():
        assert probes_.r2[name]["r2_mean"] > 0.99, (name, probes_.r2[name])
        assert list(probes_.r2[name]["r2"]) == list(cols)
    # New motion vectors: the planted map, applied by the probe.
    fresh = np.random.default_rng(7).standard_normal((30, x.shape[1]))
    for name in M.PROBE_TARGETS:
        np.testing.assert_allclose(probes_.predict(fresh, name),
                                   fresh @ maps[name] + offsets[name], rtol=1e-3, atol=1e-3)
    decoded = probes_.decode(fresh)
    assert decoded["pose"].shape == (30, 3) and decoded["mouth_open"].shape == (30, 1)


def test_probes_cross_validated_r2_without_test_data():
    x, y, groups, *_ = _planted(noise=0.5)
    probes_ = M.MotionProbes.fit(x, {"pose": y["pose"]}, groups)
    r2 = probes_.r2["pose"]
    # Noise 0.5 on targets of variance ~|w|^2 * var(x): R^2 high but clearly below 1.
    assert 0.8 < r2["r2_mean"] < 0.999
    assert r2["num_test"] == len(x)  # pooled out-of-fold predictions
    # Unrelated targets: held-out R^2 about 0 or below.
    rng = np.random.default_rng(3)
    noise = M.MotionProbes.fit(x, {"mouth_open": rng.standard_normal(len(x))}, groups)
    assert noise.r2["mouth_open"]["r2_mean"] < 0.05


def test_probes_errors():
    x, y, groups, *_ = _planted()
    with pytest.raises(ValueError, match="unknown probe targets"):
        M.MotionProbes.fit(x, {"blink": y["pose"]}, groups)
    with pytest.raises(ValueError, match="groups"):
        M.MotionProbes.fit(x, y, groups[:-1])
    p = M.MotionProbes.fit(x, {"pose": y["pose"]}, groups)
    with pytest.raises(KeyError, match="no 'gaze' probe"):
        p.predict(x, "gaze")
    with pytest.raises(ValueError, match=r"\[T, 9\]"):
        p.predict(x[:, :4], "pose")


def test_probe_targets_from_labels():
    t = 5
    labels = {"pose": np.arange(t * 6.0).reshape(t, 6), "mouth_open": np.linspace(0, 1, t),
              "gaze": np.ones((t, 2)), "blink": np.zeros(t)}
    out = M.probe_targets(labels)
    assert set(out) == {"pose", "mouth_open", "gaze"}  # no distance label, blink not a target
    np.testing.assert_array_equal(out["pose"], labels["pose"][:, :3])
    assert out["mouth_open"].shape == (t, 1)
