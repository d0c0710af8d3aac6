"""ReFL and SRPO reward terms against hand computations: hinge / negative losses, per-reward
weights, the prompt prefix on the rewards that ask for it, SRPO's steered text embedding
(1 + k) e(pos) - e(neg), the gradient that reaches the generator's x0, and DMD's cold start
gating the reward term (absent before step K, present from K). A real tiny HPSv2.1 tower
(megadiff.rewards, the HPS checkpoint format) checks SRPO against DMDR's own formula."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megadiff.objectives import refl, srpo
from megadiff.objectives.dmd import DMD
from megadiff.rewards.base import RewardModel

# Hand-chosen text embeddings (3-d, one axis per colour channel) for every prompt the tests use.
TEXT = {"a red square": (1.0, 0.0, 0.0),
        "Realistic photo a red square": (0.6, 0.0, 0.8),
        "Detailed. a red square": (0.8, 0.6, 0.0),
        "Oil. a red square": (0.0, 0.6, 0.8)}


class HandReward(RewardModel):
    """score = <mean colour of the image, TEXT[prompt]>: linear, so every number is by hand."""

    def image_features(self, images):
        return images.mean(dim=(2, 3))

    def text_features(self, prompts):
        return torch.tensor([TEXT[p] for p in prompts])

    def score_features(self, image_features, text_features):
        return (image_features * text_features).sum(-1)


class PixelVAE(torch.nn.Module):
    """decode(z).sample = the first 3 latent channels (scaling 1, shift 0)."""
    dtype = torch.float32
    config = SimpleNamespace(scaling_factor=1.0, shift_factor=0.0)

    def decode(self, z):
        return SimpleNamespace(sample=z[:, :3])


def stub(mixin, overrides):
    from megadiff.config import load_config

    class Stub(mixin, DMD):
        def __init__(self):
            self.cfg = load_config("tiny-dmdr-cpu", ["dmd.cold_start_steps=3", *overrides])
            self.device, self.compute_dtype = torch.device("cpu"), torch.float32
            self.noise_rng = torch.Generator().manual_seed(0)
            self.reward_vae = PixelVAE()
            self.reward_models = {"clip": HandReward(), "hpsv2": HandReward()}
            self.reward_weights = {"clip": 0.1, "hpsv2": 0.3}
    return Stub()


def latents():
    """Sample 0 decodes to mean colour (0.9, 0.1, 0.1) (red), sample 1 to (0.1, 0.1, 0.9) (blue)."""
    x = torch.empty(2, 3, 2, 2)
    x[0] = torch.tensor([0.8, -0.8, -0.8]).view(3, 1, 1)
    x[1] = torch.tensor([-0.8, -0.8, 0.8]).view(3, 1, 1)
    return x.requires_grad_(True)


BATCH = {"caption": ["a red square", "a red square"]}


def test_reward_loss_hinge_and_neg():
    s = torch.tensor([0.9, 0.1, 0.7, -0.5])
    assert math.isclose(refl.reward_loss(s, "hinge", 0.7).item(), (0 + 0.6 + 0 + 1.2) / 4, rel_tol=1e-6)
    assert math.isclose(refl.reward_loss(s, "neg", 0.7).item(), -(0.9 + 0.1 + 0.7 - 0.5) / 4, rel_tol=1e-6)
    assert refl.with_prefix(["a cat"], "Realistic photo") == ["Realistic photo a cat"]
    assert refl.with_prefix(["a cat"], "") == ["a cat"]


def test_refl_terms_weights_prefix_and_gradient_match_hand_computation():
    s = stub(refl.ReFL, ["refl.weight=2.0"])
    x = latents()
    terms = s.generator_x0_terms(x, BATCH, step=3)
    # clip, bare caption, text (1,0,0): scores 0.9, 0.1 -> hinge mean (0 + 0.6)/2 = 0.3 -> 2 * 0.1 * 0.3
    # hpsv2, "Realistic photo ..." (0.6,0,0.8): scores 0.62, 0.78 -> hinge (0.08 + 0)/2 -> 2 * 0.3 * 0.04
    assert math.isclose(terms["reward_clip"].item(), 0.06, rel_tol=1e-5)
    assert math.isclose(terms["reward_hpsv2"].item(), 0.024, rel_tol=1e-5)
    sum(terms.values()).backward()
    # d/d(mean colour) of the active hinges, times d(mean colour)/dx = 0.5 / (2 * 2) per pixel:
    # sample 0: hpsv2 active: -2 * 0.3 / 2 * (0.6, 0, 0.8); sample 1: clip active: -2 * 0.1 / 2 * (1, 0, 0)
    want = torch.zeros(2, 3, 2, 2)
    want[0, 0], want[0, 2], want[1, 0] = -0.3 * 0.6 * 0.125, -0.3 * 0.8 * 0.125, -0.1 * 0.125
    assert torch.allclose(x.grad, want, atol=1e-7)
    neg = stub(refl.ReFL, ["refl.weight=2.0", "refl.loss=neg"]).generator_x0_terms(latents(), BATCH, 3)
    assert math.isclose(neg["reward_clip"].item(), 2 * 0.1 * -(0.9 + 0.1) / 2, rel_tol=1e-5)
    assert math.isclose(neg["reward_hpsv2"].item(), 2 * 0.3 * -(0.62 + 0.78) / 2, rel_tol=1e-5)


def test_srpo_scores_against_the_steered_text_embedding():
    s = stub(srpo.SRPO, ["refl.weight=2.0", "srpo.k=0.1", "srpo.weight=1.0", "srpo.positive=[Detailed]",
                         "srpo.negative=[Oil]"])
    assert s.control_words(5) == ("Detailed", "Oil")
    terms = s.generator_x0_terms(latents(), BATCH, step=3)
    # red (0.9,0.1,0.1): pos (0.8,0.6,0) -> 0.78, neg (0,0.6,0.8) -> 0.14: 1.1 * 0.78 - 0.14 = 0.718
    # blue (0.1,0.1,0.9): pos 0.14, neg 0.78: 1.1 * 0.14 - 0.78 = -0.626
    # hinge mean (0 + 1.326) / 2 = 0.663, times srpo.weight 1 and the reward weight 0.3
    assert math.isclose(terms["reward_hpsv2"].item(), 0.3 * 0.663, rel_tol=1e-5)
    assert math.isclose(terms["reward_clip"].item(), 0.06, rel_tol=1e-5)   # clip keeps ReFL's score


def test_control_words_are_drawn_per_step_alike_on_every_rank():
    a, b = stub(srpo.SRPO, []), stub(srpo.SRPO, [])
    draws = [a.control_words(k) for k in range(12)]
    assert draws == [b.control_words(k) for k in range(12)]
    assert {p for p, _ in draws} <= {"Natural-lighting", "Detailed", "Realistic"}
    assert len({p for p, _ in draws}) > 1 and len({n for _, n in draws}) > 1
    assert srpo.control_prompts(["a cat"], "Detailed", "Oil") == (["Detailed. a cat"], ["Oil. a cat"])


@pytest.mark.parametrize("mixin", [refl.ReFL, srpo.SRPO])
def test_cold_start_gates_the_reward_term(mixin):
    s = stub(mixin, ["srpo.positive=[Detailed]", "srpo.negative=[Oil]"])
    assert s.generator_x0_terms(latents(), BATCH, step=2) == {}
    assert set(s.generator_x0_terms(latents(), BATCH, step=3)) == {"reward_clip", "reward_hpsv2"}
    assert set(s.generator_x0_terms(latents(), BATCH, step=40)) == {"reward_clip", "reward_hpsv2"}


def test_srpo_on_a_real_hps_tower_equals_dmdrs_formula(tmp_path):
    """DMDR (train_sd3_srpo_deepspeed.py): n(f_img) @ ((k + 1) n(f_pos) - n(f_neg)).T, diagonal."""
    import torch.nn.functional as F

    from megadiff.rewards.registry import load_reward
    from megadiff.rewards.tiny import make_tiny_reward

    model = load_reward(make_tiny_reward("hpsv2", tmp_path / "hps", seed=0))
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    caps = ["a red square", "a blue circle", "a green square"]
    pos, neg = srpo.control_prompts(caps, "Realistic", "Painting")
    with torch.no_grad():
        ours = srpo.srpo_score(model, model.image_features(images), pos, neg, 0.1)
        img = F.normalize(model.model.encode_image(model.preprocess(images)), dim=-1)
        tp = F.normalize(model.model.encode_text(model.tokenizer(pos)), dim=-1)
        tn = F.normalize(model.model.encode_text(model.tokenizer(neg)), dim=-1)
        dmdr = torch.diagonal(img @ ((0.1 + 1) * tp - tn).T)
    assert torch.allclose(ours, dmdr, atol=1e-5)


def test_reward_objectives_need_dmd_first_and_known_reward_names():
    from megadiff.config import load_config

    for bad, msg in ((["objectives=[refl]"], "come after dmd"),
                     (["objectives=[refl, dmd]"], "come after dmd"),
                     (["refl.prefix_rewards=[hps]"], "refl.prefix_rewards names 'hps'"),
                     (["objectives=[dmd, srpo]", "srpo.rewards=[pick]"], "srpo.rewards names 'pick'"),
                     (["rewards=[]"], "at least one reward model")):
        with pytest.raises(ValueError, match=msg):
            load_config("tiny-dmdr-cpu", bad)
