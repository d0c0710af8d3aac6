"""Parallel, resumable shard building: the part every builder (`build`, `prompts`, `pairs`)
shares.

The input is planned into slices (`sources.plan_slices`), the same list on every rank. With
R ranks (any launcher `megadiff.engine.dist_env` knows: deepspeed, torchrun, mpiexec, srun)
and W local workers per rank there are R*W slots; slot k builds slices k, k + R*W, ... each
into its own part directory under `OUT.partial/`, and marks a finished part with
`megadiff_done.json` (the build's fingerprint and the part's counts). Coordination is through
files only (OUT must be on a filesystem every node sees): rank 0 prepares the staging
directory, the other ranks wait for it; when its own slices are done, rank 0 waits (bounded by
--wait-timeout) for every done marker, joins the part indexes and puts the set in place.

Resume: re-running the same command skips parts whose done marker carries the same
fingerprint and rebuilds any other part from scratch, so a killed build ends with every
sample exactly once. The fingerprint covers the inputs (the planned slices), the settings the
samples depend on and the model's files; other settings (workers, batch size, device) may
change between runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from megadiff.data import shardset
from megadiff.data.schema import BUILD_FILE, SCHEMAS, ShardSetInfo
from megadiff.data.sources import Slice, Skip, iter_slice
from megadiff.data.writer import PartWriter, read_done, write_done, write_json_atomic
from megadiff.engine.dist_env import DistEnv, detect

BUILDER_VERSION = 1
# Test hook: a build process SIGKILLs itself after writing this many samples (resume tests).
KILL_ENV = "MEGADIFF_DATA_TEST_KILL_AFTER"


@dataclass
class Job:
    kind: str                    # "build" | "prompts" | "pairs" (a key of processors.PROCESSORS)
    schema: str
    slices: list[Slice]
    settings: dict               # what every sample depends on (stored and fingerprinted)
    inputs: list[str]
    read: dict = field(default_factory=dict)       # iter_slice options (fingerprinted)
    identity: dict = field(default_factory=dict)   # model files (fingerprinted, not stored)
    batch_size: int = 8
    unit: str = "img"

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(
            {"v": BUILDER_VERSION, "kind": self.kind, "schema": self.schema,
             "settings": self.settings, "read": self.read, "identity": self.identity},
            sort_keys=True, default=str).encode())
        for s in self.slices:
            h.update(json.dumps([s.index, s.fmt, s.path, s.label, s.start, s.stop, s.offset,
                                 list(s.files)]).encode())
        return h.hexdigest()[:24]


@dataclass
class BuildOptions:
    out: str
    overwrite: bool = False
    append: bool = False
    workers: int = 1
    threads: int | None = None
    device: str = "auto"
    on_error: str = "skip"       # "skip" | "fail"
    wait_timeout: float = 3600.0
    size_limit: int = 1 << 26
    compression: str | None = None
    progress: bool = True


def part_name(prefix: str, s: Slice) -> str:
    return f"{prefix}part-{s.index:05d}"


class _Ctx:
    """Everything a slot needs, picklable for spawned workers."""

    def __init__(self, job: Job, opts: BuildOptions, env: DistEnv, plan: shardset.Plan, fp: str):
        self.job, self.opts, self.env, self.plan, self.fp = job, opts, env, plan, fp
        self.out = Path(opts.out).expanduser().absolute()
        self.staging = shardset.staging_dir(self.out)

    def find_done(self, s: Slice) -> tuple[Path, dict] | None:
        name = part_name(self.plan.prefix, s)
        places = [self.staging / name] + ([self.out / name] if self.plan.mode == "append" else [])
        for d in places:
            done = read_done(d)
            if done is not None and done.get("fingerprint") == self.fp:
                return d, done
        return None

    def error_file(self, slot: int) -> Path:
        return self.staging / "errors" / f"slot-{slot:05d}.txt"


# ---- one slot ------------------------------------------------------------------------------

def _prefetch(items, proc, batch_size: int, stop: threading.Event):
    """Read and prepare (decode, crop) in a thread while the caller encodes: yields
    ("skip", Skip) and ("batch", [Prepared])."""
    q: queue.Queue = queue.Queue(maxsize=4)

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            batch = []
            for it in items:
                p = it if isinstance(it, Skip) else proc.prepare(it)
                if isinstance(p, Skip):
                    if not put(("skip", p)):
                        return
                    continue
                batch.append(p)
                if len(batch) == batch_size:
                    if not put(("batch", batch)):
                        return
                    batch = []
            if batch:
                put(("batch", batch))
            put(("end", None))
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(("error", e))

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    try:
        while True:
            kind, payload = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise payload
            yield kind, payload
    finally:
        stop.set()


class _Killer:
    def __init__(self):
        v = os.environ.get(KILL_ENV, "").strip()
        self.left = int(v) if v else None

    def tick(self) -> None:
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                os.kill(os.getpid(), signal.SIGKILL)


def _fail_message(s: Slice, skip: Skip) -> str:
    detail = f" ({skip.detail})" if skip.detail else ""
    return (f"{s.path}: {skip.key}: {skip.reason}{detail}; fix or remove that input, or build "
            "without --on-error fail to skip and count bad inputs")


def _build_slice(ctx: _Ctx, proc, s: Slice, bar, killer: _Killer, skipped: list,
                 slot: int) -> dict:
    t0 = time.time()
    part = ctx.staging / part_name(ctx.plan.prefix, s)
    writer = PartWriter(part, SCHEMAS[proc.schema][1], ctx.opts.size_limit, ctx.opts.compression)
    read = iter_slice(s, **ctx.job.read)

    def handle(r) -> None:
        if isinstance(r, Skip):
            if ctx.opts.on_error == "fail":
                raise ValueError(_fail_message(s, r))
            writer.skip(r)
            skipped[0] += 1
            bar.set_postfix_str(f"slice {skipped[1]}, skipped {skipped[0]}", refresh=False)
        else:
            writer.write(*r)
            killer.tick()

    try:
        for kind, payload in _prefetch(read, proc, ctx.job.batch_size, threading.Event()):
            if kind == "skip":
                handle(payload)
                bar.update(1)
            else:
                for r in proc.encode(payload):
                    handle(r)
                bar.update(len(payload))
    except BaseException:
        writer.abort()
        raise
    counts = writer.finish()
    done = {"fingerprint": ctx.fp, "slice": s.describe(), **counts,
            "geometry": proc.geometry(writer.first) if writer.first is not None else None,
            "seconds": round(time.time() - t0, 3), "finished_at": time.time(),
            "slot": slot, "rank": ctx.env.rank, "host": socket.gethostname()}
    write_done(part, done)
    return done


def _threads(ctx: _Ctx) -> int | None:
    if ctx.opts.threads:
        return ctx.opts.threads
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    return max(1, cores // (ctx.env.local_world_size * ctx.opts.workers))


def run_slot(ctx: _Ctx, slot: int, n_slots: int, position: int) -> dict:
    """Build this slot's unfinished slices. Returns {built, resumed, written}."""
    mine = [s for s in ctx.job.slices if s.index % n_slots == slot]
    todo = [s for s in mine if ctx.find_done(s) is None]
    stats = {"slot": slot, "built": 0, "resumed": len(mine) - len(todo), "written": 0}
    if not todo:
        return stats
    import torch

    n, before = _threads(ctx), torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        _build_todo(ctx, todo, stats, slot, position)
    finally:
        torch.set_num_threads(before)   # in-process callers (tests, notebooks) keep theirs
    return stats


