"""Few-step generator for SD3 rectified flow: its conditioning schedule, one generator step,
few-step sampling and backward simulation.

The generator G is a copy of the teacher's MMDiT used as an x0 predictor: at conditioning
noise level s it maps an input x to x0_hat = x - s * v(x, s). A k-step schedule
s_0 > s_1 > ... > s_{k-1} runs G on pure noise at s_0, re-noises its x0 with fresh noise to
s_1, and so on; the last x0 is the sample. This is DMD2's multi-step generator
(tianweiy/DMD2 `main/sd_unified_model.py`: `denoising_step_list`, `sample_backward`, which also
re-noises with uncorrelated noise) written for flow matching (x_s = (1 - s) x0 + s eps).

Backward simulation (DMD2): during training the generator's input at step k is produced by
running its own schedule for k steps from noise, without gradient, so that training sees the
inputs inference will see. Without it the input is a data latent noised to s_k.

ODE sampling (DMDR, vvvvvjdy/dmdr at d1f2436 `train_t2i/sd3/samplers.py`, `v2x0_sampler` with
`sample_type="ode"`): instead of re-noising each x0 with fresh noise, take Euler steps of the
flow ODE along the same grid, x_{i+1} = x_i + (s_{i+1} - s_i) v(x_i, s_i) with s_n = 0 (the last
step lands on x0_hat). DMDR's training input for the ODE sampler is the final sample re-noised
with fresh noise to the chosen level s_k (`get_sample` returns the same final x0 for every k).

A first conditioning level below 1 is allowed: the input is still pure noise and the network
is told s_0 (DMD2's one-step SDXL model is fed noise at "timestep 399").
"""
from __future__ import annotations

from typing import Callable

import torch

from megadiff import flow

# net(x, sigma[B], prompt_embeds, pooled) -> velocity (fp32)
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[tuple], torch.Tensor]


def conditioning_sigmas(num_steps: int, shift: float, sigmas: list[float] | None = None) -> torch.Tensor:
    """The generator's conditioning noise levels, decreasing: the given ones, or SD3's shifted
    grid `shift_sigma(linspace(1, 0, n + 1))[:-1]` (1-step: [1.0]; 4-step, shift 3:
    [1.0, 0.9, 0.75, 0.5])."""
    if sigmas is not None:
        out = torch.tensor([float(s) for s in sigmas], dtype=torch.float32)
        check_sigmas(out, num_steps)
        return out
    return flow.inference_sigmas(num_steps, shift)[:-1].float()


def check_sigmas(sigmas: torch.Tensor, num_steps: int) -> None:
    if len(sigmas) != num_steps:
        raise ValueError(f"dmd.generator.sigmas has {len(sigmas)} levels but dmd.generator.num_steps="
                         f"{num_steps}: give one conditioning noise level per step")
    if not all(0 < float(s) <= 1 for s in sigmas):
        raise ValueError(f"dmd.generator.sigmas={sigmas.tolist()} must lie in (0, 1]")
    if any(float(a) <= float(b) for a, b in zip(sigmas[:-1], sigmas[1:])):
        raise ValueError(f"dmd.generator.sigmas={sigmas.tolist()} must be strictly decreasing")


def _col(sigma: torch.Tensor | float, n: int, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32)
    return (s.expand(n) if s.dim() == 0 else s).to(like.device)


def generator_x0(net: VelocityFn, x: torch.Tensor, sigma, prompt_embeds, pooled) -> torch.Tensor:
    """One generator evaluation: x0_hat = x - sigma * v(x, sigma)."""
    s = _col(sigma, x.shape[0], x)
    return flow.predict_x0(x.float(), s, net(x, s, prompt_embeds, pooled))


def renoise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    return flow.add_noise(x0, eps, _col(sigma, x0.shape[0], x0))


@torch.no_grad()
def simulate_input(net: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, k: int,
                   prompt_embeds, pooled, noise_fn: NoiseFn) -> torch.Tensor:
    """Backward simulation: the generator's own input at step k (k generator steps from noise)."""
    x = noise.float()
    for i in range(k):
        x0 = generator_x0(net, x, sigmas[i], prompt_embeds, pooled)
        x = renoise(x0, noise_fn(tuple(x0.shape)).to(x0), sigmas[i + 1])
    return x


def data_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, k: int) -> torch.Tensor:
    """Without backward simulation: step 0 sees pure noise, step k > 0 a data latent at s_k."""
    if k == 0:
        return noise.float()
    return renoise(latents.float(), noise.float(), sigmas[k])


@torch.no_grad()
def few_step_sample(net: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, prompt_embeds,
                    pooled, noise_fn: NoiseFn) -> torch.Tensor:
    """Run the whole schedule from noise; returns the last step's x0."""
    x = simulate_input(net, noise, sigmas, len(sigmas) - 1, prompt_embeds, pooled, noise_fn)
    return generator_x0(net, x, sigmas[-1], prompt_embeds, pooled)


@torch.no_grad()
def ode_sample(net: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, prompt_embeds,
               pooled) -> torch.Tensor:
    """Euler steps of the flow ODE along the generator's grid, ending at sigma 0 (DMDR "ode")."""
    x = noise.float()
    nxt = torch.cat([sigmas[1:], sigmas.new_zeros(1)])
    for s, s_next in zip(sigmas, nxt):
        x = x + (s_next - s) * net(x, _col(s, x.shape[0], x), prompt_embeds, pooled)
    return x


@torch.no_grad()
def ode_input(net: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, k: int, prompt_embeds,
              pooled, noise_fn: NoiseFn) -> torch.Tensor:
    """DMDR's generator input at step k for the ODE sampler: the final ODE sample re-noised with
    fresh noise to s_k (pure noise when s_k = 1, where the sample would be multiplied by 0)."""
    if float(sigmas[k]) == 1.0:
        return noise.float()
    x0 = ode_sample(net, noise, sigmas, prompt_embeds, pooled)
    return renoise(x0, noise_fn(tuple(x0.shape)).to(x0), sigmas[k])


def transformer_velocity(module, dtype: torch.dtype = torch.float32, device=None) -> VelocityFn:
    """Adapt an SD3Transformer2DModel (or a DeepSpeed engine around one) to `VelocityFn`."""
    def fn(x, sigma, emb, pooled):
        dev = device if device is not None else x.device
        out = module(hidden_states=x.to(dev, dtype), encoder_hidden_states=emb.to(dev, dtype),
                     pooled_projections=pooled.to(dev, dtype),
                     timestep=(sigma * flow.NUM_TRAIN_TIMESTEPS).to(dev, torch.float32),
                     return_dict=False)[0]
        return out.float()
    return fn
