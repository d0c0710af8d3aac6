"""megadiff data inspect SHARD_DIR: schema, counts, builds, skip reasons and a few captions;
with `--decode N --out grid.png`, the first N cached latents decoded through the VAE (the
model the set was built with, or --model) into one PNG, so a person can see what was cached
(pairs: preferred image above the other)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from data_tools.options import main_for


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("shard_dir", metavar="SHARD_DIR")
    p.add_argument("--captions", type=int, default=5, metavar="N", help="captions to print")
    p.add_argument("--decode", type=int, default=0, metavar="N",
                   help="decode the first N latents to a PNG grid (needs --out)")
    p.add_argument("--out", default=None, metavar="GRID.png")
    p.add_argument("--model", default=None, metavar="MODEL_DIR",
                   help="VAE for --decode (default: the model the set was built with)")


def describe(root: Path, n_captions: int) -> str:
    from megadiff.data.schema import BUILD_FILE, SCHEMAS, ShardSetInfo
    from megadiff.data.shardset import read_json
    from megadiff.data.verify import iter_samples, read_index

    info = ShardSetInfo.read(root)
    index = read_index(root)
    nbytes = sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in index["shards"])
    lines = [f"{root}", f"  schema    {info.describe()}",
             f"  shards    {len(index['shards'])}, {nbytes / 1e6:,.1f} MB",
             "  columns   " + ", ".join(f"{k}: {v}" for k, v in SCHEMAS[info.schema][1].items())]
    build = read_json(root / BUILD_FILE) or {}
    for b in build.get("builds", []):
        s, st = b.get("summary") or {}, b.get("settings") or {}
        skipped = ", ".join(f"{k} {v}" for k, v in (s.get("skipped") or {}).items()) or "none"
        keys = ("resolution", "resize", "latents", "dtype", "max_sequence_length", "model")
        shown = ", ".join(f"{k}={st[k]}" for k in keys if st.get(k) is not None)
        lines.append(f"  build     {b.get('job')}: {s.get('written', '?')} written, skipped "
                     f"{skipped}" + (f"; {shown}" if shown else ""))
        for i in (b.get("inputs") or [])[:3]:
            lines.append(f"            from {i}")
    if n_captions > 0:
        lines.append("  captions")
        for s in iter_samples(root, n_captions):
            cap = s["caption"].replace("\n", " ")
            lines.append(f"    {cap[:100]}{'...' if len(cap) > 100 else ''}")
    return "\n".join(lines)


def decode_grid(root: Path, n: int, out: Path, model: str | None) -> Path:
    import numpy as np
    import torch
    from PIL import Image

    from megadiff.data.schema import BUILD_FILE, LATENT_COLUMNS, ShardSetInfo
    from megadiff.data.shardset import read_json
    from megadiff.data.verify import iter_samples
    from megadiff.models import sd3

    info = ShardSetInfo.read(root)
    cols = LATENT_COLUMNS.get(info.schema)
    if not cols:
        raise ValueError(f"{root} holds {info.schema} samples: there are no latents to --decode")
    if model is None:
        builds = (read_json(root / BUILD_FILE) or {}).get("builds", [])
        model = next(((b.get("settings") or {}).get("model") for b in builds
                      if (b.get("settings") or {}).get("model")), None)
        if model is None:
            raise ValueError(f"{root} does not record its model: pass --model MODEL_DIR to --decode")
    vae = sd3.load_vae(model, torch.float32)
    rows = []
    for s in iter_samples(root, n):
        tiles = [sd3.decode_latents(vae, torch.from_numpy(s[c].astype(np.float32))[None])[0]
                 for c in cols]
        rows.append(tiles)
    if not rows:
        raise ValueError(f"{root} holds no samples to decode")
    to_img = lambda t: Image.fromarray(((t.permute(1, 2, 0).numpy() + 1) * 127.5).round()
                                       .clip(0, 255).astype(np.uint8))
    w = max(t.shape[2] for r in rows for t in r)
    h = max(t.shape[1] for r in rows for t in r)
    per_row = math.ceil(math.sqrt(len(rows)))
    grid_rows = math.ceil(len(rows) / per_row)
    grid = Image.new("RGB", (per_row * w, grid_rows * h * len(cols)), (0, 0, 0))
    for i, tiles in enumerate(rows):
        x, y = (i % per_row) * w, (i // per_row) * h * len(cols)
        for j, t in enumerate(tiles):
            grid.paste(to_img(t), (x, y + j * h))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def run(args) -> None:
    root = Path(args.shard_dir)
    if args.decode and not args.out:
        raise ValueError("--decode N needs --out GRID.png")
    if args.out and not args.decode:
        raise ValueError("--out is the PNG for --decode N: pass --decode too")
    print(describe(root, args.captions), flush=True)
    if args.decode:
        path = decode_grid(root, args.decode, Path(args.out), args.model)
        print(f"  decoded   {args.decode} latents -> {path}", file=sys.stdout, flush=True)


def main(argv: list[str] | None = None) -> None:
    main_for("inspect_shards", add_args, run, argv)


if __name__ == "__main__":
    main()
