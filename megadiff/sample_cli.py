"""`megadiff sample --run DIR --prompts FILE.txt --out OUT_DIR [--steps 4] [--step N]`: images
from a DMD run's few-step generator and, with the same initial noise, from the teacher with its
own step count and CFG, side by side.

OUT_DIR/
  generator/000.png ...   the few-step generator (conditioning schedule as in training)
  teacher/000.png ...     the teacher: Euler ODE, `dmd.teacher_steps` steps, CFG `dmd.real_guidance_scale`
  generator_grid.png, teacher_grid.png, side_by_side.png (one row per prompt: generator | teacher)
  prompts.json, sample_info.json

Runs in one process without DeepSpeed (on the GPU when there is one): the generator's weights
are consolidated from the run's checkpoint (any ZeRO stage), the teacher and the text encoders
and VAE come from the run's base model directory.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="images from a DMD run's few-step generator beside the teacher's")
    p.add_argument("--run", required=True, help="the run's output directory")
    p.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=None,
                   help="generator steps (default: the trained schedule, dmd.generator.num_steps)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--teacher-steps", type=int, default=None, help="default: dmd.teacher_steps")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="the teacher's CFG scale (default: dmd.real_guidance_scale)")
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher's samples")
    p.add_argument("--seed", type=int, default=0, help="prompt i uses noise seed SEED + i")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the training size)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(handler=run_sample)


def _load_run_config(run):
    from megadiff.config import load_run_args

    cfg = load_run_args(run.args)
    if "dmd" not in cfg.objectives:
        raise ValueError(f"{run.root} was trained with objectives {cfg.objectives}: `megadiff sample` "
                         "needs a DMD run (objectives: [dmd]); use `megadiff export` for others")
    return cfg


def _checkpoint_tag(run, step: int | None) -> str:
    from megadiff.engine.checkpoint import tag_for

    if step is None:
        tag = run.latest_tag()
        if tag is None:
            raise ValueError(f"{run.root} has no complete checkpoint yet: train first or pass --step")
        return tag
    tag = tag_for(step)
    if not (run.tag_dir(tag) / "trainer_state.json").is_file():
        have = sorted(p.name for p in run.checkpoints.glob("step-*"))
        raise ValueError(f"{run.tag_dir(tag)} is not a complete checkpoint: choose one of {have}")
    return tag


def build_generator(cfg, base: Path, state: dict[str, torch.Tensor]):
    """The generator module as trained (plain MMDiT or MMDiT + LoRA "gen"), with `state` loaded."""
    from megadiff.models import sd3
    from megadiff.objectives.dmd import add_dmd_adapter

    module = sd3.load_transformer(base, torch.float32)
    add_dmd_adapter(module, cfg.dmd, "generator")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the generator checkpoint does not match {base}/transformer "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.eval().requires_grad_(False)


def teacher_shift(base: Path, default: float) -> float:
    f = base / "scheduler" / "scheduler_config.json"
    if f.is_file():
        return float(json.loads(f.read_text()).get("shift", default))
    return default


def run_sample(args: argparse.Namespace) -> None:
    from megadiff import generator as gen
    from megadiff import sampling, validation
    from megadiff.data.dataset import read_shard_info
    from megadiff.engine.run_dir import RunDir
    from megadiff.models import sd3

    run = RunDir(args.run)
    cfg = _load_run_config(run)
    tag = _checkpoint_tag(run, args.step)
    base = sd3.check_sd3_dir(cfg.model.path)
    prompts_file = Path(args.prompts)
    if not prompts_file.is_file():
        raise ValueError(f"prompt file {prompts_file} does not exist: give a text file, one prompt a line")
    prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{prompts_file} holds no prompts: write one prompt per line")
    steps = args.steps or cfg.dmd.generator.num_steps
    teacher_steps = args.teacher_steps or cfg.dmd.teacher_steps
    if steps < 1 or teacher_steps < 1:
        raise ValueError("--steps and --teacher-steps must be at least 1")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise ValueError(f"{out} already exists and is not empty: pass --overwrite or a new --out")
        shutil.rmtree(out)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = sd3.DTYPES[cfg.model.precision] if device.type == "cuda" else torch.float32
    down = sd3.vae_scale_factor(sd3.vae_config(base))
    if args.resolution or cfg.validation.resolution:
        side = (args.resolution or cfg.validation.resolution) // down
        h = w = side
    else:
        info = read_shard_info(cfg.data) if (cfg.data.local or cfg.data.remote) else None
        if info is None:
            raise ValueError("the run's shards are not on a local path: pass --resolution")
        _, h, w = info.latent_shape
    channels = sd3.transformer_config(base)["in_channels"]

    text = sd3.load_text_pipeline(base, torch.float32)
    embeds, pooled = sd3.encode_prompts(text, prompts + [""], cfg.model.max_sequence_length)
    del text
    emb, pool, neg, neg_pool = embeds[:-1], pooled[:-1], embeds[-1:], pooled[-1:]
    noise = torch.cat([torch.randn((1, channels, h, w), generator=torch.Generator().manual_seed(args.seed + i))
                       for i in range(len(prompts))])

    g_cfg = cfg.dmd.generator
    shift = cfg.flow.shift if g_cfg.shift is None else g_cfg.shift
    sigmas = gen.conditioning_sigmas(steps, shift, g_cfg.sigmas if steps == g_cfg.num_steps else None)
    from megadiff.engine.export import consolidated_state_dict

    generator = _to(build_generator(cfg, base, consolidated_state_dict(run, tag, "generator")), device, dtype)
    fn = gen.transformer_velocity(generator, dtype, device)
    renoise_gen = torch.Generator().manual_seed(args.seed + 100_003)
    with torch.no_grad():
        if g_cfg.sample_type == "ode":         # the sampler the generator was trained with (DMDR)
            x_gen = gen.ode_sample(fn, noise.to(device), sigmas.to(device), emb.to(device), pool.to(device))
        else:
            x_gen = gen.few_step_sample(fn, noise.to(device), sigmas.to(device), emb.to(device),
                                        pool.to(device),
                                        lambda shape: torch.randn(shape, generator=renoise_gen).to(device))
    del generator
    latents = {"generator": x_gen.float().cpu()}
    scale = cfg.dmd.real_guidance_scale if args.guidance_scale is None else args.guidance_scale
    if not args.no_teacher:
        teacher = _to(sd3.load_transformer(base, torch.float32).eval().requires_grad_(False), device, dtype)
        b = len(prompts)
        latents["teacher"] = sampling.euler_sample(
            teacher, noise.to(device), emb.to(device), pool.to(device), teacher_steps,
            teacher_shift(base, cfg.flow.shift), scale, neg.expand(b, -1, -1).to(device),
            neg_pool.expand(b, -1).to(device), dtype).float().cpu()
        del teacher

    vae = sd3.load_vae(base, torch.float32)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    images = {}
    for name, lat in latents.items():
        images[name] = validation.to_pil(sd3.decode_latents(vae, lat))
        (tmp / name).mkdir(parents=True)
        for i, im in enumerate(images[name]):
            im.save(tmp / name / f"{i:03d}.png")
        validation.grid(images[name]).save(tmp / f"{name}_grid.png")
    side_by_side(images).save(tmp / "side_by_side.png")
    (tmp / "prompts.json").write_text(json.dumps(prompts, indent=1))
    (tmp / "sample_info.json").write_text(json.dumps({
        "run": str(run.root.resolve()), "checkpoint": tag, "generator_steps": steps,
        "generator_sigmas": [round(float(s), 6) for s in sigmas],
        "teacher_steps": None if args.no_teacher else teacher_steps,
        "teacher_guidance_scale": None if args.no_teacher else scale, "seed": args.seed}, indent=1))
    tmp.rename(out)
    print(out)


def _to(module, device: torch.device, dtype: torch.dtype):
    module = module.to(device)
    return module if dtype == torch.float32 else module.to(dtype)


def side_by_side(images: dict[str, list]):
    """One row per prompt, one column per source (generator, teacher)."""
    from PIL import Image

    cols = list(images.values())
    w, h = cols[0][0].size
    sheet = Image.new("RGB", (w * len(cols), h * len(cols[0])), "white")
    for c, col in enumerate(cols):
        for r, im in enumerate(col):
            sheet.paste(im, (c * w, r * h))
    return sheet
