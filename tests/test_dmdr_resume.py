"""A DMDR run (tiny-dmdr-cpu, objectives [dmd, srpo], one rank, ZeRO-3) killed with SIGKILL
right after the checkpoint that ends its cold start and resumed with --resume auto ends bitwise
equal to an uninterrupted run: generator and fake-score weights, every loss term (DMD and the
SRPO reward, whose control words, Beta re-noising levels and learning-rate switch must all
carry over), and the saved LoRA files."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import clean_env, kill_after_checkpoint, read_jsonl

STEPS, COLD = 4, 2


def args(model, shards, out, rewards):
    return ["--recipe", "tiny-dmdr-cpu", "--output-dir", str(out), "demo.enabled=false",
            f"model.path={model}", f"data.local={shards}", "model.max_sequence_length=32",
            "objectives=[dmd, srpo]", f"train.max_steps={STEPS}", "train.log_interval=1",
            "train.save_interval=2", "train.keep_last=0", "logging.wandb_mode=disabled",
            "validation.num_inference_steps=2", "dmd.teacher_steps=4", "dmd.update_ratio=1",
            f"dmd.cold_start_steps={COLD}", "dmd.real_adapter_decay_steps=3", f"rewards={json.dumps(rewards)}"]


def test_dmdr_resume_is_bitwise_exact_after_kill(tiny_model, tiny_shards, tmp_path):
    from safetensors.torch import load_file

    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir
    from megadiff.rewards.tiny import make_colour_reward

    rc = make_colour_reward(tmp_path / "hps", kind="hpsv2", colour="red")
    rewards = [{"kind": "hpsv2", "name": "hpsv2", "path": rc.path, "arch": rc.arch, "weight": 1.0}]
    env = clean_env(OMP_NUM_THREADS="1")
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    cmd = lambda out: [sys.executable, "-m", "megadiff.train", *args(tiny_model, tiny_shards, out, rewards)]
    r = subprocess.run(cmd(ref), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    kill_after_checkpoint(cmd(killed), clean_env(OMP_NUM_THREADS="1"), "saved checkpoint")
    assert (killed / "latest").read_text().strip() == "step-2"
    resumed = subprocess.run(cmd(killed) + ["--resume", "auto"], capture_output=True, text=True,
                             env=clean_env(OMP_NUM_THREADS="1"), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for net in ("generator", "fake_score"):
        a = consolidated_state_dict(RunDir(ref), f"step-{STEPS}", net)
        b = consolidated_state_dict(RunDir(killed), f"step-{STEPS}", net)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), net
    want = {r["iteration"]: r for r in read_jsonl(ref / "loss_logs" / "train.jsonl")}
    after = [r for r in read_jsonl(killed / "loss_logs" / "train.jsonl") if r["iteration"] > 2][-2:]
    assert [r["iteration"] for r in after] == [3, 4]
    for r in after:
        keys = [k for k in r if k.startswith(("loss/", "lr/"))]
        assert "loss/reward_hpsv2" in keys
        assert all(r[k] == want[r["iteration"]][k] for k in keys)
    for adapter in ("lora_gen", "lora_gui"):
        f = f"checkpoints/{adapter}/step-{STEPS}/pytorch_lora_weights.safetensors"
        a, b = load_file(ref / f), load_file(killed / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
