"""megadiff data prompts FILE.txt... --out SHARD_DIR [--model MODEL_DIR]: a prompt file, one
prompt a line (the DMDR `t2i-2m-filtered-prompts.txt` format) -> `megadiff.prompts` shards for
data-free distillation and RL; with --model, `megadiff.prompt_embeds` shards that also cache
the SD3 text embeddings. Empty and non-UTF-8 lines are skipped and counted."""
from __future__ import annotations

import argparse

from data_tools.options import (add_build_args, add_model_args, build_options, check_positive,
                                main_for, select_part)

DEFAULT_SLICE = 20000
DEFAULT_BATCH = 64


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="FILE.txt", help="prompt files, one prompt a line")
    add_model_args(p, required=False)
    add_build_args(p, DEFAULT_SLICE)


def make_job(args):
    from pathlib import Path

    from megadiff.data.builder import Job
    from megadiff.data.encode import default_max_sequence_length, model_identity
    from megadiff.data.sources import plan_slices
    from megadiff.models import sd3

    check_positive("--batch-size", args.batch_size)
    check_positive("--max-sequence-length", args.max_sequence_length)
    paths = []
    for f in args.inputs:
        p = Path(f).expanduser()
        if not p.is_file():
            raise ValueError(f"prompt file {p} does not exist (or is a directory): pass text "
                             "files with one prompt a line")
        paths.append(p.resolve())
    settings = {"model": None, "dtype": args.dtype, "max_sequence_length": None}
    identity = {}
    if args.model:
        model = str(sd3.check_sd3_dir(args.model).resolve())
        settings.update(model=model, max_sequence_length=args.max_sequence_length
                        or default_max_sequence_length(model))
        identity = model_identity(model)
    elif args.max_sequence_length:
        raise ValueError("--max-sequence-length needs --model (no embeddings are cached without it)")
    schema = "megadiff.prompt_embeds" if args.model else "megadiff.prompts"
    slices = select_part(plan_slices("prompts", paths, args.slice_size), args.part)
    return Job(kind="prompts", schema=schema, slices=slices, settings=settings,
               inputs=[str(p) for p in paths], identity=identity,
               batch_size=args.batch_size or DEFAULT_BATCH, unit="prompt")


def run(args) -> dict | None:
    from megadiff.data.builder import run_build

    return run_build(make_job(args), build_options(args))


def main(argv: list[str] | None = None) -> None:
    main_for("prompts", add_args, run, argv)


if __name__ == "__main__":
    main()
