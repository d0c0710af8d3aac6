"""Bounded CPU experiment: does megadiff's Diffusion-DPO learn a preference? (issue 6, "proof
that it learns").

1. A tiny SD3 model (`make_tiny_sd3`) is first fine-tuned by flow matching (`tiny-cpu`) on
   coloured-shape images, so that the reference samples something image-like; it is exported
   as a diffusers directory and becomes both the DPO start and the frozen reference.
2. Pairs: one random shape and layout per caption in two colourings (the caption's and a
   random other one), encoded with the model's VAE
   (`megadiff.pairs`), then relabelled with AI feedback by `megadiff data label-pairs` and a
   tiny colour-preferring reward (megadiff.rewards.tiny.make_colour_reward; the "preferred
   attribute"). A second pair set with other captions and images is held out.
3. Diffusion-DPO runs through `python -m megadiff.train` (tiny-dpo-cpu recipe, ZeRO-3).
4. Figures, before (= the reference) and after:
   - implicit reward margin z = -beta/2 (d_theta - d_ref) and implicit accuracy on the held-out
     pairs (a fixed set of sigma/eps draws per pair; both are 0 / undefined before, by
     construction: the start is the reference);
   - the preferred-attribute reward of ODE samples (Euler, --sample-steps) on held-out prompts,
     fixed seeds: decoded with the VAE and scored by the same reward.

    python bench/dpo_experiment.py [--steps 200] [--out runs/dpo_experiment]
writes results.json and results.md there (and prints them).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ---- shared with bench/sdpo_experiment.py --------------------------------------------------

def run_train(args: list[str], log: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + random.randint(0, 5000))}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "megadiff.train", *args], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    log.write_text(r.stdout + "\n---- stderr ----\n" + r.stderr)
    if r.returncode != 0:
        raise SystemExit(f"training failed ({log}):\n{r.stderr[-3000:]}")
    print(f"  trained in {time.time() - t0:.0f} s ({log})")


def cli(args: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "megadiff.cli", *args], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode != 0:
        raise SystemExit(f"megadiff {args[0]} failed:\n{r.stderr[-3000:]}")
    print("  " + (r.stdout.strip().splitlines() or [""])[-1])


def pretrained_model(work: Path, steps: int) -> Path:
    """make_tiny_sd3 fine-tuned by flow matching on coloured shapes, exported (diffusers dir)."""
    exported = work / "pretrained"
    if (exported / "model_index.json").is_file():
        return exported
    print(f"pretraining the tiny model by flow matching ({steps} steps)")
    run = work / "pretrain_run"
    run_train(["--recipe", "tiny-cpu", "--output-dir", str(run), "demo.num_samples=256",
               f"train.max_steps={steps}", f"train.save_interval={steps}", "train.log_interval=25",
               "logging.progress=off", "optim.lr=1e-3"], work / "pretrain.log")
    cli(["export", "--run", str(run), "--to", str(exported)])
    return exported


def colour_reward(work: Path, kind: str):
    from megadiff.rewards import tiny

    return tiny.make_colour_reward(work / f"reward-{kind}", kind=kind, colour="red")


def load_transformer(model_dir: Path, run: Path | None = None):
    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir
    from megadiff.models import sd3

    t = sd3.load_transformer(model_dir).eval()
    if run is not None:
        tag = (run / "latest").read_text().strip()
        t.load_state_dict(consolidated_state_dict(RunDir(run), tag, "transformer"))
    return t.requires_grad_(False)


@torch.no_grad()
def sample_reward(transformer, vae, reward, embeds, pooled, prompts, steps: int, seeds: list[int],
                  shift: float = 1.0, latent=(16, 8, 8)) -> float:
    """Mean reward of Euler ODE samples (`steps` steps) over prompts x seeds."""
    from megadiff import sampling
    from megadiff.rewards.scoring import decode_for_reward

    vals = []
    for seed in seeds:
        noise = torch.randn((len(prompts), *latent), generator=torch.Generator().manual_seed(seed))
        x0 = sampling.euler_sample(transformer, noise, embeds, pooled, steps, shift)
        vals.append(reward(decode_for_reward(vae, x0), prompts).float())
    return float(torch.cat(vals).mean())


def encode(model_dir: Path, prompts: list[str]):
    from megadiff.models import sd3
    from megadiff.models.tiny import TINY_T5_MAX_LENGTH

    return sd3.encode_prompts(sd3.load_text_pipeline(model_dir), prompts, TINY_T5_MAX_LENGTH)


# ---- DPO -----------------------------------------------------------------------------------

HELD_OUT = "on a green background"      # captions never trained on


def recoloured_pairs(n: int, size: int, seed: int, held_out: bool = False):
    """(caption, image 0, image 1): one random shape and layout in two colourings, the caption's
    (image 0) and another random foreground/background (image 1), so a pair differs in colour
    only. Training sets skip HELD_OUT captions; held-out sets keep only them."""
    from megadiff.data.synthetic import COLOURS, SHAPES
    from megadiff.objectives.preference_shards import shape_image

    rng = random.Random(seed)
    names = list(COLOURS)
    made = 0
    while made < n:
        fg, bg = rng.sample(names, 2)
        cap = f"a {fg} {rng.choice(SHAPES)} on a {bg} background"
        if (HELD_OUT in cap) != held_out:
            continue
        shape = cap.split()[2]
        fg2, bg2 = rng.choice([pair for pair in ((a, b) for a in names for b in names if a != b)
                               if pair != (fg, bg)])
        r = rng.randint(size // 6, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        made += 1
        yield (cap, shape_image(COLOURS[fg], COLOURS[bg], shape, box, size),
               shape_image(COLOURS[fg2], COLOURS[bg2], shape, box, size))


def held_out_prompts() -> list[str]:
    from megadiff.data.synthetic import COLOURS, SHAPES

    return [f"a {c} {s} {HELD_OUT}" for c in COLOURS if c != "green" for s in SHAPES]


@torch.no_grad()
def implicit_margins(model, ref, pairs_dir: Path, beta: float, draws: int = 4, seed: int = 0):
    """Mean z = -beta/2 (d_model - d_ref) and accuracy over pairs x `draws` (sigma, eps)."""
    from megadiff import flow
    from megadiff.data.verify import iter_samples
    from megadiff.objectives.dpo import dpo_margin, per_sample_error

    g = torch.Generator().manual_seed(seed)
    zs = []
    for rec in iter_samples(pairs_dir):
        w = torch.from_numpy(rec["latents_w"].astype("float32"))[None]
        l = torch.from_numpy(rec["latents_l"].astype("float32"))[None]
        emb = torch.from_numpy(rec["prompt_embeds"].astype("float32"))[None].expand(2 * draws, -1, -1)
        pooled = torch.from_numpy(rec["pooled_prompt_embeds"].astype("float32"))[None].expand(2 * draws, -1)
        eps = torch.randn((draws, *w.shape[1:]), generator=g)
        sigma = flow.sample_sigmas(draws, "logit_normal", g)
        x0 = torch.cat([w.expand(draws, -1, -1, -1), l.expand(draws, -1, -1, -1)])
        e2, s2 = torch.cat([eps, eps]), torch.cat([sigma, sigma])
        x_t, target = flow.add_noise(x0, e2, s2), flow.velocity_target(x0, e2)
        kw = dict(encoder_hidden_states=emb, pooled_projections=pooled, timestep=s2 * 1000, return_dict=False)
        em_w, em_l = per_sample_error(model(hidden_states=x_t, **kw)[0], target).chunk(2)
        er_w, er_l = per_sample_error(ref(hidden_states=x_t, **kw)[0], target).chunk(2)
        zs.append(dpo_margin(em_w, em_l, er_w, er_l, beta))
    z = torch.cat(zs)
    return float(z.mean()), float((z > 0).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/dpo_experiment")
    p.add_argument("--steps", type=int, default=200, help="DPO iterations")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--beta", type=float, default=1000.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--reward", default="aesthetic", choices=("clip", "hpsv2", "aesthetic"))
    p.add_argument("--sample-steps", type=int, default=8)
    a = p.parse_args()
    work = Path(a.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    from megadiff.models import sd3
    from megadiff.models.tiny import TINY_RESOLUTION, TINY_T5_MAX_LENGTH
    from megadiff.objectives.preference_shards import write_pairs
    from megadiff.rewards.registry import load_reward

    model = pretrained_model(work, a.pretrain_steps)
    rc = colour_reward(work, a.reward)
    reward_args = ["--choice-model", rc.kind, "--reward-path", rc.path] + (
        ["--reward-arch", rc.arch] if rc.arch else []) + (["--clip-path", rc.clip_path] if rc.clip_path else [])
    sets = {}
    for name, n, seed in (("train", a.pairs, 11), ("heldout", 48, 12)):
        held_out = name == "heldout"
        raw, labelled = work / f"pairs-{name}-raw", work / f"pairs-{name}"
        if not (labelled / "index.json").is_file():
            import shutil

            shutil.rmtree(raw, ignore_errors=True)
            write_pairs(raw, recoloured_pairs(n, TINY_RESOLUTION, seed, held_out), model, TINY_RESOLUTION,
                        TINY_T5_MAX_LENGTH, seed)
            print(f"labelling {name} pairs with the {rc.kind} colour reward")
            cli(["data", "label-pairs", str(raw), "--model", str(model), "--out", str(labelled), *reward_args])
        sets[name] = labelled

    run = work / "dpo_run"
    if not (run / "latest").is_file():
        print(f"Diffusion-DPO: {a.steps} steps, beta {a.beta}, lr {a.lr}")
        run_train(["--recipe", "tiny-dpo-cpu", "--output-dir", str(run), "demo.enabled=false",
                   f"model.path={model}", f"data.local={sets['train']}",
                   f"model.max_sequence_length={TINY_T5_MAX_LENGTH}", f"train.max_steps={a.steps}",
                   f"train.save_interval={a.steps}", "train.log_interval=10", f"dpo.beta={a.beta}",
                   f"optim.lr={a.lr}", "logging.progress=off", "validation.num_inference_steps=8"],
                  work / "dpo.log")
    ref = load_transformer(model)
    tuned = load_transformer(model, run)
    vae, reward = sd3.load_vae(model), load_reward(rc)
    held = held_out_prompts()
    emb, pooled = encode(model, held)
    seeds = [0, 1, 2, 3]
    res = {"steps": a.steps, "beta": a.beta, "lr": a.lr, "reward": rc.kind, "pairs": a.pairs,
           "sample_steps": a.sample_steps, "heldout_prompts": len(held), "seeds": len(seeds)}
    z_ref, acc_ref = implicit_margins(ref, ref, sets["heldout"], a.beta)
    z_new, acc_new = implicit_margins(tuned, ref, sets["heldout"], a.beta)
    res["heldout_margin"] = {"before": z_ref, "after": z_new}
    res["heldout_implicit_acc"] = {"before": acc_ref, "after": acc_new}
    z_tr, acc_tr = implicit_margins(tuned, ref, sets["train"], a.beta, draws=1)
    res["train_margin_after"], res["train_implicit_acc_after"] = z_tr, acc_tr
    before = sample_reward(ref, vae, reward, emb, pooled, held, a.sample_steps, seeds)
    after = sample_reward(tuned, vae, reward, emb, pooled, held, a.sample_steps, seeds)
    res["heldout_sample_reward"] = {"before": before, "after": after}
    logs = [json.loads(x) for x in (run / "loss_logs" / "train.jsonl").read_text().splitlines()]
    res["train_log"] = [{k: r[k] for k in ("iteration", "loss/dpo", "metric/dpo_acc", "metric/dpo_margin")}
                        for r in logs]
    res["seconds"] = round(time.time() - t0, 1)
    (work / "results.json").write_text(json.dumps(res, indent=1))
    md = [f"# Diffusion-DPO on the tiny model ({a.steps} steps, beta {a.beta}, {a.pairs} pairs labelled by "
          f"a {rc.kind} colour reward)", "",
          "| figure | before (reference) | after DPO |", "|---|---|---|",
          f"| held-out implicit reward margin z | {z_ref:.4f} | {z_new:.4f} |",
          f"| held-out implicit accuracy (share of z > 0) | {acc_ref:.3f} (z = 0: the reference) | {acc_new:.3f} |",
          f"| held-out prompts: colour reward of {a.sample_steps}-step samples | {before:.4f} | {after:.4f} |", "",
          f"train pairs after: margin {z_tr:.4f}, implicit accuracy {acc_tr:.3f}; "
          f"logged loss {logs[0]['loss/dpo']:.4f} -> {logs[-1]['loss/dpo']:.4f}; {res['seconds']} s"]
    (work / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
