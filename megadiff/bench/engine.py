"""`megadiff bench engine`: what megadiff's DeepSpeed wrapping costs, in figures.

1. Step overhead (1 rank, fp32, `--step-config`, default ds_configs/zero0.json): steps/s of
   the trainer's own iteration (`BaseTrainer._step_network`: flow-matching loss,
   `engine.backward`, `engine.step`) on a real DeepSpeed engine (`build_ds_config` +
   `build_engine`) against a bare PyTorch loop on the same model and batch (torch AdamW,
   `loss.backward()`, `clip_grad_norm_`, `opt.step()`, `zero_grad`). The two loops alternate
   step by step (ABBA order) after a warm-up, so drift in machine load hits both; medians of
   wall-clock and of CPU time are reported. Target: DeepSpeed >= 0.90x the bare loop.
2. ZeRO-3 model-state memory per rank (`--memory-config`, default ds_configs/zero3.json),
   bf16 mixed precision, at each of `--ranks`: one torchrun launch per rank count, each rank
   tallying the partitioned tensors it holds (`megadiff.bench.accounting`) after the last
   backward of 2 iterations (--quick: after 1 iteration's step), not the process RSS.
   Ideal: 16 bytes/param/N. Target: within 1.15x.

A benchmark that prints figures, never a test with timing thresholds.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from megadiff.bench.table import format_table, mib, ratio, seconds

STEP_TARGET = 0.90          # DeepSpeed steps/s >= 0.90 x bare loop
MEMORY_TARGET = 1.15        # per-rank model states <= 1.15 x 16 B/param/N
MAX_RANKS = 64


@dataclass(frozen=True)
class Settings:
    quick: bool
    ranks: tuple[int, ...]
    width: int
    layers: int
    batch: int
    steps: int                 # timed steps per loop
    warmup: int                # untimed steps per loop first
    memory_steps: int          # iterations per ZeRO-3 rank launch (measured in the last)
    step_config: str
    memory_config: str
    sections: tuple[str, ...] = ("step", "memory")
    keep: bool = False


def parse_ranks(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); one-line ValueError on anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        ranks = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--ranks {text!r} must be comma-separated rank counts, e.g. 1,2,4") from None
    bad = [r for r in ranks if not 1 <= r <= MAX_RANKS]
    if bad:
        raise ValueError(f"--ranks {text!r}: rank count {bad[0]} must be between 1 and {MAX_RANKS}")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"--ranks {text!r} repeats a rank count")
    return ranks


def resolve(args: argparse.Namespace) -> Settings:
    """Defaults per mode (--quick: fewer steps) and one-line ValueErrors for bad values."""
    from megadiff.bench.model import BenchShape

    BenchShape(width=args.width, layers=args.layers, batch=args.batch).check()
    quick = bool(args.quick)
    steps = args.steps if args.steps is not None else (3 if quick else 8)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    if steps < 1:
        raise ValueError(f"--steps {steps} must be at least 1 (timed steps per loop)")
    if warmup < 0:
        raise ValueError(f"--warmup {warmup} must be 0 or more")
    _check_ds_config("--step-config", args.step_config)
    if _check_ds_config("--memory-config", args.memory_config) != 3:
        raise ValueError(f"--memory-config {args.memory_config}: the memory benchmark measures "
                         "ZeRO-3 partitions; give a config with zero_optimization.stage 3")
    sections = ("step", "memory") if args.only is None else (args.only,)
    return Settings(quick=quick, ranks=parse_ranks(args.ranks), width=args.width, layers=args.layers,
                    batch=args.batch, steps=steps, warmup=warmup, memory_steps=1 if quick else 2,
                    step_config=args.step_config, memory_config=args.memory_config,
                    sections=sections, keep=bool(getattr(args, "keep", False)))


def _check_ds_config(flag: str, name: str) -> int:
    """The ZeRO stage of a ds_configs name or JSON path; one-line ValueError if unreadable."""
    from megadiff.engine.ds_config import load_ds_json

    try:
        ds = load_ds_json(name)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="fewer timed steps (3 after 1 warm-up instead of 8 after 2): ~2 min")
    p.add_argument("--ranks", default="1,2,4", help="ZeRO-3 rank counts to measure (default 1,2,4)")
    p.add_argument("--width", type=int, default=1536, help="transformer width, heads x 64 (1536)")
    p.add_argument("--layers", type=int, default=2, help="JointTransformerBlocks (2)")
    p.add_argument("--batch", type=int, default=2, help="micro batch of the step benchmark (2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per loop (8; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per loop (2; --quick 1)")
    p.add_argument("--step-config", default="zero0",
                   help="ds_configs name or JSON path for the step benchmark (zero0)")
    p.add_argument("--memory-config", default="zero3",
                   help="ds_configs name or JSON path for the memory benchmark (zero3)")
    p.add_argument("--only", choices=["step", "memory"], default=None, help="run one section")
    p.add_argument("--keep", action="store_true", help="keep the work directory (model, rank logs)")


def run(args: argparse.Namespace) -> None:
    s = resolve(args)
    print(header(s), flush=True)
    if s.keep:
        _run_in(s, Path(tempfile.mkdtemp(prefix="megadiff-bench-")))
    else:
        with tempfile.TemporaryDirectory(prefix="megadiff-bench-") as tmp:
            _run_in(s, Path(tmp))


def _run_in(s: Settings, work: Path) -> None:
    model_dir = _prepare_model(s, work)
    verdicts = []
    if "step" in s.sections:
        res = step_overhead(s, model_dir)
        gc.collect()                     # free both models before the ranks start
        print("\n" + format_step(res, s), flush=True)
        verdicts.append(step_verdict(res))
    if "memory" in s.sections:
        mem = zero_memory(s, model_dir, work)
        print("\n" + format_memory(mem, s), flush=True)
        verdicts.append(memory_verdict(mem))
    print("\n" + "\n".join(verdicts), flush=True)
    if s.keep:
        print(f"work directory kept: {work}", flush=True)


# ---- shared ---------------------------------------------------------------------------------

def progress(msg: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def load_note() -> str:
    """Load average and, where the kernel has it, CPU pressure (share of time some runnable
    task waited for a CPU): other work on the machine makes timings noisy."""
    try:
        one, _, _ = os.getloadavg()
    except OSError:
        return ""
    cores = os.cpu_count() or 1
    note = f"load average {one:.1f} on {cores} cores"
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        avg60 = float(dict(kv.split("=") for kv in line.split()[1:])["avg60"])
        note += f", CPU pressure {avg60:.0f}%"
    except (OSError, KeyError, ValueError, IndexError):
        avg60 = 0.0
    if one > cores or avg60 > 50:
        note += " (busy machine: timings are noisy)"
    return note


def header(s: Settings) -> str:
    import platform

    import torch

    try:
        import deepspeed
        ds_version = deepspeed.__version__
    except Exception:  # pragma: no cover - deepspeed is a dependency
        ds_version = "?"
    mode = "quick" if s.quick else "full"
    return (f"megadiff bench engine ({mode}): torch {torch.__version__}, deepspeed {ds_version}, "
            f"python {platform.python_version()}, {torch.get_num_threads()} torch threads, {load_note()}")


def _prepare_model(s: Settings, work: Path) -> Path:
    from megadiff.bench.model import BenchShape, save_bench_model

    progress(f"building the benchmark transformer (width {s.width}, {s.layers} blocks)")
    return save_bench_model(BenchShape(width=s.width, layers=s.layers, batch=s.batch), work / "model")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---- 1. step overhead -----------------------------------------------------------------------

@dataclass
class LoopTimes:
    """Per timed step: seconds per phase (forward, backward, step), their total, and extra
    figures measured inside a phase (e.g. allreduce, part of backward)."""
    phases: list[dict[str, float]] = field(default_factory=list)

    def add(self, phases: dict[str, float], extra: dict[str, float] | None = None) -> None:
        self.phases.append(dict(phases, total=sum(phases.values()), **(extra or {})))

    def median(self, key: str) -> float:
        return _median([p.get(key, 0.0) for p in self.phases])

    def spread(self) -> float:
        """Interquartile range of the step time over its median."""
        tot = sorted(p["total"] for p in self.phases)
        if len(tot) < 4:
            return (tot[-1] - tot[0]) / _median(tot) if tot else float("nan")
        q = statistics.quantiles(tot, n=4)
        return (q[2] - q[0]) / _median(tot)


@dataclass
class StepResult:
    description: str
    ds_config: dict
    bare: LoopTimes
    ds: LoopTimes
    load: str = ""                   # machine load at the end of the timed steps

    @property
    def ratio(self) -> float:
        """DeepSpeed steps/s over bare steps/s (= bare s/step over DeepSpeed s/step)."""
        return self.bare.median("total") / self.ds.median("total")

    @property
    def best_ratio(self) -> float:
        return min(p["total"] for p in self.bare.phases) / min(p["total"] for p in self.ds.phases)

    @property
    def cpu_ratio(self) -> float:
        """The same ratio in CPU seconds of this process (time other processes take is not
        counted, so it is the steadier figure on a busy machine)."""
        return self.bare.median("cpu") / self.ds.median("cpu")


def step_overhead(s: Settings, model_dir: Path) -> StepResult:
    import deepspeed
    import torch
    import torch.distributed as dist

    from megadiff.bench import launch
    from megadiff.bench.loop import (accelerator_device, bare_iteration, client_adamw,
                                     ds_iteration, optim_config, timed_methods, trainer_shim)
    from megadiff.bench.model import describe, shape_of, synthetic_batch
    from megadiff.config import RunConfig
    from megadiff.engine.dist_env import setup_dist_env
    from megadiff.engine.ds_config import build_ds_config
    from megadiff.engine.engines import build_engine
    from megadiff.models import sd3

    if not dist.is_initialized():
        for k in launch.launcher_vars(os.environ):
            del os.environ[k]                # a lone rank, whatever started this process
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = launch.MASTER_ADDR, str(launch.free_port())
        env = setup_dist_env()
        deepspeed.init_distributed(verbose=False)
        progress(f"step benchmark: 1 rank, port {env.master_port}")
    else:
        env = setup_dist_env()
    if env.world_size != 1:
        raise ValueError("megadiff bench engine runs as one process (it launches its own ranks): "
                         "start it without deepspeed/torchrun")
    port = int(os.environ["MASTER_PORT"])
    try:
        cfg = RunConfig()
        cfg.model.precision = "fp32"
        cfg.deepspeed.config = s.step_config
        cfg.data.micro_batch_size = s.batch
        cfg.train.max_steps = 10**6
        ds_cfg = build_ds_config(cfg, 1)
        optim = optim_config(cfg)
        shape = shape_of(sd3.transformer_config(model_dir), batch=s.batch)
        progress("loading two copies of the transformer; building the DeepSpeed engine")
        ds_module = sd3.load_transformer(model_dir, torch.float32)
        bare_module = sd3.load_transformer(model_dir, torch.float32)
        n_params = sum(p.numel() for p in bare_module.parameters())
        engine = build_engine(ds_module, ds_cfg, optim, cfg.train.max_steps)
        device = accelerator_device()
        bare_module.to(device)
        opt = client_adamw(bare_module, optim)
        batch = {k: v.to(device) for k, v in synthetic_batch(shape, seed=0).items()}
        t_ds = trainer_shim(cfg, {"transformer": engine}, batch, seed=0)
        t_bare = trainer_shim(cfg, {"transformer": bare_module}, batch, seed=0)

        def run_ds() -> tuple[dict[str, float], dict[str, float]]:
            inner: dict[str, float] = {}
            cpu = time.process_time()
            with timed_methods(engine, ("allreduce_gradients",), inner):
                phases = ds_iteration(t_ds)
            return phases, {"cpu": time.process_time() - cpu,
                            "allreduce": inner.get("allreduce_gradients", 0.0)}

        def run_bare() -> tuple[dict[str, float], dict[str, float]]:
            cpu = time.process_time()
            phases = bare_iteration(t_bare, bare_module, opt, optim.grad_clip)
            return phases, {"cpu": time.process_time() - cpu}

        bare, ds = LoopTimes(), LoopTimes()
        loops = (("bare", run_bare, bare), ("ds", run_ds, ds))
        total = s.warmup + s.steps
        for i in range(total):           # ABBA: bare first on even steps, DeepSpeed on odd
            timed = i >= s.warmup
            done = []
            for name, fn, sink in (loops if i % 2 == 0 else loops[::-1]):
                phases, extra = fn()
                if timed:
                    sink.add(phases, extra)
                done.append(f"{name} {sum(phases.values()):.2f} s")
            progress(f"step {i + 1}/{total}{'' if timed else ' (warm-up)'}: {', '.join(done)}")
        return StepResult(description=describe(shape, n_params, "fp32"), ds_config=ds_cfg,
                          bare=bare, ds=ds, load=load_note())
    finally:
        launch.remove_shm_files(port, os.environ.get("MASTER_ADDR", launch.MASTER_ADDR))


def format_step(r: StepResult, s: Settings) -> str:
    cols = ["forward", "backward", "step", "total"]
    rows = []
    base = r.bare.median("total")
    for name, lt in (("bare PyTorch (AdamW, clip_grad_norm_)", r.bare),
                     (f"DeepSpeed engine ({_config_name(s.step_config)})", r.ds)):
        med = lt.median("total")
        rows.append([name] + [seconds(lt.median(c)) for c in cols]
                    + [f"{1 / med:.3f}", ratio(base / med), f"{100 * lt.spread():.0f}%",
                       f"{lt.median('cpu'):.2f}", ratio(r.bare.median("cpu") / lt.median("cpu"))])
    table = format_table(["loop (1 rank, fp32)", "fwd s", "bwd s", "step s", "total s", "steps/s",
                          "vs bare", "IQR", "CPU s", "vs bare"], rows)
    allreduce = r.ds.median("allreduce")
    ds_total = r.ds.median("total")
    zero = r.ds_config.get("zero_optimization", {})
    notes = [
        f"1. Step overhead: {r.description}",
        f"   median of {s.steps} timed steps per loop after {s.warmup} warm-up, loops alternating; "
        f"DeepSpeed config: ZeRO-{zero.get('stage', 0)}, gradient_clipping "
        f"{r.ds_config.get('gradient_clipping')}, bf16 {r.ds_config.get('bf16', {}).get('enabled')}",
        table,
        f"   DeepSpeed bwd includes engine.allreduce_gradients (ZeRO-0: flatten all grads, all_reduce, "
        f"copy back), run even at 1 rank: {seconds(allreduce)} s/step = {100 * allreduce / ds_total:.0f}% "
        f"of its step; without it the ratio would be ~{ratio(base / max(ds_total - allreduce, 1e-9))}",
        f"   best-of ratio (min step times): {ratio(r.best_ratio)}; IQR: spread of step times; "
        f"CPU s: CPU seconds of this process per step (all threads)",
        f"   machine at the end: {r.load}",
    ]
    return "\n".join(notes)


def step_verdict(r: StepResult) -> str:
    ok = r.ratio >= STEP_TARGET
    msg = (f"step overhead: {'PASS' if ok else 'BELOW TARGET'} - DeepSpeed runs at {ratio(r.ratio)} "
           f"the bare loop's steps/s (median wall clock; target >= {STEP_TARGET:.2f}x); "
           f"in CPU time {ratio(r.cpu_ratio)}")
    allreduce = r.ds.median("allreduce")
    if allreduce > 0:
        msg += (f"; its 1-rank gradient allreduce takes {seconds(allreduce)} s/step "
                f"({100 * allreduce / r.ds.median('total'):.0f}%)")
    return msg


def _config_name(name: str) -> str:
    return Path(name).name if name.endswith(".json") else f"{name}.json"


# ---- 2. ZeRO-3 memory -----------------------------------------------------------------------

@dataclass
class MemoryRow:
    world_size: int
    n_params: int
    bytes: dict[str, int]            # the largest rank's bytes per category
    persistent_params: int
    persistent_numel: int
    rss_bytes: int
    seconds: float

    @property
    def model_state(self) -> int:
        from megadiff.bench.accounting import model_state_bytes

        return model_state_bytes(self.bytes)

    @property
    def ideal(self) -> float:
        from megadiff.bench.accounting import ideal_bytes_per_rank

        return ideal_bytes_per_rank(self.n_params, self.world_size)

    @property
    def ratio(self) -> float:
        return self.model_state / self.ideal

    @property
    def ratio_with_buffers(self) -> float:
        return (self.model_state + self.bytes.get("buffers", 0)) / self.ideal


@dataclass
class MemoryResult:
    rows: list[MemoryRow]
    config: dict
    grad_dtype: str
    measured_after: str = "backward"


def gather_row(records: list[dict], seconds_taken: float = 0.0) -> MemoryRow:
    """One table row from the ranks' JSON records: per category, the largest rank."""
    if not records:
        raise ValueError("no rank records")
    cats = sorted({k for r in records for k in r["bytes"]})
    return MemoryRow(world_size=records[0]["world_size"], n_params=records[0]["n_params"],
                     bytes={c: max(r["bytes"].get(c, 0) for r in records) for c in cats},
                     persistent_params=records[0]["persistent_params"],
                     persistent_numel=records[0]["persistent_numel"],
                     rss_bytes=max(r["rss_bytes"] for r in records), seconds=seconds_taken)


