"""One objective recipe's step time and the share of it each network's forward takes
(`megadiff bench` runs this once per tiny recipe, in its own process, one rank).

The trainer is the one `megadiff train` builds from the recipe (demo mode: tiny model,
shards and reward towers in OUT_DIR/run/demo), then, without its loop's logging,
checkpointing and sampling, `--warmup` + `--steps` iterations of `BaseTrainer._step_network`
for the networks `steps_this_iteration` names (`megadiff.bench.loop.ds_iteration`),
starting at iteration max_steps // 2 so that warm-ups and cold starts are over. Forward
passes are timed with hooks (`megadiff.bench.forward_timer`). Writes OUT_DIR/objective.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megadiff.bench.objective_worker", description=__doc__)
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4, help="timed iterations (even: whole 2-cycles)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def measure(args) -> dict:
    from megadiff.bench.forward_timer import ForwardTimer, trainer_modules
    from megadiff.bench.loop import ds_iteration
    from megadiff.config import load_config
    from megadiff.registry import compose_trainer

    out = Path(args.out)
    cfg = load_config(args.recipe, ["logging.wandb_mode=disabled", "logging.progress=off", *args.overrides])
    t0 = time.perf_counter()
    trainer = compose_trainer(cfg.objectives)(cfg, out / "run", resume=False)
    build_s = time.perf_counter() - t0
    trainer.step = cfg.train.max_steps // 2
    timer = ForwardTimer(trainer_modules(trainer))
    steps, fwd, phases, stepped = [], {n: [] for n in timer.modules}, [], []
    with timer.hooked():
        for i in range(args.warmup + args.steps):
            timer.reset()
            nets = trainer.steps_this_iteration(trainer.step)
            stepped += [n for n in nets if n not in stepped]
            t = time.perf_counter()
            ph = ds_iteration(trainer)
            dt = time.perf_counter() - t
            if i >= args.warmup:
                steps.append(dt)
                phases.append(ph)
                for n in fwd:
                    fwd[n].append(timer.seconds[n])
    trainer._release_shm()
    # Means, not medians: iterations differ by design (DMD steps the generator every
    # update_ratio-th one), and the mean over whole cycles is the cost per iteration.
    mean = statistics.fmean(steps)
    return {"recipe": args.recipe, "objectives": cfg.objectives, "networks_stepped": stepped,
            "step_s": mean, "steps": steps, "build_s": build_s,
            "forward_s": {n: statistics.fmean(v) for n, v in fwd.items()},
            "forward_share": {n: statistics.fmean(v) / mean for n, v in fwd.items()},
            "backward_s": statistics.fmean(p["backward"] for p in phases),
            "optimizer_s": statistics.fmean(p["step"] for p in phases),
            "start_iteration": cfg.train.max_steps // 2}


def main(argv=None) -> None:
    args = parse(argv)
    rec = measure(args)
    out = Path(args.out)
    tmp = out / "objective.json.tmp"
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, out / "objective.json")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
