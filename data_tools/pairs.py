"""megadiff data pairs FILE.parquet... --model MODEL_DIR --out SHARD_DIR: preference pairs in
the Pick-a-Pic v2 layout (`caption`, `jpg_0`, `jpg_1`, `label_0`) -> `megadiff.pairs` shards for
Diffusion-DPO, with both images' latents and the caption's embeddings cached. `latents_w` is
the preferred image (jpg_0 when label_0 == 1, jpg_1 when 0); ties (label_0 == 0.5) are
dropped and counted, or kept with --keep-ties (label_w = 0.5, latents_w = jpg_0), as
DiffusionDPO's `train.py` drops them."""
from __future__ import annotations

import argparse

from data_tools.build import image_settings
from data_tools.options import (add_build_args, add_image_args, add_model_args, build_options,
                                main_for, select_part)

DEFAULT_SLICE = 500
DEFAULT_BATCH = 4


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="FILE.parquet",
                   help="Pick-a-Pic v2 Parquet files (or folders of them)")
    p.add_argument("--keep-ties", action="store_true", help="keep label_0 == 0.5 pairs")
    add_model_args(p, required=True)
    add_image_args(p)
    add_build_args(p, DEFAULT_SLICE)


def make_job(args):
    from megadiff.data.builder import Job
    from megadiff.data.encode import model_identity
    from megadiff.data.sources import expand_inputs, plan_slices

    settings = image_settings(args)
    if args.resize == "buckets":
        raise ValueError("--resize buckets is for `megadiff data build`; pairs are center-cropped")
    _, paths = expand_inputs(args.inputs, "parquet")
    slices = select_part(plan_slices("pickapic", paths, args.slice_size), args.part)
    return Job(kind="pairs", schema="megadiff.pairs", slices=slices,
               settings={**settings, "keep_ties": args.keep_ties}, inputs=[str(p) for p in paths],
               read={"keep_ties": args.keep_ties}, identity=model_identity(settings["model"]),
               batch_size=args.batch_size or DEFAULT_BATCH, unit="pair")


def run(args) -> dict | None:
    from megadiff.data.builder import run_build

    return run_build(make_job(args), build_options(args))


def main(argv: list[str] | None = None) -> None:
    main_for("pairs", add_args, run, argv)


if __name__ == "__main__":
    main()
