"""Rectified-flow math for SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers").

Notation: x0 clean latent, eps noise, sigma in [0, 1], x_t = (1 - sigma) x0 + sigma eps,
velocity target v = eps - x0, x0_hat = x_t - sigma v_pred. The transformer takes
timestep = 1000 * sigma. Timestep densities and loss weightings follow diffusers'
`training_utils.compute_density_for_timestep_sampling` / `compute_loss_weighting_for_sd3`.
"""
from __future__ import annotations

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift: sigma = shift u / (1 + (shift - 1) u) (paper eq. 23)."""
    return shift * u / (1 + (shift - 1) * u)


def sample_sigmas(n: int, scheme: str, generator: torch.Generator | None = None, *,
                  logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                  shift: float = 1.0) -> torch.Tensor:
    """n training noise levels: logit-normal, mode (with heavy tails) or uniform, then shifted."""
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
    elif scheme == "mode":
        u0 = torch.rand(n, generator=generator)
        u = 1 - u0 - mode_scale * (torch.cos(math.pi * u0 / 2) ** 2 - 1 + u0)
    elif scheme == "uniform":
        u = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"timestep sampling {scheme!r} is unknown: use logit_normal, mode or uniform")
    return shift_sigma(u, shift)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def predict_x0(x_t: torch.Tensor, sigma: torch.Tensor, v_pred: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
    return x_t - s * v_pred


def loss_weighting(sigma: torch.Tensor, scheme: str) -> torch.Tensor:
    if scheme == "none":
        return torch.ones_like(sigma)
    if scheme == "sigma_sqrt":
        return sigma.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"loss weighting {scheme!r} is unknown: use none, sigma_sqrt or cosmap")


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                       sigma: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """mean_b [ w(sigma_b) * mean ||v_pred - (eps - x0)||^2 ] in fp32."""
    w = loss_weighting(sigma, weighting).float().view(-1, *([1] * (x0.dim() - 1)))
    err = (v_pred.float() - velocity_target(x0, eps).float()) ** 2
    return (w * err).reshape(x0.shape[0], -1).mean(1).mean()


def inference_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """num_steps + 1 decreasing noise levels from 1 to 0, shifted as in SD3's scheduler."""
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1), shift)
