"""DMD-family loss math against hand computations on fixed small tensors: the DMD2 gradient
(sign, per-sample normalisation), stop-gradients, Decoupled DMD's CA/DM terms and noise
levels, f-divergence weights and their per-noise-level normalisation, GAN terms, the few-step
generator schedule, the discriminator head and LoRA adapters."""
from __future__ import annotations

import math

import pytest
import torch

from megadiff import flow
from megadiff import generator as gen
from megadiff.objectives import dmd, gan


def t(*rows):
    """(B, 1, 1, N) latents from per-sample rows."""
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, 1, -1)


def test_dmd2_gradient_sign_and_per_sample_normalisation_match_hand_computation():
    x = t([1.0, 2.0], [0.0, 0.0])
    x0_real = t([0.0, 0.0], [1.0, -1.0])
    x0_fake = t([2.0, 1.0], [0.0, 0.0])
    # sample 0: p_real = [1, 2], p_fake = [-1, 1], mean|p_real| = 1.5 -> grad = [2, 1] / 1.5
    # sample 1: p_real = [-1, 1], p_fake = [0, 0], mean|p_real| = 1 -> grad = [-1, 1]
    grad = dmd.dmd2_gradient(x, x0_real, x0_fake)
    assert torch.allclose(grad, t([4 / 3, 2 / 3], [-1.0, 1.0]))
    x = x.clone().requires_grad_(True)
    loss = dmd.dm_loss(x, grad)
    assert math.isclose(loss.item(), 0.5 * (16 / 9 + 4 / 9 + 1 + 1) / 4, rel_tol=1e-6)   # = 19/36
    loss.backward()
    assert torch.allclose(x.grad, grad / 4)          # dL/dx = grad / N
    # a descent step moves x along x0_real - x0_fake, i.e. towards the real score's x0
    step = -x.grad
    assert torch.all(step[0].flatten() * (x0_real - x0_fake)[0].flatten() > 0)
    assert torch.all(step[1].flatten() * (x0_real - x0_fake)[1].flatten() > 0)


def test_dmd2_gradient_is_scale_free_and_nan_safe():
    g = torch.Generator().manual_seed(0)
    x, r, f = (torch.randn(3, 2, 2, 2, generator=g) for _ in range(3))
    assert torch.allclose(dmd.dmd2_gradient(10 * x, 10 * r, 10 * f), dmd.dmd2_gradient(x, r, f), atol=1e-6)
    same = dmd.dmd2_gradient(x, x, f)          # p_real = 0: 0/0 -> 0, not nan
    assert torch.isfinite(same).all()


def test_dm_loss_stops_gradient_at_teacher_and_fake_score():
    """The target sg(x - grad) is detached: even when the teacher/fake predictions are built
    with autograd on, only x receives a gradient."""
    torch.manual_seed(0)
    generator, teacher, fake = (torch.nn.Linear(4, 4) for _ in range(3))
    z = torch.randn(2, 4)
    x = generator(z).view(2, 1, 1, 4)
    x0_real = teacher(x.view(2, 4)).view_as(x)
    x0_fake = fake(x.view(2, 4)).view_as(x)
    dmd.dm_loss(x, dmd.dmd2_gradient(x, x0_real, x0_fake)).backward(retain_graph=True)
    assert generator.weight.grad is not None and generator.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None and fake.weight.grad is None
    loss_ca = dmd.pull_loss(x, x0_real - x0_fake)
    generator.zero_grad()
    loss_ca.backward()
    assert teacher.weight.grad is None and fake.weight.grad is None


