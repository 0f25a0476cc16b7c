"""Stage-1 face latent model: shapes, gradients, warps, parameter annotations and counts.

CPU compile time dominates: the tiny model is initialised and differentiated once (module
fixtures), with "unsafe_rbg" keys, whose jitted init compiles ~3x faster than threefry's.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from configs.common import ConfigError
from vasa_jax.models import discriminator, face_latent, layers, warping
from vasa_jax.ops.grid_sample import identity_grid
from vasa_jax.parallel import sharding

B = 2


def _key(seed=0):
    return jax.random.key(seed, impl="unsafe_rbg")


def _images(seed, size):
    return jax.random.uniform(jax.random.key(seed), (B, size, size, 3), minval=-1.0, maxval=1.0)


def _create(ctor):
    """Jitted init of any module (eager init dispatches every initializer op separately)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: ctor(nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.jit(lambda k: nnx.state(ctor(nnx.Rngs(k))))(_key()))


@pytest.fixture(scope="module")
def cfg():
    return configs.load("configs/face_latent.py:size=tiny").model


@pytest.fixture(scope="module")
def model(cfg):
    return face_latent.create_model(cfg, _key())


@pytest.fixture(scope="module")
def trained_step(cfg, model):
    """One jitted forward + gradient of an L1 reconstruction loss (source -> driving)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    source, driving = _images(1, cfg.image_size), _images(2, cfg.image_size)

    @jax.jit
    def step(params, source, driving):
        def loss_fn(params):
            out = nnx.merge(graphdef, params, rest)(source, driving)
            return jnp.mean(jnp.abs(out - driving)), out

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, out), grads = step(params, source, driving)
    return loss, out, grads


# ----------------------------------------------------------------------------- shapes


def test_tiny_output_shapes(cfg, model):
    images = jax.ShapeDtypeStruct((B, cfg.image_size, cfg.image_size, 3), jnp.float32)
    latent = nnx.eval_shape(lambda m, x: m.encode(x), model, images)
    v = cfg.volume
    assert latent.v_app.shape == (B, v.depth, v.size, v.size, v.channels)
    assert latent.z_id.shape == (B, cfg.id.dim)
    assert latent.z_pose.shape == (B, warping.POSE_DIM)
    assert latent.z_dyn.shape == (B, cfg.motion.dyn_dim)
    z_pose, z_dyn = nnx.eval_shape(lambda m, x: m.encode_motion(x), model, images)
    assert (z_pose.shape, z_dyn.shape) == (latent.z_pose.shape, latent.z_dyn.shape)
    out = nnx.eval_shape(
        lambda m, l: m.decode(l.v_app, l.z_id, l.z_pose, l.z_dyn), model, latent
    )
    assert out.shape == images.shape
    posed = nnx.eval_shape(lambda m, x: m.app_encoder(x), model, images)
    assert posed.shape == latent.v_app.shape  # [B, D, H, W, C] = [2, 8, 16, 16, 16]


def test_bad_inputs_are_clear_errors(cfg, model):
    wrong = jax.ShapeDtypeStruct((B, 32, 32, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"expects images \[B, 64, 64, 3\]"):
        nnx.eval_shape(lambda m, x: m.encode(x), model, wrong)
    v = jax.ShapeDtypeStruct((B, 8, 16, 16, 16), jnp.float32)
    z_id, z_dyn = jnp.zeros((B, cfg.id.dim)), jnp.zeros((B, cfg.motion.dyn_dim))
    bad_pose = jnp.zeros((B, 5))
    with pytest.raises(ValueError, match="z_pose must be"):
        nnx.eval_shape(lambda m, v: m.decode(v, z_id, bad_pose, z_dyn), model, v)
    with pytest.raises(ValueError, match="v_app"):
        bad_volume = jnp.zeros((B, 8, 16, 16, 4))
        nnx.eval_shape(lambda m: m.decode(bad_volume, z_id, bad_pose, z_dyn), model)


# ----------------------------------------------------------------------------- gradients


def test_forward_backward_finite_and_reaches_every_parameter(cfg, trained_step):
    loss, out, grads = trained_step
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert out.shape == (B, cfg.image_size, cfg.image_size, 3)
    assert float(jnp.max(jnp.abs(out))) <= 1.0  # tanh output
    flat = nnx.to_flat_state(grads)
    assert flat
    dead = []
    for path, g in flat:
        g = np.asarray(g[...])
        assert np.all(np.isfinite(g)), path
        if not np.any(g):
            dead.append("/".join(map(str, path)))
    # Every parameter of every encoder / warp / G3D / decoder group gets gradient.
    assert not dead, f"parameters with zero gradient: {dead}"
    groups = {str(path[0]) for path, _ in flat}
    assert groups == {
        "app_encoder", "id_encoder", "motion_encoder", "warp_to_canonical", "g3d", "decoder"
    }


def test_pose_reaches_the_decoder(cfg, model):
    """Only z_pose changes between two decodes: the image must change (and be repeatable)."""
    graphdef, state = nnx.split(model.decoder)
    v = cfg.volume
    keys = jax.random.split(jax.random.key(3), 3)
    v_app = jax.random.normal(keys[0], (B, v.depth, v.size, v.size, v.channels))
    z_id = jax.random.normal(keys[1], (B, cfg.id.dim))
    z_dyn = jax.random.normal(keys[2], (B, cfg.motion.dyn_dim))
    decode = jax.jit(lambda state, z_pose: nnx.merge(graphdef, state)(v_app, z_id, z_pose, z_dyn))
    pose = warping.identity_pose(B)
    turned = pose.at[:, 0].add(0.4).at[:, 3].add(0.2)  # yaw + 23 degrees, shift along x
    same, again, moved = decode(state, pose), decode(state, pose), decode(state, turned)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(again))
    assert float(jnp.mean(jnp.abs(moved - same))) > 1e-4


# ----------------------------------------------------------------------------- warps


def test_detach_angles_blocks_only_the_angle_gradients():
    z = jnp.asarray([[0.1, -0.2, 0.05, 0.01, 0.02, -0.03, 1.1]])
    np.testing.assert_array_equal(warping.detach_angles(z), z)
    grad = jax.grad(lambda z: jnp.sum(warping.detach_angles(z) ** 2))(z)
    np.testing.assert_array_equal(grad[0, :3], 0.0)
    np.testing.assert_allclose(grad[0, 3:], 2 * z[0, 3:])


@pytest.mark.parametrize("pool", ["mean", "flatten"])
def test_motion_encoder_pools(pool):
    """"flatten" feeds the whole final map (C x H x W) to the head, "mean" its average."""
    from vasa_jax.models.face_encoders import ResNetEncoder

    net = ResNetEncoder(image_size=16, input_size=16, stem=4, channels=(8,), blocks=(1,),
                        out_dim=3, groups=2, pool=pool, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    assert net(x).shape == (2, 3)
    assert net.head.in_features == (8 * 4 * 4 if pool == "flatten" else 8)
    with pytest.raises(ValueError, match="pool"):
        ResNetEncoder(image_size=16, input_size=16, stem=4, channels=(8,), blocks=(1,),
                      out_dim=3, groups=2, pool="max", rngs=nnx.Rngs(0))


def _random_poses(seed: int, n: int = 4) -> np.ndarray:
    """[n, 7] poses: angles in [-1, 1] rad, translations in [-0.3, 0.3], scale in [0.8, 1.2]."""
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.uniform(-1, 1, (n, 3)), rng.uniform(-0.3, 0.3, (n, 3)), rng.uniform(0.8, 1.2, (n, 1))],
        axis=1,
    ).astype(np.float32)


def _assert_inverse(fwd, inv):
    """[B, 3, 4] affine matrices that compose to the identity."""
    last_row = np.tile([[[0, 0, 0, 1]]], (len(fwd), 1, 1))
    homog = lambda m: np.concatenate([np.asarray(m), last_row], axis=1)  # noqa: E731
    np.testing.assert_allclose(homog(fwd) @ homog(inv), np.tile(np.eye(4), (len(fwd), 1, 1)),
                               atol=1e-5)


def test_pose_matrices_are_inverse_and_rotations_orthonormal():
    pose = _random_poses(0)
    _assert_inverse(warping.pose_matrix(pose), warping.inverse_pose_matrix(pose))
    rot = np.asarray(warping.rotation_matrix(*pose[:, :3].T))
    eye = np.tile(np.eye(3), (4, 1, 1))
    np.testing.assert_allclose(rot @ np.swapaxes(rot, 1, 2), eye, atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
    # Yaw turns about the vertical (y) axis: x -> (cos, 0, -sin).
    r = np.asarray(warping.rotation_matrix(*jnp.asarray([[0.5], [0.0], [0.0]])))[0]
    np.testing.assert_allclose(r @ [1, 0, 0], [np.cos(0.5), 0, -np.sin(0.5)], atol=1e-6)


def test_pose_rotates_about_the_pivot_behind_the_volume_centre():
    pose = _random_poses(1)
    _assert_inverse(warping.pose_matrix(pose, 1.0), warping.inverse_pose_matrix(pose, 1.0))
    # Without translation and scale the pivot (0, 0, -1) stays where it is, whatever the
    # rotation, while the volume centre swings about it (yaw 0.5: x = sin(0.5)).
    pose[:, 3:6], pose[:, 6] = 0.0, 1.0
    fwd = np.asarray(warping.pose_matrix(pose, 1.0))
    np.testing.assert_allclose(fwd[:, :, :3] @ [0, 0, -1] + fwd[:, :, 3], [[0, 0, -1]] * 4,
                               atol=1e-5)
    yaw = np.asarray(warping.pose_matrix(jnp.asarray([[0.5, 0, 0, 0, 0, 0, 1.0]]), 1.0))[0]
    np.testing.assert_allclose(yaw[:, 3], [np.sin(0.5), 0, np.cos(0.5) - 1], atol=1e-6)


def test_depth_gate_starts_on_a_thin_central_band_and_learns():
    from vasa_jax.models.face_encoders import DepthGate

    gate = DepthGate(8, 8, 0.2, rngs=nnx.Rngs(0))
    volume = jnp.ones((2, 8, 4, 4, 8))
    out = np.asarray(gate(volume))
    assert out.shape == volume.shape
    profile = out[0, :, 0, 0, 0]  # [D]: the untrained gate is the prior
    np.testing.assert_allclose(profile.sum(), 8.0, rtol=1e-4)  # D * softmax sums to D
    assert profile[3] > 3.0 and profile[4] > 3.0, profile  # the two central slices
    assert profile[0] < 1e-3 and profile[-1] < 1e-3, profile
    np.testing.assert_allclose(profile, profile[::-1], rtol=1e-2)  # symmetric about z = 0
    # The per-voxel logits get gradient: the gate can move the surface.
    features = jax.random.normal(jax.random.key(0), volume.shape)  # differ along depth
    weights = jnp.arange(8.0)[None, :, None, None, None]
    grads = nnx.grad(lambda g: jnp.sum(g(features) * weights))(gate)
    assert float(jnp.abs(grads.logit.kernel.get_value()).sum()) > 0


def test_pivot_and_depth_gate_options_reach_the_model():
    cfg = configs.load("configs/face_latent.py:size=tiny", **{
        "model__warp__pivot_depth": 0.5, "model__app__depth_sigma": 0.2}).model
    model = face_latent.abstract_model(cfg)
    assert model.warp_to_canonical.pivot_depth == 0.5
    assert model.decoder.warp.pivot_depth == 0.5
    assert model.app_encoder.depth_gate is not None
    default = face_latent.abstract_model(configs.load("configs/face_latent.py:size=tiny").model)
    assert default.app_encoder.depth_gate is None and default.decoder.warp.pivot_depth == 1.0
    with pytest.raises(ConfigError, match="depth_sigma"):
        configs.load("configs/face_latent.py:size=tiny", model__app__depth_sigma=-1.0)


def test_bound_pose_ranges():
    raw = jnp.asarray([[0.0] * 7, [50.0] * 7, [-50.0] * 7])
    pose = np.asarray(
        warping.bound_pose(raw, max_angles=(1.5, 1.0, 0.7), max_translation=0.5, max_log_scale=0.3)
    )
    np.testing.assert_allclose(pose[0], warping.identity_pose(1)[0])
    np.testing.assert_allclose(pose[1], [1.5, 1.0, 0.7, 0.5, 0.5, 0.5, math.exp(0.3)], rtol=1e-5)
    low = [-1.5, -1.0, -0.7, -0.5, -0.5, -0.5, math.exp(-0.3)]
    np.testing.assert_allclose(pose[2], low, rtol=1e-5)


def test_translation_moves_content_the_intended_way():
    d, h, w = 4, 8, 8
    volume = np.zeros((1, d, h, w, 1), np.float32)
    volume[0, 2, 3, 3, 0] = 1.0
    pose = jnp.asarray([[0, 0, 0, 2 * 2 / w, 0, 0, 1]], jnp.float32)  # tx = 2 voxels

    @jax.jit
    def drive_and_back(volume):
        zero = jnp.zeros((1, d, h, w, 3))
        driven = warping.sample_volume(volume, warping.canonical_to_driving_grid(pose, zero))
        return driven, warping.sample_volume(driven, warping.source_to_canonical_grid(pose, zero))

    driven, back = drive_and_back(jnp.asarray(volume))
    assert np.unravel_index(int(jnp.argmax(driven)), (d, h, w)) == (2, 3, 5)  # moved to +x
    np.testing.assert_allclose(np.asarray(back), volume, atol=1e-6)


@pytest.mark.parametrize("label, voxel, moves", [
    ((20.0, 0.0, 0.0), (6, 4, 4), (0, 0, +1)),  # +yaw: the face (at +z) turns to image right
    ((0.0, 20.0, 0.0), (6, 4, 4), (0, -1, 0)),  # +pitch: the face tilts up (grid y is down)
    ((0.0, 0.0, 20.0), (4, 4, 6), (0, -1, 0)),  # +roll: counter-clockwise, right side up
])
def test_label_angles_move_content_as_synthtalk_renders_them(label, voxel, moves):
    """angles_from_labels maps data_pipeline.schema's pose convention onto the warp's: a
    canonical point driven by a label pose moves the way the renderer moves it."""
    d = h = w = 9
    volume = np.zeros((1, d, h, w, 1), np.float32)
    volume[(0, *voxel, 0)] = 1.0
    angles = warping.angles_from_labels(jnp.asarray([label], jnp.float32))
    pose = jnp.concatenate([angles, jnp.zeros((1, 3)), jnp.ones((1, 1))], axis=-1)
    zero = jnp.zeros((1, d, h, w, 3))
    driven = warping.sample_volume(jnp.asarray(volume), warping.canonical_to_driving_grid(pose, zero))
    grid = np.stack(np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij"), -1)
    mass = np.asarray(driven[0, ..., 0])
    centre = (grid * mass[..., None]).sum((0, 1, 2)) / mass.sum()
    shift = centre - np.asarray(voxel, np.float64)  # (z, y, x) voxels
    for axis, sign in enumerate(moves):
        if sign:
            assert sign * shift[axis] > 0.3, (label, shift)
        else:
            assert abs(shift[axis]) < 0.2, (label, shift)  # the arc: r (1 - cos 20deg)


def _rigid_move(points: np.ndarray, z_src: jax.Array, z_drv: jax.Array, pivot: float):
    """Image points [N, 2] (normalised, y down) on the plane z = 0 of the source volume ->
    where the rigid warps put them in the driving frame (source -> canonical -> driving)."""
    inv = np.asarray(warping.inverse_pose_matrix(z_src, pivot))
    fwd = np.asarray(warping.pose_matrix(z_drv, pivot))
    q = np.concatenate([points, np.zeros((len(points), 1))], axis=1)
    canonical = np.einsum("bij,bj->bi", inv[:, :, :3], q) + inv[:, :, 3]
    return (np.einsum("bij,bj->bi", fwd[:, :, :3], canonical) + fwd[:, :, 3])[:, :2]


def test_label_framing_moves_face_points_as_synthtalk_projects_them():
    """Angles and framing (translation, distance) from labels, rotating about the pivot
    behind the volume centre, move points of a SynthTalk face where the renderer's camera
    shows them: far closer than not moving them, and than the angles alone."""
    from data_pipeline.synthtalk import render

    rng = np.random.default_rng(0)
    n, size, framing = 400, 64, render.FRAMINGS["face"]
    labels = np.stack([rng.uniform(-25, 25, 2 * n), rng.uniform(-15, 15, 2 * n),
                       rng.uniform(-10, 10, 2 * n), rng.uniform(-0.1, 0.1, 2 * n),
                       0.12 + rng.uniform(-0.08, 0.08, 2 * n), np.zeros(2 * n)], 1)
    distance = rng.uniform(0.9, 1.1, 2 * n)
    labels[:, 5] = render.NOMINAL_DISTANCE * distance
    # Head-local points on the face (eyes, mouth), one per pair.
    local = np.array([(-0.35, 0.25, -0.9), (0.35, 0.25, -0.9), (0.0, -0.45, -0.9)])[
        rng.integers(0, 3, n)]
    image = np.stack([
        render.project(np.einsum("nij,nj->ni", np.stack([
            render.rotation_matrix(*lab[:3]) for lab in labels[k::2]]), local)
            + labels[k::2, 3:6], size, "face") / (size / 2) - 1.0 for k in (0, 1)])
    pose = jnp.asarray(labels, jnp.float32)
    angles = warping.angles_from_labels(pose)
    full = jnp.concatenate([angles, warping.framing_from_labels(
        pose, distance, framing.half_extent)], 1)
    angles_only = jnp.concatenate([angles, warping.identity_pose(2 * n)[:, 3:]], 1)
    err = {"none": np.abs(image[1] - image[0]).mean()}
    for name, z in (("angles", angles_only), ("full", full)):
        err[name] = np.abs(_rigid_move(image[0], z[0::2], z[1::2], 1.0) - image[1]).mean()
    assert err["full"] < 0.3 * err["none"] and err["full"] < 0.7 * err["angles"], err


def test_framing_follows_the_loader_jitter():
    """A zoom about the frame centre and a shift move the framing targets the way
    transforms.jitter_boxes moves image points: translation zoom * t + 2 d, scale * zoom."""
    from data_pipeline import transforms

    pose = jnp.asarray([[5.0, 0.0, 0.0, 0.1, 0.2, 7.0]], jnp.float32)
    base = np.asarray(warping.framing_from_labels(pose, np.ones(1), 1.12))
    np.testing.assert_allclose(base[0], [0.1 / 1.12, -0.2 / 1.12, 0.0, 1.0], rtol=1e-6)
    jitter = (1.05, 0.03, -0.02)
    moved = np.asarray(warping.framing_from_labels(pose, np.ones(1), 1.12,
                                                   jnp.asarray([jitter])))
    # The head origin as a degenerate box in [0, 1] image coordinates, moved by the loader.
    x, y = (base[0, 0] + 1) / 2, (base[0, 1] + 1) / 2
    box = transforms.jitter_boxes(np.array([x, y, x, y], np.float32), *jitter)
    np.testing.assert_allclose(moved[0, :2], 2 * box[:2] - 1, atol=1e-5)
    np.testing.assert_allclose(moved[0, 3], 1.05, rtol=1e-6)
    far = np.asarray(warping.framing_from_labels(pose, np.full(1, 1.25), 1.12))
    np.testing.assert_allclose(far[0], [0.1 / 1.4, -0.2 / 1.4, 0.0, 0.8], rtol=1e-5)
    with pytest.raises(ValueError, match="pose labels"):
        warping.framing_from_labels(pose[:, :3], np.ones(1), 1.12)


def test_rigid_round_trip_grids_compose_to_identity():
    """Equal poses, zero flow: grid_sc(grid_cd(p)) = p (the s -> c -> d warp is the identity)."""
    d, h, w = 4, 8, 8
    pose = jnp.asarray([[0.3, -0.2, 0.1, 0.05, -0.1, 0.02, 1.1]])
    zero = jnp.zeros((1, d, h, w, 3))
    grid_cd = jax.jit(warping.canonical_to_driving_grid)(pose, zero)
    theta = np.asarray(warping.pose_matrix(pose))[0]
    composed = np.asarray(grid_cd[0]) @ theta[:, :3].T + theta[:, 3]
    np.testing.assert_allclose(composed, np.asarray(identity_grid(d, h, w)), atol=1e-5)


def test_sample_volume_keeps_a_batch_sharded_volume_sharded():
    """Data parallelism: the per-example gather must not all-gather the volume."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    volume = jax.ShapeDtypeStruct((8, 4, 8, 8, 4), jnp.float32, sharding=spec)
    grid = jax.ShapeDtypeStruct((8, 4, 8, 8, 3), jnp.float32, sharding=spec)
    loss = lambda v, g: jnp.sum(warping.sample_volume(v, g) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(volume, grid).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo


def test_warp_modules_round_trip_with_zero_flow_and_identity_pose(cfg, model):
    """source -> canonical -> driving through the model's own warp generators."""
    to_canonical = nnx.clone(model.warp_to_canonical)  # copies: the fixture stays intact
    to_driving = nnx.clone(model.decoder.warp)
    for warp in (to_canonical, to_driving):
        warp.flow.out.kernel[...] = jnp.zeros_like(warp.flow.out.kernel[...])
        warp.flow.out.bias[...] = jnp.zeros_like(warp.flow.out.bias[...])
    v = cfg.volume
    volume = jax.random.normal(jax.random.key(4), (B, v.depth, v.size, v.size, v.channels))
    pose = warping.identity_pose(B)
    z_dyn = jax.random.normal(jax.random.key(5), (B, cfg.motion.dyn_dim))
    z_id = jax.random.normal(jax.random.key(6), (B, cfg.id.dim))

    @jax.jit
    def round_trip(warps):
        to_canonical, to_driving = nnx.merge(*warps)
        return to_driving(to_canonical(volume, pose, z_dyn, z_id), pose, z_dyn, z_id)

    driven = round_trip(nnx.split((to_canonical, to_driving)))
    np.testing.assert_allclose(np.asarray(driven), np.asarray(volume), atol=1e-5)


# ----------------------------------------------------------------------------- annotations, counts


def _params_and_names(module):
    out = []
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        out.append(("/".join(map(str, path)), var.get_value().shape, names))
    return out


def test_every_param_has_logical_axes_the_conv_rules_know(cfg, model):
    rules = dict(configs.load("configs/face_latent.py:size=tiny").mesh.rules)
    disc = nnx.eval_shape(lambda: discriminator.build_discriminator(cfg, rngs=nnx.Rngs(0)))
    for module in (model, disc):
        entries = _params_and_names(module)
        assert len(entries) >= 20
        for path, shape, names in entries:
            assert names is not None and len(names) == len(shape), (path, names, shape)
            assert all(n is None or n in rules for n in names), (path, names)
            if len(shape) >= 2:  # kernels: at least one sharded-able axis
                assert any(n is not None for n in names), (path, names)
    # The trainer's sharding helper places them on a data x fsdp mesh: big kernels shard.
    devices = np.array(jax.devices()[:8]).reshape(2, 4, 1)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    shardings = sharding.state_shardings(nnx.state(model, nnx.Param), mesh, rules)
    kernel = shardings["decoder"]["generator"]["blocks"][0]["conv1"]["kernel"]
    assert kernel.get_value().spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")


def test_full_parameter_count_is_about_200m():
    full = configs.load("configs/face_latent.py:size=full").model
    counts = face_latent.param_counts(face_latent.abstract_model(full))  # no allocation
    assert 150e6 <= counts["total"] <= 260e6, counts
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


# ----------------------------------------------------------------------------- discriminator


def test_discriminator_outputs_per_scale(cfg):
    x = _images(7, cfg.image_size)
    # Init and forward in one compiled program (the discriminator is used nowhere else).
    outputs = jax.jit(
        lambda k, x: discriminator.build_discriminator(cfg, rngs=nnx.Rngs(k))(x, update_stats=False)
    )(_key(), x)
    assert len(outputs) == cfg.discriminator.scales
    for scale, (logits, features) in enumerate(outputs):
        side = cfg.image_size >> scale
        n = len(cfg.discriminator.channels)
        assert logits.shape == (B, (side >> n) - 2, (side >> n) - 2, 1)
        assert len(features) == n + 1
        assert features[0].shape == (B, side // 2, side // 2, cfg.discriminator.channels[0])
        assert np.all(np.isfinite(np.asarray(logits)))


def test_spectral_norm_power_iteration_is_functional_state():
    conv = _create(lambda r: discriminator.SNConv2D(6, 5, rngs=r))
    u0 = np.asarray(conv.u[...])
    kernel0 = np.asarray(conv.kernel[...])
    conv.sigma(update_stats=False)
    np.testing.assert_array_equal(np.asarray(conv.u[...]), u0)  # eval: state untouched
    graphdef, params, stats = nnx.split(conv, nnx.Param, nnx.BatchStat)

    @jax.jit
    def step(params, stats):
        c = nnx.merge(graphdef, params, stats)
        return c.sigma(update_stats=True), nnx.state(c, nnx.BatchStat)

    for _ in range(30):
        sigma, stats = step(params, stats)
    true_sigma = np.linalg.svd(kernel0.reshape(-1, 5), compute_uv=False)[0]
    np.testing.assert_allclose(float(sigma), true_sigma, rtol=1e-3)
    assert not np.allclose(np.asarray(stats["u"][...]), u0)
    np.testing.assert_array_equal(np.asarray(params["kernel"][...]), kernel0)  # Param stays raw
    # The normalised kernel has spectral norm 1.
    merged = nnx.merge(graphdef, params, stats)
    w = np.asarray(merged.kernel[...]).reshape(-1, 5) / float(merged.sigma(update_stats=False))
    np.testing.assert_allclose(np.linalg.svd(w, compute_uv=False)[0], 1.0, rtol=1e-3)


# ----------------------------------------------------------------------------- layers, config


@pytest.mark.parametrize("stride, padding, kernel", [
    ((1, 1, 1), "SAME", (3, 3, 3)),
    ((1, 2, 2), "SAME", (3, 3, 3)),
    ((1, 1, 1), "VALID", (3, 1, 3)),
    ((1, 1, 1), [(1, 1), (0, 0), (2, 2)], (3, 3, 5)),
    ((1, 1, 1), "SAME", (1, 1, 1)),
])
def test_depth_stacked_conv3d_equals_native_with_gradients(stride, padding, kernel):
    kx, kk = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (2, 5, 6, 8, 4))
    k = jax.random.normal(kk, (*kernel, 4, 3)) * 0.2

    def loss(impl, x, k):
        y = layers.conv3d(x, k, stride, padding, impl=impl)
        return jnp.sum(jnp.sin(y)), y

    (_, y_native), g_native = jax.value_and_grad(
        lambda x, k: loss("native", x, k), argnums=(0, 1), has_aux=True)(x, k)
    (_, y_stacked), g_stacked = jax.value_and_grad(
        lambda x, k: loss("depth_stacked", x, k), argnums=(0, 1), has_aux=True)(x, k)
    assert y_native.shape == y_stacked.shape
    np.testing.assert_allclose(y_stacked, y_native, atol=1e-4)
    for a, b in zip(g_stacked, g_native):
        np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="depth stride 1"):
        layers.conv3d(x, k, (2, 1, 1), "SAME", impl="depth_stacked")


