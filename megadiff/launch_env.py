"""Launch-side helpers for the scripts in launch/: hostfiles, node capacity, ssh preflight,
the environment exported to every node, and safe argument passing.

Standard library only (it runs on login nodes and in job scripts before anything heavy is
imported). Every user mistake ends in one line on stderr, ``launch_env: error: ...``, and
exit status 2; nothing here waits without a bound.

    python -m megadiff.launch_env hostfile check HOSTFILE [--nodes N] [--ppn N] [--out H]
    python -m megadiff.launch_env hostfile from-nodefile NODEFILE --out H [--nodes N] [--ppn N]
    python -m megadiff.launch_env capacity --ppn N         # this node has N GPUs (or cores)?
    python -m megadiff.launch_env preflight HOSTFILE --ppn N [--timeout S] [--ssh-port P]
    python -m megadiff.launch_env env-file --out F [--backend pdsh|openmpi|mpich]
    python -m megadiff.launch_env env-names [--with-secrets] # names to forward (mpirun -x)
    python -m megadiff.launch_env launch-dir                # this checkout's launch/
    python -m megadiff.launch_env encode -- ARG ...         # argv -> one shell-safe word
    python -m megadiff.launch_env run WORD                  # decode, run `megadiff ARG ...`
    python -m megadiff.launch_env split [TEXT]              # TEXT or $MEGADIFF_ARGS -> NUL-separated
    python -m megadiff.launch_env first-host SLURM_NODELIST

``hostfile`` and ``from-nodefile`` print ``NODES PPN FIRST_HOST`` on stdout for the scripts.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# A host name or address as it may appear in a hostfile: nothing a shell or pdsh would read
# as syntax (pdsh takes ',' and '[..]' as host lists, so those are out too).
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_HOSTFILE_LINE = re.compile(r"(\S+)(?:\s+(.*))?")
_SLOTS = re.compile(r"slots=(\S*)")


class LaunchError(ValueError):
    """A user mistake in a launch: printed as one line, exit status 2."""


# --- hostfiles -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Hosts:
    names: tuple[str, ...]
    ppn: int  # ranks per node

    @property
    def nodes(self) -> int:
        return len(self.names)

    def hostfile_text(self) -> str:
        return "".join(f"{h} slots={self.ppn}\n" for h in self.names)

    def summary(self) -> str:
        return f"{self.nodes} {self.ppn} {self.names[0]}"


def _check_host(name: str, where: str) -> str:
    if not _HOST.fullmatch(name):
        raise LaunchError(f"{where}: {name!r} is not a host name (letters, digits, '.', '-', '_')")
    return name


def parse_hostfile(text: str, path: str = "hostfile") -> dict[str, int]:
    """DeepSpeed/OpenMPI hostfile ``HOST slots=N`` -> {host: slots}, stricter than DeepSpeed's
    own parser (which takes ``host slots=4 junk`` and ``host slots=04x``'s prefix)."""
    hosts: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path} line {n}"
        m = _HOSTFILE_LINE.fullmatch(line)
        host, rest = m.group(1), (m.group(2) or "").strip()
        slots = _SLOTS.fullmatch(rest)
        if slots is None:
            raise LaunchError(f"{where}: {line!r} is not 'HOST slots=N'")
        _check_host(host, where)
        if not slots.group(1).isdigit() or int(slots.group(1)) < 1:
            raise LaunchError(f"{where}: slots={slots.group(1)!r} must be a whole number >= 1")
        if host in hosts:
            raise LaunchError(f"{where}: host {host} is listed twice; give it one line with all its slots")
        hosts[host] = int(slots.group(1))
    if not hosts:
        raise LaunchError(f"{path} names no hosts; write one 'HOST slots=N' line per node")
    return hosts


def parse_nodefile(text: str, path: str = "nodefile") -> dict[str, int]:
    """$PBS_NODEFILE (or any one-host-per-line list) -> {host: times listed}, in order.
    PBS lists a host once per MPI process it granted there (``mpiprocs``)."""
    counts: Counter[str] = Counter()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if len(line.split()) != 1:
            raise LaunchError(f"{path} line {n}: {line!r} is not one host name per line")
        counts[_check_host(line, f"{path} line {n}")] += 1
    if not counts:
        raise LaunchError(f"{path} names no hosts")
    return dict(counts)


