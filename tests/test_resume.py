"""A run killed with SIGKILL and resumed with --resume auto ends bitwise equal to an
uninterrupted run (model, optimizer, LR schedule, data position, RNG)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import clean_env, kill_after_checkpoint, read_jsonl, run_cli, tiny_train_args


def final_weights(out, tag="step-12"):
    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir

    return consolidated_state_dict(RunDir(out), tag, "transformer")


@pytest.mark.parametrize("ranks, extra", [
    (1, ["deepspeed.config=zero3", "data.gradient_accumulation_steps=2", "data.num_workers=2"]),
    (2, ["deepspeed.config=zero3"]),
])
def test_resume_is_bitwise_exact_after_kill(ranks, extra, tiny_model, tiny_shards, tmp_path):
    common = ["train.save_interval=4", "optim.schedule=cosine", "optim.warmup_steps=3", *extra]
    if ranks == 1:
        launcher = [sys.executable, "-m", "megadiff.train"]
    else:
        launcher = ["deepspeed", "--num_gpus", str(ranks), "--master_port", "{port}",
                    "--module", "megadiff.train"]

    def cmd(out, env):
        return [a.format(port=env["MASTER_PORT"]) for a in launcher] + \
            tiny_train_args(tiny_model, tiny_shards, out, *common)

    ref_env = clean_env()
    ref = subprocess.run(cmd(tmp_path / "ref", ref_env), capture_output=True, text=True,
                         env=ref_env, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    env = clean_env()
    kill_after_checkpoint(cmd(tmp_path / "killed", env), env, "saved checkpoint")
    assert (tmp_path / "killed" / "latest").read_text().strip() == "step-4"
    assert not (tmp_path / "killed" / "checkpoints" / "step-12").exists()
    env = clean_env()
    resumed = subprocess.run(cmd(tmp_path / "killed", env) + ["--resume", "auto"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 4 to 12" in resumed.stdout

    a, b = final_weights(tmp_path / "ref"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_log = {r["iteration"]: r for r in read_jsonl(tmp_path / "ref" / "loss_logs" / "train.jsonl")}
    res_log = read_jsonl(tmp_path / "killed" / "loss_logs" / "train.jsonl")
    after = [r for r in res_log if r["iteration"] > 4][-8:]
    assert [r["iteration"] for r in after] == list(range(5, 13))
    for r in after:
        assert r["loss/flow"] == ref_log[r["iteration"]]["loss/flow"]
        assert r["consumed_samples"] == ref_log[r["iteration"]]["consumed_samples"]
        assert r["lr/transformer"] == ref_log[r["iteration"]]["lr/transformer"]
    if ranks == 2:
        assert ref_log[12]["consumed_samples"] == 12 * 2 * 4
        shards = sorted(p.name for p in (tmp_path / "ref" / "checkpoints" / "step-12" / "transformer").iterdir())
        assert [s for s in shards if s.endswith("optim_states.pt")] == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_kill_while_saving_keeps_the_previous_checkpoint(tiny_model, tiny_shards, tmp_path):
    """SIGKILL as soon as step-8's directory appears (mid-save): `latest` still names step-4,
    and the resumed run redoes steps 5-12 and ends equal to an uninterrupted run."""
    args = ["train.save_interval=4", "deepspeed.config=zero3"]
    ref_env = clean_env()
    ref = subprocess.run([sys.executable, "-m", "megadiff.train",
                          *tiny_train_args(tiny_model, tiny_shards, tmp_path / "ref", *args)],
                         capture_output=True, text=True, env=ref_env, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "killed"
    env = clean_env()
    proc = subprocess.Popen([sys.executable, "-m", "megadiff.train",
                             *tiny_train_args(tiny_model, tiny_shards, run, *args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    step8 = run / "checkpoints" / "step-8"
    deadline = time.monotonic() + 300
    while not step8.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert step8.exists(), "the run ended before it began saving step 8"
    assert (run / "latest").read_text().strip() == "step-4"
    env = clean_env()
    resumed = subprocess.run([sys.executable, "-m", "megadiff.train",
                              *tiny_train_args(tiny_model, tiny_shards, run, *args), "--resume", "auto"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 4 to 12" in resumed.stdout
    a, b = final_weights(tmp_path / "ref"), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_global_batch(tiny_model, tiny_shards, tmp_path):
    out = tmp_path / "run"
    r = run_cli(tiny_train_args(tiny_model, tiny_shards, out, "train.max_steps=2",
                                "train.save_interval=2"), module="megadiff.train")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(tiny_train_args(tiny_model, tiny_shards, out, "train.max_steps=4",
                                "data.micro_batch_size=2") + ["--resume", "auto"], module="megadiff.train")
    assert r.returncode == 2
    assert "global batch 4, this run has 2" in r.stderr.strip().splitlines()[-1]
