"""Reward models (megadiff/rewards/): each kind written in its real file format, loaded through
`load_reward`, scored the same as the underlying library (open_clip / transformers) computes it
directly; gradients reach the images; bad checkpoints fail at load with one line naming the file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megadiff.config import RewardConfig, load_config
from megadiff.rewards.registry import RewardSet, load_reward
from megadiff.rewards.tiny import make_tiny_reward

KINDS = ("hpsv2", "clip", "aesthetic", "pickscore")
PROMPTS = ["a red square on a blue background", "a photo of a cat"]


@pytest.fixture(scope="module")
def tiny_rewards(tmp_path_factory) -> dict[str, RewardConfig]:
    root = tmp_path_factory.mktemp("rewards")
    return {k: make_tiny_reward(k, root / k, seed=3) for k in KINDS}


def pil(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def open_clip_direct(rc: RewardConfig, tmp: Path, checkpoint: str, resize_mode: str):
    """open_clip's own factory: the tiny config registered under a name, weights from the file,
    its `preprocess_val` and tokenizer."""
    import open_clip

    cfg = json.loads(Path(rc.arch).read_text())["model_cfg"]
    name = f"tiny-direct-{abs(hash(str(tmp))) % 10**8}"
    (tmp / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp / f"{name}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=checkpoint, image_resize_mode=resize_mode)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def direct_scores(rc: RewardConfig, tmp: Path, images: list, prompts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        if rc.kind in ("hpsv2", "clip"):
            mode = "longest" if rc.kind == "hpsv2" else "squash"   # HPSv2 letterboxes; DFN5B squashes
            model, pre, tok = open_clip_direct(rc, tmp, rc.path, mode)
            img = model.encode_image(torch.stack([pre(im) for im in images]), normalize=True)
            txt = model.encode_text(tok(prompts), normalize=True)
            return (img @ txt.T).diagonal()       # HPSv2 img_score.score; DMDR clip_score (scale 1)
        if rc.kind == "aesthetic":
            # christophschuhmann/improved-aesthetic-predictor simple_inference.py, spelled out
            model, pre, _ = open_clip_direct(rc, tmp, rc.clip_path, "shortest")
            feats = model.encode_image(torch.stack([pre(im) for im in images]))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            state = torch.load(rc.path, weights_only=True)
            layers = torch.nn.Sequential(
                torch.nn.Linear(*state["layers.0.weight"].shape[::-1]), torch.nn.Dropout(0.2),
                torch.nn.Linear(*state["layers.2.weight"].shape[::-1]), torch.nn.Dropout(0.2),
                torch.nn.Linear(*state["layers.4.weight"].shape[::-1]), torch.nn.Dropout(0.1),
                torch.nn.Linear(*state["layers.6.weight"].shape[::-1]),
                torch.nn.Linear(*state["layers.7.weight"].shape[::-1]))
            layers.load_state_dict({k[len("layers."):]: v for k, v in state.items()})
            return layers.eval()(feats).squeeze(-1)
        # yuvalkirstain/PickScore README
        from transformers import AutoModel, AutoProcessor

        processor = AutoProcessor.from_pretrained(rc.path)
        model = AutoModel.from_pretrained(rc.path).eval()
        image_inputs = processor(images=images, return_tensors="pt")
        text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77,
                                return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs)
        image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs)
        text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (text_embs @ image_embs.T)).diagonal()


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_scores_as_its_library_does(kind, tiny_rewards, tmp_path):
    rc = tiny_rewards[kind]
    model = load_reward(rc)
    # at the model's resolution the resize/crop is the identity: exact agreement
    images = [pil(64, 64, 0), pil(64, 64, 1)]
    ours = model.score_pil(images, PROMPTS)
    ref = direct_scores(rc, tmp_path, images, PROMPTS)
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, ref.float(), rtol=0, atol=2e-5)
    assert (ours[0] - ours[1]).abs() > 1e-4          # not a constant
    # other sizes: PIL resizes uint8, we resize float tensors (same bicubic, antialiased)
    images = [pil(96, 80, 2), pil(70, 120, 3)]
    diff = (model.score_pil(images, PROMPTS) - direct_scores(rc, tmp_path, images, PROMPTS)).abs()
    # measured: <= 3.5e-4 for the open_clip kinds, 5.3e-3 for PickScore (times exp(logit_scale) = 14.3)
    assert diff.max() < (1e-2 if kind == "pickscore" else 1e-3), diff


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_images_and_weights_stay_frozen(kind, tiny_rewards):
    model = load_reward(tiny_rewards[kind])
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    images = torch.rand(2, 3, 48, 72, requires_grad=True)
    scores = model(images, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    scores.sum().backward()
    g = images.grad
    assert torch.isfinite(g).all() and g[0].abs().sum() > 0 and g[1].abs().sum() > 0
    # a small step up the gradient raises the score (what ReFL relies on)
    with torch.no_grad():
        up = model((images + 1e-3 * g / g.flatten(1).norm(dim=1)[:, None, None, None]), PROMPTS)
    assert (up > scores.detach()).all(), (up, scores)


def test_bf16_scores_track_fp32(tiny_rewards):
    rc = tiny_rewards["hpsv2"]
    images = torch.rand(2, 3, 64, 64)
    s32 = load_reward(rc)(images, PROMPTS)
    s16 = load_reward(rc, dtype=torch.bfloat16)(images, PROMPTS)
    assert s16.dtype == torch.float32
    assert (s32 - s16).abs().max() < 0.02


def test_reward_set_scores_and_weighted_sum(tiny_rewards):
    cfgs = [RewardConfig(**{**tiny_rewards["hpsv2"].__dict__, "weight": 0.1}),
            RewardConfig(**{**tiny_rewards["aesthetic"].__dict__, "weight": 2.0, "name": "aes"})]
    rs = RewardSet.from_configs(cfgs)
    assert rs.names() == ["hpsv2", "aes"]
    images = torch.rand(2, 3, 64, 64)
    scores = rs.scores(images, PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(scores["hpsv2"], load_reward(cfgs[0])(images, PROMPTS))
        torch.testing.assert_close(scores["aes"], load_reward(cfgs[1])(images, PROMPTS))
    h, a = scores["hpsv2"], scores["aes"]
    torch.testing.assert_close(rs.weighted(scores), 0.1 * h + 2.0 * a)
    hinge = rs.weighted(scores, per_reward=lambda s: torch.relu(0.7 - s))
    expect = [0.1 * max(0.7 - float(h[i]), 0) + 2.0 * max(0.7 - float(a[i]), 0) for i in range(2)]
    torch.testing.assert_close(hinge, torch.tensor(expect), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="two rewards are named 'hpsv2'"):
        RewardSet.from_configs([cfgs[0], cfgs[0]])


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_missing_and_truncated_checkpoints_fail_at_load(tiny_rewards, tmp_path):
    rc = tiny_rewards["hpsv2"]
    missing = RewardConfig(kind="hpsv2", path=str(tmp_path / "nope.pt"), arch=rc.arch)
    with pytest.raises(ValueError) as e:
        load_reward(missing)
    _one_line(e, "nope.pt", "HPS_v2.1_compressed.pt")
    for kind in ("hpsv2", "clip", "aesthetic"):
        src = tiny_rewards[kind]
        cut = tmp_path / f"{kind}-truncated.bin"
        data = Path(src.path).read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError) as e:
            load_reward(RewardConfig(**{**src.__dict__, "path": str(cut)}))
        _one_line(e, str(cut), "torch.load failed")
    # a truncated PickScore weight file
    src = Path(tiny_rewards["pickscore"].path)
    broken = tmp_path / "pickscore"
    broken.mkdir()
    for f in src.iterdir():
        b = f.read_bytes()
        (broken / f.name).write_bytes(b[: len(b) // 2] if f.suffix == ".safetensors" else b)
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="pickscore", path=str(broken)))
    _one_line(e, str(broken), "CLIPModel directory", "from_pretrained failed")


def test_hps_training_checkpoint_with_pickled_metadata_is_refused(tiny_rewards, tmp_path):
    """HPSv2 training checkpoints pickle more than tensors; megadiff never unpickles them in
    full: one line naming the file and the command that keeps just the weights, which load."""
    import argparse
    import subprocess
    import sys

    hps = tiny_rewards["hpsv2"]
    state = torch.load(hps.path, weights_only=True)["state_dict"]
    full = tmp_path / "epoch_3.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3,
                "args": argparse.Namespace(lr=1e-5)}, full)
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="hpsv2", path=str(full), arch=hps.arch))
    _one_line(e, str(full), "weights_only=True")
    command = str(e.value).split("python -c ")[1].split(" and point path")[0]
    subprocess.run(f"{sys.executable} -c {command}", shell=True, check=True, cwd=tmp_path)  # noqa: S602
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got = load_reward(RewardConfig(kind="hpsv2", path=str(tmp_path / "weights.pt"), arch=hps.arch))(images, PROMPTS)
        torch.testing.assert_close(got, load_reward(hps)(images, PROMPTS), rtol=0, atol=0)


def test_wrong_architecture_or_format_fails_at_load(tiny_rewards, tmp_path):
    hps = tiny_rewards["hpsv2"]
    # a plain state dict where HPS has {'state_dict': ...}
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(hps.path, weights_only=True)["state_dict"], plain)
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="hpsv2", path=str(plain), arch=hps.arch))
    _one_line(e, str(plain), "no 'state_dict' entry")
    # the right format for a different architecture (3 vision layers instead of 2)
    cfg = json.loads(Path(hps.arch).read_text())
    cfg["model_cfg"]["vision_cfg"]["layers"] = 3
    other = tmp_path / "three-layers.json"
    other.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="hpsv2", path=hps.path, arch=str(other)))
    _one_line(e, hps.path, "wrong architecture", "missing keys", "visual.transformer.resblocks.2")
    # wider embedding: shape mismatches
    cfg["model_cfg"]["vision_cfg"]["layers"] = 2
    cfg["model_cfg"]["embed_dim"] = 48
    other.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="clip", path=tiny_rewards["clip"].path, arch=str(other)))
    _one_line(e, tiny_rewards["clip"].path, "shape mismatches")
    # an aesthetic MLP file that is really a CLIP tower
    aes = tiny_rewards["aesthetic"]
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(**{**aes.__dict__, "path": aes.clip_path}))
    _one_line(e, aes.clip_path, "LAION aesthetic MLP", "no key layers.0.weight")
    # an aesthetic MLP whose input width is not the tower's embedding
    mlp = torch.load(aes.path, weights_only=True)
    mlp["layers.0.weight"] = torch.zeros(1024, 768)
    wide = tmp_path / "mlp768.pth"
    torch.save(mlp, wide)
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(**{**aes.__dict__, "path": str(wide)}))
    _one_line(e, str(wide), "embeds to 32", "reads 768")
    # a PickScore directory of another model type
    ps = Path(tiny_rewards["pickscore"].path)
    bad = tmp_path / "not-clip"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="pickscore", path=str(bad)))
    _one_line(e, str(bad), "wrong architecture", "'bert'")
    # an open_clip name that does not exist
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="hpsv2", path=hps.path, arch="ViT-Q-99"))
    _one_line(e, "ViT-Q-99", "not an open_clip model name")
    assert ps.is_dir()


def test_config_rejects_unsupported_and_incomplete_rewards():
    real = ["demo.enabled=false", "model.path=/models/sd3", "data.local=/data/shards"]
    cfg = load_config("tiny-dmd-cpu", real + ["rewards=[{kind: imagereward, path: ImageReward.pt}]"])
    assert cfg.rewards == [RewardConfig(kind="imagereward", path="ImageReward.pt")]
    with pytest.raises(ValueError, match=r"rewards\[0\].clip_path is not set"):
        load_config("tiny-dmd-cpu", real + ["rewards=[{kind: aesthetic, path: mlp.pth}]"])
    with pytest.raises(ValueError, match=r"rewards\[1\].path is not set"):
        load_config("tiny-dmd-cpu", real + ["rewards=[{kind: hpsv2, path: a.pt}, {kind: clip}]"])
    with pytest.raises(ValueError, match="path=ImageReward.pt is not an existing file"):
        load_reward(RewardConfig(kind="imagereward", path="ImageReward.pt"))
    cfg = load_config("tiny-dmd-cpu", real + ["rewards=[{kind: hpsv2, path: a.pt, weight: 0.1}]"])
    assert cfg.rewards == [RewardConfig(kind="hpsv2", path="a.pt", weight=0.1)]
    # demo runs build tiny rewards and fill the paths in themselves
    cfg = load_config("tiny-dmd-cpu", ["demo.enabled=true", "rewards=[{kind: aesthetic}]"])
    assert cfg.rewards[0].path is None


def test_default_architectures_match_the_real_checkpoints():
    """Defaults when `arch` is unset, built on the meta device: HPSv2.1 and DFN5B are ViT-H-14
    (1024-d embeddings; DFN5B with QuickGELU), the LAION aesthetic MLP reads 768-d ViT-L/14."""
    from megadiff.rewards.open_clip_reward import build_open_clip, open_clip_model_config

    for arch, dim, quick in (("ViT-H-14", 1024, False), ("ViT-H-14-quickgelu", 1024, True),
                             ("ViT-L-14-quickgelu", 768, True)):
        cfg = open_clip_model_config(arch, "test")
        assert cfg["embed_dim"] == dim and cfg.get("quick_gelu", False) == quick
        with torch.device("meta"):
            model = build_open_clip(cfg)
        assert model.visual.proj.shape[1] == dim and model.visual.image_size == (224, 224)


def test_preprocess_equals_torchvision_tensor_pipeline():
    """Shortest-side bicubic resize + centre crop + normalise, as torchvision's transforms apply
    them to a tensor (what open_clip's preprocess_val does after ToTensor)."""
    from torchvision import transforms as T

    from megadiff.rewards.preprocess import OPENAI_MEAN, OPENAI_STD, ImagePreprocess

    x = torch.rand(2, 3, 50, 77)
    tv = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                    T.CenterCrop(32), T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    torch.testing.assert_close(ImagePreprocess(size=32)(x), tv(x), rtol=0, atol=1e-6)
    sq = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                    T.Normalize(OPENAI_MEAN, OPENAI_STD)])
    torch.testing.assert_close(ImagePreprocess(size=32, resize_mode="squash")(x), sq(x), rtol=0, atol=1e-6)
    # HPSv2's ResizeMaxSize: longest side 77 -> 32, short side round(50 * 32 / 77) = 21, then
    # 11 rows of zeros split 5 above / 6 below
    letterbox = ImagePreprocess(size=32, resize_mode="longest", mean=(0,) * 3, std=(1,) * 3)
    box = letterbox(torch.ones(1, 3, 50, 77))
    rows = box[0, 0].abs().sum(1)
    assert box.shape == (1, 3, 32, 32)
    assert (rows[:5] == 0).all() and (rows[-6:] == 0).all() and (rows[5:-6] > 0).all()
    # HF's centre crop takes the floor of an odd margin, torchvision rounds it
    y = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 3, 5, 7)
    assert ImagePreprocess(size=5, crop_offset="floor", mean=(0,) * 3, std=(1,) * 3)(y)[0, 0, 0, 0] == 1
    assert ImagePreprocess(size=5, crop_offset="round", mean=(0,) * 3, std=(1,) * 3)(y)[0, 0, 0, 0] == 1
    y = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 3, 5, 8)
    assert ImagePreprocess(size=5, crop_offset="floor", mean=(0,) * 3, std=(1,) * 3)(y)[0, 0, 0, 0] == 1
    assert ImagePreprocess(size=5, crop_offset="round", mean=(0,) * 3, std=(1,) * 3)(y)[0, 0, 0, 0] == 2


def test_decode_for_reward_is_differentiable_and_matches_decode_latents(tiny_model):
    from megadiff.models.sd3 import decode_latents, load_vae
    from megadiff.rewards.scoring import decode_for_reward

    vae = load_vae(tiny_model)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    images = decode_for_reward(vae, z)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images.detach(), (decode_latents(vae, z.detach()) / 2 + 0.5).clamp(0, 1))
    assert images.requires_grad
    images.mean().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())
