"""Image decoding and geometry for the shard builders: open (with checks), resize + center-crop
to a square or to an aspect-ratio bucket, and scale to the [-1, 1] tensors the VAE takes."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class BadImage(Exception):
    """The bytes are not a complete, decodable image (the message says why)."""


def open_image(src: bytes | str | Path | Image.Image) -> Image.Image:
    """Decode fully (so a truncated file fails here, not later), apply the EXIF orientation, and
    return RGB (transparent pixels over white)."""
    try:
        if isinstance(src, Image.Image):
            img = src
        else:
            img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        else:
            img = img.convert("RGB")
    except FileNotFoundError as e:
        raise BadImage(f"no such file: {e.filename}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise BadImage(f"{type(e).__name__}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise BadImage(f"empty image ({img.width}x{img.height})")
    return img


def cover_and_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize (bicubic) so the image covers width x height, then crop the center."""
    scale = max(width / img.width, height / img.height)
    w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image) -> "torch.Tensor":  # noqa: F821
    """RGB image -> (3, H, W) float32 in [-1, 1]."""
    import torch

    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float() / 127.5 - 1.0


def pil_to_tensor(img: Image.Image, resolution: int) -> "torch.Tensor":  # noqa: F821
    """Resize the short side to `resolution`, center-crop, scale to [-1, 1], (3, R, R)."""
    return to_tensor(cover_and_crop(img.convert("RGB"), resolution, resolution))


def aspect_buckets(resolution: int, step: int | None = None,
                   max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step` (default resolution / 16, at least 16: 64 at
    1024 px as in SDXL's buckets), with at most resolution^2 pixels and aspect ratios up to
    `max_ratio`, sorted by aspect ratio."""
    step = step or max(16, resolution // 16)
    area = resolution * resolution
    sizes = set()
    for w in range(step, resolution + 1, step):      # the short side
        h = area // w // step * step                   # the long side, area <= resolution^2
        if h >= w and h / w <= max_ratio:
            sizes.update({(w, h), (h, w)})
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log ratio) to width/height."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))
