"""SDE sampling of SD3's rectified flow with per-step log-probabilities (fp32), for RL-style
objectives (SDPO) that need log p(x_next | x) of each sampling step.

Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, eq. 9; yifan123/flow_grpo
`flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`, `sde_step_with_logprob`) turns the
probability-flow ODE dx = v dt into an SDE with the same marginals. With x_s = (1 - s) x0 + s eps
the score is grad log p(x_s) = -(x + (1 - s) v) / s, and one Euler-Maruyama step from level s
to s' < s (dt = s' - s < 0) is

    std_s  = a * sqrt(s / (1 - s))                       (a = noise_level; at s = 1 the
                                                          denominator uses the schedule's
                                                          second level, as Flow-GRPO does)
    mean   = x (1 + std_s^2 / (2 s) dt) + v (1 + std_s^2 (1 - s) / (2 s)) dt
    x'     = mean + std_s sqrt(-dt) z,   z ~ N(0, I)
    log p(x' | x) = mean over elements of the Gaussian log-density N(x'; mean, std_s^2 |dt|).

The mean over elements (not the sum) is what Flow-GRPO and SDPO's DDIM version
(ZiyiZhang27/sdpo `sdpo_pytorch/diffusers_patch/ddim_with_logprob_sdpo.py`) use; it keeps
log-ratios O(1) for any latent size. a = 0 gives the Euler ODE step (no log-prob).

The x0 prediction of each step, x0_hat = x - s v, is returned too: SDPO rewards those.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megadiff import flow

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x, sigma[B]) -> v (fp32)


def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.float().view(-1, *([1] * (like.dim() - 1)))


def sde_std(sigma: torch.Tensor, noise_level: float, sigma_at_one: float) -> torch.Tensor:
    """std_s = a sqrt(s / (1 - s)), with 1 - s replaced by 1 - `sigma_at_one` where s == 1."""
    s = sigma.float()
    denom = 1 - torch.where(s >= 1, torch.full_like(s, sigma_at_one), s)
    return noise_level * torch.sqrt(s / denom)


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
             noise_level: float, sigma_at_one: float, x_next: torch.Tensor | None = None,
             noise: torch.Tensor | None = None):
    """One SDE step from `sigma` to `sigma_next` (per-sample [B] tensors) in fp32.

    Returns (x_next, log_prob [B], mean, step_std [B]). Given `x_next` it only scores it (the
    training pass); otherwise it draws x_next with `noise` (standard normal, x's shape).
    """
    x, v = x.float(), v.float()
    s, s_next = _col(sigma, x), _col(sigma_next, x)
    dt = s_next - s
    std = _col(sde_std(sigma, noise_level, sigma_at_one), x)
    mean = x * (1 + std**2 / (2 * s) * dt) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
    step_std = std * torch.sqrt(-dt)
    if x_next is None:
        assert noise is not None, "sde_step needs noise or x_next"
        x_next = mean + step_std * noise.float()
    x_next = x_next.float()
    log_prob = gaussian_log_prob(x_next.detach(), mean, step_std)
    return x_next, log_prob, mean, step_std.flatten()


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension of log N(x; mean, std^2)."""
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


@dataclass
class Trajectory:
    latents: torch.Tensor      # [B, K + 1, C, H, W]: x before step k is latents[:, k]
    log_probs: torch.Tensor    # [B, K]: log p(latents[:, k + 1] | latents[:, k])
    x0_preds: torch.Tensor     # [B, K, C, H, W]: x0_hat = x - s v at step k
    sigmas: torch.Tensor       # [K + 1]


@torch.no_grad()
def sde_sample(velocity: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, noise_level: float,
               randn: Callable[[tuple], torch.Tensor]) -> Trajectory:
    """Run the SDE over `sigmas` (K + 1 decreasing levels from 1 to 0) from `noise`, drawing
    the step noise from `randn(shape)`; everything kept in fp32."""
    sigmas = sigmas.float().to(noise.device)
    assert sigmas.dim() == 1 and len(sigmas) >= 2, "need at least one step"
    b = noise.shape[0]
    sigma_at_one = float(sigmas[1])
    x = noise.float()
    latents, log_probs, x0s = [x], [], []
    for k in range(len(sigmas) - 1):
        s, s_next = sigmas[k].expand(b), sigmas[k + 1].expand(b)
        v = velocity(x, s).float()
        x0s.append(flow.predict_x0(x, s, v))
        x, lp, _, _ = sde_step(x, v, s, s_next, noise_level, sigma_at_one, noise=randn(tuple(x.shape)))
        latents.append(x)
        log_probs.append(lp)
    return Trajectory(torch.stack(latents, 1), torch.stack(log_probs, 1), torch.stack(x0s, 1), sigmas)
