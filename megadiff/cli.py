"""megadiff train | export | info | make-tiny-model | data | bench (thin: each command lives
in its own module)."""
from __future__ import annotations

import argparse
import sys


def run_guarded(fn, args) -> int:
    """User mistakes (ValueError) end in one line on stderr and exit code 2, a run stopped to
    protect its state (RunStopped) in exit code 3; no traceback either way."""
    from megadiff.errors import RunStopped

    try:
        fn(args)
    except ValueError as e:
        print(f"megadiff: error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunStopped as e:
        print(f"megadiff: stopped: {e}", file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        return 130
    return 0


def _make_tiny(args) -> None:
    from megadiff.models.tiny import make_tiny_sd3

    print(make_tiny_sd3(args.out_dir, seed=args.seed))


def _export(args) -> None:
    from megadiff.engine.export import export_run

    print(export_run(args.run, args.to, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
                     net=args.net))


def _info(args) -> None:
    from megadiff.info import print_info

    print_info(args.recipe, args.overrides, args.world_size)


def build_parser() -> argparse.ArgumentParser:
    from megadiff.train import add_train_args

    p = argparse.ArgumentParser(prog="megadiff", description="DeepSpeed trainer for SD3 / SD3.5")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a recipe (single process; use deepspeed for more)")
    add_train_args(t)
    m = sub.add_parser("make-tiny-model", help="write the tiny SD3 diffusers directory")
    m.add_argument("out_dir")
    m.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("export", help="write a diffusers directory from a run's checkpoint")
    e.add_argument("--run", required=True, help="the run's output directory")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    e.add_argument("--to", required=True, help="new output directory")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    e.add_argument("--overwrite", action="store_true", help="replace an existing export")
    e.add_argument("--net", default="transformer",
                   help="trained network to export (transformer; generator for DMD runs)")
    i = sub.add_parser("info", help="resolved config, DeepSpeed config, parameters and FLOPs")
    i.add_argument("--recipe", required=True)
    i.add_argument("--world-size", type=int, default=1)
    i.add_argument("overrides", nargs="*")
    for name in EXTENSIONS:
        add = _extension(name)
        if add is not None:
            add(sub)
    return p


# Subcommand modules that register themselves: `add_parser(sub)` adds the parser and sets
# `handler=fn(args)` as a default.
EXTENSIONS = ("megadiff.data_cli", "megadiff.bench.cli", "megadiff.sample_cli", "megadiff.eval_cli")


def _extension(module: str):
    import importlib

    try:
        return importlib.import_module(module).add_parser
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None
        raise


def main(argv: list[str] | None = None) -> None:
    from megadiff.train import run_train

    args = build_parser().parse_args(argv)
    handlers = {"train": run_train, "make-tiny-model": _make_tiny, "export": _export, "info": _info}
    handler = getattr(args, "handler", None) or handlers[args.command]
    sys.exit(run_guarded(handler, args))


if __name__ == "__main__":
    main()
