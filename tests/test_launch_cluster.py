"""The launch/ scripts start real ranks that train, on one machine dressed up as a cluster.

Two "hosts", 127.0.0.1 and 127.0.0.2, each get their own sshd (started here on a free port,
throwaway host and client keys under tmp) in their own mount namespace with a private
/dev/shm: DeepSpeed's and streaming's shared-memory segments are per machine, so two ranks
that each think they lead a node must not meet there. Nothing touches ~/.ssh or the system
sshd: the client side is an `ssh` wrapper first on PATH that adds `-F <test ssh_config>`
(pdsh, `deepspeed`, Open MPI and Hydra all run `ssh` from PATH).

PBS and SLURM are faked at the scheduler boundary only: the test sets PBS_NODEFILE /
SLURM_* and puts a small `srun` on PATH that starts the step's tasks with the variables a real
srun sets; the job scripts, mpiexec (Hydra, Open MPI), DeepSpeed and the trainer run for real.
Every run is bounded; on a timeout the process group and every process under the test sshds
are killed by pid.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import clean_env, free_port, read_jsonl, tiny_train_args

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
HOSTS = ("127.0.0.1", "127.0.0.2")
RUN_TIMEOUT = 360
# Run argv in a new mount namespace whose /dev/shm is a fresh tmpfs (a "machine" of its own).
PRIVATE_SHM = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs -o size=4g,mode=1777 megadiff-test-shm /dev/shm && exec "$@"', "sh"]


def _private_shm_problem() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    out = subprocess.run([*PRIVATE_SHM, "true"], capture_output=True, text=True, timeout=30)
    if out.returncode:
        return f"cannot give a process its own /dev/shm (unshare --mount needs root): {out.stderr.strip()}"
    return None


def _skip_unless(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None and not (t == "sshd" and os.path.exists(SSHD))]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (.ci/run installs openssh-server, pdsh, "
                    "openmpi-bin, mpich)")
    problem = _private_shm_problem()
    if problem:
        pytest.skip(problem)


# --- processes -------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(stat.parent.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@dataclass
class Loopback:
    """Two ssh-reachable hosts on loopback; `env()` is what a launch from here needs."""
    port: int
    bin: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return launch_env(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", **extra)

    def kill_sessions(self) -> None:
        """Everything started through the test sshds (the sshds stay)."""
        for p in self.procs:
            _kill(_descendants(p.pid))


def launch_env(**extra: str) -> dict[str, str]:
    env = clean_env(GLOO_SOCKET_IFNAME="lo", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for name in ("MASTER_ADDR", "PBS_NODEFILE", "PBS_JOBID", "MEGADIFF_ARGS", "MEGADIFF_PPN"):
        env.pop(name, None)
    for name in [n for n in env if n.startswith("SLURM_")]:
        del env[name]
    env.update(extra)
    return env


def _wait_listening(host: str, port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd on {host} exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"sshd on {host}:{port} did not listen within 20 s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def loopback(tmp_path_factory) -> Loopback:
    _skip_unless("sshd", "ssh", "ssh-keygen", "pdsh")
    d = tmp_path_factory.mktemp("ssh")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True,
                       capture_output=True, timeout=30)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    port = free_port()
    lb = Loopback(port=port, bin=d / "bin")
    for i, host in enumerate(HOSTS):
        cfg = d / f"sshd_config.{i}"
        cfg.write_text("\n".join([
            f"Port {port}", f"ListenAddress {host}", f"HostKey {d / 'host_key'}",
            f"PidFile {d / f'sshd.{i}.pid'}", f"AuthorizedKeysFile {d / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "LogLevel ERROR", ""]))
        log = d / f"sshd.{i}.log"
        proc = subprocess.Popen([*PRIVATE_SHM, SSHD, "-D", "-e", "-f", str(cfg)], stdout=log.open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        lb.procs.append(proc)
        _wait_listening(host, port, proc, log)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    (d / "ssh_config").write_text("\n".join([
        "Host *", f"  Port {port}", f"  User {user}", f"  IdentityFile {d / 'client_key'}",
        "  IdentitiesOnly yes", "  UserKnownHostsFile /dev/null", "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking no", "  BatchMode yes", "  ConnectTimeout 5", "  LogLevel ERROR", ""]))
    lb.bin.mkdir()
    wrapper = lb.bin / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {d / "ssh_config"} "$@"\n')
    wrapper.chmod(0o755)
    for host in HOSTS:
        out = subprocess.run(["ssh", host, "findmnt -n -o SOURCE /dev/shm | tail -1"], env=lb.env(),
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "megadiff-test-shm", (host, out.stdout, out.stderr)
    try:
        yield lb
    finally:
        lb.kill_sessions()
        for p in lb.procs:
            _kill([p.pid], signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill([p.pid])
                p.wait(timeout=10)


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: int = RUN_TIMEOUT,
        private_shm: bool = False, loopback: Loopback | None = None) -> tuple[int, str]:
    """(exit status, stdout+stderr); kills everything it started if it runs past `timeout`."""
    full = [*PRIVATE_SHM, *cmd] if private_shm else cmd
    p = subprocess.Popen(full, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(_descendants(p.pid) + [p.pid])
        if loopback is not None:
            loopback.kill_sessions()
        out, _ = p.communicate(timeout=30)
        pytest.fail(f"{cmd[:3]} ran past {timeout} s:\n{out[-6000:]}")
    finally:
        _remove_shm_buffers(env.get("MASTER_PORT"))
    return p.returncode, out


def _remove_shm_buffers(port: str | None) -> None:
    """DeepSpeed's CPU allreduce buffers of this run's port, should any land in the real /dev/shm."""
    if port:
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            path.unlink(missing_ok=True)


def train_args(model: Path, shards: Path, out: Path, *overrides: str) -> list[str]:
    return ["train", *tiny_train_args(model, shards, out, "train.max_steps=3", "train.save_interval=3",
                                      "data.gradient_accumulation_steps=2", *overrides)]


def assert_trained(out_dir: Path, log: str, steps: int = 3, world: int = 2, micro: int = 4, accum: int = 2) -> None:
    """The run finished: one JSONL line per step, the global batch counted over `world` ranks,
    a ZeRO-3 checkpoint partitioned over `world` ranks."""
    jsonl = out_dir / "loss_logs" / "train.jsonl"
    assert jsonl.is_file(), log[-6000:]
    recs = read_jsonl(jsonl)
    assert [r["iteration"] for r in recs] == list(range(1, steps + 1)), log[-6000:]
    assert [r["consumed_samples"] for r in recs] == [world * micro * accum * i for i in range(1, steps + 1)]
    assert all(r["loss/flow"] > 0 and r["loss/flow"] == r["loss/flow"] for r in recs)
    state = json.loads((out_dir / "checkpoints" / f"step-{steps}" / "trainer_state.json").read_text())
    assert (state["world_size"], state["global_batch"], state["step"]) == (world, world * micro * accum, steps)
    assert json.loads((out_dir / "args.json").read_text())["deepspeed"]["config"] == "zero3"
    parts = sorted(p.name for p in (out_dir / "checkpoints" / f"step-{steps}" / "transformer").glob("zero_pp_rank_*_model_states.pt"))
    assert parts == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    assert (out_dir / "latest").read_text().strip() == f"step-{steps}"
    assert f"on {world} rank(s), global batch {world * micro * accum}" in log


# --- deepspeed --hostfile over pdsh/ssh ----------------------------------------------------

def test_deepspeed_hostfile_pdsh_trains_zero3_on_two_hosts(loopback, tiny_model, tiny_shards, tmp_path) -> None:
    (tmp_path / "hostfile").write_text("# two hosts, one rank each\n127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    out_dir = tmp_path / "run one"  # spaces, quotes and $ must reach every rank unchanged
    prompts = 'validation.prompts=["it\'s a $HOME", "say \\"hi\\" `now`"]'
    env = loopback.env(WANDB_API_KEY="sekrit-key-value")
    rc, log = run(["bash", str(LAUNCH / "deepspeed_multinode.sh"), "--hostfile", "hostfile",
                   "--master-port", env["MASTER_PORT"], "--ssh-timeout", "5",
                   *train_args(tiny_model, tiny_shards, out_dir, prompts)], env, tmp_path, loopback=loopback)
    assert rc == 0, log[-6000:]
    assert_trained(out_dir, log)
    # pdsh prefixes each host's output: a launcher ran on each host and its rank exited cleanly.
    for host in HOSTS:
        assert re.search(rf"^{re.escape(host)}: .*launch.py.*Process \d+ exits successfully", log, re.M), log[-4000:]
    assert "preflight ok: 2 host(s) reachable, 1 rank(s) each" in log
    args = json.loads((out_dir / "args.json").read_text())
    assert args["validation"]["prompts"] == ["it's a $HOME", 'say "hi" `now`']
    assert "sekrit-key-value" not in log  # withheld, not exported, not in DeepSpeed's cmd log


def test_unreachable_host_fails_within_the_ssh_timeout(loopback, tmp_path) -> None:
    # 127.0.0.3 accepts TCP on the ssh port and never answers; 127.0.0.4 refuses.
    silent = socket.socket()
    silent.bind(("127.0.0.3", loopback.port))
    silent.listen()
    try:
        for bad, why in (("127.0.0.3", r"timed out|no answer"), ("127.0.0.4", r"refused")):
            (tmp_path / "hostfile").write_text(f"127.0.0.1 slots=1\n{bad} slots=1\n")
            t0 = time.monotonic()
            rc, log = run(["bash", str(LAUNCH / "deepspeed_multinode.sh"), "--hostfile", "hostfile",
                           "--ssh-timeout", "3", "train", "--recipe", "tiny-cpu"], loopback.env(), tmp_path,
                          timeout=60, loopback=loopback)
            errors = [l for l in log.splitlines() if "error:" in l]
            assert rc == 2 and len(errors) == 1, log
            assert re.search(rf"host {re.escape(bad)} is unreachable over ssh: .*({why})", errors[0]), errors[0]
            assert time.monotonic() - t0 < 30
        # --ssh-port reaches ssh (here: a port nobody listens on, on hosts that exist).
        (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
        unused = free_port()
        rc, log = run(["bash", str(LAUNCH / "deepspeed_multinode.sh"), "--hostfile", "hostfile", "--ssh-port",
                       str(unused), "train"], loopback.env(), tmp_path, timeout=60, loopback=loopback)
        assert rc == 2 and re.search(rf"error: host 127\.0\.0\.[12] is unreachable over ssh \(and 1 more "
                                     rf"host\(s\)\): .*port {unused}: Connection refused", log), log
    finally:
        silent.close()


def test_more_ranks_than_a_host_has_cores_is_refused_over_ssh(loopback, tmp_path) -> None:
    cores = len(os.sched_getaffinity(0))
    (tmp_path / "hostfile").write_text(f"127.0.0.1 slots={cores + 1}\n127.0.0.2 slots={cores + 1}\n")
    rc, log = run(["bash", str(LAUNCH / "deepspeed_multinode.sh"), "--hostfile", "hostfile", "train"],
                  loopback.env(), tmp_path, timeout=60, loopback=loopback)
    assert rc == 2, log
    assert re.search(rf"error: {cores + 1} ranks per node exceeds the {cores} CPU cores \(no GPU found\) "
                     r"on 127\.0\.0\.[12]", log), log


@pytest.mark.skipif(os.environ.get("MEGADIFF_TEST_ALL_BACKENDS") != "1",
                    reason="set MEGADIFF_TEST_ALL_BACKENDS=1 to also train over the openmpi and mpich "
                           "backends (about 45 s each)")
@pytest.mark.parametrize("backend", ["openmpi", "mpich"])
def test_deepspeed_script_other_backends_train_on_two_hosts(loopback, tiny_model, tiny_shards, tmp_path, backend) -> None:
    _skip_unless("mpiexec.openmpi" if backend == "openmpi" else "mpiexec.hydra")
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    env = loopback.env(MPIEXEC="mpiexec.hydra")
    extra = (["--launcher-args", "--allow-run-as-root --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo "
              "--bind-to none"] if backend == "openmpi" else [])
    out_dir = tmp_path / "run"
    rc, log = run(["bash", str(LAUNCH / "deepspeed_multinode.sh"), "--hostfile", "hostfile", "--launcher", backend,
                   *extra, "--master-port", env["MASTER_PORT"], *train_args(tiny_model, tiny_shards, out_dir)],
                  env, tmp_path, private_shm=True, loopback=loopback)
    assert rc == 0, log[-6000:]
    assert_trained(out_dir, log)


# --- PBS ------------------------------------------------------------------------------------

def pbs_env(tmp_path: Path, nodefile: str, base: dict[str, str], **extra: str) -> dict[str, str]:
    (tmp_path / "PBS_NODEFILE").write_text(nodefile)
    return {**base, "PBS_NODEFILE": str(tmp_path / "PBS_NODEFILE"), "PBS_JOBID": "8123.pbs-fake",
            "PBS_O_WORKDIR": str(tmp_path), "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_JOBNAME": "megadiff",
            "MEGADIFF_LAUNCH_SCRIPTS": str(LAUNCH), "MEGADIFF_LAUNCH_DIR": str(tmp_path / "pbs-launch"), **extra}


def test_pbs_polaris_mpiexec_trains_on_two_hosts(loopback, tiny_model, tiny_shards, tmp_path) -> None:
    """Polaris style: the nodefile lists each node once, mpiexec starts one rank per node slot,
    ranks read PMI_RANK/MPI_LOCALRANKID; rank 0's host comes from $PBS_NODEFILE. The command
    arrives through MEGADIFF_ARGS, as with `qsub -v`."""
    _skip_unless("mpiexec.hydra")
    import shlex

    out_dir = tmp_path / "run"
    env = pbs_env(tmp_path, "127.0.0.1\n127.0.0.2\n", loopback.env(), MEGADIFF_PPN="1",
                  MPIEXEC="mpiexec.hydra",
                  MEGADIFF_ARGS=shlex.join(train_args(tiny_model, tiny_shards, out_dir)))
    rc, log = run(["bash", str(LAUNCH / "pbs_polaris.sh")], env, tmp_path, private_shm=True, loopback=loopback)
    assert rc == 0, log[-6000:]
    assert f"2 node(s) x 1 rank(s), mpiexec, rendezvous 127.0.0.1:{env['MASTER_PORT']}" in log
    assert (tmp_path / "pbs-launch" / "hostfile").read_text() == "127.0.0.1 slots=1\n127.0.0.2 slots=1\n"
    assert_trained(out_dir, log)


def write_images(folder: Path, n: int) -> Path:
    from megadiff.data.synthetic import shape_samples

    folder.mkdir()
    for i, (img, caption) in enumerate(shape_samples(n, 64, seed=3)):
        img.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n")
    return folder


def test_pbs_generic_openmpi_runs_the_shard_builder_from_mpiprocs(tiny_model, tmp_path) -> None:
    """Generic PBS with mpiprocs=2 (the nodefile lists the node twice: 2 ranks per node), Open
    MPI's mpiexec forwarding the environment by name, and another megadiff command than train:
    `megadiff data build` with one writer per rank."""
    _skip_unless("mpiexec.openmpi")
    try:
        import megadiff.data_cli  # noqa: F401  (the shard builder's CLI)
    except ModuleNotFoundError:
        pytest.skip("megadiff data is not in this checkout")
    images = write_images(tmp_path / "images", 8)
    out = tmp_path / "shards"
    env = pbs_env(tmp_path, "127.0.0.1\n127.0.0.1\n", launch_env(), MEGADIFF_LAUNCHER="mpiexec",
                  MPIEXEC="mpiexec.openmpi", MPIEXEC_ARGS="--mca btl self,vader")
    rc, log = run(["bash", str(LAUNCH / "pbs_generic.sh"), "data", "build", str(images), "--model",
                   str(tiny_model), "--out", str(out), "--slice-size", "2"], env, tmp_path, private_shm=True)
    assert rc == 0, log[-6000:]
    assert "1 node(s) x 2 rank(s), mpiexec" in log and "rank 1 finished its slices" in log
    index = json.loads((out / "index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == 8


def test_pbs_generic_hands_deepspeed_the_nodefile_hosts(tmp_path) -> None:
    env = pbs_env(tmp_path, "n1\nn1\nn2\nn2\n", launch_env(), MEGADIFF_DRY_RUN="1", MEGADIFF_PREFLIGHT="0",
                  MASTER_PORT="29777")
    rc, log = run(["bash", str(LAUNCH / "pbs_generic.sh"), "--no-preflight", "train", "--recipe", "x y"],
                  env, tmp_path, timeout=60)
    # The script's own arguments are the megadiff command; deepspeed_multinode.sh options do not leak in.
    assert rc == 0, log
    assert "each rank runs: megadiff --no-preflight train --recipe x\\ y" in log
    assert "deepspeed.launcher.runner --hostfile" in log and "--master_addr n1 --master_port 29777" in log
    assert (tmp_path / "pbs-launch" / "hostfile").read_text() == "n1 slots=2\nn2 slots=2\n"


# --- SLURM ----------------------------------------------------------------------------------

FAKE_SRUN = r'''#!{python}
"""Fake srun: starts the step's tasks here with the SLURM_* variables a real srun sets. With
several nodes each node's tasks share a private /dev/shm (a mount namespace), like a machine."""
import json, os, subprocess, sys, time

