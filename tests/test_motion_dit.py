"""The motion diffusion transformer: shapes, size, logical axes, condition dropping, CFG, and
one-window sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from vasa_jax import diffusion, motion_sampler
from vasa_jax.models import motion_dit as md
from vasa_jax.parallel import sharding

DM, DA, B = 5, 12, 2


def small_config(context=3, window=8, **model):
    c = configs.load("configs/motion_dit.py:size=tiny", data__window=window,
                     data__context=context)
    c.unlock()
    c.model.update({**dict(layers=2, width=32, heads=2, dropout=0.2), **model})
    c.model.audio_encoder.hidden = 16
    return c


@pytest.fixture(scope="module")
def cfg():
    return small_config()


def build(model_cfg):
    """A MotionDiT created by one jitted init (eager init runs op by op: slow on CPU)."""
    create = lambda: md.MotionDiT(model_cfg, DM, DA, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef = nnx.graphdef(nnx.eval_shape(create))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(create()))())


class Jitted:
    """model(x_t, t, cond, **kw) through one cached jax.jit (the tests call it many times)."""

    def __init__(self, model):
        self.module = model
        self.graphdef, self.state = nnx.split(model)
        self._fn = jax.jit(lambda state, x, t, cond, rng, det: nnx.merge(self.graphdef, state)(
            x, t, cond, deterministic=det, rng=rng), static_argnums=5)

    def __call__(self, x_t, t, cond, *, deterministic=True, rng=None):
        return self._fn(self.state, x_t, t, cond, rng, deterministic)


@pytest.fixture(scope="module")
def model(cfg):
    return build(cfg.model)


@pytest.fixture(scope="module")
def fast(model):
    return Jitted(model)


def conditions(seed, context=3, window=8, batch=B):
    r = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
    return md.make_conditions(n(batch, window, DA), audio_pre=n(batch, context, DA),
                              motion_pre=n(batch, context, DM), motion_dim=DM,
                              gaze=n(batch, 2), distance=n(batch, 1),
                              emotion=jnp.abs(n(batch, 8)))


def inputs(seed=0, window=8, batch=B):
    x_t = jax.random.normal(jax.random.key(seed), (batch, window, DM))
    return x_t, jnp.arange(batch, dtype=jnp.int32) * 300


def test_output_shape_and_input_checks(model, fast):
    cond = conditions(0)
    x_t, t = inputs()
    out = fast(x_t, t, cond)
    assert out.shape == (B, 8, DM) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and float(jnp.std(out)) > 0
    # The output depends on the noisy input and on t.
    assert not np.allclose(out, fast(x_t + 1.0, t, cond))
    assert not np.allclose(out, fast(x_t, t + 100, cond))
    with pytest.raises(ValueError, match="x_t must be"):
        model(x_t[:, :5], t, cond)
    with pytest.raises(ValueError, match="'audio' has shape"):
        model(x_t, t, {**cond, "audio": cond["audio"][:, :4]})
    with pytest.raises(ValueError, match="lack 'keep_gaze'"):
        model(x_t, t, {k: v for k, v in cond.items() if k != "keep_gaze"})


def test_dropout_only_in_training_mode(fast):
    m = fast
    cond, (x_t, t) = conditions(0), inputs()
    np.testing.assert_array_equal(m(x_t, t, cond), m(x_t, t, cond))
    a = m(x_t, t, cond, deterministic=False, rng=jax.random.key(0))
    b = m(x_t, t, cond, deterministic=False, rng=jax.random.key(1))
    assert not np.allclose(a, b) and not np.allclose(a, m(x_t, t, cond))
    with pytest.raises(ValueError, match="needs `rng`"):
        m(x_t, t, cond, deterministic=False)


@pytest.mark.parametrize("name, keys", [
    ("audio", ("audio",)), ("gaze", ("gaze",)), ("distance", ("distance",)),
    ("emotion", ("emotion",)), ("pre", ("audio_pre", "motion_pre")),
])
def test_dropped_condition_is_ignored_and_kept_condition_matters(fast, name, keys):
    x_t, t = inputs()
    cond, other = conditions(0), conditions(1)
    changed = {**cond, **{k: other[k] for k in keys}}
    # Kept: changing the input changes the output.
    assert not np.allclose(fast(x_t, t, cond), fast(x_t, t, changed), atol=1e-5)
    # Dropped: the output no longer depends on it (bitwise: null embeddings replace it).
    dropped, dropped_changed = md.drop_condition(cond, name), md.drop_condition(changed, name)
    np.testing.assert_array_equal(fast(x_t, t, dropped), fast(x_t, t, dropped_changed))
    assert not np.allclose(fast(x_t, t, dropped), fast(x_t, t, cond), atol=1e-5)
    # Masks are per example: dropping for row 0 only leaves row 1 as it was.
    half = {**cond, md.KEEP_KEYS[name]: jnp.array([False, True])}
    out_half, out_full = fast(x_t, t, half), fast(x_t, t, cond)
    np.testing.assert_allclose(out_half[1], out_full[1], atol=1e-5)
    np.testing.assert_allclose(out_half[0], fast(x_t, t, dropped)[0], atol=1e-5)


def test_no_context_window():
    c = small_config(context=0)
    m = build(c.model)
    assert m.pos_embed.shape == (md.NUM_CONDITION_TOKENS + 8, 32)
    cond = md.make_conditions(conditions(0)["audio"], motion_dim=DM, context=0)
    assert cond["audio_pre"].shape == (B, 0, DA) and not cond["keep_pre"].any()
    out = Jitted(m)(*inputs(), cond)
    assert out.shape == (B, 8, DM) and np.all(np.isfinite(out))


def test_full_config_has_about_29m_parameters():
    full = configs.load("configs/motion_dit.py:size=full")
    assert (full.model.layers, full.model.width, full.model.heads) == (8, 512, 8)
    for audio_dim in (320, 768):  # log-mel (4 x 80) and Wav2Vec2-base features
        counts = md.param_counts(md.abstract_model(full.model, 13, audio_dim))
        assert 25e6 <= counts["total"] <= 35e6, counts
        assert counts["audio_encoder"] > 0.5e6 and counts["transformer"] > 20e6


def test_every_param_has_logical_axes_the_transformer_rules_know(model, cfg):
    rules = dict(cfg.mesh.rules)
    entries = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert len(entries) > 40
    for path, var in entries:
        names = sharding.variable_axes(var)
        shape = var.get_value().shape
        assert names is not None and len(names) == len(shape), (path, names, shape)
        assert all(n is None or n in rules for n in names), (path, names)
        if len(shape) >= 2:
            assert any(n is not None for n in names), (path, names)
    # Tensor parallelism splits attention heads and MLP hidden units, fsdp the width.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2),
                             ("data", "fsdp", "tensor"))
    shardings = sharding.state_shardings(nnx.state(model, nnx.Param), mesh, cfg.mesh.rules)
    spec = lambda s: s.get_value().spec  # noqa: E731
    P = jax.sharding.PartitionSpec
    assert spec(shardings["blocks"][0]["attn"]["qkv"]["kernel"]) == P("fsdp", None, "tensor", None)
    assert spec(shardings["blocks"][0]["mlp_in"]["kernel"]) == P("fsdp", "tensor")


def test_guided_x0_is_the_cfg_formula_in_one_batched_call(model, fast, monkeypatch):
    cond = conditions(0)
    cond["keep_emotion"] = jnp.array([True, False])  # a condition already dropped for a row
    x_t, t = inputs()
    scales = {"audio": 0.5, "gaze": 1.0, "pre": 0.25, "distance": 0.0}
    full = fast(x_t, t, cond)
    expected = (1 + 0.5 + 1.0 + 0.25) * full
    for name, scale in (("audio", 0.5), ("gaze", 1.0), ("pre", 0.25)):
        expected = expected - scale * fast(x_t, t, md.drop_condition(cond, name))

    batch_sizes = []
    original = md.MotionDiT.__call__

    def counting(self, x, *args, **kwargs):
        batch_sizes.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(md.MotionDiT, "__call__", counting)
    guided = jax.jit(lambda x, t, c: md.guided_x0(model, x, t, c, scales))(x_t, t, cond)
    assert batch_sizes == [4 * B]  # full + 3 guided conditions, one call
    np.testing.assert_allclose(guided, expected, rtol=1e-4, atol=1e-4)
    unguided = jax.jit(lambda x, t, c: md.guided_x0(model, x, t, c, {"gaze": 0.0}))
    np.testing.assert_allclose(unguided(x_t, t, cond), full, atol=1e-5)
    with pytest.raises(ValueError, match="unknown guidance conditions"):
        md.guided_x0(model, x_t, t, cond, {"lips": 1.0})


def test_sample_window_shape_and_determinism(model):
    cond = conditions(0)
    schedule = diffusion.make_schedule("cosine", 100)
    graphdef, state = nnx.split(model)

    @jax.jit
    def sample(state, cond, key):
        m = nnx.merge(graphdef, state)
        return motion_sampler.sample_window(m, cond, key, schedule=schedule,
                                            num_sample_steps=4)

    a = sample(state, cond, jax.random.key(0))
    assert a.shape == (B, 8, DM) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, sample(state, cond, jax.random.key(0)))
    assert not np.allclose(a, sample(state, cond, jax.random.key(1)))
    # Guidance changes the result; no guidance is a plain conditional sample.
    plain = jax.jit(lambda c, k: motion_sampler.sample_window(
        model, c, k, schedule=schedule, num_sample_steps=4, guidance={}))(cond, jax.random.key(0))
    assert not np.allclose(a, plain, atol=1e-5)



def test_normalize_inputs_zeroes_padding_and_missing_context():
    stats = {"motion_mean": np.float32([1.0, 2.0]), "motion_std": np.float32([2.0, 4.0]),
             "audio_mean": np.float32([3.0]), "audio_std": np.float32([0.5]),
             "gaze_mean": np.float32([1.0, -1.0]), "gaze_std": np.float32([2.0, 2.0]),
             "distance_mean": np.float32([1.0]), "distance_std": np.float32([0.1])}
    b, w, k = 2, 4, 2
    raw = {"motion": np.full((b, w, 2), 3.0, np.float32),
           "motion_pre": np.full((b, k, 2), 5.0, np.float32),
           "audio": np.full((b, w, 1), 4.0, np.float32),
           "audio_pre": np.full((b, k, 1), 2.0, np.float32),
           "gaze": np.float32([[3.0, 3.0]] * b), "distance": np.float32([[1.2]] * b),
           "emotion": np.eye(8, dtype=np.float32)[:b],
           "valid": np.arange(w)[None].repeat(b, 0) < np.array([[4], [3]]),
           "has_pre": np.array([True, False])}
    out = jax.device_get(md.normalize_inputs(raw, stats))
    np.testing.assert_allclose(out["motion"][0], [[1.0, 0.25]] * w, rtol=1e-6)
    np.testing.assert_allclose(out["audio"][1, :3, 0], [2.0] * 3, rtol=1e-6)
    assert np.all(out["audio"][1, 3] == 0) and np.all(out["motion"][1, 3] == 0)  # padding
    np.testing.assert_allclose(out["motion_pre"][0], [[2.0, 0.75]] * k, rtol=1e-6)
    np.testing.assert_allclose(out["audio_pre"][0, :, 0], [-2.0] * k, rtol=1e-6)
    assert np.all(out["motion_pre"][1] == 0) and np.all(out["audio_pre"][1] == 0)  # no context
    np.testing.assert_allclose(out["gaze"], [[1.0, 2.0]] * b, rtol=1e-6)
    np.testing.assert_allclose(out["distance"], [[2.0]] * b, rtol=1e-5)
    np.testing.assert_array_equal(out["emotion"], raw["emotion"])
    back = md.denormalize_motion(out["motion"][0], stats)
    np.testing.assert_allclose(back, raw["motion"][0], rtol=1e-6)
    keep = {c: np.array([True, False]) for c in md.CONDITIONS}
    cond = md.model_conditions(out, keep)
    md.check_conditions(cond, b, w, k, 2, 1)
    with pytest.raises(ValueError, match="keep masks missing"):
        md.model_conditions(out, {"audio": keep["audio"]})
