"""The trainer's iteration, driven without data, a run directory or a logger.

`trainer_shim` makes an instance of the trainer class `megadiff train` composes from a
recipe's objectives, with only the attributes `loss_terms` / `forward_net` read, so the loss
is exactly the trainer's (flow matching: sigma sampling, noising, the transformer call with
its dtype casts, `flow.flow_matching_loss`). `ds_iteration` is the body of `BaseTrainer.fit`'s
`while` loop for one iteration; `bare_iteration` is the same loss with plain PyTorch.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch


def trainer_shim(cfg, nets: dict, seed: int = 0, objectives: list[str] | None = None):
    """A trainer object whose networks are `nets` (DeepSpeed engines or bare modules).

    `BaseTrainer.__init__` (run directory, shards, logger, validation prompts) is skipped.
    """
    from megadiff.models import sd3
    from megadiff.registry import compose_trainer

    cls = compose_trainer(objectives or cfg.objectives)
    t = cls.__new__(cls)
    t.cfg = cfg
    t.engines = dict(nets)
    t.frozen = {}
    t.device = accelerator_device()
    t.compute_dtype = sd3.DTYPES[cfg.model.precision]
    t.noise_rng = torch.Generator().manual_seed(seed)
    t.step = 0
    t.rank, t.world_size = 0, 1
    return t


def accelerator_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


class PhaseTimer:
    """Seconds spent per phase in the current iteration."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.t[phase] = self.t.get(phase, 0.0) + now - self._last
        self._last = now


def ds_iteration(t, batch: dict, on_backward: Callable[[], None] | None = None) -> dict[str, float]:
    """One iteration of `BaseTrainer.fit` (same calls, same order); returns phase seconds.

    `on_backward` runs after the last backward, before its `engine.step()` (gradients live).
    """
    timer = PhaseTimer()
    gas = t.cfg.data.gradient_accumulation_steps
    acc: dict[str, float] = {}
    for net in t.steps_this_iteration(t.step):
        engine = t.engines[net]
        for micro in range(gas):
            terms = t.loss_terms(net, batch, t.step)
            timer.lap("forward")
            engine.backward(sum(terms.values()))
            timer.lap("backward")
            if on_backward is not None and micro == gas - 1:
                on_backward()
                timer.lap("measure")
            engine.step()
            for k, v in terms.items():
                acc[f"loss/{k}"] = acc.get(f"loss/{k}", 0.0) + float(v.detach()) / gas
            timer.lap("step")
        engine.get_global_grad_norm()
    t.step += 1
    timer.lap("step")
    return timer.t


def bare_iteration(t, module: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict,
                   grad_clip: float) -> dict[str, float]:
    """The same loss, then loss.backward(), clip_grad_norm_, opt.step(), opt.zero_grad()."""
    timer = PhaseTimer()
    terms = t.loss_terms("transformer", batch, t.step)
    timer.lap("forward")
    loss = sum(terms.values())
    loss.backward()
    timer.lap("backward")
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    float(loss.detach())
    t.step += 1
    timer.lap("step")
    return timer.t


def client_adamw(module: torch.nn.Module, optim) -> torch.optim.AdamW:
    """The optimizer `megadiff.engine.engines.build_engine` hands DeepSpeed (no offload)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             weight_decay=optim.weight_decay)
