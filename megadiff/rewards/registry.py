"""Reward kind -> loader, and `RewardSet`: the frozen reward models a run scores with.

Reward models are frozen (eval mode, no gradients to their weights), replicated on every rank
in the run's dtype, never given to DeepSpeed, never optimised and never saved in checkpoints;
gradients still flow through them to the images (ReFL).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from megadiff.config import RewardConfig
from megadiff.rewards.base import RewardModel

KINDS = ("hpsv2", "clip", "pickscore", "aesthetic", "imagereward")


def reward_name(cfg: RewardConfig) -> str:
    return cfg.name or cfg.kind


def load_reward(cfg: RewardConfig, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> RewardModel:
    """Build the reward `cfg` describes from its local files; raises a one-line ValueError for a
    missing, truncated or wrong-architecture checkpoint."""
    from megadiff.rewards.aesthetic import load_aesthetic
    from megadiff.rewards.imagereward import load_imagereward
    from megadiff.rewards.open_clip_reward import load_clip, load_hpsv2
    from megadiff.rewards.pickscore import load_pickscore

    name = reward_name(cfg)
    if cfg.kind == "hpsv2":
        model = load_hpsv2(cfg.path, cfg.arch, name)
    elif cfg.kind == "clip":
        model = load_clip(cfg.path, cfg.arch, name)
    elif cfg.kind == "pickscore":
        model = load_pickscore(cfg.path, cfg.clip_path, dtype, name)
    elif cfg.kind == "aesthetic":
        model = load_aesthetic(cfg.path, cfg.clip_path, cfg.arch, name)
    elif cfg.kind == "imagereward":
        model = load_imagereward(cfg.path, cfg.clip_path, name)
    else:
        raise ValueError(f"reward kind {cfg.kind!r} is unknown: choose one of {', '.join(KINDS)}")
    return freeze(model.to(device=device, dtype=dtype))


def freeze(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


class RewardSet(nn.Module):
    """Several named rewards with weights. `scores` -> {name: [B]}; `weighted` -> sum_k w_k f(s_k)."""

    def __init__(self, models: dict[str, RewardModel], weights: dict[str, float]):
        super().__init__()
        assert set(models) == set(weights), (sorted(models), sorted(weights))
        self.models = nn.ModuleDict(models)
        self.weights = dict(weights)

    @classmethod
    def from_configs(cls, cfgs: list[RewardConfig], device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> RewardSet:
        names = [reward_name(c) for c in cfgs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rewards: two rewards are named {dup[0]!r}: give each a distinct name=")
        return cls({n: load_reward(c, device, dtype) for n, c in zip(names, cfgs)},
                   {n: c.weight for n, c in zip(names, cfgs)})

    def names(self) -> list[str]:
        return list(self.models)

    def scores(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """images [B, 3, H, W] in [0, 1] -> {name: float32 [B]}, differentiable in `images`."""
        assert images.shape[0] == len(prompts), (images.shape, len(prompts))
        return {n: m(images, prompts).float() for n, m in self.models.items()}

    def weighted(self, scores: dict[str, torch.Tensor],
                 per_reward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """sum_k w_k * per_reward(s_k) (per_reward defaults to the identity), shape [B];
        e.g. ReFL's hinge: `per_reward=lambda s: relu(margin - s)`."""
        f = per_reward or (lambda s: s)
        return sum(self.weights[n] * f(scores[n]) for n in self.models)

    def train(self, mode: bool = True) -> RewardSet:
        return super().train(False)     # frozen: dropout stays off even if a parent calls train()