def select_hosts(pool: dict[str, int], path: str, nodes: int | None, ppn: int | None,
                 granted: str = "slots") -> Hosts:
    """The first ``nodes`` hosts with ``ppn`` ranks each; refuses what the pool cannot give.
    megadiff needs the same number of ranks on every node (DeepSpeed and streaming assume it)."""
    names = list(pool)
    if nodes is not None:
        if nodes < 1:
            raise LaunchError(f"--nodes {nodes} must be >= 1")
        if nodes > len(names):
            raise LaunchError(f"--nodes {nodes} exceeds the {len(names)} host(s) in {path}")
        names = names[:nodes]
    least = min(pool[h] for h in names)
    if ppn is None:
        if len({pool[h] for h in names}) > 1:
            raise LaunchError(f"{path} gives the hosts different {granted} "
                              f"({', '.join(f'{h}={pool[h]}' for h in names)}); pass --ppn N "
                              "to run the same number of ranks on every node")
        ppn = least
    if ppn < 1:
        raise LaunchError(f"--ppn {ppn} must be >= 1")
    if ppn > least:
        short = next(h for h in names if pool[h] == least)
        raise LaunchError(f"{ppn} ranks per node exceeds the {least} {granted} {path} gives {short}")
    return Hosts(tuple(names), ppn)


def hosts_from_nodefile(pool: dict[str, int], path: str, nodes: int | None,
                        ppn: int | None) -> Hosts:
    if all(c == 1 for c in pool.values()):
        # Polaris and most PBS sites list a node once whatever it holds: the node itself says
        # how many ranks fit (checked by `capacity`).
        if ppn is None:
            ppn = node_capacity()[0]
        return select_hosts({h: ppn for h in pool}, path, nodes, ppn)
    return select_hosts(pool, path, nodes, ppn, granted="MPI slots (mpiprocs)")


# --- node capacity -------------------------------------------------------------------------

def _visible_gpus() -> int:
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None and vis.strip() not in ("", "-1", "NoDevFiles"):
        return len([d for d in vis.split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def node_capacity() -> tuple[int, str]:
    """(ranks this node can run, what limits it): one per GPU, else one per CPU core."""
    gpus = _visible_gpus()
    return (gpus, "GPUs") if gpus else (_cores(), "CPU cores (no GPU found)")


def check_capacity(ppn: int, host: str, capacity: int, what: str) -> None:
    if ppn > capacity:
        raise LaunchError(f"{ppn} ranks per node exceeds the {capacity} {what} on {host}; "
                          f"lower the ranks per node (--ppn) to {capacity} or fewer")


# --- ssh preflight -------------------------------------------------------------------------

_PROBE = ('g=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU " || true); '
          'echo "megadiff-probe gpus=${g:-0} cores=$(nproc) '
          'python=$(test -x {py} && echo ok || echo missing) '
          'cwd=$(test -d {cwd} && echo ok || echo missing)"')


def ssh_base(timeout: int, port: int | None) -> list[str]:
    """ssh as the launch uses it: never prompts, gives up on a silent host after ``timeout``."""
    cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}",
           "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=2"]
    return cmd + (["-p", str(port)] if port else [])


def _probe(host: str, timeout: int, port: int | None, python: str, cwd: str) -> tuple[str, str | None, dict]:
    cmd = ssh_base(timeout, port) + [host, _PROBE.replace("{py}", shlex.quote(python)).replace("{cwd}", shlex.quote(cwd))]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return host, f"no answer over ssh within {timeout + 10} s", {}
    except FileNotFoundError:
        return host, "ssh is not installed on this node", {}
    line = next((l for l in out.stdout.splitlines() if l.startswith("megadiff-probe ")), None)
    if out.returncode != 0 or line is None:
        err = " ".join(out.stderr.split())[-300:] or f"ssh exited with status {out.returncode}"
        return host, err, {}
    return host, None, dict(kv.split("=", 1) for kv in line.split()[1:])


