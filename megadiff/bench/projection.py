"""FLOP-count agreement with torch.utils.flop_counter, and PROJECTED throughput and memory of
SD3-M, SD3.5-M and SD3.5-L on A100 / H100 (computed from formulas, not measured).

Projection, per GPU, for one training sample at a resolution (latents 16 x res/8 x res/8,
text 77 CLIP + 256 T5 tokens):

  train FLOPs/sample = megadiff.flops.model_flops_per_sample(config, h, w, 333, checkpointing)
                       (forward x 3, x 4 with activation checkpointing)
  samples/s/GPU      = MFU x peak bf16 FLOP/s / train FLOPs/sample
  model states/GPU   = 16 bytes x params / N  (ZeRO-3 over N GPUs, mixed-precision Adam;
                       ZeRO, Rajbhandari et al. 2020), activations not included

Peak dense bf16: A100 312 TFLOP/s, H100 SXM 989 TFLOP/s (NVIDIA data sheets; the same table
as megadiff.logger.PEAK_BF16_TFLOPS). The MFU is an assumption the caller states (default 0.40).
Transformer configs: the published transformer/config.json of stabilityai's
stable-diffusion-3-medium-diffusers, stable-diffusion-3.5-medium and stable-diffusion-3.5-large.
"""
from __future__ import annotations

from dataclasses import dataclass

from megadiff.logger import PEAK_BF16_TFLOPS

PEAK_TFLOPS = {gpu: PEAK_BF16_TFLOPS[gpu] for gpu in ("A100", "H100")}
TEXT_TOKENS = 77 + 256
# Published transformer/config.json values (stabilityai/stable-diffusion-3-medium-diffusers,
# stable-diffusion-3.5-medium, stable-diffusion-3.5-large); tests/test_flops.py checks the
# FLOP count on exactly these.
_FULL = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=4096,
             pooled_projection_dim=2048, attention_head_dim=64)
MODELS = {
    "SD3-M": dict(_FULL, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                  pos_embed_max_size=192),
    "SD3.5-M": dict(_FULL, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "SD3.5-L": dict(_FULL, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                    pos_embed_max_size=192, qk_norm="rms_norm"),
}
RESOLUTIONS = (512, 1024)


def param_count(config: dict) -> int:
    """Parameters of SD3Transformer2DModel(**config), built on the meta device (no memory)."""
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Projection:
    gpu: str
    model: str
    resolution: int
    params: int
    flops_per_sample: float       # training FLOPs
    mfu: float
    world: int

    @property
    def samples_per_s(self) -> float:
        return self.mfu * PEAK_TFLOPS[self.gpu] * 1e12 / self.flops_per_sample

    @property
    def state_bytes_per_gpu(self) -> float:
        return 16.0 * self.params / self.world


def projections(mfu: float = 0.40, world: int = 8, checkpointing: bool = True,
                params: dict[str, int] | None = None) -> list[Projection]:
    from megadiff.flops import model_flops_per_sample

    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu {mfu} must be in (0, 1]: the assumed model FLOP utilisation")
    params = params or {name: param_count(cfg) for name, cfg in MODELS.items()}
    out = []
    for gpu in PEAK_TFLOPS:
        for name, cfg in MODELS.items():
            for res in RESOLUTIONS:
                f = model_flops_per_sample(cfg, res // 8, res // 8, TEXT_TOKENS, checkpointing)
                out.append(Projection(gpu, name, res, params[name], f, mfu, world))
    return out


def flop_agreement(config: dict, latent: int, text_len: int, batch: int = 1) -> dict:
    """Forward FLOPs of a real SD3Transformer2DModel(config): megadiff.flops' analytic count
    vs torch.utils.flop_counter.FlopCounterMode (SDPA under the MATH backend, which the
    counter sees as two bmm's; its CPU flash kernel counts 0, see megadiff/flops.py)."""
    import torch
    from diffusers import SD3Transformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megadiff.flops import mmdit_forward_flops

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**config).eval()
    args = (torch.randn(batch, config["in_channels"], latent, latent),
            torch.randn(batch, text_len, config["joint_attention_dim"]),
            torch.randn(batch, config["pooled_projection_dim"]), torch.full((batch,), 500.0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(*args)
    counted = int(counter.get_total_flops())
    analytic = mmdit_forward_flops(config, latent, latent, text_len).forward * batch
    return {"counted": counted, "analytic": analytic, "exact": counted == int(analytic),
            "relative_error": abs(analytic - counted) / counted}
