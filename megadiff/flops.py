"""Analytic FLOP count of diffusers' ``SD3Transformer2DModel`` (MMDiT), from its config alone.

Follows the compute of diffusers 0.39:

* ``models/transformers/transformer_sd3.py`` -- ``SD3Transformer2DModel.forward``: ``pos_embed``
  (``PatchEmbed``), ``time_text_embed`` (``CombinedTimestepTextProjEmbeddings``), ``context_embedder``,
  ``num_layers`` x ``JointTransformerBlock`` (the last one ``context_pre_only``), ``norm_out``
  (``AdaLayerNormContinuous``) and ``proj_out``.
* ``models/attention.py`` -- ``JointTransformerBlock`` (``AdaLayerNormZero`` or, for blocks listed in
  ``dual_attention_layers``, ``SD35AdaLayerNormZeroX`` plus an image-only ``attn2``) and ``FeedForward``
  (``gelu-approximate``, hidden = 4 x dim).
* ``models/attention_processor.py`` -- ``JointAttnProcessor2_0``: q/k/v of image and text tokens, one SDPA
  over the joint sequence (image tokens + text tokens), ``to_out`` for image and ``to_add_out`` for text
  (the latter absent in the last block, which still projects text q/k/v).
* ``models/embeddings.py`` -- ``PatchEmbed`` (a p x p, stride p Conv2d), ``TimestepEmbedding``
  (256 -> D -> D) and ``PixArtAlphaTextProjection`` (pooled -> D -> D).

Convention (the one of ``torch.utils.flop_counter.FlopCounterMode``): a matmul / linear / conv costs
2*M*N*K; bias adds, norms (incl. ``qk_norm``'s RMSNorm), activations, softmax and other elementwise ops
are not counted. Attention counts its two matmuls, QK^T and AV: 4 * S^2 * D for a sequence of S tokens
and D = heads * head_dim channels. Note FlopCounterMode only sees these when SDPA runs a kernel it knows:
in torch 2.14 the CUDA flash / mem-efficient / cuDNN kernels and the MATH backend (which decomposes into
``bmm``) are counted, while the default CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``) is
counted as 0. ``FlopBreakdown.attention`` holds the SDPA share so the two can be told apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

# SD3Transformer2DModel.__init__ defaults, for keys a config may leave out.
_DEFAULTS = {
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 18,
    "attention_head_dim": 64,
    "num_attention_heads": 18,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "dual_attention_layers": (),
}
_TIMESTEP_CHANNELS = 256  # CombinedTimestepTextProjEmbeddings: Timesteps(num_channels=256)
_FF_MULT = 4  # FeedForward(mult=4)


@dataclass(frozen=True)
class FlopBreakdown:
    forward: float  # FLOPs of one forward pass for ONE sample
    attention: float = 0.0  # the part of `forward` spent in SDPA (QK^T and AV)

    def training(self, activation_checkpointing: bool) -> float:
        """fwd + bwd ~= 3 x forward (backward = 2 x forward); + 1 forward when activations are recomputed.

        (diffusers' gradient checkpointing recomputes only the transformer blocks, not the embedders and
        final layer; those are well under 1% of the total, so the whole forward is counted.)
        """
        return self.forward * (4.0 if activation_checkpointing else 3.0)


def _cfg(config: Mapping, key: str):
    value = config.get(key)
    return _DEFAULTS[key] if value is None else value


def mmdit_forward_flops(
    config: Mapping, latent_height: int, latent_width: int, text_seq_len: int
) -> FlopBreakdown:
    """Forward FLOPs of one sample: latents (in_channels, latent_height, latent_width), text (text_seq_len, J)."""
    p = int(_cfg(config, "patch_size"))
    if latent_height <= 0 or latent_width <= 0 or latent_height % p or latent_width % p:
        raise ValueError(f"latent size {latent_height}x{latent_width} must be positive multiples of patch_size {p}")
    if text_seq_len < 0:
        raise ValueError(f"text_seq_len must be >= 0, got {text_seq_len}")
    c_in = int(_cfg(config, "in_channels"))
    c_out = int(config.get("out_channels", _DEFAULTS["out_channels"]) or c_in)  # None -> in_channels
    num_layers = int(_cfg(config, "num_layers"))
    d = int(_cfg(config, "num_attention_heads")) * int(_cfg(config, "attention_head_dim"))  # inner_dim
    dual = {int(i) for i in _cfg(config, "dual_attention_layers")}

    n = (latent_height // p) * (latent_width // p)  # image tokens
    l = text_seq_len  # text tokens
    s = n + l  # joint sequence

    def linear(tokens, d_in, d_out):
        return 2.0 * tokens * d_in * d_out

    def sdpa(seq):  # QK^T and AV, summed over heads
        return 2 * 2.0 * seq * seq * d

    # Embeddings.
    flops = linear(n, c_in * p * p, d)  # PatchEmbed Conv2d(k=p, stride=p) == a linear per patch
    flops += linear(1, _TIMESTEP_CHANNELS, d) + linear(1, d, d)  # TimestepEmbedding
    flops += linear(1, int(_cfg(config, "pooled_projection_dim")), d) + linear(1, d, d)  # PixArtAlphaTextProjection
    flops += linear(l, int(_cfg(config, "joint_attention_dim")), int(_cfg(config, "caption_projection_dim")))

    attention = 0.0
    for i in range(num_layers):
        last = i == num_layers - 1  # context_pre_only
        flops += linear(1, d, (9 if i in dual else 6) * d)  # norm1: SD35AdaLayerNormZeroX / AdaLayerNormZero
        flops += linear(1, d, (2 if last else 6) * d)  # norm1_context: AdaLayerNormContinuous / AdaLayerNormZero
        flops += linear(n, d, 3 * d) + linear(l, d, 3 * d)  # to_q/k/v, add_q/k/v_proj
        attention += sdpa(s)
        flops += linear(n, d, d)  # to_out[0]
        flops += linear(n, d, _FF_MULT * d) + linear(n, _FF_MULT * d, d)  # ff
        if not last:
            flops += linear(l, d, d)  # to_add_out
            flops += linear(l, d, _FF_MULT * d) + linear(l, _FF_MULT * d, d)  # ff_context
        if i in dual:  # attn2: image-only self-attention
            flops += linear(n, d, 3 * d) + linear(n, d, d)
            attention += sdpa(n)

    flops += linear(1, d, 2 * d)  # norm_out: AdaLayerNormContinuous
    flops += linear(n, d, p * p * c_out)  # proj_out
    return FlopBreakdown(forward=flops + attention, attention=attention)


def model_flops_per_sample(
    config: Mapping,
    latent_height: int,
    latent_width: int,
    text_seq_len: int,
    activation_checkpointing: bool = False,
) -> float:
    """Training FLOPs (forward + backward, + recompute) of one sample."""
    return mmdit_forward_flops(config, latent_height, latent_width, text_seq_len).training(activation_checkpointing)
