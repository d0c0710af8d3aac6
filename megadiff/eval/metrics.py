"""CLIP score and reward means of generated images (reward models from megadiff/rewards/).

CLIP score (Hessel et al. 2021, "CLIPScore", arXiv 2104.08718) as torchmetrics computes it
(Lightning-AI/torchmetrics `src/torchmetrics/functional/multimodal/clip_score.py`):
100 * max(cos(E_image, E_text), 0) per image, averaged; the embeddings are those of the CLIP
tower given with `--clip` (a `kind: clip` reward model: open_clip architecture + local
weights), each L2-normalised here.

A reward's figure is the mean of `RewardModel.forward(images, prompts)` over the images,
scored on the saved 8-bit pixels (so scoring the PNG files gives the same numbers).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
import torch.nn.functional as F


def parse_reward_specs(values: list[str]) -> list:
    """`--rewards` values -> RewardConfigs. Each value is `kind=path` (e.g. hpsv2=/w/HPS_v2.1.pt),
    a YAML/JSON file holding one reward mapping or a list of them, or an inline YAML mapping
    (`{kind: clip, path: /w/clip.bin, arch: ViT-H-14}`)."""
    import yaml

    from megadiff.config import RewardConfig, _build

    out = []
    for v in values:
        p = Path(v)
        if p.suffix.lower() in (".yaml", ".yml", ".json") and p.is_file():
            raw = yaml.safe_load(p.read_text())
        elif v.lstrip().startswith("{"):
            raw = yaml.safe_load(v)
        elif "=" in v:
            kind, path = v.split("=", 1)
            raw = {"kind": kind.strip(), "path": path.strip()}
        else:
            raise ValueError(f"--rewards {v!r}: give kind=path (e.g. hpsv2=/w/HPS_v2.1_compressed.pt), "
                             "a YAML/JSON file of reward entries, or an inline {kind: ..., path: ...}")
        items = raw if isinstance(raw, list) else [raw]
        for item in items:
            if not isinstance(item, dict):
                raise ValueError(f"--rewards {v!r}: each reward entry must be a mapping with kind and path")
            out.append(_build(RewardConfig, item, "rewards."))
    names = [reward_name(c) for c in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"--rewards names {sorted(dup)} more than once: give each a distinct `name`")
    return out


def reward_name(cfg) -> str:
    return cfg.name or cfg.kind


def reward_dict(cfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}


def load_reward_model(cfg, device: torch.device, dtype: torch.dtype = torch.float32):
    try:
        from megadiff.rewards.registry import load_reward
    except ImportError as e:   # megadiff/rewards/ is built by another part of the project
        raise ValueError(f"reward models are unavailable in this install ({e}): "
                         "evaluate without --rewards / --clip") from None
    return load_reward(cfg, device, dtype)


@torch.no_grad()
def clip_scores(model, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """[B] CLIP scores: 100 * max(cos(image, text), 0)."""
    img = F.normalize(model.image_features(images).float(), dim=-1)
    txt = F.normalize(model.text_features(prompts).float(), dim=-1)
    return 100.0 * (img * txt).sum(-1).clamp(min=0)


@torch.no_grad()
def batched(fn, images: torch.Tensor, prompts: list[str], batch_size: int,
            device: torch.device) -> list[float]:
    out = []
    for i in range(0, len(prompts), batch_size):
        out += fn(images[i:i + batch_size].to(device), prompts[i:i + batch_size]).float().cpu().tolist()
    return out


def score_images(images: torch.Tensor, prompts: list[str], rewards: list, clip_cfg, batch_size: int,
                 log=lambda msg: None) -> dict[str, list[float]]:
    """Per-image scores: {"clip_score": [...], "<reward name>": [...]}."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, list[float]] = {}
    if clip_cfg is not None:
        log(f"CLIP score with {clip_cfg.path}")
        clip = load_reward_model(clip_cfg, device)
        out["clip_score"] = batched(functools.partial(clip_scores, clip), images, prompts, batch_size, device)
        del clip
    for cfg in rewards:
        log(f"reward {reward_name(cfg)} ({cfg.kind}) with {cfg.path}")
        model = load_reward_model(cfg, device)
        out[reward_name(cfg)] = batched(model, images, prompts, batch_size, device)
        del model
    return out

