"""Encode image-caption pairs with the model's own VAE and text encoders and write MDS shards
in the `megadiff.train` schema (see `schema.py`)."""
from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from megadiff.data.schema import SCHEMAS, ShardSetInfo
from megadiff.models import sd3


def pil_to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, center-crop, scale to [-1, 1], (3, R, R)."""
    img = img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                     Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float() / 127.5 - 1.0


def write_train_shards(out_dir: str | Path, samples: Iterable[tuple[Image.Image, str]],
                       model_path: str | Path, resolution: int, max_sequence_length: int,
                       batch_size: int = 8, seed: int = 0, dtype: str = "fp32",
                       size_limit: int = 1 << 26) -> ShardSetInfo:
    """Write a complete shard set to `out_dir` (built in a sibling temp dir, then renamed, so
    an interrupted build never leaves a half-written set where a good one is expected)."""
    from streaming import MDSWriter

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} already holds files: choose an empty --out directory")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch_dtype = sd3.DTYPES[dtype]
    vae = sd3.load_vae(model_path, torch_dtype)
    text = sd3.load_text_pipeline(model_path, torch_dtype)
    gen = torch.Generator().manual_seed(seed)
    columns = SCHEMAS["megadiff.train"][1]
    count, info_shape = 0, None
    with MDSWriter(out=str(tmp), columns=columns, size_limit=size_limit) as writer:
        batch: list[tuple[Image.Image, str]] = []

        def flush() -> None:
            nonlocal count, info_shape
            pixels = torch.stack([pil_to_tensor(im, resolution) for im, _ in batch])
            caps = [c for _, c in batch]
            latents = sd3.encode_images(vae, pixels, generator=gen)
            embeds, pooled = sd3.encode_prompts(text, caps, max_sequence_length)
            for i, (im, cap) in enumerate(batch):
                writer.write({
                    "latents": latents[i].float().numpy().astype(np.float16),
                    "prompt_embeds": embeds[i].float().numpy().astype(np.float16),
                    "pooled_prompt_embeds": pooled[i].float().numpy().astype(np.float16),
                    "caption": cap, "width": im.width, "height": im.height,
                })
            count += len(batch)
            info_shape = (tuple(latents.shape[1:]), embeds.shape[1], embeds.shape[2], pooled.shape[1])
            batch.clear()

        for item in samples:
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    if count == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError("no samples to write: the input held no usable image-caption pairs")
    latent_shape, seq, dim, pdim = info_shape
    info = ShardSetInfo("megadiff.train", SCHEMAS["megadiff.train"][0], latent_shape, seq, dim,
                        pdim, count)
    info.write(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return info
