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
