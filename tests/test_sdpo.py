"""SDPO and the flow SDE: a step's log-prob equals the Gaussian log-density computed by hand;
the SDE keeps a known Gaussian's marginals; anchors, dense rewards, discounted returns,
normalisation and the clipped squared loss on fixed numbers; then a tiny run under ZeRO-3
(one rank) that logs its terms, rolls out only every K / timesteps_per_update iterations and
checkpoints the transformer alone."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import clean_env, read_jsonl, run_cli
from megadiff import sde
from megadiff.objectives.sdpo import (anchor_similarities, dense_rewards, discounted_returns,
                                      normalize, sdpo_loss)


def test_sde_step_log_prob_equals_the_gaussian_log_density_by_hand():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 2, 3, generator=g)
    v = torch.randn(2, 1, 2, 3, generator=g)
    z = torch.randn(2, 1, 2, 3, generator=g)
    s, s_next, a = 0.6, 0.35, 0.7
    x_next, lp, mean, step_std = sde.sde_step(x, v, torch.full((2,), s), torch.full((2,), s_next),
                                              a, 0.9, noise=z)
    std = a * math.sqrt(s / (1 - s))                          # Flow-GRPO's std at level s
    dt = s_next - s
    sd = std * math.sqrt(-dt)
    for b in range(2):
        total = 0.0
        for xi, vi, zi, yi in zip(x[b].flatten().tolist(), v[b].flatten().tolist(),
                                  z[b].flatten().tolist(), x_next[b].flatten().tolist()):
            m = xi * (1 + std**2 / (2 * s) * dt) + vi * (1 + std**2 * (1 - s) / (2 * s)) * dt
            assert yi == pytest.approx(m + sd * zi, abs=1e-5)
            total += -(yi - m) ** 2 / (2 * sd**2) - math.log(sd) - 0.5 * math.log(2 * math.pi)
        assert float(lp[b]) == pytest.approx(total / 6, abs=1e-5)
    assert step_std.tolist() == pytest.approx([sd, sd])
    # scoring a given x_next gives the same number; at s = 1 the std uses the next level
    _, lp2, _, _ = sde.sde_step(x, v, torch.full((2,), s), torch.full((2,), s_next), a, 0.9, x_next=x_next)
    assert torch.allclose(lp, lp2)
    assert float(sde.sde_std(torch.tensor([1.0]), a, 0.75)) == pytest.approx(a * math.sqrt(1 / 0.25))


def test_sde_keeps_the_marginals_of_a_known_gaussian():
    """Data x0 ~ N(0, c^2): the exact velocity is E[eps - x0 | x_s] = x (s - (1 - s) c^2) / var_s,
    var_s = (1 - s)^2 c^2 + s^2. Integrated from N(0, 1) the SDE must end at std c (as the ODE
    does), and a wrong drift sign or std would not."""
    c = 0.5

    def velocity(x, s):
        s = s.view(-1, 1)
        return x * (s - (1 - s) * c**2) / ((1 - s) ** 2 * c**2 + s**2)

    g = torch.Generator().manual_seed(1)
    noise = torch.randn(20000, 1, generator=g)
    sigmas = torch.linspace(1, 0, 201)
    traj = sde.sde_sample(velocity, noise, sigmas, 0.7, lambda shape: torch.randn(shape, generator=g))
    assert traj.latents.shape == (20000, 201, 1) and traj.log_probs.shape == (20000, 200)
    assert float(traj.latents[:, -1].std()) == pytest.approx(c, rel=0.03)
    mid = 100                                            # sigma = 0.5 halfway
    want_mid = math.sqrt(0.25 * c**2 + 0.25)
    assert float(traj.latents[:, mid].std()) == pytest.approx(want_mid, rel=0.03)
    # x0 predictions: x - s v
    k = 50
    s = float(sigmas[k])
    assert torch.allclose(traj.x0_preds[:, k], traj.latents[:, k] - s * velocity(traj.latents[:, k], sigmas[k].expand(20000)))


def test_anchor_is_the_step_least_like_first_and_last():
    pts = [(1.0, 0.0), (1.0, -1.0), (0.6, 0.6), (0.0, 1.0)]      # step 1 turns away from both ends
    x0 = torch.tensor(pts).view(1, 4, 2, 1, 1)
    anchor, c_first, c_anchor, c_last = anchor_similarities(x0)
    cos = lambda a, b: (a[0] * b[0] + a[1] * b[1]) / math.hypot(*a) / math.hypot(*b)
    assert int(anchor) == 1                                       # cos sums 1, 0, 1.41, 1
    assert c_first[0].tolist() == pytest.approx([cos(p, pts[0]) for p in pts], abs=1e-6)
    assert c_last[0].tolist() == pytest.approx([cos(p, pts[3]) for p in pts], abs=1e-6)
    assert c_anchor[0].tolist() == pytest.approx([cos(p, pts[1]) for p in pts], abs=1e-6)


def test_dense_rewards_returns_and_advantages_on_fixed_numbers():
    r = torch.tensor([[1.0, 2.0, 4.0]])                       # first, anchor, last
    sf = torch.tensor([[1.0, 0.8, 0.5, 0.2, 0.1]])
    sa = torch.tensor([[0.5, 1.0, 0.9, 0.4, 0.3]])
    sl = torch.tensor([[0.1, 0.3, 0.6, 0.9, 1.0]])
    dense = dense_rewards(r, torch.tensor([1]), sf, sa, sl)
    mid2 = (1 * 0.5 + 2 * 0.9 + 4 * 0.6) / (0.5 + 0.9 + 0.6)
    mid3 = (1 * 0.2 + 2 * 0.4 + 4 * 0.9) / (0.2 + 0.4 + 0.9)
    assert dense[0].tolist() == pytest.approx([1.0, 2.0, mid2, mid3, 4.0], abs=1e-6)
    ret = discounted_returns(dense, 0.5)
    want = [0.0] * 5
    nxt = 0.0
    for k in reversed(range(5)):
        nxt = dense[0, k].item() + 0.5 * nxt
        want[k] = nxt
    assert ret[0].tolist() == pytest.approx(want, abs=1e-5)
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + 9) / 4)
    assert normalize(x).flatten().tolist() == pytest.approx([(v - mean) / std for v in (1, 2, 3, 6)], abs=1e-6)


def test_sdpo_loss_and_clipping_on_fixed_numbers():
    old1, old2 = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -0.5])
    lp1 = old1 + torch.tensor([0.3, 0.00005])
    lp2 = old2 + torch.tensor([-0.1, 0.0])
    adv1, adv2 = torch.tensor([7.0, 0.2]), torch.tensor([-1.0, 0.4])
    w = torch.tensor([1.0, 0.99 ** 3])
    # unclipped: (w (dlp1 - dlp2) - (clip(A1) - clip(A2)))^2, A clipped to +-5
    un = [(1.0 * (0.3 + 0.1) - (5.0 + 1.0)) ** 2, (0.99**3 * 0.00005 - (0.2 - 0.4)) ** 2]
    loss, _ = sdpo_loss(lp1, lp2, old1, old2, adv1, adv2, w, 5.0, 0.0)
    assert float(loss) == pytest.approx(sum(un) / 2, rel=1e-5)
    # log-prob changes clipped to +-1e-4: sample 0's clipped term (2e-4 - 6)^2 is the larger one
    cl0 = (1.0 * (1e-4 + 1e-4) - 6.0) ** 2
    cl1 = (0.99**3 * 0.00005 - (-0.2)) ** 2                  # inside the range: unchanged
    loss, frac = sdpo_loss(lp1, lp2, old1, old2, adv1, adv2, w, 5.0, 1e-4)
    assert float(loss) == pytest.approx((max(un[0], cl0) + max(un[1], cl1)) / 2, rel=1e-5)
    assert float(frac) == pytest.approx(0.5)                  # sample 0: the clipped term is larger
    # the gradient pushes the better trajectory's log-prob up while under-fitting dA
    lp1g = lp1.clone().requires_grad_(True)
    sdpo_loss(lp1g, lp2, old1, old2, adv1, adv2, w, 5.0, 0.0)[0].backward()
    assert lp1g.grad[0] < 0


# ---- a tiny run --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompt_shards(tmp_path_factory, tiny_model):
    from megadiff.objectives.preference_shards import demo_prompts, write_prompt_embeds

    out = tmp_path_factory.mktemp("prompts") / "prompts"
    write_prompt_embeds(out, demo_prompts(16, seed=2), tiny_model, 32)
    return out


@pytest.fixture(scope="module")
def reward_cfg(tmp_path_factory):
    from megadiff.rewards.tiny import make_tiny_reward

    return make_tiny_reward("clip", tmp_path_factory.mktemp("reward") / "clip")


def sdpo_args(model, shards, reward, out, *overrides):
    return ["--recipe", "tiny-sdpo-cpu", "--output-dir", str(out), "demo.enabled=false",
            f"model.path={model}", f"data.local={shards}", "model.max_sequence_length=32",
            f"rewards=[{{kind: clip, path: {reward.path}, arch: {reward.arch}}}]",
            "train.max_steps=4", "train.log_interval=1", "train.save_interval=4", "train.keep_last=0",
            "train.log_samples=true", "data.micro_batch_size=2", "sdpo.num_steps=4",
            "sdpo.timesteps_per_update=2", "logging.wandb_mode=disabled",
            "validation.num_inference_steps=2", *overrides]


def test_tiny_sdpo_under_zero3_rolls_out_every_other_iteration(tiny_model, prompt_shards, reward_cfg, tmp_path):
    out = tmp_path / "run"
    r = run_cli(sdpo_args(tiny_model, prompt_shards, reward_cfg, out), env=clean_env(OMP_NUM_THREADS="1"),
                module="megadiff.train")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_jsonl(out / "loss_logs" / "train.jsonl")
    assert [x["iteration"] for x in recs] == [1, 2, 3, 4]
    assert [x["consumed_samples"] for x in recs] == [2, 2, 4, 4]      # 2 new prompts per rollout
    # 4 SDE steps, 2 per update: a rollout (and new prompts) at iterations 1 and 3 only
    for x in recs:
        rolled = x["iteration"] % 2 == 1
        assert ("metric/reward_last" in x) == rolled and ("metric/reward_first" in x) == rolled
        assert math.isfinite(x["loss/sdpo"]) and x["loss/sdpo"] >= 0
    samples = read_jsonl(out / "loss_logs" / "samples-rank0.jsonl")
    assert [len(s["indices"]) for s in samples] == [1, 0, 1, 0]
    assert len(set(samples[0]["indices"][0]) | set(samples[2]["indices"][0])) == 4
    ckpt = out / "checkpoints" / "step-4"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["rng", "transformer"]


def test_sdpo_bad_input_is_one_line(tiny_model, prompt_shards, tiny_shards, reward_cfg, tmp_path):
    r = run_cli(sdpo_args(tiny_model, prompt_shards, reward_cfg, tmp_path / "a", "sdpo.num_steps=1"),
                env=clean_env(), module="megadiff.train")
    assert r.returncode == 2 and "sdpo.num_steps=1" in r.stderr.strip().splitlines()[-1]
    r = run_cli(sdpo_args(tiny_model, tiny_shards, reward_cfg, tmp_path / "b"), env=clean_env(),
                module="megadiff.train")
    assert r.returncode == 2
    assert "megadiff data prompts" in r.stderr.strip().splitlines()[-1]
