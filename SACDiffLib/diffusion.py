"""DDPM with simplex noise (Algorithms 1–2, Appendix B).

Timesteps follow the paper's notation: t = 1..T, and every schedule buffer is indexed by t directly
(index 0 holds t = 0: ᾱ_0 = 1). The buffers are registered on an ``nn.Module`` so that ``.to(device)`` moves
them with the model.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

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
        self._alpha_bar64 = alpha_bar  # float64 on the CPU, for the coefficients of respaced steps
        self.noise = NoiseSampler(cfg.noise, seed=noise_seed)

    @staticmethod
    def _at(buffer: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """buffer[t] shaped to broadcast against ``like`` (B, C, H, W)."""
        return buffer.gather(0, t.to(buffer.device).long()).view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def compile_noise(self) -> "Diffusion":
        """Draw simplex noise through ``torch.compile`` (``SimplexNoise.compile``); a no-op for Gaussian noise."""
        if self.noise.simplex is not None:
            self.noise.simplex.compile()
        return self

    def sample_noise(self, n: int, height: int, width: int, generator: torch.Generator, device=None, dtype=None,
                     channels: int = 1):
        return self.noise(n, height, width, generator, device=device, dtype=dtype or torch.float32, channels=channels)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε (Alg. 1 line 4)."""
        return self._at(self.sqrt_alpha_bar, t, x0) * x0 + self._at(self.sqrt_one_minus_alpha_bar, t, x0) * eps

    def training_loss(
        self, eps_model: Callable, x0: torch.Tensor, cond: Optional[torch.Tensor], generator: torch.Generator,
        max_timestep: int = 0,
    ) -> torch.Tensor:
        """‖ε − ε̂_θ([x_t ⊕ c], t)‖² with t ~ U{1..T} (or U{1..max_timestep}) and ε from the configured family
        (Alg. 1)."""
        n, channels, h, w = x0.shape
        top = max_timestep or self.T
        t = torch.randint(1, top + 1, (n,), generator=generator, device=generator.device).to(x0.device)
        eps = self.sample_noise(n, h, w, generator, device=x0.device, dtype=x0.dtype, channels=channels)
        x_t = self.q_sample(x0, t, eps)
        return F.mse_loss(eps_model(x_t, cond, t), eps)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        """x̂₀ = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t."""
        return (x_t - self._at(self.sqrt_one_minus_alpha_bar, t, x_t) * eps_hat) / self._at(
            self.sqrt_alpha_bar, t, x_t
        )

    def p_step(self, x_t: torch.Tensor, t: int, eps_hat: torch.Tensor, z: torch.Tensor, t_prev: Optional[int] = None):
        """One reverse step of Alg. 2 from timestep ``t`` (1..T) to ``t_prev`` (default t − 1); returns (x_{t_prev}, x̂₀).

        μ_θ = (x_t − (1 − α_t)/√(1 − ᾱ_t) · ε̂) / √α_t ;  x_{t−1} = μ_θ + σ_t z, with z = 0 when t_prev = 0.
        A respaced step (t_prev < t − 1, guided-diffusion's respace) is the same update with the step's own
        α = ᾱ_t / ᾱ_{t_prev}, β = 1 − α and β̃ = β (1 − ᾱ_{t_prev}) / (1 − ᾱ_t).
        """
        t_prev = t - 1 if t_prev is None else int(t_prev)
        if not 0 <= t_prev < t:
            raise ValueError(f"t_prev must lie in [0, t); got t={t}, t_prev={t_prev}")
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        if t_prev == t - 1:
            alpha = self._at(self.alphas, tt, x_t)
            sigma = self._at(self.sigma, tt, x_t)
        else:
            a, a_prev = self._alpha_bar64[t], self._alpha_bar64[t_prev]
            alpha_f = a / a_prev
            beta = 1 - alpha_f
            var = beta * (1 - a_prev) / (1 - a) if self.cfg.sigma == "posterior" else beta
            alpha = torch.tensor(float(alpha_f), dtype=x_t.dtype, device=x_t.device)
            sigma = torch.tensor(float(var.sqrt()), dtype=x_t.dtype, device=x_t.device)
        mean = (x_t - (1 - alpha) / self._at(self.sqrt_one_minus_alpha_bar, tt, x_t) * eps_hat) / alpha.sqrt()
        if t_prev > 0:
            mean = mean + sigma * z
        return mean, self.predict_x0(x_t, tt, eps_hat)

    @staticmethod
    def sampling_timesteps(steps: int, sampling_steps: int = 0) -> list[int]:
        """Timesteps visited by the reverse chain from T_s = ``steps``, ending at 0.

        0 (or ≥ steps) = every step T_s, T_s − 1, …, 1, 0; n = n evenly spaced steps from T_s down to 1, then 0.
        """
        if sampling_steps <= 0 or sampling_steps >= steps:
            return list(range(steps, -1, -1))
        kept = sorted({int(round(v)) for v in torch.linspace(steps, 1, sampling_steps, dtype=torch.float64).tolist()},
                      reverse=True)
        return kept + [0]

    def partial_chain(
        self,
        eps_model: Callable,
        x0: torch.Tensor,
        cond: Optional[torch.Tensor],
        steps: int,
        noise: Callable[[int], torch.Tensor],
        on_step: Optional[Callable[[float, int], bool]] = None,
        sampling_steps: int = 0,
        parts: Optional[Sequence] = None,
        harmonise: Optional[Callable[[torch.Tensor, object], torch.Tensor]] = None,
        harmonise_steps: int = 0,
    ) -> torch.Tensor:
        """Alg. 2: noise the query to x_{T_s} and run the reverse chain T_s → 0; returns the reconstruction.

        ``noise(t)`` gives the ε used at timestep t (t = T_s for the forward corruption, then the z of the step that
        lands on t), broadcastable to ``x0``; it is called once per timestep, in that order. ``sampling_steps`` > 0
        respaces the chain (``sampling_timesteps``). ``parts`` (default: all of ``x0`` at once) are index
        expressions into ``x0``: every step draws its noise once and then runs the network and the update part by
        part, so the network sees bounded batches while all parts share the step's field (detection's chunks of
        slices). The update is elementwise, so the result does not depend on the parts beyond the network's own
        batch arithmetic. ``on_step(done, total)`` is called after each part with ``done`` in steps (fractional
        within a step); returning False cancels.

        Harmonised reverse (after THOR, Bercea et al. 2024): at the first ``harmonise_steps`` steps (never the last
        one, which lands on t = 0) the step's x̂₀ is replaced by ``harmonise(x̂₀, part)`` — a blend of x̂₀ with the
        query where the two agree — and re-noised to the step's target timestep with the step's own field z:
        x_{t_prev} = √ᾱ_{t_prev} x̂₀ʰ + √(1 − ᾱ_{t_prev}) z. A deep start then removes a lesion while the later,
        shallow steps start again from the query's own healthy tissue (vessels), not from the deep step's blur.
        """
        parts = [slice(None)] if parts is None else list(parts)
        visited = self.sampling_timesteps(steps, sampling_steps)
        total = len(visited) - 1
        x = torch.empty_like(x0)
        eps = noise(steps).expand_as(x0)
        t_s = torch.full((x0.shape[0],), steps, device=x0.device)
        for part in parts:  # x_{T_s} = √ᾱ x₀ + √(1 − ᾱ) ε (Alg. 2 line 2)
            x0_part = x0[part]
            x[part] = self.q_sample(x0_part, t_s[:x0_part.shape[0]], eps[part])
        for i, (t, t_prev) in enumerate(zip(visited[:-1], visited[1:])):
            z = noise(t_prev).expand_as(x) if t_prev > 0 else None  # drawn once per step, for every part
            for j, part in enumerate(parts):
                x_t = x[part]
                tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x.device)
                eps_hat = eps_model(x_t, None if cond is None else cond[part], tt)
                x[part], x0_hat = self.p_step(x_t, t, eps_hat, torch.zeros_like(x_t) if z is None else z[part],
                                              t_prev)
                if harmonise is not None and i < harmonise_steps and t_prev > 0:
                    t_to = torch.full((x_t.shape[0],), t_prev, dtype=torch.long, device=x.device)
                    x[part] = self.q_sample(harmonise(x0_hat, part), t_to, z[part])
                if on_step is not None and on_step(i + (j + 1) / len(parts), total) is False:
                    raise Cancelled("detection cancelled")
        return x
