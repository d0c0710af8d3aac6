"""Refuse checkpoint files that would run code when DeepSpeed unpickles them.

DeepSpeed loads its engine states with `torch.load(weights_only=False)` (full pickle:
`runtime/checkpoint_engine/torch_checkpoint_engine.py`, `utils/zero_to_fp32.py`,
`checkpoint/universal_checkpoint.py`), so a planted or tampered `.pt` file in a run directory
could execute arbitrary code on every rank. Before any of those loads, megadiff reads each file
with PyTorch's restricted unpickler (`weights_only=True`), allowing only tensors, containers
and the few plain DeepSpeed data classes its own checkpoints hold. A file that passes holds
nothing else, so the full unpickle that follows cannot run foreign code. With `mmap=True` the
check reads the pickle stream only, not the tensor data.
"""
from __future__ import annotations

from pathlib import Path

import torch


def _deepspeed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def check_file(path: Path) -> None:
    """Raise a one-line ValueError unless `path` unpickles with the restricted unpickler."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)   # a legacy (non-zip) file
    except Exception as e:   # noqa: BLE001 - any failure means "not a plain checkpoint"
        first = str(e).strip().splitlines()
        why = next((ln.strip() for ln in first if "Unsupported" in ln or "GLOBAL" in ln),
                   first[0] if first else type(e).__name__)
        raise ValueError(f"{path} is not a plain tensor checkpoint ({why[:200]}); megadiff will not "
                         "unpickle it: resume or export only from run directories megadiff wrote, "
                         "or delete that checkpoint and use an earlier one") from None


def load_plain(path: Path):
    """A DeepSpeed state file read with the restricted unpickler only (tensors on the CPU)."""
    with torch.serialization.safe_globals(_deepspeed_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def check_checkpoint_dir(path: Path) -> None:
    """Check every `.pt` file under a checkpoint directory (engine states, RNG, universal)."""
    for f in sorted(Path(path).rglob("*.pt")):
        check_file(f)
