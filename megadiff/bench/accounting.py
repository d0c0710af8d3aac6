"""Bytes of model state one ZeRO-3 rank holds, read from the tensors DeepSpeed keeps.

What is counted (each tensor storage once, however many views point into it):

  bf16 params   `param.ds_tensor` of every parameter: this rank's partition (views into the
                optimizer's flat low-precision buffer)
  unpartitioned full `param.data` still allocated outside a forward/backward: parameters
                below `stage3_param_persistence_threshold` that every rank keeps whole
  grads         the optimizer's gradient partitions (`grad_partitions_flat_buffer`, in the
                gradient-accumulation dtype), plus any fp32 `.grad` on the master partitions
                and any `param.grad` left on the module
  fp32 master   `fp32_partitioned_groups_flat`
  optimizer     tensors in the torch optimizer's state (AdamW exp_avg, exp_avg_sq, step)
  buffers       the reduce bucket (`ipg_buckets[*].buffer`, `reduce_bucket_size` elements):
                working memory of a fixed size, not model state

The ideal for mixed-precision Adam is 16 bytes per parameter split over N ranks
(2 bf16 param + 2 bf16 grad + 4 fp32 master + 4 + 4 Adam moments).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

IDEAL_BYTES_PER_PARAM = 16
MODEL_STATE = ("bf16 params", "unpartitioned", "grads", "fp32 master", "optimizer")
CATEGORIES = MODEL_STATE + ("buffers",)


def tally(groups: Mapping[str, Iterable]) -> dict[str, int]:
    """Bytes per group, counting each tensor storage once (first group that names it wins).

    Views (a `narrow` of a flat buffer, `param.ds_tensor`) count their whole storage, once;
    None and empty tensors count nothing.
    """
    seen: set[int] = set()
    out: dict[str, int] = {}
    for name, tensors in groups.items():
        total = 0
        for t in tensors:
            if t is None or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
        out[name] = out.get(name, 0) + total
    return out


def _state_tensors(optimizer) -> list:
    import torch

    state = getattr(optimizer, "state", {}) or {}
    return [v for s in state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def zero3_tensors(engine) -> dict[str, list]:
    """The tensors of each category (see the module docstring) of a ZeRO-3 engine."""
    opt = engine.optimizer
    params = list(engine.module.parameters())
    fp32 = list(getattr(opt, "fp32_partitioned_groups_flat", []) or [])
    buckets = getattr(opt, "ipg_buckets", {}) or {}
    return {
        "bf16 params": [getattr(p, "ds_tensor", None) for p in params],
        "unpartitioned": [p.data for p in params],
        "grads": [getattr(opt, "grad_partitions_flat_buffer", None)]
                 + [f.grad for f in fp32] + [p.grad for p in params],
        "fp32 master": fp32,
        "optimizer": _state_tensors(getattr(opt, "optimizer", None)),
        "buffers": [getattr(b, "buffer", None) for b in buckets.values()],
    }


def zero3_state_bytes(engine) -> dict[str, int]:
    return tally(zero3_tensors(engine))


def model_state_bytes(breakdown: Mapping[str, int]) -> int:
    return sum(breakdown.get(k, 0) for k in MODEL_STATE)


def ideal_bytes_per_rank(n_params: int, world_size: int,
                         bytes_per_param: float = IDEAL_BYTES_PER_PARAM) -> float:
    if world_size < 1:
        raise ValueError(f"world size {world_size} must be at least 1")
    return bytes_per_param * n_params / world_size


def persistent_params(module) -> tuple[int, int]:
    """(count, elements) of the parameters ZeRO-3 marked persistent (`ds_persist`): those
    with numel <= `stage3_param_persistence_threshold`, which every rank keeps whole."""
    small = [p.ds_numel for p in module.parameters() if getattr(p, "ds_persist", False)]
    return len(small), sum(small)
