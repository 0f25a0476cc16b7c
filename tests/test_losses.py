"""Stage-1 losses: exact values on hand-made inputs, gradients, and the VASA-1 definitions."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vasa_jax import losses
from vasa_jax.losses import face_latent as fl


def _finite(tree) -> bool:
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- GAN


def test_hinge_losses_exact_values_and_scale_average():
    real = [jnp.array([2.0, 0.5]).reshape(1, 1, 2, 1), jnp.full((1, 2, 2, 1), 1.0)]
    fake = [jnp.array([-2.0, 0.5]).reshape(1, 1, 2, 1), jnp.full((1, 2, 2, 1), -0.5)]
    # scale 0: real mean(relu(1 - [2, .5])) = .25, fake mean(relu(1 + [-2, .5])) = .75
    # scale 1: real 0, fake relu(.5) = .5. Averaged over scales: (1.0 + 0.5) / 2.
    assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.75)
    # generator: -mean(fake) per scale: 0.75 and 0.5 -> 0.625
    assert float(losses.hinge_g_loss(fake)) == pytest.approx(0.625)
    # A perfectly separating discriminator has zero loss.
    assert float(losses.hinge_d_loss([jnp.full((2, 3, 3, 1), 1.5)],
                                     [jnp.full((2, 3, 3, 1), -1.5)])) == 0.0
    with pytest.raises(ValueError, match="number of scales"):
        losses.hinge_d_loss(real, fake[:1])

    g = jax.grad(lambda f: losses.hinge_g_loss([f]))(jnp.zeros((2, 2, 2, 1)))
    np.testing.assert_allclose(g, -1.0 / 8)


def test_feature_matching_values_gradients_and_split_outputs():
    rng = np.random.default_rng(0)
    maps = lambda *shapes: [jnp.asarray(rng.normal(size=s)) for s in shapes]  # noqa: E731
    real = [maps((2, 4, 4, 3), (2, 2, 2, 5)), maps((2, 2, 2, 3))]
    fake = jax.tree.map(lambda r: r + 0.5, real)
    # Every map differs by exactly 0.5 everywhere: the mean over the 3 maps is 0.5.
    assert float(losses.feature_matching_loss(real, fake)) == pytest.approx(0.5)
    assert float(losses.feature_matching_loss(real, real)) == 0.0

    g_real, g_fake = jax.grad(losses.feature_matching_loss, argnums=(0, 1))(real, fake)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_real))  # targets
    # d/dfake of mean over 3 maps of mean |.|: sign / (3 * map size)
    np.testing.assert_allclose(g_fake[0][0], 1.0 / (3 * 2 * 4 * 4 * 3), rtol=1e-6)

    outputs = [(jnp.zeros((2, 4, 4, 1)), real[0]), (jnp.ones((2, 2, 2, 1)), real[1])]
    logits, feats = losses.split_outputs(outputs)
    assert [x.shape for x in logits] == [(2, 4, 4, 1), (2, 2, 2, 1)]
    assert len(feats) == 2 and len(feats[0]) == 2 and feats[1][0] is real[1][0]
    with pytest.raises(ValueError, match="feature shapes differ"):
        losses.feature_matching_loss(real, [[fake[0][1], fake[0][0]], fake[1]])


# ----------------------------------------------------------------------------- perceptual


def test_perceptual_loss_matches_hand_computation_over_pyramid():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    y = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    features = lambda im: [im, 2.0 * im]  # noqa: E731  (linear stand-in for VGG)

    def pool(a):
        b, h, w, c = a.shape
        return a.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))

    # weights (1, 0.5): per level 1 * m + 0.5 * 2 * m = 2 m, m = mean |x_s - y_s|
    want = sum(2 * np.abs(a - b).mean() for a, b in [(x, y), (pool(x), pool(y)),
                                                      (pool(pool(x)), pool(pool(y)))])
    got = losses.perceptual_loss(features, x, y, layer_weights=(1.0, 0.5), num_scales=3)
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(losses.perceptual_loss(features, x, x, layer_weights=(1.0, 0.5))) == 0.0

    gx, gy = jax.grad(lambda a, b: losses.perceptual_loss(
        features, a, b, layer_weights=(1.0, 0.5), num_scales=2), argnums=(0, 1))(x, y)
    assert float(jnp.abs(gy).max()) == 0.0  # the target gets no gradient
    assert _finite(gx) and float(jnp.abs(gx).max()) > 0.0

    assert [p.shape for p in losses.image_pyramid(jnp.zeros((1, 33, 20, 3)), 3)] == [
        (1, 33, 20, 3), (1, 16, 10, 3), (1, 8, 5, 3)]
    with pytest.raises(ValueError, match="layer_weights"):
        losses.perceptual_loss(features, x, y)  # 2 maps, 5 default weights
    with pytest.raises(ValueError, match="equal shape"):
        losses.perceptual_loss(features, x, y[:1], layer_weights=(1.0, 0.5))


# ----------------------------------------------------------------------------- L1 / regions


def test_box_weights_follow_each_images_boxes():
    boxes = jnp.asarray([[[0.0, 0.0, 0.5, 0.5], [0.75, 0.75, 1.0, 1.0]],
                         [[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]]], jnp.float32)
    w = np.asarray(losses.box_weights(boxes, 8, region_weight=4.0))
    assert w.shape == (2, 8, 8, 1)
    inside = np.zeros((2, 8, 8), bool)
    inside[0, :4, :4] = inside[0, 6:, 6:] = inside[1, 4:, 4:] = True
    np.testing.assert_allclose(w[..., 0], np.where(inside, 5.0, 1.0))
    # The same map as the fixed-box helper for one image.
    fixed = losses.face_region_weights(8, region_weight=4.0, regions={"a": (0, 0, 0.5, 0.5),
                                                                       "b": (0.75, 0.75, 1, 1)})
    np.testing.assert_allclose(w[0], fixed)
    with pytest.raises(ValueError, match="B, K, 4"):
        losses.box_weights(boxes[0], 8, region_weight=1.0)


def test_region_weights_per_box_and_per_region():
    """The eyes box can weigh more than the mouth's (loss.l1_eyes_weight); overlaps take
    the larger weight, in the per-image and the fixed-box maps alike."""
    boxes = jnp.asarray([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0]]], jnp.float32)
    w = np.asarray(losses.box_weights(boxes, 8, region_weight=(2.0, 6.0)))[0, ..., 0]
    expected = np.ones((8, 8))
    expected[:4, :4] = 3.0
    expected[2:, 2:] = 7.0  # the second box, also where the two overlap
    np.testing.assert_allclose(w, expected)
    fixed = losses.face_region_weights(8, region_weight={"a": 2.0, "b": 6.0},
                                       regions={"a": (0, 0, 0.5, 0.5), "b": (0.25, 0.25, 1, 1)})
    np.testing.assert_allclose(fixed[..., 0], expected)
    with pytest.raises(ValueError, match=">= 0"):
        losses.box_weights(boxes, 8, region_weight=(1.0, -1.0))


def test_region_weight_map_and_weighted_l1():
    w = losses.face_region_weights(64, region_weight=2.0)
    assert w.shape == (64, 64, 1) and w.dtype == np.float32
    assert set(np.unique(w)) == {1.0, 3.0}
    assert w[int(0.40 * 64), 32, 0] == 3.0  # between the eyes
    assert w[int(0.66 * 64), 32, 0] == 3.0  # mouth
    assert w[2, 2, 0] == 1.0 and w[62, 62, 0] == 1.0  # corners
    assert losses.face_region_weights((4, 8), regions={"all": (0, 0, 1, 1)}).min() == 3.0
    with pytest.raises(ValueError, match="inside"):
        losses.face_region_weights(8, regions={"bad": (0.5, 0.2, 0.4, 0.9)})

    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    y = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    plain = float(losses.l1_loss(x, y))
    assert plain == pytest.approx(np.abs(x - y).mean(), rel=1e-6)
    assert float(losses.l1_loss(x, y, np.full((64, 64, 1), 5.0))) == pytest.approx(plain, rel=1e-5)

    # An error only inside the regions counts 3x more under the weighted mean.
    inside = np.broadcast_to(w == 3.0, x.shape)
    y2 = np.where(inside, x + 0.5, x)
    n_in = inside.sum() / 3  # pixels (per batch element x 2)
    want = (3.0 * 0.5 * n_in * 3) / (3 * (3.0 * n_in + (2 * 64 * 64 - n_in)))
    assert float(losses.l1_loss(x, y2, w)) == pytest.approx(want, rel=1e-5)
    assert float(losses.l1_loss(x, y2, w)) > float(losses.l1_loss(x, y2))
    # Per-example maps: a zero map for example 1 removes it from the loss.
    per_example = np.stack([np.ones((64, 64, 1)), np.zeros((64, 64, 1))]).astype(np.float32)
    assert float(losses.l1_loss(x, y, per_example)) == pytest.approx(
        np.abs(x[0] - y[0]).mean(), rel=1e-5)
    with pytest.raises(ValueError, match="weights must be"):
        losses.l1_loss(x, y, np.ones((32, 32, 1)))


# ----------------------------------------------------------------------------- l_consist


class Latent(NamedTuple):
    v_app: jax.Array  # [B, D, H, W, C]
    z_id: jax.Array  # [B, Di]
    z_pose: jax.Array  # [B, Dp]
    z_dyn: jax.Array  # [B, Dd]


B, S = 3, 8


def _frames(rng, leak: float):
    """Latents of frames i, j of one video from a toy encoder.

    The person's appearance `a` is shared; each frame has its own pose and dynamics. The
    encoder's canonical volume keeps `leak` x the frame's dynamics in its second channel
    (imperfect canonicalisation), so V_app^i != V_app^j unless leak = 0.
    """
    a = rng.normal(size=(B, 2, 4, 4, 1)).astype(np.float32)
    z_id = rng.normal(size=(B, 4)).astype(np.float32)

    def frame():
        pose = rng.normal(size=(B, 3)).astype(np.float32)
        dyn = rng.normal(size=(B, 5)).astype(np.float32)
        leaked = leak * np.broadcast_to(dyn[:, :1, None, None, None], (B, 2, 4, 4, 1))
        return Latent(jnp.asarray(np.concatenate([a, leaked], -1)), jnp.asarray(z_id),
                      jnp.asarray(pose), jnp.asarray(dyn))

    return frame(), frame()


def _linear_decoder(rng, reads_leak: bool):
    """A linear decoder; it ignores the volume's leaked channel unless `reads_leak`."""
    m = rng.normal(size=(2 * 4 * 4 * 2, S * S * 3)).astype(np.float32) * 0.1
    if not reads_leak:
        m.reshape(2, 4, 4, 2, -1)[..., 1, :] = 0.0
    p_id, p_pose, p_dyn = (rng.normal(size=(d, S * S * 3)).astype(np.float32) * 0.1
                           for d in (4, 3, 5))

    def decode(v_app, z_id, z_pose, z_dyn):
        out = v_app.reshape(v_app.shape[0], -1) @ m + z_id @ p_id + z_pose @ p_pose + z_dyn @ p_dyn
        return jnp.tanh(out).reshape(-1, S, S, 3)

    return decode


