"""The trainer's iteration, driven without data loader, run directory or logger.

`trainer_shim` makes an instance of the trainer class `megadiff train` composes from the
recipe's objectives, skipping `BaseTrainer.__init__` and setting only what the iteration
reads, so the loss is exactly the trainer's (flow matching: sigma sampling, noising, the
transformer call with its dtype casts, `flow.flow_matching_loss`). `ds_iteration` runs
`BaseTrainer._step_network` -- the trainer's own code for one optimizer step of a network:
loss, non-finite check, `engine.backward`, `engine.step`, grad norm -- for every network of
the iteration. `bare_iteration` is the same loss with plain PyTorch.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

import torch


class _Log:
    """Stands in for MetricsLogger on the trainer's rare text lines (skipped micro-batches)."""

    def text(self, msg: str) -> None:
        print(f"[bench] trainer: {msg}", file=sys.stderr, flush=True)


class _NoRun:
    latest = "(no run directory: megadiff bench)"


def trainer_shim(cfg, nets: dict, batch: dict, seed: int = 0, rank: int = 0, world_size: int = 1):
    """A trainer whose networks are `nets` (DeepSpeed engines or bare modules) and whose
    `next_batch()` always returns `batch`."""
    from megadiff.models import sd3
    from megadiff.registry import compose_trainer

    cls = compose_trainer(cfg.objectives)
    t = cls.__new__(cls)
    t.cfg = cfg
    t.engines = dict(nets)
    t.frozen = {}
    t.device = accelerator_device()
    t.compute_dtype = sd3.DTYPES[cfg.model.precision]
    t.noise_rng = torch.Generator().manual_seed(seed)
    t.rank, t.world_size = rank, world_size
    t.step, t.consumed_samples, t.skipped, t.consecutive_nonfinite = 0, 0, 0, 0
    t.consecutive_bad_grads = 0
    t._metrics = {}
    t.logger, t.run = _Log(), _NoRun()
    t.next_batch = lambda: batch
    return t


def optim_config(cfg, net: str = "transformer"):
    """The OptimConfig the trainer hands `build_engine` for `net`."""
    return cfg.optim_for(net) if hasattr(cfg, "optim_for") else cfg.optim


def accelerator_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


@contextlib.contextmanager
def timed_methods(obj, names: tuple[str, ...], sink: dict[str, float],
                  before: dict[str, Callable[[], None]] | None = None) -> Iterator[None]:
    """Within the block, calls to obj.<name> add their seconds to sink[name]; before[name],
    if given, runs first (untimed). The wrappers are instance attributes, removed on exit."""
    before = before or {}
    for name in names:
        fn = getattr(obj, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            if _name in before:
                before[_name]()
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                sink[_name] = sink.get(_name, 0.0) + time.perf_counter() - t0

        object.__setattr__(obj, name, wrapped)
    try:
        yield
    finally:
        for name in names:
            object.__delattr__(obj, name)


def ds_iteration(t, before_last_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One iteration of `BaseTrainer.fit`: `_step_network` for each network that steps.

    Returns seconds per phase: backward (`engine.backward`), step (`engine.step`) and
    forward (the rest: loss terms, the non-finite check, loss bookkeeping, grad norm).
    `before_last_step` runs before the iteration's last `engine.step()` (gradients live).
    """
    step_network = getattr(t, "_step_network", None)
    if step_network is None:
        raise RuntimeError("BaseTrainer._step_network is gone: update megadiff.bench.loop.ds_iteration "
                           "to call the trainer's per-network step")
    nets = t.steps_this_iteration(t.step)
    gas = t.cfg.data.gradient_accumulation_steps
    sink: dict[str, float] = {}
    acc: dict[str, float] = {}
    t0 = time.perf_counter()
    for i, net in enumerate(nets):
        engine = t.engines[net]
        calls = {"n": 0}
        hook = None
        if before_last_step is not None and i == len(nets) - 1:
            def hook(calls=calls):
                calls["n"] += 1
                if calls["n"] == gas:
                    before_last_step()
        with timed_methods(engine, ("backward", "step"), sink, {"step": hook} if hook else None):
            step_network(net, acc)
    t.step += 1
    t.consumed_samples += t.cfg.data.micro_batch_size * gas * t.world_size
    total = time.perf_counter() - t0
    return {"forward": total - sink.get("backward", 0.0) - sink.get("step", 0.0),
            "backward": sink.get("backward", 0.0), "step": sink.get("step", 0.0)}


def bare_iteration(t, module: torch.nn.Module, opt: torch.optim.Optimizer,
                   grad_clip: float) -> dict[str, float]:
    """The same loss, then loss.backward(), clip_grad_norm_, opt.step(), opt.zero_grad()."""
    t0 = time.perf_counter()
    terms = t.loss_terms("transformer", t.next_batch(), t.step)
    loss = sum(terms.values())
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    float(loss.detach())
    t.step += 1
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "step": t3 - t2}


def client_adamw(module: torch.nn.Module, optim) -> torch.optim.AdamW:
    """The optimizer `megadiff.engine.engines.build_engine` hands DeepSpeed (no offload)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             weight_decay=optim.weight_decay)
