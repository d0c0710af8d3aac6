"""SRPO's relative reward, as DMDR uses it on top of ReFL.

SRPO (Shen et al. 2025, "Directly Aligning the Full Diffusion Trajectory with Fine-Grained
Human Preference", Tencent-Hunyuan/SRPO `fastvideo/SRPO.py`) scores an image against a text
embedding steered by control words. DMDR (vvvvvjdy/dmdr at d1f2436,
`train_t2i/sd3/train_sd3_srpo_deepspeed.py`, lines 208-219 and 647-677) does it for HPSv2.1:
one positive word from ["Natural-lighting", "Detailed", "Realistic"] and one negative from
["Painting", "CG Render", "Oil"] (drawn per step), prompts "<word>. <caption>", and

    r_srpo = n(f_img) . ((1 + k) n(f_text(pos)) - n(f_text(neg))),   k = 0.1,

with n the L2 normalisation; the ReFL hinge relu(0.7 - r_srpo) follows (weight 5 for HPS; CLIP
keeps its plain ReFL score, weight 0.1). For any reward whose score is linear in the
normalised text feature (HPS: n(f_img) . n(f_text); CLIP: c n(f_img) . n(f_text)),
    r_srpo = (1 + k) r(img, pos) - r(img, neg),
which is how it is computed here, through the RewardModel interface (`score_features`), so it
holds for every such reward. `srpo.rewards` names the rewards scored this way (default hpsv2);
the others keep ReFL's score (with ReFL's prompt prefix; DMDR's SRPO script adds none).

Composed as `objectives: [dmd, srpo]` (this mixin is ReFL plus the relative score).
"""
from __future__ import annotations

import torch

from megadiff.objectives.refl import ReFL


def control_prompts(captions: list[str], positive: str, negative: str) -> tuple[list[str], list[str]]:
    """DMDR's "<word>. <caption>" prompts for the positive and the negative control word."""
    return [f"{positive}. {c}" for c in captions], [f"{negative}. {c}" for c in captions]


def srpo_score(model, image_features: torch.Tensor, pos_prompts: list[str], neg_prompts: list[str],
               k: float) -> torch.Tensor:
    """(1 + k) r(img, pos) - r(img, neg) from shared image features ([B])."""
    pos = model.score_features(image_features, model.text_features(pos_prompts))
    neg = model.score_features(image_features, model.text_features(neg_prompts))
    return (1.0 + k) * pos.float() - neg.float()


class SRPO(ReFL):
    def build_extras(self) -> None:
        super().build_extras()
        for name in self.cfg.srpo.rewards:
            if not getattr(self.reward_models[name], "uses_text", True):
                raise ValueError(f"srpo.rewards names {name!r}, a prompt-free reward: SRPO steers the "
                                 "text embedding, so list only text-image rewards (hpsv2, clip, pickscore)")

    def term_weight(self, name: str) -> float:
        return self.cfg.srpo.weight if name in self.cfg.srpo.rewards else super().term_weight(name)

    def control_words(self, step: int) -> tuple[str, str]:
        """One positive and one negative word per micro-step, the same on every rank."""
        s = self.cfg.srpo
        g = self._shared_rng(step, "srpo")
        i = int(torch.randint(len(s.positive), (1,), generator=g))
        j = int(torch.randint(len(s.negative), (1,), generator=g))
        return s.positive[i], s.negative[j]

    def reward_scores(self, images, captions, step):
        s = self.cfg.srpo
        plain = {n: m for n, m in self.reward_models.items() if n not in s.rewards}
        saved, self.reward_models = self.reward_models, plain
        try:
            scores = super().reward_scores(images, captions, step)
        finally:
            self.reward_models = saved
        pos, neg = control_prompts(captions, *self.control_words(step))
        for name in s.rewards:
            model = self.reward_models[name]
            scores[name] = srpo_score(model, model.image_features(images), pos, neg, s.k)
        return {n: scores[n] for n in self.reward_models}