def test_consistency_pair_is_exactly_the_papers_two_transfers():
    rng = np.random.default_rng(3)
    lat_i, lat_j = _frames(rng, leak=1.0)
    decode = _linear_decoder(rng, reads_leak=True)
    a, b = losses.consistency_pair(decode, lat_i, lat_j)
    # a = D(V_app^j, z_id^j, z_pose^i, z_dyn^j); b = D(V_app^i, z_id^i, z_pose^i, z_dyn^j)
    np.testing.assert_allclose(a, decode(lat_j.v_app, lat_j.z_id, lat_i.z_pose, lat_j.z_dyn),
                               atol=1e-6)
    np.testing.assert_allclose(b, decode(lat_i.v_app, lat_i.z_id, lat_i.z_pose, lat_j.z_dyn),
                               atol=1e-6)
    with pytest.raises(TypeError, match="no field 'v_app'"):
        losses.consistency_loss(decode, (1, 2), lat_j)


def test_consistency_loss_is_zero_exactly_when_transfers_commute():
    rng = np.random.default_rng(4)
    lat_i, lat_j = _frames(rng, leak=1.0)
    commuting = _linear_decoder(rng, reads_leak=False)  # image independent of the leak
    leaking = _linear_decoder(rng, reads_leak=True)

    assert float(losses.consistency_loss(commuting, lat_i, lat_j)) < 1e-7
    l_leak = float(losses.consistency_loss(leaking, lat_i, lat_j))
    assert l_leak > 1e-2
    # Without leakage (a perfect canonical volume) both decoders commute.
    clean_i, clean_j = _frames(np.random.default_rng(4), leak=0.0)
    assert float(losses.consistency_loss(leaking, clean_i, clean_j)) < 1e-7
    # A frame paired with itself is always consistent.
    assert float(losses.consistency_loss(leaking, lat_i, lat_i)) == 0.0

    # The default distance is L1; a custom one (e.g. adding a perceptual term) replaces it.
    a, b = losses.consistency_pair(leaking, lat_i, lat_j)
    assert l_leak == pytest.approx(float(jnp.mean(jnp.abs(a - b))), rel=1e-6)
    sq = losses.consistency_loss(leaking, lat_i, lat_j, distance=lambda u, v: jnp.sum((u - v) ** 2))
    assert float(sq) == pytest.approx(float(jnp.sum((a - b) ** 2)), rel=1e-5)

    # Gradients reach every latent factor involved (both appearances, pose i, dynamics j).
    grads = jax.grad(lambda li, lj: losses.consistency_loss(leaking, li, lj), argnums=(0, 1))(
        lat_i, lat_j)
    assert _finite(grads)
    gi, gj = grads
    for g in (gi.v_app, gj.v_app, gi.z_pose):
        assert float(jnp.abs(g).max()) > 0
    # z_dyn^i and z_pose^j are not inputs of l_consist.
    assert float(jnp.abs(gi.z_dyn).max()) == 0 and float(jnp.abs(gj.z_pose).max()) == 0


