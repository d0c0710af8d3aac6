"""Diffusion-DPO (Wallace et al. 2024, "Diffusion Model Alignment Using Direct Preference
Optimization"; SalesforceAIResearch/DiffusionDPO `train.py`), brought to rectified flow.

Networks: `transformer` (trainable) and `reference` (frozen copy of model.path; a ZeRO-3
partitioned inference engine under stage 3, so never a full extra replica per rank, and never
in a checkpoint). Data: `megadiff.pairs` shards (`megadiff data pairs`, or relabelled by a
reward model with `megadiff data label-pairs`).

Per pair, winner x_w and loser x_l share sigma and eps (DiffusionDPO: `timesteps.chunk(2)[0]
.repeat(2)`, `noise.chunk(2)[0].repeat(2)`); with x_t = (1 - sigma) x0 + sigma eps and the
velocity target v = eps - x0, for the model (theta) and the reference:

    e(x0)  = mean over elements ||v_pred(x_t) - v||^2
    d      = e(x_w) - e(x_l)                          (per sample)
    z      = -beta / 2 * (d_theta - d_ref)            (the implicit reward margin)
    L      = -mean_b logsigmoid(z_b)                  (logsigmoid per sample, then the mean;
                                                       diffusers #6702 took the mean first)

`label_w` (schema `megadiff.pairs`: 1.0 = latents_w preferred, 0.5 = a tie kept with
--keep-ties, 0.0 = latents_l preferred) enters as a soft label, conservative DPO
(Mitchell 2023, "A note on DPO with noisy preferences"):
    L = -mean_b [ p_b logsigmoid(z_b) + (1 - p_b) logsigmoid(-z_b) ],
which is exactly DiffusionDPO's loss for p = 1, flips the pair for p = 0, and pulls the margin
of a tie towards 0.

Logged (not back-propagated, `metric/*`): `dpo_acc` implicit accuracy (margin on the preferred
side, ties count 1/2), `dpo_margin` mean preferred-minus-other implicit reward (2p - 1) z,
`mse_model` / `mse_ref` mean flow errors over both images (DiffusionDPO logs the same).

SFT mode (`dpo.sft=true`, DiffusionDPO `--sft`): plain flow matching on the preferred images
only (latents_l when label_w = 0; ties are left out: weight 0); no reference is built.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from megadiff import flow
from megadiff.objectives.base import NetSpec, Objective


# ---- the loss math (pure functions, unit-tested against hand computations) ---------------

def per_sample_error(v_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension of (v_pred - target)^2, in fp32."""
    return (v_pred.float() - target.float()).pow(2).flatten(1).mean(1)


def dpo_margin(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor,
               ref_err_l: torch.Tensor, beta: float) -> torch.Tensor:
    """z = -beta / 2 * ((e_w - e_l) - (e_ref_w - e_ref_l)) per sample."""
    return -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))


def dpo_loss(z: torch.Tensor, label_w: torch.Tensor | None = None) -> torch.Tensor:
    """-mean_b [p logsigmoid(z) + (1 - p) logsigmoid(-z)] (p = 1: Diffusion-DPO's loss)."""
    if label_w is None:
        return -F.logsigmoid(z).mean()
    p = label_w.float().to(z.device)
    return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z)).mean()