def test_decoupled_dmd_terms_match_hand_computation():
    x = t([1.0, -1.0])
    ca_c, ca_u = t([2.0, 0.0]), t([0.0, 0.0])
    dm_r, dm_f = t([0.0, -2.0]), t([1.0, -1.0])
    ca, dm = dmd.ddmd_updates(x, ca_c, ca_u, dm_r, dm_f, guidance_scale=3.0, eps=0.0)
    # CA = (w - 1)(c - u) / mean|c - x| = 2 * [2, 0] / mean(|1|, |1|) = [4, 0]
    assert torch.allclose(ca, t([4.0, 0.0]))
    # DM = (real - fake) / mean|real - x| = [-1, -1] / mean(|-1|, |-1|) = [-1, -1]
    assert torch.allclose(dm, t([-1.0, -1.0]))
    x = x.clone().requires_grad_(True)
    loss = dmd.pull_loss(x, ca) + dmd.pull_loss(x, dm)
    assert math.isclose(loss.item(), (16 + 0) / 2 + (1 + 1) / 2)
    loss.backward()
    assert torch.allclose(x.grad, -2 * (ca + dm) / 2)      # descent moves x along CA + DM
    # with w = 1 there is no CFG augmentation
    ca1, _ = dmd.ddmd_updates(x.detach(), ca_c, ca_u, dm_r, dm_f, guidance_scale=1.0)
    assert torch.count_nonzero(ca1) == 0


def test_decoupled_schedules_ca_cleaner_than_generator_input_dm_full_range():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(4000, generator=g)
    s_in = torch.tensor([1.0, 0.9, 0.75, 0.5]).repeat(1000)
    ca = dmd.sample_ca_sigmas(u, s_in, 0.02, 0.98, 3.0, "below_input")
    lo = flow.shift_sigma(torch.tensor(0.02), 3.0)
    assert torch.all(ca < s_in + 1e-6) and torch.all(ca >= lo - 1e-6)
    for level in (0.9, 0.75, 0.5):     # spread over [lo, s_in)
        sel = ca[s_in == level]
        assert sel.max() > level - 0.05
    full = dmd.sample_ca_sigmas(u, s_in, 0.02, 0.98, 3.0, "full")
    assert (full > s_in).any()
    dm = dmd.sample_dm_sigmas(u, 0.02, 0.98, 1.0)
    assert dm.min() >= 0.02 and dm.max() <= 0.98 and abs(dm.mean().item() - 0.5) < 0.02
    assert torch.allclose(dmd.unshift_sigma(flow.shift_sigma(u, 3.0), 3.0), u, atol=1e-6)


def test_fdiv_weights_match_h_of_r_and_normalise_to_mean_one():
    logits = torch.tensor([0.0, math.log(3.0), -math.log(3.0), 50.0])
    assert torch.equal(dmd.fdiv_weight(logits, "reverse_kl"), torch.ones(4))
    assert torch.allclose(dmd.fdiv_weight(logits, "forward_kl"),
                          torch.tensor([1.0, 3.0, 1 / 3, math.exp(10.0)]), rtol=1e-5)
    js = dmd.fdiv_weight(logits, "js")                     # r / (1 + r) = sigmoid(logit)
    assert torch.allclose(js[:3], torch.tensor([0.5, 0.75, 0.25]))
    h = dmd.normalize_weights(js[:3], "timestep")
    assert torch.allclose(h, torch.tensor([1.0, 1.5, 0.5])) and math.isclose(h.mean().item(), 1.0)
    assert torch.equal(dmd.normalize_weights(js[:3], "none"), js[:3])
    with pytest.raises(ValueError, match="unknown"):
        dmd.fdiv_weight(logits, "hellinger")
    # the weighted DM loss scales each sample's gradient by its h
    x = t([1.0, 1.0], [1.0, 1.0], [1.0, 1.0]).requires_grad_(True)
    grad = torch.ones_like(x)
    dmd.dm_loss(x, grad, h).backward()
    assert torch.allclose(x.grad, h.view(3, 1, 1, 1) * grad / 6)


class _Stub(dmd.DMD):
    """Just enough of a trainer for the noise-level and shared-RNG helpers."""

    def __init__(self, overrides):
        from megadiff.config import load_config

        self.cfg = load_config("tiny-dmd-cpu", overrides)
        self.noise_rng = torch.Generator().manual_seed(0)
        self.device = torch.device("cpu")


