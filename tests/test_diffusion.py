"""vasa_jax.diffusion: schedules, forward noising, DDIM steps and the sampling loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vasa_jax import diffusion


@pytest.mark.parametrize("kind", diffusion.SCHEDULES)
@pytest.mark.parametrize("steps", [10, 1000])
def test_schedule_is_monotone_and_spans_clean_to_noise(kind, steps):
    s = diffusion.make_schedule(kind, steps)
    abar = np.asarray(s.alphas_cumprod)
    assert s.num_steps == steps and abar.shape == (steps,) and abar.dtype == np.float32
    assert np.all(np.diff(abar) < 0), "alphas_cumprod must decrease strictly"
    assert np.all((abar > 0) & (abar < 1))
    assert np.all((np.asarray(s.betas) > 0) & (np.asarray(s.betas) <= diffusion.MAX_BETA))
    if steps == 1000:  # the first step is nearly clean, the last nearly pure noise
        assert abar[0] > 0.999 and abar[-1] < 1e-3
    np.testing.assert_allclose(np.square(s.sqrt_alphas_cumprod), abar, rtol=1e-5)
    np.testing.assert_allclose(np.square(s.sqrt_one_minus_alphas_cumprod), 1 - abar,
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.cumprod(1 - np.asarray(s.betas, np.float64)), abar,
                               rtol=1e-4)


def test_cosine_schedule_matches_nichol_dhariwal():
    s = diffusion.make_schedule("cosine", 1000)
    t = np.array([0, 250, 500, 750])
    f = lambda u: np.cos((u / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod)[t], f(t + 1) / f(0), rtol=1e-4)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        diffusion.make_schedule("quadratic", 100)
    with pytest.raises(ValueError, match=">= 2 steps"):
        diffusion.make_schedule("cosine", 1)
    with pytest.raises(ValueError, match="num_sample_steps"):
        diffusion.ddim_timesteps(10, 11)


def test_q_sample_statistics():
    s = diffusion.make_schedule("cosine", 1000)
    n = 200_000
    x0 = jnp.full((n, 1), 2.0)
    for t in (0, 300, 700, 999):
        noise = jax.random.normal(jax.random.key(t), x0.shape)
        xt = np.asarray(diffusion.q_sample(s, x0, jnp.full((n,), t), noise))
        abar = float(s.alphas_cumprod[t])
        assert abs(xt.mean() - 2.0 * np.sqrt(abar)) < 0.01
        assert abs(xt.std() - np.sqrt(1 - abar)) < 0.01


def test_ddim_timesteps():
    ts = diffusion.ddim_timesteps(1000, 50)
    assert ts.dtype == np.int32 and ts.shape == (50,)
    assert ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
    np.testing.assert_array_equal(diffusion.ddim_timesteps(7, 7), np.arange(6, -1, -1))
    np.testing.assert_array_equal(diffusion.ddim_timesteps(7, 1), [6])


def test_deterministic_ddim_step_keeps_the_noise_with_a_perfect_x0():
    """With the true x0, a DDIM step (eta 0) lands exactly on the same-noise x_{t_prev}."""
    s = diffusion.make_schedule("linear", 1000)
    x0 = jax.random.normal(jax.random.key(0), (3, 5, 4))
    eps = jax.random.normal(jax.random.key(1), x0.shape)
    t, t_prev = jnp.array([900, 500, 20]), jnp.array([700, 100, 0])
    xt = diffusion.q_sample(s, x0, t, eps)
    stepped = diffusion.ddim_step(s, xt, x0, t, t_prev)
    np.testing.assert_allclose(stepped, diffusion.q_sample(s, x0, t_prev, eps), atol=1e-5)
    np.testing.assert_allclose(diffusion.predict_eps(s, xt, x0, t), eps, atol=1e-3)
    # t_prev < 0: the clean sample.
    np.testing.assert_allclose(diffusion.ddim_step(s, xt, x0, t, -1), x0, atol=1e-6)
    with pytest.raises(ValueError, match="needs `noise`"):
        diffusion.ddim_step(s, xt, x0, t, t_prev, eta=1.0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampling_with_an_oracle_denoiser_recovers_x0(eta):
    s = diffusion.make_schedule("cosine", 1000)
    x0 = jax.random.normal(jax.random.key(3), (2, 6, 3))
    calls = []

    def oracle(x_t, t):
        calls.append(t.shape)
        return x0

    out = jax.jit(lambda key: diffusion.sample(oracle, x0.shape, key, s, 50, eta))(
        jax.random.key(0))
    np.testing.assert_allclose(out, x0, atol=1e-5)
    assert calls == [(2,)]  # traced once: a fori_loop, not 50 unrolled calls


def test_sampling_is_deterministic_per_key_and_rows_follow_their_own_key():
    s = diffusion.make_schedule("cosine", 100)

    def shrink(x_t, t):  # a stand-in network: the result depends on the starting noise
        return 0.5 * x_t + 0.001 * t[:, None, None]

    sample = jax.jit(lambda key: diffusion.sample(shrink, (2, 4, 3), key, s, 10))
    a, b = sample(jax.random.key(0)), sample(jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, sample(jax.random.key(1)))
    # One key per row: row 0 of a batch equals the same key sampled alone.
    keys = jnp.stack([jax.random.key(5), jax.random.key(6)])
    pair = diffusion.sample(shrink, (2, 4, 3), keys, s, 10)
    alone = diffusion.sample(shrink, (1, 4, 3), keys[:1], s, 10)
    np.testing.assert_allclose(pair[:1], alone, atol=1e-6)
    assert not np.allclose(pair[0], pair[1])
    # eta > 0 draws fresh noise per step: still deterministic per key.
    noisy = lambda key: diffusion.sample(shrink, (2, 4, 3), key, s, 10, eta=1.0)  # noqa: E731
    np.testing.assert_array_equal(noisy(jax.random.key(2)), noisy(jax.random.key(2)))
    assert not np.allclose(noisy(jax.random.key(2)), sample(jax.random.key(2)))
