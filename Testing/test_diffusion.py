"""Diffusion schedule, q_sample, reverse step and chain against closed forms."""

import math

import numpy as np
import pytest
import torch

from SACDiffLib.config import DiffusionConfig, NoiseConfig
from SACDiffLib.diffusion import Diffusion


def test_linear_schedule_and_alpha_bar_closed_form():
    d = Diffusion(DiffusionConfig())
    betas = np.linspace(1e-4, 0.02, 1000)
    assert d.betas.shape == (1001,) and float(d.betas[0]) == 0.0
    np.testing.assert_allclose(d.betas[1:].numpy(), betas, rtol=1e-5)
    np.testing.assert_allclose(d.alpha_bar[1:].numpy(), np.cumprod(1 - betas), rtol=1e-4)
    assert float(d.alpha_bar[0]) == 1.0


def test_cosine_schedule_is_monotone():
    d = Diffusion(DiffusionConfig(schedule="cosine"))
    ab = d.alpha_bar.numpy()
    assert np.all(np.diff(ab) < 0) and ab[-1] < 1e-3


@pytest.mark.parametrize("kind", ["gaussian", "simplex"])
def test_q_sample_moments(kind):
    d = Diffusion(DiffusionConfig(noise=NoiseConfig(kind=kind)))
    t = 550
    x0 = torch.full((256, 1, 48, 48), 0.3, dtype=torch.float64)
    eps = d.sample_noise(256, 48, 48, torch.Generator().manual_seed(0), dtype=torch.float64)
    xt = d.q_sample(x0, torch.full((256,), t), eps)
    ab = float(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t - 1])
    assert abs(float(xt.mean()) - math.sqrt(ab) * 0.3) < 0.03
    assert abs(float(xt.var()) - (1 - ab)) < 0.05 * (1 - ab)


def test_p_step_matches_algorithm_2_by_hand():
    cfg = DiffusionConfig(timesteps=50)
    d = Diffusion(cfg)
    g = torch.Generator().manual_seed(1)
    x_t, eps_hat, z = (torch.randn(2, 1, 4, 4, generator=g) for _ in range(3))
    t = 17
    betas = np.linspace(1e-4 * 20, 0.02 * 20, 50)
    alphas = 1 - betas
    ab = np.cumprod(alphas)
    a_t, ab_t, ab_prev = alphas[t - 1], ab[t - 1], ab[t - 2]
    mean = (x_t.numpy() - (1 - a_t) / np.sqrt(1 - ab_t) * eps_hat.numpy()) / np.sqrt(a_t)
    sigma = np.sqrt(betas[t - 1] * (1 - ab_prev) / (1 - ab_t))
    x0_hat = (x_t.numpy() - np.sqrt(1 - ab_t) * eps_hat.numpy()) / np.sqrt(ab_t)
    x_prev, x0 = d.p_step(x_t, t, eps_hat, z)
    np.testing.assert_allclose(x_prev.numpy(), mean + sigma * z.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(x0.numpy(), x0_hat, rtol=1e-4, atol=1e-4)
    # z = 0 at t = 1: the last step adds no noise.
    last, _ = d.p_step(x_t, 1, eps_hat, z)
    a1 = alphas[0]
    np.testing.assert_allclose(last.numpy(), (x_t.numpy() - (1 - a1) / np.sqrt(1 - ab[0]) * eps_hat.numpy()) / np.sqrt(a1), rtol=1e-4, atol=1e-5)


def test_sigma_beta_variant():
    d = Diffusion(DiffusionConfig(sigma="beta"))
    np.testing.assert_allclose(d.sigma[1:].numpy() ** 2, d.betas[1:].numpy(), rtol=1e-5)


def test_predict_x0_inverts_q_sample():
    d = Diffusion(DiffusionConfig())
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    eps = torch.randn(3, 1, 8, 8)
    t = torch.tensor([1, 400, 999])
    np.testing.assert_allclose(d.predict_x0(d.q_sample(x0, t, eps), t, eps).numpy(), x0.numpy(), atol=2e-3)


def test_partial_chain_with_oracle_denoiser_returns_the_query():
    """With ε̂ = the ε consistent with the true x₀ and z = 0, every step is the exact posterior mean and the chain
    ends at x₀ (the t = 1 posterior puts all weight on x₀)."""
    d = Diffusion(DiffusionConfig(timesteps=200)).double()
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1

    def oracle(x_t, cond, t):
        return (x_t - d._at(d.sqrt_alpha_bar, t, x_t).double() * x0) / d._at(d.sqrt_one_minus_alpha_bar, t, x_t).double()

    noise = lambda t: torch.randn(2, 1, 8, 8, dtype=torch.float64) if t == 120 else torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    calls = []
    out = d.partial_chain(oracle, x0, None, 120, noise, on_step=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 120) for i in range(1, 121)]
    np.testing.assert_allclose(out.numpy(), x0.numpy(), atol=1e-4)

    calls.clear()  # respaced (guided-diffusion's respace): 12 steps, each still the exact posterior mean
    out = d.partial_chain(oracle, x0, None, 120, noise, on_step=lambda i, n: calls.append((i, n)), sampling_steps=12)
    assert calls == [(i, 12) for i in range(1, 13)]
    np.testing.assert_allclose(out.numpy(), x0.numpy(), atol=1e-4)


