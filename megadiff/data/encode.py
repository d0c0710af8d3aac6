"""Batched encoders for the shard builders: the SD3 VAE (cached latents) and the three text
encoders (diffusers' own `encode_prompt`), loaded once per process from a local directory.

Latents are drawn per sample: `z = mean + std * noise` with the noise from a generator seeded
by `sample_seed(seed, key)`, so a sample's latent depends only on its image, the seed and its
key, never on which rank, batch or resumed run encoded it. `--latents mean` stores the
distribution mean instead (deterministic, what some fine-tuning recipes prefer).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import torch

from megadiff.models import sd3

DEFAULT_T5_LENGTH = 256   # StableDiffusion3Pipeline's default max_sequence_length


def sample_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the build seed and the sample's key."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def default_max_sequence_length(model_path: str | Path) -> int:
    """256 (the pipeline default) capped at the T5 tokenizer's own limit (32 for the tiny model)."""
    cfg = Path(model_path, "tokenizer_3", "tokenizer_config.json")
    try:
        limit = int(json.loads(cfg.read_text()).get("model_max_length", DEFAULT_T5_LENGTH))
    except (OSError, ValueError, TypeError):
        return DEFAULT_T5_LENGTH
    return min(DEFAULT_T5_LENGTH, limit)


def default_resolution(model_path: str | Path) -> int:
    """The transformer's native resolution: sample_size x the VAE's downsampling factor."""
    tc = sd3.transformer_config(model_path)
    vc = sd3.vae_config(model_path)
    return int(tc["sample_size"]) * sd3.vae_scale_factor(vc)


def model_identity(model_path: str | Path) -> dict:
    """Configs and weight-file sizes/mtimes of the parts the builders use: a build resumes only
    with the same model."""
    root = sd3.check_sd3_dir(model_path)
    files = {}
    for sub in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                "tokenizer_2", "tokenizer_3"):
        for p in sorted(Path(root, sub).glob("*")) if Path(root, sub).is_dir() else ():
            if p.is_file():
                st = p.stat()
                files[f"{sub}/{p.name}"] = [st.st_size, st.st_mtime_ns]
    return {"path": str(root.resolve()), "files": files}


def _quiet() -> None:
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


@functools.lru_cache(maxsize=4)
def _vae(path: str, dtype: str, device: str):
    _quiet()
    return sd3.load_vae(path, sd3.DTYPES[dtype]).to(device)


@functools.lru_cache(maxsize=4)
def _text(path: str, dtype: str, device: str):
    _quiet()
    return sd3.load_text_pipeline(path, sd3.DTYPES[dtype]).to(device)


def pick_device(device: str, slot: int) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{slot % torch.cuda.device_count()}"
    return "cpu"


class Encoders:
    """The VAE and/or text encoders of one model, in one dtype, on one device."""

    def __init__(self, model_path: str | Path, dtype: str = "fp32", device: str = "cpu",
                 vae: bool = True, text: bool = True, max_sequence_length: int | None = None):
        if dtype not in ("fp32", "bf16"):
            raise ValueError(f"--dtype {dtype}: the builders encode in fp32 or bf16")
        path = str(sd3.check_sd3_dir(model_path))
        self.device = torch.device(device)
        self.vae = _vae(path, dtype, device) if vae else None
        self.text = _text(path, dtype, device) if text else None
        self.max_sequence_length = max_sequence_length or default_max_sequence_length(path)

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, seeds: list[int] | None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> float32 `(z - shift_factor) * scaling_factor` on the CPU;
        `seeds=None` takes the mean of the latent distribution."""
        vae = self.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
        if seeds is None:
            z = mean
        else:
            noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(s))
                                 for s in seeds])
            z = mean + std * noise
        return (z - vae.config.shift_factor) * vae.config.scaling_factor

    @torch.no_grad()
    def prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (B, 77 + T5 len, D), pooled (B, P)), float32 on the CPU."""
        embeds, pooled = sd3.encode_prompts(self.text, captions, self.max_sequence_length,
                                            device=self.device)
        return embeds.float().cpu(), pooled.float().cpu()
