"""DDPM with simplex noise (Algorithms 1–2, Appendix B).

Timesteps follow the paper's notation: t = 1..T, and every schedule buffer is indexed by t directly
(index 0 holds t = 0: ᾱ_0 = 1). The buffers are registered on an ``nn.Module`` so that ``.to(device)`` moves
them with the model.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DiffusionConfig
from .errors import Cancelled
from .noise import NoiseSampler


def beta_schedule(cfg: DiffusionConfig) -> torch.Tensor:
    """β_1..β_T (float64)."""
    T = cfg.timesteps
    if cfg.schedule == "linear":  # Ho et al. 2020, scaled so that T ≠ 1000 keeps the same ᾱ_T
        scale = 1000.0 / T
        return torch.linspace(scale * cfg.beta_start, scale * cfg.beta_end, T, dtype=torch.float64)
    s = 0.008  # cosine schedule (Nichol & Dhariwal 2021)
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


class Diffusion(nn.Module):
    def __init__(self, cfg: DiffusionConfig, noise_seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.T = cfg.timesteps
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), beta_schedule(cfg)])
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, 0)  # ᾱ_t = Π_{s≤t} α_s, ᾱ_0 = 1
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        posterior = betas * (1 - alpha_bar_prev) / (1 - alpha_bar).clamp_min(1e-20)  # β̃_t
        sigma2 = posterior if cfg.sigma == "posterior" else betas
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            "sigma": sigma2.sqrt(),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)
        self.noise = NoiseSampler(cfg.noise, seed=noise_seed)

    @staticmethod
    def _at(buffer: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """buffer[t] shaped to broadcast against ``like`` (B, C, H, W)."""
        return buffer.gather(0, t.to(buffer.device).long()).view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def sample_noise(self, n: int, height: int, width: int, generator: torch.Generator, device=None, dtype=None):
        return self.noise(n, height, width, generator, device=device, dtype=dtype or torch.float32)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε (Alg. 1 line 4)."""
        return self._at(self.sqrt_alpha_bar, t, x0) * x0 + self._at(self.sqrt_one_minus_alpha_bar, t, x0) * eps

    def training_loss(
        self, eps_model: Callable, x0: torch.Tensor, cond: Optional[torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """‖ε − ε̂_θ([x_t ⊕ c], t)‖² with t ~ U{1..T} and ε from the configured family (Alg. 1)."""
        n, _, h, w = x0.shape
        t = torch.randint(1, self.T + 1, (n,), generator=generator, device=generator.device).to(x0.device)
        eps = self.sample_noise(n, h, w, generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, eps)
        return F.mse_loss(eps_model(x_t, cond, t), eps)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        """x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t."""
        return (x_t - self._at(self.sqrt_one_minus_alpha_bar, t, x_t) * eps_hat) / self._at(
            self.sqrt_alpha_bar, t, x_t
        )

    def p_step(self, x_t: torch.Tensor, t: int, eps_hat: torch.Tensor, z: torch.Tensor):
        """One reverse step of Alg. 2 at timestep ``t`` (1..T); returns (x_{t−1}, x̂₀).

        μ_θ = (x_t − (1 − α_t)/√(1 − ᾱ_t) · ε̂) / √α_t ;  x_{t−1} = μ_θ + σ_t z, with z = 0 at t = 1.
        """
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        alpha = self._at(self.alphas, tt, x_t)
        mean = (x_t - (1 - alpha) / self._at(self.sqrt_one_minus_alpha_bar, tt, x_t) * eps_hat) / alpha.sqrt()
        if t > 1:
            mean = mean + self._at(self.sigma, tt, x_t) * z
        return mean, self.predict_x0(x_t, tt, eps_hat)

    def partial_chain(
        self,
        eps_model: Callable,
        x0: torch.Tensor,
        cond: Optional[torch.Tensor],
        steps: int,
        noise: Callable[[int], torch.Tensor],
        on_step: Optional[Callable[[int], bool]] = None,
    ) -> torch.Tensor:
        """Alg. 2: noise the query to x_{T_s} and run the reverse chain T_s → 0; returns the reconstruction.

        ``noise(t)`` gives the ε used at timestep t (t = T_s for the forward corruption, then the z of each reverse
        step), broadcastable to ``x0``. ``on_step(t)`` is called after each step; returning False cancels.
        """
        x = self.q_sample(x0, torch.full((x0.shape[0],), steps, device=x0.device), noise(steps).expand_as(x0))
        for t in range(steps, 0, -1):
            tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            eps_hat = eps_model(x, cond, tt)
            z = noise(t - 1).expand_as(x) if t > 1 else torch.zeros_like(x)
            x, _ = self.p_step(x, t, eps_hat, z)
            if on_step is not None and on_step(t) is False:
                raise Cancelled("detection cancelled")
        return x
