"""Discrete DDPM noise schedules: forward noising, the stochastic reverse step, and path-KL weights.

Timesteps are 0-based indices ``t ∈ {0, …, T-1}`` (diffusers' convention); index ``t`` is the paper's step
``t + 1``. ``alphas_cumprod[t]`` is ᾱ at that index; "before step 0" is the clean data, ᾱ = 1.

The reverse step used everywhere is the DDPM posterior for a (possibly sub-sampled) jump ``t → s`` with
``s < t``, written with ᾱ's only so that 1000-step schedules can be rolled out in 10–50 jumps:

    α_j = ᾱ_t / ᾱ_s,  β_j = 1 − α_j
    x̂0  = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t
    μ    = √ᾱ_s β_j / (1−ᾱ_t) · x̂0 + √α_j (1−ᾱ_s) / (1−ᾱ_t) · x_t
    σ²   = β_j ("large", Ho et al.'s σ² = β) or (1−ᾱ_s)/(1−ᾱ_t) · β_j ("small", the true posterior)

Two models that share the schedule and differ only in ε differ in μ by ``β_j / (√α_j √(1−ᾱ_t)) · Δε``, so
the KL between their transitions is ``c · ‖Δε‖²`` with ``c = β_j² / (2 σ² α_j (1−ᾱ_t))`` — the per-step
weight of the path KL (for consecutive steps and σ² = β: c_t = β_t / (2 α_t (1−ᾱ_t))). The same c weights the
ε-MSE terms of the negative ELBO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["NoiseSchedule"]


@dataclass
class NoiseSchedule:
    """A discrete variance-preserving schedule, given by its cumulative ᾱ (float64 for exact weights)."""

    alphas_cumprod: torch.Tensor
    variance: str = "large"

    def __post_init__(self) -> None:
        a = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).flatten()
        if a.numel() < 2 or not bool(torch.all((a > 0) & (a < 1))):
            raise ValueError("alphas_cumprod must hold at least 2 values strictly inside (0, 1)")
        if not bool(torch.all(a[1:] < a[:-1])):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        if self.variance not in ("large", "small"):
            raise ValueError(f"variance must be 'large' or 'small', got {self.variance!r}")
        self.alphas_cumprod = a

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, num_steps: int, beta_start: float, beta_end: float, variance: str = "large") -> NoiseSchedule:
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0), variance)

    @classmethod
    def cosine(cls, num_steps: int, variance: str = "large", max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal's squared-cosine schedule (diffusers' ``squaredcos_cap_v2``)."""
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor(
            [min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)],
            dtype=torch.float64,
        )
        return cls(torch.cumprod(1.0 - betas, 0), variance)

    # ------------------------------------------------------------------ basic quantities
    @property
    def num_steps(self) -> int:
        return self.alphas_cumprod.numel()

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ at integer timesteps ``t`` (−1 means clean data, ᾱ = 1), shaped to broadcast against ``like``."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        padded = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        a = padded[t + 1].to(device=like.device, dtype=like.dtype)
        return a.reshape(a.shape + (1,) * (like.dim() - a.dim()))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self._abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self._abar(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def _jump(self, t: torch.Tensor, s: torch.Tensor, like: torch.Tensor):
        at, as_ = self._abar(t, like), self._abar(s, like)
        alpha_j = at / as_
        beta_j = 1 - alpha_j
        var = beta_j if self.variance == "large" else (1 - as_) / (1 - at) * beta_j
        return at, as_, alpha_j, beta_j, var

    def reverse_step(
        self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """One stochastic reverse jump ``t → s`` (``s = −1`` lands on clean data). ``noise=None`` gives the mean."""
        at, as_, alpha_j, beta_j, var = self._jump(t, s, x_t)
        x0 = (x_t - (1 - at).sqrt() * eps) / at.sqrt()
        mean = as_.sqrt() * beta_j / (1 - at) * x0 + alpha_j.sqrt() * (1 - as_) / (1 - at) * x_t
        if noise is None:
            return mean
        return mean + var.sqrt() * noise

    def path_kl_weight(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """c such that KL between two reverse transitions t → s equals c‖Δε‖² (0 where the step is deterministic)."""
        t = torch.as_tensor(t).long()
        ref = torch.zeros(t.shape, dtype=torch.float64)
        at, _, alpha_j, beta_j, var = self._jump(t, torch.as_tensor(s).long(), ref)
        c = beta_j**2 / (2 * var.clamp_min(1e-300) * alpha_j * (1 - at))
        return torch.where(var > 0, c, torch.zeros_like(c)).reshape(t.shape)

    def rollout_timesteps(self, num_jumps: int, t_max: int | None = None) -> torch.Tensor:
        """Evenly spaced timesteps for a rollout from ``t_max`` (default: the noisiest step), ending with −1.

        Start where the sampler you use starts (e.g. diffusers' "leading" spacing never visits the last index):
        schedules whose final β is capped (squared-cosine) have ᾱ ≈ 0 at the last index, and the jump from it
        carries a path-KL weight ~10⁵× the others' — a step no sampler takes would then dominate every estimate.
        """
        if num_jumps < 1:
            raise ValueError("num_jumps must be >= 1")
        top = self.num_steps - 1 if t_max is None else int(t_max)
        if not 0 <= top < self.num_steps:
            raise ValueError(f"rollout start t_max must be in [0, {self.num_steps - 1}], got {t_max}")
        if num_jumps > top:
            ts = torch.arange(top, -1, -1)
        else:
            ts = torch.linspace(top, 0, num_jumps).round().long()
        return torch.cat([ts, ts.new_full((1,), -1)])

    def first_jump_dominance(self, ts: torch.Tensor) -> float:
        """Ratio of the first jump's path-KL weight to the median of the others (≫ 1: see rollout_timesteps)."""
        w = self.path_kl_weight(ts[:-1], ts[1:])
        if len(w) < 3:
            return 1.0
        return float(w[0] / w[1:].median().clamp_min(1e-300))
