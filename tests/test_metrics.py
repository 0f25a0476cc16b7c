"""vasa_jax.metrics: PSNR / SSIM values and properties, ridge probes, group folds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import signal

from vasa_jax.metrics import image, probes


def _images(seed, shape=(2, 32, 32, 3)):
    """Smooth-ish random images in [-1, 1]."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, shape)
    box = np.ones((1,) * (len(shape) - 3) + (3, 3, 1)) / 9
    return np.clip(signal.convolve(x, box, mode="same"), -1, 1).astype(np.float32)


# ----------------------------------------------------------------------------- PSNR


def test_psnr_identical_is_inf():
    x = _images(0)
    assert np.all(np.isinf(np.asarray(image.psnr(x, x))))


def test_psnr_constant_offset_known_value():
    x = _images(1) * 0.5
    # [-1, 1]: an offset of 0.1 -> MSE 0.01, PSNR = 10 log10(2^2 / 0.01) = 26.0206 dB.
    np.testing.assert_allclose(image.psnr(x, x + 0.1), [26.0206] * 2, atol=1e-3)
    # [0, 1]: an offset of 0.05 is the same relative error.
    u = (x + 1) / 2
    np.testing.assert_allclose(image.psnr(u, u + 0.05, value_range=(0, 1)), [26.0206] * 2,
                               atol=1e-3)
    # [0, 255]: offset 10 -> 10 log10(255^2 / 100) = 28.1308 dB.
    np.testing.assert_allclose(image.psnr(u * 255, u * 255 + 10, value_range=(0, 255)),
                               [28.1308] * 2, atol=1e-3)


def test_psnr_batched_and_jittable():
    x = _images(2, (2, 3, 16, 16, 3))
    y = x + np.random.default_rng(0).normal(0, 0.05, x.shape).astype(np.float32)
    out = jax.jit(image.psnr)(x, y)
    assert out.shape == (2, 3)
    flat = image.psnr(x.reshape(6, 16, 16, 3), y.reshape(6, 16, 16, 3))
    np.testing.assert_allclose(np.asarray(out).ravel(), flat, rtol=1e-6)


def test_psnr_of_a_masked_region_is_that_of_its_crop():
    x = _images(4)
    y = x + np.random.default_rng(1).normal(0, 0.1, x.shape).astype(np.float32)
    mask = np.zeros(x.shape[1:3], np.float32)
    mask[3:9, 5:12] = 1.0
    np.testing.assert_allclose(image.psnr(x, y, mask=mask),
                               image.psnr(x[:, 3:9, 5:12], y[:, 3:9, 5:12]), rtol=1e-5)
    np.testing.assert_allclose(image.psnr(x, y, mask=np.ones_like(mask)), image.psnr(x, y),
                               rtol=1e-6)
    # Errors outside the mask do not count.
    z = y.copy()
    z[:, 0] += 0.5
    np.testing.assert_allclose(image.psnr(x, z, mask=mask), image.psnr(x, y, mask=mask),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        image.psnr(x, y, mask=mask[:-1])


def test_psnr_rejects_bad_input():
    x = _images(3)
    with pytest.raises(ValueError, match="different shapes"):
        image.psnr(x, x[:1])
    with pytest.raises(ValueError, match="high > low"):
        image.psnr(x, x, value_range=(1, 1))


# ----------------------------------------------------------------------------- SSIM


def _ssim_reference(x, y, data_range, size=11, sigma=1.5):
    """Wang et al.'s SSIM with an explicit 2-D window (scipy), one image [H, W, C]."""
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (t / sigma) ** 2)
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(x.shape[-1]):
        a, b = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)
        f = lambda z: signal.convolve2d(z, win, mode="valid")  # noqa: E731
        ma, mb = f(a), f(b)
        va, vb, cab = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
        vals.append(((2 * ma * mb + c1) * (2 * cab + c2))
                    / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_identical_is_one():
    x = _images(4)
    np.testing.assert_allclose(image.ssim(x, x), [1.0, 1.0], atol=1e-5)


def test_ssim_matches_reference_and_is_symmetric():
    x = _images(5)
    y = np.clip(x + np.random.default_rng(1).normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
    got = np.asarray(image.ssim(x, y))
    # The standard definition on images in [0, 1] (data range 1).
    want = [_ssim_reference((x[i] + 1) / 2, (y[i] + 1) / 2, 1.0) for i in range(2)]
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(got, image.ssim(y, x), atol=1e-6)
    # Any value range gives the number of the same images in [0, 1].
    np.testing.assert_allclose(image.ssim((x + 1) / 2, (y + 1) / 2, value_range=(0, 1)), got,
                               atol=1e-5)
    np.testing.assert_allclose(
        image.ssim((x + 1) * 127.5, (y + 1) * 127.5, value_range=(0, 255)), got, atol=1e-5)


def test_ssim_decreases_with_noise():
    x = _images(6)
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 1, x.shape).astype(np.float32)
    scores = [float(jnp.mean(image.ssim(x, np.clip(x + s * noise, -1, 1))))
              for s in (0.02, 0.1, 0.3, 1.0)]
    assert scores[0] > 0.9
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    # Unrelated images score near 0.
    assert abs(float(jnp.mean(image.ssim(x, _images(7))))) < 0.15


def test_ssim_shapes_and_errors():
    x = _images(8, (3, 2, 16, 16, 3))
    assert image.ssim(x, x).shape == (3, 2)
    assert image.ssim_map(x, x).shape == (3, 2, 6, 6, 3)
    with pytest.raises(ValueError, match="smaller than"):
        image.ssim(x[..., :8, :8, :], x[..., :8, :8, :])
    np.testing.assert_allclose(image.ssim(x[..., :8, :8, :], x[..., :8, :8, :], filter_size=7),
                               np.ones((3, 2)), atol=1e-5)


# ----------------------------------------------------------------------------- probes


def _linear_data(n, f=8, d=3, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)) * rng.uniform(0.1, 10, f) + rng.normal(0, 5, f)
    w = rng.normal(size=(f, d))
    return x, x @ w + 3.0 + noise * rng.normal(size=(n, d)) * (x @ w).std(0)


