"""How the trainer, the shard builder, validation and export use the extended text context
(`megadiff.models.context`). Everything here runs only when a recipe sets `context.enabled`
or a build passes `--long-context`.

  shards    `ContextProcessor` wraps the image-caption builder and adds the long-context
            columns of the `megadiff.train_context` schema; `check_shards` matches a set's
            recorded settings against the run's.
  training  `wrap_transformer`: the "transformer" network becomes a `ContextTransformer`
            (transformer + projector, one DeepSpeed engine, so checkpoints and resume carry
            both); `batch_context` feeds a batch's cached context to it.
  sampling  `load_trained` rebuilds a run's module from its checkpoint; `encode_prompt_context`
            encodes prompts' extra context with the run's settings; `bind_context` gives
            `megadiff.sampling.euler_sample` (or any caller that batches [negative, positive]
            for CFG) a module that appends the right context.
  export    `split_state` separates the consolidated weights into the transformer's and the
            projector's.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from megadiff.models import context as ctx

SCHEMA = "megadiff.train_context"
COLUMNS = {"clip": "context_clip", "clip_mask": "context_clip_mask",
           "t5": "context_t5", "t5_mask": "context_t5_mask"}
DEFAULT_CLIP_LENGTH = 300      # 4 CLIP windows


# ---- shards ---------------------------------------------------------------------------------

def long_context_settings(clip_length: int, t5_length: int, base_t5_length: int) -> dict:
    """The `long_context` build setting (fingerprinted with the build)."""
    ctx.check_lengths(clip_length, t5_length, base_t5_length, "--long-context: ")
    return {"clip_length": clip_length, "t5_length": t5_length}


def geometry(settings: dict, record: dict) -> dict:
    lc, base = settings["long_context"], settings["max_sequence_length"]
    return {"version": 1, "clip_length": lc["clip_length"], "t5_length": lc["t5_length"],
            "base_t5_length": base, "clip_extra": ctx.clip_extra_tokens(lc["clip_length"]),
            "t5_extra": ctx.t5_extra_tokens(lc["t5_length"], base),
            "clip_dim": int(record[COLUMNS["clip"]].shape[1]), "t5_dim": int(record[COLUMNS["t5"]].shape[1])}


def _rows(x: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float16 / uint8 arrays with at least one row (MDS stores no empty arrays)."""
    if x.shape[0] == 0:
        x, mask = torch.zeros(1, max(1, x.shape[1])), torch.zeros(1, dtype=torch.bool)
    return x.float().numpy().astype(np.float16), mask.numpy().astype(np.uint8)


class ContextProcessor:
    """`megadiff.data.processors.TrainProcessor` plus the long-context columns."""

    schema = SCHEMA

    def __init__(self, inner, settings: dict):
        from megadiff.data.sources import Skip

        self.inner, self.settings, self._skip = inner, settings, Skip
        self.unit = inner.unit

    def prepare(self, item):
        return self.inner.prepare(item)

    def geometry(self, record: dict) -> dict:
        return {**self.inner.geometry(record), "context": geometry(self.settings, record)}

    def encode(self, batch: list) -> list:
        out = self.inner.encode(batch)
        lc, enc = self.settings["long_context"], self.inner.enc
        extra = ctx.encode_long_context(enc.text, [p.item.caption for p in batch], lc["clip_length"],
                                        lc["t5_length"], self.settings["max_sequence_length"], enc.device)
        done = []
        for i, r in enumerate(out):
            if isinstance(r, self._skip):
                done.append(r)
                continue
            key, rec = r
            for name in ("clip", "t5"):
                x, m = _rows(extra[name][i], extra[f"{name}_mask"][i])
                rec[COLUMNS[name]], rec[COLUMNS[f"{name}_mask"]] = x, m
            ok = np.isfinite(rec[COLUMNS["clip"]]).all() and np.isfinite(rec[COLUMNS["t5"]]).all()
            done.append((key, rec) if ok else self._skip(key, "non_finite"))
        return done


def check_shards(cfg, info, where: str) -> None:
    """A `context.enabled` run needs a `megadiff.train_context` set encoded with the run's
    settings; unset `context.clip_length` / `context.t5_length` are taken from the set."""
    c = cfg.context
    if info.schema != SCHEMA or not info.context:
        raise ValueError(f"context.enabled needs shards with the long-prompt context, but {where} is a "
                         f"{info.schema} set: rebuild it with `megadiff data build ... --long-context N`")
    g = info.context
    if c.clip_length is None:
        c.clip_length = g["clip_length"]
    if c.t5_length is None:
        c.t5_length = g["t5_length"]
    have = {"context.clip_length": g["clip_length"], "context.t5_length": g["t5_length"],
            "model.max_sequence_length": g["base_t5_length"]}
    want = {"context.clip_length": c.clip_length, "context.t5_length": c.t5_length,
            "model.max_sequence_length": cfg.model.max_sequence_length}
    for key, v in want.items():
        if v != have[key]:
            raise ValueError(f"{key}={v}, but the shards in {where} were encoded with {have[key]}: "
                             f"set {key}={have[key]} or rebuild the shards with matching --long-context "
                             "/ --max-sequence-length")


