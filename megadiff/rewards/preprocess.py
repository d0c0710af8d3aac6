"""Differentiable CLIP image preprocessing on tensors in [0, 1].

Reproduces, as tensor ops that back-propagate, what the reward models apply to PIL images:
- open_clip `image_transform(is_train=False)` (open_clip/transform.py; HPSv2's copy in
  hpsv2/src/open_clip/transform.py): `Resize(size, BICUBIC)` of the shortest side,
  `CenterCrop(size)`, `Normalize(OpenAI mean, std)`; with `resize_mode="squash"` (open_clip's
  pretrained cfg for DFN5B, and DMDR's `CLIPImageProcessorTensor` in train_t2i/sd3/rl_utils.py)
  a direct resize to size x size instead.
- HPSv2's `score` (hpsv2/img_score.py builds its transforms with `light_augmentation=True`, so
  `preprocess_val` is `ResizeMaxSize`): `resize_mode="longest"` scales the longest side to
  size (bicubic, each side `round(dim * scale)`) and pads with 0 (black) to size x size,
  half the margin before (floor) and the rest after, before normalising.
- transformers `CLIPImageProcessor`: shortest side to `shortest_edge`, centre crop with a
  floor offset (`(h - crop) // 2`), normalise.
On an image already at the model's resolution the resize and crop are the identity, so the
result equals the libraries' own preprocessing exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocess:
    """[B, 3, H, W] in [0, 1] (float32: CPU bicubic has no bf16 kernel) -> normalised model input."""
    size: int = 224
    resize_mode: Literal["shortest", "squash", "longest"] = "shortest"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    crop_offset: Literal["round", "floor"] = "round"   # torchvision CenterCrop / HF center_crop

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.ndim == 4 and images.shape[1] == 3, f"expected [B, 3, H, W], got {tuple(images.shape)}"
        h, w = images.shape[-2:]
        s = self.size
        if self.resize_mode == "longest":
            return self._normalize(self._letterbox(images))
        if self.resize_mode == "squash":
            target = (s, s)
        elif h <= w:        # torchvision's shortest-side rule: long side = int(size * long / short)
            target = (s, int(s * w / h))
        else:
            target = (int(s * h / w), s)
        if target != (h, w):
            images = F.interpolate(images, size=target, mode="bicubic", align_corners=False, antialias=True)
        return self._normalize(self._center_crop(images))

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def _letterbox(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        s = self.size
        scale = s / max(h, w)
        if scale == 1.0 and h == w:
            return images
        nh, nw = round(h * scale), round(w * scale)
        if (nh, nw) != (h, w):
            images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        ph, pw = s - nh, s - nw
        return F.pad(images, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=0.0)

    def _center_crop(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        s = self.size
        if (h, w) == (s, s):
            return images
        assert h >= s and w >= s, (h, w, s)
        if self.crop_offset == "round":
            top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        else:
            top, left = (h - s) // 2, (w - s) // 2
        return images[..., top:top + s, left:left + s]
