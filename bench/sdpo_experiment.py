"""Bounded CPU experiment: does megadiff's SDPO raise a known reward, at 1, 2 and 4 sampling
steps? (issue 6, "proof that it learns"; the SDPO paper's "step generalisation": train with
K-step SDE rollouts, the 1-, 2- and 4-step samples improve too).

1. The tiny SD3 model fine-tuned by flow matching on coloured shapes (shared with
   bench/dpo_experiment.py: the same `pretrained` directory when --out is shared).
2. Reward: a tiny tower trained to prefer red (megadiff.rewards.tiny.make_colour_reward),
   loaded through the real reward registry; it scores VAE decodes.
3. Prompts with cached embeddings (`megadiff.prompt_embeds`) without the held-out captions
   ("... on a green background"); SDPO runs through `python -m megadiff.train`
   (tiny-sdpo-cpu, ZeRO-3) with K-step SDE rollouts.
4. Figure: mean reward of Euler ODE samples at 1, 2 and 4 steps on the held-out prompts and on
   training prompts, fixed seeds, before and after.

    python bench/sdpo_experiment.py [--steps 160] [--sde-steps 4] [--out runs/sdpo_experiment]
writes results.json and results.md there (and prints them).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dpo_experiment import (HELD_OUT, colour_reward, encode, held_out_prompts, load_transformer,
                            pretrained_model, run_train, sample_reward)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/sdpo_experiment")
    p.add_argument("--steps", type=int, default=160, help="SDPO iterations (optimizer steps)")
    p.add_argument("--sde-steps", type=int, default=4, help="K: SDE steps of each rollout")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=4, help="prompts per rollout")
    p.add_argument("--reward", default="aesthetic", choices=("clip", "hpsv2", "aesthetic"))
    a = p.parse_args()
    work = Path(a.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    from megadiff.models import sd3
    from megadiff.models.tiny import TINY_T5_MAX_LENGTH
    from megadiff.objectives.preference_shards import demo_prompts, write_prompt_embeds
    from megadiff.rewards.registry import load_reward

    model = pretrained_model(work, a.pretrain_steps)
    rc = colour_reward(work, a.reward)
    train_prompts = sorted({q for q in demo_prompts(400, seed=5) if HELD_OUT not in q})
    prompts = work / "prompts"
    if not (prompts / "index.json").is_file():
        write_prompt_embeds(prompts, train_prompts, model, TINY_T5_MAX_LENGTH)
    reward_list = "[{" + ", ".join(f"{k}: {v}" for k, v in (("kind", rc.kind), ("path", rc.path),
                                                            ("arch", rc.arch), ("clip_path", rc.clip_path))
                                   if v) + "}]"
    run = work / f"sdpo_run_k{a.sde_steps}"
    if not (run / "latest").is_file():
        print(f"SDPO: {a.steps} steps, {a.sde_steps}-step rollouts, lr {a.lr}, reward {rc.kind}")
        run_train(["--recipe", "tiny-sdpo-cpu", "--output-dir", str(run), "demo.enabled=false",
                   f"model.path={model}", f"data.local={prompts}", f"rewards={reward_list}",
                   f"model.max_sequence_length={TINY_T5_MAX_LENGTH}", f"train.max_steps={a.steps}",
                   f"train.save_interval={a.steps}", "train.log_interval=8", f"optim.lr={a.lr}",
                   f"sdpo.num_steps={a.sde_steps}", f"data.micro_batch_size={a.batch}",
                   "logging.progress=off", "validation.num_inference_steps=4"], work / f"sdpo_k{a.sde_steps}.log")
    base, tuned = load_transformer(model), load_transformer(model, run)
    vae, reward = sd3.load_vae(model), load_reward(rc)
    seeds = [0, 1, 2, 3]
    res = {"steps": a.steps, "sde_steps": a.sde_steps, "lr": a.lr, "reward": rc.kind, "seeds": len(seeds),
           "train_prompts": len(train_prompts)}
    rows = []
    for name, qs in (("held-out", held_out_prompts()), ("train", train_prompts[:10])):
        emb, pooled = encode(model, qs)
        for n in (1, 2, 4):
            before = sample_reward(base, vae, reward, emb, pooled, qs, n, seeds)
            after = sample_reward(tuned, vae, reward, emb, pooled, qs, n, seeds)
            res[f"{name}_{n}step"] = {"before": before, "after": after}
            rows.append(f"| {name} prompts, {n}-step samples | {before:.4f} | {after:.4f} | {after - before:+.4f} |")
    logs = [json.loads(x) for x in (run / "loss_logs" / "train.jsonl").read_text().splitlines()]
    res["train_log"] = [{k: r.get(k) for k in ("iteration", "loss/sdpo", "metric/reward_first",
                                                "metric/reward_last", "metric/clipfrac")} for r in logs]
    res["seconds"] = round(time.time() - t0, 1)
    (work / f"results_k{a.sde_steps}.json").write_text(json.dumps(res, indent=1))
    rolled = [r for r in logs if "metric/reward_last" in r]
    md = [f"# SDPO on the tiny model: {a.steps} steps, {a.sde_steps}-step SDE rollouts, {rc.kind} colour reward",
          "", "| ODE samples | reward before | after SDPO | change |", "|---|---|---|---|", *rows, "",
          f"rollout reward (last x0) over training: {rolled[0]['metric/reward_last']:.4f} (first log) -> "
          f"{rolled[-1]['metric/reward_last']:.4f} (last log); {res['seconds']} s"]
    (work / f"results_k{a.sde_steps}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
