"""One rank of `megadiff bench`'s memory table: per-rank model-state bytes under several
DeepSpeed configs (default ZeRO-0, ZeRO-2, ZeRO-3, ZeRO-3 + CPU offload) in one launch.

For each config: the benchmark transformer (seeded, fp32 weights, bf16 mixed precision)
wrapped as `megadiff train` wraps it (`build_ds_config` + `build_engine`), `--steps`
iterations of the trainer's own step on a tiny synthetic batch, and a tally of the tensors
the engine holds after the last backward (`megadiff.bench.state_bytes`); then the engine
is dropped. Writes OUT/rank{R}.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

DEFAULT_CONFIGS = "zero0,zero2,zero3,zero3_offload"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megadiff.bench.memory_worker", description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure_config(name: str, args, env, shape) -> dict:
    from megadiff.bench import state_bytes
    from megadiff.bench.loop import accelerator_device, ds_iteration, optim_config, trainer_shim
    from megadiff.bench.model import build_transformer, synthetic_batch
    from megadiff.config import RunConfig
    from megadiff.engine.ds_config import build_ds_config, offloads_optimizer
    from megadiff.engine.engines import build_engine

    cfg = RunConfig()
    cfg.model.precision = "bf16"
    cfg.deepspeed.config = name
    cfg.data.micro_batch_size = 1
    cfg.train.max_steps = 10**6
    ds = build_ds_config(cfg, env.world_size)
    module = build_transformer(shape, seed=0)
    n_params = sum(p.numel() for p in module.parameters())
    engine = build_engine(module, ds, optim_config(cfg), cfg.train.max_steps)
    batch = {k: v.to(accelerator_device()) for k, v in synthetic_batch(shape, seed=env.rank).items()}
    t = trainer_shim(cfg, {"transformer": engine}, batch, seed=env.rank, rank=env.rank,
                     world_size=env.world_size)
    out: dict = {}

    def tally() -> None:
        out["bytes"] = state_bytes.engine_state_bytes(engine)

    for i in range(args.steps):
        ds_iteration(t, before_last_step=tally if i == args.steps - 1 else None)
    zero = ds.get("zero_optimization", {})
    rec = {"config": name, "stage": int(zero.get("stage", 0)), "offload": offloads_optimizer(ds),
           "n_params": n_params, "bytes": out["bytes"],
           "model_state": state_bytes.model_state(out["bytes"])}
    t.engines.clear()
    gc.collect()
    return rec


def main(argv=None) -> None:
    args = parse(argv)
    import deepspeed

    from megadiff.bench.model import BenchShape
    from megadiff.bench.zero_worker import release_shm
    from megadiff.engine.dist_env import setup_dist_env

    env = setup_dist_env()
    deepspeed.init_distributed(verbose=False)
    shape = BenchShape(width=args.width, layers=args.layers, batch=1, latent_size=8, t5_tokens=4,
                       clip_tokens=0)
    shape.check()
    recs = [measure_config(c.strip(), args, env, shape) for c in args.configs.split(",") if c.strip()]
    release_shm(env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{env.rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": env.rank, "world_size": env.world_size, "configs": recs}, indent=1))
    os.replace(tmp, out / f"rank{env.rank}.json")


if __name__ == "__main__":
    main()