def test_ridge_probe_recovers_linear_relation():
    x, y = _linear_data(600)
    res = probes.linear_probe(x[:400], y[:400], x[400:], y[400:], names=("a", "b", "c"))
    assert min(res.r2) > 0.99, res
    assert res.mean_r2 > 0.99
    assert (res.num_train, res.num_test) == (400, 200)
    js = res.to_json()
    assert set(js["r2"]) == {"a", "b", "c"} and js["r2_mean"] > 0.99


def test_ridge_probe_on_noise_is_about_zero():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(800, 16)), rng.normal(size=(800, 2))
    res = probes.linear_probe(x[:600], y[:600], x[600:], y[600:])
    assert all(-0.1 < v < 0.05 for v in res.r2), res


def test_fit_ridge_matches_sklearn():
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    x, y = _linear_data(200, noise=0.5, seed=2)
    model = probes.fit_ridge(x, y, alphas=(0.3,))
    xs = (x - x.mean(0)) / x.std(0)
    ref = sklearn_linear.Ridge(alpha=0.3 * len(x)).fit(xs, y)
    np.testing.assert_allclose(model.predict(x), ref.predict(xs), rtol=1e-8, atol=1e-8)


def test_leave_one_out_closed_form_matches_refitting():
    x, y = _linear_data(40, f=5, d=2, noise=0.5, seed=3)
    alpha = 0.05
    xs = (x - x.mean(0)) / x.std(0)
    yc = y - y.mean(0)
    u, s, _ = np.linalg.svd(xs, full_matrices=False)
    closed = probes._loo_errors(u, s, yc, alpha * len(x))
    # Brute force: refit without sample i (same standardisation, refitted intercept).
    errs = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        a, b = xs[keep], yc[keep]
        am, bm = a.mean(0), b.mean(0)
        w = np.linalg.solve((a - am).T @ (a - am) + alpha * len(x) * np.eye(5),
                            (a - am).T @ (b - bm))
        errs.append(np.mean((yc[i] - ((xs[i] - am) @ w + bm)) ** 2))
    assert closed == pytest.approx(np.mean(errs), rel=1e-9)


def test_alpha_selection_regularises_noisy_probes():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 40))  # few samples, many features, pure noise
    y = rng.normal(size=60)
    assert probes.fit_ridge(x, y).alpha >= 1.0
    x2, y2 = _linear_data(500, noise=0.001)
    assert probes.fit_ridge(x2, y2).alpha <= 1e-3


def test_grouped_alpha_selection_does_not_reward_memorising_groups():
    """Samples come in groups of near duplicates (frames of a clip) whose target is a
    per-group value unrelated to the features' shared structure: leave-one-out keeps
    alpha small (each sample's duplicates are in its training set) and the probe fails on
    new groups; grouped cross-validation picks a strong alpha and a probe near R^2 = 0."""

    def make(n_groups, seed):
        r = np.random.default_rng(seed)
        centre = r.normal(size=(n_groups, 30))
        x = np.repeat(centre, 10, 0) + 0.01 * r.normal(size=(n_groups * 10, 30))
        y = np.repeat(r.normal(size=n_groups), 10)
        return x, y, np.repeat(np.arange(n_groups), 10)

    x, y, groups = make(40, 0)
    x_new, y_new, _ = make(40, 1)
    loo = probes.fit_ridge(x, y)
    grouped = probes.fit_ridge(x, y, groups=groups)
    assert grouped.alpha > 100 * loo.alpha, (loo.alpha, grouped.alpha)
    r2_loo = probes.r2_score(y_new, loo.predict(x_new))[0]
    r2_grouped = probes.r2_score(y_new, grouped.predict(x_new))[0]
    assert r2_grouped > r2_loo and r2_grouped > -0.1, (r2_loo, r2_grouped)
    with pytest.raises(ValueError, match="groups"):
        probes.fit_ridge(x, y, groups=groups[:5])


