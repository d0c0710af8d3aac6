"""Latents -> images that the reward models read."""
from __future__ import annotations

import torch


def decode_for_reward(vae, latents: torch.Tensor) -> torch.Tensor:
    """Cached-space latents (`(z - shift) * scale`) -> images [B, 3, H, W] in [0, 1], float32,
    differentiable in `latents` (the VAE's weights are frozen; the graph is kept).

    The same decode as megadiff.models.sd3.decode_latents, which runs under no_grad and so
    cannot serve ReFL; then x / 2 + 0.5 clamped to [0, 1], as diffusers'
    `VaeImageProcessor.postprocess(output_type="pt")` does in DMDR's ReFL
    (vvvvvjdy/dmdr train_t2i/sd3/train_sd3_refl_deepspeed.py).
    """
    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return (vae.decode(z).sample.float().clamp(-1, 1) / 2 + 0.5).clamp(0, 1)
