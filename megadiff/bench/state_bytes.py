"""Bytes of model state one rank holds under any ZeRO stage (0-3, with or without offload),
read from the tensors the engine and its optimizer keep (generic: no per-stage code).

The tensors are found by walking the module's parameters (`param.data`, ZeRO-3's
`param.ds_tensor`, `param.grad`) and the engine's optimizer object graph (its attributes,
lists, tuples and dicts of tensors, three levels deep, and the wrapped torch optimizer's
state). Each storage is counted once, in the first category that reaches it:

  params      parameter data (bf16 flat groups, partitions, or whole params)
  grads       gradient buffers (attribute paths naming grad/gradient, `param.grad`)
  master      fp32 master copies (paths naming fp32/master/single_partition)
  optimizer   the torch optimizer's state (Adam moments, step)
  buffers     communication buckets (paths naming ipg/bucket): working memory, not model state
  other       any other tensor the optimizer holds

`device` sums the bytes on the accelerator, `host` those in CPU memory; on a CPU-only
machine everything is host memory, offloaded or not.
"""
from __future__ import annotations

import torch

ORDER = ("params", "grads", "master", "optimizer", "buffers", "other")
MODEL_STATE = ("params", "grads", "master", "optimizer", "other")


def _category(path: str) -> str:
    p = path.lower()
    if "ipg" in p or "bucket" in p:
        return "buffers"
    if "grad" in p:
        return "grads"
    if "fp32" in p or "master" in p or "single_partition" in p:
        return "master"
    if "bit16" in p or "fp16" in p or "bf16" in p or "param" in p:
        return "params"
    return "other"


def _walk(obj, path: str, depth: int, out: list, seen_objs: set) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        return
    if depth <= 0 or id(obj) in seen_objs:
        return
    if isinstance(obj, (list, tuple)):
        seen_objs.add(id(obj))
        for i, v in enumerate(obj):
            _walk(v, path, depth - 1, out, seen_objs)
    elif isinstance(obj, dict):
        seen_objs.add(id(obj))
        for k, v in obj.items():
            _walk(v, f"{path}.{k}" if isinstance(k, str) else path, depth - 1, out, seen_objs)


def optimizer_tensors(optimizer) -> list[tuple[str, torch.Tensor]]:
    out: list = []
    if optimizer is None:
        return out
    inner = getattr(optimizer, "optimizer", None)
    torch_opt = inner if isinstance(inner, torch.optim.Optimizer) else (
        optimizer if isinstance(optimizer, torch.optim.Optimizer) else None)
    if torch_opt is not None:
        for st in torch_opt.state.values():
            out += [("optimizer.state", v) for v in st.values() if isinstance(v, torch.Tensor)]
    seen: set = set()
    for name, val in vars(optimizer).items():
        if isinstance(val, (torch.nn.Module, torch.optim.Optimizer)) or name.startswith("_"):
            continue
        _walk(val, name, 3, out, seen)
    return out


def state_tensors(engine) -> dict[str, list[torch.Tensor]]:
    groups: dict[str, list[torch.Tensor]] = {c: [] for c in ORDER}
    params = list(engine.module.parameters())
    groups["params"] += [getattr(p, "ds_tensor", None) for p in params] + [p.data for p in params]
    groups["grads"] += [p.grad for p in params]
    for path, t in optimizer_tensors(engine.optimizer):
        groups["optimizer" if path == "optimizer.state" else _category(path)].append(t)
    return groups


def tally(groups: dict[str, list]) -> dict[str, dict[str, int]]:
    """{category: {"device": bytes, "host": bytes}}, each storage once (first category wins)."""
    seen: set[int] = set()
    out = {c: {"device": 0, "host": 0} for c in groups}
    for cat, tensors in groups.items():
        for t in tensors:
            if t is None or t.numel() == 0 or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0 or key in seen:
                continue
            seen.add(key)
            out[cat]["host" if t.device.type == "cpu" else "device"] += st.nbytes()
    return out


def engine_state_bytes(engine) -> dict[str, dict[str, int]]:
    return tally(state_tensors(engine))


def model_state(b: dict[str, dict[str, int]], where: str | None = None) -> int:
    keys = ("device", "host") if where is None else (where,)
    return sum(b.get(c, {}).get(k, 0) for c in MODEL_STATE for k in keys)


def zero_paper_bytes(n_params: int, world: int, stage: int, offload: bool = False) -> float:
    """Per-rank model-state bytes of mixed-precision Adam (K = 12 bytes of optimizer state per
    parameter) by ZeRO stage (Rajbhandari et al. 2020, arXiv 1910.02054, Figure 1):
    stage 0: 16P; 1: 4P + 12P/N; 2: 2P + 14P/N; 3: 16P/N. With offload the same bytes sit
    in host memory (ZeRO-Offload / ZeRO-Infinity), so the total per rank does not change."""
    p, n = float(n_params), float(world)
    return {0: 16 * p, 1: 4 * p + 12 * p / n, 2: 2 * p + 14 * p / n, 3: 16 * p / n}[stage]