def _build_todo(ctx: _Ctx, todo: list[Slice], stats: dict, slot: int, position: int) -> None:
    from tqdm import tqdm

    from megadiff.data.encode import pick_device
    from megadiff.data.processors import PROCESSORS

    device = pick_device(ctx.opts.device, ctx.env.local_rank * ctx.opts.workers + position)
    proc = PROCESSORS[ctx.job.kind](ctx.job.settings, device)
    if ctx.job.settings.get("long_context"):   # --long-context: add the extra-context columns
        from megadiff.models.context_train import ContextProcessor

        proc = ContextProcessor(proc, ctx.job.settings)
    sizes = [s.size for s in todo]
    total = None if any(x is None for x in sizes) else sum(sizes)
    tty = sys.stderr.isatty()
    desc = f"{ctx.job.kind} rank {ctx.env.rank}" + (f" worker {position}" if ctx.opts.workers > 1 else "")
    killer, skipped = _Killer(), [0, ""]   # skips so far, slice i/n (the bar's postfix)
    with tqdm(total=total, unit=ctx.job.unit, desc=desc, position=position, dynamic_ncols=True,
              mininterval=0.5 if tty else 30.0, disable=not ctx.opts.progress,
              file=sys.stderr) as bar:
        for i, s in enumerate(todo):
            skipped[1] = f"{i + 1}/{len(todo)}"
            bar.set_postfix_str(f"slice {skipped[1]}, skipped {skipped[0]}", refresh=False)
            done = _build_slice(ctx, proc, s, bar, killer, skipped, slot)
            stats["built"] += 1
            stats["written"] += done["written"]


