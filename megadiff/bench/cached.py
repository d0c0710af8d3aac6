"""Training step time with cached latents and text embeddings (what megadiff's shards hold)
vs encoding every batch on the fly with the VAE and text encoders, at the same config.

The transformer is 2 MMDiT blocks of width 768 (12 heads x 64), the VAE has SD3's widths
(128, 256, 512, 512; random weights: the cost does not depend on them), the text encoders are
the tiny ones (real CLIP-L/G + T5-XXL would widen the gap further). Used by `megadiff bench`
and `bench/cached_latents.py`.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(root: Path, resolution: int):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from megadiff.models import sd3
    from megadiff.models.tiny import make_tiny_sd3

    model = make_tiny_sd3(root / "model")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
                        use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5305).eval().requires_grad_(False)
    transformer = SD3Transformer2DModel(sample_size=resolution // 8, patch_size=2, in_channels=16,
                                        num_layers=2, attention_head_dim=64, num_attention_heads=12,
                                        joint_attention_dim=64, caption_projection_dim=768,
                                        pooled_projection_dim=64, out_channels=16,
                                        pos_embed_max_size=resolution // 16)
    return sd3.load_text_pipeline(model), vae, transformer


def cached_vs_on_the_fly(resolution: int = 256, batch: int = 2, steps: int = 3) -> dict:
    """Median s/step: cached inputs, encode on the fly, and the encoding alone."""
    from megadiff import flow
    from megadiff.models import sd3

    with tempfile.TemporaryDirectory() as tmp:
        text, vae, transformer = build(Path(tmp), resolution)
    opt = torch.optim.AdamW(transformer.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1
    prompts = ["a red square on a blue background"] * batch
    cached = (sd3.encode_images(vae, images, g), *sd3.encode_prompts(text, prompts, 32))

    def step(latents, embeds, pooled):
        eps = torch.randn(latents.shape, generator=g)
        sigma = flow.sample_sigmas(latents.shape[0], "logit_normal", g, shift=3.0)
        v = transformer(hidden_states=flow.add_noise(latents, eps, sigma), encoder_hidden_states=embeds,
                        pooled_projections=pooled, timestep=sigma * 1000, return_dict=False)[0]
        flow.flow_matching_loss(v, latents, eps, sigma).backward()
        opt.step()
        opt.zero_grad()

    fns = {"cached": lambda: step(*cached),
           "fly": lambda: step(sd3.encode_images(vae, images, g), *sd3.encode_prompts(text, prompts, 32)),
           "encode": lambda: (sd3.encode_images(vae, images, g), sd3.encode_prompts(text, prompts, 32))}
    for fn in fns.values():
        fn()                                   # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for i in range(steps):                     # interleaved, order reversed every other round,
        for k in (order if i % 2 == 0 else order[::-1]):   # so load drift hits all three alike
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    t_cached, t_fly, t_encode = (statistics.median(times[k]) for k in ("cached", "fly", "encode"))
    return {"resolution": resolution, "batch": batch, "steps": steps, "cached_s": t_cached,
            "on_the_fly_s": t_fly, "encode_s": t_encode, "threads": torch.get_num_threads()}
