"""DMDR end to end: the tiny-dmdr-cpu recipe on the test model and shards, 2 ranks under ZeRO-3
(`deepspeed --num_gpus 2`), a 2-iteration cold start, then DMD + ReFL with two tiny reward
towers in their real formats (CLIP and HPSv2.1). Checks DMDR's output layout
(checkpoints/{lora_gen,lora_gui}/step-N beside the engine states, loss_logs/loss_gen_log.jsonl
and loss_gui_log.jsonl, samples/step-N), the reward term present exactly from the cold start's
end, the learning-rate switch there, the gathered LoRA weights loading into
StableDiffusion3Pipeline with load_lora_weights and changing its output, and no reward model
in the checkpoint."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import clean_env, read_jsonl

STEPS, COLD = 4, 2


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    from megadiff.rewards.tiny import make_tiny_reward

    root = tmp_path_factory.mktemp("rewards")
    out = []
    for i, (kind, weight) in enumerate((("clip", 0.1), ("hpsv2", 0.1))):
        rc = make_tiny_reward(kind, root / kind, seed=i)
        out.append({"kind": kind, "name": kind, "path": rc.path, "arch": rc.arch, "weight": weight})
    return out


@pytest.fixture(scope="module")
def run(tiny_model, tiny_shards, rewards, tmp_path_factory):
    out = tmp_path_factory.mktemp("dmdr") / "run"
    env = clean_env(OMP_NUM_THREADS="1")
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", env["MASTER_PORT"], "--module", "megadiff.train",
           "--recipe", "tiny-dmdr-cpu", "--output-dir", str(out), "demo.enabled=false",
           f"model.path={tiny_model}", f"data.local={tiny_shards}", "model.max_sequence_length=32",
           f"train.max_steps={STEPS}", "train.log_interval=1", "train.save_interval=2", "train.keep_last=0",
           "data.micro_batch_size=2", "logging.wandb_mode=disabled", "validation.num_inference_steps=2",
           "dmd.teacher_steps=4", "dmd.update_ratio=1", f"dmd.cold_start_steps={COLD}",
           f"dmd.real_adapter_decay_steps={COLD}", f"rewards={json.dumps(rewards)}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return out


def test_reward_term_from_the_end_of_the_cold_start_and_the_lr_switch(run):
    records = read_jsonl(run / "loss_logs" / "train.jsonl")
    assert [r["iteration"] for r in records] == list(range(1, STEPS + 1))
    for r in records:        # iteration i ran step i - 1: rewards from step COLD on
        rewarded = r["iteration"] - 1 >= COLD
        assert ("loss/reward_clip" in r) == rewarded and ("loss/reward_hpsv2" in r) == rewarded
        assert "loss/dm" in r and "loss/fake_flow" in r
    # the lr logged after i own steps is the one step i uses: the switch reaches step COLD
    assert [r["lr/generator"] for r in records] == [1e-3] + [5e-4] * 3
    assert [r["lr/fake_score"] for r in records] == [1e-3] + [5e-4] * 3
    assert all(0 <= r["loss/reward_clip"] <= 0.1 * 0.7 + 1e-6 for r in records[COLD:])  # w * relu(0.7 - cos)


def test_per_network_loss_logs(run):
    gen = read_jsonl(run / "loss_logs" / "loss_gen_log.jsonl")
    gui = read_jsonl(run / "loss_logs" / "loss_gui_log.jsonl")
    assert [r["iteration"] for r in gen] == [r["iteration"] for r in gui] == list(range(1, STEPS + 1))
    assert set(gen[-1]) == {"iteration", "lr/generator", "grad_norm/generator", "loss/dm",
                            "loss/reward_clip", "loss/reward_hpsv2"}
    assert set(gui[-1]) == {"iteration", "lr/fake_score", "grad_norm/fake_score", "loss/fake_flow"}
    total = {r["iteration"]: r for r in read_jsonl(run / "loss_logs" / "train.jsonl")}
    assert all(r["loss/dm"] == total[r["iteration"]]["loss/dm"] for r in gen)


def test_dmdr_layout_and_no_reward_model_in_the_checkpoint(run):
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["lora_gen", "lora_gui", "step-2", "step-4"]
    for adapter in ("lora_gen", "lora_gui"):
        assert sorted(p.name for p in (ck / adapter).iterdir()) == ["step-2", "step-4"]
        assert [p.name for p in (ck / adapter / "step-4").iterdir()] == ["pytorch_lora_weights.safetensors"]
    assert sorted(p.name for p in (ck / "step-4").iterdir() if p.is_dir()) == ["fake_score", "generator", "rng"]
    assert (run / "samples" / f"step-{STEPS}" / "grid.png").is_file()
    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir

    for net in ("generator", "fake_score"):
        keys = consolidated_state_dict(RunDir(run), f"step-{STEPS}", net)
        assert keys and all(k.startswith(("transformer_blocks.", "pos_embed.", "time_text_embed.",
                                          "context_embedder.", "norm_out.", "proj_out."))
                            for k in keys), net
    files = [p.name for p in ck.rglob("*") if p.is_file()]
    assert not any("reward" in f or "clip" in f.lower() or "hps" in f.lower() for f in files)


def test_lora_gen_loads_into_the_pipeline_and_changes_its_output(run, tiny_model):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir

    trained = consolidated_state_dict(RunDir(run), f"step-{STEPS}", "generator")
    lora_keys = {k: v for k, v in trained.items() if ".lora_" in k}
    saved = load_file(run / "checkpoints" / "lora_gen" / f"step-{STEPS}" / "pytorch_lora_weights.safetensors")
    assert len(saved) == len(lora_keys)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)

    def image():
        return pipe("a red square", num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = image()
    pipe.load_lora_weights(run / "checkpoints" / "lora_gen" / f"step-{STEPS}", adapter_name="gen")
    cfg = pipe.transformer.peft_config["gen"]
    assert (cfg.r, cfg.lora_alpha) == (8, 16)                  # the recipe's gen adapter, alpha kept
    params = dict(pipe.transformer.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in lora_keys.items())   # ZeRO-3 gathered, full shapes
    assert any(v.abs().sum() > 0 for k, v in lora_keys.items() if "lora_B" in k)    # trained, not the zero init
    after = image()
    assert (after - before).abs().max() > 1e-4
    gui = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    gui.load_lora_weights(run / "checkpoints" / "lora_gui" / f"step-{STEPS}", adapter_name="gui")
    c = gui.transformer.peft_config["gui"]
    assert (c.r, c.lora_alpha) == (4, 8.0)                     # alpha 4 x fake_adapter_scale 2


@pytest.mark.parametrize("net,adapter_dir", [("generator", "lora_gen"), ("fake_score", "lora_gui")])
def test_export_merges_the_lora_network_into_a_plain_transformer(run, tiny_model, tmp_path, net, adapter_dir):
    """`megadiff export --net generator` on a LoRA run writes a diffusers directory whose
    transformer (no peft, the base's key set) computes what the base + the saved adapter does."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from conftest import run_cli

    r = run_cli(["export", "--run", str(run), "--to", str(tmp_path / "out"), "--net", net])
    assert r.returncode == 0, r.stderr[-2000:]
    merged = SD3Transformer2DModel.from_pretrained(tmp_path / "out" / "transformer").eval()
    base = SD3Transformer2DModel.from_pretrained(tiny_model / "transformer")
    assert merged.state_dict().keys() == base.state_dict().keys()
    assert not any("lora" in k for k in merged.state_dict())
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(run / "checkpoints" / adapter_dir / f"step-{STEPS}", adapter_name="a")
    g = torch.Generator().manual_seed(0)
    c = base.config
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 6, c.joint_attention_dim, generator=g)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        want = pipe.transformer.eval()(x, ctx, pooled, t, return_dict=False)[0]
        got = merged(x, ctx, pooled, t, return_dict=False)[0]
        plain = base.eval()(x, ctx, pooled, t, return_dict=False)[0]
    assert (want - plain).abs().max() > 1e-4                    # the adapter is trained: not the base
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_missing_or_broken_reward_checkpoint_is_one_line_before_training(tiny_model, tiny_shards, rewards, tmp_path):
    from conftest import run_cli

    base = ["--recipe", "tiny-dmdr-cpu", "demo.enabled=false", f"model.path={tiny_model}",
            f"data.local={tiny_shards}", "model.max_sequence_length=32", "logging.wandb_mode=disabled"]
    missing = [{**rewards[0], "path": str(tmp_path / "nope.bin")}, rewards[1]]
    r = run_cli(["--output-dir", str(tmp_path / "a"), *base, f"rewards={json.dumps(missing)}"],
                env=clean_env(), module="megadiff.train")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"megadiff: error: reward clip: path {tmp_path / 'nope.bin'} "
                                                 "does not exist: give the local clip checkpoint (rewards[...].path=...)")
    assert not (tmp_path / "a" / "checkpoints").exists()
    truncated = tmp_path / "HPS_v2.1_compressed.pt"
    truncated.write_bytes(open(rewards[1]["path"], "rb").read()[:1000])
    broken = [rewards[0], {**rewards[1], "path": str(truncated)}]
    r = run_cli(["--output-dir", str(tmp_path / "b"), *base, f"rewards={json.dumps(broken)}"],
                env=clean_env(), module="megadiff.train")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert str(truncated) in last and "HPSv2.1 checkpoint" in last, last
    assert not (tmp_path / "b" / "latest").exists()
