"""ImageReward (megadiff/rewards/imagereward.py): a tiny ImageReward.pt written with ImageReward's
own key names (THUDM/ImageReward ImageReward/ImageReward.py, models/BLIP/{vit,med,blip_pretrain}.py),
loaded through `load_reward`, scores equal to an independent functional forward written from
ImageReward's code, gradients reach the pixels, and bad files fail with one line naming them."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megadiff.rewards.registry import RewardSet, load_reward
from megadiff.config import RewardConfig

PROMPTS = ["a red square on a blue background", "a photo of a cat"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VW, VL, PATCH, VMLP = 64, 2, 32, 128        # vision width / depth / patch / mlp (real: 1024, 24, 16, 4096)
TW, TL, TMLP, MAXPOS = 64, 2, 128, 40       # text width / depth / ffn / positions (real: 768, 12, 3072, 512)
HEAD = 64                                   # head dim (real: 1024/16 and 768/12)
MEAN, STD = 0.16717362830052426, 1.0333394966054072


def tiny_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An ImageReward state dict with ImageReward's names and tiny shapes (random weights)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    def ln(prefix):
        return {prefix + ".weight": 1 + r(TW if "text" in prefix else VW, s=0.1),
                prefix + ".bias": r(TW if "text" in prefix else VW, s=0.1)}

    v = "blip.visual_encoder."
    sd = {v + "cls_token": r(1, 1, VW), v + "pos_embed": r(1, (224 // PATCH) ** 2 + 1, VW),
          v + "patch_embed.proj.weight": r(VW, 3, PATCH, PATCH, s=0.02), v + "patch_embed.proj.bias": r(VW)}
    for i in range(VL):
        b = f"{v}blocks.{i}."
        sd |= ln(b + "norm1") | ln(b + "norm2")
        sd |= {b + "attn.qkv.weight": r(3 * VW, VW), b + "attn.qkv.bias": r(3 * VW),
               b + "attn.proj.weight": r(VW, VW), b + "attn.proj.bias": r(VW),
               b + "mlp.fc1.weight": r(VMLP, VW), b + "mlp.fc1.bias": r(VMLP),
               b + "mlp.fc2.weight": r(VW, VMLP), b + "mlp.fc2.bias": r(VW)}
    sd |= ln(v + "norm")
    t = "blip.text_encoder."
    sd |= {t + "embeddings.word_embeddings.weight": r(vocab, TW),
           t + "embeddings.position_embeddings.weight": r(MAXPOS, TW),
           t + "embeddings.position_ids": torch.arange(MAXPOS).expand(1, -1)}    # med.py's persistent buffer
    sd |= ln(t + "embeddings.LayerNorm")
    for i in range(TL):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", TW), ("crossattention", VW)):
            sd |= {b + f"{att}.self.query.weight": r(TW, TW), b + f"{att}.self.query.bias": r(TW),
                   b + f"{att}.self.key.weight": r(TW, kv), b + f"{att}.self.key.bias": r(TW),
                   b + f"{att}.self.value.weight": r(TW, kv), b + f"{att}.self.value.bias": r(TW),
                   b + f"{att}.output.dense.weight": r(TW, TW), b + f"{att}.output.dense.bias": r(TW)}
            sd |= ln(b + f"{att}.output.LayerNorm")
        sd |= {b + "intermediate.dense.weight": r(TMLP, TW), b + "intermediate.dense.bias": r(TMLP),
               b + "output.dense.weight": r(TW, TMLP), b + "output.dense.bias": r(TW)}
        sd |= ln(b + "output.LayerNorm")
    # BLIP_Pretrain's ITC projections: in ImageReward.pt, unused by the score
    sd |= {"blip.vision_proj.weight": r(256, VW), "blip.vision_proj.bias": r(256),
           "blip.text_proj.weight": r(256, TW), "blip.text_proj.bias": r(256)}
    widths = [TW, 1024, 128, 64, 16, 1]                  # ImageReward.py MLP(input_size)
    for idx, (a, b_) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        sd[f"mlp.layers.{idx}.weight"] = r(b_, a, s=1 / math.sqrt(a))
        sd[f"mlp.layers.{idx}.bias"] = r(b_, s=0.1)
    return sd


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    words = sorted({w for p in PROMPTS for w in p.split()})
    vocab = SPECIAL + words
    tok = root / "bert-base-uncased"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(vocab) + "\n")
    state = tiny_state(len(vocab) + 2)                   # + [DEC], [ENC] (blip.py init_tokenizer)
    torch.save(state, root / "ImageReward.pt")
    cfg = RewardConfig(kind="imagereward", path=str(root / "ImageReward.pt"), clip_path=str(tok))
    return cfg, state, vocab, root


def token_ids(prompt: str, vocab: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT wordpiece of whole-word prompts, by hand: [CLS] words [SEP], padded to 35."""
    ids = [vocab.index("[CLS]")] + [vocab.index(w) for w in prompt.lower().split()] + [vocab.index("[SEP]")]
    mask = [1] * len(ids) + [0] * (35 - len(ids))
    return torch.tensor(ids + [0] * (35 - len(ids))), torch.tensor(mask)


