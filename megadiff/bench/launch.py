"""Run a module on N local ranks (torchrun, gloo on CPU) and gather one JSON per rank.

Every launch gets its own free MASTER_PORT, a scrubbed environment (no launcher variables
inherited from the calling process) and, afterwards, the removal of the
/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> files DeepSpeed's CPU shm
allreduce leaves for that port (never another run's).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

MASTER_ADDR = "127.0.0.1"
SHM_DIR = Path("/dev/shm")
# Launcher variables a child must not inherit (dist_env would see a stale layout).
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "MPI_LOCALRANKID",
                "MPI_LOCALNRANKS")
_LAUNCH_PREFIXES = ("TORCHELASTIC_", "OMPI_", "PMI_", "PMIX_", "PALS_", "SLURM_")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((MASTER_ADDR, 0))
        return int(s.getsockname()[1])


def launcher_vars(env) -> list[str]:
    """Names in `env` that describe a launcher's rank layout."""
    return [k for k in env if k in _LAUNCH_VARS or k.startswith(_LAUNCH_PREFIXES)]


def child_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    for k in launcher_vars(env):
        del env[k]
    return env


def shm_files(port: int, addr: str = MASTER_ADDR, rank: int | None = None) -> list[Path]:
    """DeepSpeed's shm allreduce buffers of the run on addr:port (shm.cpp names them
    deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>): all ranks', or one rank's."""
    which = "*" if rank is None else str(rank)
    return sorted(SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{which}"))


def remove_shm_files(port: int, addr: str = MASTER_ADDR, rank: int | None = None) -> int:
    n = 0
    for f in shm_files(port, addr, rank):
        try:
            f.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keep = [ln for ln in text if "Warning" not in ln and "warn(" not in ln]
    return "\n".join(keep[-lines:])


def run_ranks(module: str, n: int, args: list[str], out_dir: Path, log: Path,
              timeout_s: float = 900, on_start=None) -> list[dict]:
    """`torchrun --nproc_per_node n --module module --out out_dir *args`; returns the ranks'
    out_dir/rank{R}.json records in rank order. Raises RuntimeError (with the log's tail)
    if the launch fails, times out or a rank wrote nothing. `on_start(port)` is called
    before the launch."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
           "--master_addr", MASTER_ADDR, "--master_port", str(port), "--module", module,
           "--out", str(out_dir), *args]
    env = child_env()
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    if on_start is not None:
        on_start(port)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise RuntimeError(f"{n}-rank {module} did not finish in {timeout_s:.0f} s; "
                               f"log {log}:\n{_tail(log)}") from None
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            remove_shm_files(port)
    if rc != 0:
        raise RuntimeError(f"{n}-rank {module} exited with {rc}; log {log}:\n{_tail(log)}")
    records = []
    for r in range(n):
        path = out_dir / f"rank{r}.json"
        if not path.is_file():
            raise RuntimeError(f"rank {r} of {n} wrote no {path.name}; log {log}:\n{_tail(log)}")
        records.append(json.loads(path.read_text()))
    return records


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the launcher we started and its ranks (its own session), TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
