"""Fixed validation prompts -> `samples/step-N/` (one PNG per prompt and a grid).

Prompts are encoded once, on rank 0, with the model's own text encoders; the embeddings are
kept in the run directory so that resumes and other ranks never load the encoders again.
Under ZeRO-3 every rank takes part in the sampling forward passes; rank 0 decodes and writes.
"""
from __future__ import annotations

import hashlib
import json
import math

import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file, save_file

from megadiff.models import sd3


def prompt_embeddings(trainer, prompts: list[str]) -> dict[str, torch.Tensor]:
    key = hashlib.sha1(json.dumps([str(trainer.model_path), prompts,
                                   trainer.cfg.model.max_sequence_length]).encode()).hexdigest()[:12]
    path = trainer.run.root / f"validation_embeds-{key}.safetensors"
    if trainer.rank == 0 and not path.is_file():
        text = sd3.load_text_pipeline(trainer.model_path, torch.float32)
        embeds, pooled = sd3.encode_prompts(text, list(prompts) + [""],
                                            trainer.cfg.model.max_sequence_length)
        del text
        trainer.run.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"embeds": embeds[:-1].contiguous(), "pooled": pooled[:-1].contiguous(),
                   "neg_embeds": embeds[-1:].contiguous(), "neg_pooled": pooled[-1:].contiguous()},
                  str(tmp))
        tmp.replace(path)
    if dist.is_initialized():
        dist.barrier()
    return load_file(str(path))


def latent_size(trainer) -> tuple[int, int]:
    v = trainer.cfg.validation
    if v.resolution is not None:
        side = v.resolution // sd3.vae_scale_factor(sd3.vae_config(trainer.model_path))
        return side, side
    assert trainer.shards is not None, "validation.resolution must be set for remote shards"
    return tuple(trainer.shards.latent_shape[1:])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr.cpu()]


def grid(images: list[Image.Image]) -> Image.Image:
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


def write_samples(trainer) -> None:
    e = trainer.val_embeds
    n = e["embeds"].shape[0]
    h, w = latent_size(trainer)
    c = trainer.transformer_config["in_channels"]
    gen = torch.Generator().manual_seed(trainer.cfg.validation.seed)
    noise = torch.randn((n, c, h, w), generator=gen)
    latents = trainer.sample_latents(noise, e)
    if trainer.rank != 0:
        return
    vae = sd3.load_vae(trainer.model_path, torch.float32)
    images = to_pil(sd3.decode_latents(vae, latents.cpu()))
    out = trainer.run.samples / f"step-{trainer.step}"
    out.mkdir(parents=True, exist_ok=True)
    for i, (im, prompt) in enumerate(zip(images, trainer.cfg.validation.prompts)):
        im.save(out / f"{i:03d}.png")
    (out / "prompts.json").write_text(json.dumps(trainer.cfg.validation.prompts, indent=1))
    grid(images).save(out / "grid.png")
    trainer.logger.text(f"wrote {len(images)} validation samples to {out}")
