"""`megadiff train` and `deepspeed [--hostfile H] --module megadiff.train`: build the trainer
from the recipe and run it."""
from __future__ import annotations

import argparse
import sys


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="recipe name (see `megadiff info`) or a YAML path")
    p.add_argument("--output-dir", required=True, help="run directory (checkpoints, logs, samples)")
    p.add_argument("--resume", choices=["auto", "never"], default="never",
                   help="auto: continue from output_dir/latest if it exists")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-5")


def run_train(args: argparse.Namespace) -> None:
    from megadiff.config import load_config
    from megadiff.registry import compose_trainer

    cfg = load_config(args.recipe, args.overrides)
    trainer = compose_trainer(cfg.objectives)(cfg, args.output_dir, resume=args.resume == "auto")
    trainer.fit()


def main(argv: list[str] | None = None) -> None:
    from megadiff.cli import run_guarded

    p = argparse.ArgumentParser(prog="megadiff.train", description=__doc__)
    add_train_args(p)
    args = p.parse_args(argv)
    sys.exit(run_guarded(run_train, args))


if __name__ == "__main__":
    main()
