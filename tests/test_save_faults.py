"""A disk that fills up at save time: the run stops with one line, the partial checkpoint is
removed, `latest` still names the previous complete checkpoint, and once space is freed
`--resume auto` finishes the run. The full disk is a small tmpfs mounted in a private mount
namespace (root only; skipped otherwise)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import clean_env, tiny_train_args


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare to mount a small tmpfs")
def test_disk_full_at_save_keeps_the_previous_checkpoint(tiny_model, tiny_shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    train = [sys.executable, "-m", "megadiff.train",
             *tiny_train_args(tiny_model, tiny_shards, run, "train.max_steps=6", "train.save_interval=2",
                              "validation.num_inference_steps=1")]
    script = f"""
        mount -t tmpfs -o size=1800k tmpfs {run}
        {shlex.join(train)} > {tmp_path}/full.out 2> {tmp_path}/full.err; echo $? > {tmp_path}/full.rc
        cat {run}/latest > {tmp_path}/latest.txt; ls {run}/checkpoints > {tmp_path}/ckpts.txt
        mount -o remount,size=200m {run}
        {shlex.join(train)} --resume auto > {tmp_path}/resume.out 2> {tmp_path}/resume.err
        echo $? > {tmp_path}/resume.rc; cat {run}/latest > {tmp_path}/latest2.txt
    """
    subprocess.run(["unshare", "--mount", "bash", "-c", script], env=clean_env(), timeout=600, check=True)
    assert (tmp_path / "full.rc").read_text().strip() == "3"
    last = (tmp_path / "full.err").read_text().strip().splitlines()[-1]
    assert last.startswith(f"megadiff: stopped: could not write checkpoint {run}/checkpoints/step-")
    assert "the previous checkpoint step-" in last and "intact" in last
    previous = (tmp_path / "latest.txt").read_text().strip()
    assert previous in ("step-2", "step-4")
    assert (tmp_path / "ckpts.txt").read_text().split() == [previous]     # the partial one is gone
    assert (tmp_path / "resume.rc").read_text().strip() == "0", (tmp_path / "resume.err").read_text()[-2000:]
    assert f"from step {previous.split('-')[1]} to 6" in (tmp_path / "resume.out").read_text()
    assert (tmp_path / "latest2.txt").read_text().strip() == "step-6"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare to mount a small tmpfs")
def test_two_ranks_stop_together_before_writing_when_the_next_checkpoint_cannot_fit(tiny_model, tiny_shards,
                                                                                      tmp_path):
    """2 ranks (`deepspeed --num_gpus 2`) on a disk that holds one checkpoint but not two: every
    rank stops at the next save before DeepSpeed writes anything (no rank left waiting in a
    collective), with the same line, and `latest` still names the first checkpoint."""
    env = clean_env(OMP_NUM_THREADS="1")

    def train(out, *overrides):
        return ["deepspeed", "--num_gpus", "2", "--master_port", env["MASTER_PORT"], "--module", "megadiff.train",
                *tiny_train_args(tiny_model, tiny_shards, out, "data.micro_batch_size=2",
                                 "validation.num_inference_steps=1", "train.save_interval=2", *overrides)]

    probe = tmp_path / "probe"            # one 2-step run on a plain disk measures what a run writes
    r = subprocess.run(train(probe, "train.max_steps=2"), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    one_ckpt, whole = size(probe / "checkpoints" / "step-2"), size(probe)
    tmpfs_kb = (whole + one_ckpt // 2) // 1024 + 64          # room for the first checkpoint, not a second

    run = tmp_path / "run"
    run.mkdir()
    script = f"""
        mount -t tmpfs -o size={tmpfs_kb}k tmpfs {run}
        {shlex.join(train(run, "train.max_steps=6"))} > {tmp_path}/out 2>&1; echo $? > {tmp_path}/rc
        cat {run}/latest > {tmp_path}/latest.txt; ls {run}/checkpoints > {tmp_path}/ckpts.txt
    """
    subprocess.run(["unshare", "--mount", "bash", "-c", script], env=env, timeout=600, check=True)
    out = (tmp_path / "out").read_text()
    assert (tmp_path / "rc").read_text().strip() != "0", out[-3000:]
    stops = [line for line in out.splitlines() if "megadiff: stopped: could not write checkpoint" in line]
    assert len(stops) == 2, out[-3000:]                       # both ranks, the same reason
    assert all(f"checkpoints/step-4 (rank " in line and "step-2 took" in line and "step-2 is intact" in line
               for line in stops), stops
    assert (tmp_path / "latest.txt").read_text().strip() == "step-2"
    assert (tmp_path / "ckpts.txt").read_text().split() == ["step-2"]
