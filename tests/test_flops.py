"""megadiff.flops against torch's FlopCounterMode on real diffusers SD3Transformer2DModels.

FlopCounterMode convention: 2*M*N*K per matmul/linear/conv, nothing for elementwise ops. For SDPA it
only counts kernels it has a formula for. In torch 2.14 the default CPU kernel
(aten._scaled_dot_product_flash_attention_for_cpu) is not one of them (it counts 0), so the exact
comparisons run SDPA under the MATH backend, which decomposes into two bmm's (QK^T and AV) that are
counted -- the same two matmuls megadiff.flops counts.
"""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from megadiff.bench.projection import MODELS
from megadiff.flops import FlopBreakdown, mmdit_forward_flops, model_flops_per_sample

diffusers = pytest.importorskip("diffusers")
SD3Transformer2DModel = diffusers.SD3Transformer2DModel

TOL = 0.02  # the brief's bound; in practice the match is exact


def _tiny(heads, head_dim, **kw):
    cfg = dict(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=64,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=64,
        out_channels=16,
        pos_embed_max_size=32,
    )
    cfg.update(kw)
    return cfg


CONFIGS = {
    "sd3-tiny": _tiny(2, 16),
    "sd35m-tiny-dual": _tiny(4, 8, dual_attention_layers=(0,)),
    "sd35l-tiny-qknorm": _tiny(3, 32, qk_norm="rms_norm"),
    "dual+qknorm-3layers": _tiny(2, 16, num_layers=3, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "width1536-2layers": _tiny(24, 64),
}

# Published transformer/config.json values (stabilityai/stable-diffusion-3-medium-diffusers,
# stable-diffusion-3.5-medium, stable-diffusion-3.5-large), as the bench's projections use them.
FULL_CONFIGS = {"sd3-medium": MODELS["SD3-M"], "sd3.5-medium": MODELS["SD3.5-M"], "sd3.5-large": MODELS["SD3.5-L"]}


def _count(model, batch, h, w, text_len, device="cpu", math_sdpa=True):
    cfg = model.config
    with torch.device(device):
        args = (
            torch.randn(batch, cfg.in_channels, h, w),
            torch.randn(batch, text_len, cfg.joint_attention_dim),
            torch.randn(batch, cfg.pooled_projection_dim),
            torch.full((batch,), 500.0),
        )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if math_sdpa:
            with sdpa_kernel(SDPBackend.MATH):
                model(*args)
        else:
            model(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_flop_counter(name):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**CONFIGS[name]).eval()
    batch, h, w, text_len = 2, 16, 12, 7  # non-square latent, odd text length
    measured = _count(model, batch, h, w, text_len)
    analytic = mmdit_forward_flops(model.config, h, w, text_len)
    assert analytic.forward * batch == pytest.approx(measured, rel=TOL)
    assert analytic.forward * batch == measured  # exact in practice


@pytest.mark.parametrize("name", list(FULL_CONFIGS))
def test_full_size_configs_on_meta(name):
    # Real SD3/SD3.5 widths and depths at 1024x1024 (128x128 latent, 77+256 T5/CLIP tokens). On the meta
    # device nothing is allocated or computed, but every op still dispatches with its real shapes.
    with torch.device("meta"):
        model = SD3Transformer2DModel(**FULL_CONFIGS[name])
    measured = _count(model, 1, 128, 128, 333, device="meta")
    analytic = mmdit_forward_flops(model.config, 128, 128, 333)
    assert analytic.forward == pytest.approx(measured, rel=TOL)
    assert analytic.forward == measured


def test_default_cpu_sdpa_convention():
    # What FlopCounterMode reports with the default SDPA kernel: the attention matmuls appear only if
    # the kernel that actually runs has a registered formula (CUDA kernels do; the CPU one doesn't in 2.14).
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**CONFIGS["sd35m-tiny-dual"]).eval()
    measured = _count(model, 2, 16, 16, 5, math_sdpa=False)
    analytic = mmdit_forward_flops(model.config, 16, 16, 5)
    assert 0 < analytic.attention < analytic.forward
    cpu_kernel_counted = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_registry
    expected = analytic.forward if cpu_kernel_counted else analytic.forward - analytic.attention
    assert 2 * expected == pytest.approx(measured, rel=TOL)


def test_training_multipliers():
    fb = mmdit_forward_flops(FULL_CONFIGS["sd3.5-large"], 128, 128, 333)
    assert fb.training(activation_checkpointing=False) == 3 * fb.forward
    assert fb.training(activation_checkpointing=True) == 4 * fb.forward
    assert model_flops_per_sample(FULL_CONFIGS["sd3.5-large"], 128, 128, 333) == 3 * fb.forward
    assert model_flops_per_sample(FULL_CONFIGS["sd3.5-large"], 128, 128, 333, activation_checkpointing=True) == (
        4 * fb.forward
    )
    assert FlopBreakdown(forward=10.0).training(True) == 40.0


@pytest.mark.parametrize("name", ["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_scaling_with_image_and_text_tokens(name):
    cfg = FULL_CONFIGS[name]
    layers, p, c = cfg["num_layers"], cfg["patch_size"], cfg["in_channels"]
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n_dual = len(cfg.get("dual_attention_layers", ()))
    h, w, text_len = 64, 96, 154
    n = (h // p) * (w // p)

    def attn(n_img, n_txt):  # 2 matmuls x 2*S*S*D over the joint sequence, + image-only attn2
        return 4 * d * (layers * (n_img + n_txt) ** 2 + n_dual * n_img**2)

    base = mmdit_forward_flops(cfg, h, w, text_len)
    assert base.attention == attn(n, text_len)

    # Doubling the latent area doubles the image tokens: every per-image-token linear (patch conv, q/k/v,
    # out, 4x MLP, dual attn2 q/k/v/out, proj_out) doubles, attention grows with the joint length squared.
    dbl = mmdit_forward_flops(cfg, 2 * h, w, text_len)
    per_img_token = 2 * (c * p * p * d + layers * 12 * d * d + n_dual * 4 * d * d + d * p * p * c)
    assert dbl.attention == attn(2 * n, text_len)
    assert (dbl.forward - dbl.attention) - (base.forward - base.attention) == n * per_img_token
    assert 2 < dbl.forward / base.forward < 4

    # One more text token: context embedder + q/k/v in every block, out + MLP in all but the last.
    more = mmdit_forward_flops(cfg, h, w, text_len + 1)
    per_txt_token = 2 * (cfg["joint_attention_dim"] * d + layers * 3 * d * d + (layers - 1) * 9 * d * d)
    assert (more.forward - more.attention) - (base.forward - base.attention) == per_txt_token


def test_config_sources_agree():
    # FrozenDict from the model, plain dict as json.load gives it (lists, extra keys), and missing keys.
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**CONFIGS["dual+qknorm-3layers"])
    as_json = json.loads(json.dumps({"_class_name": "SD3Transformer2DModel", **dict(model.config)}))
    assert isinstance(as_json["dual_attention_layers"], list)
    ref = mmdit_forward_flops(model.config, 16, 16, 10)
    assert mmdit_forward_flops(as_json, 16, 16, 10) == ref
    # out_channels None falls back to in_channels, as in the model.
    assert mmdit_forward_flops({**as_json, "out_channels": None}, 16, 16, 10) == ref
    with pytest.raises(ValueError):
        mmdit_forward_flops(model.config, 15, 16, 10)  # not a multiple of patch_size
