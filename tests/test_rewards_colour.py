"""`make_colour_reward`: tiny rewards whose optimum is known (an image of the chosen colour), in
the real file formats, for the ReFL / SRPO / DPO / SDPO learning experiments."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megadiff.data.synthetic import COLOURS
from megadiff.rewards.registry import load_reward
from megadiff.rewards.tiny import (COLOUR_IMAGE_SIZE, colour_rgb, colour_shapes, make_colour_reward,
                                   redness, tiny_open_clip_config, train_colour_tower)

NAMES = list(COLOURS)


@pytest.fixture(scope="module")
def colour_rewards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("colour")
    return {k: make_colour_reward(root / k, kind=k, colour="red", seed=0) for k in ("hpsv2", "clip", "aesthetic")}


def uniform(size: int = 64) -> torch.Tensor:
    return torch.stack([colour_rgb(c)[:, None, None].expand(3, size, size) for c in NAMES])


def blend_to(colour: str, steps: int = 6, size: int = 64) -> torch.Tensor:
    a = torch.linspace(0, 1, steps)[:, None, None, None]
    return (1 - a) * torch.full((1, 3, size, size), 0.5) + a * colour_rgb(colour)[None, :, None, None]


def test_hps_colour_reward_prefers_the_named_colour(colour_rewards):
    rc = colour_rewards["hpsv2"]
    assert torch.load(rc.path, weights_only=True).keys() == {"state_dict"}     # HPS format
    model = load_reward(rc)
    with torch.no_grad():
        # a red image beats every other colour for "a red square", and a blue one for "a blue square"
        red = model(uniform(), ["a red square"] * len(NAMES))
        blue = model(uniform(), ["a blue square"] * len(NAMES))
        assert red.argmax() == NAMES.index("red") and blue.argmax() == NAMES.index("blue")
        assert red[NAMES.index("red")] > red[NAMES.index("blue")] + 0.2
        # the score rises from grey to red (and flattens near red: a washed-out red square is
        # still "a red square"; only the control words tell them apart, see the SRPO test)
        ramp = model(blend_to("red"), ["a red square"] * 6)
        assert ramp[-1] > ramp[0] + 0.3 and (ramp[1:] >= ramp[:-1] - 0.03).all(), ramp
        # images of the training kind: red square on white beats blue square on white
        g = torch.Generator().manual_seed(1)
        imgs, fg, _, _ = colour_shapes(200, g)
        s = model(imgs, ["a red square"] * 200)
        assert s[fg == NAMES.index("red")].mean() > s[fg != NAMES.index("red")].mean() + 0.2


def test_hps_colour_reward_reads_dmdr_control_words(colour_rewards):
    """SRPO's relative score (1 + k) r(pos) - r(neg) with DMDR's words is higher for a clean image
    than for the same image washed out towards grey, for every word pair; the plain score is not."""
    from megadiff.objectives.srpo import control_prompts, srpo_score
    from megadiff.rewards.tiny import control_words, wash_out

    model = load_reward(colour_rewards["hpsv2"])
    g = torch.Generator().manual_seed(3)
    imgs, fg, shape, _ = colour_shapes(128, g)
    caps = [f"a {NAMES[f]} {('square', 'circle')[s]}" for f, s in zip(fg, shape)]
    washed = wash_out(imgs, torch.full((128,), 0.5))
    positive, negative = control_words()
    assert positive == ["Natural-lighting", "Detailed", "Realistic"] and "Oil" in negative
    with torch.no_grad():
        clean_f, washed_f = model.image_features(imgs), model.image_features(washed)
        plain_gap = (model(imgs, caps) - model(washed, caps)).abs().mean()
        for p in positive:
            for n in negative:
                pos, neg = control_prompts(caps, p, n)
                gap = srpo_score(model, clean_f, pos, neg, 0.1) - srpo_score(model, washed_f, pos, neg, 0.1)
                assert (gap > 0).float().mean() > 0.95 and gap.mean() > 0.05 > plain_gap, (p, n, gap.mean())


def test_clip_colour_reward_is_the_same_tower_in_the_clip_format(colour_rewards):
    hps, clip = colour_rewards["hpsv2"], colour_rewards["clip"]
    plain = torch.load(clip.path, weights_only=True)
    assert "state_dict" not in plain                                     # open_clip_pytorch_model.bin
    for k, v in torch.load(hps.path, weights_only=True)["state_dict"].items():
        assert torch.equal(plain[k], v), k
    images = uniform()
    with torch.no_grad():
        s = load_reward(clip)(images, ["a red circle"] * len(NAMES))
    assert s.argmax() == NAMES.index("red")


def test_aesthetic_colour_reward_tracks_redness(colour_rewards):
    rc = colour_rewards["aesthetic"]
    model = load_reward(rc)
    with torch.no_grad():
        scores = model(uniform(), [""] * len(NAMES))
        assert scores.argmax() == NAMES.index("red")
        # grey -> red; flat within a few hundredths over the last 40% (the tower also saw
        # reds washed out by up to 70%, and its features differ a little with the thread count)
        ramp = model(blend_to("red"), [""] * 6)
        assert ramp[-1] > ramp[0] + 0.5 and (ramp[1:] > ramp[:-1] - 0.03).all(), ramp
        # against the ground-truth redness on held-out images blended towards red
        g = torch.Generator().manual_seed(2)
        imgs = colour_shapes(128, g)[0]
        a = torch.rand(128, 1, 1, 1, generator=g)
        imgs = (1 - a) * imgs + a * colour_rgb("red")[None, :, None, None]
        pred, truth = model(imgs, [""] * 128), redness(imgs, "red")
        assert torch.corrcoef(torch.stack([pred, truth]))[0, 1] > 0.9


def test_colour_reward_gives_a_gradient_refl_can_follow(colour_rewards, tiny_model):
    """Through the random tiny VAE: latents -> images -> reward; gradient ascent on the latents
    raises the reward (what ReFL does through the generator)."""
    from megadiff.models.sd3 import load_vae
    from megadiff.rewards.scoring import decode_for_reward

    vae = load_vae(tiny_model)
    for kind in ("hpsv2", "aesthetic"):
        rc = colour_rewards[kind]
        model = load_reward(rc)
        z = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.1)
        first = None
        for _ in range(8):
            s = model(decode_for_reward(vae, z), ["a red square"] * 4).mean()
            first = float(s.detach()) if first is None else first
            opt.zero_grad()
            (-s).backward()
            opt.step()
        with torch.no_grad():
            last = float(model(decode_for_reward(vae, z), ["a red square"] * 4).mean())
        print(f"{kind}: mean reward {first:.3f} -> {last:.3f} after 8 Adam steps on the latents")
        assert last > first + 0.05, (kind, first, last)


def test_colour_reward_is_cached_and_deterministic(colour_rewards, tmp_path):
    rc = colour_rewards["hpsv2"]
    meta = Path(rc.path).parent / "colour_reward.json"
    stamp = Path(rc.path).stat().st_mtime_ns
    again = make_colour_reward(Path(rc.path).parent, kind="hpsv2", colour="red", seed=0)
    assert again == rc and Path(rc.path).stat().st_mtime_ns == stamp       # reused, not retrained
    assert json.loads(meta.read_text())["meta"]["colour"] == "red"
    # training is a pure function of the seed (a short run twice), and leaves the global RNG alone
    cfg = tiny_open_clip_config(COLOUR_IMAGE_SIZE, patch_size=8, context_length=16)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, la = train_colour_tower(cfg, seed=4, steps=3)
    b, lb = train_colour_tower(cfg, seed=4, steps=3)
    assert torch.rand(1) == before
    assert la == lb
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(ValueError, match="colour 'mauve' is unknown"):
        make_colour_reward(tmp_path, colour="mauve")