def _slot_process(ctx: _Ctx, slot: int, n_slots: int, position: int) -> None:
    """Entry point of a spawned local worker."""
    try:
        run_slot(ctx, slot, n_slots, position)
    except ValueError as e:
        _record_error(ctx, slot, str(e))
        sys.exit(2)
    except BaseException:
        _record_error(ctx, slot, traceback.format_exc(limit=3).strip().splitlines()[-1])
        raise


def _record_error(ctx: _Ctx, slot: int, message: str) -> None:
    path = ctx.error_file(slot)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(message)


def _run_local_slots(ctx: _Ctx) -> list[dict]:
    w = ctx.opts.workers
    n_slots = ctx.env.world_size * w
    first = ctx.env.rank * w
    if w == 1:
        try:
            return [run_slot(ctx, first, n_slots, 0)]
        except ValueError as e:
            _record_error(ctx, first, str(e))
            raise
    import multiprocessing as mp

    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=_slot_process, args=(ctx, first + i, n_slots, i), daemon=False)
             for i in range(w)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    for i, p in enumerate(procs):
        if p.exitcode != 0:
            err = ctx.error_file(first + i)
            msg = err.read_text() if err.is_file() else f"exit code {p.exitcode}"
            if p.exitcode == 2:
                raise ValueError(msg)
            raise RuntimeError(f"build worker {i} (slot {first + i}) failed: {msg}; re-run the "
                               "same command to resume")
    return []


# ---- rank 0: staging, waiting, publishing --------------------------------------------------

def _prepare_staging(ctx: _Ctx) -> None:
    staging = ctx.staging
    shardset.remove_leftovers(ctx.out)
    current = shardset.read_json(staging / BUILD_FILE)
    if staging.exists() and (current is None or current.get("fingerprint") != ctx.fp):
        print(f"megadiff data: discarding the unfinished build in {staging} (it was started with "
              "other inputs or settings)", file=sys.stderr, flush=True)
        shutil.rmtree(staging)
    resumed = staging.exists()
    staging.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging / "errors", ignore_errors=True)
    write_json_atomic(staging / BUILD_FILE, {
        "fingerprint": ctx.fp, "job": ctx.job.kind, "schema": ctx.job.schema,
        "mode": ctx.plan.mode, "prefix": ctx.plan.prefix, "out": str(ctx.out),
        "settings": ctx.job.settings, "inputs": ctx.job.inputs, "slices": len(ctx.job.slices)})
    if resumed:
        n = sum(ctx.find_done(s) is not None for s in ctx.job.slices)
        print(f"megadiff data: resuming {staging}: {n} of {len(ctx.job.slices)} slices already "
              "done", file=sys.stderr, flush=True)


