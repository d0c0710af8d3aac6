"""DMD end to end (real `python -m megadiff.train` subprocesses, tiny-dmd-cpu recipe, ZeRO-3,
one rank): both trainable engines step on DMD2's two-time-scale schedule and checkpoint; a run
killed with SIGKILL and resumed ends bitwise equal to an uninterrupted one (generator and fake
score weights, losses, learning rates); `megadiff sample` writes the generator's and the
teacher's images from the same noise; bad input stops with one line before any work."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import clean_env, kill_after_checkpoint, read_jsonl, run_cli

STEPS = 4


def dmd_args(model, shards, out, *overrides):
    return ["--recipe", "tiny-dmd-cpu", "--output-dir", str(out), "demo.enabled=false",
            f"model.path={model}", f"data.local={shards}", "model.max_sequence_length=32",
            f"train.max_steps={STEPS}", "train.log_interval=1", "train.save_interval=2",
            "train.keep_last=0", "logging.wandb_mode=disabled", "validation.num_inference_steps=2",
            "dmd.teacher_steps=4", "dmd.update_ratio=2", "dmd.generator.num_steps=2", *overrides]


def _env():
    return clean_env(OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def ref_run(tiny_model, tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("dmd_ref") / "run"
    r = run_cli(dmd_args(tiny_model, tiny_shards, out), env=_env(), module="megadiff.train")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def weights(out, net, tag=f"step-{STEPS}"):
    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir

    return consolidated_state_dict(RunDir(out), tag, net)


def test_tiny_dmd_trains_both_networks_on_the_two_time_scale_schedule(ref_run):
    records = read_jsonl(ref_run / "loss_logs" / "train.jsonl")
    assert [r["iteration"] for r in records] == list(range(1, STEPS + 1))
    # update ratio 2: the generator steps at steps 0 and 2 (iterations 1 and 3), the fake score always
    for r in records:
        gen_turn = (r["iteration"] - 1) % 2 == 0
        assert ("loss/dm" in r) == gen_turn and ("loss/gan_g" in r) == gen_turn
        assert "loss/fake_flow" in r and "loss/gan_d" in r
        assert all(torch.isfinite(torch.tensor(v)) for k, v in r.items() if k.startswith("loss/"))
    assert records[0]["lr/generator"] == 1e-4 and records[0]["lr/fake_score"] == 2e-4
    ckpt = ref_run / "checkpoints" / f"step-{STEPS}"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["fake_score", "generator", "rng"]
    fake = weights(ref_run, "fake_score")
    assert any(k.startswith("head.") for k in fake) and any(k.startswith("transformer.") for k in fake)
    assert (ref_run / "samples" / f"step-{STEPS}" / "grid.png").is_file()
    assert json.loads((ref_run / "args.json").read_text())["objectives"] == ["dmd"]


def test_dmd_resume_is_bitwise_exact_after_kill(ref_run, tiny_model, tiny_shards, tmp_path):
    out = tmp_path / "killed"
    env = _env()
    cmd = [sys.executable, "-m", "megadiff.train", *dmd_args(tiny_model, tiny_shards, out)]
    kill_after_checkpoint(cmd, env, "saved checkpoint")
    assert (out / "latest").read_text().strip() == "step-2"
    assert not (out / "checkpoints" / f"step-{STEPS}").exists()
    resumed = subprocess.run(cmd + ["--resume", "auto"], capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step 2 to {STEPS}" in resumed.stdout
    for net in ("generator", "fake_score"):
        a, b = weights(ref_run, net), weights(out, net)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), net
    ref_log = {r["iteration"]: r for r in read_jsonl(ref_run / "loss_logs" / "train.jsonl")}
    after = [r for r in read_jsonl(out / "loss_logs" / "train.jsonl") if r["iteration"] > 2][-2:]
    assert [r["iteration"] for r in after] == [3, 4]
    for r in after:
        keys = [k for k in r if k.startswith(("loss/", "lr/"))]
        assert keys and all(r[k] == ref_log[r["iteration"]][k] for k in keys)


def test_sample_cli_writes_generator_and_teacher_images_from_the_same_noise(ref_run, tmp_path):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square on a blue background\n\na yellow circle on a black background\n")
    out = tmp_path / "samples"
    r = run_cli(["sample", "--run", str(ref_run), "--prompts", str(prompts), "--out", str(out),
                 "--steps", "2", "--step", "2"], env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "sample_info.json").read_text())
    assert info["checkpoint"] == "step-2" and info["generator_steps"] == 2 and info["teacher_steps"] == 4
    for src in ("generator", "teacher"):
        assert sorted(p.name for p in (out / src).iterdir()) == ["000.png", "001.png"]
    side = Image.open(out / "side_by_side.png")
    assert side.size == (2 * 64, 2 * 64)
    assert json.loads((out / "prompts.json").read_text())[1] == "a yellow circle on a black background"
    again = run_cli(["sample", "--run", str(ref_run), "--prompts", str(prompts), "--out", str(out)], env=_env())
    assert again.returncode == 2 and "already exists and is not empty" in again.stderr.strip().splitlines()[-1]


def test_bad_dmd_input_is_one_line_before_any_work(tiny_model, tiny_shards, tmp_path):
    out = tmp_path / "run"
    r = run_cli(dmd_args(tiny_model, tiny_shards, out, "dmd.update_ratio=0"), env=_env(), module="megadiff.train")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("megadiff: error: dmd.update_ratio=0 must be at least 1")
    assert not out.exists()


def test_export_of_the_few_step_generator_loads_in_the_pipeline(ref_run, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    r = run_cli(["export", "--run", str(ref_run), "--net", "generator", "--to", str(tmp_path / "g")])
    assert r.returncode == 0, r.stderr[-2000:]
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "g")
    state = pipe.transformer.state_dict()
    trained = weights(ref_run, "generator")
    assert all(torch.equal(state[k], trained[k]) for k in trained)
    assert pipe("a red square", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)
