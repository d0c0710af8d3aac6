"""What `megadiff eval` generates with: a run's checkpoint or an exported diffusers directory,
and how it samples.

- `--run DIR [--step N]`: the run's args.json says what was trained. A DMD run
  (`objectives` holds `dmd`) is evaluated through its few-step generator with its own
  conditioning schedule and sampler (`dmd.generator`: `sample_type: sde` re-noises each x0,
  `megadiff.generator.few_step_sample`; `ode` takes Euler steps, `ode_sample`); any other
  run through its transformer with Euler + CFG (`megadiff.sampling.euler_sample`). Weights are
  consolidated from the checkpoint (any ZeRO stage) in memory, as `megadiff sample` does;
  text encoders and VAE come from the run's base model directory.
- `--model DIR`: a diffusers directory (`megadiff export` output or any SD3/SD3.5 model),
  Euler + CFG unless `--sampler few_step` (an exported DMD generator).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

EULER, FEW_STEP = "euler", "few_step"
DEFAULT_STEPS = 28             # StableDiffusion3Pipeline's default
DEFAULT_GUIDANCE = 7.0         # StableDiffusion3Pipeline's default
DEFAULT_MAX_SEQ = 256


@dataclass
class Source:
    kind: str                        # "run" | "model"
    path: Path                       # the run directory or the model directory
    base: Path                       # diffusers directory with text encoders, VAE, scheduler
    sampler: str                     # EULER | FEW_STEP
    steps: int
    guidance_scale: float | None     # EULER only
    shift: float
    sigmas: list[float] | None       # FEW_STEP conditioning levels
    max_sequence_length: int
    height: int                      # latent pixels
    width: int
    channels: int
    sample_type: str = "sde"         # FEW_STEP: "sde" re-noises each x0 (DMD2), "ode" Euler steps (DMDR)
    tag: str | None = None           # checkpoint of a run
    step: int | None = None
    net: str = "transformer"
    _cfg: object = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.path}@{self.tag}" if self.tag else str(self.path)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(Path(self.path).resolve()), "base_model": str(self.base),
                "checkpoint": self.tag, "step": self.step, "network": self.net,
                "sampler": self.sampler, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "shift": self.shift, "sigmas": self.sigmas,
                "sample_type": self.sample_type if self.sampler == FEW_STEP else None,
                "max_sequence_length": self.max_sequence_length,
                "resolution": [self.height * self.down, self.width * self.down]}

    @property
    def down(self) -> int:
        from megadiff.models import sd3

        return sd3.vae_scale_factor(sd3.vae_config(self.base))

    def build_network(self) -> torch.nn.Module:
        """The network that generates, in fp32, eval mode, frozen."""
        from megadiff.models import sd3

        if self.kind == "model":
            return sd3.load_transformer(self.base, torch.float32).eval().requires_grad_(False)
        from megadiff.engine.export import consolidated_state_dict
        from megadiff.engine.run_dir import RunDir
        from megadiff.sample_cli import build_generator

        state = consolidated_state_dict(RunDir(self.path), self.tag, self.net)
        if self.net == "generator":
            return build_generator(self._cfg, self.base, state)
        module = sd3.load_transformer(self.base, torch.float32)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {self.tag} of {self.path} does not match {self.base}/transformer "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return module.eval().requires_grad_(False)


def run_rewards(src: Source) -> list:
    """The reward models a run was configured with. A demo run's `path: demo` entries
    (megadiff/objectives/refl.py builds tiny towers in OUT/demo/rewards/<name>/, recording
    the built config in `done`) resolve to those towers."""
    import dataclasses

    from megadiff.rewards.registry import reward_name

    out = []
    for rc in src._cfg.rewards:
        if rc.path == "demo":
            done = Path(src.path) / "demo" / "rewards" / reward_name(rc) / "done"
            if not done.is_file():
                raise ValueError(f"{done} is missing: the demo run never built its {reward_name(rc)} "
                                 "reward tower; pass --rewards kind=path")
            built = json.loads(done.read_text())
            rc = dataclasses.replace(rc, path=built["path"], arch=built.get("arch"),
                                     clip_path=built.get("clip_path"))
        out.append(rc)
    return out


def scheduler_shift(base: Path, default: float = 3.0) -> float:
    f = base / "scheduler" / "scheduler_config.json"
    if f.is_file():
        return float(json.loads(f.read_text()).get("shift", default))
    return default


def _side(base: Path, resolution: int | None) -> int:
    from megadiff.models import sd3

    down = sd3.vae_scale_factor(sd3.vae_config(base))
    if resolution is None:
        return int(sd3.transformer_config(base)["sample_size"])
    if resolution <= 0 or resolution % (2 * down):
        raise ValueError(f"--resolution {resolution} must be a positive multiple of {2 * down} "
                         "(VAE downsampling x patch size)")
    return resolution // down


def run_config(run) -> object:
    from megadiff.config import load_run_args

    return load_run_args(run.args)


def from_run(run_dir: str | Path, step: int | None, sampler: str | None, steps: int | None,
             guidance_scale: float | None, resolution: int | None) -> Source:
    from megadiff.engine.export import _base_model_path
    from megadiff.engine.run_dir import RunDir
    from megadiff.models import sd3
    from megadiff.sample_cli import _checkpoint_tag

    run = RunDir(run_dir)
    cfg = run_config(run)
    if cfg.context.enabled:
        raise ValueError(f"{run.root} trained an extended text context: `megadiff export` it and "
                         "generate with megadiff.models.context (eval does not encode long context)")
    tag = _checkpoint_tag(run, step)
    base = sd3.check_sd3_dir(_base_model_path(run, cfg.to_dict()))
    state = json.loads((run.tag_dir(tag) / "trainer_state.json").read_text())
    dmd = "dmd" in cfg.objectives
    kind = sampler or (FEW_STEP if dmd else EULER)
    if kind == FEW_STEP and not dmd:
        raise ValueError(f"{run.root} has no few-step generator (objectives {cfg.objectives}): "
                         "use --sampler euler")
    side = _side(base, resolution if resolution is not None else cfg.validation.resolution)
    common = dict(kind="run", path=run.root, base=base, max_sequence_length=cfg.model.max_sequence_length,
                  height=side, width=side, channels=sd3.transformer_config(base)["in_channels"],
                  tag=tag, step=int(state["step"]), _cfg=cfg)
    if kind == FEW_STEP:
        from megadiff import generator as gen

        g = cfg.dmd.generator
        n = steps or g.num_steps
        shift = cfg.flow.shift if g.shift is None else g.shift
        sigmas = gen.conditioning_sigmas(n, shift, g.sigmas if n == g.num_steps else None)
        return Source(sampler=FEW_STEP, steps=n, guidance_scale=None, shift=shift,
                      sigmas=[float(s) for s in sigmas], net="generator",
                      sample_type=getattr(g, "sample_type", "sde"), **common)
    # A DMD run sampled with Euler: its generator run as an ODE model, the teacher's shift.
    return Source(sampler=EULER, steps=steps or DEFAULT_STEPS,
                  guidance_scale=DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale,
                  shift=scheduler_shift(base, cfg.flow.shift), sigmas=None,
                  net="generator" if dmd else "transformer", **common)


def from_model(model_dir: str | Path, sampler: str | None, steps: int | None,
               guidance_scale: float | None, resolution: int | None,
               max_sequence_length: int | None) -> Source:
    from megadiff.models import sd3

    base = sd3.check_sd3_dir(model_dir)
    side = _side(base, resolution)
    shift = scheduler_shift(base)
    tok = base / "tokenizer_3" / "tokenizer_config.json"
    limit = DEFAULT_MAX_SEQ
    if tok.is_file():
        limit = min(limit, int(json.loads(tok.read_text()).get("model_max_length", limit)))
    common = dict(kind="model", path=Path(model_dir), base=base,
                  max_sequence_length=max_sequence_length or limit, height=side, width=side,
                  channels=sd3.transformer_config(base)["in_channels"])
    if (sampler or EULER) == FEW_STEP:
        from megadiff import generator as gen

        n = steps or 4
        return Source(sampler=FEW_STEP, steps=n, guidance_scale=None, shift=shift,
                      sigmas=[float(s) for s in gen.conditioning_sigmas(n, shift)], **common)
    return Source(sampler=EULER, steps=steps or DEFAULT_STEPS,
                  guidance_scale=DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale,
                  shift=shift, sigmas=None, **common)
