"""ReFL: reward feedback on the few-step generator's x0, as DMDR adds it to DMD.

ReFL (Xu et al. 2023, ImageReward, arXiv 2304.05977) back-propagates a differentiable reward
of the decoded image into the generator. DMDR (Jiang et al. 2025; vvvvvjdy/dmdr at d1f2436,
`train_t2i/sd3/train_sd3_refl_deepspeed.py` lines 596-644) decodes the generator's
x0 with the VAE, scores it with CLIP and HPSv2.1 and adds a hinge per reward:

    L_reward = weight * sum_k w_k * mean_b relu(margin - r_k(D(x0_b), prompt_b)),   margin 0.7,

(`loss: neg` gives -sum_k w_k mean_b r_k), with D the VAE decode to [0, 1] images
(megadiff.rewards.scoring.decode_for_reward), w_k each reward's `weight` (DMDR: 0.1 and 0.1 for
SD3.5-L, 0.3 and 0.3 for SD3-M). HPS sees "<prompt_prefix> <caption>" ("Realistic photo", the
`--magic-prompt` of DMDR's scripts; CLIP sees the bare caption): `refl.prefix_rewards`.

Composed as `objectives: [dmd, refl]`: the term joins the generator's DMD loss through
`DMD.generator_x0_terms`, only once `in_cold_start(step)` is false (DMDR: `global_step >=
cold_start_iter`). ReFL needs dmd's generator; without dmd there is no x0 to score (config
validation says so). The VAE and the reward models are built in `build_extras`, frozen, in the
compute dtype, replicated on every rank, and never saved in checkpoints.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from megadiff.objectives.base import Objective
from megadiff.rewards.registry import reward_name


# ---- the loss math (pure functions, unit-tested against hand computations) ---------------

def reward_loss(scores: torch.Tensor, loss: str, margin: float) -> torch.Tensor:
    """mean relu(margin - r) (hinge) or -mean r (neg) over the batch."""
    if loss == "hinge":
        return F.relu(margin - scores.float()).mean()
    if loss == "neg":
        return -scores.float().mean()
    raise ValueError(f"refl.loss={loss!r} is unknown: use hinge or neg")


def with_prefix(prompts: list[str], prefix: str) -> list[str]:
    """DMDR's magic prompt: "<prefix> <prompt>"."""
    return [f"{prefix} {p}" for p in prompts] if prefix else list(prompts)


# ---- the objective ----------------------------------------------------------------------

class ReFL(Objective):
    def _check_inputs(self) -> None:
        """Missing reward files stop the run before any process group or engine exists (their
        format is checked when they load, in `build_extras`, still before the first step)."""
        super()._check_inputs()
        if self.cfg.demo.enabled:
            return
        from pathlib import Path

        for rc in self.cfg.rewards:
            for key, path in (("path", rc.path), ("clip_path", rc.clip_path)):
                if path is not None and not Path(path).exists():
                    raise ValueError(f"reward {reward_name(rc)}: {key} {path} does not exist: give the "
                                     f"local {rc.kind} checkpoint (rewards[...].{key}=...)")

    def build_extras(self) -> None:
        super().build_extras()
        if getattr(self, "reward_models", None) is not None:     # refl and srpo share one set
            return
        from megadiff.models import sd3
        from megadiff.rewards.registry import load_reward

        if self.cfg.demo.enabled:
            self._prepare_demo_rewards()
        # Building towers draws random initial weights: keep the run's RNG streams as they were,
        # so a run with rewards matches one without up to the end of the cold start.
        with torch.random.fork_rng(devices=[]):
            self.reward_vae = sd3.load_vae(self.model_path, self.compute_dtype).to(self.device)
            self.reward_models = {reward_name(rc): load_reward(rc, self.device, self.compute_dtype)
                                  for rc in self.cfg.rewards}
        self.reward_weights = {reward_name(rc): rc.weight for rc in self.cfg.rewards}

    def _prepare_demo_rewards(self) -> None:
        """Demo runs: tiny reward towers in their real formats under output_dir/demo/rewards
        (rank 0 builds, the others wait), as the demo's model and shards are built; hpsv2,
        clip and aesthetic towers are trained in seconds to prefer red (`make_colour_reward`)."""
        import dataclasses

        import torch.distributed as dist

        from megadiff.rewards import tiny

        root = self.run.root / "demo" / "rewards"
        made = []
        for i, rc in enumerate(self.cfg.rewards):
            out = root / reward_name(rc)
            if self.rank == 0 and not (out / "done").is_file():
                if rc.kind in ("hpsv2", "clip", "aesthetic"):     # a tower trained to prefer red
                    built = tiny.make_colour_reward(out, kind=rc.kind, colour="red", seed=self.cfg.seed + i)
                else:
                    built = tiny.make_tiny_reward(rc.kind, out, seed=self.cfg.seed + i)
                (out / "done").write_text(json.dumps(dataclasses.asdict(built)))
            made.append(out)
        if dist.is_initialized():
            dist.barrier()
        for rc, out in zip(self.cfg.rewards, made):
            built = json.loads((out / "done").read_text())
            rc.path, rc.arch, rc.clip_path = built["path"], built["arch"], built["clip_path"]

    def reward_prompts(self, name: str, captions: list[str]) -> list[str]:
        r = self.cfg.refl
        if r.prefix_rewards is None or name in r.prefix_rewards:
            return with_prefix(captions, r.prompt_prefix)
        return list(captions)

    def term_weight(self, name: str) -> float:
        return self.cfg.refl.weight

    def reward_scores(self, images: torch.Tensor, captions: list[str], step: int) -> dict[str, torch.Tensor]:
        """Reward name -> [B] scores of the decoded images (differentiable)."""
        return {name: model(images, self.reward_prompts(name, captions)).float()
                for name, model in self.reward_models.items()}

    def generator_x0_terms(self, x, batch, step):
        terms = super().generator_x0_terms(x, batch, step)
        if self.in_cold_start(step):
            return terms
        from megadiff.rewards.scoring import decode_for_reward

        images = decode_for_reward(self.reward_vae, x.to(self.compute_dtype))
        r = self.cfg.refl
        for name, scores in self.reward_scores(images, list(batch["caption"]), step).items():
            terms[f"reward_{name}"] = self.term_weight(name) * self.reward_weights[name] * reward_loss(
                scores, r.loss, r.margin)
        return terms
