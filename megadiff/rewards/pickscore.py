"""PickScore (`kind: pickscore`): a transformers CLIPModel directory (yuvalkirstain/PickScore_v1).

yuvalkirstain/PickScore README: images and prompts through the CLIP-ViT-H-14 processor
(laion/CLIP-ViT-H-14-laion2B-s32B-b79K: shortest side to 224 bicubic, centre crop, OpenAI
mean/std; text truncated to 77 tokens), then
    PickScore = exp(logit_scale) * <normalize(get_image_features), normalize(get_text_features)>
`path` is the model directory (config.json + weights). The processor files
(preprocessor_config.json and the tokenizer) are read from `clip_path` when set, else from
`path` (PickScore_v1 itself ships without them; the laion ViT-H-14 repo has them).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from megadiff.rewards.base import RewardModel
from megadiff.rewards.checkpoint import first_line, bad_file, require_path
from megadiff.rewards.preprocess import ImagePreprocess

MODEL_FORMAT = ("a transformers CLIPModel directory (config.json with model_type clip + weights, "
                "e.g. PickScore_v1)")
PROC_FORMAT = ("a CLIP processor directory (preprocessor_config.json + tokenizer files, "
               "e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")


class PickScoreReward(RewardModel):
    def __init__(self, model, tokenizer, preprocess: ImagePreprocess, name: str = "pickscore"):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        p = self.model.logit_scale
        x = self.preprocess(images.to(p.device).float()).to(p.dtype)
        return F.normalize(self.model.get_image_features(pixel_values=x), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        # Causal text tower pooled at EOS: padding to 77 gives the same features as padding=True.
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=77,
                             return_tensors="pt").to(self.model.logit_scale.device)
        feats = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
        return F.normalize(feats, dim=-1)

    def score_features(self, image_features: torch.Tensor,
                       text_features: torch.Tensor | None) -> torch.Tensor:
        assert text_features is not None and image_features.shape == text_features.shape
        scale = self.model.logit_scale.float().exp()
        return scale * (image_features.float() * text_features.float()).sum(-1)


def _image_preprocess(label: str, proc_dir: Path) -> ImagePreprocess:
    f = proc_dir / "preprocessor_config.json"
    if not f.is_file():
        raise ValueError(f"{label}: {proc_dir} has no preprocessor_config.json: set clip_path to "
                         f"{PROC_FORMAT}")
    try:
        c = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise bad_file(label, f, PROC_FORMAT, f"invalid JSON: {e}") from None
    size = c.get("size", 224)
    size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop = c.get("crop_size", size)
    crop = crop.get("height") if isinstance(crop, dict) else crop
    if size != crop or c.get("resample", 3) != 3 or not c.get("do_center_crop", True):
        raise ValueError(f"{label}: {f} resizes to {size} and crops to {crop} (resample "
                         f"{c.get('resample')}): only CLIP's bicubic shortest-side resize with an "
                         "equal centre crop is supported")
    return ImagePreprocess(size=int(size), resize_mode="shortest", crop_offset="floor",
                           mean=tuple(c.get("image_mean")), std=tuple(c.get("image_std")))


def load_pickscore(path: str | None, clip_path: str | None, dtype: torch.dtype,
                   name: str) -> PickScoreReward:
    from transformers import AutoTokenizer, CLIPModel

    label = f"reward {name} (pickscore)"
    model_dir = require_path(label, path, MODEL_FORMAT, directory=True)
    cfg_file = model_dir / "config.json"
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise bad_file(label, cfg_file, MODEL_FORMAT, f"unreadable config.json: {e}") from None
    if model_type != "clip":
        raise bad_file(label, model_dir, MODEL_FORMAT, f"wrong architecture: model_type {model_type!r}")
    try:
        model, info = CLIPModel.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
                                                output_loading_info=True)
    except Exception as e:  # truncated or missing weight files
        raise bad_file(label, model_dir, MODEL_FORMAT, f"from_pretrained failed: {first_line(e)}") from None
    problems = {k: v for k, v in info.items()
                if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        k, v = next(iter(problems.items()))
        raise bad_file(label, model_dir, MODEL_FORMAT, f"wrong architecture: {len(v)} {k}, e.g. {v[0]}")
    proc_dir = require_path(label, clip_path or path, PROC_FORMAT,
                            key="clip_path" if clip_path else "path", directory=True)
    pre = _image_preprocess(label, proc_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(proc_dir, local_files_only=True)
    except Exception as e:
        raise bad_file(label, proc_dir, PROC_FORMAT, f"no tokenizer: {first_line(e)}") from None
    return PickScoreReward(model, tokenizer, pre, name=name)
