"""DMD's engines under ZeRO-3 (one rank, in process): the generator's loss, GAN term included,
sends no gradient to the teacher or the fake score, whose weights a generator step leaves
bitwise unchanged; the check fails if the fake score is not frozen during the generator's
backward (so it does test something); bad input stops before any work."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import free_port


def _full_params(module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {n: p.detach().clone() for n, p in params.items()}


def _grads(engine) -> list:
    from deepspeed.utils import safe_get_full_grad

    return [safe_get_full_grad(p) for p in engine.module.parameters()]


def _overrides(tiny_model, tiny_shards, *extra):
    return ["demo.enabled=false", f"model.path={tiny_model}", f"data.local={tiny_shards}",
            "model.max_sequence_length=32", "logging.wandb_mode=disabled", "logging.progress='off'",
            "data.num_workers=0", "dmd.gan.sigma_max=0.5", "dmd.generator.num_steps=2", *extra]


@pytest.fixture(scope="module")
def trainer(tiny_model, tiny_shards, tmp_path_factory):
    from megadiff.config import load_config
    from megadiff.registry import compose_trainer

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not torch.distributed.is_initialized():
        os.environ["MASTER_PORT"] = str(free_port())
    cfg = load_config("tiny-dmd-cpu", _overrides(tiny_model, tiny_shards))
    return compose_trainer(cfg.objectives)(cfg, tmp_path_factory.mktemp("dmd") / "run")


def _generator_step(trainer, batch):
    gen = trainer.engines["generator"]
    terms = trainer.loss_terms("generator", batch, 0)
    gen.backward(sum(terms.values()))
    grads = _grads(trainer.engines["fake_score"])
    gen.step()
    return terms, grads


def test_generator_loss_sends_no_gradient_to_teacher_or_fake_score(trainer):
    import deepspeed

    fake, gen, teacher = trainer.engines["fake_score"], trainer.engines["generator"], trainer.frozen["teacher"]
    assert isinstance(teacher, deepspeed.DeepSpeedEngine)      # ZeRO-3 partitioned, no replica
    fake0, gen0, teacher0 = _full_params(fake.module), _full_params(gen.module), _full_params(teacher.module)
    batch = trainer.next_batch()
    terms, fake_grads = _generator_step(trainer, batch)
    assert set(terms) == {"dm", "gan_g"} and terms["gan_g"].requires_grad
    assert all(g is None or torch.count_nonzero(g) == 0 for g in fake_grads)
    assert all(p.grad is None and not p.requires_grad for p in teacher.module.parameters())
    fake1, gen1, teacher1 = _full_params(fake.module), _full_params(gen.module), _full_params(teacher.module)
    assert all(torch.equal(fake0[k], fake1[k]) for k in fake0)
    assert all(torch.equal(teacher0[k], teacher1[k]) for k in teacher0)
    assert any(not torch.equal(gen0[k], gen1[k]) for k in gen0)
    # the fake score's flags are back: its own step trains it (head included)
    assert all(p.requires_grad for p in fake.module.parameters())
    fterms = trainer.loss_terms("fake_score", trainer.next_batch(), 0)
    assert set(fterms) == {"fake_flow", "gan_d"}
    fake.backward(sum(fterms.values()))
    fake.step()
    fake2 = _full_params(fake.module)
    assert not torch.equal(fake1["head.net.0.weight"], fake2["head.net.0.weight"])
    assert any(not torch.equal(fake1[k], fake2[k]) for k in fake1 if k.startswith("transformer."))


def test_without_the_freeze_the_gan_term_would_leak_into_the_fake_score(trainer, monkeypatch):
    from megadiff.objectives import dmd

    class NoFreeze:
        def __init__(self, module, on_restore=None):
            pass

        def watch(self, x):
            return x

        def restore(self):
            pass

    monkeypatch.setattr(dmd, "FreezeUntilBackward", NoFreeze)
    _, fake_grads = _generator_step(trainer, trainer.next_batch())
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in fake_grads)


@pytest.mark.parametrize("override, message", [
    ("dmd.update_ratio=0", "dmd.update_ratio=0 must be at least 1"),
    ("dmd.generator.num_steps=8", "dmd.generator.num_steps=8 is not shorter than the teacher's schedule"),
    ("dmd.lora={teacher: {rank: 4}}", "dmd.lora.teacher: network 'teacher' takes no LoRA adapter"),
    ("dmd.lora={discriminator: {rank: 4}}", "dmd.lora.discriminator: network 'discriminator' takes no LoRA"),
    ("dmd.divergence=js", "set dmd.gan.enabled=true"),
    ("dmd.generator.sigmas=[0.5,0.9]", "must be strictly decreasing"),
    ("dmd.real_score=fake_base", "give the fake score an adapter"),
])
def test_bad_dmd_config_is_one_clear_error(override, message):
    from megadiff.config import load_config

    extra = ["dmd.gan.enabled=false"] if "divergence" in override else []
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("tiny-dmd-cpu", [override, *extra])


def test_teacher_that_is_not_sd3_stops_before_any_work(tmp_path, tiny_shards):
    import json

    from megadiff.config import load_config
    from megadiff.registry import compose_trainer

    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    cfg = load_config("tiny-dmd-cpu", ["demo.enabled=false", f"model.path={sdxl}", f"data.local={tiny_shards}"])
    with pytest.raises(ValueError, match="describes a StableDiffusionXLPipeline, not an SD3"):
        compose_trainer(cfg.objectives)(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_discriminator_block_out_of_range_stops_before_any_work(tmp_path, tiny_model, tiny_shards):
    from megadiff.config import load_config
    from megadiff.registry import compose_trainer

    cfg = load_config("tiny-dmd-cpu", _overrides(tiny_model, tiny_shards, "dmd.gan.block=5"))
    with pytest.raises(ValueError, match=r"dmd.gan.block=5 does not exist: the transformer has 2 blocks"):
        compose_trainer(cfg.objectives)(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_lora_generator_and_fake_base_real_score_under_zero3(tiny_model, tiny_shards, tmp_path):
    """LoRA "gen" and "gui" adapters, the real score = the fake score's frozen base with "gui"
    scaled (no teacher network), JS f-div weights from the head, then Decoupled DMD (with
    data-noised generator inputs) on the same engines; the generator's checkpoint rebuilds
    (sample CLI path) into the same function."""
    from megadiff.config import load_config
    from megadiff.engine.run_dir import RunDir
    from megadiff.registry import compose_trainer
    from megadiff.engine.export import consolidated_state_dict
    from megadiff.sample_cli import build_generator

    cfg = load_config("tiny-dmd-cpu", _overrides(
        tiny_model, tiny_shards, "dmd.lora={generator: {rank: 4, alpha: 8}, fake_score: {rank: 4, alpha: 4}}",
        "dmd.real_score=fake_base", "dmd.real_adapter_scale=[0.5,0.0]", "dmd.divergence=js"))
    tr = compose_trainer(cfg.objectives)(cfg, tmp_path / "run")
    assert sorted(tr.engines) == ["fake_score", "generator"] and not tr.frozen
    gen = tr.engines["generator"]
    trainable = [n for n, p in gen.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".gen." in n for n in trainable)
    g0 = _full_params(gen.module)
    for loss in ("dmd2", "ddmd"):
        tr.cfg.dmd.loss = loss
        tr.cfg.dmd.generator.backward_simulation = loss == "dmd2"     # ddmd: inputs from data
        terms = tr.loss_terms("generator", tr.next_batch(), 0)
        assert set(terms) == ({"dm", "gan_g"} if loss == "dmd2" else {"ca", "dm", "gan_g"})
        gen.backward(sum(terms.values()))
        gen.step()
        fterms = tr.loss_terms("fake_score", tr.next_batch(), 0)
        tr.engines["fake_score"].backward(sum(fterms.values()))
        tr.engines["fake_score"].step()
    g1 = _full_params(gen.module)
    changed = {k for k in g0 if not torch.equal(g0[k], g1[k])}
    assert changed and all("lora_" in k for k in changed)          # the base stays the teacher
    tr.step = 1
    tag = tr.save()
    rebuilt = build_generator(cfg, tiny_model, consolidated_state_dict(RunDir(tmp_path / "run"), tag, "generator"))
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = tr.next_batch()
    emb, pooled = batch["prompt_embeds"][:2], batch["pooled_prompt_embeds"][:2]
    s = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        a = tr._velocity(gen, x, s, emb, pooled)
        b = tr._velocity(rebuilt, x, s, emb, pooled)
    assert torch.allclose(a, b, atol=1e-5)


def test_text_length_that_does_not_fit_the_shards_stops_before_any_work(tmp_path, tiny_model, tiny_shards):
    from megadiff.config import load_config
    from megadiff.registry import compose_trainer

    cfg = load_config("tiny-dmd-cpu", _overrides(tiny_model, tiny_shards, "model.max_sequence_length=16"))
    with pytest.raises(ValueError, match=r"have 109 tokens but model.max_sequence_length=16 gives 93.*"
                                         r"set model.max_sequence_length=32"):
        compose_trainer(cfg.objectives)(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
