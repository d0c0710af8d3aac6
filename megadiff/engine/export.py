"""Export a run's checkpoint as a diffusers directory that
`StableDiffusion3Pipeline.from_pretrained(out)` loads unchanged.

The trained transformer is consolidated from the ZeRO shards (fp32 master weights, DeepSpeed's
`get_fp32_state_dict_from_zero_checkpoint`); every other component is copied byte for byte
from the run's base model directory. A `context.enabled` run also writes its context projector
to `OUT/context_projector/` (config.json + model.safetensors), which
`megadiff.models.context.load_context_projector` reads; diffusers ignores that directory.
A LoRA network (DMD's `dmd.lora`, DMDR's gen/gui adapters) is exported merged: base + scaling
B A through peft's own merge, so the export is a plain transformer that needs no peft.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from megadiff.config import RunConfig, load_run_args
from megadiff.engine.checkpoint import tag_for
from megadiff.engine.safe_load import check_checkpoint_dir
from megadiff.engine.run_dir import RunDir
from megadiff.models import sd3


def consolidated_state_dict(run: RunDir, tag: str, net: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run.tag_dir(tag)
    if not (ckpt / net).is_dir():
        raise ValueError(f"{ckpt} holds no {net!r} network: nothing to export")
    check_checkpoint_dir(ckpt / net)       # DeepSpeed's reader unpickles in full
    if not any((ckpt / net).glob("*zero_pp_rank_*")):
        return _zero0_state_dict(ckpt, net)
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=net)


def _zero0_state_dict(ckpt: Path, net: str) -> dict[str, torch.Tensor]:
    """ZeRO-0 writes one full copy (DeepSpeed's zero_to_fp32 does not read it): the module's
    weights, which in bf16 are the optimizer's fp32 masters (`fp32_groups`, one tensor per
    trainable parameter in the order `trainer_state.json` records) rounded."""
    from megadiff.engine.safe_load import load_plain

    states = load_plain(ckpt / net / "mp_rank_00_model_states.pt")
    weights = {k: v.float() for k, v in states["module"].items()}
    masters = [t for group in (states.get("optimizer") or {}).get("fp32_groups", []) for t in group]
    names = json.loads((ckpt / "trainer_state.json").read_text()).get("trainable_params", {}).get(net)
    if masters and names is not None:      # older checkpoints lack the names: the rounded weights
        assert len(names) == len(masters), (net, len(names), len(masters))
        for name, master in zip(names, masters):
            assert weights[name].shape == master.shape, name
            weights[name] = master.float()
    return weights


def export_run(run_dir: str | Path, to: str | Path, step: int | None = None,
               dtype: str = "fp32", overwrite: bool = False, net: str = "transformer") -> Path:
    run = RunDir(run_dir)
    if not run.args.is_file():
        raise ValueError(f"{run.args} is missing: --run must be a megadiff output directory")
    if step is None:
        tag = run.latest_tag()
        if tag is None:
            raise ValueError(f"{run.root} has no complete checkpoint yet: train first or pass --step")
    else:
        tag = tag_for(step)
        if not (run.tag_dir(tag) / "trainer_state.json").is_file():
            have = sorted(p.name for p in run.checkpoints.glob("step-*"))
            raise ValueError(f"{run.tag_dir(tag)} is not a complete checkpoint: choose one of {have}")
    out = Path(to)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} already exists and is not empty: pass --overwrite or a new --to")
    args = json.loads(run.args.read_text())
    base = sd3.check_sd3_dir(_base_model_path(run, args))
    state = consolidated_state_dict(run, tag, net)
    if any(".lora_A." in k for k in state):
        state = merged_lora_state(state, load_run_args(run.args), net, base)
    projector = None
    if args.get("context", {}).get("enabled"):   # transformer + context projector in one module
        from megadiff.models.context_train import split_state

        state, projector = split_state(state, args, base)
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(base / "transformer"))
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {tag} does not match {base}/transformer "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("transformer"))
    transformer.to(sd3.DTYPES[dtype]).save_pretrained(tmp / "transformer")
    if projector is not None:   # loader: megadiff.models.context.load_context_projector
        from megadiff.models.context import PROJECTOR_DIR

        projector.to(sd3.DTYPES[dtype]).save_pretrained(tmp / PROJECTOR_DIR)
    (tmp / "megadiff_export.json").write_text(json.dumps(
        {"run": str(run.root.resolve()), "checkpoint": tag, "base_model": str(base), "dtype": dtype},
        indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def merged_lora_state(state: dict[str, torch.Tensor], cfg: RunConfig, net: str,
                      base: Path) -> dict[str, torch.Tensor]:
    """A LoRA DMD network's consolidated state (peft keys: `.base_layer.` and `.lora_A/B.<adapter>`)
    as plain transformer weights: rebuilt with the run's adapter (at the scale it trained at),
    merged by peft's `merge`, the adapter keys dropped."""
    from diffusers import SD3Transformer2DModel

    from megadiff.models import lora
    from megadiff.objectives.dmd import add_dmd_adapter

    module = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(base / "transformer"))
    adapter = add_dmd_adapter(module, cfg.dmd, net) if net in ("generator", "fake_score") else None
    if adapter is None:
        raise ValueError(f"checkpoint network {net!r} holds LoRA weights but the run's config has no "
                         f"dmd.lora.{net}: export the run it came from, with its args.json")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"LoRA checkpoint of {net} does not match {base}/transformer with the run's "
                         f"dmd.lora.{net} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for layer in lora.lora_layers(module):
        layer.merge(adapter_names=[adapter])
    return {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if ".lora_" not in k}


def _base_model_path(run: RunDir, args: dict) -> Path:
    if args.get("demo", {}).get("enabled"):
        return run.root / "demo" / "model"
    return Path(args["model"]["path"])
