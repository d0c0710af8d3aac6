"""Training step time with cached latents and text embeddings (what megadiff's shards hold)
vs encoding every batch on the fly with the VAE and text encoders, at the same config.

    python bench/cached_latents.py [--resolution 256] [--batch 2] [--steps 3]

The measurement is `megadiff.bench.cached.cached_vs_on_the_fly` (also a row of `megadiff
bench`): 2 MMDiT blocks of width 768, SD3's VAE widths, the tiny text encoders. Prints
figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from megadiff.bench.cached import cached_vs_on_the_fly

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    r = cached_vs_on_the_fly(args.resolution, args.batch, args.steps)
    print(f"config: {r['resolution']}px, batch {r['batch']}, transformer width 768 x 2 blocks, "
          f"SD3-width VAE, tiny text encoders, {r['threads']} threads")
    print(f"{'step':<28}{'s/step':>10}{'vs cached':>12}")
    print(f"{'cached latents + embeds':<28}{r['cached_s']:>10.3f}{1.0:>11.2f}x")
    print(f"{'encode on the fly':<28}{r['on_the_fly_s']:>10.3f}{r['on_the_fly_s'] / r['cached_s']:>11.2f}x")
    print(f"{'  of which encoding':<28}{r['encode_s']:>10.3f}{r['encode_s'] / r['cached_s']:>11.2f}x")


if __name__ == "__main__":
    main()
