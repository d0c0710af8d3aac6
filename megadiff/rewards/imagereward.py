"""ImageReward (`kind: imagereward`): BLIP ViT-L/16 + a BERT text encoder that cross-attends to
the image, and an MLP head on the text encoder's [CLS] output (THUDM/ImageReward,
ImageReward/ImageReward.py `ImageReward.score`):

    image_embeds = blip.visual_encoder(preprocess(image))                 # [B, 197, 1024]
    cls = blip.text_encoder(ids, mask, encoder_hidden_states=image_embeds).last_hidden_state[:, 0]
    ImageReward = (mlp(cls) - 0.16717362830052426) / 1.0333394966054072

The prompt is tokenised with BLIP's `init_tokenizer` (ImageReward/models/BLIP/blip.py:
bert-base-uncased plus the special tokens [DEC] and [ENC]), padded to max_length=35. The image
preprocessing is `_transform(224)` (bicubic shortest side to 224, centre crop, OpenAI CLIP
mean/std) as differentiable tensor ops.

Files: `path` is ImageReward.pt, the plain state dict `ImageReward.load` reads (keys
`blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`; BLIP's unused `vision_proj` /
`text_proj` are ignored); `clip_path` is the local bert-base-uncased tokenizer directory
(vocab.txt). The towers are transformers' `BlipVisionModel` (same pre-norm ViT as BLIP's
models/BLIP/vit.py, fused qkv) and `BlipTextModel` (a port of BLIP's models/BLIP/med.py, with
cross-attention, called in its bidirectional encoder mode); widths, depths, patch size and
vocabulary are read from the checkpoint's shapes, with 64-dimensional attention heads
(ViT-L: 1024/16, BERT-base: 768/12).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from megadiff.rewards.base import RewardModel
from megadiff.rewards.checkpoint import (bad_file, first_line, load_state_dict_file, load_strict,
                                         require_path)
from megadiff.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, ImagePreprocess

FORMAT = "an ImageReward state dict (ImageReward.pt: blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*)"
TOKENIZER_FORMAT = "a bert-base-uncased tokenizer directory (vocab.txt)"
MEAN, STD = 0.16717362830052426, 1.0333394966054072     # ImageReward.py ImageReward.__init__
MAX_LENGTH = 35                                         # ImageReward.py ImageReward.score
HEAD_DIM = 64
IMAGE_SIZE = 224
MLP_LINEARS = (0, 2, 4, 6, 7)       # ImageReward.py MLP: Linear/Dropout x3, Linear, Linear
IGNORED = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")

_VIT_RENAMES = (("cls_token", "embeddings.class_embedding"),
                ("pos_embed", "embeddings.position_embedding"),
                ("patch_embed.proj.", "embeddings.patch_embedding."),
                ("norm.", "post_layernorm."))
_BLOCK_RENAMES = (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."),
                  ("attn.qkv.", "self_attn.qkv."), ("attn.proj.", "self_attn.projection."),
                  ("mlp.", "mlp."))


def map_key(key: str) -> str | None:
    """ImageReward.pt name -> our module's name (None: not ours, reported as unexpected)."""
    if key.startswith("mlp.layers."):
        return key
    if key.startswith("blip.text_encoder."):
        return "text." + key[len("blip.text_encoder."):]
    if not key.startswith("blip.visual_encoder."):
        return None
    k = key[len("blip.visual_encoder."):]
    m = re.match(r"blocks\.(\d+)\.(.*)$", k)
    if m:
        for old, new in _BLOCK_RENAMES:
            if m.group(2).startswith(old):
                return f"vision.encoder.layers.{m.group(1)}.{new}{m.group(2)[len(old):]}"
        return None
    for old, new in _VIT_RENAMES:
        if k == old or (old.endswith(".") and k.startswith(old)):
            return "vision." + new + k[len(old):]
    return None


