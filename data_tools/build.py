"""megadiff data build INPUT... --model MODEL_DIR --out SHARD_DIR: images with captions ->
`megadiff.train` shards with cached VAE latents and SD3 text embeddings.

INPUT is an image folder (same-name .txt captions), JSONL or Parquet manifests (`image` path or
bytes + `caption`), or WebDataset .tar files; the format is detected (or --format). Bad inputs
are skipped and counted by reason (--on-error fail stops instead). Runs as one process, as N
local workers (--workers N), or as every rank of a launcher (deepspeed, torchrun, mpiexec,
srun); a killed build resumes when the same command runs again.
"""
from __future__ import annotations

import argparse

from data_tools.options import (add_build_args, add_image_args, add_model_args, build_options,
                                check_positive, main_for, select_part)

DEFAULT_SLICE = 1000
DEFAULT_BATCH = 8


def add_args(p: argparse.ArgumentParser) -> None:
    from megadiff.data.sources import FORMATS

    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image folders, .jsonl/.parquet manifests, .tar files (or folders of them)")
    p.add_argument("--format", choices=("auto", *FORMATS), default="auto")
    p.add_argument("--image-column", default="image", help="manifest image field (path or bytes)")
    p.add_argument("--caption-column", default="caption", help="manifest caption field")
    add_model_args(p, required=True)
    add_image_args(p)
    add_build_args(p, DEFAULT_SLICE)


def image_settings(args) -> dict:
    """Settings every sample depends on (fingerprinted): model, precision, geometry, seed."""
    from megadiff.data.encode import default_max_sequence_length, default_resolution
    from megadiff.models import sd3

    model = str(sd3.check_sd3_dir(args.model).resolve())
    resolution = args.resolution or default_resolution(model)
    if resolution < 16 or resolution % 16:
        raise ValueError(f"--resolution {resolution} must be a positive multiple of 16 (VAE "
                         "factor 8 x patch size 2)")
    check_positive("--max-sequence-length", args.max_sequence_length)
    check_positive("--batch-size", args.batch_size)
    return {"model": model, "dtype": args.dtype, "resolution": resolution, "resize": args.resize,
            "latents": args.latents, "seed": args.seed, "min_size": args.min_size,
            "max_sequence_length": args.max_sequence_length or default_max_sequence_length(model)}


def make_job(args):
    from megadiff.data.builder import Job
    from megadiff.data.encode import model_identity
    from megadiff.data.sources import expand_inputs, plan_slices

    settings = image_settings(args)
    fmt, paths = expand_inputs(args.inputs, args.format)
    slices = select_part(plan_slices(fmt, paths, args.slice_size), args.part)
    return Job(kind="build", schema="megadiff.train", slices=slices,
               settings={**settings, "format": fmt}, inputs=[str(p) for p in paths],
               read={"image_column": args.image_column, "caption_column": args.caption_column},
               identity=model_identity(settings["model"]),
               batch_size=args.batch_size or DEFAULT_BATCH, unit="img")


def run(args) -> dict | None:
    from megadiff.data.builder import run_build

    return run_build(make_job(args), build_options(args))


def main(argv: list[str] | None = None) -> None:
    main_for("build", add_args, run, argv)


if __name__ == "__main__":
    main()
