"""Extended text context for SD3 / SD3.5 (PixelProse-style context window extension).

SD3 conditions on 77 CLIP tokens (CLIP-L ++ CLIP-G penultimate hidden states, zero-padded to
the T5 width) followed by `max_sequence_length` T5 tokens; anything a prompt says after that
is cut. The extension encodes the rest and appends it to the text sequence:

  - CLIP, chunked: the prompt's tokens are split into windows of 75, each encoded on its own as
    [BOS, 75 tokens, EOS, padding] (77 positions) by CLIP-L and CLIP-G, penultimate hidden
    states as `StableDiffusion3Pipeline.encode_prompt` takes them. Window 0 is exactly SD3's
    own CLIP encoding; windows 1..W-1 are the extra context (`clip_length = 75 * W`).
  - T5, longer: the prompt is encoded with `t5_length` T5 tokens (with T5's attention mask);
    the positions past the model's `max_sequence_length` are the extra context.

A trainable `ContextProjector` maps each extra token to one additional joint-attention token
(the transformer's `encoder_hidden_states` width, before `context_embedder`): per token
`pad(x, D) + MLP(LayerNorm(x))` plus a learned embedding per CLIP window / for T5. The last
MLP layer and the embeddings start at zero, so an untrained projector hands the transformer
the extra tokens in SD3's own layout (CLIP states zero-padded to D, T5 states as they are).

Batches mix prompt lengths, so every extra token has a mask (True = a real token: BOS, the
window's tokens and EOS; T5's own attention mask); padded positions are zeroed and removed
from the joint attention's keys by `megadiff.models.masked_attention`. The base SD3 tokens are
always kept (SD3 was trained attending to its padding). Any batch size works.

In training the projector and the transformer form one module (`ContextTransformer`, the
"transformer" network of a `context.enabled` run): one DeepSpeed engine, one optimizer, one
checkpoint. `megadiff export` writes the projector beside the diffusers directory:

    OUT/context_projector/config.json, OUT/context_projector/model.safetensors

Inference with the exported model:

    from diffusers import StableDiffusion3Pipeline
    from megadiff.models.context import load_context_projector, pipeline_conditioning
    pipe = StableDiffusion3Pipeline.from_pretrained(OUT)
    projector = load_context_projector(OUT / "context_projector")
    image = pipe(**pipeline_conditioning(pipe, projector, [long_prompt], guidance_scale=7.0),
                 guidance_scale=7.0, num_inference_steps=28).images[0]
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLIP_WINDOW = 75            # prompt tokens per CLIP window (77 with BOS and EOS)
CLIP_POSITIONS = CLIP_WINDOW + 2
PROJECTOR_DIR = "context_projector"
PROJECTOR_WEIGHTS = "model.safetensors"
PROJECTOR_VERSION = 1
CONTEXT_KEYS = ("clip", "clip_mask", "t5", "t5_mask")


def clip_extra_tokens(clip_length: int) -> int:
    """Extra joint-attention positions from CLIP windows 1.. (77 each)."""
    return max(0, clip_length // CLIP_WINDOW - 1) * CLIP_POSITIONS


def t5_extra_tokens(t5_length: int, base_t5_length: int) -> int:
    return max(0, t5_length - base_t5_length)


def check_lengths(clip_length: int, t5_length: int, base_t5_length: int, where: str = "") -> None:
    """One-line ValueErrors for settings that extend nothing or cannot be windowed."""
    if clip_length < CLIP_WINDOW or clip_length % CLIP_WINDOW:
        raise ValueError(f"{where}clip_length={clip_length} must be a multiple of {CLIP_WINDOW} "
                         f"(CLIP windows of {CLIP_WINDOW} tokens; {CLIP_WINDOW} = SD3's own, no extension)")
    if t5_length < 0:
        raise ValueError(f"{where}t5_length={t5_length} must not be negative")
    if not clip_extra_tokens(clip_length) and not t5_extra_tokens(t5_length, base_t5_length):
        raise ValueError(f"{where}clip_length={clip_length} and t5_length={t5_length} extend nothing: "
                         f"use clip_length > {CLIP_WINDOW} and/or t5_length > max_sequence_length "
                         f"({base_t5_length})")


# ---- encoding -------------------------------------------------------------------------------

def _clip_windows(tokenizer, prompts: list[str], windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, windows - 1, 77) of the extra windows and their masks (True: BOS, the
    window's tokens, EOS). Window 0 (SD3's own encoding) is not returned."""
    n = windows - 1
    ids = torch.full((len(prompts), n, CLIP_POSITIONS), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n, CLIP_POSITIONS), dtype=torch.bool)
    content = tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    for b, toks in enumerate(content):
        for w in range(n):
            chunk = toks[(w + 1) * CLIP_WINDOW:(w + 2) * CLIP_WINDOW]
            if not chunk:
                break
            row = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
            ids[b, w, :len(row)] = torch.tensor(row)
            mask[b, w, :len(row)] = True
    return ids, mask


