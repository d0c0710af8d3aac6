"""megadiff.bench: the pure helpers of `megadiff bench engine` (no timing assertions).

The one DeepSpeed test runs a 1-rank ZeRO-3 worker on a tiny transformer in a subprocess and
checks the per-category bytes against a hand computation.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megadiff.bench import accounting, launch
from megadiff.bench.engine import (LoopTimes, MemoryResult, MemoryRow, StepResult, gather_row,
                                   memory_verdict, parse_ranks, resolve, step_verdict)
from megadiff.bench.model import BenchShape, shape_of, transformer_config
from megadiff.bench.table import format_table

REPO = Path(__file__).resolve().parents[1]


# ---- table ----------------------------------------------------------------------------------

def test_format_table_aligns_columns():
    out = format_table(["name", "MiB"], [["a", "1.0"], ["longer", "12,345.6"]])
    assert out.splitlines() == [
        "name         MiB",
        "------  --------",
        "a            1.0",
        "longer  12,345.6",
    ]


def test_format_table_pads_short_rows_and_rejects_long_ones():
    out = format_table(["a", "b", "c"], [[1]], align="lll")
    assert out.splitlines()[-1] == "1"
    with pytest.raises(ValueError, match="has 3 cells"):
        format_table(["a", "b"], [[1, 2, 3]])
    with pytest.raises(ValueError, match="one 'l' or 'r' per column"):
        format_table(["a", "b"], [], align="l")


# ---- arguments ------------------------------------------------------------------------------

def _args(**kw) -> argparse.Namespace:
    base = dict(quick=False, ranks="1,2,4", width=1536, layers=2, batch=2, steps=None, warmup=None,
                step_config="zero0", memory_config="zero3", only=None, keep=False)
    return argparse.Namespace(**(base | kw))


def test_parse_ranks():
    assert parse_ranks("1,2,4") == (1, 2, 4)
    assert parse_ranks(" 8 ") == (8,)


@pytest.mark.parametrize("text, match", [
    ("1,x", "comma-separated"), ("", "comma-separated"), ("1,,2", "comma-separated"),
    ("0", "between 1 and"), ("1,-2", "between 1 and"), ("2,2", "repeats"),
])
def test_parse_ranks_errors_are_one_line(text, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_ranks(text)
    assert "\n" not in str(e.value)


def test_resolve_defaults_per_mode():
    full, quick = resolve(_args()), resolve(_args(quick=True))
    assert (full.steps, full.warmup, full.memory_steps) == (8, 2, 2)
    assert (quick.steps, quick.warmup, quick.memory_steps) == (3, 1, 1)
    assert resolve(_args(steps=5, only="step")).steps == 5
    assert resolve(_args(only="memory")).sections == ("memory",)


@pytest.mark.parametrize("kw, match", [
    (dict(width=100), "multiple of the head size"), (dict(width=0), "multiple of the head size"),
    (dict(layers=0), "--layers 0"), (dict(batch=0), "--batch 0"), (dict(steps=0), "--steps 0"),
    (dict(warmup=-1), "--warmup -1"), (dict(ranks="a"), "--ranks"),
    (dict(step_config="nope"), "--step-config: deepspeed.config='nope'"),
    (dict(memory_config="/x/none.json"), "--memory-config"),
    (dict(memory_config="zero2"), "--memory-config zero2: the memory benchmark measures ZeRO-3"),
])
def test_resolve_rejects_user_mistakes(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        resolve(_args(**kw))
    assert "\n" not in str(e.value)


def test_cli_registers_bench_engine_and_reports_mistakes_in_one_line(capsys):
    from megadiff.cli import build_parser, run_guarded

    args = build_parser().parse_args(["bench", "engine", "--quick", "--ranks", "1,two"])
    assert args.command == "bench" and args.bench_command == "engine" and args.quick
    assert run_guarded(args.handler, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ranks '1,two'" in err
    whole = build_parser().parse_args(["bench", "--quick"])   # no name: every benchmark, one table
    assert whole.bench_command is None and whole.handler.__name__ == "run_suite"


# ---- model shape ----------------------------------------------------------------------------

def test_transformer_config_round_trips_through_shape_of():
    shape = BenchShape(width=1536, layers=3)
    tc = transformer_config(shape)
    assert tc["num_attention_heads"] * tc["attention_head_dim"] == 1536
    assert tc["caption_projection_dim"] == 1536 and tc["num_layers"] == 3
    back = shape_of(tc, batch=4)
    assert (back.width, back.layers, back.batch) == (1536, 3, 4)
    assert BenchShape().text_tokens == 77 + 32 and BenchShape().image_tokens == 256


# ---- accounting -----------------------------------------------------------------------------

def test_tally_counts_each_storage_once():
    flat = torch.zeros(100, dtype=torch.bfloat16)             # 200 bytes
    views = [flat.narrow(0, 0, 60), flat.narrow(0, 60, 40)]    # like param.ds_tensor
    other = torch.zeros(10)                                    # 40 bytes
    out = accounting.tally({"a": views + [None, torch.empty(0)], "b": [flat, other, other]})
    assert out == {"a": 200, "b": 40}


def test_ideal_and_model_state():
    assert accounting.ideal_bytes_per_rank(1000, 4) == 4000
    b = {"bf16 params": 1, "unpartitioned": 2, "grads": 4, "fp32 master": 8, "optimizer": 16,
         "buffers": 32}
    assert accounting.model_state_bytes(b) == 31
    with pytest.raises(ValueError):
        accounting.ideal_bytes_per_rank(10, 0)


def test_gather_row_takes_the_largest_rank_and_verdicts():
    rec = lambda r, p: {"world_size": 2, "n_params": 1000, "persistent_params": 1,
                        "persistent_numel": 10, "rss_bytes": 5,
                        "bytes": {"bf16 params": p, "grads": 1000, "fp32 master": 2000,
                                  "optimizer": 4000, "buffers": 100}}
    row = gather_row([rec(0, 1000), rec(1, 1010)])
    assert row.bytes["bf16 params"] == 1010 and row.model_state == 8010
    assert row.ideal == 8000 and row.ratio == pytest.approx(8010 / 8000)
    assert row.ratio_with_buffers == pytest.approx(8110 / 8000)
    assert memory_verdict(MemoryResult([row], {}, "bf16")).startswith("ZeRO-3 memory: PASS")
    fat = MemoryRow(4, 1000, {"bf16 params": 8000}, 0, 0, 0, 0.0)   # 2x the ideal 4000
    assert "ABOVE TARGET" in memory_verdict(MemoryResult([row, fat], {}, "bf16"))


def test_step_ratio_and_verdict():
    bare, ds = LoopTimes(), LoopTimes()
    for t in (1.0, 1.2, 0.9):
        bare.add({"forward": t / 2, "backward": t / 4, "step": t / 4}, {"cpu": 2 * t})
    for t in (1.5, 1.6, 1.4):
        ds.add({"forward": t / 2, "backward": t / 4, "step": t / 4}, {"cpu": 2 * t, "allreduce": 0.3})
    r = StepResult("m", {}, bare, ds)
    assert bare.median("total") == pytest.approx(1.0)
    assert r.ratio == pytest.approx(1.0 / 1.5)
    assert r.best_ratio == pytest.approx(0.9 / 1.4)
    assert r.cpu_ratio == pytest.approx(1.0 / 1.5)
    v = step_verdict(r)
    assert "BELOW TARGET" in v and "0.300 s/step" in v


def test_child_env_drops_launcher_variables():
    env = launch.child_env({"RANK": "3", "SLURM_PROCID": "1", "TORCHELASTIC_RUN_ID": "x",
                            "MASTER_PORT": "1", "PATH": "/bin", "OMP_NUM_THREADS": "2"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "2"}


def test_zero3_bytes_per_param_at_one_rank_match_a_hand_count(tmp_path):
    """A 1-rank ZeRO-3 bf16 engine (client torch AdamW) on a tiny transformer holds exactly:
    2 B/param bf16 partitions, 2 B/param bf16 gradient partitions, 4 B/param fp32 master,
    8 B/param Adam moments (+ a 4-byte fp32 step counter), and the 2-byte reduce bucket."""
    port = launch.free_port()
    env = launch.child_env()
    env.update(MASTER_ADDR=launch.MASTER_ADDR, MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "megadiff.bench.zero_worker", "--out", str(tmp_path),
           "--width", "64", "--layers", "1", "--steps", "2"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        launch.remove_shm_files(port)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads((tmp_path / "rank0.json").read_text())

    from megadiff.bench.model import build_transformer
    n = sum(p.numel() for p in build_transformer(BenchShape(width=64, layers=1)).parameters())
    assert rec["n_params"] == n and rec["world_size"] == 1 and rec["stage"] == 3
    assert rec["measured_after"] == "backward"
    b = rec["bytes"]
    assert b["bf16 params"] == 2 * n
    assert b["unpartitioned"] == 0            # one rank: the whole param is its partition
    assert b["grads"] == 2 * n                # bf16 gradient partitions (grad accum dtype = bf16)
    assert b["fp32 master"] == 4 * n
    assert b["optimizer"] == 8 * n + 4        # exp_avg + exp_avg_sq + one fp32 step tensor
    assert b["buffers"] == 2 * rec["reduce_bucket_size"]
    assert accounting.model_state_bytes(b) == 16 * n + 4


def test_section_tables_render_from_fake_results():
    from megadiff.bench.engine import format_memory, format_step

    s = resolve(_args())
    bare, ds = LoopTimes(), LoopTimes()
    for _ in range(4):
        bare.add({"forward": 1.0, "backward": 2.0, "step": 1.0}, {"cpu": 8.0})
        ds.add({"forward": 1.0, "backward": 2.5, "step": 1.0}, {"cpu": 9.0, "allreduce": 0.5})
    text = format_step(StepResult("model", {"zero_optimization": {"stage": 0}}, bare, ds, "quiet"), s)
    assert "1.00x" in text and "0.89x" in text and "0.500 s/step" in text
    row = MemoryRow(2, 1000, {"bf16 params": 1000, "grads": 1000, "fp32 master": 2000,
                              "optimizer": 4000, "buffers": 2 ** 20}, 3, 30, 2 ** 30, 1.0)
    cfg = {"zero_optimization": {"stage3_param_persistence_threshold": 100, "reduce_bucket_size": 10}}
    text = format_memory(MemoryResult([row], cfg, "torch.bfloat16"), s)
    lines = text.splitlines()
    assert lines[2].split()[:2] == ["ranks", "bf16"] and lines[4].split()[0] == "2"
    assert "16.00" in lines[4] and "3 params, 30 elements" in text


def test_timed_methods_times_and_restores():
    from megadiff.bench.loop import timed_methods

    class Obj:
        def f(self, x):
            return x + 1

    o, sink, seen = Obj(), {}, []
    with timed_methods(o, ("f",), sink, {"f": lambda: seen.append(1)}):
        assert o.f(1) == 2 and o.f(2) == 3
    assert sink["f"] >= 0 and seen == [1, 1]
    assert "f" not in vars(o) and o.f(5) == 6


def test_shm_cleanup_only_touches_the_given_port(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "SHM_DIR", tmp_path)
    uid = os.getuid()
    names = [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_{port}_{r}" for port in (1234, 12345)
             for r in (0, 1)]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    assert launch.remove_shm_files(1234, rank=1) == 1
    assert launch.remove_shm_files(1234) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == names[2:]
