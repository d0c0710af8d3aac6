"""A run saved on 2 ranks resumes on 1 or 4 ranks with the same global batch: it continues
from the same step, restores the optimizer and LR schedule through DeepSpeed's universal
checkpoint, and consumes the very samples the uninterrupted run consumed next."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import clean_env, read_jsonl, tiny_train_args


def launch(ranks: int, args: list[str]) -> subprocess.CompletedProcess:
    env = clean_env()
    if ranks == 1:
        cmd = [sys.executable, "-m", "megadiff.train"]
    else:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", env["MASTER_PORT"],
               "--module", "megadiff.train"]
    r = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


def samples_by_step(run, ranks: int) -> dict[int, list[int]]:
    steps: dict[int, list[int]] = {}
    for rank in range(ranks):
        for rec in read_jsonl(run / "loss_logs" / f"samples-rank{rank}.jsonl"):
            steps.setdefault(rec["iteration"], []).extend(i for micro in rec["indices"] for i in micro)
    return {k: sorted(v) for k, v in steps.items()}


@pytest.fixture(scope="module")
def two_rank_run(tiny_model, tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic") / "ref"
    launch(2, tiny_train_args(tiny_model, tiny_shards, out, "train.max_steps=8", "train.save_interval=4",
                              "data.gradient_accumulation_steps=2", "train.log_samples=true",
                              "optim.schedule=cosine"))
    return out


def test_ranks_read_disjoint_samples_covering_each_epoch(two_rank_run):
    per_rank = [{rec["iteration"]: [i for micro in rec["indices"] for i in micro]
                 for rec in read_jsonl(two_rank_run / "loss_logs" / f"samples-rank{r}.jsonl")}
                for r in range(2)]
    for step in range(1, 9):
        assert len(per_rank[0][step]) == len(per_rank[1][step]) == 8
        assert not set(per_rank[0][step]) & set(per_rank[1][step])
    epoch = sorted(i for step in (1, 2, 3) for r in range(2) for i in per_rank[r][step])
    assert epoch == list(range(48))          # 48 samples, global batch 16: one epoch in 3 steps


@pytest.mark.parametrize("ranks, accumulation", [(1, 4), (4, 1)])
def test_elastic_resume_on_another_rank_count(ranks, accumulation, two_rank_run, tiny_model,
                                              tiny_shards, tmp_path):
    ref = two_rank_run
    run = tmp_path / "run"
    shutil.copytree(ref, run, ignore=shutil.ignore_patterns("step-8", "loss_logs", "samples"))
    (run / "latest").write_text("step-4\n")
    r = launch(ranks, tiny_train_args(tiny_model, tiny_shards, run, "train.max_steps=8",
                                      "train.save_interval=4", f"data.gradient_accumulation_steps={accumulation}",
                                      "train.log_samples=true", "optim.schedule=cosine") + ["--resume", "auto"])
    assert f"on {ranks} rank(s), global batch 16, from step 4 to 8" in r.stdout
    assert (run / "checkpoints" / "step-4" / "transformer_universal").is_dir()
    ref_samples, new_samples = samples_by_step(ref, 2), samples_by_step(run, ranks)
    assert sorted(new_samples) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert len(new_samples[step]) == 16
        assert new_samples[step] == ref_samples[step], step
    ref_log = {rec["iteration"]: rec for rec in read_jsonl(ref / "loss_logs" / "train.jsonl")}
    for rec in read_jsonl(run / "loss_logs" / "train.jsonl"):
        assert rec["consumed_samples"] == ref_log[rec["iteration"]]["consumed_samples"]
        assert rec["lr/transformer"] == pytest.approx(ref_log[rec["iteration"]]["lr/transformer"])
        assert rec["loss/flow"] == pytest.approx(ref_log[rec["iteration"]]["loss/flow"], rel=0.3)
    assert (run / "latest").read_text().strip() == "step-8"
