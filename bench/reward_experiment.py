"""Bounded CPU experiment: does DMDR's reward phase (ReFL, SRPO) raise a known reward while the
DMD term stays bounded? (issue 5, "proof that it learns").

1. The tiny SD3 model (megadiff.models.tiny) and 64 coloured-shape image-caption samples with
   a red foreground ("a red square on a blue background") as MDS shards, and `make_colour_reward` (megadiff.rewards.tiny): a tiny HPSv2-format open_clip
   tower trained to prefer a colour (red by default), loaded through the real HPSv2.1 path.
2. Three real `megadiff train` runs of the tiny-dmdr-cpu recipe (ZeRO-3, LoRA gen/gui, DMDR
   schedules), identical up to the end of the cold start (K iterations of DMD alone):
   `dmd` (DMD only to the end: the control), `refl` (objectives [dmd, refl]: hinge on the
   colour reward) and `srpo` (objectives [dmd, srpo]: the same reward against
   (1 + k) e("<positive>. prompt") - e("<negative>. prompt")).
3. Every saved `checkpoints/lora_gen/step-N` is loaded the way a user would
   (StableDiffusion3Pipeline.load_lora_weights), the few-step generator samples held-out
   prompts (shapes never in the shards) from fixed noise, and the decoded images are scored
   with the colour reward (the plain score, not SRPO's: "reward"), with SRPO's relative score
   averaged over DMDR's nine control-word pairs ("SRPO": the tower reads the positive words as
   "clean" and the negative ones as "washed out towards grey", see `colour_captions`), and with
   ground truths the tower was trained on: `redness(image, the prompt's colour)` ("match": mean
   pixel similarity to the named colour) and saturation (mean max-min over channels; washing
   out lowers it). "Before" is the end of the cold start (step K, the same weights in all three
   runs).
4. Reward hacking check: the DM term (loss/dm from the run logs) per phase, and the images'
   total variation (mean |neighbour difference|; noise-like images have a high one) against
   the frozen teacher's own 8-step samples of the same prompts.

    python bench/reward_experiment.py [--out runs/reward_experiment] [--cold 20] [--steps 140] [--noise 8]
prints the table and writes results.json there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# Held-out prompts: a red foreground (the reward's optimum is a red image), shapes never in
# the shards (square, circle) and background words from the shards' colours.
HELD_OUT = ["a red triangle on a green background", "a red star on a yellow background",
            "a red triangle on a black background", "a red star on a white background",
            "a red triangle on a blue background", "a red star on a black background",
            "a red hexagon on a white background", "a red hexagon on a green background"]
SEQ = 32            # the tiny model's T5 length (TINY_T5_MAX_LENGTH)


def setup(out: Path, colour: str) -> tuple[Path, Path, dict]:
    from megadiff.data.synthetic import shape_samples
    from megadiff.data.writer import write_train_shards
    from megadiff.models.tiny import TINY_RESOLUTION, TINY_T5_MAX_LENGTH, make_tiny_sd3
    from megadiff.rewards.tiny import make_colour_reward

    model, shards = out / "model", out / "shards"
    if not (model / "model_index.json").is_file():
        make_tiny_sd3(model, seed=0)
    if not (shards / "index.json").is_file():       # 64 red-foreground squares and circles
        red = (s for s in shape_samples(2000, TINY_RESOLUTION, seed=1) if s[1].startswith("a red "))
        write_train_shards(shards, [next(red) for _ in range(64)], model, TINY_RESOLUTION,
                           TINY_T5_MAX_LENGTH, seed=0)
    rc = make_colour_reward(out / "reward", kind="hpsv2", colour=colour)
    return model, shards, {"kind": rc.kind, "name": "hpsv2", "path": rc.path, "arch": rc.arch}


def train(name: str, objectives: list[str], model: Path, shards: Path, reward: dict, args) -> Path:
    run = args.out / "runs" / name
    if (run / "latest").is_file() and (run / "latest").read_text().strip() == f"step-{args.steps}":
        return run
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + hash(name) % 1000)}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "megadiff.train", "--recipe", "tiny-dmdr-cpu", "--output-dir", str(run),
           "demo.enabled=false", f"seed={args.seed}", f"model.path={model}", f"data.local={shards}",
           f"model.max_sequence_length={SEQ}", f"objectives={json.dumps(objectives)}",
           f"rewards={json.dumps([{**reward, 'weight': args.weight}])}",
           f"train.max_steps={args.steps}", f"train.save_interval={args.cold}", "train.keep_last=0",
           "train.log_interval=2", f"dmd.cold_start_steps={args.cold}",
           f"dmd.real_adapter_decay_steps={args.cold}", "validation.num_inference_steps=2",
           "logging.wandb_mode=disabled", "logging.progress=off", f"srpo.k={args.k}",
           f"dmd.update_ratio={args.ratio}", f"optim.lr={args.lr}", f"optim_nets.fake_score.lr={args.lr}",
           f"dmd.after_cold_start_lr={{generator: {args.lr}, fake_score: {args.lr}}}"]
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"run {name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    print(f"  trained {name} ({' + '.join(objectives)}) in {time.time() - t:.0f} s", flush=True)
    return run


class Evaluator:
    """Few-step samples of held-out prompts from a saved lora_gen, scored by the colour reward."""

    def __init__(self, model: Path, reward: dict, n_noise: int, k: float):
        from megadiff.config import RewardConfig
        from megadiff.models import sd3
        from megadiff.rewards.registry import load_reward

        self.model, self.k = model, k
        self.reward = load_reward(RewardConfig(**reward))
        self.vae = sd3.load_vae(model)
        text = sd3.load_text_pipeline(model)
        prompts = [p for p in HELD_OUT for _ in range(n_noise)]
        self.prompts = prompts
        self.emb, self.pooled = sd3.encode_prompts(text, prompts, SEQ)
        self.neg, self.neg_pooled = sd3.encode_prompts(text, [""] * len(prompts), SEQ)
        c = sd3.transformer_config(model)["in_channels"]
        side = 64 // sd3.vae_scale_factor(sd3.vae_config(model))
        self.noise = torch.randn(len(prompts), c, side, side, generator=torch.Generator().manual_seed(1234))

    @torch.no_grad()
    def measure(self, latents: torch.Tensor) -> dict:
        from megadiff.rewards.scoring import decode_for_reward

        from megadiff.objectives.srpo import control_prompts, srpo_score
        from megadiff.rewards.tiny import control_words

        images = decode_for_reward(self.vae, latents)
        score = self.reward(images, self.prompts)
        feats = self.reward.image_features(images)       # SRPO's score, averaged over DMDR's word pairs
        pairs = [(p, n) for p in control_words()[0] for n in control_words()[1]]
        srpo = sum(srpo_score(self.reward, feats, *control_prompts(self.prompts, p, n), self.k).mean()
                   for p, n in pairs) / len(pairs)
        from megadiff.rewards.tiny import redness         # ground truth: the prompt's colour in the image
        match = torch.stack([redness(images[i:i + 1], p.split()[1])[0] for i, p in enumerate(self.prompts)])
        tv = ((images[..., 1:, :] - images[..., :-1, :]).abs().mean()
              + (images[..., :, 1:] - images[..., :, :-1]).abs().mean()) / 2
        saturation = (images.amax(1) - images.amin(1)).mean()     # falls as images wash out to grey
        return {"reward": score.mean().item(), "reward_std": score.std().item(), "tv": tv.item(),
                "srpo_score": float(srpo), "saturation": saturation.item(),
                "colour_match": match.mean().item(),
                "latent_std": latents.std().item()}

    @torch.no_grad()
    def generator(self, lora_dir: Path, cfg: dict) -> dict:
        from diffusers import StableDiffusion3Pipeline

        from megadiff import generator as gen

        pipe = StableDiffusion3Pipeline.from_pretrained(self.model, text_encoder=None, text_encoder_2=None,
                                                        text_encoder_3=None, tokenizer=None, tokenizer_2=None,
                                                        tokenizer_3=None)
        pipe.load_lora_weights(lora_dir, adapter_name="gen")
        g = cfg["dmd"]["generator"]
        sig = gen.conditioning_sigmas(g["num_steps"], g["shift"] or cfg["flow"]["shift"], g["sigmas"])
        x = gen.ode_sample(gen.transformer_velocity(pipe.transformer.eval()), self.noise, sig,
                           self.emb, self.pooled)
        return self.measure(x)

    @torch.no_grad()
    def teacher(self, steps: int, cfg_scale: float) -> dict:
        from megadiff import sampling
        from megadiff.models import sd3

        t = sd3.load_transformer(self.model).eval()
        x = sampling.euler_sample(t, self.noise, self.emb, self.pooled, steps, 1.0, cfg_scale,
                                  self.neg, self.neg_pooled, torch.float32)
        return self.measure(x)


def dm_by_phase(run: Path, cold: int) -> dict:
    recs = [json.loads(line) for line in (run / "loss_logs" / "train.jsonl").read_text().splitlines()]
    cold_dm = [r["loss/dm"] for r in recs if r["iteration"] <= cold and "loss/dm" in r]
    late_dm = [r["loss/dm"] for r in recs if r["iteration"] > cold and "loss/dm" in r]
    reward = [r.get("loss/reward_hpsv2") for r in recs if r["iteration"] > cold and "loss/reward_hpsv2" in r]
    mean = lambda v: sum(v) / len(v) if v else None
    return {"dm_cold_start": mean(cold_dm[len(cold_dm) // 2:]), "dm_reward_phase": mean(late_dm),
            "dm_reward_phase_max": max(late_dm) if late_dm else None,
            "reward_term_first": reward[0] if reward else None, "reward_term_last": reward[-1] if reward else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/reward_experiment"))
    ap.add_argument("--cold", type=int, default=20, help="cold-start iterations (DMD only)")
    ap.add_argument("--steps", type=int, default=140, help="iterations in all (a multiple of --cold)")
    ap.add_argument("--weight", type=float, default=10.0, help="the colour reward's weight")
    ap.add_argument("--k", type=float, default=0.1, help="SRPO's k")
    ap.add_argument("--lr", type=float, default=1e-2, help="LoRA learning rate of both networks")
    ap.add_argument("--ratio", type=int, default=1, help="dmd.update_ratio")
    ap.add_argument("--colour", default="red")
    ap.add_argument("--noise", type=int, default=8, help="noise draws per held-out prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the training runs' seed (init, noise, data order)")
    args = ap.parse_args()
    assert args.steps % args.cold == 0, "--steps must be a multiple of --cold (checkpoints every --cold)"
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, shards, reward = setup(args.out, args.colour)
    runs = {name: train(name, objs, model, shards, reward, args)
            for name, objs in (("dmd", ["dmd"]), ("refl", ["dmd", "refl"]), ("srpo", ["dmd", "srpo"]))}
    ev = Evaluator(model, reward, args.noise, args.k)
    cfg = json.loads((runs["refl"] / "args.json").read_text())
    results = {"args": {k: str(v) for k, v in vars(args).items()},
               "teacher_8step": ev.teacher(8, cfg["dmd"]["real_guidance_scale"]), "runs": {}}
    for name, run in runs.items():
        per_step = {}
        for step in range(args.cold, args.steps + 1, args.cold):
            per_step[step] = ev.generator(run / "checkpoints" / "lora_gen" / f"step-{step}", cfg)
        results["runs"][name] = {"by_step": per_step, **dm_by_phase(run, args.cold)}
    results["seconds"] = time.time() - t0
    (args.out / "results.json").write_text(json.dumps(results, indent=1))

    t = results["teacher_8step"]
    print(f"\nheld-out prompts: {len(HELD_OUT)} x {args.noise} noise draws; colour reward ({args.colour}), "
          f"plain HPS-style score (cos)")
    print(f"teacher 8-step CFG: reward {t['reward']:.5f}  SRPO {t['srpo_score']:.5f}  match {t['colour_match']:.5f}  "
          f"sat {t['saturation']:.4f}  TV {t['tv']:.4f}  latent std {t['latent_std']:.3f}")
    print(f"{'run':6s} {'step':>5s} {'reward':>9s} {'SRPO':>9s} {'match':>8s} {'sat':>7s} {'TV':>7s} {'lat.std':>7s}")
    for name, r in results["runs"].items():
        for step, m in r["by_step"].items():
            tag = " (end of cold start)" if step == args.cold else ""
            print(f"{name:6s} {step:5d} {m['reward']:9.5f} {m['srpo_score']:9.5f} {m['colour_match']:8.5f} "
                  f"{m['saturation']:7.4f} {m['tv']:7.4f} "
                  f"{m['latent_std']:7.3f}{tag}")
        print(f"{'':6s} loss/dm: cold start (2nd half) {r['dm_cold_start']:.3e}, reward phase mean "
              f"{r['dm_reward_phase']:.3e} max {r['dm_reward_phase_max']:.3e}"
              + (f"; reward term {r['reward_term_first']:.4f} -> {r['reward_term_last']:.4f}"
                 if r["reward_term_first"] is not None else ""))
    print(f"\n{results['seconds']:.0f} s; results in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
