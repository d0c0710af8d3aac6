"""What each builder does to one batch: `prepare` (CPU: decode, resize, crop; runs in a
prefetch thread) and `encode` (the VAE / text encoders, batched), returning MDS records in the
schema's columns (float16 arrays) or `Skip`s.

  TrainProcessor    image + caption -> megadiff.train
  PromptProcessor   caption -> megadiff.prompts, or megadiff.prompt_embeds with a model
  PairProcessor     caption + preferred/other image -> megadiff.pairs
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megadiff.data.encode import Encoders, sample_seed
from megadiff.data.images import (BadImage, aspect_buckets, cover_and_crop, nearest_bucket,
                                  open_image, to_tensor)
from megadiff.data.sources import Item, Skip
from megadiff.models import sd3


@dataclass
class Prepared:
    item: Item
    pixels: list[torch.Tensor]        # one (3, H, W) tensor per image
    sizes: list[tuple[int, int]]      # original (width, height) per image


def _f16(x: torch.Tensor) -> np.ndarray:
    return x.float().numpy().astype(np.float16)


def _finite(*arrays: np.ndarray) -> bool:
    return all(np.isfinite(a).all() for a in arrays)


class _ImageMixin:
    """Decode + fit images to a square of `resolution` (center crop) or to the nearest
    aspect-ratio bucket."""

    def __init__(self, settings: dict, device: str):
        self._setup_images(settings)
        self.enc = Encoders(settings["model"], settings["dtype"], device,
                            max_sequence_length=settings["max_sequence_length"])

    def _setup_images(self, s: dict) -> None:
        self.resolution = int(s["resolution"])
        self.buckets = aspect_buckets(self.resolution) if s.get("resize") == "buckets" else None
        self.min_size = int(s.get("min_size") or 0)
        self.seed = int(s.get("seed", 0))
        self.sample_latents = s.get("latents", "sample") == "sample"

    def prepare(self, item: Item) -> Prepared | Skip:
        """Decode every image of the item; fit all of them to the first one's bucket (a pair
        shares one shape) or to the square."""
        imgs = []
        for ref in item.images:
            try:
                img = open_image(ref)
            except BadImage as e:
                return Skip(item.key, "bad_image", str(e))
            if min(img.size) < self.min_size:
                return Skip(item.key, "too_small", f"{img.width}x{img.height} < --min-size "
                                                   f"{self.min_size}")
            imgs.append(img)
        w, h = imgs[0].size
        tw, th = nearest_bucket(w, h, self.buckets) if self.buckets else (self.resolution,) * 2
        return Prepared(item, [to_tensor(cover_and_crop(im, tw, th)) for im in imgs],
                        [im.size for im in imgs])

    def geometry(self, record: dict) -> dict:
        g = geometry(self.schema, record)
        if self.buckets:   # mixed shapes: the set's nominal shape is the square bucket's
            f = sd3.vae_scale_factor(self.enc.vae.config)
            g["latent_shape"] = [g["latent_shape"][0], self.resolution // f, self.resolution // f]
        return g

    def _latents(self, pixels: list[torch.Tensor], keys: list[str]) -> list[torch.Tensor]:
        """Encode, batching equal shapes together; results in input order."""
        out: list[torch.Tensor | None] = [None] * len(pixels)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault(tuple(p.shape), []).append(i)
        for idx in groups.values():
            seeds = [sample_seed(self.seed, keys[i]) for i in idx] if self.sample_latents else None
            lat = self.enc.latents(torch.stack([pixels[i] for i in idx]), seeds)
            for j, i in enumerate(idx):
                out[i] = lat[j]
        return out


class TrainProcessor(_ImageMixin):
    schema = "megadiff.train"
    unit = "img"

    def encode(self, batch: list[Prepared]) -> list[tuple[str, dict] | Skip]:
        keys = [p.item.key for p in batch]
        latents = self._latents([p.pixels[0] for p in batch], keys)
        embeds, pooled = self.enc.prompts([p.item.caption for p in batch])
        out = []
        for i, p in enumerate(batch):
            rec = {"latents": _f16(latents[i]), "prompt_embeds": _f16(embeds[i]),
                   "pooled_prompt_embeds": _f16(pooled[i]), "caption": p.item.caption,
                   "width": p.sizes[0][0], "height": p.sizes[0][1]}
            ok = _finite(rec["latents"], rec["prompt_embeds"], rec["pooled_prompt_embeds"])
            out.append((p.item.key, rec) if ok else Skip(p.item.key, "non_finite"))
        return out


class PairProcessor(_ImageMixin):
    schema = "megadiff.pairs"
    unit = "pair"

    def encode(self, batch: list[Prepared]) -> list[tuple[str, dict] | Skip]:
        keys = [f"{p.item.key}#{side}" for p in batch for side in ("w", "l")]
        latents = self._latents([x for p in batch for x in p.pixels], keys)
        embeds, pooled = self.enc.prompts([p.item.caption for p in batch])
        out = []
        for i, p in enumerate(batch):
            rec = {"latents_w": _f16(latents[2 * i]), "latents_l": _f16(latents[2 * i + 1]),
                   "prompt_embeds": _f16(embeds[i]), "pooled_prompt_embeds": _f16(pooled[i]),
                   "caption": p.item.caption, "label_w": float(p.item.label_w)}
            ok = _finite(rec["latents_w"], rec["latents_l"], rec["prompt_embeds"],
                         rec["pooled_prompt_embeds"])
            out.append((p.item.key, rec) if ok else Skip(p.item.key, "non_finite"))
        return out


class PromptProcessor:
    unit = "prompt"

    def __init__(self, settings: dict, device: str):
        self.enc = None
        if settings.get("model"):
            self.enc = Encoders(settings["model"], settings["dtype"], device, vae=False,
                                max_sequence_length=settings["max_sequence_length"])
        self.schema = "megadiff.prompt_embeds" if self.enc else "megadiff.prompts"

    def prepare(self, item: Item) -> Prepared:
        return Prepared(item, [], [])

    def geometry(self, record: dict) -> dict:
        return geometry(self.schema, record)

    def encode(self, batch: list[Prepared]) -> list[tuple[str, dict] | Skip]:
        caps = [p.item.caption for p in batch]
        if self.enc is None:
            return [(p.item.key, {"caption": c}) for p, c in zip(batch, caps)]
        embeds, pooled = self.enc.prompts(caps)
        out = []
        for i, p in enumerate(batch):
            rec = {"caption": caps[i], "prompt_embeds": _f16(embeds[i]),
                   "pooled_prompt_embeds": _f16(pooled[i])}
            ok = _finite(rec["prompt_embeds"], rec["pooled_prompt_embeds"])
            out.append((p.item.key, rec) if ok else Skip(p.item.key, "non_finite"))
        return out


PROCESSORS = {"build": TrainProcessor, "pairs": PairProcessor, "prompts": PromptProcessor}


def geometry(schema: str, record: dict) -> dict:
    """The ShardSetInfo geometry fields of one record."""
    lat = record.get("latents", record.get("latents_w"))
    emb, pooled = record.get("prompt_embeds"), record.get("pooled_prompt_embeds")
    return {"latent_shape": list(lat.shape) if lat is not None else [0, 0, 0],
            "text_seq_len": int(emb.shape[0]) if emb is not None else 0,
            "text_dim": int(emb.shape[1]) if emb is not None else 0,
            "pooled_dim": int(pooled.shape[0]) if pooled is not None else 0}
