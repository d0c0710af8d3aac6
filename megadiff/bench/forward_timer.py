"""Seconds spent in each network's forward passes, with module hooks (no per-objective code).

`trainer_modules(trainer)` names every network a trainer holds: its DeepSpeed engines
(`engines[name]`), its frozen nets (`frozen[name]`: teacher, reference), and any other
`nn.Module` attribute or dict of modules that `build_extras` added (VAE, reward models;
a module with a `models` ModuleDict, like `RewardSet`, is also timed per member). A forward
pre-hook starts a clock and a forward hook stops it, so the time is inclusive of whatever
that forward calls; gradient-checkpoint recomputation during backward counts as forward.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

_SKIP = {"engines", "frozen"}


def _inner(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)      # a DeepSpeed engine wraps .module


def trainer_modules(trainer) -> dict[str, torch.nn.Module]:
    out: dict[str, torch.nn.Module] = {}
    for name, eng in getattr(trainer, "engines", {}).items():
        out[name] = _inner(eng)
    for name, net in getattr(trainer, "frozen", {}).items():
        out[name] = _inner(net)
    seen = {id(m) for m in out.values()}
    for attr, val in vars(trainer).items():
        if attr in _SKIP or attr.startswith("__"):
            continue
        items = []
        if isinstance(val, torch.nn.Module):
            items.append((attr, val))
            members = getattr(val, "models", None)
            if isinstance(members, torch.nn.ModuleDict):
                items += [(f"{attr}.{k}", m) for k, m in members.items()]
        elif isinstance(val, dict) and val and all(isinstance(v, torch.nn.Module) for v in val.values()):
            items += [(f"{attr}.{k}", m) for k, m in val.items()]
        for name, m in items:
            if id(m) not in seen:
                seen.add(id(m))
                out[name] = m
    return out


class ForwardTimer:
    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self.seconds = {name: 0.0 for name in modules}
        self.calls = {name: 0 for name in modules}
        self._start: dict[str, list[float]] = {name: [] for name in modules}

    def reset(self) -> None:
        for name in self.seconds:
            self.seconds[name], self.calls[name] = 0.0, 0

    @contextmanager
    def hooked(self):
        handles = []
        for name, m in self.modules.items():
            def pre(_m, _args, name=name):
                self._start[name].append(time.perf_counter())

            def post(_m, _args, _out, name=name):
                if self._start[name]:
                    self.seconds[name] += time.perf_counter() - self._start[name].pop()
                    self.calls[name] += 1

            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
