"""Shared fixtures: one tiny SD3 model and one small shard set per test session, built
through the same code users run (`make_tiny_sd3`, `write_train_shards`)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from megadiff.models.tiny import make_tiny_sd3

    return make_tiny_sd3(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_model) -> Path:
    from megadiff.data.synthetic import shape_samples
    from megadiff.data.writer import write_train_shards
    from megadiff.models.tiny import TINY_RESOLUTION, TINY_T5_MAX_LENGTH

    out = tmp_path_factory.mktemp("shards") / "train"
    write_train_shards(out, shape_samples(48, TINY_RESOLUTION, seed=1), tiny_model,
                       TINY_RESOLUTION, TINY_T5_MAX_LENGTH, seed=0)
    return out


@pytest.fixture(scope="session", autouse=True)
def _remove_deepspeed_shm_buffers():
    """DeepSpeed's CPU shm all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_* (~66 MB per
    rank) behind, above all when a test kills a run: remove the ones this session made."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    yield
    for path in set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before:
        path.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """A subprocess environment with no launcher variables left over from the test process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE",
                        "MASTER_ADDR", "MASTER_PORT")}
    env.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONWARNINGS": "ignore"})
    env.update(extra)
    return env


def tiny_train_args(model: Path, shards: Path, out: Path, *overrides: str) -> list[str]:
    """`megadiff train` arguments for a short run of the tiny model on the test shards."""
    return ["--recipe", "tiny-cpu", "--output-dir", str(out), "demo.enabled=false",
            f"model.path={model}", f"data.local={shards}", "model.max_sequence_length=32",
            "train.max_steps=12", "train.log_interval=1", "train.save_interval=6",
            "train.keep_last=0", "optim.warmup_steps=0", "optim.schedule=constant",
            "optim.lr=1e-3", "data.micro_batch_size=4", "data.gradient_accumulation_steps=1",
            "validation.num_inference_steps=2", "logging.wandb_mode=disabled", *overrides]


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600,
            module: str = "megadiff.cli") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=env or clean_env(), timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kill_after_checkpoint(cmd: list[str], env: dict, marker: str = "saved checkpoint",
                          timeout: float = 300) -> None:
    """Start `cmd`, SIGKILL its whole process group once `marker` appears on stdout."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        else:
            pytest.fail("run ended before the checkpoint was written:\n" + "".join(seen[-30:]))
    finally:
        proc.wait(timeout=timeout)
        proc.stdout.close()
