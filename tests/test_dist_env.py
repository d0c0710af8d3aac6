"""megadiff.engine.dist_env: launcher detection, SLURM list parsing, and the streaming bridge."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megadiff.engine.dist_env import (
    DistEnv,
    apply,
    detect,
    parse_slurm_nodelist,
    parse_slurm_tasks_per_node,
    setup_dist_env,
)

REPO = Path(__file__).resolve().parents[1]
ENV_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "MPI_LOCALRANKID",
            "MPI_LOCALNRANKS", "PBS_NODEFILE")
ENV_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "PALS_", "SLURM_", "TORCHELASTIC_")

# deepspeed.launcher.launch, node 1 of 2 (4 GPUs each), third process on that node.
DEEPSPEED = {
    "MASTER_ADDR": "worker-0", "MASTER_PORT": "29500", "WORLD_SIZE": "8", "CROSS_RANK": "1",
    "CROSS_SIZE": "2", "LOCAL_SIZE": "4", "RANK": "6", "LOCAL_RANK": "2",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3", "PDSH_RCMD_TYPE": "ssh",
}
# torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d, second node.
TORCHRUN = {
    "RANK": "11", "LOCAL_RANK": "3", "GROUP_RANK": "1", "ROLE_RANK": "11", "ROLE_NAME": "default",
    "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16", "GROUP_WORLD_SIZE": "2", "ROLE_WORLD_SIZE": "16",
    "MASTER_ADDR": "node0.cluster", "MASTER_PORT": "44123", "TORCHELASTIC_RESTART_COUNT": "0",
    "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": "job42",
    "TORCHELASTIC_USE_AGENT_STORE": "False", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "OMP_NUM_THREADS": "1",
}
# mpirun -np 8 -npernode 4 -x MASTER_ADDR=node01 (Open MPI 4 also sets PMIX_RANK).
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_NODE_RANK": "1", "OMPI_UNIVERSE_SIZE": "8",
    "PMIX_RANK": "5", "PMIX_NAMESPACE": "prterun-node01-1234@1", "MASTER_ADDR": "node01",
}
# Polaris: PBS job, mpiexec -n 8 --ppn 4 (Cray PALS); MASTER_ADDR comes from $PBS_NODEFILE.
PALS = {
    "PMI_RANK": "6", "PMI_SIZE": "8", "PMI_LOCAL_RANK": "2", "PMI_LOCAL_SIZE": "4",
    "PALS_RANKID": "6", "PALS_LOCAL_RANKID": "2", "PALS_NODEID": "1", "PALS_DEPTH": "8",
    "PALS_APID": "8c5a2f0e-1d2b", "PBS_JOBID": "123456.polaris-pbs-01", "PBS_NODEFILE": "<tmp>",
}
POLARIS_HOSTS = "x3006c0s13b0n0.hsn.cm.polaris.alcf.anl.gov\nx3006c0s19b1n0.hsn.cm.polaris.alcf.anl.gov\n"
# srun -N5 --ntasks-per-node=4 inside an sbatch job on gpu[001-004,010].
SLURM = {
    "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": "13",
    "SLURM_LOCALID": "1", "SLURM_NODEID": "3", "SLURM_NTASKS": "20", "SLURM_NPROCS": "20",
    "SLURM_STEP_NUM_TASKS": "20", "SLURM_NNODES": "5", "SLURM_STEP_NUM_NODES": "5",
    "SLURM_TASKS_PER_NODE": "4(x5)", "SLURM_STEP_TASKS_PER_NODE": "4(x5)",
    "SLURM_NTASKS_PER_NODE": "4", "SLURM_NODELIST": "gpu[001-004,010]",
    "SLURM_JOB_NODELIST": "gpu[001-004,010]", "SLURM_STEP_NODELIST": "gpu[001-004,010]",
    "SLURMD_NODENAME": "gpu004",
}


@pytest.fixture
def pals(tmp_path: Path) -> dict[str, str]:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text(POLARIS_HOSTS)
    return {**PALS, "PBS_NODEFILE": str(nodefile)}


def _roundtrip(env: DistEnv, source: dict[str, str]) -> None:
    """apply() then detect() on the result gives the same layout (setup_dist_env is idempotent)."""
    before = dict(source)
    written = dict(source)
    apply(env, written)
    assert source == before  # detect() and apply(env, other_mapping) leave the input alone
    assert written["LOCAL_WORLD_SIZE"] == written["LOCAL_SIZE"] == str(env.local_world_size)
    assert (written["RANK"], written["WORLD_SIZE"]) == (str(env.rank), str(env.world_size))
    assert detect(written) == env


def test_deepspeed_launcher() -> None:
    env = detect(DEEPSPEED)
    assert env == DistEnv(rank=6, local_rank=2, world_size=8, local_world_size=4,
                          master_addr="worker-0", master_port=29500, launcher="deepspeed")
    assert (env.node_rank, env.num_nodes) == (1, 2)
    _roundtrip(env, DEEPSPEED)


def test_torchrun() -> None:
    env = detect(TORCHRUN)
    assert env == DistEnv(rank=11, local_rank=3, world_size=16, local_world_size=8,
                          master_addr="node0.cluster", master_port=44123, launcher="torchrun")
    assert (env.node_rank, env.num_nodes) == (1, 2)
    _roundtrip(env, TORCHRUN)


def test_openmpi() -> None:
    env = detect(OPENMPI)
    assert env == DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=4,
                          master_addr="node01", master_port=29500, launcher="openmpi")
    assert (env.node_rank, env.num_nodes) == (1, 2)
    _roundtrip(env, OPENMPI)


def test_pals_pmi_master_from_pbs_nodefile(pals: dict[str, str]) -> None:
    env = detect(pals)
    assert env == DistEnv(rank=6, local_rank=2, world_size=8, local_world_size=4,
                          master_addr="x3006c0s13b0n0.hsn.cm.polaris.alcf.anl.gov",
                          master_port=29500, launcher="mpich")
    assert (env.node_rank, env.num_nodes) == (1, 2)
    _roundtrip(env, pals)


def test_mpich_hydra_as_deepspeed_mpich_runner_launches_it() -> None:
    # deepspeed --launcher mpich: -genv WORLD_SIZE/LOCAL_SIZE/MASTER_*, launcher_helper sets RANK.
    src = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "4",
           "PMI_FD": "7", "MASTER_ADDR": "hostA", "MASTER_PORT": "29600", "WORLD_SIZE": "4",
           "LOCAL_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3"}
    env = detect(src)
    assert env == DistEnv(rank=3, local_rank=3, world_size=4, local_world_size=4,
                          master_addr="hostA", master_port=29600, launcher="mpich")
    assert (env.node_rank, env.num_nodes) == (0, 1)
    _roundtrip(env, src)


def test_slurm_srun() -> None:
    env = detect(SLURM)
    assert env == DistEnv(rank=13, local_rank=1, world_size=20, local_world_size=4,
                          master_addr="gpu001", master_port=29500, launcher="slurm")
    assert (env.node_rank, env.num_nodes) == (3, 5)
    _roundtrip(env, SLURM)


def test_slurm_uneven_tasks_per_node_is_refused() -> None:
    src = {**SLURM, "SLURM_NTASKS": "10", "SLURM_STEP_NUM_TASKS": "10", "SLURM_PROCID": "9",
           "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "4(x2),2",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2),2", "SLURM_STEP_NODELIST": "gpu[001-002,010]"}
    del src["SLURM_NTASKS_PER_NODE"]
    with pytest.raises(ValueError, match=r"SLURM_STEP_TASKS_PER_NODE='4\(x2\),2'.*--ntasks-per-node"):
        detect(src)


def test_slurm_batch_shell_without_srun_is_a_single_process() -> None:
    batch = {k: v for k, v in SLURM.items() if "STEP" not in k}
    batch.update(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", MASTER_PORT="29511")
    assert detect(batch) == DistEnv(0, 0, 1, 1, "127.0.0.1", 29511, "single")


def test_srun_with_pmi2_stays_slurm() -> None:
    # srun --mpi=pmi2 adds PMI_RANK/PMI_SIZE but no local-rank variables.
    assert detect({**SLURM, "PMI_RANK": "13", "PMI_SIZE": "20"}).launcher == "slurm"


def test_mpi_and_torchrun_win_over_the_outer_srun_step() -> None:
    # Hydra/torchrun started one per node by srun: SLURM_* describe the per-node step.
    outer = {**SLURM, "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "5",
             "SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "1(x5)"}
    hydra = {**outer, "PMI_RANK": "6", "PMI_SIZE": "20", "MPI_LOCALRANKID": "2",
             "MPI_LOCALNRANKS": "4"}
    assert detect(hydra) == DistEnv(6, 2, 20, 4, "gpu001", 29500, "mpich")
    assert detect({**outer, **TORCHRUN}).launcher == "torchrun"


def test_single_process_defaults() -> None:
    env = detect({})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (0, 0, 1, 1)
    assert (env.master_addr, env.launcher, env.node_rank, env.num_nodes) == ("127.0.0.1", "single", 0, 1)
    assert 0 < env.master_port < 65536
    assert detect({"MASTER_PORT": "12345"}).master_port == 12345
    _roundtrip(env, {})


def test_single_process_avoids_a_busy_default_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        try:
            busy.bind(("", 29500))
            busy.listen()
        except OSError:
            pass  # already busy: detect() must avoid it all the same
        assert detect({}).master_port != 29500


def test_single_node_mpi_without_master_addr_uses_loopback() -> None:
    src = {k: v for k, v in OPENMPI.items() if k != "MASTER_ADDR"}
    src.update(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="1", PMIX_RANK="1")
    assert detect(src).master_addr == "127.0.0.1"


def test_setup_dist_env_writes_os_environ_and_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name in ENV_VARS or name.startswith(ENV_PREFIXES):
            monkeypatch.delenv(name)
    for name, value in DEEPSPEED.items():
        monkeypatch.setenv(name, value)
    first = setup_dist_env()
    assert first.launcher == "deepspeed"
    assert {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                       "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
        "LOCAL_SIZE": "4", "MASTER_ADDR": "worker-0", "MASTER_PORT": "29500"}
    assert setup_dist_env() == first


# --- SLURM list parsing ----------------------------------------------------------------

@pytest.mark.parametrize("text, hosts", [
    ("gpu[001-004,010],login1", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "login1"]),
    ("node1,node2,node3", ["node1", "node2", "node3"]),
    ("node7", ["node7"]),
    ("nid[0098-0101]", ["nid0098", "nid0099", "nid0100", "nid0101"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("a[1-2],b[09-10],c", ["a1", "a2", "b09", "b10", "c"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x1000c0s[0-1]b0n0.hsn", ["x1000c0s0b0n0.hsn", "x1000c0s1b0n0.hsn"]),
])
def test_parse_slurm_nodelist(text: str, hosts: list[str]) -> None:
    assert parse_slurm_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["gpu[001-004", "gpu001]", "gpu[4-1]", "gpu[a-b]", "gpu[[1]]", ""])
def test_parse_slurm_nodelist_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_slurm_nodelist(text)


@pytest.mark.parametrize("text, counts", [
    ("4(x2),2", [4, 4, 2]), ("8", [8]), ("4(x5)", [4] * 5), ("2,1(x2),3", [2, 1, 1, 3]),
])
def test_parse_slurm_tasks_per_node(text: str, counts: list[int]) -> None:
    assert parse_slurm_tasks_per_node(text) == counts


@pytest.mark.parametrize("text", ["4(x)", "x4", "4(2)", "", "4,,2"])
def test_parse_slurm_tasks_per_node_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_slurm_tasks_per_node(text)


# --- inconsistent input ----------------------------------------------------------------

@pytest.mark.parametrize("src, message", [
    ({**DEEPSPEED, "RANK": "8"}, r"RANK=8 is out of range for WORLD_SIZE=8"),
    ({**TORCHRUN, "LOCAL_RANK": "8"}, r"LOCAL_RANK=8 is out of range for LOCAL_WORLD_SIZE=8"),
    ({**DEEPSPEED, "WORLD_SIZE": "eight"}, r"WORLD_SIZE='eight' is not an integer"),
    ({**DEEPSPEED, "LOCAL_SIZE": "0"}, r"LOCAL_SIZE=0 must be >= 1"),
    ({**OPENMPI, "RANK": "0"}, r"RANK=0 disagrees with OMPI_COMM_WORLD_RANK=5.*unset RANK"),
    ({**DEEPSPEED, "LOCAL_WORLD_SIZE": "8"}, r"LOCAL_WORLD_SIZE=8 disagrees with LOCAL_SIZE=4"),
    ({**OPENMPI, "OMPI_COMM_WORLD_SIZE": "6"}, r"OMPI_COMM_WORLD_SIZE=6 is not a multiple of "
                                              r"OMPI_COMM_WORLD_LOCAL_SIZE=4"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is not a TCP port"),
    ({**TORCHRUN, "MASTER_PORT": "auto"}, r"MASTER_PORT='auto' is not an integer"),
    ({k: v for k, v in OPENMPI.items() if k != "MASTER_ADDR"}, r"MASTER_ADDR is not set.*export MASTER_ADDR"),
    ({**SLURM, "SLURM_STEP_NODELIST": "gpu[001-004"}, r"SLURM_STEP_NODELIST='gpu\[001-004' cannot be parsed"),
    ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"}, r"LOCAL_WORLD_SIZE or LOCAL_SIZE is not set"),
    ({"RANK": "1", "WORLD_SIZE": "4"}, r"LOCAL_RANK is not set"),
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, r"PMI_RANK is set but none of PMI_LOCAL_RANK.*export RANK"),
    ({"PBS_NODEFILE": "/nonexistent/nodefile", **{k: v for k, v in PALS.items() if k != "PBS_NODEFILE"}},
     r"PBS_NODEFILE='/nonexistent/nodefile' is unreadable"),
])
def test_inconsistent_input_raises_one_line(src: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        detect(src)
    assert "\n" not in str(info.value)


# --- the real thing: streaming sees the layout the DeepSpeed launcher meant ----------------

STREAMING_PROBE = """
import json, os, sys
from streaming.base.world import World
from megadiff.engine.dist_env import setup_dist_env
for layout in json.loads(sys.argv[1]):  # one fresh set of launcher variables per layout
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        os.environ.pop(name, None)
    os.environ.update(layout)
    before = World.detect()
    env = setup_dist_env()
    after = World.detect()
    print(json.dumps({"launcher": env.launcher, "lws": os.environ["LOCAL_WORLD_SIZE"],
                      "before_nodes": before.num_nodes, "nodes": after.num_nodes,
                      "ranks": after.num_ranks, "ranks_per_node": after.ranks_per_node,
                      "rank": after.rank, "node": after.node}))
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deepspeed_vars(rank: int, local_rank: int, world: int, local: int, port: int) -> dict[str, str]:
    """What deepspeed.launcher.launch exports (no LOCAL_WORLD_SIZE)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
            "LOCAL_SIZE": str(local), "CROSS_RANK": str(rank // local),
            "CROSS_SIZE": str(world // local), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def test_streaming_world_after_setup_in_a_real_process() -> None:
    port = _free_port()
    layouts = [
        _deepspeed_vars(0, 0, 1, 1, port),  # `deepspeed train.py` on a 1-GPU box
        _deepspeed_vars(5, 1, 8, 4, port),  # rank 5 of 2 nodes x 4 GPUs
    ]
    env = {k: v for k, v in os.environ.items()
           if k not in ENV_VARS and not k.startswith(ENV_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", STREAMING_PROBE, json.dumps(layouts)], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    single, multi = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    assert single == {"launcher": "deepspeed", "lws": "1", "before_nodes": 1, "nodes": 1,
                      "ranks": 1, "ranks_per_node": 1, "rank": 0, "node": 0}
    # Without the LOCAL_SIZE -> LOCAL_WORLD_SIZE bridge streaming took each rank for a node.
    assert multi == {"launcher": "deepspeed", "lws": "4", "before_nodes": 8, "nodes": 2,
                     "ranks": 8, "ranks_per_node": 4, "rank": 5, "node": 1}
