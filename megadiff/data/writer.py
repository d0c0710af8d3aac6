"""Writing one part directory (MDS shards + keys.jsonl + skipped.jsonl + done marker), and
`write_train_shards`, the in-memory one-part build the embedded demo and tests use."""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from megadiff.data.schema import DONE_FILE, KEYS_FILE, SCHEMAS, SKIPPED_FILE, ShardSetInfo
from megadiff.data.sources import Skip

HASHES = ["sha1", "xxh64"]          # per-shard hashes in index.json; `verify` checks them


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PartWriter:
    """One part: MDS shards of `columns`, plus the key of each sample (in order) and every skip
    with its reason. `finish()` returns the counts; the caller writes the done marker."""

    def __init__(self, part_dir: str | Path, columns: dict[str, str], size_limit: int = 1 << 26,
                 compression: str | None = None):
        from streaming import MDSWriter

        self.dir = Path(part_dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.mds = MDSWriter(out=str(self.dir), columns=columns, compression=compression,
                             hashes=HASHES, size_limit=size_limit)
        self.keys = open(self.dir / KEYS_FILE, "w")
        self.skips = open(self.dir / SKIPPED_FILE, "w")
        self.written, self.skipped = 0, Counter()
        self.first: dict | None = None

    def write(self, key: str, record: dict) -> None:
        self.mds.write(record)
        self.keys.write(json.dumps(key) + "\n")
        self.written += 1
        if self.first is None:
            self.first = record

    def skip(self, s: Skip) -> None:
        self.skips.write(json.dumps({"key": s.key, "reason": s.reason, "detail": s.detail}) + "\n")
        self.skipped[s.reason] += 1

    def abort(self) -> None:
        """Stop without an index (the part stays unfinished and is rebuilt on resume)."""
        self.mds.cancel_future_jobs()
        for f in (self.keys, self.skips):
            f.close()

    def finish(self) -> dict:
        self.mds.finish()
        for f in (self.keys, self.skips):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        index = json.loads((self.dir / "index.json").read_text())
        nbytes = sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in index["shards"])
        return {"written": self.written, "skipped": dict(self.skipped), "bytes": nbytes,
                "shards": len(index["shards"])}


def write_done(part_dir: Path, record: dict) -> None:
    write_json_atomic(part_dir / DONE_FILE, record)


def read_done(part_dir: Path) -> dict | None:
    try:
        return json.loads((part_dir / DONE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_train_shards(out_dir: str | Path, samples: Iterable[tuple[Image.Image, str]],
                       model_path: str | Path, resolution: int, max_sequence_length: int,
                       batch_size: int = 8, seed: int = 0, dtype: str = "fp32",
                       size_limit: int = 1 << 26) -> ShardSetInfo:
    """Encode in-memory (image, caption) pairs into a complete `megadiff.train` set at `out_dir`
    (one part; built beside it and renamed into place, so an interrupted build never leaves a
    half-written set). Sample i has key `sample-{i:06d}`, which seeds its latent noise."""
    from megadiff.data import shardset
    from megadiff.data.processors import TrainProcessor
    from megadiff.data.sources import Item

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already holds files: choose an empty --out directory")
    staging = shardset.staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    settings = {"model": str(model_path), "dtype": dtype, "resolution": resolution,
                "max_sequence_length": max_sequence_length, "seed": seed, "latents": "sample",
                "resize": "center-crop"}
    proc = TrainProcessor(settings, "cpu")
    part = "part-00000"
    writer = PartWriter(staging / part, SCHEMAS["megadiff.train"][1], size_limit)
    t0 = time.time()

    def flush(batch: list) -> None:
        for r in proc.encode(batch):
            writer.skip(r) if isinstance(r, Skip) else writer.write(*r)
        batch.clear()

    batch = []
    for i, (img, caption) in enumerate(samples):
        p = proc.prepare(Item(f"sample-{i:06d}", caption, (img,)))
        if isinstance(p, Skip):
            writer.skip(p)
            continue
        batch.append(p)
        if len(batch) == batch_size:
            flush(batch)
    if batch:
        flush(batch)
    counts = writer.finish()
    if counts["written"] == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError("no samples to write: the input held no usable image-caption pairs")
    geometry = proc.geometry(writer.first)
    done = {"fingerprint": None, "slice": {"index": 0, "format": "memory"}, **counts,
            "geometry": geometry, "seconds": time.time() - t0}
    write_done(staging / part, done)
    info = ShardSetInfo("megadiff.train", SCHEMAS["megadiff.train"][0],
                        tuple(geometry["latent_shape"]), geometry["text_seq_len"],
                        geometry["text_dim"], geometry["pooled_dim"], counts["written"])
    build = {"job": "write_train_shards", "fingerprint": None, "settings": settings,
             "summary": shardset.summarize([done])}
    shardset.finalize(staging, [part], info, [build])
    shardset.swap_into_place(staging, out)
    return info
