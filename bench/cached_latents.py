"""Training step time with cached latents and text embeddings (what megadiff's shards hold)
vs encoding every batch on the fly with the VAE and text encoders, at the same config.

    python bench/cached_latents.py [--resolution 256] [--batch 2] [--steps 3]

The transformer is 2 MMDiT blocks of width 768 (12 heads x 64), the VAE has SD3's widths
(128, 256, 512, 512), the text encoders are the tiny ones (real CLIP-L/G + T5-XXL would widen
the gap further). Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megadiff import flow
from megadiff.models import sd3
from megadiff.models.tiny import make_tiny_sd3


def build(root: Path, resolution: int):
    from diffusers import AutoencoderKL, SD3Transformer2DModel

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text, vae, transformer = build(Path(tmp), args.resolution)
    opt = torch.optim.AdamW(transformer.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1
    prompts = ["a red square on a blue background"] * args.batch
    cached = (sd3.encode_images(vae, images, g), *sd3.encode_prompts(text, prompts, 32))

    def step(latents, embeds, pooled):
        eps = torch.randn(latents.shape, generator=g)
        sigma = flow.sample_sigmas(latents.shape[0], "logit_normal", g, shift=3.0)
        v = transformer(hidden_states=flow.add_noise(latents, eps, sigma), encoder_hidden_states=embeds,
                        pooled_projections=pooled, timestep=sigma * 1000, return_dict=False)[0]
        flow.flow_matching_loss(v, latents, eps, sigma).backward()
        opt.step()
        opt.zero_grad()

    def timed(fn) -> float:
        fn()                                   # warm-up
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    t_cached = timed(lambda: step(*cached))
    t_fly = timed(lambda: step(sd3.encode_images(vae, images, g), *sd3.encode_prompts(text, prompts, 32)))
    t_encode = timed(lambda: (sd3.encode_images(vae, images, g), sd3.encode_prompts(text, prompts, 32)))
    print(f"config: {args.resolution}px, batch {args.batch}, transformer width 768 x 2 blocks, "
          f"SD3-width VAE, tiny text encoders, {torch.get_num_threads()} threads")
    print(f"{'step':<28}{'s/step':>10}{'vs cached':>12}")
    print(f"{'cached latents + embeds':<28}{t_cached:>10.3f}{1.0:>11.2f}x")
    print(f"{'encode on the fly':<28}{t_fly:>10.3f}{t_fly / t_cached:>11.2f}x")
    print(f"{'  of which encoding':<28}{t_encode:>10.3f}{t_encode / t_cached:>11.2f}x")


if __name__ == "__main__":
    main()