def test_conv3d_auto_picks_for_the_target_platform():
    x, k = jnp.zeros((1, 4, 6, 6, 2)), jnp.zeros((3, 3, 3, 2, 3))

    def conv_ranks():  # ranks of the convolutions' inputs in the traced program
        jaxpr = jax.make_jaxpr(lambda x, k: layers.conv3d(x, k))(x, k)
        return [e.invars[0].aval.ndim for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]

    assert conv_ranks() == [4]  # on this CPU: the depth-stacked 2-D convolution
    with layers.target_platform("tpu"):  # as bench/aot.py traces TPU steps on a CPU host
        assert conv_ranks() == [5]  # one native 3-D convolution
    assert conv_ranks() == [4]  # restored on exit


def test_weight_standardisation_and_group_norm():
    k = jax.random.normal(jax.random.key(0), (3, 3, 8, 4)) * 3 + 1
    s = np.asarray(layers.standardize_kernel(k)).reshape(-1, 4)
    np.testing.assert_allclose(s.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(s.std(0), 1 / np.sqrt(3 * 3 * 8), rtol=1e-3)
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8)) * 5 + 3
    norm = layers.GroupNorm(8, groups=2, rngs=nnx.Rngs(0))
    y = np.asarray(norm(x)).reshape(2, 16, 2, 4)
    np.testing.assert_allclose(y.mean((1, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(y.std((1, 3)), 1, atol=1e-3)


def test_zero_groups_turn_the_normalisation_off_and_keep_the_parameters():
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8)) * 5 + 3
    norm = layers.GroupNorm(8, groups=0, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.arange(8.0)
    norm.bias[...] = jnp.full((8,), 0.5)
    np.testing.assert_allclose(np.asarray(norm(x)), np.asarray(x * jnp.arange(8.0) + 0.5),
                               rtol=1e-6)
    grouped = layers.GroupNorm(8, groups=2, rngs=nnx.Rngs(0))
    assert jax.tree.map(jnp.shape, nnx.state(norm, nnx.Param)) == jax.tree.map(
        jnp.shape, nnx.state(grouped, nnx.Param))
    ada = layers.AdaptiveGroupNorm(8, 3, groups=0, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(ada(x, jnp.zeros((2, 3)))), np.asarray(x),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="groups must be >= 0"):
        layers.GroupNorm(8, groups=-1, rngs=nnx.Rngs(0))


def test_motion_encoder_dyn_groups_changes_only_the_dynamics_net():
    import configs
    from vasa_jax.models import face_latent

    # tiny has no GroupNorm by default (model.groups=0): switch it on to see dyn_groups act.
    cfg = configs.load("configs/face_latent.py:size=tiny", model__groups=4,
                       model__motion__dyn_groups=0).model
    enc = face_latent.motion_encoder(cfg, rngs=nnx.Rngs(0))
    dyn_norms = [m for _, m in nnx.iter_graph(enc.dyn_net) if isinstance(m, layers.GroupNorm)]
    pose_norms = [m for _, m in nnx.iter_graph(enc.pose_net) if isinstance(m, layers.GroupNorm)]
    assert dyn_norms and all(m.groups == 0 for m in dyn_norms)
    assert pose_norms and all(m.groups == min(cfg.groups, m.channels) for m in pose_norms)
    default = face_latent.motion_encoder(
        configs.load("configs/face_latent.py:size=tiny", model__groups=4).model,
        rngs=nnx.Rngs(0))
    assert default.dyn_net.norm.groups == 4
    assert default.dyn_net.norm.groups == enc.pose_net.norm.groups
    # Same parameter tree either way: a pre-trained pose net or checkpoint still loads.
    assert jax.tree.map(jnp.shape, nnx.state(default, nnx.Param)) == jax.tree.map(
        jnp.shape, nnx.state(enc, nnx.Param))
    x = jax.random.uniform(jax.random.key(0), (2, cfg.image_size, cfg.image_size, 3), minval=-1)
    z_pose, z_dyn = enc(x)
    assert z_pose.shape == (2, 7) and z_dyn.shape == (2, cfg.motion.dyn_dim)


def test_glimpse_image_zooms_on_each_region_centre():
    from vasa_jax.models.face_encoders import glimpse_image

    s = 64
    # x and y ramps in the first two channels: a band's pixel shows where it was sampled.
    ramp = (np.arange(s) + 0.5) / s
    img = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 0.0 * ramp[None, :]), -1)
    images = jnp.asarray(np.stack([img, img])[..., :3], jnp.float32)
    centres = jnp.asarray([[[0.5, 0.3], [0.5, 0.7]], [[0.3, 0.35], [0.6, 0.65]]], jnp.float32)
    widths = (0.5, 0.25)
    out = np.asarray(glimpse_image(images, centres, widths))
    assert out.shape == (2, s, s, 3)
    rows = s // 2
    for b in range(2):
        for k, width in enumerate(widths):
            band = out[b, k * rows:(k + 1) * rows]
            cx, cy = np.asarray(centres[b, k])
            # The band's middle is the region centre; its extent is the requested window.
            np.testing.assert_allclose(band[rows // 2 - 1:rows // 2 + 1, s // 2 - 1:s // 2 + 1,
                                            :2].mean(axis=(0, 1)), [cx, cy], atol=1e-3)
            np.testing.assert_allclose(band[0, -1, 0] - band[0, 0, 0],
                                       width * (s - 1) / s, atol=2e-3)
            np.testing.assert_allclose(band[-1, 0, 1] - band[0, 0, 1],
                                       0.5 * width * (rows - 1) / rows, atol=2e-3)
    with pytest.raises(ValueError, match="centres"):
        glimpse_image(images, centres[:, :1], widths)


