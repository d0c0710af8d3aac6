"""Save and resume every trainable engine plus the trainer's own state, exactly.

`latest` is rewritten only after all ranks have finished writing a checkpoint, so a crash
while saving leaves the previous checkpoint as the one `--resume auto` picks up.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megadiff.engine.run_dir import RunDir
from megadiff.errors import RunStopped


def tag_for(step: int) -> str:
    return f"step-{step}"


def capture_rng(noise_rng: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "noise": noise_rng.get_state(),
             "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():   # this rank's GPU stream (dropout)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict, noise_rng: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
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
    if run.latest.is_file() and run.latest.read_text().strip() == tag:
        return tag                       # already saved at this step: never rewrite `latest`'s target
    _barrier()
    if rank == 0 and ckpt.exists():      # left by a crash mid-save; `latest` never named it
        shutil.rmtree(ckpt)
    _barrier()
    reason = _first_on_any_rank(_cannot_save(run, rank))
    if reason is not None:               # every rank stops here, before DeepSpeed's collectives
        raise RunStopped(_save_failed(run, ckpt, reason))
    try:
        for name, engine in engines.items():
            engine.save_checkpoint(str(ckpt), tag=name, save_latest=False)
        (ckpt / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(rng_state, ckpt / "rng" / f"rank{rank}.pt")
        if rank == 0:
            (ckpt / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    except (OSError, RuntimeError) as e:  # disk full, permissions (torch.save wraps some as RuntimeError)
        message = _save_failed(run, ckpt, str(e).splitlines()[0])
        if rank == 0:
            shutil.rmtree(ckpt, ignore_errors=True)
        raise RunStopped(message) from None
    _barrier()
    if rank == 0:
        run.write_latest(tag)
        if keep_last:
            _prune(run, keep_last)
    _barrier()
    return tag


def _cannot_save(run: RunDir, rank: int) -> str | None:
    """Why this rank could not write the next checkpoint, judged before anything is written: a
    rank that fails inside DeepSpeed's save leaves the others waiting in its collectives until
    the launcher or the distributed timeout ends them, so a full or read-only disk is caught
    here, on every rank at once. The previous checkpoint's size is the next one's."""
    try:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        probe = run.checkpoints / f".write-test-rank{rank}"
        probe.write_bytes(b"megadiff")
        probe.unlink()
    except OSError as e:
        return f"cannot write under {run.checkpoints}: {e.strerror or e}"
    previous = run.latest_tag()
    if previous is None:
        return None
    need = sum(f.stat().st_size for f in run.tag_dir(previous).rglob("*")
               if f.is_file() and not any(p.endswith("_universal") for p in f.parts))
    free = shutil.disk_usage(run.checkpoints).free
    if free < need:
        return f"{previous} took {need / 2**20:.1f} MB and {free / 2**20:.1f} MB are free"
    return None


def _first_on_any_rank(reason: str | None) -> str | None:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return reason
    reasons: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next((f"rank {r}: {why}" for r, why in enumerate(reasons) if why is not None), None)


def _save_failed(run: RunDir, ckpt: Path, reason: str) -> str:
    previous = run.latest.read_text().strip() if run.latest.is_file() else None
    free_mb = shutil.disk_usage(run.checkpoints).free / 2**20 if run.checkpoints.is_dir() else 0.0
    return (f"could not write checkpoint {ckpt} ({reason}; {free_mb:.0f} MB free): free space or fix "
            f"permissions under {run.checkpoints} (train.keep_last prunes only after a save), then "
            "--resume auto; " + (f"the previous checkpoint {previous} is intact" if previous
                                 else "no earlier checkpoint exists"))


def _prune(run: RunDir, keep_last: int) -> None:
    tags = sorted((p for p in run.checkpoints.glob("step-*") if p.is_dir()),
                  key=lambda p: int(p.name.split("-")[1]))
    for old in tags[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def saved_world_size(run: RunDir) -> int | None:
    """Rank count of the checkpoint `--resume auto` would load (None if there is none)."""
    tag = run.latest_tag()
    if tag is None:
        return None
    return json.loads((run.tag_dir(tag) / "trainer_state.json").read_text())["world_size"]


def universal_tag(net: str) -> str:
    return f"{net}_universal"


def convert_to_universal(ckpt: Path, net: str) -> None:
    """DeepSpeed's universal checkpoint of one network (`ds_to_universal`), written beside
    the original and renamed into place when complete; reused if it already exists."""
    from deepspeed.checkpoint import ds_to_universal

    out = ckpt / universal_tag(net)
    if out.is_dir():
        return
    tmp = ckpt / (universal_tag(net) + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ckpt / net), output_folder=str(tmp),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=False)
    with contextlib.redirect_stdout(io.StringIO()):
        ds_to_universal.main(args)
    tmp.rename(out)


def _unsafe_files(ckpt: Path) -> str | None:
    """DeepSpeed unpickles its states in full: check them with the restricted unpickler first."""
    from megadiff.engine.safe_load import check_checkpoint_dir

    try:
        check_checkpoint_dir(ckpt)
    except ValueError as e:
        return str(e)
    return None


def load(run: RunDir, engines: dict, rank: int, world_size: int,
         tag: str | None = None) -> tuple[dict, dict | None]:
    """Load `tag` (default: latest) into the engines; returns (trainer_state, this rank's RNG
    state or None when the checkpoint was written with another rank count). A checkpoint from
    another rank count is loaded through DeepSpeed's universal checkpoint format; the engines
    must then have been built with `checkpoint.load_universal` (BaseTrainer.__init__ sets it)."""
    tag = tag or run.latest_tag()
    assert tag is not None, "load() called without a checkpoint"
    ckpt = run.tag_dir(tag)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    elastic = state["world_size"] != world_size
    for name in engines:
        if not (ckpt / name).is_dir():
            raise ValueError(f"{ckpt} has no state for network {name!r}: it was written by a "
                             "run with other objectives; resume with the same recipe")
    problem = None
    if rank == 0:
        if elastic:
            for name in engines:
                convert_to_universal(ckpt, name)
        problem = _unsafe_files(ckpt)
    if dist.is_initialized():
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem is not None:
        raise ValueError(problem)
    for name, engine in engines.items():
        assert engine.load_universal_checkpoint() == elastic, "engine built without load_universal"
        path, _ = engine.load_checkpoint(str(ckpt), tag=universal_tag(name) if elastic else name,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"could not load {ckpt / name}: the checkpoint is incomplete")
    rng_file = ckpt / "rng" / f"rank{rank}.pt"
    rng = None if elastic else torch.load(rng_file, weights_only=True)
    return state, rng