def test_per_timestep_fdiv_normalisation_shares_one_level_per_micro_step():
    js = _Stub(["dmd.divergence=js"])
    s = js._dm_sigmas(4, step=3, tag="dm_sigma")
    assert torch.all(s == s[0])                            # one level for the micro-batch
    s2 = js._dm_sigmas(4, step=3, tag="dm_sigma")          # the next micro-step: a new level
    assert s2[0] != s[0]
    again = _Stub(["dmd.divergence=js"])                   # every rank (and a resumed run) agrees
    assert torch.equal(again._dm_sigmas(4, step=3, tag="dm_sigma"), s)
    batch = _Stub(["dmd.divergence=js", "dmd.fdiv_normalization=batch"])._dm_sigmas(4, 3, "dm_sigma")
    rkl = _Stub([])._dm_sigmas(4, 3, "dm_sigma")
    assert len(set(batch.tolist())) == 4 and len(set(rkl.tolist())) == 4


def test_two_time_scale_schedule_and_cold_start():
    s = _Stub(["dmd.update_ratio=3", "dmd.cold_start_steps=4"])
    assert [s.steps_this_iteration(k) for k in range(4)] == [
        ["generator", "fake_score"], ["fake_score"], ["fake_score"], ["generator", "fake_score"]]
    assert [s.in_cold_start(k) for k in (0, 3, 4)] == [True, True, False]


def test_gan_losses_match_hand_computation():
    zero = torch.zeros(3)
    assert math.isclose(gan.gan_generator_loss(zero).item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(gan.gan_discriminator_loss(zero, zero).item(), 2 * math.log(2), rel_tol=1e-6)
    fake = torch.tensor([1.0, -2.0], requires_grad=True)
    gan.gan_generator_loss(fake).backward()
    assert torch.allclose(fake.grad, -torch.sigmoid(-fake.detach()) / 2)    # pushes D(fake) up
    fake.grad = None
    real = torch.tensor([0.5], requires_grad=True)
    gan.gan_discriminator_loss(fake, real).backward()
    assert torch.allclose(fake.grad, torch.sigmoid(fake.detach()) / 2)      # pushes D(fake) down
    assert torch.allclose(real.grad, -torch.sigmoid(-real.detach()))        # and D(real) up


def test_generator_schedule_and_backward_simulation():
    assert torch.allclose(gen.conditioning_sigmas(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5]))
    assert torch.equal(gen.conditioning_sigmas(1, 3.0), torch.tensor([1.0]))
    assert torch.allclose(gen.conditioning_sigmas(2, 1.0, [0.4, 0.2]), torch.tensor([0.4, 0.2]))
    for bad in ([0.5], [0.5, 0.7], [1.2, 0.5]):
        with pytest.raises(ValueError, match="dmd.generator.sigmas"):
            gen.conditioning_sigmas(2, 1.0, bad)
    # an oracle for point-mass data c: v(x, s) = (x - c) / s gives x0_hat = c from any input
    c = torch.full((2, 1, 2, 2), 0.7)
    oracle = lambda x, s, e, p: (x - c) / s.view(-1, 1, 1, 1)
    sig = gen.conditioning_sigmas(3, 3.0)
    draws = iter([torch.full((2, 1, 2, 2), float(i + 1)) for i in range(4)])
    noise = torch.randn(2, 1, 2, 2)
    x2 = gen.simulate_input(oracle, noise, sig, 2, None, None, lambda shape: next(draws))
    assert torch.allclose(x2, (1 - sig[2]) * c + sig[2] * 2.0)           # 2nd draw at s_2
    assert torch.allclose(gen.few_step_sample(oracle, noise, sig, None, None, lambda s: torch.zeros(s)), c)
    assert torch.equal(gen.data_input(c, noise, sig, 0), noise)
    assert torch.allclose(gen.data_input(c, noise, sig, 1), (1 - sig[1]) * c + sig[1] * noise)


