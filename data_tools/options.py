"""Command-line options the builders share, and the `python -m data_tools.JOB` entry."""
from __future__ import annotations

import argparse
import re
import sys

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30}


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 64MB, 256MiB, 1GB)")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_part(text: str) -> tuple[int, int]:
    m = re.match(r"^\s*(\d+)\s*/\s*(\d+)\s*$", text)
    if m is None or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"{text!r}: use K/N with 0 <= K < N (e.g. "
                                         "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(m.group(1)), int(m.group(2))


def add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("encoders")
    g.add_argument("--model", required=required, metavar="MODEL_DIR",
                   help="local SD3/SD3.5 diffusers directory whose VAE and text encoders encode"
                        + ("" if required else " (omit to store captions only)"))
    g.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="encoder precision (stored values are float16 either way)")
    g.add_argument("--max-sequence-length", type=int, default=None, metavar="N",
                   help="T5 tokens (default: 256, or the tokenizer's limit if lower)")
    g.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="samples encoded together")


def add_image_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images")
    g.add_argument("--resolution", type=int, default=None, metavar="PX",
                   help="target size (default: the model's native resolution)")
    g.add_argument("--resize", choices=("center-crop", "buckets"), default="center-crop",
                   help="center-crop to a square, or to the nearest aspect-ratio bucket of about "
                        "PX^2 pixels (sides multiples of PX/16, at least 16)")
    g.add_argument("--latents", choices=("sample", "mean"), default="sample",
                   help="store a draw from the VAE's latent distribution (seeded per sample) "
                        "or its mean")
    g.add_argument("--seed", type=int, default=0, help="seed of the per-sample latent draws")
    g.add_argument("--min-size", type=int, default=0, metavar="PX",
                   help="skip images whose short side is smaller")


def add_build_args(p: argparse.ArgumentParser, slice_size: int) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, metavar="SHARD_DIR", help="output shard directory")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true",
                      help="add to the shard set already in --out")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace what --out holds (the old set stays until the new one is done)")
    g.add_argument("--size-limit", type=parse_size, default=1 << 26, metavar="SIZE",
                   help="shard size before compression (default 64MiB)")
    g.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd")
    g = p.add_argument_group("parallel and resume")
    g.add_argument("--workers", type=int, default=1,
                   help="local processes per rank (each loads the encoders)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: cores / processes on the node)")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if any), cpu, cuda:N")
    g.add_argument("--slice-size", type=int, default=slice_size, metavar="N",
                   help="inputs per slice, the unit of parallel work and resume "
                        "(a .tar is one slice; Parquet slices are whole row groups)")
    g.add_argument("--part", type=parse_part, default=None, metavar="K/N",
                   help="build only slice k of every N (job arrays without a shared launcher); "
                        "join the N outputs with `megadiff data merge`")
    g.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="bad input: skip and count it (default), or stop")
    g.add_argument("--wait-timeout", type=float, default=3600.0, metavar="S",
                   help="how long rank 0 waits for the other ranks' slices")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    # The deepspeed launcher appends --local_rank=N; the rank layout comes from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def build_options(args):
    from megadiff.data.builder import BuildOptions

    return BuildOptions(out=args.out, overwrite=args.overwrite, append=args.append,
                        workers=args.workers, threads=args.threads, device=args.device,
                        on_error=args.on_error, wait_timeout=args.wait_timeout,
                        size_limit=args.size_limit, compression=args.compression,
                        progress=args.progress)


def select_part(slices: list, part: tuple[int, int] | None) -> list:
    """Slices k, k + N, ... of the full plan (global indices kept: part names never collide)."""
    if part is None:
        return slices
    k, n = part
    return [s for s in slices if s.index % n == k]


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} {value} must be >= 1")


def main_for(job: str, add_args, run, argv: list[str] | None = None) -> None:
    """`python -m data_tools.JOB`: same arguments and error handling as `megadiff data JOB`."""
    from megadiff.cli import run_guarded

    p = argparse.ArgumentParser(prog=f"python -m data_tools.{job}")
    add_args(p)
    sys.exit(run_guarded(run, p.parse_args(argv)))
