"""open_clip towers as rewards: HPSv2.1 (`kind: hpsv2`) and CLIP (`kind: clip`, DFN5B).

HPSv2.1 (tgxs002/HPSv2, hpsv2/img_score.py `score`): a ViT-H-14 open_clip model whose weights
are `torch.load(HPS_v2.1_compressed.pt)['state_dict']`; images through HPSv2's `preprocess_val`
(built with `light_augmentation=True`: longest side to 224 bicubic, zero-padded to 224 x 224,
OpenAI mean/std; for square images the same as a plain resize); the score is
    HPS = <normalize(f_img), normalize(f_txt)>          (no logit scale)
CLIP (DFN5B-CLIP-ViT-H-14, `open_clip_pytorch_model.bin`, a plain state dict of open_clip's
`ViT-H-14-quickgelu`; open_clip's pretrained cfg for `dfn5b` squashes to 224 bicubic) scores
the same cosine, as DMDR's ReFL does (vvvvvjdy/dmdr train_t2i/sd3/rl_utils.py `clip_score`
with logit_scale=1, hinged at margin 0.7). The CLIPScore metric's 100 * max(cos, 0) is this
value times 100.

Features are L2-normalised in `image_features` / `text_features`, and `score_features` takes
the plain inner product without renormalising, so SRPO's `(1 + k) e(pos) - e(neg)` text
features score linearly as in DMDR (train_t2i/sd3/train_sd3_srpo_deepspeed.py).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from megadiff.rewards.base import RewardModel
from megadiff.rewards.checkpoint import load_state_dict_file, load_strict, require_path
from megadiff.rewards.preprocess import ImagePreprocess


def open_clip_model_config(arch: str, label: str) -> dict:
    """An open_clip model name (its bundled configs) or a JSON file: a bare model config or an
    `open_clip_config.json` with a `model_cfg` entry."""
    import open_clip

    if arch.endswith(".json") or Path(arch).is_file():
        p = Path(arch).expanduser()
        if not p.is_file():
            raise ValueError(f"{label}: arch={arch} is not an existing JSON file: give an open_clip "
                             "model name (e.g. ViT-H-14) or a model-config JSON")
        try:
            cfg = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{label}: arch={arch} is not valid JSON ({e}): fix the file") from None
        cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
    else:
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(f"{label}: arch={arch!r} is not an open_clip model name: use e.g. "
                             "ViT-H-14, ViT-H-14-quickgelu, ViT-L-14-quickgelu, or a model-config JSON")
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"{label}: arch={arch} needs embed_dim, vision_cfg and text_cfg "
                         "(an open_clip model config)")
    if "hf_model_name" in cfg["text_cfg"] or "timm_model_name" in cfg["vision_cfg"]:
        raise ValueError(f"{label}: arch={arch} uses a Hugging Face / timm tower that open_clip would "
                         "download: only open_clip's own ViT towers are supported")
    return copy.deepcopy(cfg)


def build_open_clip(cfg: dict) -> torch.nn.Module:
    """The architecture with random weights, as open_clip's `create_model` instantiates it."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(cfg)
    cls = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
    return cls(**cfg)


def load_open_clip(label: str, path: str | None, arch: str, expected: str,
                   key_required: bool) -> tuple[torch.nn.Module, dict]:
    """Weights from `torch.load(path)` (or its 'state_dict' entry) into the `arch` tower, strictly."""
    cfg = open_clip_model_config(arch, label)
    p = require_path(label, path, expected)
    state = load_state_dict_file(label, p, expected, key="state_dict", key_required=key_required)
    model = build_open_clip(cfg)
    for name in ("logit_scale", "logit_bias"):     # scalar vs [1] across open_clip versions
        own = getattr(model, name, None)
        if own is not None and name in state and state[name].numel() == own.numel():
            state[name] = state[name].reshape(own.shape)
    load_strict(label, model, state, p, expected + f" for arch {arch}")
    return model, cfg


def open_clip_tokenizer(cfg: dict):
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))


class OpenCLIPReward(RewardModel):
    """Cosine (times `scale`) between an open_clip tower's image and text embeddings."""

    def __init__(self, model: torch.nn.Module, cfg: dict, preprocess: ImagePreprocess,
                 scale: float = 1.0, name: str = "clip"):
        super().__init__()
        self.model = model
        self.tokenizer = open_clip_tokenizer(cfg)
        self.preprocess = preprocess
        self.scale = scale
        self.name = name

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images.to(self.model.logit_scale.device).float()).to(self.dtype)
        return F.normalize(self.model.encode_image(x), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.model.logit_scale.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    def score_features(self, image_features: torch.Tensor,
                       text_features: torch.Tensor | None) -> torch.Tensor:
        assert text_features is not None and image_features.shape == text_features.shape
        return self.scale * (image_features.float() * text_features.float()).sum(-1)


HPS_FORMAT = ("an HPSv2.1 checkpoint (torch file with a 'state_dict' of an open_clip ViT-H-14, "
              "e.g. HPS_v2.1_compressed.pt)")
CLIP_FORMAT = "an open_clip state dict (e.g. DFN5B-CLIP-ViT-H-14 open_clip_pytorch_model.bin)"


def load_hpsv2(path: str | None, arch: str | None, name: str) -> OpenCLIPReward:
    arch = arch or "ViT-H-14"
    model, cfg = load_open_clip(f"reward {name} (hpsv2)", path, arch, HPS_FORMAT, key_required=True)
    pre = ImagePreprocess(size=_image_size(cfg), resize_mode="longest")
    return OpenCLIPReward(model, cfg, pre, scale=1.0, name=name)


def load_clip(path: str | None, arch: str | None, name: str) -> OpenCLIPReward:
    arch = arch or "ViT-H-14-quickgelu"
    model, cfg = load_open_clip(f"reward {name} (clip)", path, arch, CLIP_FORMAT, key_required=False)
    pre = ImagePreprocess(size=_image_size(cfg), resize_mode="squash")
    return OpenCLIPReward(model, cfg, pre, scale=1.0, name=name)


def _image_size(cfg: dict) -> int:
    size = cfg["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        assert size[0] == size[1], f"non-square open_clip image_size {size}"
        size = size[0]
    return int(size)
