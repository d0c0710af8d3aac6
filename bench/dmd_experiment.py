"""Bounded CPU experiment: does megadiff's DMD objective distil a teacher into a few-step
generator? (issue 4, "proof that it learns").

1. Teacher: a small class-conditional velocity MLP trained by flow matching (with 10% label
   dropout for CFG) on a synthetic 2-D "latent" distribution: class 0 = 4 Gaussians on a
   square, class 1 = 6 Gaussians on a ring.
2. Reference: the teacher's own many-step samples (Euler, 100 steps, CFG w) per class.
3. Students: generator and fake score both start as copies of the teacher; distilled to a
   1-step and a 4-step generator with DMD2 (DM + GAN), Decoupled DMD (CA + DM) and JS
   f-divergence DM (+ GAN), each for a fixed number of iterations.
4. Distance: MMD (RBF kernel, bandwidths 0.1/0.3/1) and sliced Wasserstein-1 (128
   projections) between student samples and the teacher reference, per class, averaged;
   the floor is the distance between two independent teacher sample sets.

The training step is megadiff's own: a `DMD` mixin subclass whose `loss_terms` and
`steps_this_iteration` run unchanged (`megadiff/objectives/dmd.py`: DMD2 gradient and
normalisation, Decoupled DMD's CA/DM terms and schedules, f-div weights with per-level
normalisation, GAN terms, backward simulation, the fake score frozen during the generator's
GAN term); only the networks are toy MLPs with plain Adam "engines" instead of DeepSpeed
engines around an MMDiT, so a run takes seconds. The GAN's "real" samples are teacher
samples (data-free distillation: the target distribution is the teacher's).

    python bench/dmd_experiment.py [--iters 2000] [--out runs/dmd_experiment]
writes results.json, results.md and samples.png there.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from megadiff import flow, sampling
from megadiff import generator as gen
from megadiff.config import load_config
from megadiff.objectives.dmd import DMD

NUM_CLASSES = 2
UNCOND = NUM_CLASSES            # the "empty prompt" token
EMB = NUM_CLASSES + 1


# ---- data -----------------------------------------------------------------------------------

def sample_data(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = labels.shape[0]
    square = torch.tensor([[1.5, 1.5], [1.5, -1.5], [-1.5, 1.5], [-1.5, -1.5]])
    angles = torch.arange(6) * (2 * math.pi / 6)
    ring = 2.0 * torch.stack([angles.cos(), angles.sin()], 1)
    k0 = torch.randint(4, (n,), generator=g)
    k1 = torch.randint(6, (n,), generator=g)
    centres = torch.where(labels[:, None] == 0, square[k0], ring[k1])
    std = torch.where(labels[:, None] == 0, 0.25, 0.2)
    return centres + std * torch.randn(n, 2, generator=g)


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.one_hot(labels, EMB).float()


# ---- networks: the SD3 transformer's call signature on a toy MLP ------------------------------

class ToyScore(nn.Module):
    """v(x, sigma, class) with SD3Transformer2DModel's keyword interface (timestep = 1000 sigma,
    pooled_projections = class one-hot); `discriminate=True` adds a logit from a head on the
    second hidden layer (the GAN head reads mid features, as on the MMDiT)."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.inp = nn.Linear(2 + 32 + EMB, width)
        self.mid = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.out = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))
        self.head = None
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100), 16)))

    def add_head(self, seed: int) -> "ToyScore":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            w = self.inp.out_features
            self.head = nn.Sequential(nn.Linear(w, 64), nn.SiLU(), nn.Linear(64, 1))
        return self

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                return_dict=False, discriminate=False):
        s = (timestep / flow.NUM_TRAIN_TIMESTEPS).float()[:, None]
        feats = torch.cat([torch.sin(s * self.freqs), torch.cos(s * self.freqs)], 1)
        h = self.mid(self.inp(torch.cat([hidden_states.float(), feats, pooled_projections.float()], 1)))
        v = self.out(h)
        if discriminate:
            return v, self.head(h).squeeze(1)
        return (v,)


class ToyEngine:
    """The DeepSpeed engine calls the trainer loop makes: forward, backward, step."""

    def __init__(self, module: nn.Module, lr: float, clip: float = 1.0):
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.0, 0.99))
        self.clip = clip

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


# ---- the teacher ----------------------------------------------------------------------------

