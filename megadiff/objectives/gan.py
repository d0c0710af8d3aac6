"""The GAN term of DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation",
tianweiy/DMD2 `main/sd_guidance.py`: `cls_pred_branch`, `compute_cls_logits`,
`compute_generator_clean_cls_loss`, `compute_guidance_clean_cls_loss`).

A small discriminator head reads the fake score's intermediate features (the image tokens a
forward hook takes from one MMDiT block) and gives one logit per sample. Its parameters live
inside the fake-score network, hence in the fake score's DeepSpeed engine, optimizer and
checkpoint. Non-saturating losses:

    generator:      L_G = softplus(-D(x_fake))                      (weight ~5e-3)
    discriminator:  L_D = softplus(D(x_fake)) + softplus(-D(x_real))  (weight ~1e-2)

with x_real the training shards' cached latents and x_fake = sg(G's x0) for L_D. The same
logit estimates log p_real/p_fake (the optimum of L_D), which the f-divergence weighting in
`megadiff.objectives.dmd` uses as its density ratio.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def _groups(channels: int) -> int:
    """GroupNorm groups of at least 4 channels (32 groups for 128+ channels)."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


class DiscriminatorHead(nn.Module):
    """Tokens (B, N, D) on an h x w grid -> one logit per sample. Two strided 4x4 convolutions
    (GroupNorm after the first; none after the second, whose map may be 1x1, where a norm would
    erase everything) with SiLU and a 1x1 projection, averaged over what is left of the grid
    (the shape of DMD2's SD head, sized for a token grid rather than a UNet bottleneck)."""

    def __init__(self, dim: int, channels: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, channels, kernel_size=4, stride=2, padding=1),
            nn.GroupNorm(_groups(channels), channels), nn.SiLU(),
            nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(channels, 1, kernel_size=1))

    def forward(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, d = tokens.shape
        assert n == h * w, f"{n} tokens do not fill a {h}x{w} grid"
        grid = tokens.transpose(1, 2).reshape(b, d, h, w)
        return self.net(grid).mean(dim=(1, 2, 3))


class ScoreWithHead(nn.Module):
    """The fake score with its discriminator head. `forward(..., discriminate=True)` returns
    (velocity, logits): the head reads block `block`'s image tokens, captured by a forward
    hook during the same transformer pass, so one engine call gives both."""

    def __init__(self, transformer: nn.Module, block: int, channels: int = 256):
        super().__init__()
        self.transformer = transformer
        cfg = transformer.config
        self.patch_size = cfg.patch_size
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.head = DiscriminatorHead(dim, channels)
        self.block = block
        self._features: torch.Tensor | None = None
        self._capture = False
        blocks = _base(transformer).transformer_blocks
        blocks[block].register_forward_hook(self._hook)

    @property
    def config(self):
        return self.transformer.config

    def _hook(self, module, args, output):
        if self._capture:
            self._features = output[1]          # JointTransformerBlock -> (context, image tokens)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                return_dict: bool = False, discriminate: bool = False):
        self._capture, self._features = discriminate, None
        try:
            v = self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 pooled_projections=pooled_projections, timestep=timestep,
                                 return_dict=False)[0]
        finally:
            self._capture = False
        if not discriminate:
            return (v,)
        feats, self._features = self._features, None
        assert feats is not None, "the discriminator hook saw no features"
        h, w = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        return v, self.head(feats, h, w)


def _base(transformer: nn.Module) -> nn.Module:
    """The SD3Transformer2DModel inside a peft wrapper, or the model itself."""
    get = getattr(transformer, "get_base_model", None)
    return get() if callable(get) else transformer


def default_block(num_layers: int) -> int:
    return num_layers // 2
