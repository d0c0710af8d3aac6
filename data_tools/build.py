"""megadiff data build INPUT... --model MODEL_DIR --out SHARD_DIR: images with captions ->
`megadiff.train` shards with cached VAE latents and SD3 text embeddings.

INPUT is an image folder (same-name .txt captions), JSONL or Parquet manifests (`image` path or
bytes + `caption`), or WebDataset .tar files; the format is detected (or --format). Bad inputs
are skipped and counted by reason (--on-error fail stops instead). Runs as one process, as N
local workers (--workers N), or as every rank of a launcher (deepspeed, torchrun, mpiexec,
srun); a killed build resumes when the same command runs again. With --long-context N the set
is `megadiff.train_context`: the same columns plus each caption's context past 77 CLIP / the T5
length, for recipes with `context.enabled` (megadiff/models/context.py).
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
    g = p.add_argument_group("long prompts (megadiff.train_context shards, for context.enabled recipes)")
    g.add_argument("--long-context", type=int, default=None, metavar="N",
                   help="also cache each caption's context past SD3's limits, up to N tokens: CLIP in "
                        "windows of 75 (N rounded up), T5 up to N tokens (see megadiff/models/context.py)")
    g.add_argument("--long-context-clip", type=int, default=None, metavar="N",
                   help="CLIP tokens instead (a multiple of 75; 75: CLIP not extended)")
    g.add_argument("--long-context-t5", type=int, default=None, metavar="N",
                   help="T5 tokens instead (<= --max-sequence-length: T5 not extended)")
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
    settings = {"model": model, "dtype": args.dtype, "resolution": resolution, "resize": args.resize,
                "latents": args.latents, "seed": args.seed, "min_size": args.min_size,
                "max_sequence_length": args.max_sequence_length or default_max_sequence_length(model)}
    long_context = _long_context(args, settings["max_sequence_length"])
    return settings if long_context is None else {**settings, "long_context": long_context}


def _long_context(args, base_t5_length: int) -> dict | None:
    """The --long-context settings (absent from plain builds, so their fingerprints stay)."""
    n = getattr(args, "long_context", None)
    clip, t5 = getattr(args, "long_context_clip", None), getattr(args, "long_context_t5", None)
    if n is None and clip is None and t5 is None:
        return None
    from megadiff.models.context import CLIP_WINDOW
    from megadiff.models.context_train import long_context_settings

    if n is not None:
        check_positive("--long-context", n)
    if clip is None:
        clip = -(-n // CLIP_WINDOW) * CLIP_WINDOW if n is not None else CLIP_WINDOW
    if t5 is None:
        t5 = n if n is not None else 0
    return long_context_settings(clip, t5, base_t5_length)


def make_job(args):
    from megadiff.data.builder import Job
    from megadiff.data.encode import model_identity
    from megadiff.data.sources import expand_inputs, plan_slices

    settings = image_settings(args)
    fmt, paths = expand_inputs(args.inputs, args.format)
    slices = select_part(plan_slices(fmt, paths, args.slice_size), args.part)
    schema = "megadiff.train_context" if "long_context" in settings else "megadiff.train"
    return Job(kind="build", schema=schema, slices=slices,
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
