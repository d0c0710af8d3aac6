"""Megatron-style iteration line on rank 0, the same fields as JSONL and in wandb."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

# Dense bf16 peak TFLOP/s per device (vendor datasheets, SXM parts), for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0}


def device_peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in PEAK_BF16_TFLOPS.items():
            if key in name:
                return peak
    return None


def memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def format_line(rec: dict) -> str:
    """One grep-able line: ` iteration 10/100 | consumed samples: 80 | ... |`."""
    parts = [f" iteration {rec['iteration']:8d}/{rec['max_steps']:8d}",
             f"consumed samples: {rec['consumed_samples']:12d}",
             f"elapsed time per iteration (ms): {rec['ms_per_iteration']:.1f}"]
    parts += [f"{k}: {v:.3E}" for k, v in rec.items() if k.startswith("lr/")]
    parts += [f"{k}: {v:.6E}" for k, v in rec.items() if k.startswith(("loss/", "metric/"))]
    parts += [f"{k}: {v:.3f}" for k, v in rec.items() if k.startswith("grad_norm/")]
    parts.append(f"skipped iterations: {rec['skipped_iterations']:3d}")
    parts.append(f"TFLOP/s/device: {rec['tflops_per_device']:.4g}")
    mfu = rec.get("mfu")
    parts.append(f"MFU: {mfu * 100:.1f}%" if mfu is not None else "MFU: n/a")
    parts.append(f"mem (MB): {rec['memory_mb']:.0f}")
    return " | ".join(parts) + " |"


class MetricsLogger:
    def __init__(self, log_dir: Path, log_txt: Path, config: dict, rank: int,
                 wandb_mode: str, wandb_project: str, run_name: str):
        self.rank = rank
        self.jsonl = None
        self.wandb = None
        self.log_dir = log_dir
        self.splits: list[tuple] = []     # (file, keep(key) -> bool): per-network JSONL (DMDR layout)
        if rank != 0:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(log_dir / "train.jsonl", "a")
        self.txt = open(log_txt, "a")
        if wandb_mode != "disabled":
            import wandb
            os.environ.setdefault("WANDB_SILENT", "true")
            # wandb never sees the key through the config; offline unless asked (never hangs).
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config,
                                    mode=wandb_mode, dir=str(log_txt.parent), resume="allow",
                                    settings=wandb.Settings(init_timeout=60, console="off"))

    def text(self, line: str) -> None:
        if self.rank != 0:
            return
        print(line, flush=True)
        self.txt.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")
        self.txt.flush()

    def log(self, rec: dict) -> None:
        if self.rank != 0:
            return
        self.text(format_line(rec))
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        for f, keep in self.splits:
            part = {k: v for k, v in rec.items() if keep(k)}
            if part:
                f.write(json.dumps({"iteration": rec["iteration"], **part}) + "\n")
                f.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float))},
                           step=rec["iteration"])

    def add_split(self, filename: str, keep) -> None:
        """Also append each record's keys for which `keep(key)` holds to loss_logs/`filename`
        (a record with no such key is not written)."""
        if self.rank == 0:
            self.splits.append((open(self.log_dir / filename, "a"), keep))

    def close(self) -> None:
        if self.rank != 0:
            return
        for f, _ in self.splits:
            f.close()
        self.jsonl.close()
        self.txt.close()
        if self.wandb is not None:
            self.wandb.finish()


def progress_bar(total: int, initial: int, mode: str, rank: int):
    enabled = rank == 0 and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True)
