"""Check a shard set end to end and report problems by file: the index parses, every shard
file is there with its recorded size and hashes, the columns are the schema's, the sample
count matches `megadiff_schema.json`, samples decode with the recorded shapes and finite
values, and no source key appears twice (resume and merge must never duplicate a sample).
Also the sample reader `inspect` uses (streaming's shard readers, no StreamingDataset)."""
from __future__ import annotations

import json
import posixpath
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megadiff.data.schema import (DONE_FILE, KEYS_FILE, LATENT_COLUMNS, SCHEMA_FILE, SCHEMAS,
                                  ShardSetInfo)
from megadiff.data.shardset import read_json, staging_dir


@dataclass
class Report:
    root: Path
    info: ShardSetInfo | None = None
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    decoded: int = 0
    hashed: int = 0
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, message: str) -> None:
        self.problems[where].append(message)

    def format(self) -> str:
        what = self.info.describe() if self.info else "unknown schema"
        lines = [f"{self.root}: {what}",
                 f"  {self.shards} shards, {self.samples:,} samples, {self.bytes / 1e6:,.1f} MB; "
                 f"{self.hashed} files hashed, {self.decoded} samples decoded"]
        lines += [f"  note: {n}" for n in self.notes]
        if self.ok:
            lines.append("  OK")
        else:
            n = sum(len(v) for v in self.problems.values())
            lines.append(f"  {n} problem(s) in {len(self.problems)} file(s):")
            for where, msgs in sorted(self.problems.items()):
                for m in msgs[:20]:
                    lines.append(f"    {where}: {m}")
                if len(msgs) > 20:
                    lines.append(f"    {where}: ... and {len(msgs) - 20} more")
        return "\n".join(lines)


def _shard_file(shard: dict) -> dict:
    return shard.get("zip_data") or shard["raw_data"]


