"""SDPO: stepwise diffusion policy optimisation with dense reward differences (Zhang et al.
2025, "Aligning Few-Step Diffusion Models with Dense Reward Difference Learning";
ZiyiZhang27/sdpo `scripts/train_sdpo.py`, `sdpo_pytorch/diffusers_patch/
pipeline_with_logprob_sdpo.py`), brought from DDIM to SD3's rectified flow with the flow SDE of
`megadiff.sde` (Flow-GRPO's step and log-probability).

Network: `transformer` (trainable). Data: prompts with cached embeddings (`megadiff.prompt_embeds`,
`megadiff data prompts --model`); the caption goes to the reward models (`rewards:`), which
score VAE decodes of x0 predictions (frozen extras, never checkpointed).

A rollout (no gradient), per prompt b:
  1. two SDE trajectories over K steps from the same initial noise; every step keeps x_k,
     x_{k+1}, log p(x_{k+1} | x_k) (fp32) and x0_hat_k = x_k - s_k v;
  2. rewards of x0_hat at the first step, an anchor step and the last step, the anchor being
     argmin_k cos(x0_hat_k, x0_hat_0) + cos(x0_hat_k, x0_hat_{K-1});
  3. dense rewards  r_k = (r_f c^f_k + r_a c^a_k + r_l c^l_k) / (c^f_k + c^a_k + c^l_k),
     c = cosine similarity of x0_hat_k to that step's x0_hat, and r_0 = r_f, r_{K-1} = r_l,
     r_anchor = r_a exactly (the seed's order of assignment);
  4. discounted returns R_k = r_k + gamma R_{k+1}, normalised over both trajectories, all steps,
     all prompts and all ranks: A = (R - mean) / (std + 1e-8) (the seed without per-prompt
     stat tracking).
Updates: each sample's K steps are visited in its own random order (per-sample timestep
shuffling), `sdpo.timesteps_per_update` of them per optimizer step, so one rollout feeds
K / timesteps_per_update iterations. For the visited step k of each sample, with the current
log-probs lp and the rollout's lp_old,
    dlogp_i = lp_i - lp_old_i  (trajectory i = 1, 2),  w = lam^k / log_scale,
    dA      = clip(A_1, +-c) - clip(A_2, +-c),
    L       = mean max( (w (dlogp_1 - dlogp_2) - dA)^2,
                        (w (clip(dlogp_1, +-eps) - clip(dlogp_2, +-eps)) - dA)^2 ).
Few-step and many-step models alike: K is `sdpo.num_steps` (>= 2: both trajectories share
x0_hat_0, so one step has no reward difference; the seed trains 50 steps on sd-turbo and the
1-step model improves with it).

Each rank's rollout buffer is saved with its RNG state (`rank_state`), so a run resumed in the
middle of a rollout's iterations continues on the same rollout, bitwise (a resume with another
rank count draws fresh ones). Iterations that reuse a rollout take no new prompts from the loader.

Logged (`metric/*`): `reward_first` / `reward_last` (mean weighted reward of the rollouts'
first and last x0 predictions: the 1-step and K-step samples), `clipfrac`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megadiff import flow, sde
from megadiff.objectives.base import NetSpec, Objective


# ---- the math (pure functions, unit-tested on fixed numbers) -----------------------------

def anchor_similarities(x0_preds: torch.Tensor):
    """x0_preds [B, K, ...] -> (anchor [B], sim_first, sim_anchor, sim_last: [B, K])."""
    flat = x0_preds.float().flatten(2)
    sim_first = F.cosine_similarity(flat, flat[:, :1].expand_as(flat), dim=2)
    sim_last = F.cosine_similarity(flat, flat[:, -1:].expand_as(flat), dim=2)
    anchor = (sim_first + sim_last).argmin(dim=1)
    at = flat[torch.arange(flat.shape[0], device=flat.device), anchor]
    sim_anchor = F.cosine_similarity(flat, at[:, None].expand_as(flat), dim=2)
    return anchor, sim_first, sim_anchor, sim_last


def dense_rewards(r: torch.Tensor, anchor: torch.Tensor, sim_first: torch.Tensor,
                  sim_anchor: torch.Tensor, sim_last: torch.Tensor) -> torch.Tensor:
    """r [B, 3] = rewards of the first, anchor and last x0 predictions -> [B, K]."""
    r = r.float()
    dense = ((r[:, 0:1] * sim_first + r[:, 1:2] * sim_anchor + r[:, 2:3] * sim_last)
             / (sim_first + sim_anchor + sim_last))
    dense[:, 0], dense[:, -1] = r[:, 0], r[:, 2]
    dense[torch.arange(len(anchor), device=dense.device), anchor] = r[:, 1]
    return dense


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """R_k = r_k + gamma R_{k+1} along dim 1."""
    out = rewards.clone().float()
    for k in reversed(range(out.shape[1] - 1)):
        out[:, k] = out[:, k] + gamma * out[:, k + 1]
    return out


def normalize(x: torch.Tensor, all_reduce: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) with the population std, over every element (on every rank)."""
    stats = torch.stack([x.sum(), (x * x).sum(), torch.tensor(float(x.numel()), device=x.device)]).double()
    if all_reduce:
        dist.all_reduce(stats)
    mean = stats[0] / stats[2]
    std = (stats[1] / stats[2] - mean**2).clamp(min=0).sqrt()
    return ((x.double() - mean) / (std + eps)).float()