def test_sampling_timesteps_span_t_s_to_zero_evenly():
    assert Diffusion.sampling_timesteps(5) == [5, 4, 3, 2, 1, 0]
    assert Diffusion.sampling_timesteps(5, 10) == [5, 4, 3, 2, 1, 0]
    assert Diffusion.sampling_timesteps(550, 25)[:2] == [550, 527]  # 549/24 = 22.875 per step, rounded
    ts = Diffusion.sampling_timesteps(250, 25)
    assert len(ts) == 26 and ts[0] == 250 and ts[-2:] == [1, 0] and all(a > b for a, b in zip(ts, ts[1:]))


def test_respaced_step_is_the_closed_form_posterior_between_its_timesteps():
    """q(x_s | x_t, x₀) has mean √ᾱ_s β/(1−ᾱ_t) x₀ + √α (1−ᾱ_s)/(1−ᾱ_t) x_t with α = ᾱ_t/ᾱ_s, β = 1 − α and
    variance β (1−ᾱ_s)/(1−ᾱ_t) (Ho et al. eq. 7 with the step's own α)."""
    d = Diffusion(DiffusionConfig(timesteps=1000)).double()
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    t, s = 400, 350
    a_t, a_s = ab[t - 1], ab[s - 1]
    alpha = a_t / a_s
    beta = 1 - alpha
    x0 = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    z = torch.randn_like(x0)
    out, x0_hat = d.p_step(x_t, t, eps, z, t_prev=s)
    mean = a_s.sqrt() * beta / (1 - a_t) * x0 + alpha.sqrt() * (1 - a_s) / (1 - a_t) * x_t
    std = (beta * (1 - a_s) / (1 - a_t)).sqrt()
    np.testing.assert_allclose(out.numpy(), (mean + std * z).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(x0_hat.numpy(), x0.numpy(), atol=1e-4)


def test_training_loss_draws_t_from_all_of_1_to_T():
    d = Diffusion(DiffusionConfig(timesteps=20, noise=NoiseConfig(kind="gaussian")))
    seen = []

    def model(x_t, cond, t):
        seen.append(t.clone())
        return torch.zeros_like(x_t)

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        loss = d.training_loss(model, torch.zeros(16, 1, 4, 4), None, g)
    ts = torch.cat(seen)
    assert int(ts.min()) == 1 and int(ts.max()) == 20
    # Zero prediction: the loss is E[ε²] = 1 for unit-variance ε.
    assert abs(float(loss) - 1) < 0.3


def test_harmonised_chain_renoises_the_blend_with_the_steps_own_field():
    """At a harmonised step the next state is √ᾱ_{t'} h + √(1 − ᾱ_{t'}) z_{t'} (h = the blend, z_{t'} the step's
    field) — checked on the network's next input; only the first n steps are harmonised, never the last."""
    d = Diffusion(DiffusionConfig(timesteps=200)).double()
    x0 = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    fields = {t: torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
              for t in range(0, 121)}
    inputs, harmonised_at = [], []
    blend = torch.full_like(x0, 0.25)

    def model(x_t, cond, t):
        inputs.append((int(t[0]), x_t.clone()))
        return torch.zeros_like(x_t)

    def harmonise(x0_hat, part):
        harmonised_at.append(len(inputs))
        return blend

    visited = d.sampling_timesteps(120, 6)
    d.partial_chain(model, x0, None, 120, lambda t: fields[t], sampling_steps=6, harmonise=harmonise,
                    harmonise_steps=5)
    assert harmonised_at == [1, 2, 3, 4, 5]  # after each of the first 5 network calls; the 6th (→ 0) is plain
    ab = d._alpha_bar64
    for (t, x_t) in inputs[1:]:  # every later input was re-noised from the blend at its own timestep
        expected = math.sqrt(float(ab[t])) * blend + math.sqrt(1 - float(ab[t])) * fields[t]
        np.testing.assert_allclose(x_t.numpy(), expected.numpy(), atol=1e-6)
    assert [t for t, _ in inputs] == visited[:-1]
