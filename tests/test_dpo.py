"""Diffusion-DPO: the loss against hand computations (reference term included; the
mean-then-logsigmoid of diffusers #6702 differs), soft labels and ties, implicit accuracy; then
tiny runs under ZeRO-3 (`python -m megadiff.train`, one rank): the first step's loss is exactly
log 2 because the model equals the reference, the reference is not in the checkpoint, the
metrics are logged, SFT trains on winners alone, and a training shard set is refused."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import clean_env, read_jsonl, run_cli
from megadiff.objectives.dpo import (dpo_loss, dpo_margin, implicit_accuracy, per_sample_error,
                                     preferred_first)


def _logsigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def test_dpo_loss_matches_hand_computation():
    err_w = torch.tensor([0.50, 0.20, 0.90])
    err_l = torch.tensor([0.40, 0.30, 0.70])
    ref_w = torch.tensor([0.45, 0.25, 0.80])
    ref_l = torch.tensor([0.45, 0.25, 0.75])
    beta = 20.0
    z = dpo_margin(err_w, err_l, ref_w, ref_l, beta)
    # z_b = -beta/2 ((e_w - e_l) - (r_w - r_l))
    want_z = [-10 * ((0.5 - 0.4) - 0.0), -10 * ((0.2 - 0.3) - 0.0), -10 * ((0.9 - 0.7) - 0.05)]
    assert z.tolist() == pytest.approx(want_z, abs=1e-6)
    want = -sum(_logsigmoid(v) for v in want_z) / 3
    assert float(dpo_loss(z)) == pytest.approx(want, abs=1e-6)
    assert float(dpo_loss(z, torch.ones(3))) == pytest.approx(want, abs=1e-6)
    # diffusers #6702: logsigmoid of the batch mean is a different (wrong) number
    wrong = -_logsigmoid(sum(want_z) / 3)
    assert abs(want - wrong) > 0.1
    # without the reference term the loss changes (the reference is really in it)
    no_ref = -sum(_logsigmoid(-10 * (a - b)) for a, b in [(0.5, 0.4), (0.2, 0.3), (0.9, 0.7)]) / 3
    assert abs(want - no_ref) > 0.05


def test_per_sample_error_is_the_elementwise_mean():
    v = torch.zeros(2, 1, 2, 2)
    t = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 2.0]).view(2, 1, 2, 2)
    assert per_sample_error(v, t).tolist() == pytest.approx([(1 + 4 + 9 + 16) / 4, 4 / 4])


def test_labels_flip_pairs_and_ties_pull_the_margin_to_zero():
    z = torch.tensor([1.5, -0.5])
    # label 0: same as the swapped pair (z -> -z) with label 1
    assert float(dpo_loss(z, torch.zeros(2))) == pytest.approx(float(dpo_loss(-z)), abs=1e-7)
    # tie: -(log s(z) + log s(-z)) / 2, minimal (log 2) at z = 0, gradient zero there
    zt = torch.zeros(3, requires_grad=True)
    loss = dpo_loss(zt, torch.full((3,), 0.5))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-7)
    assert zt.grad.abs().max() == 0
    assert float(dpo_loss(torch.tensor([2.0]), torch.tensor([0.5]))) > math.log(2)
    w, l = torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    a, b = preferred_first(w, l, torch.tensor([1.0, 0.0, 0.5]))
    assert a[:, 0, 0, 0].tolist() == [1, 0, 1] and b[:, 0, 0, 0].tolist() == [0, 1, 0]


def test_implicit_accuracy_counts_ties_as_half():
    z = torch.tensor([0.3, -0.2, 0.1, -1.0])
    assert float(implicit_accuracy(z, torch.tensor([1.0, 1.0, 0.5, 0.0]))) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


# ---- tiny runs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory, tiny_model):
    from megadiff.models.tiny import TINY_RESOLUTION
    from megadiff.objectives.preference_shards import demo_pair_images, write_pairs

    out = tmp_path_factory.mktemp("pairs") / "pairs"
    write_pairs(out, demo_pair_images(16, TINY_RESOLUTION, seed=3), tiny_model, TINY_RESOLUTION, 32)
    return out


def dpo_args(model, shards, out, *overrides):
    return ["--recipe", "tiny-dpo-cpu", "--output-dir", str(out), "demo.enabled=false",
            f"model.path={model}", f"data.local={shards}", "model.max_sequence_length=32",
            "train.max_steps=4", "train.log_interval=1", "train.save_interval=4",
            "train.keep_last=0", "logging.wandb_mode=disabled", "validation.num_inference_steps=2",
            *overrides]


def test_tiny_dpo_under_zero3_starts_at_log2_and_keeps_the_reference_out_of_the_checkpoint(
        tiny_model, pair_shards, tmp_path):
    out = tmp_path / "run"
    r = run_cli(dpo_args(tiny_model, pair_shards, out), env=clean_env(OMP_NUM_THREADS="1"),
                module="megadiff.train")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "metric/dpo_acc" in r.stdout
    recs = read_jsonl(out / "loss_logs" / "train.jsonl")
    assert [x["iteration"] for x in recs] == [1, 2, 3, 4]
    first = recs[0]
    # step 0: the model IS the reference, so d_model - d_ref = 0 for every pair
    assert first["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["metric/dpo_margin"] == pytest.approx(0.0, abs=1e-3)
    assert first["metric/mse_model"] == pytest.approx(first["metric/mse_ref"], rel=1e-5)
    later = recs[-1]
    assert later["loss/dpo"] != pytest.approx(math.log(2), abs=1e-4)   # the model moved away
    assert later["metric/mse_model"] != pytest.approx(later["metric/mse_ref"], rel=1e-6)
    for x in recs:
        assert all(math.isfinite(x[k]) for k in x if k.startswith(("loss/", "metric/")))
        assert 0 <= x["metric/dpo_acc"] <= 1
    ckpt = out / "checkpoints" / "step-4"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["rng", "transformer"]


def test_sft_trains_the_winners_by_flow_matching_without_a_reference(tiny_model, pair_shards, tmp_path):
    out = tmp_path / "sft"
    r = run_cli(dpo_args(tiny_model, pair_shards, out, "dpo.sft=true", "train.max_steps=2",
                         "train.save_interval=2"),
                env=clean_env(OMP_NUM_THREADS="1"), module="megadiff.train")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_jsonl(out / "loss_logs" / "train.jsonl")
    assert all("loss/sft" in x and "loss/dpo" not in x and x["loss/sft"] > 0 for x in recs)


def test_dpo_refuses_image_shards_and_bad_beta_in_one_line(tiny_model, tiny_shards, tmp_path):
    r = run_cli(dpo_args(tiny_model, tiny_shards, tmp_path / "a"), env=clean_env(), module="megadiff.train")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "megadiff.train set" in last and "megadiff data pairs" in last
    r = run_cli(dpo_args(tiny_model, tiny_shards, tmp_path / "b", "dpo.beta=0"), env=clean_env(),
                module="megadiff.train")
    assert r.returncode == 2 and "dpo.beta=0.0 must be positive" in r.stderr.strip().splitlines()[-1]
