"""The contract every objective mixin follows (DESIGN.md section 3).

A trainer class is composed from the recipe's objective list:
`objectives: [dmd, refl]` -> `type("Trainer", (ReFL, DMD, BaseTrainer), {})`. Each mixin
extends these three methods through `super()`; the loop in `megadiff.trainer` calls them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NetSpec:
    trainable: bool
    init: str = "model"       # where the weights come from: "model" = model.path's transformer


class Objective:
    def networks(self) -> dict[str, NetSpec]:
        """Networks this objective needs, by name."""
        return {}

    def steps_this_iteration(self, step: int) -> list[str]:
        """Trainable networks that take an optimizer step at `step`, in order."""
        return []

    def build_extras(self) -> None:
        """Build frozen parts that are not transformers (VAE, reward models) once the engines
        exist; they are never optimised and never saved in checkpoints."""

    def loss_terms(self, net: str, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Named scalar loss terms whose sum is back-propagated into `net`'s engine."""
        return {}

    def rank_state(self) -> dict:
        """This rank's objective state beyond the engines and RNGs (tensors, ints, lists, dicts:
        what `torch.load(weights_only=True)` reads back), saved beside its RNG state so a
        resume is exact (e.g. SDPO's rollout buffer)."""
        return {}

    def load_rank_state(self, state: dict) -> None:
        """Restore what `rank_state` returned (not called on a resume with another rank count)."""