def test_glimpse_angle_reads_a_rolled_synthtalk_face_upright():
    """glimpse_image's angle = z_pose's roll (warping's convention, from the labels): the
    glimpses of a head rolled by +-15 degrees then match the upright head's; the opposite
    angle and no angle do not."""
    from data_pipeline.synthtalk.identity import sample_identity
    from data_pipeline.synthtalk.render import HeadRenderer, neutral_frame
    from vasa_jax.models.face_encoders import GLIMPSE_REGIONS, glimpse_image

    renderer = HeadRenderer(sample_identity(0, 1), 64)
    widths = (0.65, 0.4)

    def view(roll_deg):
        frame = neutral_frame()
        frame["pose"][2] = roll_deg
        boxes = renderer.boxes(frame)
        centres = [[(boxes[f"{r}_box"][0] + boxes[f"{r}_box"][2]) / 2,
                    (boxes[f"{r}_box"][1] + boxes[f"{r}_box"][3]) / 2] for r in GLIMPSE_REGIONS]
        image = renderer.render(frame).astype(np.float32) / 127.5 - 1.0
        angle = warping.angles_from_labels(jnp.asarray(frame["pose"])[None])[:, 2]
        return jnp.asarray(image)[None], jnp.asarray(centres, jnp.float32)[None], angle

    image, centres, _ = view(0.0)
    upright = glimpse_image(image, centres, widths)
    for roll in (15.0, -15.0):
        image, centres, angle = view(roll)
        err = {name: float(jnp.mean(jnp.abs(glimpse_image(image, centres, widths, a) - upright)))
               for name, a in (("aligned", angle), ("opposite", -angle), ("none", None))}
        assert err["aligned"] < 0.6 * err["none"] < 0.6 * err["opposite"], err


