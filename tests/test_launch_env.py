"""launch/ scripts and megadiff.launch_env without starting ranks: hostfile and nodefile
validation, the environment exported to other nodes (never a secret), argument encoding, the
commands the scripts build, and the one-line errors they end with instead of hanging."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megadiff.launch_env import (LaunchError, decode_argv, encode_argv, hosts_from_nodefile,
                                 parse_hostfile, parse_nodefile, select_hosts, split_args, write_env_file)

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
CORES = len(os.sched_getaffinity(0))
NASTY = ["train", "--output-dir", "/runs/a b", 'validation.prompts=["it\'s a $HOME", "`x` \\ y"]',
         "k=v;rm -rf /", "--", "-x", "", "ünï cødé", "a\nb"]


def _env(**extra: str) -> dict[str, str]:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "PBS_NODEFILE", "PBS_JOBID", "MEGADIFF_ARGS", "MEGADIFF_PPN", "MEGADIFF_NODES")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _one_line_error(out: subprocess.CompletedProcess, pattern: str) -> str:
    import re

    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    errors = [l for l in out.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1, out.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in out.stderr
    return errors[0]


# --- hostfiles and nodefiles -------------------------------------------------------------

def test_hostfile_example_is_valid() -> None:
    hosts = select_hosts(parse_hostfile((LAUNCH / "hostfile.example").read_text()), "x", None, None)
    assert (hosts.names, hosts.ppn) == (("gpu-node-001", "gpu-node-002"), 8)


def test_hostfile_nodes_and_ppn_take_a_subset() -> None:
    pool = parse_hostfile("# comment\n\nn1 slots=8  # trailing comment\nn2 slots=8\nn3 slots=8\n")
    hosts = select_hosts(pool, "h", 2, 4)
    assert (hosts.names, hosts.ppn, hosts.summary()) == (("n1", "n2"), 4, "2 4 n1")
    assert hosts.hostfile_text() == "n1 slots=4\nn2 slots=4\n"


@pytest.mark.parametrize("text, message", [
    ("n1 slots=4\nn2 slots=four\n", r"line 2: slots='four' must be a whole number"),
    ("n1 slots=4\nn2\n", r"line 2: 'n2' is not 'HOST slots=N'"),
    ("n1 slots=4 max=2\n", r"line 1: .* is not 'HOST slots=N'"),
    ("n1 slots=0\n", r"slots='0' must be a whole number >= 1"),
    ("n1 slots=4\nn1 slots=4\n", r"line 2: host n1 is listed twice"),
    ("n1;reboot slots=4\n", r"'n1;reboot' is not a host name"),
    ("node[1-2] slots=4\n", r"is not a host name"),
    ("# only a comment\n\n", r"names no hosts"),
])
def test_malformed_hostfile_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(LaunchError, match=message) as info:
        parse_hostfile(text, "hostfile")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("pool, nodes, ppn, message", [
    ({"a": 4, "b": 2}, None, None, r"different slots \(a=4, b=2\); pass --ppn"),
    ({"a": 4, "b": 2}, None, 4, r"4 ranks per node exceeds the 2 slots h gives b"),
    ({"a": 4}, 2, None, r"--nodes 2 exceeds the 1 host\(s\) in h"),
    ({"a": 4}, None, 0, r"--ppn 0 must be >= 1"),
])
def test_slots_beyond_the_hostfile_are_refused(pool, nodes, ppn, message) -> None:
    with pytest.raises(LaunchError, match=message):
        select_hosts(pool, "h", nodes, ppn)


def test_pbs_nodefile_with_mpiprocs_gives_the_slots() -> None:
    pool = parse_nodefile("x1\nx1\nx1\nx1\nx2\nx2\nx2\nx2\n")
    assert pool == {"x1": 4, "x2": 4}
    assert hosts_from_nodefile(pool, "nf", None, None).hostfile_text() == "x1 slots=4\nx2 slots=4\n"
    assert hosts_from_nodefile(pool, "nf", 1, 2).hostfile_text() == "x1 slots=2\n"
    with pytest.raises(LaunchError, match=r"8 ranks per node exceeds the 4 MPI slots \(mpiprocs\) nf gives x1"):
        hosts_from_nodefile(pool, "nf", None, 8)


def test_polaris_nodefile_lists_each_node_once() -> None:
    text = "x3006c0s13b0n0.hsn.cm.polaris.alcf.anl.gov\nx3006c0s19b1n0.hsn.cm.polaris.alcf.anl.gov\n"
    hosts = hosts_from_nodefile(parse_nodefile(text), "nf", None, 4)
    assert hosts.summary() == "2 4 x3006c0s13b0n0.hsn.cm.polaris.alcf.anl.gov"
    with pytest.raises(LaunchError, match=r"line 1: 'a b' is not one host name per line"):
        parse_nodefile("a b\n", "nf")


# --- what every node gets ----------------------------------------------------------------

def test_env_file_exports_settings_and_never_secrets(tmp_path: Path) -> None:
    environ = {"HOME": "/home/u", "PATH": "/usr/bin:/bin", "NCCL_DEBUG": "WARN", "NCCL_IB_HCA": "mlx5_0",
               "WANDB_API_KEY": "sekrit-1", "HF_TOKEN": "sekrit-2", "MLFLOW_TRACKING_PASSWORD": "sekrit-3",
               "AWS_SECRET_ACCESS_KEY": "sekrit-4", "TOKENIZERS_PARALLELISM": "true",
               "GLOO_SOCKET_IFNAME": "lo", "RANK": "3", "CUDA_VISIBLE_DEVICES": "0", "UNRELATED": "x",
               "MEGADIFF_EXPORT": "MY_SETTING HF_TOKEN", "MY_SETTING": "1", "PYTHONPATH": "/opt/lib"}
    path = tmp_path / ".deepspeed_env"
    withheld = write_env_file(path, "pdsh", environ)
    text = path.read_text()
    assert "sekrit" not in text and set(withheld) == {"WANDB_API_KEY", "HF_TOKEN"}
    env = dict(line.split("=", 1) for line in text.splitlines())
    assert env["WANDB_MODE"] == "offline" and env["HF_HOME"] == "/home/u/.cache/huggingface"
    assert env["PYTHONPATH"] == f"{REPO}:/opt/lib" and env["NCCL_DEBUG"] == "WARN"
    assert env["TOKENIZERS_PARALLELISM"] == "true" and env["MY_SETTING"] == "1"
    assert env["GLOO_SOCKET_IFNAME"] == "lo" and env["PATH"] == "/usr/bin:/bin"
    assert not {"RANK", "CUDA_VISIBLE_DEVICES", "UNRELATED", "MEGADIFF_EXPORT"} & set(env)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # DeepSpeed's own parser reads it back (key, value = line.split('=', 1) per line).
    assert all(len(line.split("=", 1)) == 2 for line in text.splitlines()) and text.endswith("\n")


@pytest.mark.parametrize("backend, value, ok", [
    ("pdsh", "^mlx5_0,mlx5_1", True), ("openmpi", "^mlx5_0", False), ("pdsh", "a$b", False),
    ("pdsh", 'say "hi"', False), ("mpich", "/plain/path:x", True), ("pdsh", "two words", True),
])
def test_values_the_backend_would_mangle_are_refused(tmp_path: Path, backend, value, ok) -> None:
    environ = {"HOME": "/h", "NCCL_IB_HCA": value}
    if ok:
        write_env_file(tmp_path / "e", backend, environ)
    else:
        with pytest.raises(LaunchError, match=r"NCCL_IB_HCA.*nodes' own environment"):
            write_env_file(tmp_path / "e", backend, environ)


def test_arguments_survive_encoding_and_splitting() -> None:
    word = encode_argv(NASTY)
    assert shlex.quote(word) == word  # nothing a shell would touch
    assert decode_argv(word) == NASTY
    assert split_args(shlex.join(NASTY)) == NASTY
    with pytest.raises(LaunchError, match=r"MEGADIFF_ARGS cannot be split.*No closing quotation"):
        split_args("train --x 'open")
    with pytest.raises(LaunchError, match="cannot decode"):
        decode_argv("not base64 json!")


def test_split_cli_round_trips_through_bash(tmp_path: Path) -> None:
    script = 'mapfile -d "" a < <("$0" -m megadiff.launch_env split); printf "%s\\0" "${a[@]}"'
    out = _run(["bash", "-c", script, sys.executable], _env(MEGADIFF_ARGS=shlex.join(NASTY)), tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\0")[:-1] == NASTY


# --- the scripts' commands and errors (nothing started) ------------------------------------

def _ds(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return _run(["bash", str(LAUNCH / "deepspeed_multinode.sh"), *args], _env(**env), tmp_path)


def test_deepspeed_openmpi_and_mpich_commands(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=2\nn2 slots=2\n")
    common = ["--hostfile", str(hostfile), "--no-preflight", "--dry-run", "--master-port", "29999"]
    out = _ds([*common, "--launcher", "openmpi", "--launcher-args", "--mca btl_tcp_if_include ib0",
               "train", "--output-dir", "/r/a b"], tmp_path, WANDB_API_KEY="sekrit")
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"] and "--no_local_rank" in cmd
    la = cmd[cmd.index("--launcher_args") + 1]
    assert "-x MASTER_ADDR=n1 -x MASTER_PORT=29999" in la and "btl_tcp_if_include ib0" in la
    assert cmd[-5:] == ["--module", "megadiff.cli", "train", "--output-dir", "/r/a b"]
    assert "sekrit" not in out.stdout + out.stderr and "WANDB_API_KEY" in out.stderr
    workdir = out.stderr.split("files kept in ")[1].split()[0]
    assert Path(workdir, "hostfile").read_text() == "n1 slots=2\nn2 slots=2\n"
    assert "sekrit" not in Path(workdir, ".deepspeed_env").read_text()

    mpich = tmp_path / "bin" / "mpiexec"
    mpich.parent.mkdir()
    mpich.write_text("#!/bin/sh\necho 'HYDRA build details:'\n")
    mpich.chmod(0o755)
    out = _ds([*common, "--launcher", "mpich", "--ppn", "1", "train", "x=1"], tmp_path,
              MPIEXEC=str(mpich), WANDB_MODE="disabled")
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[:7] == [str(mpich), "-n", "2", "-ppn", "1", "-hosts", "n1,n2"]
    pairs = {cmd[i + 1]: cmd[i + 2] for i, a in enumerate(cmd) if a == "-genv"}
    assert pairs["MASTER_ADDR"] == "n1" and pairs["MASTER_PORT"] == "29999"
    assert pairs["WANDB_MODE"] == "disabled" and pairs["PYTHONPATH"].startswith(str(REPO))
    assert cmd[-5:] == ["-u", "-m", "megadiff.cli", "train", "x=1"] and "python" in cmd[-6]


def test_deepspeed_script_refuses_a_malformed_hostfile(tmp_path: Path) -> None:
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=one\n")
    out = _ds(["--hostfile", "hostfile", "train", "--recipe", "tiny-cpu"], tmp_path)
    _one_line_error(out, r"hostfile line 2: slots='one' must be a whole number")
    out = _ds(["--hostfile", "missing", "train"], tmp_path)
    _one_line_error(out, r"no hostfile missing")
    out = _ds(["--hostfile", "hostfile", "--launcher", "slurm", "train"], tmp_path)
    _one_line_error(out, r"--launcher slurm: use pdsh, openmpi or mpich")
    out = _ds(["--hostfile", "hostfile"], tmp_path)
    _one_line_error(out, r"no megadiff command given")


def test_deepspeed_script_refuses_more_ranks_than_slots_or_cores(tmp_path: Path) -> None:
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    out = _ds(["--hostfile", "hostfile", "--ppn", "2", "train"], tmp_path)
    _one_line_error(out, r"2 ranks per node exceeds the 1 slots hostfile gives 127.0.0.1")
    out = _ds(["--hostfile", "hostfile", "--nodes", "3", "train"], tmp_path)
    _one_line_error(out, r"--nodes 3 exceeds the 2 host\(s\) in hostfile")
    # One node runs locally (as DeepSpeed does): this machine's cores bound the ranks.
    (tmp_path / "one").write_text(f"127.0.0.1 slots={CORES + 1}\n")
    out = _ds(["--hostfile", "one", "train"], tmp_path)
    _one_line_error(out, rf"{CORES + 1} ranks per node exceeds the {CORES} CPU cores \(no GPU found\)")


def _pbs(script: str, nodefile: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "nodefile").write_text(nodefile)
    env = _env(PBS_NODEFILE=str(tmp_path / "nodefile"), PBS_JOBID="4242.pbs-server",
               PBS_O_WORKDIR=str(tmp_path), MEGADIFF_LAUNCH_SCRIPTS=str(LAUNCH),
               MEGADIFF_LAUNCH_DIR=str(tmp_path / "launch"), **env)
    return _run(["bash", str(LAUNCH / script), *args], env, tmp_path)


def test_pbs_refuses_more_ranks_than_mpiprocs_or_cores(tmp_path: Path) -> None:
    out = _pbs("pbs_generic.sh", "127.0.0.1\n127.0.0.1\n", tmp_path, "train", MEGADIFF_PPN="3")
    _one_line_error(out, r"3 ranks per node exceeds the 2 MPI slots \(mpiprocs\) .*nodefile gives 127.0.0.1")
    out = _pbs("pbs_polaris.sh", "127.0.0.1\n", tmp_path, "train", MEGADIFF_PPN=str(CORES + 1))
    _one_line_error(out, rf"{CORES + 1} ranks per node exceeds the {CORES} CPU cores")
    out = _pbs("pbs_generic.sh", "127.0.0.1\nbad host\n", tmp_path, "train")
    _one_line_error(out, r"nodefile line 2: 'bad host' is not one host name per line")
    out = _pbs("pbs_generic.sh", "127.0.0.1\n", tmp_path)
    _one_line_error(out, r"no megadiff command")
    out = _pbs("pbs_generic.sh", "127.0.0.1\n", tmp_path, MEGADIFF_ARGS="train --x 'open")
    _one_line_error(out, r"MEGADIFF_ARGS cannot be split")
    env = _env()
    out = _run(["bash", str(LAUNCH / "pbs_generic.sh"), "train"], env, tmp_path)
    _one_line_error(out, r"PBS_NODEFILE is not set or unreadable: submit this script with qsub")


def _slurm(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = _env(**{"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "SLURM_JOB_NUM_NODES": "2",
                  "SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1(x2)",
                  "SLURM_SUBMIT_DIR": str(tmp_path), **env})
    return _run(["bash", str(LAUNCH / "slurm.sbatch"), *args], env, tmp_path)


def test_slurm_refuses_more_ranks_than_granted(tmp_path: Path) -> None:
    out = _slurm(tmp_path, "train", MEGADIFF_PPN="2")
    _one_line_error(out, r"2 ranks per node exceeds the 1 tasks per node this job was granted; "
                         r"submit with --ntasks-per-node=2")
    out = _slurm(tmp_path, "train", SLURM_NTASKS_PER_NODE=str(CORES + 1),
                 SLURM_TASKS_PER_NODE=f"{CORES + 1}(x2)")
    _one_line_error(out, rf"{CORES + 1} ranks per node exceeds the {CORES} CPU cores")
    out = _slurm(tmp_path, "train", SLURM_JOB_NODELIST="gpu[1-")
    _one_line_error(out, r"nodelist 'gpu\[1-'")
    out = _run(["bash", str(LAUNCH / "slurm.sbatch"), "train"], _env(), tmp_path)
    _one_line_error(out, r"SLURM_JOB_ID/SLURM_JOB_NODELIST are not set")


def test_scripts_are_valid_bash_and_document_their_resources() -> None:
    for name in ("deepspeed_multinode.sh", "pbs_generic.sh", "pbs_polaris.sh", "slurm.sbatch"):
        path = LAUNCH / name
        assert os.access(path, os.X_OK), f"{name} is not executable"
        out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, (name, out.stderr)
    polaris = (LAUNCH / "pbs_polaris.sh").read_text()
    assert "#PBS -l select=" in polaris and "#PBS -l filesystems=" in polaris
    assert "#SBATCH --ntasks-per-node=" in (LAUNCH / "slurm.sbatch").read_text()
    # PBS ends directives at the first command, and rejects comments after a directive.
    for name in ("pbs_generic.sh", "pbs_polaris.sh"):
        lines = (LAUNCH / name).read_text().splitlines()
        first_cmd = next(i for i, l in enumerate(lines[1:], 1) if l.strip() and not l.startswith("#"))
        directives = [i for i, l in enumerate(lines) if l.startswith("#PBS")]
        assert directives and max(directives) < first_cmd
        assert all("#" not in lines[i][4:] for i in directives), name
    help_text = subprocess.run(["bash", str(LAUNCH / "deepspeed_multinode.sh"), "--help"],
                               capture_output=True, text=True).stdout
    assert "--launcher B" in help_text and "set -euo" not in help_text
