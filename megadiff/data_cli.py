"""`megadiff data build|prompts|pairs|merge|verify|inspect`: the shard tools of `data_tools/`
as a CLI subcommand (registered by megadiff.cli)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

HELP = {
    "build": "images + captions (folder, JSONL/Parquet, WebDataset) -> training shards",
    "prompts": "prompt file, one a line -> prompt shards (optionally with text embeddings)",
    "pairs": "Pick-a-Pic v2 Parquet -> preference pair shards (Diffusion-DPO)",
    "label-pairs": "relabel pair shards with a reward model (AI feedback) -> a new set",
    "merge": "join complete shard sets into one",
    "verify": "check hashes, schema, counts, samples; exit 2 when broken",
    "inspect": "schema, counts, captions; --decode N --out grid.png",
}


def _job(name: str):
    try:
        import data_tools
    except ModuleNotFoundError as e:
        # An editable install made before data_tools/ existed maps only `megadiff`.
        root = Path(__file__).resolve().parents[1]
        if e.name != "data_tools" or not (root / "data_tools" / "__init__.py").is_file():
            raise
        sys.path.insert(0, str(root))
        import data_tools
    return importlib.import_module(f"data_tools.{data_tools.JOBS[name]}")


def add_parser(sub) -> None:
    d = sub.add_parser("data", help="build, merge, verify and inspect MDS shard sets")
    jobs = d.add_subparsers(dest="data_command", required=True, metavar="JOB")
    for name, text in HELP.items():
        mod = _job(name)
        p = jobs.add_parser(name, help=text, description=mod.__doc__)
        mod.add_args(p)
        p.set_defaults(handler=mod.run)
