"""`megadiff bench [--quick]`: every benchmark in one command, one table.

Sections (each a row group of the table; figures also in OUT/bench.json):
  overhead     DeepSpeed engine vs a bare PyTorch loop, same model/batch/loss (`bench engine`)
  memory       per-rank model-state bytes under ZeRO-0, ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload
               at 1/2/4 ranks (one torchrun launch per rank count, `memory_worker`), against
               the 16 bytes/param/N ideal and the ZeRO paper's per-stage figure
  flops        megadiff.flops' analytic MMDiT count vs torch.utils.flop_counter
  data         shard-reader samples/s (SD3-M shapes at 512 px) with 1 and 2 workers
  cached       training step with cached latents vs encoding on the fly
  objectives   for every objective in the registry with a tiny recipe (tiny-*-cpu.yaml whose
               objectives end with it): mean iteration time and the share of it spent in each
               network's forward passes (teacher, fake score, reward models, VAE, ...)
  projection   PROJECTED samples/s and model-state memory per GPU, A100 / H100, SD3-M /
               SD3.5-M / SD3.5-L at 512 / 1024 px, from the FLOP count and a stated MFU

Plots (PNG, matplotlib): OUT/throughput.png (projections and measured objective step
times), OUT/loss.png (the loss curves of `--run DIR` ... from loss_logs/*.jsonl).
Figures, never pass/fail thresholds; timings on a shared CPU are noisy (the load is printed).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from megadiff.bench.table import format_table

SECTIONS = ("overhead", "memory", "flops", "data", "cached", "objectives", "projection")
GIB, MIB = 2**30, 2**20


@dataclass
class Plan:
    quick: bool
    sections: tuple[str, ...]
    ranks: tuple[int, ...]
    configs: tuple[str, ...]
    width: int                   # overhead benchmark transformer width
    mem_width: int
    steps: int
    warmup: int
    objective_steps: int
    reader_samples: int
    cached_resolution: int
    mfu: float
    world: int
    out: Path
    runs: tuple[str, ...] = ()
    recipes: tuple[str, ...] | None = None
    extra: dict = field(default_factory=dict)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller models and fewer steps (a few minutes)")
    p.add_argument("--only", default=None, help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--ranks", default="1,2,4", help="rank counts of the memory section (1,2,4)")
    p.add_argument("--configs", default="zero0,zero2,zero3,zero3_offload",
                   help="ds_configs of the memory section")
    p.add_argument("--recipes", default=None,
                   help="comma-separated recipes for the objectives section (default: one tiny "
                        "recipe per registered objective)")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed MFU of the projections (0.40)")
    p.add_argument("--world", type=int, default=8, help="GPUs the projected ZeRO-3 memory is split over (8)")
    p.add_argument("--run", action="append", default=[], metavar="DIR",
                   help="plot this run's loss curves (repeatable)")
    p.add_argument("--out", default="bench-results", help="directory for bench.json and the plots")


def plan(args: argparse.Namespace) -> Plan:
    from megadiff.bench.engine import parse_ranks
    from megadiff.engine.ds_config import load_ds_json

    sections = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise ValueError(f"--only {args.only!r}: unknown section {bad[0] if bad else ''!r}; "
                         f"choose from {','.join(SECTIONS)}")
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    for c in configs:
        try:
            load_ds_json(c)
        except ValueError as e:
            raise ValueError(f"--configs: {e}") from None
    if args.world < 1:
        raise ValueError(f"--world {args.world} must be at least 1")
    for r in args.run:
        if not (Path(r) / "loss_logs").is_dir():
            raise ValueError(f"--run {r} has no loss_logs/: give a megadiff run directory")
    q = bool(args.quick)
    recipes = tuple(x.strip() for x in args.recipes.split(",") if x.strip()) if args.recipes else None
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu {args.mfu} must be in (0, 1]: the assumed model FLOP utilisation")
    return Plan(quick=q, sections=sections, ranks=parse_ranks(args.ranks), configs=configs,
                width=256 if q else 1536, mem_width=256 if q else 1024, steps=3 if q else 8,
                warmup=1 if q else 2, objective_steps=2 if q else 4, reader_samples=32 if q else 128,
                cached_resolution=128 if q else 256, mfu=args.mfu, world=args.world, out=Path(args.out),
                runs=tuple(args.run), recipes=recipes)


def progress(msg: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# ---- sections: each returns (rows, figures) ----------------------------------------------

def section_overhead(p: Plan, work: Path):
    from megadiff.bench import engine

    s = engine.Settings(quick=p.quick, ranks=(1,), width=p.width, layers=2, batch=2, steps=p.steps,
                        warmup=p.warmup, memory_steps=1, step_config="zero0", memory_config="zero3")
    model = engine._prepare_model(s, work / "overhead-model")
    r = engine.step_overhead(s, model)
    bare, ds = r.bare.median("total"), r.ds.median("total")
    rows = [["overhead", f"bare PyTorch loop, width {p.width} x 2 blocks, fp32", f"{bare:.3f} s/step", "", ""],
            ["overhead", "DeepSpeed engine (ZeRO-0), same model/batch/loss", f"{ds:.3f} s/step",
             f"{r.ratio:.2f}x bare steps/s", f"CPU-time ratio {r.cpu_ratio:.2f}x"]]
    return rows, {"bare_s": bare, "deepspeed_s": ds, "ratio": r.ratio, "cpu_ratio": r.cpu_ratio,
                  "description": r.description}


def memory_rows(records_by_ranks: dict[int, list[dict]]) -> tuple[list, list[dict]]:
    """Table rows and figures from the memory workers' records: per (config, ranks), the
    largest rank's model-state bytes vs 16 B/param/N and the ZeRO paper's figure."""
    from megadiff.bench.state_bytes import zero_paper_bytes

    rows, figs = [], []
    for n, records in sorted(records_by_ranks.items()):
        for i, rec in enumerate(records[0]["configs"]):
            per_rank = max(r["configs"][i]["model_state"] for r in records)
            params = rec["n_params"]
            ideal = 16.0 * params / n
            paper = zero_paper_bytes(params, n, rec["stage"], rec["offload"])
            figs.append({"config": rec["config"], "ranks": n, "stage": rec["stage"], "offload": rec["offload"],
                         "n_params": params, "model_state_bytes": per_rank, "ideal_16_per_n": ideal,
                         "zero_paper_bytes": paper, "bytes": rec["bytes"]})
            where = " (host memory)" if rec["offload"] else ""
            rows.append(["memory", f"{rec['config']} at {n} rank(s), {params / 1e6:.1f}M params{where}",
                         f"{per_rank / MIB:,.1f} MiB/rank", f"{per_rank / ideal:.2f}x 16B/param/N",
                         f"ZeRO paper {paper / MIB:,.1f} MiB ({per_rank / paper:.2f}x)"])
    return rows, figs


def section_memory(p: Plan, work: Path):
    from megadiff.bench import launch

    by_ranks = {}
    for n in p.ranks:
        t0 = time.perf_counter()
        by_ranks[n] = launch.run_ranks(
            "megadiff.bench.memory_worker", n,
            ["--configs", ",".join(p.configs), "--width", str(p.mem_width), "--layers", "2",
             "--steps", "2"], work / f"memory-{n}", work / f"memory-{n}.log",
            on_start=lambda port, n=n: progress(f"memory at {n} rank(s): torchrun, port {port}"))
        progress(f"memory at {n} rank(s): {time.perf_counter() - t0:.0f} s")
    return memory_rows(by_ranks)


def section_flops(p: Plan, work: Path):
    from megadiff.bench.model import BenchShape, transformer_config
    from megadiff.bench.projection import flop_agreement
    from megadiff.models.tiny import tiny_transformer_config

    cases = [("tiny test model, 64 px", tiny_transformer_config(), 8, 32 + 77),
             (f"width {p.mem_width} x 2 blocks, 256 px", transformer_config(BenchShape(width=p.mem_width)), 32,
              77 + 32)]
    rows, figs = [], []
    for name, cfg, latent, text in cases:
        r = flop_agreement(cfg, latent, text)
        figs.append(dict(r, case=name))
        rows.append(["flops", f"forward FLOPs, {name}", f"{r['analytic']:,.0f} analytic",
                     f"{r['counted']:,} FlopCounterMode",
                     "exact" if r["exact"] else f"rel. error {r['relative_error']:.2e}"])
    return rows, figs


def section_data(p: Plan, work: Path):
    from megadiff.bench.data_loader import reader_rate, synthetic_set

    root = synthetic_set(work / "reader-set", p.reader_samples)
    rows, figs = [], []
    for w in (1, 2):
        r = reader_rate(root, w)
        figs.append(r)
        rows.append(["data", f"shard reader, SD3-M 512 px samples (~2.9 MB), {w} worker(s)",
                     f"{r['samples_per_s']:,.1f} samples/s", f"first epoch {r['first_epoch_samples_per_s']:,.1f}",
                     f"{r['samples']} samples, batch 8"])
    return rows, figs


def section_cached(p: Plan, work: Path):
    from megadiff.bench.cached import cached_vs_on_the_fly

    r = cached_vs_on_the_fly(p.cached_resolution, 1 if p.quick else 2, 2 if p.quick else p.steps)
    desc = f"{r['resolution']} px, batch {r['batch']}, width 768 x 2, SD3-width VAE"
    rows = [["cached", f"step, cached latents + embeddings ({desc})", f"{r['cached_s']:.3f} s/step", "1.00x", ""],
            ["cached", "step, encoding on the fly", f"{r['on_the_fly_s']:.3f} s/step",
             f"{r['on_the_fly_s'] / r['cached_s']:.2f}x cached", f"encoding alone {r['encode_s']:.3f} s"]]
    return rows, r


def objective_recipes(explicit: tuple[str, ...] | None = None) -> dict[str, str | None]:
    """objective -> the tiny recipe that exercises it (tiny-*-cpu.yaml whose objectives list
    ends with it, shortest list first), for every objective in the registry."""
    from megadiff.config import available_recipes, _recipe_dict
    from megadiff.registry import OBJECTIVES

    if explicit:
        return {r: r for r in explicit}
    found: dict[str, tuple[int, str]] = {}
    for name in available_recipes():
        if not (name.startswith("tiny-") and name.endswith("-cpu")):
            continue
        try:
            raw = _recipe_dict(name)
        except ValueError:
            continue
        objs = raw.get("objectives") or ["flow_matching"]
        if raw.get("context", {}).get("enabled"):
            continue
        key = objs[-1]
        if key not in found or len(objs) < found[key][0]:
            found[key] = (len(objs), name)
    return {obj: (found[obj][1] if obj in found else None) for obj in OBJECTIVES}


def run_objective(recipe: str, steps: int, work: Path, timeout: float = 600) -> dict:
    from megadiff.bench import launch

    out = work / f"objective-{recipe}"
    out.mkdir(parents=True, exist_ok=True)
    env = launch.child_env()
    port = launch.free_port()
    env.update(MASTER_ADDR=launch.MASTER_ADDR, MASTER_PORT=str(port), WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "megadiff.bench.objective_worker", "--recipe", recipe, "--out", str(out),
           "--steps", str(steps), "--warmup", "1"]
    log = out / "worker.log"
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"recipe": recipe, "error": f"timed out after {timeout:.0f} s"}
    finally:
        launch.remove_shm_files(port)
    if proc.returncode != 0 or not (out / "objective.json").is_file():
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip() and "arn" not in ln]
        return {"recipe": recipe, "error": (tail[-1] if tail else f"exit {proc.returncode}")[:160]}
    return json.loads((out / "objective.json").read_text())


def objective_rows(by_objective: dict[str, dict | None]) -> list:
    rows = []
    for obj, rec in by_objective.items():
        if rec is None:
            rows.append(["objectives", obj, "-", "", "no tiny-*-cpu recipe ends with this objective"])
            continue
        if "error" in rec:
            rows.append(["objectives", f"{obj} ({rec['recipe']})", "failed", "", rec["error"]])
            continue
        shares = ", ".join(f"{n} {100 * s:.0f}%" for n, s in sorted(rec["forward_share"].items(),
                                                                     key=lambda kv: -kv[1]) if s > 0)
        bwd = (rec["backward_s"]) / rec["step_s"]
        rows.append(["objectives", f"{obj} ({rec['recipe']}, steps {'+'.join(rec['networks_stepped'])})",
                     f"{rec['step_s']:.3f} s/iteration", f"backward {100 * bwd:.0f}%",
                     f"forward: {shares or 'n/a'}"])
    return rows


def section_objectives(p: Plan, work: Path):
    which = objective_recipes(p.recipes)
    figs: dict[str, dict | None] = {}
    for obj, recipe in which.items():
        if recipe is None:
            figs[obj] = None
            continue
        t0 = time.perf_counter()
        progress(f"objective {obj}: recipe {recipe}")
        figs[obj] = run_objective(recipe, p.objective_steps, work)
        progress(f"objective {obj}: {time.perf_counter() - t0:.0f} s")
    return objective_rows(figs), figs


def section_projection(p: Plan, work: Path):
    from megadiff.bench.projection import PEAK_TFLOPS, projections

    rows, figs = [], []
    for pr in projections(p.mfu, p.world):
        figs.append({"gpu": pr.gpu, "model": pr.model, "resolution": pr.resolution, "params": pr.params,
                     "train_flops_per_sample": pr.flops_per_sample, "mfu": pr.mfu,
                     "samples_per_s_per_gpu": pr.samples_per_s, "state_bytes_per_gpu": pr.state_bytes_per_gpu,
                     "world": pr.world, "peak_tflops": PEAK_TFLOPS[pr.gpu]})
        rows.append(["projection", f"PROJECTED {pr.gpu} {pr.model} {pr.resolution} px",
                     f"{pr.samples_per_s:,.2f} samples/s/GPU", f"{pr.flops_per_sample / 1e12:,.2f} TFLOP/sample",
                     f"{pr.state_bytes_per_gpu / GIB:,.2f} GiB states/GPU (ZeRO-3 / {pr.world})"])
    return rows, figs


RUNNERS = {"overhead": section_overhead, "memory": section_memory, "flops": section_flops,
           "data": section_data, "cached": section_cached, "objectives": section_objectives,
           "projection": section_projection}


def run(args: argparse.Namespace) -> None:
    from megadiff.bench.engine import load_note
    from megadiff.bench import plots

    p = plan(args)
    p.out.mkdir(parents=True, exist_ok=True)
    rows, figures = [], {"quick": p.quick, "mfu": p.mfu, "sections": list(p.sections)}
    with tempfile.TemporaryDirectory(prefix="megadiff-bench-") as tmp:
        for name in p.sections:
            t0 = time.perf_counter()
            progress(f"section {name}")
            try:
                r, f = RUNNERS[name](p, Path(tmp))
            except (RuntimeError, OSError) as e:      # one failed section does not lose the others
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                r, f = [[name, "failed", "-", "", first[:160]]], {"error": str(e)[-2000:]}
            rows += r
            figures[name] = f
            figures.setdefault("seconds", {})[name] = time.perf_counter() - t0
    figures["load"] = load_note()
    figures["plots"] = plots.write_plots(p.out, figures, p.runs)
    (p.out / "bench.json").write_text(json.dumps(figures, indent=1, default=str))
    table = format_table(["section", "what", "measured", "reference", "note"], rows, align="lllll")
    print(f"megadiff bench ({'quick' if p.quick else 'full'}); {figures['load']}")
    print(table)
    print(f"projection rows are computed from the FLOP count at an assumed MFU of {p.mfu:.2f}, "
          "not measured; everything else was measured on this machine")
    print(f"figures: {p.out / 'bench.json'}; plots: {', '.join(figures['plots']) or 'none'}")