def _wait(ctx: _Ctx, what: str, ready, timeout: float) -> None:
    deadline, delay = time.time() + timeout, 0.2
    while not ready():
        errors = sorted((ctx.staging / "errors").glob("*.txt"))
        if errors:
            raise ValueError(f"{errors[0].read_text().strip()} (reported in {errors[0]})")
        if time.time() > deadline:
            raise ValueError(f"{what} after waiting {timeout:.0f} s; re-run the same command to "
                             "resume (finished slices are kept), or raise --wait-timeout")
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)


def _wait_for_staging(ctx: _Ctx) -> None:
    def ready() -> bool:
        cur = shardset.read_json(ctx.staging / BUILD_FILE)
        return cur is not None and cur.get("fingerprint") == ctx.fp

    _wait(ctx, f"rank 0 did not prepare {ctx.staging} for this build (do all ranks run the same "
               "command and see the same paths on a shared filesystem?)", ready,
          ctx.opts.wait_timeout)


def _wait_for_all(ctx: _Ctx) -> list[dict]:
    missing = list(ctx.job.slices)

    def ready() -> bool:
        nonlocal missing
        missing = [s for s in missing if ctx.find_done(s) is None]
        return not missing

    _wait(ctx, f"slices are still unfinished ({', '.join(part_name(ctx.plan.prefix, s) for s in missing[:3])}"
               f"{', ...' if len(missing) > 3 else ''}; did a rank die?)", ready, ctx.opts.wait_timeout)
    return [ctx.find_done(s)[1] for s in ctx.job.slices]