def preflight(hosts: Hosts, timeout: int, port: int | None, python: str, cwd: str) -> None:
    """Reach every host over ssh (in parallel, bounded), and check that it can run ``ppn``
    ranks, has this Python at the same path, and sees the launch directory."""
    with ThreadPoolExecutor(max_workers=min(64, hosts.nodes)) as pool:
        results = list(pool.map(lambda h: _probe(h, timeout, port, python, cwd), hosts.names))
    bad = [(h, err) for h, err, _ in results if err]
    if bad:
        h, err = bad[0]
        more = f" (and {len(bad) - 1} more host(s))" if len(bad) > 1 else ""
        raise LaunchError(f"host {h} is unreachable over ssh{more}: {err}; check the hostfile, "
                          "passwordless ssh from this node, and --ssh-port")
    for h, _, info in results:
        if info.get("python") != "ok":
            raise LaunchError(f"host {h} has no {python}: every node needs the same Python "
                              "environment at the same path (a shared filesystem)")
        if info.get("cwd") != "ok":
            raise LaunchError(f"host {h} has no directory {cwd}: launch from a directory on a "
                              "filesystem that every node mounts")
        gpus, cores = int(info.get("gpus", 0) or 0), int(info.get("cores", 1) or 1)
        check_capacity(hosts.ppn, h, *((gpus, "GPUs") if gpus else (cores, "CPU cores (no GPU found)")))


# --- the environment every node gets ------------------------------------------------------

EXPORT_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_", "FI_", "UCX_", "HF_", "HUGGINGFACE_",
                   "TRANSFORMERS_", "DIFFUSERS_", "WANDB_", "MEGADIFF_", "TORCHINDUCTOR_",
                   "TRITON_", "CUDA_DEVICE_")
