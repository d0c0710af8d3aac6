"""megadiff data verify SHARD_DIR: check every shard's size and hashes, the column schema, the
sample count, decoded samples (shapes, dtypes, finite values; --full decodes all of them) and
duplicate source keys; print problems by file. Exits 2 (`megadiff: error: ...`) when broken."""
from __future__ import annotations

import argparse

from data_tools.options import main_for


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("shard_dir", metavar="SHARD_DIR")
    p.add_argument("--samples", type=int, default=1, metavar="N",
                   help="decode the first N and the last sample of every shard (default 1)")
    p.add_argument("--full", action="store_true", help="decode every sample")
    p.add_argument("--no-hashes", dest="hashes", action="store_false",
                   help="check sizes only (faster on huge sets)")


def run(args):
    from megadiff.data.verify import verify_set

    report = verify_set(args.shard_dir, samples_per_shard=args.samples, full=args.full,
                        hashes=args.hashes)
    print(report.format(), flush=True)
    if not report.ok:
        n = sum(len(v) for v in report.problems.values())
        raise ValueError(f"{args.shard_dir} is broken: {n} problem(s) in {len(report.problems)} "
                         "file(s), listed above; rebuild it (re-run the build with --overwrite)")
    return report


def main(argv: list[str] | None = None) -> None:
    main_for("verify", add_args, run, argv)


if __name__ == "__main__":
    main()
