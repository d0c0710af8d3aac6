"""Distribution matching distillation of an SD3/SD3.5 teacher into a 1-4 step generator.

Networks: `generator` (trainable, the teacher's MMDiT, full-rank or a LoRA "gen" adapter),
`fake_score` (trainable, the teacher's MMDiT, full-rank or a LoRA "gui" adapter, optionally with
a discriminator head: `megadiff.objectives.gan`), `teacher` (frozen real score; a ZeRO-3
partitioned inference engine under stage 3). With `dmd.real_score=fake_base` there is no
separate teacher: the real score is the LoRA fake score's frozen base with its "gui" adapter
scaled from `real_adapter_scale[0]` to `[1]` (DMDR's "dynamic distribution guidance", below).

Notation (DESIGN.md section 4): x = G's x0, sigma re-noising level, x_s = (1 - s) x + s eps,
x0_hat(x_s) = x_s - s v(x_s, s); CFG: v = v_u + w (v_c - v_u).

DMD2 (Yin et al. 2024; tianweiy/DMD2 `main/sd_guidance.py`,
`compute_distribution_matching_loss`): s ~ U[0.02, 0.98] (optionally SD3-shifted),
    p_real = x - x0_hat_real(x_s; CFG w),  p_fake = x - x0_hat_fake(x_s),
    grad = (p_real - p_fake) / mean|p_real|   (per sample),
    L_G = 0.5 ||x - sg(x - grad)||^2,
whose gradient in x is grad / N: descent moves x towards x0_real - x0_fake.

Decoupled DMD (Liu et al. 2025, arXiv 2511.22677, eq. 8; AaronCaoZJ/DMDs
`main/decoupled_guidance.py`, `compute_decoupled_loss`): the CFG-augmentation (CA) and
distribution-matching (DM) parts of DMD2's gradient at their own noise levels,
    CA = (w - 1)(x0_hat_real_c(x_ca) - x0_hat_real_u(x_ca)) / mean|x0_hat_real_c(x_ca) - x|,
    DM = (x0_hat_real_c(x_dm) - x0_hat_fake(x_dm)) / mean|x0_hat_real_c(x_dm) - x|,
    L = ||x - sg(x + CA)||^2 + ||x - sg(x + DM)||^2.
Schedules, the paper's "Decoupled-Hybrid" (its best, sec. 4.3): s_dm over the whole range;
s_ca only cleaner than the generator's input level (paper: tau_CA > t with t = 0 noise; here
sigma_ca < sigma_in), `dmd.ca_schedule=full` for "Decoupled-Full".

f-divergence DM (f-distill, Xu et al. 2025, arXiv 2502.15681; the DMDs fork's
`compute_f_divergence_weight`): the DM gradient of D_f is the score difference weighted by
h(r) = f''(r) r^2 with r = p_real / p_fake at the re-noised sample, estimated as
r = exp(D(x_s, s)) by the discriminator head (the optimum of its logistic loss):
    reverse-KL h = 1 (plain DMD), forward-KL h = r, Jensen-Shannon h = r / (1 + r) = sigmoid(D).
h is a stop-gradient weight. Normalisation (`dmd.fdiv_normalization`):
  - "timestep" (default): h varies by orders of magnitude across noise levels (near 1 for
    every sample at high noise, spread out at low noise), so it is normalised per noise level:
    every sample of a micro-step, on every rank, is re-noised to one shared level s, and
    h_i <- h_i / mean_j h_j over that global micro-batch, an estimate of E_x[h(r_s(x))]. The
    second stage of the two-stage scheme (normalising by the batch mean) then holds by
    construction (the mean is 1). The fork leaves this stage as a TODO and uses per-sample
    levels with one batch mean (mixing levels).
  - "batch": per-sample levels, h divided by its global batch mean (the fork's behaviour).
  - "none": raw h.

Two-time-scale updates (DMD2 `main/train_sd.py`, `train_one_step`): every iteration the fake
score steps; every `update_ratio`-th iteration (step % ratio == 0) the generator steps first.
The fake score learns flow matching on sg(x) from the current generator, plus the GAN
discriminator term when enabled.

Stop-gradients: the teacher and the DM fake-score evaluation run under no_grad; the GAN
generator term back-propagates through the fake score with its parameters' requires_grad off
(called on the module, not the engine, so the fake engine's backward hooks stay out of the
generator's backward): no gradient reaches the teacher or the fake score from L_G
(tests/test_dmd_engine.py checks it under ZeRO-3).

Rank-shared choices (backward-simulation depth, CFG jitter, the shared f-div level) come from
a generator seeded by (seed, step, call), so every rank runs the same forward passes (ZeRO-3
gathers parameters collectively) and a resumed run draws the same values.

Cold start (DMDR): `in_cold_start(step)` is true for the first `dmd.cold_start_steps` steps;
objectives composed after `dmd` (e.g. a reward term) add their terms to the generator's loss
(through `generator_x0_terms`) only when it is false. `dmd.after_cold_start_lr` switches a
network's learning rate at that step (DMDR resumes its reward phase with other learning rates).

DMDR (Jiang et al. 2025; vvvvvjdy/dmdr at d1f2436, `train_t2i/sd3/train_sd3_refl_deepspeed.py`,
`utils.py`), with its step p = global_step / dynamic_step counted in generator steps there and in
iterations here (`dmd.real_adapter_decay_steps` = DMDR's dynamic_step x update_ratio):
  - dynamic distribution guidance (train script lines 649-653): the real score is the fake
    score's network with the gui adapter at scale lora_scale_r * 0.5 (1 + cos(pi p)) for
    p < 1, then 0 (the frozen base = the teacher); here
    scale = end + (start - end) * 0.5 (1 + cos(pi min(p, 1))), `real_adapter_scale = [start, end]`;
  - the fake score runs its gui adapter at `lora_scale_f` (2.0) when it trains and when it
    scores (`joint_attention_kwargs=scale_dict_f`, line 272): `dmd.fake_adapter_scale`;
  - dynamic re-noising (`utils.py` line 58, `sample_continue`, s_type "logit_normal"): the DM
    re-noising level and the fake score's flow-matching level are t ~ Beta(a', b') with
    a' = 1 + (a - 1) c, b' = 1 + (b - 1) c, c = 0.5 (1 + cos(pi min(p, 1))), from (4, 1.5) to
    the uniform Beta(1, 1): `dmd.renoise_beta = [a, b]` (sigma_min/max and the shift then do
    not apply, as in DMDR);
  - the generator's input (`samplers.py`, `v2x0_sampler`): a whole few-step trajectory, ODE or
    SDE (`dmd.generator.sample_type`, megadiff/generator.py), at a uniformly drawn grid level.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megadiff import flow
from megadiff import generator as gen
from megadiff.config import DMDConfig
from megadiff.objectives import gan
from megadiff.models import lora as lora_mod
from megadiff.objectives.base import NetSpec, Objective

GEN_ADAPTER, FAKE_ADAPTER = "gen", "gui"


# ---- the loss math (pure functions, unit-tested against hand computations) ---------------

def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def per_sample_mean_abs(t: torch.Tensor) -> torch.Tensor:
    return t.abs().mean(dim=tuple(range(1, t.dim())), keepdim=True)


def dmd2_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """grad = (p_real - p_fake) / mean|p_real| per sample, p = x - x0_hat (DMD2)."""
    p_real, p_fake = x - x0_real, x - x0_fake
    return torch.nan_to_num((p_real - p_fake) / per_sample_mean_abs(p_real))


def dm_loss(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 mean (x - sg(x - h grad))^2; d/dx = h grad / N."""
    if weight is not None:
        grad = _bcast(weight, grad) * grad
    return 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())


