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
