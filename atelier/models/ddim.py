"""The noise schedule and the DDIM sampler (Song et al. 2021), in diffusers' two-call shape.

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(30)                 # 30 of the 1000 training timesteps, high → low
    for t in scheduler.timesteps:
        out = model(x, t)                       # the model predicts v (or the noise ε) in x
        x = scheduler.step(out, t, x).prev_sample

Training uses the same schedule through `add_noise` (q(x_t | x_0) in closed form):
    x_t = sqrt(ᾱ_t) · x_0 + sqrt(1 − ᾱ_t) · ε
and sampling with eta = 0 is deterministic given the starting noise, which is what makes
"same seed ⇒ same image" hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BETA_SCHEDULES = ("cosine", "linear")
# What the model predicts: the noise ε, or v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0 (Salimans & Ho 2022),
# which stays well conditioned at t ≈ T where ᾱ_t → 0 and x_0 = (x_t − sqrt(1−ᾱ) ε) / sqrt(ᾱ) blows up.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_betas(num_train_timesteps: int, schedule: str = "cosine", beta_start: float = 1e-4,
               beta_end: float = 0.02) -> torch.Tensor:
    """β_t for t = 0 … T−1 (float64). Cosine: Nichol & Dhariwal 2021, ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        f = lambda t: math.cos((t / num_train_timesteps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(num_train_timesteps)],
                            dtype=torch.float64)
    raise ValueError(f"beta_schedule={schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")


@dataclass
class DDIMStepOutput:
    prev_sample: torch.Tensor  # x_{t-1}
    pred_original_sample: torch.Tensor  # the model's current estimate of x_0 (the live preview)


class DDIMScheduler:
    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "cosine", clip_sample: bool = True,
                 prediction_type: str = "v_prediction"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        self.prediction_type = prediction_type
        self.num_train_timesteps = num_train_timesteps
        self.betas = make_betas(num_train_timesteps, beta_schedule)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # ᾱ_t, float64
        self.clip_sample = clip_sample
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Evenly spaced timesteps ending at T−1 ("trailing" spacing), so the first step starts from pure noise."""
        T = self.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be between 1 and {T}")
        ts = torch.arange(T, 0, -T / num_inference_steps).round().long() - 1
        self.timesteps = ts
        self.num_inference_steps = num_inference_steps

    def _prev(self, t: int) -> int:
        i = (self.timesteps == t).nonzero()
        return int(self.timesteps[i + 1]) if len(i) and int(i) + 1 < len(self.timesteps) else -1

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             noise: torch.Tensor | None = None) -> DDIMStepOutput:
        """One DDIM update x_t → x_{t−1} from the model's output (ε̂ or v̂; eq. 12 of Song et al.)."""
        t, prev = int(timestep), self._prev(int(timestep))
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else 1.0
        # 1. predicted x_0 and ε, x_0 clipped to the data range and ε made consistent with it
        if self.prediction_type == "v_prediction":
            x0 = math.sqrt(a_t) * sample - math.sqrt(1 - a_t) * model_output
            eps = math.sqrt(1 - a_t) * sample + math.sqrt(a_t) * model_output
        else:
            x0 = (sample - math.sqrt(1 - a_t) * model_output) / math.sqrt(a_t)
            eps = model_output
        if self.clip_sample:
            x0 = x0.clamp(-1, 1)
            eps = (sample - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        # 2. σ_t (eta = 0: deterministic DDIM; eta = 1: DDPM-like ancestral noise)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        # 3. x_{t−1} = sqrt(ᾱ_{t−1}) x̂_0 + sqrt(1 − ᾱ_{t−1} − σ²) ε̂ + σ z
        prev_sample = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            if noise is None:
                raise ValueError("eta > 0 needs `noise` (pass per-sample seeded noise for reproducibility)")
            prev_sample = prev_sample + sigma * noise
        return DDIMStepOutput(prev_sample, x0)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model learns to output at x_t = add_noise(x0, noise, t): ε, or v = sqrt(ᾱ) ε − sqrt(1−ᾱ) x0."""
        if self.prediction_type == "epsilon":
            return noise
        a = self.alphas_cumprod.to(x0.dtype)[timesteps].view(-1, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): x0, noise (B, C, H, W), timesteps (B,) → x_t."""
        a = self.alphas_cumprod.to(x0.dtype)[timesteps].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


__all__ = ["DDIMScheduler", "DDIMStepOutput", "make_betas"]
