"""The evaluation's JSON and Markdown table, and `megadiff eval compare A B`.

eval.json:
  {"source": {...what generated, sampler, steps, checkpoint...}, "seed": S, "num_images": N,
   "metrics": {"clip_score": mean, "<reward>": mean, "fid": .., "kid_mean": .., "kid_std": ..},
   "per_category": {"<category>": {"<metric>": mean}}, "fid_kid": {...} | null,
   "rewards": [reward configs], "images": [{"file", "prompt", "category", "seed", "<metric>": x}]}
eval.md: the metrics table (and per-category means when the prompt file has categories).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
# Metrics where lower is better (everything else: higher is better).
LOWER_IS_BETTER = {"fid", "kid_mean"}


def summarise(per_image: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.fmean(v) for k, v in per_image.items() if v}


def per_category(categories: list[str | None], per_image: dict[str, list[float]]) -> dict:
    cats = sorted({c for c in categories if c})
    out = {}
    for c in cats:
        idx = [i for i, x in enumerate(categories) if x == c]
        out[c] = {k: statistics.fmean(v[i] for i in idx) for k, v in per_image.items()} | {"n": len(idx)}
    return out


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.4f}" if abs(x) < 1000 else f"{x:,.1f}"
    return str(x)


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    s = doc["source"]
    what = f"`{s['path']}`" + (f" checkpoint `{s['checkpoint']}` (step {s['step']})" if s.get("checkpoint") else "")
    sampler = (f"{s['sampler']}, {s['steps']} steps"
               + (f", CFG {s['guidance_scale']}" if s.get("guidance_scale") is not None else "")
               + (f", sigmas {s['sigmas']}" if s.get("sigmas") else ""))
    lines = [f"# megadiff eval: {what}", "",
             f"{doc['num_images']} images at {s['resolution'][0]}x{s['resolution'][1]}, {sampler}, "
             f"seed {doc['seed']} (prompt i: seed + i), prompts `{doc['prompts_file']}`", "",
             md_table(["metric", "value"], [[k, v] for k, v in doc["metrics"].items()])]
    if doc.get("fid_kid"):
        f = doc["fid_kid"]
        lines += ["", f"FID/KID against `{f['reference']}` ({f['n_generated']} vs {f['n_reference']} images, "
                      f"KID subsets of {f['kid_subset_size']}, {f['feature_layer']}-d Inception features, "
                      f"weights `{f['weights']}`)"]
    cats = doc.get("per_category") or {}
    if cats:
        keys = [k for k in next(iter(cats.values())) if k != "n"]
        lines += ["", "## per category", "",
                  md_table(["category", "n"] + keys, [[c, v["n"]] + [v[k] for k in keys] for c, v in cats.items()])]
    return "\n".join(lines) + "\n"


def write(out: Path, doc: dict) -> None:
    (out / EVAL_JSON).write_text(json.dumps(doc, indent=1))
    (out / EVAL_MD).write_text(markdown(doc))


def load(path: str | Path) -> dict:
    p = Path(path)
    f = p / EVAL_JSON if p.is_dir() else p
    if not f.is_file():
        raise ValueError(f"{f} does not exist: give a `megadiff eval` output directory (it holds {EVAL_JSON})")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}): re-run megadiff eval") from None


def label(doc: dict) -> str:
    s = doc["source"]
    name = Path(s["path"]).name
    return f"{name}@{s['checkpoint']}" if s.get("checkpoint") else name


def compare(a: dict, b: dict) -> str:
    """Markdown: each metric of A and B side by side, B - A, and which is better."""
    la, lb = label(a), label(b)
    if la == lb:
        la, lb = f"A: {la}", f"B: {lb}"
    keys = list(a["metrics"]) + [k for k in b["metrics"] if k not in a["metrics"]]
    rows = []
    for k in keys:
        va, vb = a["metrics"].get(k), b["metrics"].get(k)
        delta = vb - va if va is not None and vb is not None else None
        better = "-"
        if delta is not None and delta != 0:
            b_wins = (delta < 0) if k in LOWER_IS_BETTER else (delta > 0)
            better = "B" if b_wins else "A"
        rows.append([k, va, vb, delta, better])
    sa, sb = a["source"], b["source"]
    setting = lambda s: f"{s['sampler']} {s['steps']} steps" + (
        f", CFG {s['guidance_scale']}" if s.get("guidance_scale") is not None else "")
    notes = [f"A = {la}: {setting(sa)}, {a['num_images']} images, seed {a['seed']}",
             f"B = {lb}: {setting(sb)}, {b['num_images']} images, seed {b['seed']}"]
    pa = [im["prompt"] for im in a.get("images", [])]
    pb = [im["prompt"] for im in b.get("images", [])]
    if pa != pb or a["seed"] != b["seed"]:
        notes.append("note: the two evaluations used different prompts or seeds; per-prompt "
                     "differences are not paired")
    table = md_table(["metric", la, lb, "B - A", "better"], rows)
    return "\n".join(["# megadiff eval compare", "", table, ""] + [f"- {n}" for n in notes]) + "\n"
