"""Flow-matching fine-tuning of the SD3 MMDiT (Esser et al. 2024; diffusers
`examples/dreambooth/train_dreambooth_sd3.py`): sigma from the configured density with SD3's
shift, x_t = (1 - sigma) x0 + sigma eps, loss = w(sigma) ||v_pred - (eps - x0)||^2."""
from __future__ import annotations

import torch

from megadiff import flow
from megadiff.objectives.base import NetSpec, Objective


class FlowMatching(Objective):
    def networks(self):
        return super().networks() | {"transformer": NetSpec(trainable=True)}

    def steps_this_iteration(self, step):
        return super().steps_this_iteration(step) + ["transformer"]

    def loss_terms(self, net, batch, step):
        terms = super().loss_terms(net, batch, step)
        if net != "transformer":
            return terms
        fc = self.cfg.flow
        x0 = batch["latents"].float()
        eps = torch.randn(x0.shape, generator=self.noise_rng).to(x0.device)
        sigma = flow.sample_sigmas(x0.shape[0], fc.timestep_sampling, self.noise_rng,
                                   logit_mean=fc.logit_mean, logit_std=fc.logit_std,
                                   mode_scale=fc.mode_scale, shift=fc.shift).to(x0.device)
        v_pred = self.forward_net(net, flow.add_noise(x0, eps, sigma), sigma, batch)
        terms["flow"] = flow.flow_matching_loss(v_pred, x0, eps, sigma, fc.loss_weighting)
        return terms
