"""One `deepspeed.initialize` per trainable network, each with its own optimizer, LR
schedule and clipping (DESIGN.md section 3)."""
from __future__ import annotations

import math

import torch

from megadiff.config import OptimConfig
from megadiff.engine.ds_config import offloads_optimizer


def lr_lambda(optim: OptimConfig, max_steps: int):
    """Linear warmup, then constant or cosine decay to `min_lr_ratio * lr`."""
    def f(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        span = max(1, max_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_engine(module: torch.nn.Module, ds_config: dict, optim: OptimConfig, max_steps: int):
    """Wrap `module` in a DeepSpeed engine with AdamW and the configured LR schedule."""
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    assert params, "a trainable network has no trainable parameters"
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, max_steps))
    if offloads_optimizer(ds_config):
        # DeepSpeed builds DeepSpeedCPUAdam from ds_config["optimizer"]: this network's settings.
        ds_config = {**ds_config, "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
            "weight_decay": optim.weight_decay}}}
        optimizer = None
    else:
        # A client torch AdamW needs no C++ op build (DeepSpeed's FusedAdam would).
        optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                      weight_decay=optim.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params,
                                           optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config)
    if ds_config["zero_optimization"].get("stage", 0) == 0 and engine.dp_world_size == 1:
        # ZeRO-0 all-reduces gradients even over one rank: a flatten + copy-back of every
        # gradient, ~10% of a step (`megadiff bench engine`). Nothing to reduce, so skip it.
        engine.enable_backward_allreduce = False
    return engine


def build_frozen(module: torch.nn.Module, ds_config: dict, device: torch.device, dtype: torch.dtype):
    """A network that is never optimised (teacher, reference, reward tower). Under ZeRO-3 it is
    partitioned like the trainable ones (an inference-only engine, no optimizer, no state in
    checkpoints) so it does not cost a full replica per rank; otherwise it is replicated in
    the compute dtype."""
    import deepspeed

    module.eval().requires_grad_(False)
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return module.to(device, dtype)
    frozen_cfg = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    zero = dict(frozen_cfg["zero_optimization"])
    zero.pop("offload_optimizer", None)
    frozen_cfg["zero_optimization"] = zero
    engine, _, _, _ = deepspeed.initialize(model=module, config=frozen_cfg)
    engine.eval()
    return engine
