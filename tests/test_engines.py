"""Engine building blocks: LR schedules, per-network optimizer config, frozen networks."""
from __future__ import annotations

import math

import pytest
import torch

from megadiff.config import OptimConfig, load_config
from megadiff.engine.engines import lr_lambda


def test_warmup_then_cosine_to_floor():
    f = lr_lambda(OptimConfig(schedule="cosine", warmup_steps=4, min_lr_ratio=0.1), max_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and math.isclose(f(9), 0.1 + 0.9 * 0.5) and math.isclose(f(14), 0.1)
    g = lr_lambda(OptimConfig(schedule="constant", warmup_steps=2), max_steps=10)
    assert [g(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]


def test_per_network_optimizer_settings():
    cfg = load_config("tiny-cpu", ["optim_nets={fake_score: {lr: 2.0e-6, betas: [0.0, 0.99]}}"])
    assert cfg.optim_for("fake_score").lr == 2e-6 and cfg.optim_for("fake_score").betas == (0.0, 0.99)
    assert cfg.optim_for("generator") == cfg.optim
    with pytest.raises(ValueError, match="optim_nets.fake_score.lrr"):
        load_config("tiny-cpu", ["optim_nets={fake_score: {lrr: 1}}"])
    with pytest.raises(ValueError, match="optim_nets.fake_score.lr=-1.0 must be positive"):
        load_config("tiny-cpu", ["optim_nets={fake_score: {lr: -1}}"])


def test_frozen_network_is_partitioned_under_zero3_and_computes_the_same(tiny_model):
    import deepspeed

    from megadiff.engine.dist_env import setup_dist_env
    from megadiff.engine.ds_config import build_ds_config
    from megadiff.engine.engines import build_frozen
    from megadiff.models import sd3
    from conftest import free_port
    import os

    os.environ["MASTER_PORT"] = str(free_port())
    setup_dist_env()
    deepspeed.init_distributed(verbose=False)
    cfg = load_config("tiny-cpu", ["model.precision=fp32", "data.micro_batch_size=2",
                                   "data.gradient_accumulation_steps=1"])
    plain = sd3.load_transformer(tiny_model).eval()
    frozen = build_frozen(sd3.load_transformer(tiny_model), build_ds_config(cfg, 1),
                          torch.device("cpu"), torch.float32)
    assert isinstance(frozen, deepspeed.DeepSpeedEngine)
    assert type(frozen.optimizer).__name__ == "DeepSpeedZeRoOffload"     # partitioner, no optimizer
    assert all(hasattr(p, "ds_id") and not p.requires_grad for p in frozen.module.parameters())
    g = torch.Generator().manual_seed(0)
    x, emb, pooled = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 109, 64, generator=g), torch.randn(2, 64, generator=g)
    t = torch.tensor([100.0, 900.0])
    with torch.no_grad():
        a = plain(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t).sample
        b = frozen(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t).sample
    assert torch.allclose(a, b, atol=1e-5)