def sdpo_loss(lp1, lp2, old1, old2, adv1, adv2, weight, adv_clip_max: float, clip_range: float):
    """The SDPO squared loss (mean over samples) and the share of samples where clipping bound."""
    a1, a2 = adv1.clamp(-adv_clip_max, adv_clip_max), adv2.clamp(-adv_clip_max, adv_clip_max)
    adv_diff = a1 - a2
    unclipped = (weight * ((lp1 - old1) - (lp2 - old2)) - adv_diff) ** 2
    if clip_range <= 0:
        return unclipped.mean(), torch.zeros(())
    c1 = torch.clamp(lp1, old1 - clip_range, old1 + clip_range)
    c2 = torch.clamp(lp2, old2 - clip_range, old2 + clip_range)
    clipped = (weight * ((c1 - old1) - (c2 - old2)) - adv_diff) ** 2
    return torch.maximum(unclipped, clipped).mean(), (clipped > unclipped).float().mean().detach()


# ---- the objective ----------------------------------------------------------------------

@dataclass
class Rollout:
    round: int
    latents: torch.Tensor      # [2, B, K + 1, C, H, W]   (trajectory, sample, step)
    log_probs: torch.Tensor    # [2, B, K]
    advantages: torch.Tensor   # [2, B, K]
    order: torch.Tensor        # [B, K]: each sample's shuffled visiting order of its steps
    embeds: torch.Tensor
    pooled: torch.Tensor


