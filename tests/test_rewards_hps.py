"""megadiff's HPSv2.1 score equals what HPSv2's own code computes (tgxs002/HPSv2,
hpsv2/img_score.py `score`) for the same weights, image and prompt: a tiny open_clip tower
saved in the HPS checkpoint format ({'state_dict': ...}), registered with HPSv2's bundled
open_clip, scored through its `create_model_and_transforms` / `preprocess_val` /
`get_tokenizer` steps. Needs `pip install --no-deps hpsv2x==1.2.0` (+ the `hps` extra)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("hpsv2.img_score", reason="hpsv2 is not installed (pip install --no-deps hpsv2x==1.2.0)")

from megadiff.rewards.registry import load_reward  # noqa: E402
from megadiff.rewards.tiny import make_tiny_reward  # noqa: E402

PROMPT = "a red square on a blue background, highly detailed"


def hpsv2_score(arch_json: str, checkpoint: str, image: Image.Image, prompt: str, tmp: Path) -> float:
    """hpsv2.img_score.score for one PIL image, with the tiny config in place of ViT-H-14 and no
    hub download (cp given), on the CPU (where its cuda autocast is a no-op)."""
    from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
    from hpsv2.src.open_clip.factory import add_model_config

    cfg = json.loads(Path(arch_json).read_text())["model_cfg"]
    (tmp / "tiny-hps-vit.json").write_text(json.dumps(cfg))
    add_model_config(tmp / "tiny-hps-vit.json")
    model, _, preprocess_val = create_model_and_transforms(
        "tiny-hps-vit", None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None,
        pretrained_image=False, image_mean=None, image_std=None, light_augmentation=True,
        aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False)
    checkpoint = torch.load(checkpoint, map_location="cpu")
    model.load_state_dict(checkpoint["state_dict"])
    tokenizer = get_tokenizer("tiny-hps-vit")
    model.eval()
    with torch.no_grad():
        image = preprocess_val(image).unsqueeze(0)
        text = tokenizer([prompt])
        outputs = model(image, text)
        image_features, text_features = outputs["image_features"], outputs["text_features"]
        logits_per_image = image_features @ text_features.T
        return float(torch.diagonal(logits_per_image)[0])


def test_hps_score_equals_hpsv2_own_code(tmp_path):
    rc = make_tiny_reward("hpsv2", tmp_path / "hps", seed=5, image_size=224)
    ours = load_reward(rc)
    rng = np.random.default_rng(0)
    # 224 x 224: HPS's resize and crop are the identity, so the two must agree to float error
    image = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    ref = hpsv2_score(rc.arch, rc.path, image, PROMPT, tmp_path)
    got = float(ours.score_pil([image], [PROMPT])[0])
    assert abs(got - ref) < 1e-5, (got, ref)
    # a different prompt and image give a different score (the comparison is not vacuous)
    image2 = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    ref2 = hpsv2_score(rc.arch, rc.path, image2, "a cat", tmp_path)
    assert abs(ref2 - ref) > 1e-4
    assert abs(float(ours.score_pil([image2], ["a cat"])[0]) - ref2) < 1e-5
    # a non-square image: HPSv2 resizes the float tensor (after ToTensor) with the longest side to
    # 224 and zero-pads, as megadiff does, so this agrees to float error too (measured 5e-8)
    image3 = Image.fromarray(rng.integers(0, 256, (300, 256, 3), dtype=np.uint8))
    ref3 = hpsv2_score(rc.arch, rc.path, image3, PROMPT, tmp_path)
    assert abs(float(ours.score_pil([image3], [PROMPT])[0]) - ref3) < 1e-5


def test_real_vit_h_14_has_hpsv2s_exact_parameter_layout():
    """The real HPS_v2.1_compressed.pt loads strictly into HPSv2's ViT-H-14; megadiff's default
    hpsv2 architecture (open_clip's ViT-H-14) has the same 686 tensors with the same shapes, so
    it loads strictly here too (built on the meta device: no memory, no weights)."""
    from hpsv2.src.open_clip.factory import get_model_config
    from hpsv2.src.open_clip.model import CLIP as HPSCLIP

    from megadiff.rewards.open_clip_reward import build_open_clip, open_clip_model_config

    with torch.device("meta"):
        theirs = HPSCLIP(**get_model_config("ViT-H-14")).state_dict()
        ours = build_open_clip(open_clip_model_config("ViT-H-14", "test")).state_dict()
    assert len(ours) == 686
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
