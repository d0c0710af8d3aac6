"""Every objective recipe survives SIGKILL at a random iteration: `--resume auto` ends with
every trained network bitwise equal to an uninterrupted run's, and the same logged losses.

Flow matching and DMD2 have their own, longer versions (tests/test_resume.py,
tests/test_dmd_train.py); this file runs each objective's tiny recipe on its own demo model
and data, so an objective added with a recipe is one more line below.
"""
from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from conftest import clean_env, kill_after_checkpoint, read_jsonl
from megadiff.config import available_recipes

STEPS = 6
# (recipe, overrides): one per objective family.
OBJECTIVES = {
    "ddmd": ("tiny-dmd-cpu", ["dmd.loss=ddmd", "dmd.update_ratio=1"]),
    "fdiv-js": ("tiny-dmd-cpu", ["dmd.divergence=js", "dmd.update_ratio=1"]),
    "dmdr-refl": ("tiny-dmdr-cpu", ["objectives=[dmd,refl]", "dmd.cold_start_steps=3"]),
    "dmdr-srpo": ("tiny-dmdr-cpu", ["objectives=[dmd,srpo]", "dmd.cold_start_steps=3"]),
    "dpo": ("tiny-dpo-cpu", []),
    "dpo-sft": ("tiny-dpo-cpu", ["dpo.sft=true"]),
    # 3 iterations per rollout: the checkpoints at steps 2 and 4 fall inside rollouts
    "sdpo": ("tiny-sdpo-cpu", ["sdpo.num_steps=3", "sdpo.timesteps_per_update=1"]),
}


def _cmd(recipe: str, overrides: list[str], out) -> list[str]:
    return [sys.executable, "-m", "megadiff.train", "--recipe", recipe, "--output-dir", str(out),
            f"train.max_steps={STEPS}", "train.save_interval=2", "train.keep_last=0",
            "train.log_interval=1", "logging.wandb_mode=disabled", "logging.progress=off",
            "validation.num_inference_steps=2", "train.sample_interval=0", *overrides]


def _weights(out) -> dict[str, dict[str, torch.Tensor]]:
    import json

    from megadiff.engine.export import consolidated_state_dict
    from megadiff.engine.run_dir import RunDir

    run, tag = RunDir(out), f"step-{STEPS}"
    nets = json.loads((run.tag_dir(tag) / "trainer_state.json").read_text())["networks"]
    return {net: consolidated_state_dict(run, tag, net) for net in nets}


def _losses(out) -> dict[int, dict]:
    logs = sorted((out / "loss_logs").glob("*.jsonl"))
    rows = [r for p in logs if not p.name.startswith("samples") for r in read_jsonl(p)]
    return {(r["iteration"], k): v for r in rows for k, v in r.items() if k.startswith("loss/")}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_resumes_bitwise_after_kill_at_a_random_iteration(name, tmp_path):
    recipe, overrides = OBJECTIVES[name]
    if recipe not in available_recipes():
        pytest.skip(f"recipe {recipe} is not in this checkout")
    kill_at = random.Random(name).randint(3, STEPS - 1)        # reproducible per objective

    env = clean_env()
    ref = subprocess.run(_cmd(recipe, overrides, tmp_path / "ref"), capture_output=True, text=True,
                         env=env, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = tmp_path / "killed"
    env = clean_env()
    kill_after_checkpoint(_cmd(recipe, overrides, killed), env, f" iteration {kill_at:8d}/")
    latest = (killed / "latest").read_text().strip()
    assert latest in {f"step-{s}" for s in range(2, kill_at + 1, 2)}
    assert not (killed / "checkpoints" / f"step-{STEPS}").exists()
    env = clean_env()
    resumed = subprocess.run(_cmd(recipe, overrides, killed) + ["--resume", "auto"],
                             capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step {latest.removeprefix('step-')} to {STEPS}" in (killed / "log.txt").read_text()

    a, b = _weights(tmp_path / "ref"), _weights(killed)
    assert a.keys() == b.keys() and a
    for net in a:
        assert a[net].keys() == b[net].keys()
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), f"{net} differs after resume"
    ref_losses, res_losses = _losses(tmp_path / "ref"), _losses(killed)
    last = {k: v for k, v in res_losses.items() if k[0] == STEPS}
    assert last and all(ref_losses[k] == v for k, v in last.items())