def _publish(ctx: _Ctx, dones: list[dict]) -> tuple[dict, ShardSetInfo]:
    job, plan, out, staging = ctx.job, ctx.plan, ctx.out, ctx.staging
    summary = shardset.summarize(dones)
    if summary["written"] == 0:
        raise ValueError(f"no usable samples: every input was skipped ({_reasons(summary)}); "
                         f"see {staging}/*/skipped.jsonl for each one")
    geoms = {json.dumps(d["geometry"], sort_keys=True) for d in dones if d["written"]}
    if len(geoms) > 1:
        raise ValueError(f"the parts in {staging} disagree on sample shapes ({sorted(geoms)}): "
                         "rebuild with --overwrite")
    g = json.loads(geoms.pop())
    parts = [part_name(plan.prefix, s) for s in job.slices]
    record = {"job": job.kind, "fingerprint": ctx.fp, "settings": job.settings,
              "inputs": job.inputs, "prefix": plan.prefix, "summary": summary,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    version = SCHEMAS[job.schema][0]

    def info(n: int) -> ShardSetInfo:
        return ShardSetInfo(job.schema, version, tuple(g["latent_shape"]), g["text_seq_len"],
                            g["text_dim"], g["pooled_dim"], n, g.get("context"))

    if plan.mode in ("fresh", "overwrite"):
        new = info(summary["written"])
        shardset.finalize(staging, parts, new, [record])
        shutil.rmtree(staging / "errors", ignore_errors=True)
        shardset.swap_into_place(staging, out)
        return summary, new
    # append: check, move the parts in, then replace the index (readers never see a part
    # that the index names before it is complete).
    old = ShardSetInfo.read(out)
    if not old.compatible(info(0)):
        raise ValueError(f"{out} holds {old.describe()}, but this build made {info(0).describe()} "
                         "(another model, --resolution or --max-sequence-length?): build into "
                         "another --out")
    for name in parts:
        src, dst = staging / name, out / name
        if src.is_dir():
            if dst.exists():
                shutil.rmtree(dst)
            src.rename(dst)
    all_parts = list(plan.existing["parts"]) + parts
    index = shardset.merge_indexes(out, all_parts)
    new = info(sum(s["samples"] for s in index["shards"]))
    new.write(out)
    write_json_atomic(out / BUILD_FILE, {**plan.existing, "parts": all_parts,
                                         "builds": list(plan.existing.get("builds", [])) + [record]})
    shutil.rmtree(staging, ignore_errors=True)
    return summary, new


def _reasons(summary: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(summary["skipped"].items(), key=lambda kv: -kv[1])) or "none"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def format_summary(out: Path, summary: dict, info: ShardSetInfo | None, run: dict | None,
                   unit: str) -> str:
    lines = [f"megadiff data: {out}",
             f"  written   {summary['written']:,} samples in {summary['shards']} shards, "
             f"{_mb(summary['bytes'])}" + (f" ({info.describe()})" if info else "")]
    if summary["skipped"]:
        lines.append(f"  skipped   {sum(summary['skipped'].values()):,}: {_reasons(summary)} "
                     f"(each listed in {out}/*part-*/skipped.jsonl)")
    else:
        lines.append("  skipped   none")
    if run is not None:
        enc = run["encode_seconds"]
        rate = f", {run['written'] / enc:,.1f} {unit}/s per process while encoding" if enc > 0 else ""
        lines.append(f"  this run  {run['built']} of {summary['slices']} slices built "
                     f"({run['resumed']} already done): {run['written']:,} {unit} in "
                     f"{run['seconds']:.1f} s{rate}")
    return "\n".join(lines)


def run_build(job: Job, opts: BuildOptions, env: DistEnv | None = None) -> dict | None:
    """Build (or resume, or find already built) the set; returns the summary on rank 0."""
    if opts.on_error not in ("skip", "fail"):
        raise ValueError(f"--on-error {opts.on_error}: use skip or fail")
    if opts.workers < 1:
        raise ValueError(f"--workers {opts.workers} must be >= 1")
    if not job.slices:
        raise ValueError(f"the inputs ({', '.join(job.inputs)}) hold nothing to build from")
    env = env or detect()
    t0 = time.time()
    fp = job.fingerprint()
    out = Path(opts.out).expanduser().absolute()
    plan = shardset.plan_output(out, job.schema, fp, opts.append, opts.overwrite)
    if plan.mode == "done":
        if env.rank == 0:
            rec = next(b for b in plan.existing["builds"] if b.get("fingerprint") == fp)
            print(f"megadiff data: {out} already holds this build (same inputs and settings); "
                  "nothing to do", file=sys.stderr, flush=True)
            print(format_summary(out, rec["summary"], ShardSetInfo.read(out), None, job.unit),
                  flush=True)
            return rec["summary"]
        return None
    if plan.mode == "append":
        _check_append_settings(out, plan, job)
    ctx = _Ctx(job, opts, env, plan, fp)
    if env.rank == 0:
        _prepare_staging(ctx)
    else:
        _wait_for_staging(ctx)
    _run_local_slots(ctx)
    if env.rank != 0:
        print(f"megadiff data: rank {env.rank} finished its slices; rank 0 joins the parts",
              file=sys.stderr, flush=True)
        return None
    dones = _wait_for_all(ctx)
    summary, info = _publish(ctx, dones)
    this_run = [d for d in dones if d.get("finished_at", 0) >= t0]
    run = {"built": len(this_run), "resumed": len(dones) - len(this_run),
           "written": sum(d["written"] for d in this_run), "seconds": time.time() - t0,
           "encode_seconds": sum(d["seconds"] for d in this_run)}
    print(format_summary(out, summary, info, run, job.unit), flush=True)
    return summary


_GEOMETRY_SETTINGS = ("resolution", "resize", "max_sequence_length", "long_context")


def _check_append_settings(out: Path, plan: shardset.Plan, job: Job) -> None:
    """Fail before encoding anything if the new samples cannot join OUT's."""
    for b in plan.existing.get("builds", []):
        prev = b.get("settings") or {}
        for k in _GEOMETRY_SETTINGS:
            if k in prev and k in job.settings and prev[k] != job.settings[k]:
                raise ValueError(f"{out} was built with {k.replace('_', '-')} {prev[k]}, this build "
                                 f"uses {job.settings[k]}: use the same value to --append, or "
                                 "build into another --out")

