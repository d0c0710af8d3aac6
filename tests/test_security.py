"""Checkpoints are read with the restricted unpickler before DeepSpeed's full unpickle, no
source file loads pickles or runs shell strings, and a planted pickle never executes."""
from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

from conftest import run_cli, tiny_train_args

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs `touch <marker>`: what a tampered checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def zero3_run(tiny_model, tiny_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("security") / "run"
    r = run_cli(["train", *tiny_train_args(tiny_model, tiny_shards, out, "train.max_steps=2",
                                           "train.save_interval=2", "deepspeed.config=zero3")])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_deepspeed_checkpoints_pass_the_restricted_unpickler(zero3_run, tiny_model, tiny_shards, tmp_path):
    from megadiff.engine.checkpoint import convert_to_universal
    from megadiff.engine.safe_load import check_checkpoint_dir

    ckpt = zero3_run / "checkpoints" / "step-2"
    convert_to_universal(ckpt, "transformer")       # the files an elastic resume reads
    assert any((ckpt / "transformer_universal").rglob("*.pt"))
    check_checkpoint_dir(ckpt)
    out = tmp_path / "zero2"                          # bf16 optimizer states hold other classes
    r = run_cli(["train", *tiny_train_args(tiny_model, tiny_shards, out, "train.max_steps=2",
                                           "train.save_interval=2", "deepspeed.config=zero2",
                                           "model.precision=bf16")])
    assert r.returncode == 0, r.stderr[-3000:]
    check_checkpoint_dir(out / "checkpoints" / "step-2")


def test_a_planted_pickle_is_refused_and_never_runs(zero3_run, tiny_model, tiny_shards, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(zero3_run, run)
    marker = tmp_path / "pwned"
    target = run / "checkpoints" / "step-2" / "transformer" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    target.write_bytes(pickle.dumps({"module": _Payload(marker)}))

    resumed = run_cli(["train", *tiny_train_args(tiny_model, tiny_shards, run, "train.max_steps=4",
                                                 "train.save_interval=2", "deepspeed.config=zero3"),
                       "--resume", "auto"])
    assert resumed.returncode == 2
    lines = resumed.stderr.strip().splitlines()
    assert str(target) in lines[-1] and "will not unpickle" in lines[-1]
    exported = run_cli(["export", "--run", str(run), "--to", str(tmp_path / "export")])
    assert exported.returncode == 2 and str(target) in exported.stderr
    assert not marker.exists()
    assert not (tmp_path / "export").exists()
    assert (run / "latest").read_text().strip() == "step-2"


def _sources() -> list[Path]:
    return [p for d in ("megadiff", "data_tools", "bench") for p in (ROOT / d).rglob("*.py")]


def _name(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_no_source_unpickles_or_builds_shell_strings():
    """Every torch.load call passes weights_only=True; no pickle.load(s), os.system, eval/exec
    or shell=True anywhere in the package, the data tools or the benchmarks."""
    bad = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name, where = _name(node.func), f"{path.relative_to(ROOT)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            if name == "torch.load" and not (isinstance(kw.get("weights_only"), ast.Constant)
                                             and kw["weights_only"].value is True):
                bad.append(f"{where}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "os.system", "eval", "exec"):
                bad.append(f"{where}: {name}")
            if isinstance(kw.get("shell"), ast.Constant) and kw["shell"].value is True:
                bad.append(f"{where}: shell=True")
    assert not bad, "\n".join(bad)