def train_teacher(iters: int, seed: int) -> ToyScore:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ToyScore()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    for _ in range(iters):
        labels = torch.randint(NUM_CLASSES, (512,), generator=g)
        x0 = sample_data(labels, g)
        cond = torch.where(torch.rand(512, generator=g) < 0.1, UNCOND, labels)
        eps = torch.randn(x0.shape, generator=g)
        sigma = flow.sample_sigmas(512, "logit_normal", g)
        v = net(flow.add_noise(x0, eps, sigma), None, one_hot(cond), sigma * 1000)[0]
        loss = flow.flow_matching_loss(v, x0, eps, sigma)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


def cfg_velocity(net):
    """Adapts a ToyScore to `sampling.euler_sample`'s transformer call (CFG done by the sampler)."""
    def call(hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict=False):
        return net(hidden_states, None, pooled_projections, timestep)
    return call


@torch.no_grad()
def teacher_samples(teacher, labels: torch.Tensor, w: float, seed: int, steps: int = 100) -> torch.Tensor:
    noise = torch.randn(labels.shape[0], 2, generator=torch.Generator().manual_seed(seed))
    neg = one_hot(torch.full_like(labels, UNCOND))
    cond = one_hot(labels)
    return sampling.euler_sample(cfg_velocity(teacher), noise, cond[:, None], cond, steps, 1.0, w,
                                 neg[:, None], neg)


@torch.no_grad()
def student_samples(generator_net, labels, sigmas, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(labels.shape[0], 2, generator=g)
    fn = gen.transformer_velocity(generator_net)
    p = one_hot(labels)
    return gen.few_step_sample(fn, noise, sigmas, p[:, None], p, lambda shape: torch.randn(shape, generator=g))


# ---- distances ------------------------------------------------------------------------------

def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidths=(0.1, 0.3, 1.0)) -> float:
    """Unbiased squared MMD with a sum of RBF kernels."""
    def k(x, y):
        d = torch.cdist(x, y) ** 2
        return sum(torch.exp(-d / (2 * h * h)) for h in bandwidths)
    n, m = a.shape[0], b.shape[0]
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - kaa.diag().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diag().sum()) / (m * (m - 1))
                 - 2 * kab.mean())


def sliced_w1(a: torch.Tensor, b: torch.Tensor, projections: int = 128, seed: int = 0) -> float:
    dirs = torch.randn(projections, a.shape[1], generator=torch.Generator().manual_seed(seed))
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa, pb = (a @ dirs.T).sort(0).values, (b @ dirs.T).sort(0).values
    return float((pa - pb).abs().mean())


