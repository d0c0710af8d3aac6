"""Versioned MDS column schemas that megadiff writes and reads.

A shard set is a directory with streaming's `index.json` plus `megadiff_schema.json`, which
names the schema, its version and the geometry the trainer must match (latent shape, text
sequence length and width). The trainer checks that file before it reads any sample.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMA_FILE = "megadiff_schema.json"

# Image-text training samples. `latents` are already (z - shift_factor) * scaling_factor.
TRAIN_COLUMNS = {
    "latents": "ndarray:float16",          # (16, H/8, W/8)
    "prompt_embeds": "ndarray:float16",    # (77 + T5 tokens, joint_attention_dim)
    "pooled_prompt_embeds": "ndarray:float16",  # (pooled_projection_dim,)
    "caption": "str",
    "width": "int",                        # original image size in pixels
    "height": "int",
}
SCHEMAS = {"megadiff.train": (1, TRAIN_COLUMNS)}


@dataclass(frozen=True)
class ShardSetInfo:
    schema: str
    version: int
    latent_shape: tuple[int, int, int]
    text_seq_len: int
    text_dim: int
    pooled_dim: int
    num_samples: int = 0

    def write(self, shard_dir: str | Path) -> None:
        Path(shard_dir, SCHEMA_FILE).write_text(json.dumps(asdict(self), indent=1))

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
        raw = json.loads(path.read_text())
        info = cls(**{**raw, "latent_shape": tuple(raw["latent_shape"])})
        if info.schema not in SCHEMAS or info.version != SCHEMAS[info.schema][0]:
            raise ValueError(f"{path}: schema {info.schema} v{info.version} is not one this "
                             f"megadiff reads ({sorted(SCHEMAS)}): rebuild the shards")
        if info.num_samples <= 0:
            raise ValueError(f"{root} holds no samples: rebuild the shard set with data")
        return info