def zero_memory(s: Settings, model_dir: Path, work: Path) -> MemoryResult:
    from megadiff.bench import launch
    from megadiff.config import RunConfig
    from megadiff.engine.ds_config import build_ds_config

    rows, grad_dtype, when = [], "", "backward"
    for n in s.ranks:
        t0 = time.perf_counter()
        records = launch.run_ranks(
            "megadiff.bench.zero_worker", n,
            ["--model", str(model_dir), "--config", s.memory_config, "--steps", str(s.memory_steps)],
            work / f"zero3-{n}", work / f"zero3-{n}.log",
            on_start=lambda port: progress(f"ZeRO-3 memory at {n} rank(s): torchrun, port {port}"))
        rows.append(gather_row(records, time.perf_counter() - t0))
        grad_dtype = records[0].get("grad_dtype", "")
        when = records[0].get("measured_after", when)
        progress(f"ZeRO-3 memory at {n} rank(s): {rows[-1].seconds:.0f} s")
    cfg = RunConfig()
    cfg.model.precision = "bf16"
    cfg.deepspeed.config = s.memory_config
    return MemoryResult(rows=rows, config=build_ds_config(cfg, 1), grad_dtype=grad_dtype,
                        measured_after=when)


def format_memory(m: MemoryResult, s: Settings) -> str:
    rows = []
    for r in m.rows:
        b = r.bytes
        rows.append([r.world_size, mib(b.get("bf16 params", 0)), mib(b.get("unpartitioned", 0)),
                     mib(b.get("grads", 0)), mib(b.get("fp32 master", 0)), mib(b.get("optimizer", 0)),
                     mib(r.model_state), mib(r.ideal), ratio(r.ratio),
                     f"{r.model_state * r.world_size / r.n_params:.2f}",
                     mib(b.get("buffers", 0)), ratio(r.ratio_with_buffers)])
    table = format_table(["ranks", "bf16 param", "unpartit.", "grads", "fp32 master", "Adam m,v",
                          "model st.", "ideal 16B/N", "ratio", "B/param x N", "buffers",
                          "ratio+buf"], rows)
    zero = m.config.get("zero_optimization", {})
    first = m.rows[0]
    lines = [
        f"2. ZeRO-3 model-state memory per rank (MiB), {_config_name(s.memory_config)}, bf16 mixed "
        f"precision, {first.n_params / 1e6:.1f}M params",
        f"   counted from the tensors each rank holds after a {m.measured_after} (Adam moments "
        "allocated), each storage once: param.ds_tensor partitions, params kept whole (unpartit.), gradient "
        f"partitions ({m.grad_dtype.replace('torch.', '')}), fp32 master partitions, torch AdamW state; "
        "buffers = reduce bucket (working memory, not model state)",
        table,
        f"   kept whole on every rank (stage3_param_persistence_threshold "
        f"{zero.get('stage3_param_persistence_threshold')}): {first.persistent_params} params, "
        f"{first.persistent_numel:,} elements ({100 * first.persistent_numel / first.n_params:.2f}%); "
        f"reduce bucket: reduce_bucket_size {zero.get('reduce_bucket_size'):,} elements",
        "   process RSS per rank for comparison (runtime dominated): "
        + ", ".join(f"{r.world_size}: {r.rss_bytes / 2**20:,.0f} MiB" for r in m.rows),
    ]
    return "\n".join(lines)


def memory_verdict(m: MemoryResult) -> str:
    worst = max(m.rows, key=lambda r: r.ratio)
    ok = worst.ratio <= MEMORY_TARGET
    ranks = ",".join(str(r.world_size) for r in m.rows)
    msg = (f"ZeRO-3 memory: {'PASS' if ok else 'ABOVE TARGET'} - model states at most "
           f"{ratio(worst.ratio)} of 16 B/param/N at {ranks} ranks (target <= {MEMORY_TARGET:.2f}x)")
    worst_buf = max(m.rows, key=lambda r: r.ratio_with_buffers)
    msg += (f"; with the fixed reduce bucket {ratio(worst_buf.ratio_with_buffers)} at "
            f"{worst_buf.world_size} ranks")
    return msg
