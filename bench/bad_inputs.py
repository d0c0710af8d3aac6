"""Try every kind of bad input a user can hand megadiff and print what each gives, as the
Markdown table in README "Bad input": exit code and the one error line, verbatim.

    python bench/bad_inputs.py [--out TABLE.md]

Builds a tiny model, shards and a 2-step run in a temporary directory (about 2 minutes on a
2-core CPU); nothing is downloaded. Paths in messages are shortened to the temp-dir-relative
form.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env |= {"WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29000 + os.getpid() % 1000)}
    return env


def _run(cmd: list[str], cwd: Path | None = None) -> tuple[int, str]:
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=900)
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ": error:" in ln]
    return r.returncode, (lines[-1] if lines else (r.stderr.strip().splitlines() or ["(no output)"])[-1])


class Cases:
    def __init__(self, root: Path):
        from megadiff.data.synthetic import shape_samples
        from megadiff.data.writer import write_train_shards
        from megadiff.models.tiny import TINY_RESOLUTION, TINY_T5_MAX_LENGTH, make_tiny_sd3

        self.root = root
        self.model = make_tiny_sd3(root / "model", seed=0)
        self.shards = root / "shards"
        write_train_shards(self.shards, shape_samples(8, TINY_RESOLUTION, seed=1), self.model,
                           TINY_RESOLUTION, TINY_T5_MAX_LENGTH, seed=0)
        self.n = 0

    def train(self, *over: str, model=None, shards=None, out=None, extra=()) -> list[str]:
        self.n += 1
        out = out or self.root / f"run{self.n}"
        return [sys.executable, "-m", "megadiff.train", "--recipe", "tiny-cpu", "--output-dir", str(out),
                "demo.enabled=false", f"model.path={model or self.model}", f"data.local={shards or self.shards}",
                "model.max_sequence_length=32", "train.max_steps=2", "train.save_interval=2",
                "data.micro_batch_size=2", "logging.wandb_mode=disabled", *over, *extra]

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "megadiff.cli", *args]

    def trained_run(self) -> Path:
        out = self.root / "good-run"
        if not (out / "latest").is_file():
            code, line = _run(self.train(out=out))
            assert code == 0, line
        return out


def cases(c: Cases) -> list[tuple[str, str, object]]:
    """(group, what was tried, thunk -> command)."""
    r = c.root

    def not_sd3():
        d = r / "sdxl"
        shutil.copytree(c.model, d, dirs_exist_ok=True)
        idx = json.loads((d / "model_index.json").read_text()) | {"_class_name": "StableDiffusionXLPipeline"}
        (d / "model_index.json").write_text(json.dumps(idx))
        return c.train(model=d)

    def single_file():
        f = r / "sd3_medium.safetensors"
        f.write_bytes(b"\0" * 16)
        return c.train(model=f)

    def channels():
        d = r / "model4"
        shutil.copytree(c.model, d, dirs_exist_ok=True)
        p = d / "transformer" / "config.json"
        p.write_text(json.dumps(json.loads(p.read_text()) | {"in_channels": 4}))
        return c.train(model=d)

    def prompt_shards():
        txt = r / "prompts.txt"
        txt.write_text("a red square\na blue circle\n")
        code, line = _run(c.cli("data", "prompts", str(txt), "--out", str(r / "prompt-shards"), "--no-progress"))
        assert code == 0, line
        return c.train(shards=r / "prompt-shards")

    def empty_shards():
        (r / "empty").mkdir(exist_ok=True)
        return c.train(shards=r / "empty")

    def corrupt_shard():
        d = r / "corrupt"
        shutil.copytree(c.shards, d, dirs_exist_ok=True)
        shard = sorted(d.rglob("shard.*.mds*"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        return c.cli("data", "verify", str(d))

    def other_run():
        out = c.trained_run()
        return c.train("optim.lr=1e-3", out=out)

    def other_batch():
        out = c.trained_run()
        return c.train("data.micro_batch_size=1", out=out, extra=["--resume", "auto"])

    def planted_pickle():
        out = r / "tampered"
        shutil.copytree(c.trained_run(), out, dirs_exist_ok=True)
        f = next((out / "checkpoints" / "step-2" / "transformer").glob("*model_states.pt"))
        f.write_bytes(pickle.dumps({"module": shutil.rmtree}))
        return c.cli("export", "--run", str(out), "--to", str(r / "export"))

    def hostfile(text: str, *extra: str):
        def thunk():
            (r / "hostfile").write_text(text)
            return ["bash", str(REPO / "launch" / "deepspeed_multinode.sh"), "--hostfile", str(r / "hostfile"),
                    *extra, "train", "--recipe", "tiny-cpu"]
        return thunk

    def reward(kind: str, damage: str):
        def thunk():
            from megadiff.rewards.tiny import make_tiny_reward

            cfg = make_tiny_reward(kind, r / f"reward-{kind}-{damage}")
            path = Path(cfg.path)
            if damage == "missing":
                path = path.with_name("nope.pt")
            elif damage == "truncated":
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
            elif damage == "wrong architecture":
                other = make_tiny_reward("aesthetic", r / f"reward-other-{kind}")
                path = Path(other.path)      # the aesthetic MLP, not a CLIP tower
            spec = {"kind": kind, "path": str(path)} | ({"arch": cfg.arch} if cfg.arch else {})
            return c.train("objectives=[dmd,refl]", f"rewards=[{json.dumps(spec)}]")
        return thunk

    return [
        ("config", "unknown recipe `--recipe sd9-huge`",
         lambda: [sys.executable, "-m", "megadiff.train", "--recipe", "sd9-huge", "--output-dir", str(r / "x")]),
        ("config", "misspelt key `optim.lrr=1e-5`", lambda: c.train("optim.lrr=1e-5")),
        ("config", "wrong type `data.micro_batch_size=two`", lambda: c.train("data.micro_batch_size=two")),
        ("config", "value not allowed `flow.timestep_sampling=gaussian`",
         lambda: c.train("flow.timestep_sampling=gaussian")),
        ("config", "global batch that does not divide `data.global_batch_size=7`",
         lambda: c.train("data.global_batch_size=7")),
        ("config", "negative learning rate `optim.lr=-1`", lambda: c.train("optim.lr=-1")),
        ("config", "unknown objective `objectives=[ppo]`", lambda: c.train("objectives=[ppo]")),
        ("config", "few-step generator not shorter than its teacher",
         lambda: c.train("objectives=[dmd]", "dmd.generator.num_steps=30", "dmd.teacher_steps=28")),
        ("model", "`model.path` that does not exist", lambda: c.train(model=r / "nope")),
        ("model", "a model directory that is not SD3 (SDXL)", not_sd3),
        ("model", "a single checkpoint file instead of a diffusers directory", single_file),
        ("shards", "shard directory that does not exist", lambda: c.train(shards=r / "none")),
        ("shards", "empty shard directory", empty_shards),
        ("shards", "shards built for another model (4-channel transformer)", channels),
        ("shards", "prompt-only shards given to flow matching", prompt_shards),
        ("shards", "a corrupted shard file (`megadiff data verify`)", corrupt_shard),
        ("run dir", "output dir holding another run's checkpoints, no `--resume`", other_run),
        ("run dir", "resume with another global batch", other_batch),
        ("run dir", "export from a directory that is not a run",
         lambda: c.cli("export", "--run", str(r), "--to", str(r / "out"))),
        ("run dir", "checkpoint file replaced by a pickle that runs code", planted_pickle),
        ("rewards", "HPSv2.1 checkpoint missing", reward("hpsv2", "missing")),
        ("rewards", "HPSv2.1 checkpoint truncated", reward("hpsv2", "truncated")),
        ("rewards", "CLIP checkpoint of another architecture", reward("clip", "wrong architecture")),
        ("rewards", "ImageReward checkpoint that does not exist",
         lambda: c.train("objectives=[dmd,refl]", 'rewards=[{"kind": "imagereward", "path": "/x/ImageReward.pt"}]')),
        ("hostfile", "malformed line `n2 slots=four`", hostfile("127.0.0.1 slots=1\nn2 slots=four\n")),
        ("hostfile", "host name with shell characters `n1;reboot`", hostfile("n1;reboot slots=4\n")),
        ("hostfile", "more ranks per node than the hostfile's slots", hostfile("127.0.0.1 slots=1\n", "--ppn", "2")),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the table here")
    ap.add_argument("--only", help="comma-separated: run only cases whose group or text contains one of these")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="megadiff-bad-inputs-"))
    try:
        c = Cases(root)
        rows = ["| group | input | exit | message |", "|---|---|---|---|"]
        for group, what, thunk in cases(c):
            if args.only and not any(o in group or o in what for o in args.only.split(",")):
                continue
            try:
                code, line = _run(thunk())
            except Exception as e:   # noqa: BLE001 - a case that cannot be set up is reported
                code, line = "-", f"(case not set up: {e})"
            line = line.replace(str(root) + "/", "").replace(str(root), ".").replace("|", "\\|")
            rows.append(f"| {group} | {what} | {code} | `{line}` |")
            print(rows[-1], flush=True)
        table = "\n".join(rows) + "\n"
        if args.out:
            args.out.write_text(table)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
