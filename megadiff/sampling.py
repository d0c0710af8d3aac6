"""Euler ODE sampling of the SD3 probability-flow ODE with classifier-free guidance.

Runs on the training module itself (a DeepSpeed engine or a plain transformer), so under
ZeRO-3 every rank must call it with the same arguments; only rank 0 needs the result.
"""
from __future__ import annotations

import torch

from megadiff import flow


@torch.no_grad()
def euler_sample(transformer, noise: torch.Tensor, prompt_embeds: torch.Tensor,
                 pooled: torch.Tensor, num_steps: int, shift: float,
                 guidance_scale: float = 1.0, neg_embeds: torch.Tensor | None = None,
                 neg_pooled: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
    sigmas = flow.inference_sigmas(num_steps, shift)
    x = noise.float()
    cfg = guidance_scale != 1.0
    if cfg and neg_embeds is None:
        raise ValueError("guidance_scale != 1 needs negative (empty-prompt) embeddings")
    # everything on the noise's device (the validation embeddings are kept on the CPU)
    prompt_embeds, pooled = prompt_embeds.to(x.device), pooled.to(x.device)
    if cfg:
        neg_embeds, neg_pooled = neg_embeds.to(x.device), neg_pooled.to(x.device)
    for i in range(num_steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        if cfg:
            inp = torch.cat([x, x])
            emb, pool = torch.cat([neg_embeds, prompt_embeds]), torch.cat([neg_pooled, pooled])
        else:
            inp, emb, pool = x, prompt_embeds, pooled
        t = torch.full((inp.shape[0],), float(s) * flow.NUM_TRAIN_TIMESTEPS, device=x.device)
        v = transformer(hidden_states=inp.to(dtype), encoder_hidden_states=emb.to(dtype),
                        pooled_projections=pool.to(dtype), timestep=t,   # fp32, as in training
                        return_dict=False)[0].float()
        if cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        x = x + (s_next - s) * v
    return x
