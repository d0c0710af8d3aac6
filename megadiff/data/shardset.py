"""The on-disk life of a shard set: where a build is staged, what an output directory already
holds, joining part indexes, and putting a finished set in place without ever leaving a
half-written set where a good one was.

Layout of a set megadiff builds:

  OUT/index.json             streaming's index over every part's shards (what readers open)
  OUT/megadiff_schema.json   ShardSetInfo (schema, geometry, sample count)
  OUT/megadiff_build.json    {"parts": [...], "builds": [{job, fingerprint, settings, inputs,
                              summary}, ...]}
  OUT/[PREFIX]part-NNNNN/    one slice: index.json, shard.*.mds, keys.jsonl, skipped.jsonl,
                             megadiff_done.json

A build is written to `OUT.partial/` (on the same filesystem, so ranks on every node see it)
and renamed to OUT when complete; `--append` moves its finished parts into OUT and then
replaces OUT's index. A killed build leaves `OUT.partial/`, which the same command resumes.
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from megadiff.data.schema import BUILD_FILE, ShardSetInfo
from megadiff.data.writer import write_json_atomic

BUILD_FORMAT = 1


def staging_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def merge_indexes(root: Path, parts: list[str]) -> dict:
    """streaming's `merge_index`, for parts at any depth under `root`: every shard's basenames
    are prefixed with its part's path relative to `root` (a part may itself be a merged set).
    Unlike `merge_index`, it replaces an existing index atomically and downloads nothing."""
    shards = []
    for rel in parts:
        obj = read_json(root / rel / "index.json")
        if obj is None:
            raise ValueError(f"{root / rel / 'index.json'} is missing or damaged: rebuild that part "
                             "(re-run the build) or leave it out of the merge")
        for shard in obj["shards"]:
            shard = json.loads(json.dumps(shard))
            for k in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(k):
                    shard[k]["basename"] = posixpath.join(rel, shard[k]["basename"])
            shards.append(shard)
    index = {"version": 2, "shards": shards}
    write_json_atomic(root / "index.json", index)
    return index


def summarize(dones: list[dict]) -> dict:
    skipped = Counter()
    for d in dones:
        skipped.update(d.get("skipped", {}))
    return {"written": sum(d["written"] for d in dones), "skipped": dict(sorted(skipped.items())),
            "bytes": sum(d["bytes"] for d in dones), "shards": sum(d["shards"] for d in dones),
            "slices": len(dones), "encode_seconds": round(sum(d.get("seconds", 0) for d in dones), 2)}


def finalize(root: Path, parts: list[str], info: ShardSetInfo, builds: list[dict]) -> None:
    """Write the merged index, the schema and the build record of a complete set at `root`."""
    merge_indexes(root, parts)
    info.write(root)
    write_json_atomic(root / BUILD_FILE, {"format": BUILD_FORMAT, "schema": info.schema,
                                          "parts": parts, "builds": builds})


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename a complete set at `staging` to `out`; an old `out` is renamed aside first and
    removed only after the new set is in place."""
    aside = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            aside = out.with_name(f"{out.name}.replaced-{os.getpid()}")
            out.rename(aside)
    staging.rename(out)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def remove_leftovers(out: Path) -> None:
    """Sets renamed aside by a swap that was killed before it removed them."""
    for p in out.parent.glob(f"{out.name}.replaced-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


@dataclass(frozen=True)
class Plan:
    mode: str            # "done" | "fresh" | "overwrite" | "append"
    prefix: str = ""     # part-name prefix (append: b1-, b2-, ...)
    existing: dict | None = None   # OUT's build record (append, done)


def plan_output(out: Path, schema: str, fingerprint: str, append: bool, overwrite: bool) -> Plan:
    """What to do with OUT. Read-only, so every rank reaches the same answer."""
    if append and overwrite:
        raise ValueError("--append and --overwrite exclude each other: pick one")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: choose a directory")
    if not out.exists() or not any(out.iterdir()):
        return Plan("fresh")
    build = read_json(out / BUILD_FILE)
    if build is not None and any(b.get("fingerprint") == fingerprint for b in build.get("builds", [])):
        return Plan("done", existing=build)
    if not (out / "index.json").is_file():
        if overwrite:
            return Plan("overwrite")
        raise ValueError(f"{out} holds files but no shard set: choose an empty --out directory, "
                         "or pass --overwrite to replace its contents")
    try:
        what = ShardSetInfo.read(out).describe()
    except ValueError:
        what = "a shard set megadiff cannot read"
    if overwrite:
        return Plan("overwrite")
    if not append:
        raise ValueError(f"{out} already holds a different shard set ({what}): pass --append to "
                         "add these samples to it, --overwrite to replace it, or choose another --out")
    if build is None or "parts" not in build:
        raise ValueError(f"{out} was not built by `megadiff data` (no {BUILD_FILE}): --append "
                         "cannot extend it; build into a new --out and `megadiff data merge` both")
    if build.get("schema") != schema:
        raise ValueError(f"{out} holds {build.get('schema')} samples, this build writes {schema}: "
                         "append only the same kind of data (or choose another --out)")
    return Plan("append", prefix=f"b{len(build.get('builds', []))}-", existing=build)
