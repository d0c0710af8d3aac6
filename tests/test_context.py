"""The extended text context (megadiff/models/context.py, masked_attention.py) on the tiny model,
in process: the masked joint attention equals diffusers' processor without padding and ignores
padded text tokens; long prompts are encoded past 77 CLIP tokens and change the conditioning;
a batch of 4 prompts of mixed lengths gives each sample what it gets alone."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from megadiff.models import sd3
from megadiff.models.context import (ContextTransformer, encode_long_context, load_context_projector,
                                     projector_for)
from megadiff.models.context_train import _FILLER, check_shards
from megadiff.models.masked_attention import MaskedJointAttnProcessor, install_masked_attention

BASE_T5 = 32           # the tiny model's max_sequence_length
CLIP_LEN, T5_LEN = 225, 96
SHORT = "a red square on a blue background"
LONG = f"a red square on a blue background, {_FILLER} {_FILLER} {_FILLER}"   # 112 CLIP tokens


@pytest.fixture(scope="module")
def text(tiny_model):
    return sd3.load_text_pipeline(tiny_model)


@pytest.fixture(scope="module")
def transformer(tiny_model):
    return sd3.load_transformer(tiny_model).eval().requires_grad_(False)


def scrambled_projector(tiny_model, seed=0):
    """A projector whose every weight is random (an untrained one is close to the identity)."""
    p = projector_for(tiny_model, CLIP_LEN, T5_LEN, BASE_T5)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in p.parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return p.eval().requires_grad_(False)


def inputs(b, seed=0, text_len=40):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(b, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(b, text_len, 64, generator=g),
                pooled_projections=torch.randn(b, 64, generator=g),
                timestep=torch.tensor([250.0, 700.0, 900.0, 40.0][:b]))


def run(model, **kw):
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def test_masked_processor_without_padding_equals_stock(transformer, tiny_model):
    masked = copy.deepcopy(transformer)
    install_masked_attention(masked)
    assert {type(p) for p in masked.attn_processors.values()} == {MaskedJointAttnProcessor}
    assert {type(p) for p in transformer.attn_processors.values()} == {JointAttnProcessor2_0}
    x = inputs(2)
    stock = run(transformer, **x)
    assert torch.equal(run(masked, **x), stock)                          # no mask: the stock code
    all_real = {"encoder_attention_mask": torch.ones(2, 40, dtype=torch.bool)}
    torch.testing.assert_close(run(masked, **x, joint_attention_kwargs=all_real), stock,
                               rtol=1e-5, atol=1e-5)                        # nothing masked
    wrapped = ContextTransformer(copy.deepcopy(transformer), scrambled_projector(tiny_model))
    assert torch.equal(run(wrapped, **x), stock)                         # no context: plain SD3


def test_padded_text_tokens_have_no_effect_on_real_tokens(transformer):
    attn = transformer.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(1)
    hidden, enc = torch.randn(3, 16, 32, generator=g), torch.randn(3, 12, 32, generator=g)
    lengths = [12, 7, 3]
    mask = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    proc = MaskedJointAttnProcessor()
    with torch.no_grad():
        img, txt = proc(attn, hidden, enc, encoder_attention_mask=mask)
        garbage = torch.where(mask[..., None], enc, 1e3 * torch.randn(enc.shape, generator=g))
        img2, txt2 = proc(attn, hidden, garbage, encoder_attention_mask=mask)
        assert torch.equal(img, img2) and torch.equal(txt[mask], txt2[mask])
        for i, n in enumerate(lengths):      # each sample alone, unpadded, through diffusers' own code
            ref_img, ref_txt = JointAttnProcessor2_0()(attn, hidden[i:i + 1], enc[i:i + 1, :n])
            torch.testing.assert_close(img[i:i + 1], ref_img, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(txt[i:i + 1, :n], ref_txt, rtol=1e-5, atol=1e-5)


def test_batch_of_four_mixed_lengths_matches_each_prompt_alone(text, transformer, tiny_model):
    """Prompts of 8, 52, 112 and 142 CLIP tokens in one batch: every sample's velocity equals
    the plain transformer's on that sample's real tokens only (no padding at all)."""
    prompts = [SHORT, f"{SHORT}, {_FILLER}", LONG, f"{LONG} {_FILLER}"]
    embeds, pooled = sd3.encode_prompts(text, prompts, BASE_T5)
    context = encode_long_context(text, prompts, CLIP_LEN, T5_LEN, BASE_T5)
    clip_real, t5_real = context["clip_mask"].sum(1).tolist(), context["t5_mask"].sum(1).tolist()
    n = [len(text.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert n[0] < n[1] < 75 < n[2] < n[3] <= 150
    assert clip_real == [0, 0, n[2] - 75 + 2, n[3] - 75 + 2]            # BOS + the rest + EOS
    assert len(set(t5_real)) > 1                                        # T5 lengths are mixed too
    projector = scrambled_projector(tiny_model)
    model = ContextTransformer(copy.deepcopy(transformer), projector)
    x = inputs(4)
    x["encoder_hidden_states"], x["pooled_projections"] = embeds, pooled
    batched = run(model, **x, context=context)
    with torch.no_grad():
        ext, mask = projector(embeds, context)
    assert ext.shape[1] == embeds.shape[1] + 154 + (T5_LEN - BASE_T5)
    for i in range(4):
        alone = {k: v[i:i + 1] for k, v in x.items()}
        alone["encoder_hidden_states"] = ext[i:i + 1, mask[i]]
        torch.testing.assert_close(batched[i:i + 1], run(transformer, **alone), rtol=1e-4, atol=1e-5)


def test_prompts_differing_after_token_77_differ_only_with_the_extension(text, transformer, tiny_model):
    a, b = f"{LONG} the shape sits on the left", f"{LONG} the shape sits on the right"
    embeds, pooled = sd3.encode_prompts(text, [a, b], BASE_T5)
    assert torch.equal(embeds[0], embeds[1]) and torch.equal(pooled[0], pooled[1])   # SD3 cannot tell
    context = encode_long_context(text, [a, b], CLIP_LEN, T5_LEN, BASE_T5)
    assert not torch.equal(context["clip"][0], context["clip"][1])
    projector = projector_for(tiny_model, CLIP_LEN, T5_LEN, BASE_T5)     # untrained: SD3's own layout
    with torch.no_grad():
        ext, mask = projector(embeds, context)
    assert not torch.equal(ext[0], ext[1])
    model = ContextTransformer(copy.deepcopy(transformer), projector)
    x = inputs(1)                                  # the same noisy latent and time for both prompts
    x = {k: v.expand(2, *v.shape[1:]) for k, v in x.items()}
    x["encoder_hidden_states"], x["pooled_projections"] = embeds, pooled
    out = run(model, **x, context=context)
    assert (out[0] - out[1]).abs().max() > 1e-4                          # different velocities
    plain = run(transformer, **x)
    torch.testing.assert_close(plain[0], plain[1])                       # plain SD3: the same


def test_sampling_binds_negative_then_positive_context_for_cfg(text, transformer, tiny_model):
    """`euler_sample` stacks [negative, positive] for CFG: the bound module appends the empty
    prompt's context to the first half and each prompt's own to the second."""
    from megadiff import sampling
    from megadiff.models.context_train import bind_context

    prompts = [SHORT, LONG]
    embeds, pooled = sd3.encode_prompts(text, prompts + [""], BASE_T5)
    c = encode_long_context(text, prompts + [""], CLIP_LEN, T5_LEN, BASE_T5)
    pos, neg = {k: v[:2] for k, v in c.items()}, {k: v[2:] for k, v in c.items()}
    model = ContextTransformer(copy.deepcopy(transformer), scrambled_projector(tiny_model))
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    bound = bind_context(model, pos, neg, "cpu", torch.float32)
    got = sampling.euler_sample(bound, noise, embeds[:2], pooled[:2], 2, 1.0, 4.0,
                                embeds[2:].expand(2, -1, -1), pooled[2:].expand(2, -1))
    x, sigmas = noise.clone(), [1.0, 0.5, 0.0]
    both = {k: torch.cat([neg[k].expand(2, *neg[k].shape[1:]), pos[k]]) for k in c}
    for s, s_next in zip(sigmas, sigmas[1:]):
        v = run(model, hidden_states=torch.cat([x, x]), context=both,
                encoder_hidden_states=torch.cat([embeds[2:].expand(2, -1, -1), embeds[:2]]),
                pooled_projections=torch.cat([pooled[2:].expand(2, -1), pooled[:2]]),
                timestep=torch.full((4,), s * 1000))
        v_u, v_c = v.chunk(2)
        x = x + (s_next - s) * (v_u + 4.0 * (v_c - v_u))
    torch.testing.assert_close(got, x)


def test_long_context_encoding_layout(text, tiny_model):
    c = encode_long_context(text, [SHORT, LONG], CLIP_LEN, T5_LEN, BASE_T5)
    assert c["clip"].shape == (2, 154, 64) and c["t5"].shape == (2, T5_LEN - BASE_T5, 64)
    ids = text.tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert c["clip_mask"][1, :77].sum() == len(ids) - 75 + 2 and not c["clip_mask"][1, 77:].any()
    assert not c["clip_mask"][0].any() and (c["clip"][~c["clip_mask"]] == 0).all()
    assert (c["t5"][~c["t5_mask"]] == 0).all()
    alone = encode_long_context(text, [LONG], CLIP_LEN, T5_LEN, BASE_T5)   # independent of the batch
    for k in alone:
        torch.testing.assert_close(alone[k][0], c[k][1], rtol=1e-5, atol=1e-5)
    # an untrained projector hands the transformer SD3's layout: CLIP states zero-padded, T5 as is
    p = projector_for(tiny_model, CLIP_LEN, T5_LEN, BASE_T5)
    embeds = torch.zeros(2, 77 + BASE_T5, 64)
    with torch.no_grad():
        ext, mask = p(embeds, c)
    torch.testing.assert_close(ext[:, 109:109 + 154], c["clip"])
    torch.testing.assert_close(ext[:, 109 + 154:], c["t5"])
    assert mask[:, :109].all() and torch.equal(mask[:, 109:], torch.cat([c["clip_mask"], c["t5_mask"]], 1))


def test_projector_save_and_load_round_trip(tiny_model, tmp_path):
    p = scrambled_projector(tiny_model, seed=3)
    p.save_pretrained(tmp_path / "context_projector")
    q = load_context_projector(tmp_path / "context_projector")
    assert q.config == p.config
    assert all(torch.equal(a, b) for a, b in zip(p.state_dict().values(), q.state_dict().values()))
    with pytest.raises(ValueError, match="config.json is missing"):
        load_context_projector(tmp_path)


def test_context_config_and_shard_checks_name_the_fix(tiny_model):
    from megadiff.config import load_config
    from megadiff.data.schema import ShardSetInfo

    base = ["model.path=/m", "data.local=/d", "context.enabled=true"]
    with pytest.raises(ValueError, match=r"objectives=\[flow_matching\]"):
        load_config("sd3m-full-ft", [*base, "objectives=[dmd]"])
    with pytest.raises(ValueError, match="clip_length=100 must be a multiple of 75"):
        load_config("sd3m-full-ft", [*base, "context.clip_length=100"])
    with pytest.raises(ValueError, match="extend nothing"):
        load_config("sd3m-full-ft", [*base, "context.clip_length=75", "context.t5_length=256"])
    cfg = load_config("sd3m-full-ft", base)
    plain = ShardSetInfo("megadiff.train", 1, (16, 8, 8), 109, 64, 64, 4)
    with pytest.raises(ValueError, match="--long-context N"):
        check_shards(cfg, plain, "/d")
    geom = {"clip_length": 150, "t5_length": 64, "base_t5_length": 256, "clip_extra": 77, "t5_extra": 0}
    info = ShardSetInfo("megadiff.train_context", 1, (16, 8, 8), 333, 64, 64, 4, geom)
    check_shards(cfg, info, "/d")                       # unset lengths are taken from the shards
    assert (cfg.context.clip_length, cfg.context.t5_length) == (150, 64)
    cfg = load_config("sd3m-full-ft", [*base, "context.clip_length=300", "context.t5_length=512"])
    with pytest.raises(ValueError, match="clip_length=300, but the shards in /d were encoded with 150"):
        check_shards(cfg, info, "/d")


def test_sd35_dual_attention_and_qk_norm_take_the_mask():
    """SD3.5's MMDiT-X (a second, image-only attention in some blocks; RMS q/k norms): the
    image-only attention accepts and ignores the mask, and padding still has no effect."""
    from diffusers import SD3Transformer2DModel

    from megadiff.models.context import ContextProjector
    from megadiff.models.tiny import tiny_transformer_config

    torch.manual_seed(0)
    plain = SD3Transformer2DModel(**tiny_transformer_config(), dual_attention_layers=(0,),
                                  qk_norm="rms_norm").eval().requires_grad_(False)
    projector = ContextProjector(64, 64, 64, None, 150, 64, 32)
    with torch.no_grad():
        for t in projector.parameters():
            t.normal_(std=0.3)
    model = ContextTransformer(copy.deepcopy(plain), projector)
    assert len(model.transformer.attn_processors) == 3          # attn, attn2 (block 0), attn (block 1)
    context = {"clip": torch.randn(3, 77, 64), "t5": torch.randn(3, 32, 64),
               "clip_mask": torch.arange(77)[None] < torch.tensor([0, 40, 77])[:, None],
               "t5_mask": torch.arange(32)[None] < torch.tensor([5, 32, 0])[:, None]}
    x = inputs(3, text_len=109)
    batched = run(model, **x, context=context)
    with torch.no_grad():
        ext, mask = projector(x["encoder_hidden_states"], context)
    for i in range(3):
        alone = {k: v[i:i + 1] for k, v in x.items()} | {"encoder_hidden_states": ext[i:i + 1, mask[i]]}
        torch.testing.assert_close(batched[i:i + 1], run(plain, **alone), rtol=1e-4, atol=1e-5)