def _encode_windows(encoder, ids: torch.Tensor, mask: torch.Tensor, device) -> torch.Tensor:
    """Penultimate hidden states of the windows that hold tokens (zeros elsewhere)."""
    b, n, p = ids.shape
    flat_ids, flat_mask = ids.reshape(b * n, p), mask.reshape(b * n, p)
    used = flat_mask.any(dim=1)
    out = torch.zeros(b * n, p, encoder.config.hidden_size)
    if used.any():
        h = encoder(flat_ids[used].to(device), output_hidden_states=True).hidden_states[-2]
        out[used] = h.float().cpu()
    return (out * flat_mask[..., None]).reshape(b, n * p, -1)


@torch.no_grad()
def encode_long_context(text_pipe, prompts: list[str], clip_length: int, t5_length: int,
                        base_t5_length: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The extra context of `prompts` beyond SD3's own encoding, float32 / bool on the CPU:

    clip (B, 77 * (clip_length / 75 - 1), CLIP-L + CLIP-G width), clip_mask (B, same),
    t5 (B, t5_length - base_t5_length, T5 width), t5_mask (B, same).

    A sample's values depend only on its own prompt (never on the batch it is encoded in);
    masked positions are zero."""
    windows = clip_length // CLIP_WINDOW
    bsz = len(prompts)
    out: dict[str, torch.Tensor] = {}
    if windows > 1:
        ids, mask = _clip_windows(text_pipe.tokenizer, prompts, windows)
        ids_2, mask_2 = _clip_windows(text_pipe.tokenizer_2, prompts, windows)
        if not torch.equal(mask, mask_2):
            raise ValueError("tokenizer and tokenizer_2 split the prompts differently: the CLIP "
                             "windows of CLIP-L and CLIP-G would not line up")
        out["clip"] = torch.cat([_encode_windows(text_pipe.text_encoder, ids, mask, device),
                                 _encode_windows(text_pipe.text_encoder_2, ids_2, mask, device)], dim=-1)
        out["clip_mask"] = mask.reshape(bsz, -1)
    else:
        width = text_pipe.text_encoder.config.hidden_size + text_pipe.text_encoder_2.config.hidden_size
        out["clip"], out["clip_mask"] = torch.zeros(bsz, 0, width), torch.zeros(bsz, 0, dtype=torch.bool)
    n_t5 = t5_extra_tokens(t5_length, base_t5_length)
    t5 = text_pipe.text_encoder_3
    if n_t5 and t5 is None:
        raise ValueError(f"t5_length={t5_length} extends T5, but this model has no T5 encoder: "
                         "extend CLIP only (t5_length <= max_sequence_length)")
    t5_dim = t5.config.d_model if t5 is not None else 0
    out["t5"], out["t5_mask"] = torch.zeros(bsz, n_t5, t5_dim), torch.zeros(bsz, n_t5, dtype=torch.bool)
    if n_t5:
        tok = text_pipe.tokenizer_3(prompts, padding="max_length", max_length=t5_length, truncation=True,
                                    add_special_tokens=True, return_tensors="pt")
        tail = tok.attention_mask[:, base_t5_length:].bool()
        if tail.any():    # only prompts longer than the base length have extra T5 tokens
            h = t5(tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device))[0]
            out["t5"] = h[:, base_t5_length:].float().cpu() * tail[..., None]
            out["t5_mask"] = tail
    return out


# ---- the projector --------------------------------------------------------------------------

class TokenMLP(nn.Module):
    """Per token: pad(x, out_dim) + fc2(gelu(fc1(LayerNorm(x)))), fc2 zero-initialised."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int):
        super().__init__()
        if in_dim > out_dim:
            raise ValueError(f"context projector: input width {in_dim} exceeds the joint-attention "
                             f"width {out_dim}")
        self.pad = out_dim - in_dim
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, self.pad)) + self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh"))


