"""megadiff data merge SET_DIR... --out SHARD_DIR: join complete shard sets (e.g. the outputs of
`build --part K/N` job-array tasks, or builds of different sources) into one set.

Each input must be a complete megadiff set of the same schema and geometry. Inputs are placed
under OUT as `NNN-<name>/` (hard links by default, so nothing is copied on one filesystem;
`--mode copy` or `--mode move`), and the index joins them in the order given. The set is
assembled in OUT.partial and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from data_tools.options import main_for


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="SET_DIR", help="complete shard sets to join")
    p.add_argument("--out", required=True, metavar="SHARD_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--mode", choices=("link", "copy", "move"), default="link",
                   help="hard-link (falls back to copy across filesystems), copy, or move inputs")


def _link_tree(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def _place(src: Path, dst: Path, mode: str) -> None:
    if mode == "move":
        shutil.move(str(src), str(dst))
    elif mode == "copy":
        shutil.copytree(src, dst)
    else:
        _link_tree(src, dst)


def merge_sets(inputs: list[str | Path], out: str | Path, overwrite: bool = False,
               mode: str = "link") -> dict:
    from megadiff.data import shardset
    from megadiff.data.schema import BUILD_FILE, ShardSetInfo
    from megadiff.data.verify import read_index

    out = Path(out).expanduser().absolute()
    srcs = [Path(p).expanduser().absolute() for p in inputs]
    if len(set(srcs)) != len(srcs):
        raise ValueError("the same set is named twice: each input is merged once")
    infos = []
    for s in srcs:
        if s == out or out in s.parents:
            raise ValueError(f"input {s} is inside --out {out}: merge into a new directory")
        infos.append(ShardSetInfo.read(s))
        read_index(s)
    for s, info in zip(srcs[1:], infos[1:]):
        if not infos[0].compatible(info):
            raise ValueError(f"{s} holds {info.describe()}, but {srcs[0]} holds "
                             f"{infos[0].describe()}: only sets of one schema and geometry merge")
    h = hashlib.sha256(json.dumps(["merge", mode] + [str(s) for s in srcs]).encode())
    for s in srcs:
        h.update((s / "index.json").read_bytes())
    fp = h.hexdigest()[:24]
    plan = shardset.plan_output(out, infos[0].schema, fp, append=False, overwrite=overwrite)
    if plan.mode == "done":
        print(f"megadiff data: {out} already holds this merge; nothing to do", file=sys.stderr)
        return next(b for b in plan.existing["builds"] if b.get("fingerprint") == fp)["summary"]
    staging = shardset.staging_dir(out)
    shardset.remove_leftovers(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    parts, sources, skipped = [], [], {}
    for i, s in enumerate(srcs):
        name = f"{i:03d}-{s.name}"
        _place(s, staging / name, mode)
        parts.append(name)
        build = shardset.read_json(staging / name / BUILD_FILE) or {}
        for b in build.get("builds", []):
            for k, v in (b.get("summary") or {}).get("skipped", {}).items():
                skipped[k] = skipped.get(k, 0) + v
        sources.append({"path": str(s), "part": name, "samples": infos[i].num_samples,
                        "builds": [{k: b.get(k) for k in ("job", "fingerprint", "inputs")}
                                   for b in build.get("builds", [])]})
    index = shardset.merge_indexes(staging, parts)
    n = sum(sh["samples"] for sh in index["shards"])
    summary = {"written": n, "skipped": skipped, "shards": len(index["shards"]),
               "bytes": sum((sh.get("zip_data") or sh["raw_data"])["bytes"] for sh in index["shards"]),
               "slices": len(parts)}
    info = ShardSetInfo(**{**infos[0].__dict__, "num_samples": n})
    record = {"job": "merge", "fingerprint": fp, "inputs": [str(s) for s in srcs], "mode": mode,
              "sources": sources, "summary": summary,
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    shardset.finalize(staging, parts, info, [record])
    shardset.swap_into_place(staging, out)
    print(f"megadiff data: merged {len(srcs)} sets into {out}: {info.describe()}, "
          f"{summary['shards']} shards, {summary['bytes'] / 1e6:,.1f} MB", flush=True)
    return summary


def run(args) -> dict:
    return merge_sets(args.inputs, args.out, args.overwrite, args.mode)


def main(argv: list[str] | None = None) -> None:
    main_for("merge", add_args, run, argv)


if __name__ == "__main__":
    main()
