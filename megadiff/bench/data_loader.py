"""Samples/s of the shard reader (StreamingDataset + StreamingDataLoader, what training reads)
over a synthetic set with SD3-Medium shapes at 512 px (latents 16x64x64, text 333x4096,
pooled 2048, float16: ~2.9 MB a sample). Used by `megadiff bench` and `bench/data.py`."""
from __future__ import annotations

import time
from pathlib import Path

SD3M_512 = dict(latents=(16, 64, 64), text=(333, 4096), pooled=2048)


def synthetic_set(out: Path, n: int, shapes: dict = SD3M_512) -> Path:
    import numpy as np
    from streaming import MDSWriter

    from megadiff.data.schema import TRAIN_COLUMNS, ShardSetInfo

    rng = np.random.default_rng(0)
    lat = rng.standard_normal(shapes["latents"]).astype(np.float16)
    emb = rng.standard_normal(shapes["text"]).astype(np.float16)
    pooled = rng.standard_normal(shapes["pooled"]).astype(np.float16)
    with MDSWriter(out=str(out), columns=TRAIN_COLUMNS, size_limit=1 << 27) as w:
        for i in range(n):
            w.write({"latents": lat, "prompt_embeds": emb, "pooled_prompt_embeds": pooled,
                     "caption": f"sample {i}", "width": 512, "height": 512})
    ShardSetInfo("megadiff.train", 1, shapes["latents"], shapes["text"][0], shapes["text"][1],
                 shapes["pooled"], n).write(out)
    return out


def reader_rate(root: Path, workers: int, batch: int = 8, epochs: int = 2) -> dict:
    """Samples/s of the last of `epochs` passes (the first includes worker start-up)."""
    from streaming import StreamingDataLoader, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    ds = StreamingDataset(local=str(root), shuffle=False, batch_size=batch)
    loader = StreamingDataLoader(ds, batch_size=batch, num_workers=workers, drop_last=False,
                                 persistent_workers=workers > 0)
    rates, first = [], None
    for _ in range(epochs):
        t0, n = time.time(), 0
        for b in loader:
            if first is None:
                first = time.time() - t0
            n += len(b["caption"])
        rates.append(n / (time.time() - t0))
    del loader, ds
    return {"workers": workers, "samples": n, "samples_per_s": round(rates[-1], 1),
            "first_epoch_samples_per_s": round(rates[0], 1), "first_batch_s": round(first, 2)}