def distances(samples: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict:
    per = [(mmd2(samples[labels == c], reference[labels == c]), sliced_w1(samples[labels == c], reference[labels == c]))
           for c in range(NUM_CLASSES)]
    return {"mmd2": sum(p[0] for p in per) / NUM_CLASSES, "swd": sum(p[1] for p in per) / NUM_CLASSES}


# ---- distillation through megadiff's DMD mixin ---------------------------------------------

class ToyDMDTrainer(DMD):
    """The pieces of BaseTrainer that the DMD mixin reads, around toy networks."""

    def __init__(self, cfg, teacher: ToyScore, pool: tuple[torch.Tensor, torch.Tensor], lr_gen: float,
                 lr_fake: float):
        self.cfg, self.device, self.compute_dtype, self.world_size = cfg, torch.device("cpu"), torch.float32, 1
        self.noise_rng = torch.Generator().manual_seed(cfg.seed)
        self.data_rng = torch.Generator().manual_seed(cfg.seed + 1)
        self.step, self.shards = 0, None
        fake = copy.deepcopy(teacher).requires_grad_(True).train()
        if cfg.dmd.gan.enabled:
            fake.add_head(cfg.seed)
        self.engines = {"generator": ToyEngine(copy.deepcopy(teacher).requires_grad_(True).train(), lr_gen),
                        "fake_score": ToyEngine(fake, lr_fake)}
        self.frozen = {"teacher": teacher}
        neg = one_hot(torch.tensor([UNCOND]))
        self.val_embeds = {"neg_embeds": neg[:, None], "neg_pooled": neg}
        self.pool_x, self.pool_y = pool

    def next_batch(self, n: int = 256) -> dict:
        idx = torch.randint(self.pool_x.shape[0], (n,), generator=self.data_rng)
        p = one_hot(self.pool_y[idx])
        return {"latents": self.pool_x[idx], "prompt_embeds": p[:, None], "pooled_prompt_embeds": p}

    def fit(self, iters: int) -> dict:
        last = {}
        while self.step < iters:
            for net in self.steps_this_iteration(self.step):       # megadiff's schedule
                terms = self.loss_terms(net, self.next_batch(), self.step)   # megadiff's losses
                engine = self.engines[net]
                engine.backward(sum(terms.values()))
                engine.step()
                last |= {k: float(v.detach()) for k, v in terms.items()}
            self.step += 1
        return last


VARIANTS = {
    "dmd2": ["dmd.loss=dmd2", "dmd.gan.enabled=true"],
    "ddmd": ["dmd.loss=ddmd", "dmd.gan.enabled=false"],
    "fdiv_js": ["dmd.loss=dmd2", "dmd.divergence=js", "dmd.fdiv_normalization=timestep",
                "dmd.gan.enabled=true"],
}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.time()
    teacher = train_teacher(args.teacher_iters, args.seed)
    labels = torch.arange(args.n) % NUM_CLASSES
    reference = teacher_samples(teacher, labels, args.guidance, seed=101)
    floor = distances(teacher_samples(teacher, labels, args.guidance, seed=202), reference, labels)
    pool_y = torch.arange(20000) % NUM_CLASSES
    pool = (teacher_samples(teacher, pool_y, args.guidance, seed=303), pool_y)
    print(f"teacher trained in {time.time() - t0:.0f}s; floor (teacher vs teacher): "
          f"MMD^2 {floor['mmd2']:.4f}, SWD {floor['swd']:.4f}", flush=True)
    results = {"floor": floor, "guidance_scale": args.guidance, "iters": args.iters, "runs": {}}
    samples_for_plot = {"teacher": reference}
    for steps in (1, 4):
        for name, overrides in VARIANTS.items():
            t1 = time.time()
            cfg = load_config("tiny-dmd-cpu", [
                f"seed={args.seed}", f"dmd.generator.num_steps={steps}", "dmd.generator.shift=1.0",
                "dmd.teacher_steps=100", f"dmd.real_guidance_scale={args.guidance}",
                f"dmd.update_ratio={args.ratio}", "dmd.gan.sigma_max=0.98", "dmd.gan.gen_weight=5.0e-3",
                "dmd.gan.disc_weight=1.0e-2", "flow.shift=1.0", *overrides])
            trainer = ToyDMDTrainer(cfg, teacher, pool, args.lr_gen, args.lr_fake)
            sigmas = trainer.gen_sigmas()
            before = distances(student_samples(trainer.engines["generator"].module, labels, sigmas, 404),
                               reference, labels)
            last = trainer.fit(args.iters)
            after_samples = student_samples(trainer.engines["generator"].module, labels, sigmas, 404)
            after = distances(after_samples, reference, labels)
            key = f"{name}/{steps}-step"
            results["runs"][key] = {"before": before, "after": after, "last_losses": last,
                                    "seconds": round(time.time() - t1, 1)}
            samples_for_plot[key] = after_samples
            print(f"{key:18s} MMD^2 {before['mmd2']:.4f} -> {after['mmd2']:.4f}   "
                  f"SWD {before['swd']:.4f} -> {after['swd']:.4f}   ({time.time() - t1:.0f}s)", flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table(results))
    plot(samples_for_plot, labels, out / "samples.png")
    return results


def table(results: dict) -> str:
    f = results["floor"]
    lines = [f"teacher: 100-step Euler, CFG {results['guidance_scale']}; {results['iters']} iterations per run; "
             f"floor (two teacher sample sets): MMD^2 {f['mmd2']:.4f}, SWD {f['swd']:.4f}", "",
             "| variant | MMD^2 before | MMD^2 after | SWD before | SWD after |", "|---|---|---|---|---|"]
    for k, r in results["runs"].items():
        lines.append(f"| {k} | {r['before']['mmd2']:.4f} | {r['after']['mmd2']:.4f} | "
                     f"{r['before']['swd']:.4f} | {r['after']['swd']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(samples: dict, labels: torch.Tensor, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = list(samples)
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.8))
    for ax, k in zip(axes, keys):
        x = samples[k]
        for c, col in zip(range(NUM_CLASSES), ("tab:blue", "tab:orange")):
            ax.scatter(x[labels == c, 0], x[labels == c, 1], s=1, c=col, alpha=0.4)
        ax.set_title(k, fontsize=7)
        ax.set_xlim(-3.5, 3.5)
        ax.set_ylim(-3.5, 3.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=2000, help="distillation iterations per run")
    p.add_argument("--teacher-iters", type=int, default=3000)
    p.add_argument("--ratio", type=int, default=5, help="fake-score steps per generator step")
    p.add_argument("--guidance", type=float, default=1.5, help="CFG scale of the real score and reference")
    p.add_argument("--lr-gen", type=float, default=1e-4)
    p.add_argument("--lr-fake", type=float, default=4e-4)
    p.add_argument("--n", type=int, default=2000, help="samples per distance evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/dmd_experiment")
    run(p.parse_args())


if __name__ == "__main__":
    main()