EXPORT_NAMES = ("PYTHONPATH", "PATH", "LD_LIBRARY_PATH", "HF_HOME", "TORCH_EXTENSIONS_DIR",
                "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "CUDA_HOME")
# Never written to a file or a command line: remote ranks read credentials from the shared
# home (`wandb login` writes ~/.netrc, `huggingface-cli login` writes HF_HOME/token).
SECRET = re.compile(r"(^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|PASS|CREDENTIALS?|AUTH)(_|$)", re.IGNORECASE)
# What DeepSpeed's runner passes unquoted; anything else it wraps in "...": fine for pdsh's
# remote shell unless the value holds " $ ` \ (expanded there), wrong for mpirun (the quotes
# become part of the value).
_PLAIN = re.compile(r"[\w@%+=:,./-]*")
_SHELL_SPECIAL = re.compile(r'["$`\\\n]')
# Launcher-owned variables: each node's launcher sets them.
_NEVER = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
          "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "CUDA_VISIBLE_DEVICES"}
_EXCLUDED = ("MEGADIFF_ARGS", "MEGADIFF_EXPORT")


def repo_root() -> Path:
    """The directory holding the `megadiff` package (a checkout, or site-packages)."""
    return Path(__file__).resolve().parent.parent


def export_env(environ: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """(variables to export to every node, names withheld as secrets). Adds megadiff's
    defaults: PYTHONPATH starts with this checkout, WANDB_MODE=offline, an absolute HF_HOME."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    home = env.get("HOME") or str(Path.home())
    env.setdefault("HF_HOME", str(Path(env.get("XDG_CACHE_HOME") or Path(home) / ".cache") / "huggingface"))
    root = str(repo_root())
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    wanted = set(env.get("MEGADIFF_EXPORT", "").replace(",", " ").split())
    out, withheld = {}, []
    for name in sorted(env):
        if name in _NEVER or name in _EXCLUDED or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            continue
        if not (name in wanted or name in EXPORT_NAMES or name.startswith(EXPORT_PREFIXES)):
            continue
        if SECRET.search(name):
            withheld.append(name)
            continue
        out[name] = env[name]
    return out, withheld


def check_values(env: dict[str, str], backend: str) -> None:
    for name, value in env.items():
        if backend == "pdsh":
            bad = _SHELL_SPECIAL.search(value)
            if bad:
                raise LaunchError(f"{name} holds {bad.group()!r}, which the remote shell would expand; "
                                  f"set {name} in the nodes' own environment (~/.bashrc) instead")
        elif not _PLAIN.fullmatch(value):
            raise LaunchError(f"{name}={value!r} needs quoting, which {backend} would pass on as part "
                              f"of the value; set {name} in the nodes' own environment instead")


def write_env_file(path: Path, backend: str, environ: dict[str, str] | None = None) -> list[str]:
    """Write DeepSpeed's `.deepspeed_env` (KEY=VALUE lines; DeepSpeed exports them on every
    node). Returns the secret names it left out."""
    env, withheld = export_env(environ)
    check_values(env, backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in env.items()))
    os.replace(tmp, path)
    return withheld


# --- arguments -----------------------------------------------------------------------------

def encode_argv(argv: list[str]) -> str:
    """argv -> one word of [A-Za-z0-9_-=]: survives pdsh's remote shell untouched, whatever
    the user's overrides hold (quotes, $, spaces, brackets)."""
    return base64.urlsafe_b64encode(json.dumps(argv).encode()).decode()


def decode_argv(word: str) -> list[str]:
    try:
        argv = json.loads(base64.urlsafe_b64decode(word.encode()))
    except (ValueError, json.JSONDecodeError) as e:
        raise LaunchError(f"cannot decode the launch arguments ({e})") from None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise LaunchError("the launch arguments are not a list of strings")
    return argv


def split_args(text: str, name: str = "MEGADIFF_ARGS") -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as e:
        raise LaunchError(f"{name} cannot be split like a shell line ({e}): {text!r}") from None


# --- command line --------------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise LaunchError(f"cannot read {path}: {e.strerror}") from None


def _write_hostfile(hosts: Hosts, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(hosts.hostfile_text())


def _cmd_hostfile(a: argparse.Namespace) -> None:
    text = _read(a.path)
    if a.mode == "check":
        hosts = select_hosts(parse_hostfile(text, a.path), a.path, a.nodes, a.ppn)
    else:
        hosts = hosts_from_nodefile(parse_nodefile(text, a.path), a.path, a.nodes, a.ppn)
    if a.check_capacity:
        capacity, what = node_capacity()
        check_capacity(hosts.ppn, socket.gethostname(), capacity, what)
    _write_hostfile(hosts, a.out)
    print(hosts.summary())


def _cmd_capacity(a: argparse.Namespace) -> None:
    capacity, what = node_capacity()
    check_capacity(a.ppn, socket.gethostname(), capacity, what)
    print(capacity)


def _cmd_preflight(a: argparse.Namespace) -> None:
    hosts = select_hosts(parse_hostfile(_read(a.hostfile), a.hostfile), a.hostfile, None, a.ppn)
    preflight(hosts, a.timeout, a.ssh_port, a.python, a.cwd)
    print(f"preflight ok: {hosts.nodes} host(s) reachable, {hosts.ppn} rank(s) each")


def _cmd_env_file(a: argparse.Namespace) -> None:
    withheld = write_env_file(Path(a.out), a.backend)
    if withheld:
        print(f"launch_env: not exported to other nodes (secrets): {' '.join(withheld)}; remote ranks "
              "use the credentials stored in the shared home (wandb login, huggingface-cli login)",
              file=sys.stderr)
    print(a.out)


def _cmd_env_names(a: argparse.Namespace) -> None:
    """Names to forward by name (mpirun -x NAME): values never reach a command line, so with
    --with-secrets the withheld names are listed too."""
    env, withheld = export_env()
    names = sorted(set(env) | (set(withheld) if a.with_secrets else set()))
    print(" ".join(n for n in names if n in os.environ))


def _cmd_launch_dir(a: argparse.Namespace) -> None:
    d = repo_root() / "launch"
    if not (d / "deepspeed_multinode.sh").is_file():
        raise LaunchError(f"no launch scripts in {d} (megadiff is installed, not checked out): "
                          "set MEGADIFF_LAUNCH_SCRIPTS to the launch/ directory of a checkout")
    print(d)


def _cmd_run(a: argparse.Namespace) -> None:
    argv = decode_argv(a.word)
    from megadiff.cli import main as cli_main

    sys.argv = ["megadiff", *argv]
    cli_main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megadiff.launch_env", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hostfile", help="validate a hostfile, or make one from a nodefile")
    h.add_argument("mode", choices=["check", "from-nodefile"])
    h.add_argument("path")
    h.add_argument("--out", help="write the resolved hostfile (HOST slots=PPN) here")
    h.add_argument("--nodes", type=int, help="use the first N hosts")
    h.add_argument("--ppn", type=int, help="ranks per node")
    h.add_argument("--check-capacity", action="store_true",
                   help="also check that this node has PPN GPUs (or cores, without GPUs)")
    h.set_defaults(fn=_cmd_hostfile)
    c = sub.add_parser("capacity", help="check that this node can run PPN ranks")
    c.add_argument("--ppn", type=int, required=True)
    c.set_defaults(fn=_cmd_capacity)
    f = sub.add_parser("preflight", help="reach every host of a hostfile over ssh, bounded")
    f.add_argument("hostfile")
    f.add_argument("--ppn", type=int)
    f.add_argument("--timeout", type=int, default=10, help="ssh ConnectTimeout, seconds")
    f.add_argument("--ssh-port", type=int)
    f.add_argument("--python", default=sys.executable)
    f.add_argument("--cwd", default=os.getcwd())
    f.set_defaults(fn=_cmd_preflight)
    e = sub.add_parser("env-file", help="write .deepspeed_env for every node")
    e.add_argument("--out", required=True)
    e.add_argument("--backend", choices=["pdsh", "openmpi", "mpich"], default="pdsh")
    e.set_defaults(fn=_cmd_env_file)
    n = sub.add_parser("env-names", help="set variables env-file would export (for mpirun -x NAME)")
    n.add_argument("--with-secrets", action="store_true", help="include the secret-looking names")
    n.set_defaults(fn=_cmd_env_names)
    ld = sub.add_parser("launch-dir", help="the launch/ directory of this checkout")
    ld.set_defaults(fn=_cmd_launch_dir)
    enc = sub.add_parser("encode", help="argv -> one shell-safe word")
    enc.add_argument("argv", nargs=argparse.REMAINDER)
    enc.set_defaults(fn=lambda a: print(encode_argv(a.argv[1:] if a.argv[:1] == ["--"] else a.argv)))
    r = sub.add_parser("run", help="decode a word from `encode` and run megadiff with it")
    r.add_argument("word")
    r.set_defaults(fn=_cmd_run)
    s = sub.add_parser("split", help="TEXT (default $MEGADIFF_ARGS) -> NUL-separated words")
    s.add_argument("text", nargs="?")
    s.add_argument("--name", default="MEGADIFF_ARGS", help="what TEXT is, for errors")
    s.set_defaults(fn=_cmd_split)
    fh = sub.add_parser("first-host", help="first host of a SLURM nodelist")
    fh.add_argument("nodelist")
    fh.set_defaults(fn=_cmd_first_host)
    return p


def _cmd_split(a: argparse.Namespace) -> None:
    text = os.environ.get("MEGADIFF_ARGS", "") if a.text is None else a.text
    sys.stdout.write("".join(w + "\0" for w in split_args(text, a.name)))


def _cmd_first_host(a: argparse.Namespace) -> None:
    from megadiff.engine.dist_env import parse_slurm_nodelist

    try:
        print(parse_slurm_nodelist(a.nodelist)[0])
    except ValueError as e:
        raise LaunchError(f"nodelist {a.nodelist!r}: {e}") from None


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except LaunchError as e:
        print(f"launch_env: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