# ----------------------------------------------------------------------------- l_cross-id


def _embed(images):
    """A linear stand-in face-ID embedder: [B, S, S, 3] -> [B, 6] (not unit norm)."""
    b = images.shape[0]
    return jnp.concatenate([images.mean(axis=(1, 2)), images[:, :2, :2].reshape(b, -1)[:, :3]], -1)


def test_cross_identity_loss_values_and_gradients():
    rng = np.random.default_rng(5)
    src = jnp.asarray(rng.uniform(-1, 1, (4, S, S, 3)).astype(np.float32))
    assert float(losses.cross_identity_loss(_embed, src, src)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.cross_identity_loss(_embed, 0.3 * src, src)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.cross_identity_loss(_embed, -src, src)) == pytest.approx(2.0, abs=1e-6)

    # Orthogonal embeddings: 1.
    e1 = lambda im: jnp.stack([im[:, 0, 0, 0], im[:, 0, 0, 1]], -1)  # noqa: E731
    a = jnp.zeros((1, S, S, 3)).at[:, 0, 0, 0].set(1.0)
    b = jnp.zeros((1, S, S, 3)).at[:, 0, 0, 1].set(2.0)
    assert float(losses.cross_identity_loss(e1, a, b)) == pytest.approx(1.0, abs=1e-6)

    decoded = jnp.asarray(rng.uniform(-1, 1, (4, S, S, 3)).astype(np.float32))
    gd, gs = jax.grad(lambda d, s: losses.cross_identity_loss(_embed, d, s), argnums=(0, 1))(
        decoded, src)
    assert _finite(gd) and float(jnp.abs(gd).max()) > 0
    assert float(jnp.abs(gs).max()) == 0.0  # E(I_s) is a constant target
    # Gradients stay finite for a degenerate (all-zero) decoded image.
    g0 = jax.grad(lambda d: losses.cross_identity_loss(_embed, d, src))(jnp.zeros_like(src))
    assert _finite(g0)
    with pytest.raises(ValueError, match="batch sizes"):
        losses.cross_identity_loss(_embed, decoded[:2], src)


