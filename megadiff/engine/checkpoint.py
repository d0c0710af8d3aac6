"""Save and resume every trainable engine plus the trainer's own state, exactly.

`latest` is rewritten only after all ranks have finished writing a checkpoint, so a crash
while saving leaves the previous checkpoint as the one `--resume auto` picks up.
"""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from megadiff.engine.run_dir import RunDir


def tag_for(step: int) -> str:
    return f"step-{step}"


def capture_rng(noise_rng: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "noise": noise_rng.get_state(),
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def restore_rng(state: dict, noise_rng: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise_rng.set_state(state["noise"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(run: RunDir, engines: dict, trainer_state: dict, rng_state: dict, rank: int,
         keep_last: int = 0) -> str:
    tag = tag_for(trainer_state["step"])
    ckpt = run.tag_dir(tag)
    _barrier()
    if rank == 0 and ckpt.exists():      # left by a crash mid-save; `latest` never named it
        shutil.rmtree(ckpt)
    _barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(ckpt), tag=name, save_latest=False)
    (ckpt / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state, ckpt / "rng" / f"rank{rank}.pt")
    if rank == 0:
        (ckpt / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    _barrier()
    if rank == 0:
        run.write_latest(tag)
        if keep_last:
            _prune(run, keep_last)
    _barrier()
    return tag


def _prune(run: RunDir, keep_last: int) -> None:
    tags = sorted((p for p in run.checkpoints.glob("step-*") if p.is_dir()),
                  key=lambda p: int(p.name.split("-")[1]))
    for old in tags[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load(run: RunDir, engines: dict, rank: int, tag: str | None = None) -> tuple[dict, dict | None]:
    """Load `tag` (default: latest) into the engines; returns (trainer_state, this rank's RNG
    state or None when the checkpoint was written with a different rank count)."""
    tag = tag or run.latest_tag()
    assert tag is not None, "load() called without a checkpoint"
    ckpt = run.tag_dir(tag)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for name, engine in engines.items():
        if not (ckpt / name).is_dir():
            raise ValueError(f"{ckpt} has no state for network {name!r}: it was written by a "
                             "run with other objectives; resume with the same recipe")
        path, _ = engine.load_checkpoint(str(ckpt), tag=name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"could not load {ckpt / name}: the checkpoint is incomplete")
    rng_file = ckpt / "rng" / f"rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    return state, rng