def resolved_lengths(cfg) -> tuple[int, int, int]:
    """(clip_length, t5_length, base T5 tokens) of a run."""
    c = cfg.context
    if c.clip_length is None or c.t5_length is None:
        raise ValueError("context.clip_length and context.t5_length must be set when the shards are "
                         "not on a local path (they are read from a local set's megadiff_schema.json)")
    return c.clip_length, c.t5_length, cfg.model.max_sequence_length


# ---- training -------------------------------------------------------------------------------

def wrap_transformer(cfg, model_path, transformer) -> ctx.ContextTransformer:
    clip, t5, base = resolved_lengths(cfg)
    projector = ctx.projector_for(model_path, clip, t5, base, cfg.context.hidden_dim)
    return ctx.ContextTransformer(transformer, projector)


def load_trained(cfg, model_path, state: dict[str, torch.Tensor]) -> ctx.ContextTransformer:
    """A run's trained `ContextTransformer` (eval, no grad) from its consolidated "transformer"
    weights (`megadiff.engine.export.consolidated_state_dict`), for sampling from a run."""
    from megadiff.models import sd3

    module = wrap_transformer(cfg, model_path, sd3.load_transformer(model_path, torch.float32))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the checkpoint is not this run's context-extended transformer "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.eval().requires_grad_(False)


def batch_context(batch: dict, device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The cached context columns of a batch, as the projector takes them."""
    missing = [c for c in COLUMNS.values() if c not in batch]
    if missing:
        raise ValueError(f"the batch has no {missing[0]} column: context.enabled needs shards built "
                         "with `megadiff data build --long-context N`")
    return {k: (batch[c].to(device, torch.bool) if k.endswith("_mask") else batch[c].to(device, dtype))
            for k, c in COLUMNS.items()}


# ---- sampling -------------------------------------------------------------------------------

class ContextBound:
    """`net` with a fixed per-prompt context: called with the prompts' batch it appends
    `context`; with twice that batch, [negative, positive] as CFG samplers stack them, it
    appends `negative` (one sample, broadcast) then `context`."""

    def __init__(self, net, context: dict, negative: dict | None, device, dtype: torch.dtype):
        self.net, self.device, self.dtype = net, device, dtype
        self.context, self.negative = context, negative

    def _to(self, c: dict) -> dict:
        return {k: v.to(self.device, torch.bool if k.endswith("_mask") else self.dtype) for k, v in c.items()}

    def __call__(self, *args, encoder_hidden_states: torch.Tensor, **kwargs):
        b, n = encoder_hidden_states.shape[0], next(iter(self.context.values())).shape[0]
        if b == n:
            c = self.context
        elif b == 2 * n and self.negative is not None:
            neg = {k: v.expand(n, *v.shape[1:]) for k, v in self.negative.items()}
            c = ctx.cat_context([neg, self.context])
        else:
            raise ValueError(f"a batch of {b} for {n} prompts with context: expected {n} or {2 * n} (CFG)")
        return self.net(*args, encoder_hidden_states=encoder_hidden_states, context=self._to(c), **kwargs)


def bind_context(net, context: dict, negative: dict | None, device, dtype: torch.dtype) -> ContextBound:
    return ContextBound(net, context, negative, device, dtype)


def encode_prompt_context(text_pipe, prompts: list[str], cfg) -> dict[str, torch.Tensor]:
    clip, t5, base = resolved_lengths(cfg)
    return ctx.encode_long_context(text_pipe, prompts, clip, t5, base)


def with_validation_context(trainer, net, embeds: dict) -> ContextBound:
    """`net` bound to the validation prompts' context (encoded once on rank 0, kept in the run
    directory like the prompts' embeddings)."""
    if getattr(trainer, "_val_context", None) is None:
        trainer._val_context = _validation_context(trainer)
    c = trainer._val_context
    n = embeds["embeds"].shape[0]
    pos = {k: c[k][:n] for k in ctx.CONTEXT_KEYS}
    neg = {k: c[k][n:] for k in ctx.CONTEXT_KEYS}
    return bind_context(net, pos, neg, trainer.device, trainer.compute_dtype)


def _validation_context(trainer) -> dict[str, torch.Tensor]:
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from megadiff.models import sd3

    prompts = list(trainer.cfg.validation.prompts)
    lengths = resolved_lengths(trainer.cfg)
    key = hashlib.sha1(json.dumps([str(trainer.model_path), prompts, lengths]).encode()).hexdigest()[:12]
    path = trainer.run.root / f"validation_context-{key}.safetensors"
    if trainer.rank == 0 and not path.is_file():
        text = sd3.load_text_pipeline(trainer.model_path, torch.float32)
        c = encode_prompt_context(text, prompts + [""], trainer.cfg)
        del text
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in c.items()}, str(tmp))
        tmp.replace(path)
    if dist.is_initialized():
        dist.barrier()
    return load_file(str(path))


