"""Joint attention with a key-padding mask on the text tokens, for SD3's MMDiT.

diffusers' `JointAttnProcessor2_0` (diffusers 0.39 `models/attention_processor.py`) attends
over the concatenation [image tokens, text tokens] (image first: `torch.cat([query,
encoder_hidden_states_query_proj], dim=2)`) with no mask, so every text position, padding
included, is a key for every query. `MaskedJointAttnProcessor` is the same computation with
one addition: an `encoder_attention_mask` (B, text_len), True for real text tokens, passed
through `joint_attention_kwargs={"encoder_attention_mask": mask}`, removes padded text
positions from the keys of the scaled-dot-product attention. Image keys are always kept, so no
query row is ever fully masked.

What it guarantees (tests/test_context.py):
  - no mask (None): it *is* `JointAttnProcessor2_0.__call__` (bitwise the stock result);
  - a mask that is all True: equal to the stock result up to SDPA kernel rounding;
  - the outputs of image tokens and of real text tokens do not depend on anything at padded
    text positions (their keys get exactly zero attention weight). Outputs *at* padded text
    positions are meaningless; later blocks mask them again, and the model output is read
    from image tokens only.

`install_masked_attention(transformer)` swaps it in for every `JointAttnProcessor2_0` of an
`SD3Transformer2DModel` (SD3.5's second, image-only attention `attn2` included: it accepts and
ignores the mask). megadiff installs it only when `context.enabled`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0


class MaskedJointAttnProcessor(JointAttnProcessor2_0):
    """`JointAttnProcessor2_0` plus a key-padding mask over the text tokens."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 encoder_attention_mask: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if encoder_attention_mask is None or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                    *args, **kwargs)
        if attention_mask is not None:
            raise ValueError("MaskedJointAttnProcessor takes encoder_attention_mask, not attention_mask")
        batch_size, image_len = hidden_states.shape[:2]
        text_len = encoder_hidden_states.shape[1]
        if tuple(encoder_attention_mask.shape) != (batch_size, text_len):
            raise ValueError(f"encoder_attention_mask has shape {tuple(encoder_attention_mask.shape)}, "
                             f"the text sequence is ({batch_size}, {text_len})")

        # From here on, JointAttnProcessor2_0.__call__ line by line, except for `keep`.
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        ctx_query = heads(attn.add_q_proj(encoder_hidden_states))
        ctx_key = heads(attn.add_k_proj(encoder_hidden_states))
        ctx_value = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            ctx_query = attn.norm_added_q(ctx_query)
        if attn.norm_added_k is not None:
            ctx_key = attn.norm_added_k(ctx_key)
        query = torch.cat([query, ctx_query], dim=2)      # [image, text], as diffusers orders them
        key = torch.cat([key, ctx_key], dim=2)
        value = torch.cat([value, ctx_value], dim=2)

        keep = torch.cat([torch.ones(batch_size, image_len, dtype=torch.bool, device=query.device),
                          encoder_attention_mask.to(device=query.device, dtype=torch.bool)], dim=1)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=keep[:, None, None, :],
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states, encoder_hidden_states = hidden_states[:, :image_len], hidden_states[:, image_len:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states, encoder_hidden_states


def install_masked_attention(transformer) -> None:
    """Use `MaskedJointAttnProcessor` in every attention layer of an `SD3Transformer2DModel`
    (idempotent). Any processor other than the stock joint one (fused QKV, IP-adapter, a
    custom one) is refused rather than silently replaced."""
    processors = transformer.attn_processors
    others = sorted({type(p).__name__ for p in processors.values()
                     if type(p) not in (JointAttnProcessor2_0, MaskedJointAttnProcessor)})
    if others:
        raise ValueError(f"the context extension masks padded text tokens in JointAttnProcessor2_0, "
                         f"but this transformer uses {', '.join(others)}: reset it with "
                         "`transformer.set_attn_processor(JointAttnProcessor2_0())` first")
    processor = MaskedJointAttnProcessor()
    transformer.set_attn_processor({name: processor for name in processors})