def test_r2_score_constant_target_is_nan():
    y = np.stack([np.ones(10), np.arange(10.0)], 1)
    r2 = probes.r2_score(y, y + 0.1)
    assert math.isnan(r2[0]) and r2[1] == pytest.approx(1 - 0.1 / 82.5)
    res = probes.ProbeResult(tuple(r2), ("const", "ramp"), 5, 10, 1.0)
    assert res.to_json()["r2"]["const"] is None
    assert res.mean_r2 == pytest.approx(r2[1])


def test_group_kfold_holds_groups_out():
    groups = np.repeat(np.arange(7), [3, 5, 2, 4, 4, 1, 6])
    folds = probes.group_kfold(groups, 3, seed=0)
    assert len(folds) == 3
    seen = np.concatenate([test for _, test in folds])
    assert sorted(seen) == list(range(len(groups)))  # every sample tested exactly once
    for train, test in folds:
        assert set(groups[train]).isdisjoint(groups[test])
        assert len(train) + len(test) == len(groups) and len(test) > 0
    again = probes.group_kfold(groups, 3, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    with pytest.raises(ValueError, match="groups"):
        probes.group_kfold(np.zeros(5), 2)


def test_kfold_probe_on_linear_and_grouped_data():
    x, y = _linear_data(300, d=2)
    groups = np.arange(300) // 10
    res = probes.kfold_probe(x, y, groups, k=5)
    assert min(res.r2) > 0.99 and res.num_test == 300 and res.num_train == 240
    # Per-group constant targets are unpredictable from features that only vary within a
    # group: held-out groups give R^2 <= ~0 (a leaky split would score them highly).
    rng = np.random.default_rng(5)
    group_value = rng.normal(size=30)
    feats = rng.normal(size=(300, 4)) + np.repeat(rng.normal(size=(30, 4)), 10, 0)
    leaky = probes.kfold_probe(feats, group_value[groups], groups, k=5)
    assert leaky.r2[0] < 0.2


def test_classifier_probe_and_accuracy():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, 400)
    centres = np.array([[4, 0, 0], [0, 4, 0], [0, 0, 4]], float)
    x = centres[labels] + rng.normal(size=(400, 3))
    res = probes.classifier_probe(x[:300], labels[:300], x[300:], labels[300:])
    assert res.accuracy > 0.9 and res.num_classes == 3
    assert 0.2 < res.chance < 0.5
    noise = probes.classifier_probe(rng.normal(size=(300, 3)), labels[:300],
                                    rng.normal(size=(100, 3)), labels[300:])
    assert noise.accuracy < 0.5
    assert probes.accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1])) == 0.5
    with pytest.raises(ValueError, match=">= 2 training classes"):
        probes.classifier_probe(x[:10], np.zeros(10), x[:5], np.zeros(5))


def test_calibration_undoes_a_probes_shrinkage_toward_the_mean():
    from vasa_jax.metrics.probes import calibrate, fit_ridge

    rng = np.random.default_rng(0)
    gaze = rng.normal(0.0, 10.0, size=(2000, 1))  # degrees
    features = gaze + rng.normal(0.0, 10.0, size=(2000, 4))  # noisy views of it
    probe = fit_ridge(features[:1000], gaze[:1000])
    held_out = probe.predict(features[1000:])
    cal = calibrate(held_out, gaze[1000:])
    assert 0.6 < float(cal.slope[0]) < 0.9  # a 15-degree offset reads as ~12 uncalibrated
    # Frames 15 degrees off the mean: raw readings fall short; calibrated ones do not.
    offset = 15.0 + rng.normal(0.0, 10.0, size=(500, 4))
    raw = float(probe.predict(offset).mean())
    read = float(cal.apply(probe.predict(offset)).mean())
    assert raw < 13.0 and abs(read - 15.0) < 1.5, (raw, read)
    assert cal.apply(held_out[:, 0]).shape == (1000,)
    with pytest.raises(ValueError, match="do not follow"):
        calibrate(-gaze[:100], gaze[:100])  # a reader that turns the wrong way
