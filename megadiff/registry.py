"""Name -> class for objectives; the trainer class is composed from a recipe's list."""
from __future__ import annotations

from megadiff.objectives.dmd import DMD
from megadiff.objectives.dpo import DPO
from megadiff.objectives.flow_matching import FlowMatching
from megadiff.objectives.refl import ReFL
from megadiff.objectives.srpo import SRPO
from megadiff.objectives.sdpo import SDPO

OBJECTIVES: dict[str, type] = {"flow_matching": FlowMatching, "dmd": DMD}
OBJECTIVES |= {"refl": ReFL, "srpo": SRPO}
OBJECTIVES |= {"dpo": DPO, "sdpo": SDPO}


def compose_trainer(names: list[str]) -> type:
    """`[a, b]` -> `type("Trainer", (B, A, BaseTrainer), {})`: later objectives wrap earlier ones."""
    from megadiff.trainer import BaseTrainer

    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ValueError(f"objective {unknown[0]!r} is unknown: choose from {', '.join(sorted(OBJECTIVES))}")
    bases = tuple(OBJECTIVES[n] for n in reversed(names)) + (BaseTrainer,)
    return type("Trainer", bases, {})