def ddmd_updates(x: torch.Tensor, x0_ca_cond: torch.Tensor, x0_ca_uncond: torch.Tensor,
                 x0_dm_real: torch.Tensor, x0_dm_fake: torch.Tensor, guidance_scale,
                 eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled DMD's CA and DM update vectors, each normalised by its own mean|x0_real_c - x|."""
    w = torch.as_tensor(guidance_scale, dtype=x.dtype, device=x.device)
    w = _bcast(w, x) if w.dim() else w
    ca = (w - 1) * (x0_ca_cond - x0_ca_uncond) / (per_sample_mean_abs(x0_ca_cond - x) + eps)
    dm = (x0_dm_real - x0_dm_fake) / (per_sample_mean_abs(x0_dm_real - x) + eps)
    return ca, dm


def pull_loss(x: torch.Tensor, update: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean (x - sg(x + h update))^2; d/dx = -2 h update / N (descent moves x along update)."""
    if weight is not None:
        update = _bcast(weight, update) * update
    return F.mse_loss(x.float(), (x + update).detach().float())


def fdiv_weight(logits: torch.Tensor, divergence: str, clamp: float = 10.0) -> torch.Tensor:
    """h(r) = f''(r) r^2 at r = exp(logit): reverse-KL 1, forward-KL r, JS r / (1 + r)."""
    d = logits.detach().float().clamp(-clamp, clamp)
    if divergence == "reverse_kl":
        return torch.ones_like(d)
    if divergence == "forward_kl":
        return torch.exp(d)
    if divergence == "js":
        return torch.sigmoid(d)
    raise ValueError(f"dmd.divergence={divergence!r} is unknown: use reverse_kl, forward_kl or js")


def normalize_weights(h: torch.Tensor, mode: str, all_reduce: bool = False) -> torch.Tensor:
    """h / mean(h) over the micro-batch (on every rank when `all_reduce`), or h for "none"."""
    if mode == "none":
        return h
    stats = torch.stack([h.sum(), torch.tensor(float(h.numel()), device=h.device)]).double()
    if all_reduce:
        dist.all_reduce(stats)
    return h / (stats[0] / stats[1]).to(h.dtype)


def unshift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of `flow.shift_sigma`."""
    return s / (shift - (shift - 1) * s)


def sample_dm_sigmas(u: torch.Tensor, lo: float, hi: float, shift: float) -> torch.Tensor:
    """u ~ U[0, 1) -> shift_sigma(lo + (hi - lo) u)."""
    return flow.shift_sigma(lo + (hi - lo) * u, shift)


def sample_ca_sigmas(u: torch.Tensor, sigma_in: torch.Tensor, lo: float, hi: float, shift: float,
                     schedule: str) -> torch.Tensor:
    """Decoupled-Hybrid CA levels: cleaner than the generator input sigma_in, i.e. in
    [lo, min(sigma_in, hi)) before the shift (or the full range for `schedule="full"`)."""
    if schedule == "full":
        return sample_dm_sigmas(u, lo, hi, shift)
    top = torch.minimum(unshift_sigma(sigma_in.float(), shift), torch.full_like(u, hi))
    top = torch.maximum(top, torch.full_like(u, lo))
    return flow.shift_sigma(lo + (top - lo) * u, shift)


class FreezeUntilBackward:
    """requires_grad off for every parameter of `module` from now until the gradient of the
    tensor `watch()` returns has been computed (DMD2 wraps the generator's loss in
    `guidance_model.requires_grad_(False)`). Autograd records parameter edges when the graph is
    built, but non-reentrant activation checkpointing rebuilds block graphs during backward:
    the flags must still be off then, or the recomputed graph differs (and would feed the fake
    score's gradient hooks). The module's input is the last thing its backward reaches, so a
    hook on it restores the flags; `restore()` is idempotent (a safety net before the module's
    own step)."""

    def __init__(self, module: torch.nn.Module, on_restore=None):
        self.flags = [(p, p.requires_grad) for p in module.parameters()]
        self.on_restore = on_restore
        for p, _ in self.flags:
            p.requires_grad_(False)

    def watch(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x.register_hook(self._on_grad)
        else:
            self.restore()
        return x

    def _on_grad(self, grad):
        self.restore()
        return grad

    def restore(self) -> None:
        for p, f in self.flags:
            p.requires_grad_(f)
        self.flags = []
        if self.on_restore is not None:
            self.on_restore()


def cosine_factor(step: int, span: int) -> float:
    """0.5 (1 + cos(pi min(step / span, 1))): 1 at step 0, 0 from `span` on (DMDR's decay)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step / span, 1.0)))


def dynamic_beta(ab: tuple[float, float], step: int, span: int) -> tuple[float, float]:
    """DMDR `sample_continue`: Beta(a, b) relaxed to Beta(1, 1) by the cosine factor."""
    c = cosine_factor(step, span)
    return 1.0 + (ab[0] - 1.0) * c, 1.0 + (ab[1] - 1.0) * c


def add_dmd_adapter(module: torch.nn.Module, d: DMDConfig, net: str, seed: int = 0) -> str | None:
    """Put the LoRA adapter `dmd.lora.<net>` asks for on `module` (generator: "gen", fake score:
    "gui" at `dmd.fake_adapter_scale`), trainable alone; returns its name (None: full rank)."""
    lc = d.lora_for(net)
    if lc is None:
        return None
    adapter = GEN_ADAPTER if net == "generator" else FAKE_ADAPTER
    module.requires_grad_(False)
    lora_mod.add_lora(module, lc.rank, lc.alpha, adapter, lc.dropout, lc.targets, seed=seed)
    if net == "fake_score" and d.fake_adapter_scale != 1.0:
        scale_adapter_in_place(module, FAKE_ADAPTER, d.fake_adapter_scale)
    return adapter


def scale_adapter_in_place(module: torch.nn.Module, name: str, factor: float) -> None:
    """Multiply adapter `name`'s LoRA scaling by `factor` for good (no parameter changes)."""
    for layer in lora_mod.lora_layers(module):
        if name in getattr(layer, "scaling", {}):
            layer.scaling[name] = layer.scaling[name] * float(factor)


def release_zero3_leftovers(engine) -> None:
    """ZeRO-3 re-gathers a module's parameters in backward and releases them in post-backward
    hooks that only fire for modules whose inputs need grad; the engine's own backward epilogue
    then releases the rest (`release_backward_leftovers`). When another engine's backward runs
    through this module, that epilogue never runs: call it here. A no-op below stage 3."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is not None and hasattr(offload, "release_backward_leftovers"):
        offload.release_backward_leftovers()


# ---- the objective ----------------------------------------------------------------------

class DMD(Objective):
    def networks(self):
        nets = {"generator": NetSpec(trainable=True), "fake_score": NetSpec(trainable=True)}
        if self.cfg.dmd.real_score == "teacher":
            nets["teacher"] = NetSpec(trainable=False)
        return super().networks() | nets

    def steps_this_iteration(self, step):
        nets = super().steps_this_iteration(step)
        if step % self.cfg.dmd.update_ratio == 0:
            nets = nets + ["generator"]
        return nets + ["fake_score"]

    def in_cold_start(self, step: int) -> bool:
        """DMDR's cold start: DMD alone for the first `dmd.cold_start_steps` steps."""
        return step < self.cfg.dmd.cold_start_steps

    # -- construction ------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        super()._check_inputs()
        d, tc = self.cfg.dmd, self.transformer_config
        if self.shards is not None:     # the real score's CFG uses an empty prompt encoded at this length
            want = 77 + self.cfg.model.max_sequence_length
            if self.shards.text_seq_len and self.shards.text_seq_len != want:
                raise ValueError(f"the shards' prompt embeddings have {self.shards.text_seq_len} tokens but "
                                 f"model.max_sequence_length={self.cfg.model.max_sequence_length} gives {want} "
                                 f"for the empty prompt of CFG: set model.max_sequence_length="
                                 f"{self.shards.text_seq_len - 77}")
        if d.gan.enabled:
            block = gan.default_block(tc["num_layers"]) if d.gan.block is None else d.gan.block
            if not 0 <= block < tc["num_layers"]:
                raise ValueError(f"dmd.gan.block={block} does not exist: the transformer has "
                                 f"{tc['num_layers']} blocks (0..{tc['num_layers'] - 1})")
            if self.shards is not None:
                side = min(self.shards.latent_shape[1:]) // tc["patch_size"]
                if side < 4:
                    raise ValueError(f"latents of {self.shards.latent_shape[1:]} give a {side}-token "
                                     "grid; the discriminator head needs at least 4x4 tokens")

    def build_network(self, name, spec):
        module = super().build_network(name, spec)
        if name not in ("generator", "fake_score"):
            return module
        d, seed = self.cfg.dmd, self.cfg.seed
        add_dmd_adapter(module, d, name, seed=seed * 7919 + (1 if name == "generator" else 2))
        if name == "fake_score" and d.gan.enabled:
            block = gan.default_block(module.config.num_layers) if d.gan.block is None else d.gan.block
            with torch.random.fork_rng(devices=[]):     # the same head on every rank
                torch.random.default_generator.manual_seed(seed * 7919 + 3)   # CPU only: GPU streams stay per rank
                module = gan.ScoreWithHead(module, block, d.gan.head_channels)
        return module

    # -- pieces --------------------------------------------------------------------------------
    def _shared_rng(self, step: int, tag: str) -> torch.Generator:
        """A generator every rank seeds alike, fresh for each (step, tag, call)."""
        if getattr(self, "_dmd_calls_step", None) != step:
            self._dmd_calls, self._dmd_calls_step = {}, step
        n = self._dmd_calls.get(tag, 0)
        self._dmd_calls[tag] = n + 1
        return torch.Generator().manual_seed(zlib.crc32(f"{self.cfg.seed}:{step}:{tag}:{n}".encode()))

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.noise_rng).to(self.device)

    def _rand(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.noise_rng).to(self.device)

    def gen_sigmas(self) -> torch.Tensor:
        g = self.cfg.dmd.generator
        shift = self.cfg.flow.shift if g.shift is None else g.shift
        return gen.conditioning_sigmas(g.num_steps, shift, g.sigmas)

    def _velocity(self, module, x, sigma, emb, pooled, discriminate: bool = False):
        dt = self.compute_dtype
        kw = dict(hidden_states=x.to(self.device, dt), encoder_hidden_states=emb.to(self.device, dt),
                  pooled_projections=pooled.to(self.device, dt),
                  timestep=(sigma * flow.NUM_TRAIN_TIMESTEPS).to(self.device, torch.float32),
                  return_dict=False)
        if discriminate:
            v, logits = module(**kw, discriminate=True)
            return v.float(), logits.float()
        return module(**kw)[0].float()

    def _gen_fn(self):
        engine = self.engines["generator"]
        return lambda x, s, emb, pooled: self._velocity(engine, x, s, emb, pooled)

    def _fake_module(self):
        """The fake score's module, bypassing the engine's forward (and so the output hooks that
        would run the fake engine's backward prologue inside the generator's backward)."""
        return self.engines["fake_score"].module

    def _uncond(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.val_embeds
        emb = batch["prompt_embeds"]
        if e["neg_embeds"].shape[1:] != emb.shape[1:]:
            raise ValueError(f"the empty-prompt embedding has shape {tuple(e['neg_embeds'].shape[1:])} "
                             f"but the shards' prompt_embeds {tuple(emb.shape[1:])}: set "
                             f"model.max_sequence_length={emb.shape[1] - 77} (the T5 length the shards "
                             "were built with)")
        b = emb.shape[0]
        return (e["neg_embeds"].to(self.device).expand(b, -1, -1),
                e["neg_pooled"].to(self.device).expand(b, -1))

    def _guidance_scale(self, step: int) -> float:
        d = self.cfg.dmd
        if not d.guidance_jitter:
            return d.real_guidance_scale
        u = float(torch.rand(1, generator=self._shared_rng(step, "cfg")))
        return d.real_guidance_scale + d.guidance_jitter * (2 * u - 1)

    def real_adapter_scale(self, step: int) -> float:
        """DMDR's dynamic distribution guidance: the gui scale of the real score at `step`."""
        d = self.cfg.dmd
        start, end = d.real_adapter_scale
        return end + (start - end) * cosine_factor(step, d.real_adapter_decay_steps)

    @torch.no_grad()
    def _real_velocity(self, x, sigma, emb, pooled, step: int) -> torch.Tensor:
        if self.cfg.dmd.real_score == "teacher":
            return self._velocity(self.frozen["teacher"], x, sigma, emb, pooled)
        from megadiff.models.lora import adapter_scale

        module = self._fake_module()      # its gui scaling already holds fake_adapter_scale
        factor = self.real_adapter_scale(step) / self.cfg.dmd.fake_adapter_scale
        with adapter_scale(module, {FAKE_ADAPTER: factor}):
            return self._velocity(module, x, sigma, emb, pooled)

    def _generator_input(self, batch: dict, step: int, tag: str):
        """(x, sigma_in): the generator's input at a schedule step all ranks agree on."""
        sig = self.gen_sigmas().to(self.device)
        emb, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        shape = (emb.shape[0], *self._latent_shape(batch))
        k = int(torch.randint(len(sig), (1,), generator=self._shared_rng(step, tag))) if len(sig) > 1 else 0
        noise = self._randn(shape)
        if k == 0:
            x = noise
        elif self.cfg.dmd.generator.sample_type == "ode":
            x = gen.ode_input(self._gen_fn(), noise, sig, k, emb, pooled, self._randn)
        elif self.cfg.dmd.generator.backward_simulation:
            x = gen.simulate_input(self._gen_fn(), noise, sig, k, emb, pooled, self._randn)
        else:
            x = gen.data_input(batch["latents"].to(self.device), noise, sig, k)
        return x, sig[k].expand(shape[0])

    def _latent_shape(self, batch: dict) -> tuple[int, int, int]:
        if "latents" in batch:
            return tuple(batch["latents"].shape[1:])
        return tuple(self.shards.latent_shape)

    def _gan_sigmas(self, n: int) -> torch.Tensor:
        smax = self.cfg.dmd.gan.sigma_max
        return torch.zeros(n, device=self.device) if smax == 0 else smax * self._rand(n)

    # -- losses --------------------------------------------------------------------------------
    def loss_terms(self, net, batch, step):
        terms = super().loss_terms(net, batch, step)
        if net == "generator":
            terms |= self.generator_terms(batch, step)
        elif net == "fake_score":
            terms |= self.fake_score_terms(batch, step)
        owner = self._term_owner = getattr(self, "_term_owner", {})
        owner.update((k, net) for k in terms)
        return terms

    def _beta_sigmas(self, n: int, step: int) -> torch.Tensor:
        """DMDR's dynamic re-noising levels, Beta(a', b') (see the module docstring)."""
        d = self.cfg.dmd
        a, b = dynamic_beta(d.renoise_beta, step, d.real_adapter_decay_steps)
        # torch's Beta sampler only reads the global RNG, which the data loader also draws from
        # (differently after a resume): seed it from this run's own noise stream instead.
        seed = int(torch.randint(2**62, (1,), generator=self.noise_rng))
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return torch.distributions.Beta(a, b).sample((n,)).clamp(1e-4, 1.0).to(self.device)

    def _dm_sigmas(self, n: int, step: int, tag: str) -> torch.Tensor:
        d = self.cfg.dmd
        if d.renoise_beta is not None:
            return self._beta_sigmas(n, step)
        if d.divergence != "reverse_kl" and d.fdiv_normalization == "timestep":
            u = torch.rand(1, generator=self._shared_rng(step, tag)).to(self.device).expand(n)
        else:
            u = self._rand(n)
        return sample_dm_sigmas(u, d.sigma_min, d.sigma_max, d.timestep_shift)

    def _fdiv_weights(self, logits: torch.Tensor | None) -> torch.Tensor | None:
        d = self.cfg.dmd
        if d.divergence == "reverse_kl" or logits is None:
            return None
        h = fdiv_weight(logits, d.divergence, d.fdiv_logit_clamp)
        return normalize_weights(h, d.fdiv_normalization, dist.is_initialized() and self.world_size > 1)

    def generator_terms(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        d = self.cfg.dmd
        emb, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        x_in, s_in = self._generator_input(batch, step, "generator")
        x = gen.generator_x0(self._gen_fn(), x_in, s_in, emb, pooled)       # with gradient
        with torch.no_grad():
            updates = (self._dmd2_update(x.detach(), batch, step) if d.loss == "dmd2"
                       else self._ddmd_update(x.detach(), s_in, batch, step))
        terms = self.generator_x0_terms(x, batch, step)
        if d.loss == "dmd2":
            grad, h = updates
            terms["dm"] = d.dm_weight * dm_loss(x, grad, h)
        else:
            ca, dm, h = updates
            terms["ca"] = d.ca_weight * pull_loss(x, ca)
            terms["dm"] = d.dm_weight * pull_loss(x, dm, h)
        if d.gan.enabled:
            fake = self._fake_module()
            sg = self._gan_sigmas(x.shape[0])
            xg = flow.add_noise(x, self._randn(x.shape), sg)
            engine = self.engines["fake_score"]
            self._restore_fake()        # a skipped (non-finite) micro-batch never ran its backward
            self._fake_frozen = FreezeUntilBackward(fake, lambda: release_zero3_leftovers(engine))
            _, logits = self._velocity(fake, self._fake_frozen.watch(xg), sg, emb, pooled, discriminate=True)
            terms["gan_g"] = d.gan.gen_weight * gan.gan_generator_loss(logits)
        return terms

    def generator_x0_terms(self, x: torch.Tensor, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """Extra generator loss terms on its x0 (with gradient): objectives composed after dmd
        (ReFL, SRPO) extend this through super()."""
        return {}

    def _restore_fake(self) -> None:
        """Undo a pending `FreezeUntilBackward` (normally its backward hook already has)."""
        if getattr(self, "_fake_frozen", None) is not None:
            self._fake_frozen.restore()
            self._fake_frozen = None

    def _fake_x0(self, x_t, sigma, emb, pooled):
        """Fake score's x0 at x_t (and its discriminator logits when f-div weighting needs them)."""
        need = self.cfg.dmd.divergence != "reverse_kl"
        out = self._velocity(self._fake_module(), x_t, sigma, emb, pooled, discriminate=need)
        v, logits = out if need else (out, None)
        return flow.predict_x0(x_t, sigma, v), logits

    def _dmd2_update(self, x, batch, step):
        emb, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        neg, neg_pooled = self._uncond(batch)
        b = x.shape[0]
        s = self._dm_sigmas(b, step, "dm_sigma")
        x_t = flow.add_noise(x, self._randn(x.shape), s)
        w = self._guidance_scale(step)
        if w == 1.0:
            v_real = self._real_velocity(x_t, s, emb, pooled, step)
        else:
            v = self._real_velocity(torch.cat([x_t, x_t]), torch.cat([s, s]), torch.cat([neg, emb]),
                                    torch.cat([neg_pooled, pooled]), step)
            v_u, v_c = v.chunk(2)
            v_real = v_u + w * (v_c - v_u)
        x0_real = flow.predict_x0(x_t, s, v_real)
        x0_fake, logits = self._fake_x0(x_t, s, emb, pooled)
        return dmd2_gradient(x, x0_real, x0_fake), self._fdiv_weights(logits)

    def _ddmd_update(self, x, s_in, batch, step):
        d = self.cfg.dmd
        emb, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        neg, neg_pooled = self._uncond(batch)
        b = x.shape[0]
        s_ca = sample_ca_sigmas(self._rand(b), s_in, d.sigma_min, d.sigma_max, d.timestep_shift,
                                d.ca_schedule)
        s_dm = self._dm_sigmas(b, step, "dm_sigma")
        x_ca = flow.add_noise(x, self._randn(x.shape), s_ca)
        x_dm = flow.add_noise(x, self._randn(x.shape), s_dm)
        v = self._real_velocity(torch.cat([x_ca, x_ca, x_dm]), torch.cat([s_ca, s_ca, s_dm]),
                                torch.cat([neg, emb, emb]), torch.cat([neg_pooled, pooled, pooled]), step)
        v_ca_u, v_ca_c, v_dm_r = v.chunk(3)
        x0_dm_fake, logits = self._fake_x0(x_dm, s_dm, emb, pooled)
        ca, dm = ddmd_updates(x, flow.predict_x0(x_ca, s_ca, v_ca_c), flow.predict_x0(x_ca, s_ca, v_ca_u),
                              flow.predict_x0(x_dm, s_dm, v_dm_r), x0_dm_fake, self._guidance_scale(step))
        return ca, dm, self._fdiv_weights(logits)

    def fake_score_terms(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        d, fc = self.cfg.dmd, self.cfg.flow
        self._restore_fake()
        emb, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        with torch.no_grad():
            x_in, s_in = self._generator_input(batch, step, "fake_score")
            x = gen.generator_x0(self._gen_fn(), x_in, s_in, emb, pooled)
        b = x.shape[0]
        eps = self._randn(x.shape)
        if d.renoise_beta is not None:   # DMDR trains the fake score at the same dynamic levels
            s = self._beta_sigmas(b, step)
        else:
            s = flow.sample_sigmas(b, fc.timestep_sampling, self.noise_rng, logit_mean=fc.logit_mean,
                                   logit_std=fc.logit_std, mode_scale=fc.mode_scale,
                                   shift=fc.shift).to(self.device)
        x_t = flow.add_noise(x, eps, s)
        engine = self.engines["fake_score"]
        if not d.gan.enabled:
            v = self._velocity(engine, x_t, s, emb, pooled)
            return {"fake_flow": flow.flow_matching_loss(v, x, eps, s, fc.loss_weighting)}
        # One pass over [x_t | fake | real]: flow matching on the first third, the
        # discriminator on the rest (real = the shards' cached latents, same captions).
        real = batch["latents"].to(self.device).float()
        s_fake, s_real = self._gan_sigmas(b), self._gan_sigmas(b)
        xg_fake = flow.add_noise(x, self._randn(x.shape), s_fake)
        xg_real = flow.add_noise(real, self._randn(real.shape), s_real)
        v, logits = self._velocity(engine, torch.cat([x_t, xg_fake, xg_real]), torch.cat([s, s_fake, s_real]),
                                   torch.cat([emb, emb, emb]), torch.cat([pooled, pooled, pooled]),
                                   discriminate=True)
        return {"fake_flow": flow.flow_matching_loss(v[:b], x, eps, s, fc.loss_weighting),
                "gan_d": d.gan.disc_weight * gan.gan_discriminator_loss(logits[b:2 * b], logits[2 * b:])}

    # -- DMDR run layout: LoRA weights beside the engine states, per-network loss logs ---------
    def build_extras(self) -> None:
        super().build_extras()
        for net, lr in self.cfg.dmd.after_cold_start_lr.items():
            self._switch_lr_after_cold_start(net, lr)

    def own_steps_before(self, net: str, step: int) -> int:
        """How many optimizer steps `net` has taken before iteration `step`."""
        ratio = self.cfg.dmd.update_ratio
        return -(-step // ratio) if net == "generator" else step

    def _switch_lr_after_cold_start(self, net: str, lr: float) -> None:
        """Scale `net`'s LR schedule by lr / optim lr from the first step after the cold start
        (the LambdaLR counts the network's own steps; lambdas are not in its state_dict, so a
        resumed run rebuilds the same schedule)."""
        sched = self.engines[net].lr_scheduler
        factor = lr / self.cfg.optim_for(net).lr
        first = self.own_steps_before(net, self.cfg.dmd.cold_start_steps)
        sched.lr_lambdas = [lambda n, f=f: f(n) * (factor if n >= first else 1.0) for f in sched.lr_lambdas]

    def fit(self) -> None:
        """DMDR's `loss_logs/loss_gen_log.jsonl` / `loss_gui_log.jsonl`: the generator's and the
        fake score's (guidance) terms, learning rates and gradient norms, per log interval."""
        owner = self._term_owner = getattr(self, "_term_owner", {})

        def keep_for(net):
            return lambda k: (k.endswith("/" + net) or
                              (k.startswith("loss/") and owner.get(k[5:]) == net))
        self.logger.add_split("loss_gen_log.jsonl", keep_for("generator"))
        self.logger.add_split("loss_gui_log.jsonl", keep_for("fake_score"))
        super().fit()

    def save(self) -> str:
        tag = super().save()
        if self.cfg.dmd.lora:
            self.save_lora(self.step)
        return tag

    def save_lora(self, step: int) -> None:
        """`checkpoints/lora_gen/step-N` and `lora_gui/step-N` (DMDR's layout): diffusers LoRA
        files (`pytorch_lora_weights.safetensors` with the adapter config as metadata) that
        `StableDiffusion3Pipeline.load_lora_weights` reads. ZeRO-3 partitions the adapters, so
        every rank joins the gather; rank 0 writes. The gui adapter is written at the scale the
        fake score runs it (`dmd.fake_adapter_scale` folded into lora_alpha)."""
        import shutil

        from deepspeed import zero
        from diffusers import StableDiffusion3Pipeline

        for net, adapter in (("generator", GEN_ADAPTER), ("fake_score", FAKE_ADAPTER)):
            if self.cfg.dmd.lora_for(net) is None:
                continue
            module = self.engines[net].module
            module = getattr(module, "transformer", module)       # a GAN head wraps the transformer
            params = [p for n, p in module.named_parameters() if f".{adapter}." in n and "lora_" in n]
            with zero.GatheredParameters(params, modifier_rank=None):
                state = {k: v.detach().float().cpu().clone()
                         for k, v in lora_mod.adapter_state_dict(module, adapter).items()}
            if self.rank != 0:
                continue
            meta = module.peft_config[adapter].to_dict()
            if net == "fake_score":
                meta["lora_alpha"] = meta["lora_alpha"] * self.cfg.dmd.fake_adapter_scale
            meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
            out = self.run.checkpoints / f"lora_{adapter}" / f"step-{step}"
            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=state,
                                                       transformer_lora_adapter_metadata=meta)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
            if self.cfg.train.keep_last:       # keep the LoRA steps whose engine states are kept
                kept = {p.name for p in self.run.checkpoints.glob("step-*")}
                for old in out.parent.glob("step-*"):
                    if old.name not in kept and not old.name.endswith(".partial"):
                        shutil.rmtree(old, ignore_errors=True)

    # -- validation samples from the few-step generator ---------------------------------------
    def sample_latents(self, noise, embeds):
        if self.cfg.dmd.generator.sample_type == "ode":
            return gen.ode_sample(self._gen_fn(), noise.to(self.device), self.gen_sigmas().to(self.device),
                                  embeds["embeds"].to(self.device), embeds["pooled"].to(self.device))
        g = torch.Generator().manual_seed(self.cfg.validation.seed + 1)
        return gen.few_step_sample(self._gen_fn(), noise.to(self.device), self.gen_sigmas().to(self.device),
                                   embeds["embeds"].to(self.device), embeds["pooled"].to(self.device),
                                   lambda shape: torch.randn(shape, generator=g).to(self.device))
