"""DMDR's schedules in the DMD objective against hand computations (vvvvvjdy/dmdr at d1f2436,
train_t2i/sd3): the dynamic distribution guidance scale lora_scale_r * 0.5 (1 + cos(pi p)),
the dynamic re-noising Beta(4, 1.5) -> Beta(1, 1), the fake score's gui scale, the ODE
generator sampler, and the learning-rate switch at the end of the cold start."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from megadiff import generator as gen
from megadiff.objectives import dmd


class _Stub(dmd.DMD):
    def __init__(self, overrides):
        from megadiff.config import load_config

        self.cfg = load_config("tiny-dmdr-cpu", overrides)
        self.noise_rng = torch.Generator().manual_seed(0)
        self.device = torch.device("cpu")


def test_dynamic_distribution_guidance_scale_is_dmdrs_cosine():
    s = _Stub(["dmd.real_adapter_scale=[0.5,0.0]", "dmd.real_adapter_decay_steps=10"])
    dmdr = lambda g: 0.5 * 0.5 * (1 + math.cos(math.pi * g / 10)) if g < 10 else 0.0   # train script l. 682-687
    for step, want in ((0, 0.5), (5, 0.25), (10, 0.0), (30, 0.0)):
        assert math.isclose(s.real_adapter_scale(step), want, abs_tol=1e-12)
        assert math.isclose(s.real_adapter_scale(step), dmdr(step), abs_tol=1e-12)
    assert math.isclose(s.real_adapter_scale(2), dmdr(2), rel_tol=1e-12)
    up = _Stub(["dmd.real_adapter_scale=[0.2,1.0]", "dmd.real_adapter_decay_steps=4"])
    assert math.isclose(up.real_adapter_scale(2), 0.6) and up.real_adapter_scale(9) == 1.0


def test_dynamic_renoise_beta_relaxes_to_uniform():
    assert dmd.dynamic_beta((4.0, 1.5), 0, 10) == (4.0, 1.5)
    a, b = dmd.dynamic_beta((4.0, 1.5), 5, 10)
    assert math.isclose(a, 2.5) and math.isclose(b, 1.25)
    assert dmd.dynamic_beta((4.0, 1.5), 12, 10) == (1.0, 1.0)
    s = _Stub(["dmd.renoise_beta=[4.0,1.5]", "dmd.real_adapter_decay_steps=10"])
    torch.manual_seed(0)
    early, late = s._dm_sigmas(4000, 0, "dm_sigma"), s._dm_sigmas(4000, 10, "dm_sigma")
    assert 0 < early.min() and early.max() <= 1 and late.max() <= 1
    assert abs(early.mean().item() - 4 / 5.5) < 0.01        # Beta(4, 1.5) mean
    assert abs(late.mean().item() - 0.5) < 0.02             # uniform


def test_ode_sampler_takes_euler_steps_and_renoises_its_final_sample():
    sig = torch.tensor([1.0, 0.75, 0.5])
    u = torch.full((2, 1, 2, 2), 0.3)
    const = lambda x, s, e, p: u.expand_as(x)
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    # constant velocity: x_end = noise + (0 - 1) u
    assert torch.allclose(gen.ode_sample(const, noise, sig, None, None), noise - u)
    c = torch.full((2, 1, 2, 2), 0.7)                       # point-mass oracle: exact x0 from any step
    oracle = lambda x, s, e, p: (x - c) / s.view(-1, 1, 1, 1)
    assert torch.allclose(gen.ode_sample(oracle, noise, sig, None, None), c, atol=1e-6)
    fresh = torch.full((2, 1, 2, 2), 2.0)
    x2 = gen.ode_input(oracle, noise, sig, 2, None, None, lambda shape: fresh)
    assert torch.allclose(x2, 0.5 * c + 0.5 * fresh, atol=1e-6)
    assert torch.equal(gen.ode_input(oracle, noise, sig, 0, None, None, lambda shape: fresh), noise)


@pytest.fixture(scope="module")
def tiny_transformer():
    from diffusers import SD3Transformer2DModel

    from megadiff.models.tiny import tiny_transformer_config

    torch.manual_seed(0)
    return SD3Transformer2DModel(**tiny_transformer_config()).eval()


def test_fake_adapter_scale_and_the_real_scores_share_of_the_gui_adapter(tiny_transformer):
    from megadiff.models import lora

    def with_gui(scale_f):
        m = lora.add_lora(copy.deepcopy(tiny_transformer), 4, 4, "gui", seed=1)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
        dmd.scale_adapter_in_place(m, "gui", scale_f)
        return m

    g = torch.Generator().manual_seed(1)
    inp = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 12, 64, generator=g),
               pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([500.0]), return_dict=False)
    one, two = with_gui(1.0), with_gui(2.0)
    with torch.no_grad():
        base = tiny_transformer(**inp)[0]
        # LoRA output is linear in its scale at the first layer; compare the layer deltas instead
        layer1 = lora.lora_layers(one)[0]
        layer2 = lora.lora_layers(two)[0]
        assert math.isclose(layer2.scaling["gui"], 2 * layer1.scaling["gui"])
        with lora.adapter_scale(two, {"gui": 0.25 / 2.0}):        # real score at scale 0.25
            real = two(**inp)[0]
        with lora.adapter_scale(one, {"gui": 0.25}):
            assert torch.allclose(real, one(**inp)[0], atol=1e-6)
        with lora.adapter_scale(two, {"gui": 0.0}):
            assert torch.allclose(two(**inp)[0], base, atol=1e-5)


def test_learning_rate_switches_at_the_first_step_after_the_cold_start():
    from megadiff.engine.engines import lr_lambda

    s = _Stub(["dmd.update_ratio=2", "dmd.cold_start_steps=5", "optim.lr=1e-3",
               "dmd.after_cold_start_lr={generator: 1e-4, fake_score: 5e-4}", "optim_nets.fake_score.lr=2e-3"])
    s.engines = {}
    for net in ("generator", "fake_score"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=s.cfg.optim_for(net).lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.cfg.optim_for(net), 100))
        s.engines[net] = SimpleNamespace(lr_scheduler=sched, opt=opt)
    s.build_extras()
    used = {"generator": [], "fake_score": []}
    for step in range(10):                          # the loop: each net's optimizer step, then its scheduler
        for net in s.steps_this_iteration(step):
            e = s.engines[net]
            used[net].append((step, e.opt.param_groups[0]["lr"]))
            e.opt.step()
            e.lr_scheduler.step()
    # generator steps at 0, 2, 4 (cold start, 1e-3) and 6, 8 (1e-4); fake score 0-4 at 2e-3, 5-9 at 5e-4
    assert used["generator"] == [(0, 1e-3), (2, 1e-3), (4, 1e-3), (6, pytest.approx(1e-4)), (8, pytest.approx(1e-4))]
    assert [lr for _, lr in used["fake_score"]] == [2e-3] * 5 + [pytest.approx(5e-4)] * 5