class ContextProjector(nn.Module):
    """Extra context -> additional joint-attention tokens appended to `prompt_embeds`.

    `forward(prompt_embeds (B, S, D), context)` -> (embeds (B, S + E, D), mask (B, S + E) bool),
    `context` a dict of `encode_long_context`'s tensors (any batch size; masks may differ per
    sample). The config (widths and the encoding settings the projector was trained with) is
    saved with it, so inference encodes prompts the same way."""

    def __init__(self, clip_dim: int, t5_dim: int, out_dim: int, hidden_dim: int | None,
                 clip_length: int, t5_length: int, base_t5_length: int):
        super().__init__()
        check_lengths(clip_length, t5_length, base_t5_length, "context.")
        hidden_dim = hidden_dim or out_dim
        self.config = {"version": PROJECTOR_VERSION, "clip_dim": clip_dim, "t5_dim": t5_dim,
                       "out_dim": out_dim, "hidden_dim": hidden_dim, "clip_length": clip_length,
                       "t5_length": t5_length, "base_t5_length": base_t5_length}
        self.clip_extra = clip_extra_tokens(clip_length)
        self.t5_extra = t5_extra_tokens(t5_length, base_t5_length)
        self.clip = TokenMLP(clip_dim, out_dim, hidden_dim) if self.clip_extra else None
        self.t5 = TokenMLP(t5_dim, out_dim, hidden_dim) if self.t5_extra else None
        self.clip_window_embed = (nn.Parameter(torch.zeros(self.clip_extra // CLIP_POSITIONS, out_dim))
                                  if self.clip_extra else None)
        self.t5_embed = nn.Parameter(torch.zeros(out_dim)) if self.t5_extra else None

    @property
    def extra_tokens(self) -> int:
        return self.clip_extra + self.t5_extra

    def forward(self, prompt_embeds: torch.Tensor, context: dict[str, torch.Tensor]):
        b, s, _ = prompt_embeds.shape
        parts = [prompt_embeds]
        masks = [torch.ones(b, s, dtype=torch.bool, device=prompt_embeds.device)]
        dtype = prompt_embeds.dtype
        if self.clip is not None:
            x, m = _take(context, "clip", self.clip_extra, b)
            pos = self.clip_window_embed.repeat_interleave(CLIP_POSITIONS, dim=0)
            parts.append((self.clip(x.to(dtype)) + pos) * m[..., None].to(dtype))
            masks.append(m)
        if self.t5 is not None:
            x, m = _take(context, "t5", self.t5_extra, b)
            parts.append((self.t5(x.to(dtype)) + self.t5_embed) * m[..., None].to(dtype))
            masks.append(m)
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"_class_name": "ContextProjector",
                                                     "_megadiff": "megadiff.models.context", **self.config},
                                                    indent=1))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(out / PROJECTOR_WEIGHTS))
        return out


def _take(context: dict, name: str, n: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in context or f"{name}_mask" not in context:
        raise ValueError(f"the context holds no {name!r} tokens: encode it with "
                         "encode_long_context (or build shards with --long-context)")
    x, m = context[name], context[f"{name}_mask"]
    if x.shape[0] != batch or x.shape[1] < n or m.shape[:2] != x.shape[:2]:
        raise ValueError(f"context {name!r} has shape {tuple(x.shape)} (mask {tuple(m.shape)}); "
                         f"the projector needs ({batch}, {n}, ...): were the shards built with the "
                         "same --long-context settings as the projector?")
    return x[:, :n], m[:, :n].to(torch.bool)


def load_context_projector(path: str | Path, dtype: torch.dtype = torch.float32,
                           device: torch.device | str = "cpu") -> ContextProjector:
    """Load a projector written by `megadiff export` (`OUT/context_projector/`), in eval mode."""
    from safetensors.torch import load_file

    root = Path(path)
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{cfg_file} is missing: pass the context_projector/ directory that "
                         "`megadiff export` wrote beside the diffusers model")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("_class_name") != "ContextProjector" or cfg.get("version") != PROJECTOR_VERSION:
        raise ValueError(f"{cfg_file} is not a version {PROJECTOR_VERSION} megadiff ContextProjector")
    projector = ContextProjector(cfg["clip_dim"], cfg["t5_dim"], cfg["out_dim"], cfg["hidden_dim"],
                                 cfg["clip_length"], cfg["t5_length"], cfg["base_t5_length"])
    projector.load_state_dict(load_file(str(root / PROJECTOR_WEIGHTS)))
    return projector.to(device, dtype).eval().requires_grad_(False)


