"""`megadiff bench [--quick]` (every benchmark, one table: `megadiff.bench.suite`) and
`megadiff bench <name>` (one benchmark in detail): registered by `megadiff.cli` (EXTENSIONS).

Each benchmark is a module with `add_arguments(parser)` and `run(args)`; add one by listing
it in BENCHES. Modules are imported when the parser is built, so keep their top level light
(torch, deepspeed and diffusers are imported inside `run`).
"""
from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "engine": ("megadiff.bench.engine",
               "DeepSpeed step overhead vs a bare PyTorch loop; ZeRO-3 per-rank memory vs 16 B/param/N"),
}


def add_parser(sub) -> None:
    from megadiff.bench import suite

    b = sub.add_parser("bench", help="benchmarks that print figures: all in one table, or one by name",
                       description=suite.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite.add_arguments(b)
    b.set_defaults(handler=_runner("megadiff.bench.suite"))
    bsub = b.add_subparsers(dest="bench_command", required=False, metavar="{" + ",".join(BENCHES) + "}")
    for name, (module, help_) in BENCHES.items():
        mod = importlib.import_module(module)
        p = bsub.add_parser(name, help=help_, description=mod.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(handler=_runner(module))


def _runner(module: str):
    def handler(args: argparse.Namespace) -> None:
        importlib.import_module(module).run(args)
    handler.__name__ = f"run_{module.rsplit('.', 1)[-1]}"
    return handler
