"""Build the DeepSpeed config dict of one trainable network from `ds_configs/*.json` plus the
run config: batch sizes, precision, clipping, ZeRO stage and offload are config, not code."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from megadiff.config import RunConfig

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def available_ds_configs() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def load_ds_json(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"deepspeed.config={name_or_path!r} is neither a file nor one of "
                         f"{', '.join(available_ds_configs())}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): fix the DeepSpeed config") from None


def offloads_optimizer(ds: dict) -> bool:
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return off.get("device", "none") not in ("none", None)


def build_ds_config(cfg: RunConfig, world_size: int, device_supports_fp16: bool = False) -> dict:
    ds = copy.deepcopy(load_ds_json(cfg.deepspeed.config))
    zero = ds.setdefault("zero_optimization", {})
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    stage = zero.get("stage", 0)
    if cfg.deepspeed.offload_optimizer is not None:
        zero["offload_optimizer"] = ({"device": "cpu", "pin_memory": True}
                                     if cfg.deepspeed.offload_optimizer else {"device": "none"})
    if cfg.deepspeed.offload_param is not None:
        zero["offload_param"] = ({"device": "cpu", "pin_memory": True}
                                 if cfg.deepspeed.offload_param else {"device": "none"})
    if (zero.get("offload_param") or {}).get("device", "none") != "none" and stage != 3:
        raise ValueError(f"parameter offload needs ZeRO stage 3, but the stage is {stage}: "
                         "set deepspeed.zero_stage=3 or deepspeed.offload_param=false")
    if offloads_optimizer(ds) and stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1-3: set deepspeed.zero_stage")
    d = cfg.data
    ds["train_micro_batch_size_per_gpu"] = d.micro_batch_size
    ds["gradient_accumulation_steps"] = d.gradient_accumulation_steps
    ds["train_batch_size"] = cfg.check_batch(world_size)
    ds["gradient_clipping"] = cfg.optim.grad_clip
    precision = cfg.model.precision
    if precision == "fp16" and not device_supports_fp16:
        raise ValueError("model.precision=fp16 is not supported on this device: use bf16 or fp32")
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": precision == "fp16"}
    if offloads_optimizer(ds):
        # DeepSpeedCPUAdam is only built when DeepSpeed creates the optimizer itself.
        o = cfg.optim
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}}
    else:
        ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    return ds
