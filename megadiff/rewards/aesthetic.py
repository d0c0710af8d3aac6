"""The LAION improved aesthetic predictor (`kind: aesthetic`).

christophschuhmann/improved-aesthetic-predictor, simple_inference.py: an MLP
768-1024-128-64-16-1 (Dropout 0.2, 0.2, 0.1 after the first three Linears, no activations)
saved as a state dict (`sac+logos+ava1-l14-linearMSE.pth`, keys layers.{0,2,4,6,7}), applied
to the L2-normalised image embedding of OpenAI CLIP ViT-L/14 (`clip.load("ViT-L/14")`, whose
preprocess is shortest side to 224 bicubic, centre crop, OpenAI mean/std):
    aesthetic = MLP(normalize(f_img))
The CLIP tower is read from `clip_path`: an open_clip state dict of `ViT-L-14-quickgelu`
(OpenAI's weights as open_clip publishes them, `open_clip_pytorch_model.bin` of
timm/vit_large_patch14_clip_224.openai); `arch` overrides the tower's architecture. The
layer widths are read from the file, so a smaller head in the same layout loads too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megadiff.rewards.base import RewardModel
from megadiff.rewards.checkpoint import bad_file, load_state_dict_file, load_strict, require_path
from megadiff.rewards.open_clip_reward import _image_size, load_open_clip
from megadiff.rewards.preprocess import ImagePreprocess

MLP_FORMAT = ("a LAION aesthetic MLP state dict (layers.{0,2,4,6,7} Linear weights 768-1024-128-64-16-1, "
              "e.g. sac+logos+ava1-l14-linearMSE.pth)")
TOWER_FORMAT = ("an open_clip state dict of the CLIP ViT-L/14 tower "
                "(ViT-L-14-quickgelu open_clip_pytorch_model.bin)")
LINEAR_KEYS = (0, 2, 4, 6, 7)
DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


def aesthetic_mlp(widths: list[int]) -> nn.Sequential:
    """The predictor's `layers` Sequential for widths [in, h1, h2, h3, h4, 1]."""
    assert len(widths) == 6, widths
    mods: list[nn.Module] = []
    for i in range(5):
        mods.append(nn.Linear(widths[i], widths[i + 1]))
        if len(mods) in DROPOUTS:
            mods.append(nn.Dropout(DROPOUTS[len(mods)]))
    assert [i for i, m in enumerate(mods) if isinstance(m, nn.Linear)] == list(LINEAR_KEYS)
    return nn.Sequential(*mods)


class AestheticMLP(nn.Module):
    def __init__(self, widths: list[int]):
        super().__init__()
        self.layers = aesthetic_mlp(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def mlp_widths(label: str, state: dict[str, torch.Tensor], path) -> list[int]:
    try:
        ws = [state[f"layers.{i}.weight"] for i in LINEAR_KEYS]
    except KeyError as e:
        raise bad_file(label, path, MLP_FORMAT, f"wrong architecture: no key {e.args[0]}") from None
    widths = [ws[0].shape[1]] + [w.shape[0] for w in ws]
    if any(w.ndim != 2 for w in ws) or widths[-1] != 1:
        raise bad_file(label, path, MLP_FORMAT, f"wrong architecture: Linear widths {widths}")
    return widths


class AestheticReward(RewardModel):
    uses_text = False

    def __init__(self, tower: nn.Module, mlp: AestheticMLP, preprocess: ImagePreprocess,
                 name: str = "aesthetic"):
        super().__init__()
        self.tower = tower
        self.mlp = mlp
        self.preprocess = preprocess
        self.name = name

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        p = self.tower.logit_scale
        x = self.preprocess(images.to(p.device).float()).to(p.dtype)
        return F.normalize(self.tower.encode_image(x), dim=-1)

    def score_features(self, image_features: torch.Tensor,
                       text_features: torch.Tensor | None) -> torch.Tensor:
        w = self.mlp.layers[0].weight
        return self.mlp(image_features.to(w.dtype)).squeeze(-1).float()


def load_aesthetic(path: str | None, clip_path: str | None, arch: str | None,
                   name: str) -> AestheticReward:
    label = f"reward {name} (aesthetic)"
    p = require_path(label, path, MLP_FORMAT)
    state = load_state_dict_file(label, p, MLP_FORMAT)
    mlp = AestheticMLP(mlp_widths(label, state, p))
    load_strict(label, mlp, state, p, MLP_FORMAT)
    if clip_path is None:
        raise ValueError(f"{label}: clip_path is not set: give the local {TOWER_FORMAT}")
    tower, cfg = load_open_clip(label, clip_path, arch or "ViT-L-14-quickgelu", TOWER_FORMAT,
                                key_required=False)
    if cfg["embed_dim"] != mlp.layers[0].in_features:
        raise ValueError(f"{label}: the CLIP tower at {clip_path} embeds to {cfg['embed_dim']} but the "
                         f"MLP at {path} reads {mlp.layers[0].in_features}: pair the predictor with "
                         "its own CLIP (ViT-L/14 for the LAION one)")
    return AestheticReward(tower, mlp, ImagePreprocess(size=_image_size(cfg)), name=name)