def projector_for(model_path: str | Path, clip_length: int, t5_length: int, base_t5_length: int,
                  hidden_dim: int | None = None) -> ContextProjector:
    """A fresh projector sized for the SD3 directory's text encoders and transformer."""
    from megadiff.models import sd3

    root = sd3.check_sd3_dir(model_path)
    joint = sd3.transformer_config(root)["joint_attention_dim"]

    def read(sub: str, key: str, default: int) -> int:
        f = root / sub / "config.json"
        return int(json.loads(f.read_text()).get(key, default)) if f.is_file() else default

    clip_dim = read("text_encoder", "hidden_size", 768) + read("text_encoder_2", "hidden_size", 1280)
    return ContextProjector(clip_dim, read("text_encoder_3", "d_model", joint), joint, hidden_dim,
                            clip_length, t5_length, base_t5_length)


# ---- the trained module ---------------------------------------------------------------------

class ContextTransformer(nn.Module):
    """An `SD3Transformer2DModel` and its `ContextProjector` as one trainable module.

    `forward(..., context=None)` is the plain transformer (stock attention, bitwise);
    with `context` the projector's tokens are appended to `encoder_hidden_states` and the
    padded ones masked out of the joint attention."""

    def __init__(self, transformer: nn.Module, projector: ContextProjector):
        super().__init__()
        from megadiff.models.masked_attention import install_masked_attention

        install_masked_attention(transformer)
        self.transformer = transformer
        self.projector = projector

    @property
    def config(self):
        return self.transformer.config

    def extend(self, encoder_hidden_states: torch.Tensor, context: dict | None):
        """(encoder_hidden_states with the extra tokens, their mask) - the conditioning the
        transformer sees."""
        return self.projector(encoder_hidden_states, context)

    def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None,
                context: dict | None = None, joint_attention_kwargs: dict | None = None, **kwargs):
        if context is not None:
            encoder_hidden_states, mask = self.projector(encoder_hidden_states, context)
            joint_attention_kwargs = {**(joint_attention_kwargs or {}), "encoder_attention_mask": mask}
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep,
                                joint_attention_kwargs=joint_attention_kwargs, **kwargs)


def cat_context(contexts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([c[k] for c in contexts]) for k in CONTEXT_KEYS}


def repeat_context(context: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Each sample n times in a row (the pipeline's num_images_per_prompt order)."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in context.items()}


# ---- inference with StableDiffusion3Pipeline ------------------------------------------------

@torch.no_grad()
def pipeline_conditioning(pipe, projector: ContextProjector, prompt: str | list[str],
                          negative_prompt: str | list[str] = "", guidance_scale: float = 7.0,
                          num_images_per_prompt: int = 1) -> dict:
    """Keyword arguments for `pipe(**kwargs, guidance_scale=..., ...)` that condition a
    `StableDiffusion3Pipeline` on the full prompts: `prompt_embeds`, `pooled_prompt_embeds`,
    their negatives (with guidance_scale > 1) and `joint_attention_kwargs` holding the padding
    mask. It installs the masked joint attention in `pipe.transformer`. Pass the same
    `guidance_scale` to the call and do not pass `num_images_per_prompt` there (the embeddings
    are already repeated); `skip_guidance_layers` is not supported (it reuses the mask on half
    the batch)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = ([negative_prompt] * len(prompts) if isinstance(negative_prompt, str)
                 else list(negative_prompt))
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    from megadiff.models.masked_attention import install_masked_attention

    cfg = projector.config
    device = pipe._execution_device
    dtype = pipe.transformer.dtype
    install_masked_attention(pipe.transformer)
    projector = projector.to(device, dtype)
    cfg_on = guidance_scale > 1
    texts = prompts + (negatives if cfg_on else [])
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=device,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=cfg["base_t5_length"])
    context = encode_long_context(pipe, texts, cfg["clip_length"], cfg["t5_length"], cfg["base_t5_length"],
                                  device)
    context = {k: v.to(device) for k, v in context.items()}
    embeds, mask = projector(embeds.to(dtype), context)
    n = len(prompts)

    def rep(t: torch.Tensor) -> torch.Tensor:    # the pipeline's num_images_per_prompt order
        return t.repeat_interleave(num_images_per_prompt, dim=0)

    kwargs = {"prompt_embeds": rep(embeds[:n]), "pooled_prompt_embeds": rep(pooled[:n].to(dtype))}
    masks = rep(mask[:n])
    if cfg_on:   # the pipeline runs [negative, positive] in one batch
        kwargs |= {"negative_prompt_embeds": rep(embeds[n:]),
                   "negative_pooled_prompt_embeds": rep(pooled[n:].to(dtype))}
        masks = torch.cat([rep(mask[n:]), masks])
    kwargs["joint_attention_kwargs"] = {"encoder_attention_mask": masks}
    return kwargs