def implicit_accuracy(z: torch.Tensor, label_w: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose margin favours the preferred image (ties count 1/2)."""
    p = label_w.float().to(z.device)
    right = torch.where(p > 0.5, (z > 0).float(), (z < 0).float())
    return torch.where(p == 0.5, torch.full_like(right, 0.5), right).mean()


def preferred_first(latents_w: torch.Tensor, latents_l: torch.Tensor,
                    label_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(preferred, other) latents: swapped where label_w < 0.5."""
    swap = (label_w.float() < 0.5).view(-1, *([1] * (latents_w.dim() - 1))).to(latents_w.device)
    return torch.where(swap, latents_l, latents_w), torch.where(swap, latents_w, latents_l)


# ---- the objective ----------------------------------------------------------------------

class DPO(Objective):
    def networks(self):
        nets = {"transformer": NetSpec(trainable=True)}
        if not self.cfg.dpo.sft:
            nets["reference"] = NetSpec(trainable=False)
        return super().networks() | nets

    def steps_this_iteration(self, step):
        return super().steps_this_iteration(step) + ["transformer"]

    def flops_per_iteration(self) -> float:
        """Forward + backward of both images, plus the reference's forward (a third of that)."""
        base = super().flops_per_iteration()
        return base if self.cfg.dpo.sft else base * 2 * (1 + 1 / 3)

    def _check_shards_fit_model(self) -> None:
        info = self.shards
        if info is None:
            return
        where = self.cfg.data.remote or self.cfg.data.local
        if info.schema != "megadiff.pairs":
            raise ValueError(f"shards in {where} are a {info.schema} set, but dpo trains on preference "
                             "pairs (megadiff.pairs): build them with `megadiff data pairs` (or "
                             "`megadiff data label-pairs`) and point data.local at them")
        self._check_shard_geometry(info, where)      # pairs have the training sets' geometry

    def _prepare_demo(self) -> None:
        """The tiny demo model plus synthetic pair shards in output_dir/demo."""
        from megadiff.objectives.preference_shards import write_demo_pairs

        super()._prepare_demo()
        pairs = self.run.root / "demo" / "pairs"
        if self.rank == 0 and not (pairs / "index.json").is_file():
            write_demo_pairs(pairs, self.cfg.model.path, self.cfg.demo.num_samples, self.cfg.seed)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        self.cfg.data.local, self.cfg.data.remote = str(pairs), None

    def loss_terms(self, net, batch, step):
        terms = super().loss_terms(net, batch, step)
        if net != "transformer":
            return terms
        fc, dc = self.cfg.flow, self.cfg.dpo
        label = batch["label_w"].float().view(-1).to(self.device)
        x_w, x_l = preferred_first(batch["latents_w"].float(), batch["latents_l"].float(), label)
        b = x_w.shape[0]
        eps = torch.randn(x_w.shape, generator=self.noise_rng).to(x_w.device)
        sigma = flow.sample_sigmas(b, fc.timestep_sampling, self.noise_rng, logit_mean=fc.logit_mean,
                                   logit_std=fc.logit_std, mode_scale=fc.mode_scale,
                                   shift=fc.shift).to(x_w.device)
        if dc.sft:
            keep = (label != 0.5).float()
            v_pred = self.forward_net(net, flow.add_noise(x_w, eps, sigma), sigma, batch)
            err = per_sample_error(v_pred, flow.velocity_target(x_w, eps))
            terms["sft"] = (keep * err).sum() / keep.sum().clamp(min=1)
            return terms
        # One forward over [winners | losers] with shared sigma and eps.
        x0 = torch.cat([x_w, x_l])
        eps2, sigma2 = torch.cat([eps, eps]), torch.cat([sigma, sigma])
        x_t, target = flow.add_noise(x0, eps2, sigma2), flow.velocity_target(x0, eps2)
        emb = torch.cat([batch["prompt_embeds"]] * 2)
        pooled = torch.cat([batch["pooled_prompt_embeds"]] * 2)
        err_w, err_l = per_sample_error(self.forward_net(net, x_t, sigma2, batch, emb, pooled), target).chunk(2)
        with torch.no_grad():
            ref = per_sample_error(self.forward_net("reference", x_t, sigma2, batch, emb, pooled), target)
        ref_w, ref_l = ref.chunk(2)
        z = dpo_margin(err_w, err_l, ref_w, ref_l, dc.beta)
        # latents are already in preferred-first order, so the label is now 1 or a tie
        p = torch.where(label == 0.5, label, torch.ones_like(label))
        terms["dpo"] = dpo_loss(z, p)
        zd = z.detach()
        self.record_metric("dpo_acc", implicit_accuracy(zd, p))
        self.record_metric("dpo_margin", ((2 * p - 1) * zd).mean())
        self.record_metric("mse_model", 0.5 * (err_w + err_l).detach().mean())
        self.record_metric("mse_ref", ref.mean())
        return terms