def test_spread_loss_hinges_each_dimensions_std():
    rng = np.random.default_rng(0)
    # Column stds 2, 0.5, 0 (a constant): hinge at 1 -> (0 + 0.5 + 1) / 3.
    z = np.stack([2.0 * np.array([-1, 1, -1, 1]), 0.5 * np.array([1, -1, 1, -1]),
                  np.full(4, 3.0)], axis=1).astype(np.float32)
    np.testing.assert_allclose(losses.spread_loss(jnp.asarray(z), eps=0.0), 1.5 / 3, atol=1e-6)
    spread = jnp.asarray(rng.normal(size=(64, 8)) * 3.0, jnp.float32)
    assert float(losses.spread_loss(spread)) < 1e-3
    # The gradient pushes a collapsed code apart (and is finite at std 0 thanks to eps).
    grad = jax.grad(losses.spread_loss)(jnp.asarray(z))
    assert np.all(np.isfinite(np.asarray(grad)))
    assert float(jnp.sum(grad[:, 1] * z[:, 1])) < 0  # d/d(scale) < 0: growing it helps
    with pytest.raises(ValueError, match="N >= 2"):
        losses.spread_loss(jnp.zeros((1, 4)))


def test_cross_correlation_loss_scores_linear_dependence():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(4096, 3))
    independent = rng.normal(size=(4096, 5))
    # Columns of a: a copy of b's first column, its negative, then noise.
    a = np.concatenate([b[:, :1], -2.0 * b[:, :1], independent[:, :2]], axis=1)
    loss = float(fl.cross_correlation_loss(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(loss, 2.0 / 12.0, atol=0.01)  # two of 12 pairs correlate fully
    assert float(fl.cross_correlation_loss(jnp.asarray(independent), jnp.asarray(b))) < 0.01
    # Its gradient removes the dependence: a small step lowers the loss.
    grad = jax.grad(fl.cross_correlation_loss)(jnp.asarray(a[:64]), jnp.asarray(b[:64]))
    before = float(fl.cross_correlation_loss(jnp.asarray(a[:64]), jnp.asarray(b[:64])))
    after = float(fl.cross_correlation_loss(jnp.asarray(a[:64]) - 0.5 * grad,
                                            jnp.asarray(b[:64])))
    assert after < before
    with pytest.raises(ValueError, match="N >= 3"):
        fl.cross_correlation_loss(jnp.zeros((2, 4)), jnp.zeros((2, 3)))


def test_cosine_similarity_rows():
    a = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = jnp.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(fl.cosine_similarity(a, b), [1.0, -1.0, 0.0], atol=1e-6)
