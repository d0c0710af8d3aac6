"""Bad input stops before any work with one line naming the file and the fix, exit code 2,
no traceback, nothing overwritten."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli, tiny_train_args


def fails_with(args, fragment, module="megadiff.train"):
    r = run_cli(args, module=module, timeout=180)
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("megadiff: error:")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and fragment in lines[0], r.stderr[-2000:]
    return lines[0]


def test_missing_model_directory(tiny_shards, tmp_path):
    fails_with(tiny_train_args(tmp_path / "nope", tiny_shards, tmp_path / "run"),
               f"model directory {tmp_path / 'nope'} does not exist")
    assert not (tmp_path / "run").exists()


def test_model_directory_that_is_not_sd3(tiny_model, tiny_shards, tmp_path):
    other = tmp_path / "sdxl"
    shutil.copytree(tiny_model, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionXLPipeline"}))
    fails_with(tiny_train_args(other, tiny_shards, tmp_path / "run"),
               "describes a StableDiffusionXLPipeline, not an SD3/SD3.5 pipeline")
    (other / "model_index.json").unlink()
    fails_with(tiny_train_args(other, tiny_shards, tmp_path / "run"), "model_index.json is missing")


def test_missing_and_empty_shard_directories(tiny_model, tmp_path):
    fails_with(tiny_train_args(tiny_model, tmp_path / "none", tmp_path / "run"),
               f"shard directory {tmp_path / 'none'} does not exist")
    (tmp_path / "empty").mkdir()
    fails_with(tiny_train_args(tiny_model, tmp_path / "empty", tmp_path / "run"),
               "index.json is missing")


@pytest.mark.parametrize("key, value, fragment", [
    ("in_channels", 4, "latents have 16 channels, the transformer takes 4"),
    ("joint_attention_dim", 128, "text embeddings are 64-wide, the transformer takes 128"),
    ("pos_embed_max_size", 2, "exceeds the transformer's position grid"),
])
def test_shards_that_do_not_fit_the_model(key, value, fragment, tiny_model, tiny_shards, tmp_path):
    other = tmp_path / "model"
    shutil.copytree(tiny_model, other)
    cfg_path = other / "transformer" / "config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {key: value}))
    line = fails_with(tiny_train_args(other, tiny_shards, tmp_path / "run"), fragment)
    assert "rebuild the shards with this model" in line


def test_unknown_recipe(tmp_path):
    fails_with(["--recipe", "sd9-huge", "--output-dir", str(tmp_path / "run")],
               "recipe 'sd9-huge' does not exist: use one of")


def test_output_dir_with_another_runs_checkpoints_is_left_alone(tiny_model, tiny_shards, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-100").mkdir(parents=True)
    (run / "checkpoints" / "step-100" / "trainer_state.json").write_text("{}")
    (run / "latest").write_text("step-100\n")
    (run / "args.json").write_text(json.dumps({"model": {"path": "/models/sd35-large"},
                                               "objectives": ["flow_matching"]}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    fails_with(tiny_train_args(tiny_model, tiny_shards, run),
               "already holds checkpoints")
    fails_with(tiny_train_args(tiny_model, tiny_shards, run) + ["--resume", "auto"],
               "is another run (model.path='/models/sd35-large'")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_export_of_a_directory_that_is_not_a_run(tmp_path):
    fails_with(["export", "--run", str(tmp_path), "--to", str(tmp_path / "out")],
               "args.json is missing: --run must be a megadiff output directory", module="megadiff.cli")


def test_prompt_shards_are_not_training_shards(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    r = run_cli(["data", "prompts", str(prompts), "--out", str(tmp_path / "p"), "--no-progress"])
    assert r.returncode == 0, r.stderr[-2000:]
    fails_with(tiny_train_args(tiny_model, tmp_path / "p", tmp_path / "run"),
               "are a megadiff.prompts set, but this recipe trains on image latents")


def test_single_checkpoint_file_as_model_path(tiny_shards, tmp_path):
    single = tmp_path / "sd3_medium.safetensors"
    single.write_bytes(b"\0" * 16)
    line = fails_with(tiny_train_args(single, tiny_shards, tmp_path / "run"),
                      f"model.path={single} is a single file")
    assert "from_single_file" in line and not (tmp_path / "run").exists()