PRIVATE_SHM = {private_shm}


def wait_all(procs, kill_on_bad_exit):
    rc = 0
    while procs:
        for p in list(procs):
            if p.poll() is None:
                continue
            procs.remove(p)
            if p.returncode:
                rc = rc or (p.returncode if p.returncode > 0 else 128 - p.returncode)
                if kill_on_bad_exit:
                    for q in procs:
                        q.terminate()
        time.sleep(0.1)
    return rc


def agent(node, step, cmd):
    n, ppn = step["nodes"], step["ppn"]
    procs = []
    for local in range(ppn):
        env = dict(os.environ, SLURM_STEP_ID="0", SLURM_STEPID="0", SLURM_PROCID=str(node * ppn + local),
                   SLURM_LOCALID=str(local), SLURM_NODEID=str(node), SLURM_NTASKS=str(n * ppn),
                   SLURM_NPROCS=str(n * ppn), SLURM_STEP_NUM_TASKS=str(n * ppn), SLURM_STEP_NUM_NODES=str(n),
                   SLURM_STEP_NODELIST=step["nodelist"], SLURM_STEP_TASKS_PER_NODE=f"{{ppn}}(x{{n}})",
                   SLURM_TASKS_PER_NODE=f"{{ppn}}(x{{n}})", SLURMD_NODENAME=step["hosts"][node])
        procs.append(subprocess.Popen(cmd, env=env))
    return wait_all(procs, True)