class MLPHead(nn.Module):
    """ImageReward.py `MLP`: five Linears without activations (dropout off when frozen)."""

    def __init__(self, widths: list[int]):
        super().__init__()
        self.layers = _mlp_layers(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _mlp_layers(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < 3:
            layers.append(nn.Dropout(0.0))
    assert len(layers) == 8 and [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)] == list(MLP_LINEARS)
    return nn.Sequential(*layers)


class ImageRewardModel(RewardModel):
    def __init__(self, vision, text, mlp: MLPHead, tokenizer, name: str = "imagereward"):
        super().__init__()
        self.vision, self.text, self.mlp = vision, text, mlp
        self.tokenizer = tokenizer
        self.preprocess = ImagePreprocess(size=IMAGE_SIZE, resize_mode="shortest",
                                          mean=OPENAI_MEAN, std=OPENAI_STD)
        self.name = name

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's token embeddings [B, 1 + patches, D] (the text encoder cross-attends to all)."""
        p = self.vision.post_layernorm.weight
        x = self.preprocess(images.to(p.device).float()).to(p.dtype)
        return self.vision(pixel_values=x).last_hidden_state

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Token ids and attention mask stacked as [B, 2, 35] (long): ImageReward's text side is
        only computed jointly with the image, in `score_features`."""
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=MAX_LENGTH, return_tensors="pt")
        return torch.stack([tok.input_ids, tok.attention_mask], dim=1).to(self.vision.post_layernorm.weight.device)

    def score_features(self, image_features: torch.Tensor,
                       text_features: torch.Tensor | None) -> torch.Tensor:
        assert text_features is not None and text_features.shape[0] == image_features.shape[0]
        atts = torch.ones(image_features.shape[:-1], dtype=torch.long, device=image_features.device)
        out = self.text(input_ids=text_features[:, 0], attention_mask=text_features[:, 1],
                        encoder_hidden_states=image_features, encoder_attention_mask=atts,
                        is_decoder=False, return_dict=True)
        reward = self.mlp(out.last_hidden_state[:, 0, :]).squeeze(-1)
        return (reward.float() - MEAN) / STD


def _shape(label: str, path: Path, state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise bad_file(label, path, FORMAT, f"wrong architecture: no {key}")
    return tuple(state[key].shape)


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def build_towers(label: str, path: Path, state: dict[str, torch.Tensor]):
    """Vision/text/MLP modules shaped like the checkpoint (ImageReward's BLIP_Pretrain(vit='large'))."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    v = "blip.visual_encoder."
    vw = _shape(label, path, state, v + "cls_token")[-1]
    patch = _shape(label, path, state, v + "patch_embed.proj.weight")[-1]
    n_pos = _shape(label, path, state, v + "pos_embed")[1]
    grid = IMAGE_SIZE // patch
    if n_pos != grid * grid + 1:
        raise bad_file(label, path, FORMAT, f"pos_embed has {n_pos} positions, a {IMAGE_SIZE}px image "
                                            f"with {patch}px patches needs {grid * grid + 1}")
    vision_cfg = BlipVisionConfig(
        hidden_size=vw, intermediate_size=_shape(label, path, state, v + "blocks.0.mlp.fc1.weight")[0],
        num_hidden_layers=_count(state, r"blip\.visual_encoder\.blocks\.(\d+)\."),
        num_attention_heads=max(1, vw // HEAD_DIM), image_size=IMAGE_SIZE, patch_size=patch,
        layer_norm_eps=1e-6, hidden_act="gelu")               # vit.py: LayerNorm(eps=1e-6), nn.GELU
    t = "blip.text_encoder."
    vocab, tw = _shape(label, path, state, t + "embeddings.word_embeddings.weight")
    text_cfg = BlipTextConfig(
        vocab_size=vocab, hidden_size=tw,
        encoder_hidden_size=_shape(label, path, state, t + "encoder.layer.0.crossattention.self.key.weight")[1],
        intermediate_size=_shape(label, path, state, t + "encoder.layer.0.intermediate.dense.weight")[0],
        num_hidden_layers=_count(state, r"blip\.text_encoder\.encoder\.layer\.(\d+)\."),
        num_attention_heads=max(1, tw // HEAD_DIM),
        max_position_embeddings=_shape(label, path, state, t + "embeddings.position_embeddings.weight")[0],
        layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0, is_decoder=True)   # med_config.json
    widths = [_shape(label, path, state, f"mlp.layers.{i}.weight")[1] for i in MLP_LINEARS[:1]]
    widths += [_shape(label, path, state, f"mlp.layers.{i}.weight")[0] for i in MLP_LINEARS]
    vision = BlipVisionModel(vision_cfg)
    text = BlipTextModel(text_cfg, add_pooling_layer=False)
    return vision, text, MLPHead(widths)


def load_tokenizer(label: str, tok_path: str | None, vocab_size: int):
    """BLIP's init_tokenizer, from a local directory: BertTokenizer + [DEC] (bos) + [ENC]."""
    from transformers import BertTokenizer

    d = require_path(label, tok_path, TOKENIZER_FORMAT, key="clip_path", directory=True)
    try:
        tok = BertTokenizer.from_pretrained(d, local_files_only=True)
    except Exception as e:
        raise bad_file(label, d, TOKENIZER_FORMAT, f"no tokenizer: {first_line(e)}") from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tok) > vocab_size:
        raise ValueError(f"{label}: the tokenizer in {d} has {len(tok)} tokens with [DEC]/[ENC] but the "
                         f"checkpoint embeds {vocab_size}: set clip_path to bert-base-uncased's tokenizer")
    return tok


def load_imagereward(path: str | None, tokenizer_path: str | None, name: str) -> ImageRewardModel:
    label = f"reward {name} (imagereward)"
    p = require_path(label, path, FORMAT)
    state = load_state_dict_file(label, p, FORMAT)
    vision, text, mlp = build_towers(label, p, state)
    mapped: dict[str, torch.Tensor] = {}
    for k, val in state.items():
        if IGNORED.match(k):
            continue
        mapped[map_key(k) or k] = val      # an unmapped name shows up as an unexpected key
    tokenizer = load_tokenizer(label, tokenizer_path, text.config.vocab_size)
    model = ImageRewardModel(vision, text, mlp, tokenizer, name=name)
    load_strict(label, model, mapped, p, FORMAT)
    return model
