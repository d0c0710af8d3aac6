"""Versioned MDS column schemas that megadiff writes and reads.

A shard set is a directory with streaming's `index.json` plus `megadiff_schema.json`, which
names the schema, its version and the geometry the trainer must match (latent shape, text
sequence length and width). The trainer checks that file before it reads any sample.

Schemas (every ndarray column is float16; cached latents are `(z - shift_factor) *
scaling_factor`; `prompt_embeds` is SD3's joint text sequence: CLIP-L and CLIP-G penultimate
hidden states concatenated and zero-padded to the T5 width (77 tokens), then the T5 states):

  megadiff.train v1          latents (C, H/8, W/8), prompt_embeds (77 + T5 len, D),
                             pooled_prompt_embeds (P,) = CLIP-L pooled ++ CLIP-G pooled,
                             caption str, width / height int (the original image size)
  megadiff.train_context v1  megadiff.train's columns plus the long-prompt context
                             (`megadiff data build --long-context N`, megadiff/models/context.py):
                             context_clip (max(1, E_clip), CLIP-L + CLIP-G width) float16,
                             context_clip_mask (max(1, E_clip),) uint8, context_t5
                             (max(1, E_t5), T5 width) float16, context_t5_mask uint8; E_clip and
                             E_t5 (0 = that encoder is not extended: one masked row) and the
                             encoding settings are `context` in megadiff_schema.json
  megadiff.prompts v1        caption str                      (data-free distillation, RL)
  megadiff.prompt_embeds v1  caption, prompt_embeds, pooled_prompt_embeds
  megadiff.pairs v1          latents_w, latents_l (preferred / other image), prompt_embeds,
                             pooled_prompt_embeds, caption, label_w float32 (1.0: latents_w is
                             the preferred image; 0.5: a tie kept with --keep-ties)

A set built by `megadiff data` also holds `megadiff_build.json` (inputs, settings and
summary of each build, and the part directories the index joins) and, in every part
directory, `keys.jsonl` (the source of each sample, in shard order) and `skipped.jsonl`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SCHEMA_FILE = "megadiff_schema.json"
BUILD_FILE = "megadiff_build.json"
KEYS_FILE = "keys.jsonl"
SKIPPED_FILE = "skipped.jsonl"
DONE_FILE = "megadiff_done.json"

# Image-text training samples. `latents` are already (z - shift_factor) * scaling_factor.
TRAIN_COLUMNS = {
    "latents": "ndarray:float16",          # (16, H/8, W/8)
    "prompt_embeds": "ndarray:float16",    # (77 + T5 tokens, joint_attention_dim)
    "pooled_prompt_embeds": "ndarray:float16",  # (pooled_projection_dim,)
    "caption": "str",
    "width": "int",                        # original image size in pixels
    "height": "int",
}
PROMPT_COLUMNS = {"caption": "str"}
PROMPT_EMBED_COLUMNS = {
    "caption": "str",
    "prompt_embeds": "ndarray:float16",
    "pooled_prompt_embeds": "ndarray:float16",
}
PAIR_COLUMNS = {
    "latents_w": "ndarray:float16",        # the preferred image (jpg_0 when label_0 == 1)
    "latents_l": "ndarray:float16",
    "prompt_embeds": "ndarray:float16",
    "pooled_prompt_embeds": "ndarray:float16",
    "caption": "str",
    "label_w": "float32",                  # 1.0, or 0.5 for a tie kept with --keep-ties
}
# megadiff.train plus the extra context of long prompts (megadiff/models/context.py). Masks are
# 1 for real tokens; masked rows are zero.
TRAIN_CONTEXT_COLUMNS = {
    **TRAIN_COLUMNS,
    "context_clip": "ndarray:float16",       # (max(1, E_clip), CLIP-L + CLIP-G width)
    "context_clip_mask": "ndarray:uint8",    # (max(1, E_clip),)
    "context_t5": "ndarray:float16",         # (max(1, E_t5), T5 width)
    "context_t5_mask": "ndarray:uint8",      # (max(1, E_t5),)
}
SCHEMAS = {
    "megadiff.train": (1, TRAIN_COLUMNS),
    "megadiff.train_context": (1, TRAIN_CONTEXT_COLUMNS),
    "megadiff.prompts": (1, PROMPT_COLUMNS),
    "megadiff.prompt_embeds": (1, PROMPT_EMBED_COLUMNS),
    "megadiff.pairs": (1, PAIR_COLUMNS),
}
# Columns holding latents / text, per schema: what `verify` checks shapes of.
LATENT_COLUMNS = {"megadiff.train": ("latents",), "megadiff.train_context": ("latents",),
                  "megadiff.pairs": ("latents_w", "latents_l")}
TEXT_SCHEMAS = ("megadiff.train", "megadiff.train_context", "megadiff.prompt_embeds", "megadiff.pairs")


@dataclass(frozen=True)
class ShardSetInfo:
    schema: str
    version: int
    latent_shape: tuple[int, int, int]     # (0, 0, 0) for prompt sets
    text_seq_len: int                      # 0 for prompt sets without embeddings
    text_dim: int
    pooled_dim: int
    num_samples: int = 0
    context: dict | None = None            # megadiff.train_context: long-context geometry

    def write(self, shard_dir: str | Path) -> None:
        path = Path(shard_dir, SCHEMA_FILE)
        tmp = path.with_name(path.name + ".tmp")
        fields_ = asdict(self)
        if fields_["context"] is None:     # sets without long context keep their v1 file
            del fields_["context"]
        tmp.write_text(json.dumps(fields_, indent=1))
        tmp.replace(path)

    def compatible(self, other: "ShardSetInfo") -> bool:
        """Same schema and geometry (sample counts may differ): the sets can be joined."""
        return (self.schema, self.version, tuple(self.latent_shape), self.text_seq_len,
                self.text_dim, self.pooled_dim, self.context) == (
                    other.schema, other.version, tuple(other.latent_shape), other.text_seq_len,
                    other.text_dim, other.pooled_dim, other.context)

    def describe(self) -> str:
        parts = [f"{self.schema} v{self.version}", f"{self.num_samples} samples"]
        if any(self.latent_shape):
            parts.append(f"latents {'x'.join(map(str, self.latent_shape))}")
        if self.text_seq_len:
            parts.append(f"text {self.text_seq_len}x{self.text_dim}, pooled {self.pooled_dim}")
        if self.context:
            parts.append(f"long context +{self.context['clip_extra']} CLIP, "
                         f"+{self.context['t5_extra']} T5 tokens")
        return ", ".join(parts)

    @classmethod
    def read(cls, shard_dir: str | Path) -> "ShardSetInfo":
        root = Path(shard_dir)
        if not root.is_dir():
            raise ValueError(f"shard directory {root} does not exist: set data.local (or build "
                             "shards with `megadiff data build`)")
        if not (root / "index.json").is_file():
            raise ValueError(f"{root / 'index.json'} is missing: {root} is not an MDS shard set "
                             "(build one with `megadiff data build`)")
        path = root / SCHEMA_FILE
        if not path.is_file():
            raise ValueError(f"{path} is missing: the shards were not written by megadiff; "
                             "rebuild them with `megadiff data build`")
        try:
            raw = json.loads(path.read_text())
            known = {f.name for f in fields(cls)}
            values = {k: v for k, v in raw.items() if k in known}
            values["latent_shape"] = tuple(raw["latent_shape"])
            info = cls(**values)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}): rebuild the shard "
                             "set with `megadiff data build`") from None
        if info.schema not in SCHEMAS or info.version != SCHEMAS[info.schema][0]:
            raise ValueError(f"{path}: schema {info.schema} v{info.version} is not one this "
                             f"megadiff reads ({sorted(SCHEMAS)}): rebuild the shards")
        if info.num_samples <= 0:
            raise ValueError(f"{root} holds no samples: rebuild the shard set with data")
        return info
