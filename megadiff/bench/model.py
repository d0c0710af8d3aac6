"""A realistic-width SD3 MMDiT built from config (no weights, no download) and a synthetic
batch shaped like megadiff's cached-latent shards."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

HEAD_DIM = 64                 # SD3 / SD3.5: attention_head_dim
CLIP_TOKENS = 77              # CLIP-L/G tokens in SD3's joint text sequence


@dataclass(frozen=True)
class BenchShape:
    width: int = 1536                 # num_attention_heads x 64 (SD3-Medium: 24 x 64)
    layers: int = 2                   # JointTransformerBlocks
    joint_attention_dim: int = 4096   # T5-XXL width
    pooled_dim: int = 2048            # CLIP-L + CLIP-G pooled
    batch: int = 2
    latent_size: int = 32             # latents are 16 x latent_size x latent_size
    t5_tokens: int = 32               # text sequence = clip_tokens + t5_tokens
    clip_tokens: int = CLIP_TOKENS

    @property
    def text_tokens(self) -> int:
        return self.clip_tokens + self.t5_tokens

    @property
    def image_tokens(self) -> int:
        return (self.latent_size // 2) ** 2

    def check(self) -> None:
        if self.width < HEAD_DIM or self.width % HEAD_DIM:
            raise ValueError(f"--width {self.width} must be a positive multiple of the head size "
                             f"{HEAD_DIM} (SD3-Medium: 1536 = 24 x 64)")
        for flag, v in (("--layers", self.layers), ("--batch", self.batch)):
            if v < 1:
                raise ValueError(f"{flag} {v} must be at least 1")
        if self.latent_size < 2 or self.latent_size % 2:
            raise ValueError(f"latent size {self.latent_size} must be a positive even number")


def shape_of(tc: dict, **kw) -> BenchShape:
    """The BenchShape of a saved transformer config, with batch/latent/text sizes from kw."""
    base = BenchShape(width=tc["num_attention_heads"] * tc["attention_head_dim"],
                      layers=tc["num_layers"], joint_attention_dim=tc["joint_attention_dim"],
                      pooled_dim=tc["pooled_projection_dim"])
    return replace(base, **kw)


def transformer_config(shape: BenchShape) -> dict:
    """SD3-Medium's transformer config with the width and depth of `shape`."""
    return dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16,
        num_layers=shape.layers, attention_head_dim=HEAD_DIM,
        num_attention_heads=shape.width // HEAD_DIM,
        joint_attention_dim=shape.joint_attention_dim, caption_projection_dim=shape.width,
        pooled_projection_dim=shape.pooled_dim, pos_embed_max_size=192,
    )


def build_transformer(shape: BenchShape, seed: int = 0):
    """A randomly initialised fp32 SD3Transformer2DModel in train mode."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**transformer_config(shape)).train()


def save_bench_model(shape: BenchShape, root: str | Path, seed: int = 0) -> Path:
    """Write `root` as a diffusers SD3 directory holding only the transformer, so that
    `megadiff.models.sd3.load_transformer(root)` (what `BaseTrainer.build_network` calls)
    loads it. Returns root."""
    root = Path(root)
    build_transformer(shape, seed).save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.39.0",
        "transformer": ["diffusers", "SD3Transformer2DModel"]}, indent=1))
    return root


def synthetic_batch(shape: BenchShape, seed: int = 0) -> dict:
    """The keys `BaseTrainer.next_batch` yields: latents, prompt_embeds, pooled_prompt_embeds."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b, s = shape.batch, shape.latent_size
    return {"latents": torch.randn(b, 16, s, s, generator=g),
            "prompt_embeds": torch.randn(b, shape.text_tokens, shape.joint_attention_dim, generator=g),
            "pooled_prompt_embeds": torch.randn(b, shape.pooled_dim, generator=g)}


def describe(shape: BenchShape, n_params: int, dtype: str) -> str:
    return (f"SD3Transformer2DModel width {shape.width} ({shape.width // HEAD_DIM} heads x {HEAD_DIM}), "
            f"{shape.layers} blocks, {n_params / 1e6:.1f}M params; batch {shape.batch}, latents "
            f"16x{shape.latent_size}x{shape.latent_size} ({shape.image_tokens} tokens), text "
            f"{shape.text_tokens}x{shape.joint_attention_dim}, {dtype}")