def main(argv):
    if argv[:1] == ["--node-agent"]:
        return agent(int(argv[1]), json.loads(argv[2]), argv[3:])
    opts, i = {{}}, 0
    while i < len(argv) and argv[i].startswith("-"):
        key, eq, value = argv[i].partition("=")
        opts[key] = value if eq else "1"
        i += 1
    cmd = argv[i:]
    with open(os.environ["FAKE_SRUN_LOG"], "a") as f:
        f.write(json.dumps({{"opts": opts, "cmd": cmd}}) + "\n")
    from megadiff.engine.dist_env import parse_slurm_nodelist
    nodes, ppn = int(opts["--nodes"]), int(opts["--ntasks-per-node"])
    assert int(opts.get("--ntasks", nodes * ppn)) == nodes * ppn
    step = {{"nodes": nodes, "ppn": ppn, "nodelist": os.environ["SLURM_JOB_NODELIST"],
             "hosts": parse_slurm_nodelist(os.environ["SLURM_JOB_NODELIST"])[:nodes]}}
    procs = []
    for node in range(nodes):
        agent_cmd = [sys.executable, __file__, "--node-agent", str(node), json.dumps(step), *cmd]
        procs.append(subprocess.Popen(PRIVATE_SHM + agent_cmd if nodes > 1 else agent_cmd))
    return wait_all(procs, opts.get("--kill-on-bad-exit") == "1")


