"""One rank of the ZeRO-3 memory measurement (`megadiff bench engine` launches it with
torchrun; `deepspeed --num_gpus N --module megadiff.bench.zero_worker ...` works too).

Builds the benchmark transformer, wraps it like `megadiff train` does (`build_ds_config` +
`build_engine`, bf16, the chosen ds_configs JSON), runs `--steps` trainer iterations on a
tiny synthetic batch (activations do not matter here) and tallies the model-state tensors
this rank holds (`megadiff.bench.accounting`): after the last backward, while gradients are
live and Adam's moments exist (--steps >= 2), or after the only step (--steps 1). Writes
OUT/rank{R}.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megadiff.bench.zero_worker", description=__doc__)
    p.add_argument("--out", required=True, help="directory for rank{R}.json")
    p.add_argument("--model", default=None,
                   help="directory from megadiff.bench.model.save_bench_model (default: build "
                        "one from --width/--layers in memory)")
    p.add_argument("--width", type=int, default=1536)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="trainer iterations (>= 1)")
    p.add_argument("--config", default="zero3", help="ds_configs name or JSON path")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be at least 1")
    import time

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        seconds[name] = round(now - t0, 2)
        t0 = now

    import deepspeed
    import psutil
    import torch

    from megadiff.bench import accounting
    from megadiff.bench.loop import accelerator_device, ds_iteration, optim_config, trainer_shim
    from megadiff.bench.model import BenchShape, build_transformer, shape_of, synthetic_batch
    from megadiff.config import RunConfig
    from megadiff.engine.dist_env import setup_dist_env
    from megadiff.engine.ds_config import build_ds_config
    from megadiff.engine.engines import build_engine
    from megadiff.models import sd3

    lap("import")
    env = setup_dist_env()
    deepspeed.init_distributed(verbose=False)
    lap("init_distributed")
    # Tiny activations (batch 1, 4x4 image tokens, 4 text tokens): model states only.
    small = dict(batch=1, latent_size=8, t5_tokens=4, clip_tokens=0)
    if args.model:
        shape = shape_of(sd3.transformer_config(args.model), **small)
    else:
        shape = BenchShape(width=args.width, layers=args.layers, **small)
        shape.check()
    cfg = RunConfig()
    cfg.model.precision = args.precision
    cfg.deepspeed.config = args.config
    cfg.data.micro_batch_size = 1
    cfg.train.max_steps = 10**6
    ds = build_ds_config(cfg, env.world_size)
    # Loaded in fp32 like BaseTrainer.build_network; DeepSpeed casts to bf16.
    module = (sd3.load_transformer(args.model, torch.float32) if args.model
              else build_transformer(shape, seed=0))
    n_params = sum(p.numel() for p in module.parameters())
    lap("build_model")
    engine = build_engine(module, ds, optim_config(cfg), cfg.train.max_steps)
    lap("build_engine")
    batch = {k: v.to(accelerator_device()) for k, v in synthetic_batch(shape, seed=env.rank).items()}
    t = trainer_shim(cfg, {"transformer": engine}, batch, seed=env.rank, rank=env.rank,
                     world_size=env.world_size)
    out: dict = {}

    def tally() -> None:
        out["bytes"] = accounting.zero3_state_bytes(engine)

    # With 2+ iterations, tally after the last backward (gradients live, Adam moments exist
    # since the first step); with 1, after its step (the gradient partitions stay allocated).
    for i in range(args.steps):
        ds_iteration(t, before_last_step=tally if 1 < args.steps == i + 1 else None)
    if args.steps == 1:
        tally()
    lap("steps")
    count, numel = accounting.persistent_params(engine.module)
    zero = ds.get("zero_optimization", {})
    release_shm(env)
    return {
        "rank": env.rank, "world_size": env.world_size, "n_params": n_params,
        "stage": engine.zero_optimization_stage(), "precision": args.precision,
        "grad_dtype": str(getattr(engine.optimizer, "gradient_accumulation_dtype", "")),
        "bytes": out["bytes"], "measured_after": "step" if args.steps == 1 else "backward",
        "persistent_params": count, "persistent_numel": numel,
        "param_persistence_threshold": zero.get("stage3_param_persistence_threshold"),
        "reduce_bucket_size": zero.get("reduce_bucket_size"),
        "rss_bytes": psutil.Process().memory_info().rss,
        "seconds": seconds, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
    }


def release_shm(env) -> None:
    """Unlink this rank's DeepSpeed shm allreduce buffer once every rank is past the point of
    opening the others' (the mapping lives on), whichever launcher started the job."""
    import torch.distributed as dist

    from megadiff.bench.launch import remove_shm_files

    if dist.is_initialized():
        dist.barrier()
    remove_shm_files(env.master_port, env.master_addr, rank=env.rank)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    rec = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{rec['rank']}.json.tmp"
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out / f"rank{rec['rank']}.json")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