@pytest.fixture(scope="module")
def tiny_transformer():
    from diffusers import SD3Transformer2DModel

    from megadiff.models.tiny import tiny_transformer_config

    torch.manual_seed(0)
    return SD3Transformer2DModel(**tiny_transformer_config()).eval()


def _inputs(b=2):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(b, 16, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(b, 12, 64, generator=g),
                pooled_projections=torch.randn(b, 64, generator=g),
                timestep=torch.tensor([300.0, 700.0][:b]), return_dict=False)


def test_discriminator_head_reads_a_block_in_the_same_pass(tiny_transformer):
    import copy

    plain = tiny_transformer
    wrapped = gan.ScoreWithHead(copy.deepcopy(plain), block=0, channels=8)
    with torch.no_grad():
        v_ref = plain(**_inputs())[0]
        (v,) = wrapped(**_inputs())
        v2, logits = wrapped(**_inputs(), discriminate=True)
        other = gan.ScoreWithHead(copy.deepcopy(plain), block=1, channels=8)
        other.head.load_state_dict(wrapped.head.state_dict())
        _, logits_b1 = other(**_inputs(), discriminate=True)
    assert torch.allclose(v, v_ref) and torch.allclose(v2, v_ref)
    assert logits.shape == (2,) and not torch.allclose(logits, logits_b1)
    # the head's gradient reaches the transformer blocks up to the hooked one
    x = _inputs()
    _, lg = wrapped(**x, discriminate=True)
    lg.sum().backward()
    assert wrapped.head.net[0].weight.grad is not None
    assert wrapped.transformer.transformer_blocks[0].attn.to_q.weight.grad is not None


def test_lora_adapter_starts_as_identity_trains_alone_and_scales(tiny_transformer):
    import copy

    from megadiff.models import lora

    m = lora.add_lora(copy.deepcopy(tiny_transformer), rank=4, alpha=8, name="gen", seed=0)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".gen." in n for n in trainable)
    with torch.no_grad():
        base = tiny_transformer(**_inputs())[0]
        assert torch.allclose(m(**_inputs())[0], base, atol=1e-6)     # lora_B = 0 at start
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        tuned = m(**_inputs())[0]
        with lora.adapter_scale(m, {"gen": 0.0}):
            assert torch.allclose(m(**_inputs())[0], base, atol=1e-5)
        assert torch.allclose(m(**_inputs())[0], tuned)                 # restored on exit
    # the same seed gives the same adapter (every rank builds identical weights)
    a = lora.add_lora(copy.deepcopy(tiny_transformer), 4, 8, "gen", seed=3)
    b = lora.add_lora(copy.deepcopy(tiny_transformer), 4, 8, "gen", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_dmdr_shape_one_base_two_adapters(tiny_transformer):
    import copy

    from megadiff.models import lora

    m = lora.add_dual_adapters(copy.deepcopy(tiny_transformer), {"rank": 4, "alpha": 4},
                               {"rank": 2, "alpha": 2}, seed=0)
    names = {n.split(".lora_")[1].split(".")[1] for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"gen", "gui"}
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        base = tiny_transformer(**_inputs())[0]
        with lora.adapter_scale(m, {"gen": 0.0, "gui": 0.0}):
            assert torch.allclose(m(**_inputs())[0], base, atol=1e-5)
        with lora.adapter_scale(m, {"gen": 0.0}):      # the guidance branch alone
            gui = m(**_inputs())[0]
        with lora.adapter_scale(m, {"gen": 0.0, "gui": 0.5}):   # real score: gui at a scale
            half = m(**_inputs())[0]
    assert not torch.allclose(gui, base) and not torch.allclose(half, gui)
    assert set(lora.adapter_state_dict(m, "gui")) and all(".gui" not in k for k in lora.adapter_state_dict(m, "gen"))
