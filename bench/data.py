"""Throughput of the shard builder and of the shard reader, on this machine's CPU.

  python bench/data.py [--images 48] [--reader-samples 128] [--json out.json]

Figures:
  builder  images/s per core: `megadiff data build` in one process with one torch thread
           (decode + resize/crop + VAE + text encoders + MDS writing), as images per CPU-second
           of the process (robust to other load on the machine) and per wall-clock second of
           encoding (model loading excluded);
             - the tiny test model (VAE widths 8-16, 64 px -> 16x8x8 latents)
             - the same model with an SD3-width VAE built from config (block_out_channels
               128/256/512/512, 2 layers a block, as in SD3/SD3.5's VAE) at 256 px; its text
               encoders stay tiny, so this is the VAE-bound figure (random weights: the cost
               does not depend on them)
  reader   samples/s through StreamingDataset + StreamingDataLoader (batch 8) with 1 and 2
           workers, over a set with SD3-Medium shapes at 512 px (latents 16x64x64, text
           333x4096, pooled 2048: ~2.9 MB a sample) and over the tiny set
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # data_tools from a checkout


def _images(folder: Path, n: int) -> None:
    from megadiff.data.synthetic import shape_samples

    folder.mkdir(parents=True)
    for i, (img, cap) in enumerate(shape_samples(n, 320, seed=0)):
        img.resize((320, 288)).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(cap)


def _sd3_width_model(tiny: Path, dest: Path) -> Path:
    from diffusers import AutoencoderKL

    shutil.copytree(tiny, dest)
    shutil.rmtree(dest / "vae")
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
                        sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5305)
    vae.save_pretrained(dest / "vae")
    return dest


def bench_builder(model: Path, images: Path, out: Path, resolution: int, batch: int) -> dict:
    import data_tools.build as job

    p = argparse.ArgumentParser()
    job.add_args(p)
    args = p.parse_args([str(images), "--model", str(model), "--out", str(out), "--resolution",
                         str(resolution), "--threads", "1", "--batch-size", str(batch),
                         "--no-progress"])
    from megadiff.data.encode import Encoders

    Encoders(model, "fp32", "cpu")          # load (and cache) outside the timed part
    t0, c0 = time.time(), time.process_time()
    summary = job.run(args)
    wall, cpu = time.time() - t0, time.process_time() - c0
    dones = [json.loads(p.read_text()) for p in out.glob("part-*/megadiff_done.json")]
    enc, n = sum(d["seconds"] for d in dones), summary["written"]
    # images per CPU-second of this process (one torch thread; the prefetch thread included):
    # the per-core figure, unaffected by other load on the machine. Wall-clock rate beside it.
    return {"images": n, "resolution": resolution, "cpu_s": round(cpu, 2),
            "encode_wall_s": round(enc, 2), "img_per_cpu_s": round(n / cpu, 3),
            "img_per_wall_s": round(n / enc, 3)}


def _synthetic_set(out: Path, n: int) -> Path:
    from megadiff.bench.data_loader import synthetic_set

    return synthetic_set(out, n)


def bench_reader(root: Path, workers: int, batch: int = 8, epochs: int = 2) -> dict:
    from megadiff.bench.data_loader import reader_rate

    return reader_rate(root, workers, batch, epochs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48, help="images for the tiny-VAE build")
    ap.add_argument("--wide-images", type=int, default=8, help="images for the SD3-width VAE")
    ap.add_argument("--reader-samples", type=int, default=128)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--keep", default=None, help="work in this directory and keep it")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", message=".*not writable.*")   # streaming's read-only arrays
    import torch

    from megadiff.models.tiny import make_tiny_sd3

    work = Path(args.keep or tempfile.mkdtemp(prefix="megadiff-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"cpu": os.cpu_count(), "torch": torch.__version__}
    try:
        tiny = make_tiny_sd3(work / "tiny")
        wide = _sd3_width_model(tiny, work / "sd3-width-vae")
        _images(work / "images", args.images)
        _images(work / "images-wide", args.wide_images)
        res["builder_tiny_64px"] = bench_builder(tiny, work / "images", work / "tiny-set", 64, 8)
        print("builder, tiny VAE, 64 px:", res["builder_tiny_64px"], flush=True)
        res["builder_sd3vae_256px"] = bench_builder(wide, work / "images-wide", work / "wide-set", 256, 4)
        print("builder, SD3-width VAE, 256 px:", res["builder_sd3vae_256px"], flush=True)
        big = _synthetic_set(work / "sd3m-512-set", args.reader_samples)
        for name, root in (("reader_sd3m_512px", big), ("reader_tiny", work / "tiny-set")):
            res[name] = []
            for w in (1, 2):
                r = bench_reader(root, w)
                res[name].append(r)
                print(f"{name}, {w} worker(s):", r, flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
