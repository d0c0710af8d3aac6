"""The rank layout of this process, read from whichever launcher started it.

This is the one place in megadiff that looks at launcher variables. ``setup_dist_env()``
must run before ``torch.distributed`` / ``deepspeed.init_distributed`` and before
mosaicml-streaming is touched: it writes the ``env://`` variables (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) plus DeepSpeed's
``LOCAL_SIZE``, so that torch, DeepSpeed (which then skips its mpi4py discovery) and
streaming (which reads ``LOCAL_WORLD_SIZE``, a name DeepSpeed's launcher never sets) agree.

Detection order, first match wins:
  torchrun   TORCHELASTIC_RUN_ID or GROUP_RANK, with RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE
  deepspeed  CROSS_RANK (deepspeed.launcher.launch), with RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_SIZE
  openmpi    OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}
  mpich      PMI_RANK|PMIX_RANK|PALS_RANKID + PMI_SIZE + a local rank and a local size
             (PMI_LOCAL_*, PALS_LOCAL_*, or Hydra's MPI_LOCALRANKID/MPI_LOCALNRANKS)
  slurm      inside an srun step (SLURM_STEP_ID): SLURM_PROCID/LOCALID, task counts
  env://     RANK and WORLD_SIZE set by hand (labelled "torchrun", or "single" for one rank)
  single     nothing set: rank 0 of 1
MPI and srun go before plain RANK because e.g. Hydra launched over srun leaves the srun
step's (per-node) SLURM_* values behind. Any RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/
LOCAL_SIZE already present must agree with the result, so ``setup_dist_env`` is idempotent.
Every node must run the same number of ranks (DeepSpeed and streaming both assume it).
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

DEFAULT_MASTER_PORT = 29500
LAUNCHERS = ("deepspeed", "torchrun", "openmpi", "mpich", "slurm", "single")
_T = TypeVar("_T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # one of LAUNCHERS

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size


# --- SLURM's compressed lists ------------------------------------------------------------

def _split_top(s: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise ValueError(f"unbalanced or nested brackets in {s!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"unbalanced brackets in {s!r}")
    return parts + [cur]


def _expand_host(pattern: str) -> list[str]:
    """'r[1-2]n[01-02]' -> r1n01 r1n02 r2n01 r2n02 (zero padding kept from the range start)."""
    m = re.search(r"\[([^\]]*)\]", pattern)
    if m is None:
        return [pattern]
    values: list[str] = []
    for item in m.group(1).split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise ValueError(f"bad range {item!r} in {pattern!r}")
        values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi if sep else lo) + 1)]
    head, tails = pattern[: m.start()], _expand_host(pattern[m.end():])
    return [head + v + t for v in values for t in tails]


def parse_slurm_nodelist(s: str) -> list[str]:
    """Expand a SLURM hostlist: 'gpu[001-004,010],login1' -> gpu001..gpu004, gpu010, login1."""
    hosts = [h for part in _split_top(s.strip()) if part.strip() for h in _expand_host(part.strip())]
    if not hosts:
        raise ValueError(f"empty SLURM nodelist {s!r}")
    return hosts


def parse_slurm_tasks_per_node(s: str) -> list[int]:
    """Expand SLURM_TASKS_PER_NODE: '4(x2),2' -> [4, 4, 2]."""
    counts: list[int] = []
    for part in s.strip().split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"bad SLURM tasks-per-node entry {part!r} in {s!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


# --- detection ---------------------------------------------------------------------------

def _first(env: Mapping[str, str], names: Sequence[str]) -> str | None:
    return next((n for n in names if env.get(n, "").strip()), None)


def _int(env: Mapping[str, str], names: str | Sequence[str]) -> tuple[str, int]:
    """(variable, value) for the first of ``names`` that is set; ValueError if none is."""
    names = [names] if isinstance(names, str) else list(names)
    name = _first(env, names)
    if name is None:
        raise ValueError(f"{' or '.join(names)} is not set; export it for every rank (or launch "
                         "with deepspeed/torchrun/mpiexec/srun, which set it)")
    try:
        return name, int(env[name].strip())
    except ValueError:
        raise ValueError(f"{name}={env[name]!r} is not an integer; fix or unset {name}") from None


_Var = tuple[str, int]
_Layout = tuple[str, _Var, _Var, _Var, _Var]  # launcher, rank, world size, local rank, local size


def _torchrun(env: Mapping[str, str]) -> _Layout | None:
    if _first(env, ("TORCHELASTIC_RUN_ID", "GROUP_RANK")) is None:
        return None
    return ("torchrun", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK"),
            _int(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")))


def _deepspeed(env: Mapping[str, str]) -> _Layout | None:
    if _first(env, ("CROSS_RANK",)) is None:
        return None
    return ("deepspeed", _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK"),
            _int(env, ("LOCAL_SIZE", "LOCAL_WORLD_SIZE")))


def _openmpi(env: Mapping[str, str]) -> _Layout | None:
    if _first(env, ("OMPI_COMM_WORLD_RANK",)) is None:
        return None
    p = "OMPI_COMM_WORLD_"
    return ("openmpi", _int(env, p + "RANK"), _int(env, p + "SIZE"), _int(env, p + "LOCAL_RANK"),
            _int(env, p + "LOCAL_SIZE"))


_PMI_RANK = ("PMI_RANK", "PMIX_RANK", "PALS_RANKID")
_PMI_LOCAL_RANK = ("PMI_LOCAL_RANK", "PALS_LOCAL_RANKID", "MPI_LOCALRANKID")
_PMI_LOCAL_SIZE = ("PMI_LOCAL_SIZE", "PALS_LOCAL_SIZE", "MPI_LOCALNRANKS")


def _mpich(env: Mapping[str, str]) -> _Layout | None:
    # Incomplete PMI sets (srun --mpi=pmi2 gives PMI_RANK without local ranks) fall through.
    if any(_first(env, names) is None for names in (_PMI_RANK, ("PMI_SIZE",), _PMI_LOCAL_RANK,
                                                    _PMI_LOCAL_SIZE)):
        return None
    return ("mpich", _int(env, _PMI_RANK), _int(env, "PMI_SIZE"), _int(env, _PMI_LOCAL_RANK),
            _int(env, _PMI_LOCAL_SIZE))


_SLURM_TPN = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")


def _slurm(env: Mapping[str, str]) -> _Layout | None:
    # SLURM_PROCID=0 is also set in sbatch/salloc shells; only an srun step sets SLURM_STEP_ID.
    if _first(env, ("SLURM_STEP_ID", "SLURM_STEPID")) is None or "SLURM_PROCID" not in env:
        return None
    name = _first(env, _SLURM_TPN)
    if name is None:
        raise ValueError(f"{' / '.join(_SLURM_TPN)} is not set; launch with srun --ntasks-per-node=N")
    counts = _parsed(name, env[name], parse_slurm_tasks_per_node)
    if len(set(counts)) > 1:
        raise ValueError(f"{name}={env[name]!r} puts different numbers of ranks on the nodes; "
                         "megadiff needs the same on every node: use srun --ntasks-per-node=N")
    return ("slurm", _int(env, "SLURM_PROCID"),
            _int(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")),
            _int(env, "SLURM_LOCALID"), (name, counts[0]))


def _int_or(env: Mapping[str, str], names: Sequence[str], default: _Var) -> _Var:
    return default if _first(env, names) is None else _int(env, names)


def _env_vars(env: Mapping[str, str]) -> _Layout | None:
    if _first(env, ("RANK", "WORLD_SIZE")) is None:
        return None
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if world[1] == 1:  # one rank (also what setup_dist_env leaves behind for "single")
        return ("single", rank, world, _int_or(env, ("LOCAL_RANK",), ("LOCAL_RANK", 0)),
                _int_or(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"), ("LOCAL_WORLD_SIZE", 1)))
    return ("torchrun", rank, world, _int(env, "LOCAL_RANK"),
            _int(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")))


def _parsed(name: str, value: str, parse: Callable[[str], list[_T]]) -> list[_T]:
    try:
        return parse(value)
    except ValueError as e:
        raise ValueError(f"{name}={value!r} cannot be parsed ({e}); fix or unset {name}") from None


def _check(launcher: str, rank: _Var, world: _Var, local_rank: _Var, local_size: _Var) -> None:
    (rn, r), (wn, w), (lrn, lr), (lsn, ls) = rank, world, local_rank, local_size
    for name, value in ((wn, w), (lsn, ls)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1; fix the {launcher} launch command")
    if not 0 <= r < w:
        raise ValueError(f"{rn}={r} is out of range for {wn}={w}; unset stale {rn}/{wn} or relaunch")
    if not 0 <= lr < ls:
        raise ValueError(f"{lrn}={lr} is out of range for {lsn}={ls}; unset stale {lrn}/{lsn} or relaunch")
    if w % ls:
        raise ValueError(f"{wn}={w} is not a multiple of {lsn}={ls}: megadiff needs the same number "
                         "of ranks on every node; launch N ranks per node")


def _master_addr(env: Mapping[str, str], num_nodes: int) -> str:
    if env.get("MASTER_ADDR", "").strip():
        return env["MASTER_ADDR"].strip()
    if num_nodes == 1:
        return "127.0.0.1"
    name = _first(env, ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST"))
    if name is not None:
        return _parsed(name, env[name], parse_slurm_nodelist)[0]
    if env.get("PBS_NODEFILE"):
        try:
            with open(env["PBS_NODEFILE"]) as f:
                first = next((line.strip() for line in f if line.strip()), None)
        except OSError as e:
            raise ValueError(f"PBS_NODEFILE={env['PBS_NODEFILE']!r} is unreadable ({e.strerror}); "
                             "export MASTER_ADDR=<rank 0's host>") from None
        if first:
            return first
    raise ValueError(f"MASTER_ADDR is not set and no SLURM nodelist or PBS_NODEFILE names rank 0's "
                     f"host for this {num_nodes}-node job; export MASTER_ADDR=<rank 0's host>")


def _free_port(preferred: int = DEFAULT_MASTER_PORT) -> int:
    """``preferred`` if nothing listens there, else a port the OS reports free."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free TCP port")  # pragma: no cover


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the rank layout from ``environ`` (default ``os.environ``); changes nothing."""
    env = os.environ if environ is None else environ
    layout = None
    for probe in (_torchrun, _deepspeed, _openmpi, _mpich, _slurm, _env_vars):
        layout = probe(env)
        if layout is not None:
            break
    if layout is None:
        pmi = _first(env, _PMI_RANK)  # a PMI without local ranks, outside an srun step
        if pmi is not None:
            raise ValueError(f"{pmi} is set but none of {', '.join(_PMI_LOCAL_RANK)}; export "
                             "RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE for every rank")
        layout = ("single", ("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0),
                  ("LOCAL_WORLD_SIZE", 1))
    launcher, rank, world, local_rank, local_size = layout
    _check(launcher, rank, world, local_rank, local_size)
    # Whatever env:// variables are already set must agree (a stale RANK would split the job).
    for var, (src, value) in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank),
                              ("LOCAL_WORLD_SIZE", local_size), ("LOCAL_SIZE", local_size)):
        if var != src and env.get(var, "").strip() and _int(env, var)[1] != value:
            raise ValueError(f"{var}={env[var].strip()} disagrees with {src}={value} set by the "
                             f"{launcher} launcher; unset {var}")
    num_nodes = world[1] // local_size[1]
    if env.get("MASTER_PORT", "").strip():
        port = _int(env, "MASTER_PORT")[1]
        if not 0 < port < 65536:
            raise ValueError(f"MASTER_PORT={port} is not a TCP port; use 1024-65535")
    else:
        port = _free_port() if launcher == "single" else DEFAULT_MASTER_PORT
    return DistEnv(rank=rank[1], local_rank=local_rank[1], world_size=world[1],
                   local_world_size=local_size[1], master_addr=_master_addr(env, num_nodes),
                   master_port=port, launcher=launcher)


def apply(env: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Write the env:// variables and DeepSpeed's LOCAL_SIZE into ``environ`` (or os.environ)."""
    target = os.environ if environ is None else environ
    target.update({
        "RANK": str(env.rank), "LOCAL_RANK": str(env.local_rank),
        "WORLD_SIZE": str(env.world_size), "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "LOCAL_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port),
    })


def setup_dist_env() -> DistEnv:
    """detect(os.environ), then apply it to os.environ. Calling it again returns the same layout."""
    env = detect(os.environ)
    apply(env)
    return env