def test_motion_encoder_glimpses_read_only_the_located_regions():
    cfg = configs.load("configs/face_latent.py:size=tiny",
                       model__motion__glimpse_widths=(0.5, 0.25)).model
    enc = face_latent.motion_encoder(cfg, rngs=nnx.Rngs(0))
    # The pose net also outputs the eye and mouth centres.
    assert enc.pose_net.head.out_features == warping.POSE_DIM + 4
    s = cfg.image_size
    x = jax.random.uniform(jax.random.key(0), (2, s, s, 3), minval=-1)
    z_pose, z_dyn = enc(x)
    centres = enc.landmarks(x)
    assert z_pose.shape == (2, 7) and z_dyn.shape == (2, cfg.motion.dyn_dim)
    assert centres.shape == (2, 2, 2)
    assert bool(jnp.all((centres > 0) & (centres < 1)))
    np.testing.assert_allclose(enc.dynamics(x, centres), z_dyn, rtol=1e-5, atol=1e-5)
    # Fixed centres: pixels outside both windows do not reach z_dyn; inside they do.
    c = jnp.asarray([[[0.5, 0.3], [0.5, 0.75]]] * 2, jnp.float32)
    far = x.at[:, :, :4].set(1.0)  # the left 4 columns: outside both windows
    np.testing.assert_allclose(enc.dynamics(far, c), enc.dynamics(x, c), atol=1e-6)
    mouth = x.at[:, 46:50, 28:36].set(1.0)  # inside the mouth window
    assert float(jnp.max(jnp.abs(enc.dynamics(mouth, c) - enc.dynamics(x, c)))) > 1e-4
    with pytest.raises(ValueError, match="glimpse_widths"):
        face_latent.motion_encoder(configs.load("configs/face_latent.py:size=tiny").model,
                                   rngs=nnx.Rngs(0)).landmarks(x)
    # glimpse_roll: the same parameters; the glimpses turn with z_pose's roll.
    rolled = face_latent.motion_encoder(
        configs.load("configs/face_latent.py:size=tiny", model__motion__glimpse_widths=(0.5, 0.25),
                     model__motion__glimpse_roll=True).model, rngs=nnx.Rngs(0))
    z_pose_r, z_dyn_r = rolled(x)
    np.testing.assert_allclose(z_pose_r, z_pose, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rolled.dynamics(x), z_dyn_r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rolled.dynamics(x, centres, z_pose[:, 2]), z_dyn_r,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rolled.dynamics(x, centres, jnp.zeros(2)), z_dyn,
                               rtol=1e-5, atol=1e-5)