sys.exit(main(sys.argv[1:]))
'''


def slurm_env(tmp_path: Path, nodes: int, ppn: int) -> dict[str, str]:
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.format(python=sys.executable, private_shm=repr(PRIVATE_SHM)))
    srun.chmod(0o755)
    nodelist = "127.0.0.[1-2]" if nodes == 2 else "127.0.0.1"
    # What sbatch leaves in the batch shell (SLURM_PROCID=0 included, no step id).
    return launch_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SRUN_LOG=str(tmp_path / "srun.log"),
                      SLURM_JOB_ID="31337", SLURM_JOBID="31337", SLURM_JOB_NODELIST=nodelist,
                      SLURM_NODELIST=nodelist, SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
                      SLURM_NTASKS_PER_NODE=str(ppn), SLURM_TASKS_PER_NODE=f"{ppn}(x{nodes})",
                      SLURM_NTASKS=str(nodes * ppn), SLURM_SUBMIT_DIR=str(tmp_path), SLURM_PROCID="0",
                      SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_JOB_NAME="megadiff")


def test_slurm_srun_trains_on_two_nodes(tiny_model, tiny_shards, tmp_path) -> None:
    _skip_unless()
    out_dir = tmp_path / "run"
    env = slurm_env(tmp_path, nodes=2, ppn=1)
    rc, log = run(["bash", str(LAUNCH / "slurm.sbatch"), *train_args(tiny_model, tiny_shards, out_dir)],
                  env, tmp_path, private_shm=True)
    assert rc == 0, log[-6000:]
    assert f"2 node(s) x 1 rank(s), rendezvous 127.0.0.1:{env['MASTER_PORT']}" in log
    (call,) = read_jsonl(tmp_path / "srun.log")
    assert call["opts"]["--nodes"] == "2" and call["opts"]["--ntasks-per-node"] == "1"
    assert call["opts"]["--kill-on-bad-exit"] == "1" and call["cmd"][1:4] == ["-u", "-m", "megadiff.cli"]
    assert_trained(out_dir, log)


def test_slurm_failing_rank_ends_the_job_with_its_status(tiny_model, tiny_shards, tmp_path) -> None:
    """A rank that dies (bad input on every rank here) ends the step with the error, no hang."""
    env = slurm_env(tmp_path, nodes=1, ppn=2)
    rc, log = run(["bash", str(LAUNCH / "slurm.sbatch"), "train", "--recipe", "tiny-cpu", "--output-dir",
                   str(tmp_path / "run"), "demo.enabled=false", f"model.path={tmp_path / 'nope'}",
                   f"data.local={tiny_shards}"], env, tmp_path, timeout=120, private_shm=True)
    assert rc == 2, log[-4000:]
    # --kill-on-bad-exit terminates the other rank as soon as the first exits, so it may not get to print.
    assert log.count("megadiff: error:") >= 1 and "nope" in log
