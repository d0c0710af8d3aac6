"""In-memory shard sets for the preference objectives: `write_records` (any megadiff schema,
one part, built beside `out` and renamed into place, as `megadiff.data.writer.write_train_shards`
does), and the embedded demos' synthetic sets: preference pairs of coloured shapes (the image
that matches its caption is preferred) and prompts with cached embeddings."""
from __future__ import annotations

import random
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from megadiff.data.schema import SCHEMAS, ShardSetInfo



def write_records(out_dir: str | Path, schema: str, records: Iterable[tuple[str, dict]],
                  builder: str, settings: dict | None = None) -> ShardSetInfo:
    """Write (key, record) pairs as a complete `schema` set at `out_dir` (which must be empty)."""
    from megadiff.data import shardset
    from megadiff.data.processors import geometry
    from megadiff.data.writer import PartWriter, write_done

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already holds files: choose an empty output directory")
    staging = shardset.staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    part = "part-00000"
    writer = PartWriter(staging / part, SCHEMAS[schema][1])
    t0 = time.time()
    for key, rec in records:
        writer.write(key, rec)
    counts = writer.finish()
    if counts["written"] == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"no samples to write to {out}")
    geo = geometry(schema, writer.first)
    done = {"fingerprint": None, "slice": {"index": 0, "format": "memory"}, **counts,
            "geometry": geo, "seconds": time.time() - t0}
    write_done(staging / part, done)
    info = ShardSetInfo(schema, SCHEMAS[schema][0], tuple(geo["latent_shape"]), geo["text_seq_len"],
                        geo["text_dim"], geo["pooled_dim"], counts["written"])
    build = {"job": builder, "fingerprint": None, "settings": settings or {},
             "summary": shardset.summarize([done])}
    shardset.finalize(staging, [part], info, [build])
    shardset.swap_into_place(staging, out)
    return info


def _f16(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float16).numpy()


def shape_image(fg, bg, shape: str, box, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=fg)
    return img


def demo_pair_images(n: int, size: int, seed: int):
    """n (caption, preferred image, other image): the same shape and layout, the preferred one
    in the caption's colour, the other in a different one."""
    from megadiff.data.synthetic import COLOURS, SHAPES

    rng = random.Random(seed)
    names = list(COLOURS)
    for _ in range(n):
        fg, bg = rng.sample(names, 2)
        wrong = rng.choice([c for c in names if c not in (fg, bg)])
        shape = rng.choice(SHAPES)
        r = rng.randint(size // 6, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        yield (f"a {fg} {shape} on a {bg} background",
               shape_image(COLOURS[fg], COLOURS[bg], shape, box, size),
               shape_image(COLOURS[wrong], COLOURS[bg], shape, box, size))


@torch.no_grad()
def write_pairs(out_dir: str | Path, triples, model_path: str | Path, resolution: int,
                max_sequence_length: int, seed: int = 0) -> ShardSetInfo:
    """(caption, preferred PIL, other PIL) triples -> a `megadiff.pairs` set (label_w = 1),
    encoded with the model's VAE (a seeded latent draw per image) and text encoders."""
    from megadiff.data.images import pil_to_tensor
    from megadiff.models import sd3

    vae = sd3.load_vae(model_path)
    text = sd3.load_text_pipeline(model_path)
    triples = list(triples)
    caps = [c for c, _, _ in triples]
    embeds, pooled = sd3.encode_prompts(text, caps, max_sequence_length)
    gen = torch.Generator().manual_seed(seed)
    pix = torch.stack([pil_to_tensor(im, resolution) for _, w, l in triples for im in (w, l)])
    lat = sd3.encode_images(vae, pix, gen)
    records = ((f"pair-{i:06d}", {"latents_w": _f16(lat[2 * i]), "latents_l": _f16(lat[2 * i + 1]),
                                 "prompt_embeds": _f16(embeds[i]), "pooled_prompt_embeds": _f16(pooled[i]),
                                 "caption": c, "label_w": 1.0})
               for i, c in enumerate(caps))
    return write_records(out_dir, "megadiff.pairs", records, "write_pairs",
                         {"model": str(model_path), "resolution": resolution, "seed": seed})


def write_demo_pairs(out_dir: str | Path, model_path: str | Path, n: int, seed: int = 0) -> ShardSetInfo:
    from megadiff.models.tiny import TINY_RESOLUTION, TINY_T5_MAX_LENGTH

    return write_pairs(out_dir, demo_pair_images(n, TINY_RESOLUTION, seed), model_path,
                       TINY_RESOLUTION, TINY_T5_MAX_LENGTH, seed)


def demo_prompts(n: int, seed: int = 0) -> list[str]:
    from megadiff.data.synthetic import COLOURS, SHAPES

    rng = random.Random(seed)
    names = list(COLOURS)
    out = []
    for _ in range(n):
        fg, bg = rng.sample(names, 2)
        out.append(f"a {fg} {rng.choice(SHAPES)} on a {bg} background")
    return out


@torch.no_grad()
def write_prompt_embeds(out_dir: str | Path, prompts: list[str], model_path: str | Path,
                        max_sequence_length: int) -> ShardSetInfo:
    """Prompts -> a `megadiff.prompt_embeds` set (what `megadiff data prompts --model` writes)."""
    from megadiff.models import sd3

    text = sd3.load_text_pipeline(model_path)
    embeds, pooled = sd3.encode_prompts(text, prompts, max_sequence_length)
    records = ((f"prompt-{i:06d}", {"caption": p, "prompt_embeds": _f16(embeds[i]),
                                   "pooled_prompt_embeds": _f16(pooled[i])})
               for i, p in enumerate(prompts))
    return write_records(out_dir, "megadiff.prompt_embeds", records, "write_prompt_embeds",
                         {"model": str(model_path), "max_sequence_length": max_sequence_length})
