"""megadiff data label-pairs PAIRS_DIR --model MODEL_DIR --choice-model KIND --reward-path PATH
--out NEW_DIR: AI feedback for Diffusion-DPO. Every pair of a `megadiff.pairs` set is decoded
with the model's VAE and both images are scored with a reward model and the caption; the
higher-scored image becomes `latents_w` (label_w 1.0), as DiffusionDPO's `train.py
--choice_model` (hps, clip, pickscore, aes) flips a pair when the choice model prefers jpg_1.
Pairs whose scores differ by at most --tie-margin become ties (label_w 0.5) or, with
--drop-ties, are left out. A NEW set is written (the input is never modified), with the
scores of every pair in `labels.jsonl` beside it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

CHOICE_MODELS = ("hpsv2", "pickscore", "clip", "aesthetic")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="PAIRS_DIR", help="a megadiff.pairs shard set (read only)")
    p.add_argument("--model", required=True, metavar="MODEL_DIR",
                   help="the SD3/SD3.5 diffusers directory whose VAE encoded the latents")
    p.add_argument("--choice-model", required=True, choices=CHOICE_MODELS,
                   help="reward model kind that picks the winner")
    p.add_argument("--reward-path", required=True, metavar="PATH",
                   help="its local checkpoint (HPS_v2.1_compressed.pt, open_clip_pytorch_model.bin, "
                        "a PickScore directory, the aesthetic .pth)")
    p.add_argument("--reward-arch", default=None, help="open_clip architecture name or config JSON")
    p.add_argument("--clip-path", default=None,
                   help="aesthetic: its CLIP ViT-L/14 tower; pickscore: the processor directory")
    p.add_argument("--out", required=True, metavar="NEW_DIR", help="output shard directory (new, empty)")
    p.add_argument("--tie-margin", type=float, default=0.0, metavar="D",
                   help="|score difference| <= D is a tie (label_w 0.5)")
    p.add_argument("--drop-ties", action="store_true", help="leave ties out instead of keeping them")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="pairs decoded together")
    p.add_argument("--device", default="auto", help="auto (cuda if any), cpu, cuda:N")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="VAE and reward precision")


def _check_paths(args) -> tuple[Path, Path]:
    from megadiff.data.schema import ShardSetInfo

    src, out = Path(args.input).expanduser().resolve(), Path(args.out).expanduser().resolve()
    if src == out or src in out.parents:
        raise ValueError(f"--out {out} is (inside) the input set: write the relabelled pairs to a new directory")
    info = ShardSetInfo.read(src)
    if info.schema != "megadiff.pairs":
        raise ValueError(f"{src} is a {info.schema} set: label-pairs relabels megadiff.pairs sets "
                         "(`megadiff data pairs`)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already holds files: choose a new, empty directory")
    if args.tie_margin < 0 or args.batch_size < 1:
        raise ValueError("--tie-margin must be >= 0 and --batch-size >= 1")
    return src, out


def label(scores_w, scores_l, tie_margin: float) -> list[str]:
    """Per pair: "keep" (latents_w scores higher), "flip" (latents_l does) or "tie"."""
    out = []
    for a, b in zip(scores_w, scores_l):
        out.append("tie" if abs(a - b) <= tie_margin else ("keep" if a > b else "flip"))
    return out


def run(args) -> dict:
    import torch

    from megadiff.config import RewardConfig
    from megadiff.data.verify import iter_samples
    from megadiff.models import sd3
    from megadiff.objectives.preference_shards import write_records
    from megadiff.rewards.registry import load_reward
    from megadiff.rewards.scoring import decode_for_reward

    src, out = _check_paths(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    vae = sd3.load_vae(args.model, dtype).to(device)
    reward = load_reward(RewardConfig(kind=args.choice_model, path=args.reward_path, arch=args.reward_arch,
                                      clip_path=args.clip_path), device, dtype)
    log, counts = [], {"keep": 0, "flip": 0, "tie": 0}

    def relabelled():
        batch = []
        for i, rec in enumerate(iter_samples(src)):
            batch.append((i, rec))
            if len(batch) == args.batch_size:
                yield from score(batch)
                batch = []
        if batch:
            yield from score(batch)

    @torch.no_grad()
    def score(batch):
        lat = torch.stack([torch.from_numpy(r[k].astype("float32")) for _, r in batch
                           for k in ("latents_w", "latents_l")]).to(device)
        caps = [r["caption"] for _, r in batch for _ in (0, 1)]
        s = reward(decode_for_reward(vae, lat), caps).float().cpu().view(-1, 2)
        for (i, r), verdict, (sw, sl) in zip(batch, label(s[:, 0].tolist(), s[:, 1].tolist(), args.tie_margin),
                                           s.tolist()):
            counts[verdict] += 1
            log.append({"index": i, "score_w": sw, "score_l": sl, "verdict": verdict,
                        "label_w_before": float(r["label_w"])})
            if verdict == "tie" and args.drop_ties:
                continue
            w, l = (r["latents_l"], r["latents_w"]) if verdict == "flip" else (r["latents_w"], r["latents_l"])
            yield f"pair-{i:06d}", {**r, "latents_w": w, "latents_l": l,
                                    "label_w": 0.5 if verdict == "tie" else 1.0}

    settings = {"input": str(src), "model": str(args.model), "choice_model": args.choice_model,
                "reward_path": str(args.reward_path), "tie_margin": args.tie_margin,
                "drop_ties": args.drop_ties}
    info = write_records(out, "megadiff.pairs", relabelled(), "label-pairs", settings)
    with open(out / "labels.jsonl", "w") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")
    summary = {"pairs": len(log), "written": info.num_samples, **counts}
    print(f"label-pairs: {summary['pairs']} pairs scored with {args.choice_model}: {counts['keep']} kept, "
          f"{counts['flip']} flipped, {counts['tie']} ties ({'dropped' if args.drop_ties else 'kept'}); "
          f"wrote {info.num_samples} to {out}")
    return summary


def main(argv: list[str] | None = None) -> None:
    from data_tools.options import main_for

    main_for("label_pairs", add_args, run, argv)


if __name__ == "__main__":
    main()