def test_dyn_split_gives_each_region_its_own_half_of_z_dyn():
    """dyn_split: z_dyn = [eyes code, mouth code]; a change inside the mouth window moves
    only the mouth half, one inside the eye window only the eyes half."""
    cfg = configs.load("configs/face_latent.py:size=tiny", model__motion__glimpse_widths=(0.5, 0.25),
                       model__motion__dyn_split=True).model
    enc = face_latent.motion_encoder(cfg, rngs=nnx.Rngs(0))
    assert len(enc.dyn_net) == 2
    half = cfg.motion.dyn_dim // 2
    assert all(net.head.out_features == half for net in enc.dyn_net)
    s = cfg.image_size
    x = jax.random.uniform(jax.random.key(0), (2, s, s, 3), minval=-1)
    z_pose, z_dyn = enc(x)
    assert z_dyn.shape == (2, cfg.motion.dyn_dim)
    c = jnp.asarray([[[0.5, 0.3], [0.5, 0.75]]] * 2, jnp.float32)
    base = enc.dynamics(x, c)
    mouth = enc.dynamics(x.at[:, 46:50, 28:36].set(1.0), c) - base
    eyes = enc.dynamics(x.at[:, 18:21, 24:40].set(1.0), c) - base
    np.testing.assert_allclose(mouth[:, :half], 0.0, atol=1e-6)
    np.testing.assert_allclose(eyes[:, half:], 0.0, atol=1e-6)
    assert float(jnp.max(jnp.abs(mouth[:, half:]))) > 1e-4
    assert float(jnp.max(jnp.abs(eyes[:, :half]))) > 1e-4
    # Each half is its own net on its own glimpse (stretched to the input square).
    from vasa_jax.models.face_encoders import glimpse_image
    np.testing.assert_allclose(base[:, half:], enc.dyn_net[1](glimpse_image(x, c[:, 1:], (0.25,))),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(model__motion__dyn_split=True),
                                       dict(model__motion__dyn_split=True,
                                            model__motion__glimpse_widths=(0.5, 0.25),
                                            model__motion__dyn_dim=15)])