class SDPO(Objective):
    def networks(self):
        return super().networks() | {"transformer": NetSpec(trainable=True)}

    def steps_this_iteration(self, step):
        return super().steps_this_iteration(step) + ["transformer"]

    @property
    def updates_per_rollout(self) -> int:
        s = self.cfg.sdpo
        return s.num_steps // s.timesteps_per_update

    # -- construction ------------------------------------------------------------------------
    def _check_shards_fit_model(self) -> None:
        from megadiff.models import sd3

        info = self.shards
        if info is None:
            return
        where = self.cfg.data.remote or self.cfg.data.local
        if info.schema != "megadiff.prompt_embeds":
            raise ValueError(f"shards in {where} are a {info.schema} set, but sdpo samples from prompts "
                             "with cached embeddings (megadiff.prompt_embeds): build them with "
                             "`megadiff data prompts FILE --model MODEL --out DIR`")
        factor = sd3.vae_scale_factor(sd3.vae_config(self.model_path))
        tc = self.transformer_config
        res = self.cfg.sdpo.resolution or tc["sample_size"] * factor
        if res % factor:
            raise ValueError(f"sdpo.resolution={res} is not a multiple of the VAE's factor {factor}")
        want = 77 + self.cfg.model.max_sequence_length
        if self.cfg.sdpo.guidance_scale != 1.0 and info.text_seq_len != want:
            raise ValueError(f"the prompt embeddings have {info.text_seq_len} tokens but CFG's empty prompt "
                             f"gets {want} (model.max_sequence_length={self.cfg.model.max_sequence_length}): "
                             f"set model.max_sequence_length={info.text_seq_len - 77}")
        # From here on the set describes the latents SDPO samples (validation, FLOPs use them).
        self.shards = dataclasses.replace(info, latent_shape=(tc["in_channels"], res // factor, res // factor))
        self._check_shard_geometry(self.shards, where)

    def _prepare_demo(self) -> None:
        """Tiny model, prompt shards with embeddings and (without `rewards:`) a colour reward."""
        from megadiff.objectives.preference_shards import demo_prompts, write_prompt_embeds
        from megadiff.models.tiny import TINY_T5_MAX_LENGTH

        super()._prepare_demo()
        demo = self.run.root / "demo"
        prompts = demo / "prompts"
        if self.rank == 0:
            if not (prompts / "index.json").is_file():
                write_prompt_embeds(prompts, demo_prompts(self.cfg.demo.num_samples, self.cfg.seed),
                                    self.cfg.model.path, TINY_T5_MAX_LENGTH)
            self._demo_rewards(demo)
        if dist.is_initialized():
            dist.barrier()
        if self.rank != 0:
            self._demo_rewards(demo)
        self.cfg.data.local, self.cfg.data.remote = str(prompts), None

    def _demo_rewards(self, demo) -> None:
        """Without `rewards:` the demo scores redness: a tiny aesthetic tower trained to prefer
        red (megadiff.rewards.tiny.make_colour_reward, cached in output_dir/demo)."""
        from megadiff.rewards.tiny import make_colour_reward

        if not self.cfg.rewards:
            self.cfg.rewards = [make_colour_reward(demo / "reward", kind="aesthetic", colour="red")]

    def build_extras(self) -> None:
        super().build_extras()
        from megadiff.models import sd3
        from megadiff.rewards.registry import RewardSet

        self.vae = sd3.load_vae(self.model_path).to(self.device)
        self.reward_set = RewardSet.from_configs(self.cfg.rewards, self.device, torch.float32)
        self._rollouts: dict[int, Rollout] = {}
        self._micro_step, self._micro = -1, 0

    def flops_per_iteration(self) -> float:
        """Training passes only (rollout sampling is extra): 2 trajectories per visited step."""
        s = self.cfg.sdpo
        cfg_factor = 2 if s.guidance_scale != 1.0 else 1
        return super().flops_per_iteration() * 2 * s.timesteps_per_update * cfg_factor

    # -- the rollout buffer is checkpointed: a resume inside a rollout's iterations is exact ----
    def rank_state(self) -> dict:
        held = {slot: {k: v.cpu() if torch.is_tensor(v) else v for k, v in dataclasses.asdict(ro).items()}
                for slot, ro in self._rollouts.items()}
        return super().rank_state() | {"sdpo_rollouts": held}

    def load_rank_state(self, state: dict) -> None:
        super().load_rank_state(state)
        self._rollouts = {slot: Rollout(**{k: v.to(self.device) if torch.is_tensor(v) else v
                                           for k, v in ro.items()})
                          for slot, ro in state.get("sdpo_rollouts", {}).items()}

    # -- data: a new prompt batch only when a micro-step starts a rollout --------------------
    def samples_per_iteration(self, step: int) -> int:
        return self.global_batch if step % self.updates_per_rollout == 0 else 0

    def next_batch(self) -> dict:
        if self._micro_step != self.step:
            self._micro_step, self._micro = self.step, 0
        slot = self._micro
        self._micro += 1
        held = self._rollouts.get(slot)
        if held is None or held.round != self.step // self.updates_per_rollout:
            return {**super().next_batch(), "sdpo_slot": slot}
        return {"sdpo_slot": slot}

    # -- pieces --------------------------------------------------------------------------------
    def sampling_sigmas(self, num_steps: int | None = None) -> torch.Tensor:
        s = self.cfg.sdpo
        shift = self.cfg.flow.shift if s.shift is None else s.shift
        return flow.inference_sigmas(num_steps or s.num_steps, shift)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor,
                 pooled: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity, with CFG (empty prompt) when sdpo.guidance_scale != 1."""
        w = self.cfg.sdpo.guidance_scale
        if w == 1.0:
            return self.forward_net("transformer", x, sigma, {}, emb, pooled)
        b = x.shape[0]
        neg = self.val_embeds["neg_embeds"].to(self.device).expand(b, -1, -1)
        neg_pooled = self.val_embeds["neg_pooled"].to(self.device).expand(b, -1)
        v = self.forward_net("transformer", torch.cat([x, x]), torch.cat([sigma, sigma]), {},
                             torch.cat([neg, emb.to(self.device)]), torch.cat([neg_pooled, pooled.to(self.device)]))
        v_u, v_c = v.chunk(2)
        return v_u + w * (v_c - v_u)

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.noise_rng).to(self.device)

    @torch.no_grad()
    def score(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Weighted reward of latents [B, C, H, W] (VAE decode to [0, 1], then the reward set)."""
        from megadiff.rewards.scoring import decode_for_reward

        images = decode_for_reward(self.vae, latents.to(self.device))
        return self.reward_set.weighted(self.reward_set.scores(images, list(prompts))).float()

    @torch.no_grad()
    def rollout(self, batch: dict, step: int) -> Rollout:
        s = self.cfg.sdpo
        emb = batch["prompt_embeds"].to(self.device)
        pooled = batch["pooled_prompt_embeds"].to(self.device)
        prompts = list(batch["caption"])
        b = emb.shape[0]
        noise = self._randn((b, *self.shards.latent_shape))
        emb2, pooled2 = torch.cat([emb, emb]), torch.cat([pooled, pooled])
        traj = sde.sde_sample(lambda x, sig: self.velocity(x, sig, emb2, pooled2), torch.cat([noise, noise]),
                              self.sampling_sigmas().to(self.device), s.noise_level, self._randn)
        anchor, c_first, c_anchor, c_last = anchor_similarities(traj.x0_preds)
        idx = torch.arange(2 * b, device=self.device)
        picks = torch.cat([traj.x0_preds[:, 0], traj.x0_preds[idx, anchor], traj.x0_preds[:, -1]])
        r = self.score(picks, prompts * 6).view(3, 2 * b).T          # [2B, (first, anchor, last)]
        self.record_metric("reward_first", r[:, 0].mean())
        self.record_metric("reward_last", r[:, 2].mean())
        dense = dense_rewards(r, anchor, c_first, c_anchor, c_last)
        returns = discounted_returns(dense, s.gamma)
        adv = normalize(returns, dist.is_initialized() and self.world_size > 1)
        k = s.num_steps
        order = torch.stack([torch.randperm(k, generator=self.noise_rng) for _ in range(b)]).to(self.device)
        two = lambda t: t.view(2, b, *t.shape[1:])
        return Rollout(step // self.updates_per_rollout, two(traj.latents), two(traj.log_probs),
                       two(adv), order, emb, pooled)

    # -- the loss ------------------------------------------------------------------------------
    def loss_terms(self, net, batch, step):
        terms = super().loss_terms(net, batch, step)
        if net != "transformer":
            return terms
        s = self.cfg.sdpo
        slot = batch["sdpo_slot"]
        if "prompt_embeds" in batch:
            self._rollouts[slot] = self.rollout(batch, step)
        ro = self._rollouts[slot]
        pos = step % self.updates_per_rollout
        cols = ro.order[:, pos * s.timesteps_per_update:(pos + 1) * s.timesteps_per_update]   # [B, T]
        b, t = cols.shape
        rows = torch.arange(b, device=self.device)[:, None].expand(b, t)
        pick = lambda x, c: x[:, rows, c].flatten(0, 2)          # [2, B, K, ...] -> [2 B T, ...]
        x, x_next = pick(ro.latents, cols), pick(ro.latents, cols + 1)
        old, adv = pick(ro.log_probs, cols), pick(ro.advantages, cols)
        sigmas = self.sampling_sigmas().to(self.device)
        k_flat = cols.flatten().repeat(2)
        sig, sig_next = sigmas[k_flat], sigmas[k_flat + 1]
        emb = ro.embeds[:, None].expand(b, t, *ro.embeds.shape[1:]).flatten(0, 1).repeat(2, 1, 1)
        pooled = ro.pooled[:, None].expand(b, t, -1).flatten(0, 1).repeat(2, 1)
        v = self.velocity(x, sig, emb, pooled)
        _, lp, _, _ = sde.sde_step(x, v, sig, sig_next, s.noise_level, float(sigmas[1]), x_next=x_next)
        lp1, lp2 = lp.chunk(2)
        old1, old2 = old.chunk(2)
        adv1, adv2 = adv.chunk(2)
        weight = (s.lam ** cols.flatten().float()) / s.log_scale
        loss, clipfrac = sdpo_loss(lp1, lp2, old1, old2, adv1, adv2, weight, s.adv_clip_max, s.clip_range)
        terms["sdpo"] = loss
        self.record_metric("clipfrac", clipfrac)
        return terms