# ---- export ---------------------------------------------------------------------------------

def split_state(state: dict[str, torch.Tensor], args: dict, base_model) -> tuple[dict, ctx.ContextProjector]:
    """Consolidated `ContextTransformer` weights -> (transformer state dict, loaded projector)."""
    c = args["context"]
    if c.get("clip_length") is None or c.get("t5_length") is None:
        raise ValueError("the run's args.json holds no resolved context.clip_length / t5_length")
    projector = ctx.projector_for(base_model, c["clip_length"], c["t5_length"],
                                  args["model"]["max_sequence_length"], c.get("hidden_dim"))
    transformer = {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
    proj = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
    other = [k for k in state if not k.startswith(("transformer.", "projector."))]
    if other or not proj:
        raise ValueError("the checkpoint is not a context-extended transformer "
                         f"(keys {other[:3] or 'without a projector'})")
    missing, unexpected = projector.load_state_dict(proj, strict=False)
    if missing or unexpected:
        raise ValueError(f"the checkpoint's context projector does not match the run's settings "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return transformer, projector


# ---- demo data ------------------------------------------------------------------------------

_FILLER = ("a simple flat illustration with clean edges and no texture, drawn in two solid "
           "colours without any shading, gradients, outlines, shadows or noise,")


def demo_samples(n: int, size: int = 64, seed: int = 0):
    """Coloured shapes whose captions are short or long (0, 1, 3 or 4 filler clauses of 30 CLIP
    tokens before the last sentence): where the shape sits and its size are said only at the
    end, past 77 CLIP tokens in the long ones, so only the extended context carries them."""
    from megadiff.data.synthetic import COLOURS, shape_samples

    rng = random.Random(seed + 1)
    for img, caption in shape_samples(n, size, seed):
        bg = caption.rsplit(" on a ", 1)[1].split()[0]
        arr = np.asarray(img).astype(int)
        fg = np.abs(arr - np.array(COLOURS[bg])).sum(-1) > 30
        ys, xs = np.nonzero(fg)
        cy, cx = (ys.mean(), xs.mean()) if len(xs) else (size / 2, size / 2)
        where = f"{'upper' if cy < size / 2 else 'lower'} {'left' if cx < size / 2 else 'right'}"
        big = "large" if fg.mean() > 0.2 else "small"
        fill = " ".join([_FILLER] * rng.choice((0, 1, 3, 4)))
        text = f"{caption}, {fill} the shape is {big} and sits in the {where} part of the picture"
        yield img, text.replace("  ", " ")


def write_demo_images(folder: Path, n: int, size: int = 64, seed: int = 0) -> list[tuple[str, str]]:
    """`demo_samples` as an image folder with same-name .txt captions (the `folder` input)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (img, caption) in enumerate(demo_samples(n, size, seed)):
        name = f"{i:04d}.png"
        img.save(folder / name)
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
        out.append((name, caption))
    return out


def write_demo_shards(shard_dir: Path, model_dir: Path, cfg, base_t5_length: int) -> None:
    """The demo's `megadiff.train_context` set, built by the real builder in this process."""
    from megadiff.data.builder import BuildOptions, Job, run_build
    from megadiff.data.encode import model_identity
    from megadiff.data.sources import expand_inputs, plan_slices
    from megadiff.engine.dist_env import detect
    from megadiff.models.tiny import TINY_RESOLUTION

    c = cfg.context
    c.clip_length = c.clip_length or DEFAULT_CLIP_LENGTH
    c.t5_length = c.t5_length if c.t5_length is not None else 2 * base_t5_length
    images = shard_dir.parent / "images"
    if not images.is_dir():
        write_demo_images(images, cfg.demo.num_samples, TINY_RESOLUTION, cfg.seed)
    fmt, paths = expand_inputs([str(images)], "folder")
    settings = {"model": str(Path(model_dir).resolve()), "dtype": "fp32", "resolution": TINY_RESOLUTION,
                "resize": "center-crop", "latents": "sample", "seed": cfg.seed, "min_size": 0,
                "max_sequence_length": base_t5_length, "format": fmt,
                "long_context": long_context_settings(c.clip_length, c.t5_length, base_t5_length)}
    job = Job(kind="build", schema=SCHEMA, slices=plan_slices(fmt, paths, 1000), settings=settings,
              inputs=[str(p) for p in paths], identity=model_identity(model_dir), batch_size=16)
    run_build(job, BuildOptions(out=str(shard_dir), progress=False), env=detect({}))