def test_dyn_split_is_validated(overrides):
    with pytest.raises(ConfigError, match="dyn_split"):
        configs.load("configs/face_latent.py:size=tiny", **overrides)


@pytest.mark.parametrize("widths", [(0.5,), (0.0, 0.5), (0.5, 1.5)])
def test_glimpse_widths_are_validated(widths):
    with pytest.raises(ConfigError, match="glimpse_widths"):
        configs.load("configs/face_latent.py:size=tiny", model__motion__glimpse_widths=widths)


def test_dyn_modulation_routes_z_dyn_through_g2d():
    """decoder.dyn_modulation: G2D's norms are adaptive on z_dyn, so z_dyn reaches the pixels
    even when the warp ignores it (its flow generator's cond projection zeroed here)."""
    from vasa_jax.models import face_decoder

    cfg = configs.load("configs/face_latent.py:size=tiny",
                       model__decoder__dyn_modulation=True).model
    model = face_latent.FaceLatentModel(cfg, rngs=nnx.Rngs(0))
    g2d_norms = [m for _, m in nnx.iter_graph(model.decoder.generator)
                 if isinstance(m, layers.AdaptiveGroupNorm)]
    assert len(g2d_norms) == 2 * (cfg.decoder.blocks + len(cfg.decoder.up_channels))
    assert all(m.proj.in_features == cfg.motion.dyn_dim for m in g2d_norms)
    for _, m in nnx.iter_graph(model.decoder.warp):  # the warp no longer sees z_dyn
        if isinstance(m, layers.Dense):
            m.kernel[...] = jnp.zeros_like(m.kernel[...])
    v = cfg.volume
    keys = jax.random.split(jax.random.key(0), 3)
    v_app = jax.random.normal(keys[0], (B, v.depth, v.size, v.size, v.channels))
    z_id = jax.random.normal(keys[1], (B, cfg.id.dim))
    z_dyn = jax.random.normal(keys[2], (B, cfg.motion.dyn_dim))
    pose = warping.identity_pose(B)
    a = model.decode(v_app, z_id, pose, z_dyn)
    b = model.decode(v_app, z_id, pose, -z_dyn)
    assert float(jnp.mean(jnp.abs(a - b))) > 1e-4
    plain = face_decoder.ImageGenerator(channels=8, blocks=1, up_channels=(4,), groups=0,
                                        rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cond_dim=None"):
        plain(jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 3)))


