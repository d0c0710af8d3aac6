"""`megadiff info`: the resolved config, the DeepSpeed config, parameter counts and the
FLOPs per sample of the configured model, without loading any weights."""
from __future__ import annotations

import json

import yaml

from megadiff import flops
from megadiff.config import load_config
from megadiff.engine.ds_config import build_ds_config
from megadiff.models import sd3
from megadiff.models.tiny import TINY_RESOLUTION, TINY_T5_MAX_LENGTH, tiny_transformer_config


def count_parameters(transformer_config: dict) -> int:
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(transformer_config)
    return sum(p.numel() for p in model.parameters())


def print_info(recipe: str, overrides: list[str], world_size: int = 1) -> None:
    cfg = load_config(recipe, overrides)
    print("# resolved config")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    print(f"\n# deepspeed config (world size {world_size})")
    print(json.dumps(build_ds_config(cfg, world_size), indent=1))
    if cfg.demo.enabled:
        tc, res, seq = tiny_transformer_config(), TINY_RESOLUTION, 77 + TINY_T5_MAX_LENGTH
    elif cfg.model.path:
        tc = sd3.transformer_config(cfg.model.path)
        res = cfg.validation.resolution or tc["sample_size"] * 8
        seq = 77 + cfg.model.max_sequence_length
    else:
        return
    n = count_parameters(tc)
    side = res // 8
    fwd = flops.mmdit_forward_flops(tc, side, side, seq).forward
    train = flops.model_flops_per_sample(tc, side, side, seq, cfg.model.gradient_checkpointing)
    print("\n# model")
    print(f"transformer parameters: {n:,} ({_si(n)})")
    print(f"model-state bytes per rank (16 bytes/param/N, ZeRO-3 ideal): {_si(16 * n / world_size, 'B')}")
    print(f"FLOPs per sample at {res}px, {seq} text tokens: forward {_si(fwd, 'FLOP')}, "
          f"training step {_si(train, 'FLOP')}"
          f"{' (with activation recompute)' if cfg.model.gradient_checkpointing else ''}")


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()