def reference_score(sd, images: torch.Tensor, prompts: list[str], vocab: list[str]) -> torch.Tensor:
    """ImageReward.score_gard spelled out: vit.py VisionTransformer, med.py BertModel (multimodal
    mode: bidirectional self-attention, cross-attention to every image token), MLP, (r-mean)/std."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = (images - mean) / std                          # already 224x224: Resize/CenterCrop are identity

    def attn(q, k, v, heads, bias=None):
        B, N, D = q.shape
        q, k, v = (z.reshape(B, z.shape[1], heads, D // heads).transpose(1, 2) for z in (q, k, v))
        a = q @ k.transpose(-2, -1) / math.sqrt(D // heads)
        if bias is not None:
            a = a + bias
        return (a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)

    v = "blip.visual_encoder."
    lin = lambda h, p: F.linear(h, sd[p + ".weight"], sd[p + ".bias"])            # noqa: E731
    lnv = lambda h, p: F.layer_norm(h, (VW,), sd[p + ".weight"], sd[p + ".bias"], 1e-6)   # noqa: E731
    h = F.conv2d(x, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([sd[v + "cls_token"].expand(h.shape[0], -1, -1), h], 1) + sd[v + "pos_embed"]
    for i in range(VL):
        b = f"{v}blocks.{i}."
        qkv = lin(lnv(h, b + "norm1"), b + "attn.qkv")
        h = h + lin(attn(*qkv.chunk(3, dim=-1), heads=VW // HEAD), b + "attn.proj")
        h = h + lin(F.gelu(lin(lnv(h, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    img = lnv(h, v + "norm")

    t = "blip.text_encoder."
    lnt = lambda h, p: F.layer_norm(h, (TW,), sd[p + ".weight"], sd[p + ".bias"], 1e-12)  # noqa: E731
    ids, mask = map(torch.stack, zip(*[token_ids(p, vocab) for p in prompts]))
    h = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:35]
    h = lnt(h, t + "embeddings.LayerNorm")
    pad_bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(TL):
        b = f"{t}encoder.layer.{i}."
        for att, kv, bias in (("attention", None, pad_bias), ("crossattention", img, None)):
            src = h if kv is None else kv
            ctx = attn(lin(h, b + f"{att}.self.query"), lin(src, b + f"{att}.self.key"),
                       lin(src, b + f"{att}.self.value"), heads=TW // HEAD, bias=bias)
            h = lnt(lin(ctx, b + f"{att}.output.dense") + h, b + f"{att}.output.LayerNorm")
        h = lnt(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm")
    r = h[:, 0]
    for idx in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{idx}")
    return (r.squeeze(-1) - MEAN) / STD


def images(seed: int, n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def test_score_equals_imagereward_forward_and_grads_reach_pixels(tiny_ir):
    cfg, state, vocab, _ = tiny_ir
    model = load_reward(cfg)
    assert not any(p.requires_grad for p in model.parameters())
    # the tokenizer is BLIP's: bert vocab + [DEC] (bos) + [ENC], padded to 35
    tok = model.text_features(PROMPTS)
    assert tok.shape == (2, 2, 35)
    for i, p in enumerate(PROMPTS):
        ids, mask = token_ids(p, vocab)
        assert torch.equal(tok[i, 0], ids) and torch.equal(tok[i, 1], mask)
    assert model.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(vocab), len(vocab) + 1]

    x = images(1).requires_grad_(True)
    got = model(x, PROMPTS)
    x_ref = x.detach().clone().requires_grad_(True)
    want = reference_score(state, x_ref, PROMPTS, vocab)
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got[0] - got[1]).abs() > 1e-3              # the two samples score differently
    # prompt matters: swapping prompts changes the scores, matching the reference
    swapped = model(x.detach(), PROMPTS[::-1])
    torch.testing.assert_close(swapped, reference_score(state, x.detach(), PROMPTS[::-1], vocab),
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(swapped, got.detach())

    got.sum().backward()
    want.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-3, atol=1e-6)
    # a non-square image: ImageReward's _transform(224) = Resize(224, bicubic) + CenterCrop(224)
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize
    wide = torch.rand(1, 3, 256, 320, generator=torch.Generator().manual_seed(5))
    tv = CenterCrop(224)(Resize(224, InterpolationMode.BICUBIC, antialias=True)(wide))
    torch.testing.assert_close(model(wide, PROMPTS[:1]), reference_score(state, tv, PROMPTS[:1], vocab),
                               rtol=1e-4, atol=1e-4)
    # srpo's path: score_features(image_features, text_features) equals forward
    with torch.no_grad():
        split = model.score_features(model.image_features(x.detach()), model.text_features(PROMPTS))
    torch.testing.assert_close(split, got.detach())


def test_reward_set_and_bf16(tiny_ir):
    cfg, state, vocab, _ = tiny_ir
    x = images(2)
    rs = RewardSet.from_configs([RewardConfig(**{**cfg.__dict__, "weight": 0.5})])
    scores = rs.scores(x, PROMPTS)
    want = reference_score(state, x, PROMPTS, vocab)
    torch.testing.assert_close(scores["imagereward"], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rs.weighted(scores), 0.5 * want, rtol=1e-4, atol=1e-4)
    bf = load_reward(cfg, dtype=torch.bfloat16)(x, PROMPTS)
    assert bf.dtype == torch.float32
    torch.testing.assert_close(bf, want, rtol=0, atol=0.15)


def _one_line(e, *parts):
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, (p, msg)


def test_bad_files_fail_with_one_line(tiny_ir, tmp_path):
    cfg, state, vocab, root = tiny_ir
    good = Path(cfg.path)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="imagereward", path=str(trunc), clip_path=cfg.clip_path))
    _one_line(e, str(trunc), "torch.load failed", "ImageReward state dict")

    other = tmp_path / "hps.pt"
    torch.save({"visual.proj": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="imagereward", path=str(other), clip_path=cfg.clip_path))
    _one_line(e, str(other), "wrong architecture: no blip.visual_encoder.cls_token")

    extra = tmp_path / "extra.pt"
    torch.save({**state, "blip.visual_encoder.blocks.0.attn.rel_pos": torch.zeros(3)}, extra)
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="imagereward", path=str(extra), clip_path=cfg.clip_path))
    _one_line(e, str(extra), "wrong architecture", "1 unexpected keys")

    missing = tmp_path / "missing.pt"
    torch.save({k: v for k, v in state.items() if k != "blip.text_encoder.encoder.layer.1.output.dense.bias"},
               missing)
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="imagereward", path=str(missing), clip_path=cfg.clip_path))
    _one_line(e, str(missing), "1 missing keys", "text.encoder.layer.1.output.dense.bias")

    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="imagereward", path=cfg.path))
    _one_line(e, "clip_path is not set", "bert-base-uncased")
    small = tmp_path / "tok"
    small.mkdir()
    (small / "vocab.txt").write_text("\n".join(vocab + ["extra1", "extra2"]) + "\n")
    with pytest.raises(ValueError) as e:
        load_reward(RewardConfig(kind="imagereward", path=cfg.path, clip_path=str(small)))
    _one_line(e, str(small), f"has {len(vocab) + 4} tokens", f"embeds {len(vocab) + 2}")
