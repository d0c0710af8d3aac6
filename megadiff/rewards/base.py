"""The interface every reward model implements (HPSv2.1, CLIP, PickScore, aesthetic, ...).

Images come in as float tensors in [0, 1], shape [B, 3, H, W] (a VAE decode mapped by
`(x / 2 + 0.5).clamp(0, 1)`), and each model applies its own preprocessing as differentiable
tensor ops (resize, crop, normalise), so ReFL can back-propagate through the score. The same
models score PIL images for evaluation through `score_pil`.
"""
from __future__ import annotations

import torch
from torch import nn


class RewardModel(nn.Module):
    """A frozen scorer: `forward(images, prompts) -> [B]` scores, differentiable in `images`."""

    name: str = "reward"
    uses_text: bool = True          # False for prompt-free scorers (aesthetic)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> the model's image embedding (preprocessing included)."""
        raise NotImplementedError

    def text_features(self, prompts: list[str]) -> torch.Tensor | None:
        """Prompts -> the model's text embedding (None for prompt-free scorers)."""
        return None

    def score_features(self, image_features: torch.Tensor,
                       text_features: torch.Tensor | None) -> torch.Tensor:
        """Per-sample score from paired image and text embeddings ([B])."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_features(self.image_features(images), self.text_features(prompts))

    @torch.no_grad()
    def score_pil(self, images: list, prompts: list[str]) -> torch.Tensor:
        """Evaluation: PIL images (any sizes) -> [B] float32 scores, one image at a time."""
        from torchvision.transforms.functional import pil_to_tensor

        assert len(images) == len(prompts), (len(images), len(prompts))
        out = [self(pil_to_tensor(im.convert("RGB")).float().div(255).unsqueeze(0), [p])
               for im, p in zip(images, prompts)]
        return torch.cat(out).float().cpu()
