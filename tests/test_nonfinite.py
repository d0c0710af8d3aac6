"""NaN/Inf losses: the micro-batch is skipped and counted on every rank, weights stay finite;
a run that sees only NaN stops with a clear message after a checkpoint of its last good state."""
from __future__ import annotations

import numpy as np
import torch

from conftest import read_jsonl, run_cli, tiny_train_args


def poisoned_copy(shards, out, bad: set[int]):
    """The same shard set with NaN latents in samples `bad` (a corrupt cache, as seen in the wild)."""
    from streaming import MDSWriter, StreamingDataset

    from megadiff.data.schema import SCHEMAS, ShardSetInfo

    ds = StreamingDataset(local=str(shards), shuffle=False, batch_size=1)
    with MDSWriter(out=str(out), columns=SCHEMAS["megadiff.train"][1]) as w:
        for i in range(len(ds)):
            row = {k: ds[i][k] for k in SCHEMAS["megadiff.train"][1]}
            if i in bad:
                row["latents"] = np.full_like(row["latents"], np.nan)
            w.write(row)
    ShardSetInfo.read(shards).write(out)
    return out


def test_nan_samples_are_skipped_and_counted(tiny_model, tiny_shards, tmp_path):
    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir

    shards = poisoned_copy(tiny_shards, tmp_path / "shards", bad={5, 30})
    out = tmp_path / "run"
    r = run_cli(tiny_train_args(tiny_model, shards, out, "train.log_samples=true"), module="megadiff.train")
    assert r.returncode == 0, r.stderr[-3000:]
    records = read_jsonl(out / "loss_logs" / "train.jsonl")
    consumed = [i for rec in read_jsonl(out / "loss_logs" / "samples-rank0.jsonl")
                for micro in rec["indices"] for i in micro]
    # each time a poisoned sample is drawn its whole micro-batch is skipped and replaced
    poisoned_draws = sum(i in (5, 30) for i in consumed)
    assert poisoned_draws >= 2 and records[-1]["skipped_iterations"] == poisoned_draws
    assert len(consumed) == 4 * (12 + poisoned_draws)
    assert all(np.isfinite(rec["loss/flow"]) for rec in records)
    assert "non-finite flow" in (out / "log.txt").read_text()
    weights = consolidated_state_dict(RunDir(out), "step-12", "transformer")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_only_nan_stops_after_a_checkpoint_of_the_last_good_state(tiny_model, tiny_shards, tmp_path):
    shards = poisoned_copy(tiny_shards, tmp_path / "shards", bad=set(range(48)))
    out = tmp_path / "run"
    r = run_cli(tiny_train_args(tiny_model, shards, out, "train.max_consecutive_nonfinite=3"),
                module="megadiff.train")
    assert r.returncode == 3
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("megadiff: stopped: 3 micro-batches in a row had a non-finite loss")
    assert "saved as step-0" in last and "Traceback" not in r.stderr
    assert (out / "latest").read_text().strip() == "step-0"


NAN_GRAD_OBJECTIVE = '''
import sys, torch
from megadiff import registry, train
from megadiff.objectives.flow_matching import FlowMatching

BAD = {bad}


class NaNGradient(FlowMatching):
    """Flow matching whose velocity picks up NaN gradients (finite values) at steps BAD:
    where(False, log(0 * v), 0) is 0 forwards and 0 * inf = NaN backwards."""
    def forward_net(self, *a, **k):
        v = super().forward_net(*a, **k)
        if self.step not in BAD:
            return v
        return v + torch.where(v * 0 > 1, torch.log(v * 0), v * 0)


registry.OBJECTIVES["nan_gradient"] = NaNGradient
train.main()
'''


def _run_nan_gradient(tmp_path, tiny_model, tiny_shards, bad, *over):
    import subprocess
    import sys

    from conftest import clean_env

    script = tmp_path / "nan_gradient.py"
    script.write_text(NAN_GRAD_OBJECTIVE.format(bad=sorted(bad)))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(script),
                        *tiny_train_args(tiny_model, tiny_shards, out, "objectives=[nan_gradient]", *over)],
                       capture_output=True, text=True, env=clean_env(), timeout=600)
    return r, out


def test_nan_gradient_steps_are_skipped_by_zero_and_counted(tiny_model, tiny_shards, tmp_path):
    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir

    r, out = _run_nan_gradient(tmp_path, tiny_model, tiny_shards, {3, 4}, "deepspeed.config=zero3",
                               "train.max_steps=6", "train.save_interval=1")
    assert r.returncode == 0, r.stderr[-3000:]
    records = {rec["iteration"]: rec for rec in read_jsonl(out / "loss_logs" / "train.jsonl")}
    assert records[3]["skipped_iterations"] == 0 and records[5]["skipped_iterations"] == 2
    assert all(np.isfinite(records[i]["loss/flow"]) for i in records)
    assert "non-finite gradient norm (2 in a row)" in (out / "log.txt").read_text()
    w = {s: consolidated_state_dict(RunDir(out), f"step-{s}", "transformer") for s in (3, 5, 6)}
    assert all(torch.equal(w[3][k], w[5][k]) for k in w[3])          # iterations 4, 5 discarded
    assert any(not torch.equal(w[5][k], w[6][k]) for k in w[5])      # iteration 6 trained
    assert all(torch.isfinite(t).all() for t in w[6].values())


def test_only_nan_gradients_stop_after_a_checkpoint_of_the_last_good_state(tiny_model, tiny_shards, tmp_path):
    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir

    r, out = _run_nan_gradient(tmp_path, tiny_model, tiny_shards, set(range(2, 12)), "deepspeed.config=zero2",
                               "train.max_consecutive_nonfinite=3", "train.save_interval=2")
    assert r.returncode == 3, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("megadiff: stopped: 3 optimizer steps in a row had a non-finite gradient")
    assert "saved as step-4" in last
    # steps 3-5 were discarded: the checkpoint at step 4 holds the weights after step 2
    a = consolidated_state_dict(RunDir(out), "step-2", "transformer")
    b = consolidated_state_dict(RunDir(out), "step-4", "transformer")
    assert all(torch.equal(a[k], b[k]) for k in a)