def _reader(root: Path, shard: dict, tmp: Path | None):
    """A streaming MDS reader for one shard; a compressed-only shard is unpacked into `tmp`."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    raw = root / shard["raw_data"]["basename"]
    if raw.is_file() or not shard.get("zip_data"):
        return reader_from_json(str(root), "", shard)
    assert tmp is not None
    data = decompress(shard["compression"], (root / shard["zip_data"]["basename"]).read_bytes())
    dest = tmp / shard["raw_data"]["basename"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return reader_from_json(str(tmp), "", shard)


def read_index(root: Path) -> dict:
    obj = read_json(Path(root) / "index.json")
    if obj is None or not isinstance(obj.get("shards"), list):
        raise ValueError(f"{Path(root) / 'index.json'} is missing or damaged: {root} is not a "
                         "complete shard set (re-run the build, or `megadiff data verify` it)")
    return obj


def iter_samples(root: str | Path, limit: int | None = None) -> Iterator[dict]:
    """Samples in index order (no StreamingDataset: no shared memory, read-only)."""
    root = Path(root)
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for shard in read_index(root)["shards"]:
            reader = _reader(root, shard, Path(tmp))
            for i in range(shard["samples"]):
                if limit is not None and n >= limit:
                    return
                yield reader.get_item(i)
                n += 1


def _check_file(root: Path, meta: dict, report: Report, hashes: bool) -> bool:
    from streaming.base.hashing import get_hash

    rel = meta["basename"]
    path = root / rel
    if not path.is_file():
        report.add(rel, "missing (named in index.json)")
        return False
    size = path.stat().st_size
    if size != meta["bytes"]:
        report.add(rel, f"{size} bytes, index.json says {meta['bytes']} (truncated or replaced)")
        return False
    if hashes and meta.get("hashes"):
        data = path.read_bytes()
        report.hashed += 1
        for algo, want in sorted(meta["hashes"].items()):
            got = get_hash(algo, data)
            if got != want:
                report.add(rel, f"{algo} {got} != {want} in index.json (corrupted)")
                return False
    return True


def _check_sample(s: dict, info: ShardSetInfo, where: str, i: int, report: Report,
                  bucketed: bool) -> None:
    def bad(msg: str) -> None:
        report.add(where, f"sample {i}: {msg}")

    shapes = {"prompt_embeds": (info.text_seq_len, info.text_dim),
              "pooled_prompt_embeds": (info.pooled_dim,)}
    for c in LATENT_COLUMNS.get(info.schema, ()):
        shapes[c] = tuple(info.latent_shape)
    for col, want in shapes.items():
        if col not in s:
            continue
        a = s[col]
        if not isinstance(a, np.ndarray) or a.dtype != np.float16:
            bad(f"{col} is {type(a).__name__} {getattr(a, 'dtype', '')}, expected float16 array")
            continue
        if col in LATENT_COLUMNS.get(info.schema, ()) and bucketed:
            ok = a.ndim == 3 and a.shape[0] == want[0]
        else:
            ok = tuple(a.shape) == want
        if not ok:
            bad(f"{col} has shape {tuple(a.shape)}, megadiff_schema.json says {want}")
        elif not np.isfinite(a).all():
            bad(f"{col} holds inf/nan")
    if not isinstance(s.get("caption"), str) or not s["caption"].strip():
        bad("empty caption")
    for col in ("width", "height"):
        if col in s and not int(s[col]) > 0:
            bad(f"{col} = {s[col]}")
    if "label_w" in s and float(s["label_w"]) not in (0.5, 1.0):
        bad(f"label_w = {s['label_w']}")


def verify_set(root: str | Path, samples_per_shard: int = 1, full: bool = False,
               hashes: bool = True) -> Report:
    root = Path(root)
    report = Report(root)
    if not root.is_dir():
        report.add(str(root), "not a directory")
        return report
    if staging_dir(root).exists():
        report.notes.append(f"an unfinished build is in {staging_dir(root)} (re-run it to finish, "
                            "or delete it)")
    index = read_json(root / "index.json")
    if index is None or not isinstance(index.get("shards"), list):
        report.add("index.json", "missing or not valid JSON: not a complete shard set")
        return report
    try:
        report.info = ShardSetInfo.read(root)
    except ValueError as e:
        report.add(SCHEMA_FILE, str(e))
    build = read_json(root / "megadiff_build.json") or {}
    bucketed = any((b.get("settings") or {}).get("resize") == "buckets"
                   for b in build.get("builds", []))
    info = report.info
    want_cols = sorted(SCHEMAS[info.schema][1].items()) if info else None
    shards = index["shards"]
    report.shards = len(shards)
    by_dir: dict[str, int] = Counter()
    referenced = set()
    with tempfile.TemporaryDirectory() as tmp:
        for shard in shards:
            meta = _shard_file(shard)
            rel = meta["basename"]
            referenced.update(shard[k]["basename"] for k in ("raw_data", "zip_data") if shard.get(k))
            report.samples += shard.get("samples", 0)
            report.bytes += meta["bytes"]
            by_dir[posixpath.dirname(shard["raw_data"]["basename"])] += shard.get("samples", 0)
            if shard.get("format") != "mds":
                report.add(rel, f"format {shard.get('format')}, expected mds")
                continue
            if want_cols is not None:
                got = sorted(zip(shard["column_names"], shard["column_encodings"]))
                if got != want_cols:
                    report.add(rel, f"columns {dict(got)}, the {info.schema} schema has "
                                    f"{dict(want_cols)}")
                    continue
            ok = _check_file(root, meta, report, hashes)
            raw = shard["raw_data"]
            if ok and shard.get("zip_data") and (root / raw["basename"]).is_file():
                ok = _check_file(root, raw, report, hashes)
            if not ok or info is None:
                continue
            n = shard["samples"]
            picks = range(n) if full else sorted({*range(min(samples_per_shard, n)), n - 1} if n else set())
            try:
                reader = _reader(root, shard, Path(tmp))
                for i in picks:
                    _check_sample(reader.get_item(i), info, rel, i, report, bucketed)
                    report.decoded += 1
            except Exception as e:  # a shard that passed its hashes but does not decode
                report.add(rel, f"does not decode ({type(e).__name__}: {e})")
    if info is not None and report.samples != info.num_samples:
        report.add(SCHEMA_FILE, f"num_samples {info.num_samples}, the shards hold {report.samples}")
    _check_parts(root, by_dir, referenced, report)
    return report


def _check_parts(root: Path, by_dir: dict[str, int], referenced: set[str], report: Report) -> None:
    """keys.jsonl (one line per sample, no key twice in the set), done markers, stray shards."""
    seen: dict[str, str] = {}
    for d, n in sorted(by_dir.items()):
        part = root / d
        keys_file = part / KEYS_FILE
        where = posixpath.join(d, KEYS_FILE) if d else KEYS_FILE
        if keys_file.is_file():
            keys = [json.loads(line) for line in keys_file.read_text().splitlines() if line.strip()]
            if len(keys) != n:
                report.add(where, f"{len(keys)} keys for {n} samples")
            for k in keys:
                if k in seen:
                    report.add(where, f"sample {k!r} also in {seen[k]} (duplicate)")
                else:
                    seen[k] = where
        done = read_json(part / DONE_FILE)
        if done is not None and done.get("written") != n:
            report.add(posixpath.join(d, DONE_FILE) if d else DONE_FILE,
                       f"says {done.get('written')} samples, the index has {n}")
        for f in sorted(part.glob("shard.*.mds*")):
            rel = f.relative_to(root).as_posix()
            if rel not in referenced:
                report.add(rel, "not named in index.json (left over from an interrupted build?)")