def test_expression_volume_puts_z_dyn_where_its_basis_is():
    """decoder.dyn_volume_channels: z_dyn becomes E extra canonical-space channels, a linear
    map (one basis volume per z_dyn dimension) that the driving warp moves with the head."""
    cfg = configs.load("configs/face_latent.py:size=tiny",
                       model__decoder__dyn_volume_channels=4).model
    model = face_latent.FaceLatentModel(cfg, rngs=nnx.Rngs(0))
    v = cfg.volume
    expr = model.decoder.expression
    z = jax.random.normal(jax.random.key(1), (B, cfg.motion.dyn_dim))
    vol = expr(z)
    assert vol.shape == (B, v.depth, v.size, v.size, 4)
    # Linear in z_dyn (plus the bias volume).
    np.testing.assert_allclose(expr(2 * z) - expr(z), expr(z) - expr(0 * z), atol=1e-5)
    counts = face_latent.param_counts(model)
    assert counts["decoder.expression"] == (cfg.motion.dyn_dim + 1) * v.depth * v.size**2 * 4
    assert model.decoder.projection.conv.in_channels == (v.channels + 4) * v.depth
    for _, m in nnx.iter_graph(model.decoder.warp):  # the warp no longer sees z_dyn
        if isinstance(m, layers.Dense):
            m.kernel[...] = jnp.zeros_like(m.kernel[...])
    keys = jax.random.split(jax.random.key(0), 2)
    v_app = jax.random.normal(keys[0], (B, v.depth, v.size, v.size, v.channels))
    z_id = jax.random.normal(keys[1], (B, cfg.id.dim))
    pose = warping.identity_pose(B)
    a = model.decode(v_app, z_id, pose, z)
    assert float(jnp.mean(jnp.abs(a - model.decode(v_app, z_id, pose, -z)))) > 1e-4
    # Only where a basis is non-zero: zero every basis outside one 4x4 patch of the volume.
    kernel = model.decoder.expression.dense.kernel
    mask = np.zeros((v.depth, v.size, v.size, 4), np.float32)
    mask[:, 10:14, 6:10] = 1.0
    kernel[...] = kernel[...] * jnp.asarray(mask.reshape(1, -1))
    diff = np.abs(np.asarray(model.decode(v_app, z_id, pose, z)
                             - model.decode(v_app, z_id, pose, -z))).mean(axis=(0, 3))
    scale = cfg.image_size // v.size
    inside = diff[10 * scale:14 * scale, 6 * scale:10 * scale].mean()
    assert inside > 5 * diff[:4 * scale, :4 * scale].mean() + 1e-7


