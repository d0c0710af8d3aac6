"""Load SD3 / SD3.5 components from a local diffusers directory.

The tiny test model and a real `stable-diffusion-3-medium-diffusers` directory go through the
same functions; nothing here ever reaches a hub (`local_files_only=True`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SD3_PIPELINES = {"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                 "StableDiffusion3InpaintPipeline"}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_sd3_dir(path: str | Path) -> Path:
    """Raise a one-line ValueError unless `path` is a local SD3/SD3.5 diffusers directory."""
    root = Path(path)
    if root.is_file():
        raise ValueError(f"model.path={root} is a single file; megadiff reads a diffusers directory: "
                         "convert it once with StableDiffusion3Pipeline.from_single_file(FILE)"
                         ".save_pretrained(DIR) and set model.path=DIR")
    if not root.is_dir():
        raise ValueError(f"model directory {root} does not exist: set model.path to a local "
                         "SD3/SD3.5 diffusers directory (or run `megadiff make-tiny-model DIR`)")
    index = root / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{index} is missing: model.path must be a diffusers pipeline directory "
                         "(e.g. stable-diffusion-3-medium-diffusers), not a single checkpoint file")
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise ValueError(f"{index} is not valid JSON ({e}): re-download or re-export the model") from None
    if cls not in SD3_PIPELINES:
        raise ValueError(f"{index} describes a {cls}, not an SD3/SD3.5 pipeline: point model.path "
                         "at a StableDiffusion3Pipeline directory")
    tcfg = root / "transformer" / "config.json"
    if not tcfg.is_file() or json.loads(tcfg.read_text()).get("_class_name") != "SD3Transformer2DModel":
        raise ValueError(f"{tcfg} is missing or not an SD3Transformer2DModel config: the directory "
                         "is not a complete SD3 model")
    return root


def transformer_config(path: str | Path) -> dict:
    return json.loads((check_sd3_dir(path) / "transformer" / "config.json").read_text())


def vae_config(path: str | Path) -> dict:
    return json.loads((check_sd3_dir(path) / "vae" / "config.json").read_text())


def vae_scale_factor(vae_cfg: dict) -> int:
    """Pixels per latent pixel: 2^(number of VAE blocks - 1), as diffusers' SD3 pipeline has it."""
    return 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def load_transformer(path: str | Path, dtype: torch.dtype = torch.float32):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(check_sd3_dir(path), subfolder="transformer",
                                                 torch_dtype=dtype, local_files_only=True)


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(check_sd3_dir(path), subfolder="vae", torch_dtype=dtype,
                                        local_files_only=True)
    return vae.eval().requires_grad_(False)


def load_text_pipeline(path: str | Path, dtype: torch.dtype = torch.float32):
    """The SD3 pipeline with only its three text encoders and tokenizers loaded: diffusers'
    own `encode_prompt` (CLIP-L + CLIP-G penultimate states, T5, pooled) does the encoding."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        check_sd3_dir(path), transformer=None, vae=None, torch_dtype=dtype, local_files_only=True)
    for enc in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if enc is not None:
            enc.eval().requires_grad_(False)
    return pipe


@torch.no_grad()
def encode_prompts(text_pipe, prompts: list[str], max_sequence_length: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 77 + T5 len, D], pooled [B, P]) exactly as the SD3 pipeline makes them."""
    embeds, _, pooled, _ = text_pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=torch.device(device),
        do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    return embeds, pooled


@torch.no_grad()
def encode_images(vae, images: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W) -> cached latents `(z - shift_factor) * scaling_factor`
    (the SD3 convention; diffusers `train_dreambooth_sd3.py`)."""
    z = vae.encode(images.to(vae.dtype)).latent_dist.sample(generator)
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_images`: cached latents -> images in [-1, 1]."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z).sample.clamp(-1, 1)
