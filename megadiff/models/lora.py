"""peft LoRA adapters on diffusers' SD3Transformer2DModel.

`add_lora` puts one named adapter on a transformer and leaves only that adapter trainable
(DMD2 trains its SDXL generator this way: tianweiy/DMD2 `main/sd_unified_model.py`,
`generator_lora`). The base weights stay frozen and equal to the teacher's, which is what the
DMDR shape builds on: one base with a "gen" and a "gui" adapter, the real score being the base
with the "gui" adapter at a scheduled scale ("dynamic distribution guidance";
`adapter_scale` below scales an adapter in place for the length of a `with` block).

Adapters are created under a fixed seed so that every rank builds the same initial weights
(DeepSpeed partitions what each rank holds; it does not broadcast a ZeRO-3 module).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

# MMDiT attention (image and context streams) and feed-forward projections.
DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                   "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                   "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def add_lora(transformer: nn.Module, rank: int, alpha: float, name: str = "default",
             dropout: float = 0.0, targets: list[str] | tuple[str, ...] | None = None,
             seed: int = 0, trainable_only: bool = True) -> nn.Module:
    """Add adapter `name` (lora_A random under `seed`, lora_B zero: the output is unchanged at
    first). With `trainable_only`, every parameter but this adapter's is frozen."""
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                     target_modules=list(targets or DEFAULT_TARGETS), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)     # CPU only: GPU streams stay per rank
        transformer.add_adapter(cfg, adapter_name=name)
    names = list(transformer.peft_config)
    if len(names) > 1:          # keep every adapter active; switching is done by scale
        transformer.set_adapters(names, [1.0] * len(names))
    if trainable_only:
        set_trainable(transformer, [name])
    return transformer


def set_trainable(transformer: nn.Module, adapters: list[str]) -> None:
    """Only the named adapters' LoRA weights require grad."""
    for pname, p in transformer.named_parameters():
        p.requires_grad_("lora_" in pname and any(f".{a}." in pname for a in adapters))


def add_dual_adapters(transformer: nn.Module, gen: dict, gui: dict, seed: int = 0) -> nn.Module:
    """The DMDR shape: one base, a "gen" adapter (the generator) and a "gui" adapter (the fake
    score / guidance). `gen` and `gui` hold rank, alpha (and optionally dropout, targets)."""
    add_lora(transformer, name="gen", seed=seed, trainable_only=False, **gen)
    add_lora(transformer, name="gui", seed=seed + 1, trainable_only=False, **gui)
    set_trainable(transformer, ["gen", "gui"])
    return transformer


def lora_layers(transformer: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapter_scale(transformer: nn.Module, scales: dict[str, float]):
    """Multiply the named adapters' scaling by `scales[name]` inside the block (0 turns an
    adapter off, 1 leaves it as trained); restored on exit. No parameter changes."""
    saved = []
    for layer in lora_layers(transformer):
        for name, s in scales.items():
            if name in getattr(layer, "scaling", {}):
                saved.append((layer, name, layer.scaling[name]))
                layer.scaling[name] = layer.scaling[name] * float(s)
    try:
        yield transformer
    finally:
        for layer, name, value in reversed(saved):
            layer.scaling[name] = value


def adapter_state_dict(transformer: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's key layout (what `load_lora_weights` style loaders read)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=name)