def test_adaptive_group_norm_depends_on_condition():
    ada = layers.AdaptiveGroupNorm(8, 3, groups=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
    a = ada(x, jnp.zeros((2, 3)))
    b = ada(x, jnp.ones((2, 3)))
    plain = layers._group_normalize(x, 2, 1e-5)
    np.testing.assert_allclose(np.asarray(a), np.asarray(plain), atol=1e-5)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_resblock_bf16_compute_and_remat_gradients_match():
    x = jax.random.normal(jax.random.key(1), (1, 4, 8, 8, 8))
    half = layers.ResBlock(8, 16, ndim=3, groups=4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    plain = layers.ResBlock(8, 8, ndim=3, down=(2, 2, 2), groups=4, rngs=nnx.Rngs(0))
    remat = layers.ResBlock(8, 8, ndim=3, down=(2, 2, 2), groups=4, remat=True, rngs=nnx.Rngs(0))

    @jax.jit
    def run(blocks):
        graphdef, state = nnx.split(blocks)
        loss = lambda s: sum(jnp.sum(b(x) ** 2) for b in nnx.merge(graphdef, s)[1:])  # noqa: E731
        return nnx.merge(graphdef, state)[0](x), jax.grad(loss)(state)

    y, grads = run(nnx.List([half, plain, remat]))
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 4, 8, 8, 16)
    assert half.conv1.kernel[...].dtype == jnp.float32  # params stay float32
    for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[2])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(a))))


@pytest.mark.parametrize("down", [None, (2, 2)])
def test_resblock_resampling_matches_the_textbook_order(down):
    """The skip and norm run before the upsampling (they commute with it): the block must
    still equal upsample -> [norm, relu, conv] x 2 + skip(upsampled x), or the pooled form."""
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
    cond = jax.random.normal(jax.random.key(2), (2, 3))
    up = None if down else (2, 2)
    block = layers.ResBlock(8, 12, ndim=2, groups=4, cond_dim=3, up=up, down=down,
                            rngs=nnx.Rngs(0))
    h = layers.upsample_nearest(x, up) if up else x
    pre = lambda n, t: layers.relu(n(t, cond))  # noqa: E731
    main = block.conv1(pre(block.norm1, h))
    skip = block.skip(layers.avg_pool(h, down) if down else h)
    main = layers.avg_pool(main, down) if down else main
    expected = block.conv2(pre(block.norm2, main)) + skip
    np.testing.assert_allclose(np.asarray(block(x, cond)), np.asarray(expected), atol=1e-4)


def test_resblock_conv_before_up_runs_the_first_conv_at_the_input_resolution():
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
    block = layers.ResBlock(8, 12, ndim=2, groups=4, up=(2, 2), conv_before_up=True,
                            rngs=nnx.Rngs(0))
    late = layers.ResBlock(8, 12, ndim=2, groups=4, up=(2, 2), rngs=nnx.Rngs(0))
    h = layers.upsample_nearest(block.conv1(layers.relu(block.norm1(x))), (2, 2))
    expected = (block.conv2(layers.relu(block.norm2(h)))
                + layers.upsample_nearest(block.skip(x), (2, 2)))
    y = block(x)
    assert y.shape == (2, 8, 8, 12)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), atol=1e-4)
    # Same parameters, a different function: the first conv's place matters.
    assert float(jnp.max(jnp.abs(y - late(x)))) > 1e-3
    # Reaches the decoder from the config.
    cfg = configs.load("configs/face_latent.py:size=tiny",
                       model__decoder__conv_before_up=True).model
    assert face_latent.create_model(cfg, 0).decoder.generator.up_blocks[0].conv_before_up


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(model__decoder__up_channels=(32,)), "decoder.up_channels"),
        (dict(model__volume__size=8), "app.channels"),
        (dict(model__g3d__channels=(16, 32, 64, 128, 256)), "g3d.channels"),
        (dict(model__dtype="float16"), "model.dtype"),
        (dict(model__groups=3), "divisible by model.groups"),
        (dict(model__motion__max_angles_deg=(90.0, 60.0)), "max_angles_deg"),
        (dict(model__motion__pool="max"), "model.motion.pool"),
    ],
)
def test_model_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        configs.load("configs/face_latent.py:size=tiny", **overrides)
