"""`megadiff eval`: images from a run or an exported model, scored.

  megadiff eval --run DIR [--step N] | --model EXPORT_DIR  --prompts FILE --out OUT_DIR
                [--rewards kind=path ...] [--clip PATH --clip-arch ARCH]
                [--fid-reference DIR --inception PATH] [--seed 0] [--steps N] ...
  megadiff eval compare A B [--out DIR]

OUT_DIR/
  images/000.png ...   one image per prompt (prompt i from noise seed SEED + i)
  grid.png, prompts.json
  eval.json, eval.md   metrics (CLIP score, reward means, FID/KID), settings, per-image scores

The pieces live in megadiff/eval/ (see its modules' docstrings).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="generate from a prompt file with fixed seeds and score the images",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--run", help="a megadiff run directory (its latest checkpoint, or --step)")
    what.add_argument("--model", help="a diffusers SD3 directory (e.g. `megadiff export` output)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of --run (default: latest)")
    p.add_argument("--prompts", help="prompt file: .txt (one a line), .csv/.tsv with a prompt column "
                                     "(DrawBench, PartiPrompts), .json (list or COCO captions)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--rewards", nargs="+", default=None, metavar="SPEC",
                   help="reward models: kind=path, a YAML/JSON file of reward entries, or "
                        "'{kind: .., path: .., arch: ..}' (default: a run's configured rewards)")
    p.add_argument("--clip", default=None, help="CLIP tower weights for the CLIP score (open_clip file)")
    p.add_argument("--clip-arch", default=None, help="open_clip architecture or model-config JSON of --clip")
    p.add_argument("--fid-reference", default=None, help="folder of reference images for FID/KID")
    p.add_argument("--inception", default=None,
                   help="local InceptionV3 weights for FID/KID (torch-fidelity's .pth; nothing downloads)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--fid-features", choices=["64", "192", "768", "2048"], default="2048",
                   help="Inception features for FID/KID (2048: the standard; smaller ones are cheaper)")
    p.add_argument("--fid-resize", type=int, default=None,
                   help="resize+crop images to N px for FID (default: as they are when all share one size, else 299)")
    p.add_argument("--sampler", choices=["euler", "few_step"], default=None,
                   help="default: few_step for a DMD run, euler (with CFG) otherwise")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the generator's schedule; euler 28)")
    p.add_argument("--guidance-scale", type=float, default=None, help="euler CFG scale (default 7.0)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's sample size)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (--model; default 256)")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses noise seed SEED + i")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    csub = p.add_subparsers(dest="eval_command", metavar="{compare}")
    c = csub.add_parser("compare", help="two evaluations side by side (two runs, or two steps of one)")
    c.add_argument("a", help="an eval output directory (or its eval.json)")
    c.add_argument("b", help="another one")
    c.add_argument("--out", dest="compare_out", default=None,
                   help="also write compare.md, compare.json and side_by_side.png here")
    p.set_defaults(handler=run_eval)


def log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def run_eval(args: argparse.Namespace) -> None:
    if getattr(args, "eval_command", None) == "compare":
        return run_compare(args)
    missing = [f for f, v in (("--prompts", args.prompts), ("--out", args.out)) if not v]
    if not (args.run or args.model):
        missing.insert(0, "--run or --model")
    if missing:
        raise ValueError(f"megadiff eval needs {', '.join(missing)}: "
                         "e.g. megadiff eval --run runs/x --prompts prompts.txt --out out/eval")
    if (args.fid_reference is None) != (args.inception is None):
        raise ValueError("FID/KID need both --fid-reference DIR and --inception WEIGHTS (a local file)")
    if args.step is not None and not args.run:
        raise ValueError("--step selects a checkpoint of --run; an exported --model has none")
    from megadiff.config import RewardConfig
    from megadiff.eval import fid, generate, metrics, prompts as prompt_files, report, source as sources

    prompts = prompt_files.read_prompts(args.prompts, args.limit)
    rewards = metrics.parse_reward_specs(args.rewards) if args.rewards else []
    clip_cfg = RewardConfig(kind="clip", path=args.clip, arch=args.clip_arch, name="clip_score") \
        if args.clip else None
    if args.fid_reference:
        fid.check_inception_weights(args.inception)
        if not Path(args.fid_reference).is_dir():
            raise ValueError(f"--fid-reference {args.fid_reference} is not a folder of images")
    if args.run:
        src = sources.from_run(args.run, args.step, args.sampler, args.steps, args.guidance_scale,
                               args.resolution)
        if not args.rewards:
            rewards = sources.run_rewards(src)
    else:
        src = sources.from_model(args.model, args.sampler, args.steps, args.guidance_scale,
                                 args.resolution, args.max_sequence_length)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise ValueError(f"{out} already exists and is not empty: pass --overwrite or a new --out")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)

    texts = [p.text for p in prompts]
    images = generate.generate(src, texts, args.seed, args.batch_size, log)
    files = []
    for i, im in enumerate(images):
        files.append(f"images/{i:03d}.png")
        im.save(tmp / files[-1])
    from megadiff import validation

    validation.grid(images).save(tmp / "grid.png")
    (tmp / "prompts.json").write_text(json.dumps(texts, indent=1))

    per_image = metrics.score_images(generate.to_tensor(images), texts, rewards, clip_cfg,
                                     args.batch_size, log)
    summary = report.summarise(per_image)
    fk = None
    if args.fid_reference:
        log(f"FID/KID against {args.fid_reference}")
        fk = fid.fid_kid(tmp / "images", args.fid_reference, args.inception, args.batch_size,
                         args.kid_subsets, args.fid_resize, feature_layer=args.fid_features)
        fk |= {"reference": str(Path(args.fid_reference).resolve()),
               "weights": str(Path(args.inception).resolve())}
        summary |= {"fid": fk["fid"], "kid_mean": fk["kid_mean"], "kid_std": fk["kid_std"]}
    doc = {
        "source": src.describe(), "seed": args.seed, "num_images": len(images),
        "prompts_file": str(Path(args.prompts).resolve()), "metrics": summary,
        "per_category": report.per_category([p.category for p in prompts], per_image),
        "fid_kid": fk, "rewards": [metrics.reward_dict(c) for c in rewards],
        "clip": metrics.reward_dict(clip_cfg) if clip_cfg else None,
        "images": [{"file": f, "prompt": p.text, "category": p.category, "seed": args.seed + i}
                   | {k: v[i] for k, v in per_image.items()}
                   for i, (f, p) in enumerate(zip(files, prompts))],
    }
    report.write(tmp, doc)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(report.markdown(doc), end="")
    print(out)


def run_compare(args: argparse.Namespace) -> None:
    from megadiff.eval import report

    a, b = report.load(args.a), report.load(args.b)
    text = report.compare(a, b)
    print(text, end="")
    if args.compare_out:
        out = Path(args.compare_out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(text)
        (out / "compare.json").write_text(json.dumps({"a": a, "b": b}, indent=1))
        sheet = _side_by_side(Path(args.a), Path(args.b), a, b)
        if sheet is not None:
            sheet.save(out / "side_by_side.png")


def _side_by_side(pa: Path, pb: Path, a: dict, b: dict):
    """One row per prompt (A | B), when both evaluated the same prompts."""
    from PIL import Image

    from megadiff.sample_cli import side_by_side

    if [i["prompt"] for i in a["images"]] != [i["prompt"] for i in b["images"]]:
        return None
    root = lambda p: p if p.is_dir() else p.parent
    cols = {}
    for name, p, doc in (("a", pa, a), ("b", pb, b)):
        ims = [Image.open(root(p) / im["file"]).convert("RGB") for im in doc["images"]]
        cols[name] = ims
    if cols["a"][0].size != cols["b"][0].size:
        return None
    return side_by_side(cols)
