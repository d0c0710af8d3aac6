"""Images for `megadiff eval`, one per prompt, with fixed seeds.

Prompt i starts from noise drawn with `torch.Generator().manual_seed(seed + i)` (shape
[1, C, h, w]), and a few-step generator re-noises prompt i with its own generator seeded
`seed + i + RENOISE_OFFSET`, so an image depends on its prompt and seed only, not on the
batch it was generated in: two evaluations with the same seed start from the same noise.
"""
from __future__ import annotations

import torch
from PIL import Image

from megadiff.eval.source import EULER, Source

RENOISE_OFFSET = 100_003


def initial_noise(n: int, channels: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.cat([torch.randn((1, channels, h, w), generator=torch.Generator().manual_seed(seed + i))
                      for i in range(n)])


def _device_dtype(source: Source) -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


@torch.no_grad()
def generate(source: Source, prompts: list[str], seed: int = 0, batch_size: int = 4,
             log=lambda msg: None) -> list[Image.Image]:
    from megadiff import generator as gen
    from megadiff import sampling, validation
    from megadiff.models import sd3

    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be at least 1")
    device, dtype = _device_dtype(source)
    text = sd3.load_text_pipeline(source.base, torch.float32)
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        e, p = sd3.encode_prompts(text, prompts[i:i + batch_size], source.max_sequence_length)
        embeds.append(e)
        pooled.append(p)
    neg, neg_pool = sd3.encode_prompts(text, [""], source.max_sequence_length)
    del text
    embeds, pooled = torch.cat(embeds), torch.cat(pooled)
    noise = initial_noise(len(prompts), source.channels, source.height, source.width, seed)
    net = source.build_network().to(device)
    if dtype != torch.float32:
        net = net.to(dtype)
    log(f"generating {len(prompts)} images with {source.sampler} ({source.steps} steps) on {device}")
    latents = []
    for i in range(0, len(prompts), batch_size):
        sl = slice(i, i + batch_size)
        x, emb, pool = noise[sl].to(device), embeds[sl].to(device), pooled[sl].to(device)
        b = x.shape[0]
        if source.sampler == EULER:
            out = sampling.euler_sample(net, x, emb, pool, source.steps, source.shift, source.guidance_scale,
                                        neg.expand(b, -1, -1).to(device), neg_pool.expand(b, -1).to(device),
                                        dtype)
        else:
            gens = [torch.Generator().manual_seed(seed + j + RENOISE_OFFSET) for j in range(i, i + b)]

            def noise_fn(shape, gens=gens):
                return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens]).to(device)

            fn = gen.transformer_velocity(net, dtype, device)
            sigmas = torch.tensor(source.sigmas, device=device)
            if source.sample_type == "ode":
                out = gen.ode_sample(fn, x, sigmas, emb, pool)
            else:
                out = gen.few_step_sample(fn, x, sigmas, emb, pool, noise_fn)
        latents.append(out.float().cpu())
    del net
    vae = sd3.load_vae(source.base, torch.float32)
    images = []
    for lat in latents:
        images += validation.to_pil(sd3.decode_latents(vae, lat))
    return images


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] float in [0, 1] (the RewardModel input), exactly the saved pixels."""
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
