"""Helpers shared by the tests/test_data_*.py files (no tests here): small image datasets in
every input format, in-process builds through the real CLI argument parsers, and readers.

Builds are cached per session (module-level cache) so several test files can compare against
one reference build without encoding it again."""
from __future__ import annotations

import argparse
import base64
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from megadiff.data.synthetic import shape_samples

_CACHE: dict = {}

SIZES = [(80, 64), (64, 96), (100, 100), (72, 72)]   # non-square: resize + center-crop matter


def write_images(folder: Path, n: int, seed: int = 0, start: int = 0) -> list[tuple[str, str]]:
    """n images (png, and jpg every third) with same-name .txt captions; returns (name, caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (img, cap) in enumerate(shape_samples(n, 96, seed=seed)):
        w, h = SIZES[i % len(SIZES)]
        img = img.resize((w, h))
        name = f"{start + i:03d}." + ("jpg" if i % 3 == 2 else "png")
        img.save(folder / name, quality=95) if name.endswith("jpg") else img.save(folder / name)
        cap = f"{cap} number {start + i}"
        (folder / name).with_suffix(".txt").write_text(cap + "\n")
        out.append((name, cap))
    return out


def write_manifests(folder: Path, dest: Path, items: list[tuple[str, str]]) -> dict[str, Path]:
    """The same images as JSONL (paths, then base64 bytes), Parquet (binary column, several row
    groups; and the Hugging Face {bytes, path} struct) and a WebDataset tar."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest.mkdir(parents=True, exist_ok=True)
    data = [(folder / name).read_bytes() for name, _ in items]
    half = len(items) // 2
    lines = []
    for i, (name, cap) in enumerate(items):
        img = (str(Path("..") / folder.name / name) if i < half
               else {"bytes": base64.b64encode(data[i]).decode()})
        lines.append(json.dumps({"image": img, "caption": cap, "extra": i}))
    # the manifest sits in dest/, the relative paths point into the image folder beside it
    assert folder.parent == dest.parent
    (dest / "train.jsonl").write_text("\n".join(lines) + "\n")
    caps = [c for _, c in items]
    pq.write_table(pa.table({"image": data, "caption": caps}), dest / "train.parquet",
                   row_group_size=5)
    struct = pa.array([{"bytes": d, "path": n} for d, (n, _) in zip(data, items)])
    pq.write_table(pa.table({"image": struct, "caption": caps}), dest / "hf.parquet")
    with tarfile.open(dest / "train.tar", "w") as tf:
        for i, ((name, cap), d) in enumerate(zip(items, data)):
            key, ext = name.split(".")
            add_member(tf, f"{key}.{ext}", d)
            if i % 4 == 3:
                add_member(tf, f"{key}.json", json.dumps({"caption": cap}).encode())
            else:
                add_member(tf, f"{key}.txt", cap.encode())
    return {"jsonl": dest / "train.jsonl", "parquet": dest / "train.parquet",
            "hf_parquet": dest / "hf.parquet", "wds": dest / "train.tar"}


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def job_module(job: str):
    import importlib

    import data_tools

    return importlib.import_module(f"data_tools.{data_tools.JOBS[job]}")


def parse(job: str, argv: list[str]) -> argparse.Namespace:
    mod = job_module(job)
    p = argparse.ArgumentParser()
    mod.add_args(p)
    return p.parse_args(argv)


def run_job(job: str, argv: list[str], fast: bool = True):
    """`megadiff data JOB argv` in this process (one torch thread, no progress bar)."""
    extra = ["--threads", "1", "--no-progress"] if fast and job in ("build", "prompts", "pairs") else []
    return job_module(job).run(parse(job, [*argv, *extra]))


def build(inputs, out: Path, model: Path, *extra: str):
    return run_job("build", [*map(str, inputs), "--model", str(model), "--out", str(out), *extra])


def read_streaming(root: Path) -> list[dict]:
    """Every sample through a plain `streaming.StreamingDataset`, in index order."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(root), shuffle=False, batch_size=1)
    samples = [ds[i] for i in range(len(ds))]
    del ds
    return samples


def keys_of(root: Path) -> list[str]:
    """The source keys of a set, in index order (from the parts' keys.jsonl)."""
    import posixpath

    index = json.loads((root / "index.json").read_text())
    dirs = []
    for s in index["shards"]:
        d = posixpath.dirname(s["raw_data"]["basename"])
        if d not in dirs:
            dirs.append(d)
    return [json.loads(line) for d in dirs for line in (root / d / "keys.jsonl").read_text().splitlines()]


def by_key(root: Path) -> dict[str, dict]:
    return dict(zip(keys_of(root), read_streaming(root)))


def assert_same_samples(a: dict[str, dict], b: dict[str, dict], exact: bool = True) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        for col, va in a[k].items():
            vb = b[k][col]
            if isinstance(va, np.ndarray):
                if exact:
                    np.testing.assert_array_equal(va, vb, err_msg=f"{k} {col}")
                else:
                    np.testing.assert_allclose(va.astype(np.float32), vb.astype(np.float32),
                                               rtol=2e-3, atol=2e-3, err_msg=f"{k} {col}")
            else:
                assert va == vb, (k, col, va, vb)


def reference(tmp_path_factory, tiny_model: Path) -> dict:
    """24 images in a folder, built once with --slice-size 8 (3 parts), sampled latents."""
    if "ref" not in _CACHE:
        root = tmp_path_factory.mktemp("data_ref")
        items = write_images(root / "imgs", 24, seed=5)
        out = root / "shards"
        summary = build([root / "imgs"], out, tiny_model, "--slice-size", "8")
        _CACHE["ref"] = {"root": root, "images": root / "imgs", "items": items, "out": out,
                         "summary": summary, "samples": by_key(out)}
    return _CACHE["ref"]


def png_bytes(size=(40, 40), colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()
