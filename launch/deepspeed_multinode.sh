#!/usr/bin/env bash
# Start megadiff on every host of a hostfile with the DeepSpeed launcher.
#
#   launch/deepspeed_multinode.sh [OPTIONS] [--] COMMAND [ARGS...]
#
# COMMAND ARGS is what follows `megadiff` on one machine; every rank runs it:
#   launch/deepspeed_multinode.sh --hostfile hostfile train --recipe sd3m-full-ft \
#       --output-dir /shared/runs/ft1 --resume auto optim.lr=1e-5
#   launch/deepspeed_multinode.sh --hostfile hostfile data build ...
#
# Options:
#   --hostfile H         HOST slots=N lines (see launch/hostfile.example); default $HOSTFILE or ./hostfile
#   --launcher B         pdsh (default: ssh to every host) | openmpi (mpirun) | mpich (Hydra mpiexec)
#   --nodes N            use the first N hosts (default: all of them)
#   --ppn N              ranks per node (default: the hostfile's slots, the same on every host)
#   --master-addr A      rank 0's address as the other nodes reach it (default: the first host)
#   --master-port P      rendezvous port (default: $MASTER_PORT, else 29500)
#   --ssh-port P         sshd port on the hosts (pdsh and openmpi)
#   --ssh-timeout S      give up on a host that does not answer over ssh in S seconds (default 10)
#   --launcher-args S    extra arguments for pdsh / mpirun / mpiexec, one string split like a shell line
#   --no-preflight       skip the ssh check of every host (reachable, same Python, enough GPUs);
#                        also MEGADIFF_PREFLIGHT=0
#   --dry-run            print the launch command and the exported environment; start nothing
#                        (also MEGADIFF_DRY_RUN=1, e.g. through the PBS scripts)
#
# Environment: PYTHON (default python3; every node needs it at the same path), MASTER_PORT,
# MEGADIFF_EXPORT="NAME ..." (more variables to export to every node), and whatever the
# launch exports by itself (see `python -m megadiff.launch_env env-file --help` and
# launch/README.md): PYTHONPATH, PATH, LD_LIBRARY_PATH, HF_*, WANDB_* (WANDB_MODE defaults to
# offline), NCCL_*, GLOO_*, FI_*, TORCH_EXTENSIONS_DIR, ... Secrets (names holding KEY, TOKEN,
# SECRET, PASSWORD, ... as a _-separated part) are never written or exported: use `wandb login` on the shared home.
set -euo pipefail

die() { printf 'deepspeed_multinode.sh: error: %s\n' "$*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

hostfile=${HOSTFILE:-hostfile} launcher=pdsh nodes="" ppn="" master_addr="" master_port=${MASTER_PORT:-29500}
ssh_port="" ssh_timeout=10 launcher_args="" preflight=${MEGADIFF_PREFLIGHT:-1} dry_run=${MEGADIFF_DRY_RUN:-0}
need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --hostfile) need "$@"; hostfile=$2; shift 2 ;;
    --launcher) need "$@"; launcher=$2; shift 2 ;;
    --nodes) need "$@"; nodes=$2; shift 2 ;;
    --ppn|--gpus-per-node) need "$@"; ppn=$2; shift 2 ;;
    --master-addr) need "$@"; master_addr=$2; shift 2 ;;
    --master-port) need "$@"; master_port=$2; shift 2 ;;
    --ssh-port) need "$@"; ssh_port=$2; shift 2 ;;
    --ssh-timeout) need "$@"; ssh_timeout=$2; shift 2 ;;
    --launcher-args) [[ $# -ge 2 ]] || die "--launcher-args needs a value"; launcher_args=$2; shift 2 ;;
    --no-preflight) preflight=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || die "no megadiff command given, e.g. train --recipe NAME --output-dir DIR (see --help)"
case $launcher in pdsh|openmpi|mpich) ;; *) die "--launcher $launcher: use pdsh, openmpi or mpich" ;; esac
for v in "$nodes" "$ppn" "$master_port" "$ssh_port" "$ssh_timeout"; do
  [[ -z $v || $v =~ ^[0-9]+$ ]] || die "'$v' is not a whole number"
done
[[ -f $hostfile ]] || die "no hostfile $hostfile (pass --hostfile, see launch/hostfile.example)"

PYTHON=$(command -v "${PYTHON:-python3}") || die "no ${PYTHON:-python3} on PATH (set PYTHON)"
PYTHON=$("$PYTHON" -c 'import sys; print(sys.executable)')
"$PYTHON" -c 'import megadiff.launch_env' 2>/dev/null || die "$PYTHON cannot import megadiff (activate its environment or set PYTHON)"
helper() { "$PYTHON" -m megadiff.launch_env "$@"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/megadiff-launch.XXXXXX")
[[ $dry_run == 1 ]] || trap 'rm -rf "$work"' EXIT

# Validated hostfile: the first --nodes hosts, --ppn slots each (DeepSpeed itself checks neither).
summary=$(helper hostfile check "$hostfile" --out "$work/hostfile" ${nodes:+--nodes "$nodes"} ${ppn:+--ppn "$ppn"}) || exit 2
read -r nodes ppn first_host <<<"$summary"
master_addr=${master_addr:-$first_host}
[[ $master_addr =~ ^[A-Za-z0-9._:-]+$ ]] || die "--master-addr '$master_addr' is not a host name or address"

# Every host reachable (bounded), same Python, enough GPUs; one node runs locally, like DeepSpeed.
if [[ $nodes -gt 1 && $preflight == 1 ]]; then
  helper preflight "$work/hostfile" --ppn "$ppn" --timeout "$ssh_timeout" ${ssh_port:+--ssh-port "$ssh_port"} \
    --python "$PYTHON" --cwd "$PWD" >&2 || exit 2
elif [[ $nodes -eq 1 ]]; then
  helper capacity --ppn "$ppn" >/dev/null || exit 2
fi

# The environment every node gets: DeepSpeed reads this file (DS_ENV_FILE) and exports each line.
helper env-file --out "$work/.deepspeed_env" --backend "$launcher" >/dev/null || exit 2
export DS_ENV_FILE="$work/.deepspeed_env"
# DeepSpeed also forwards every PYTHON*/MLFLOW*/UCX*/MV2*/NCCL* variable on the command line it
# logs: drop secret-looking ones from its environment.
for name in $(compgen -e); do
  if [[ $name =~ ^(PYTHON|MLFLOW|UCX|MV2|NCCL) && $name =~ (^|_)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|PASS|CREDENTIALS?|AUTH)(_|$) ]]; then
    unset "$name"
  fi
done
export PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:-} -o BatchMode=yes -o ConnectTimeout=$ssh_timeout"

if [[ $launcher == pdsh ]]; then
  # DeepSpeed's pdsh command line holds `cd $PWD; $PYTHON ...` unquoted.
  for path in "$PWD" "$PYTHON"; do
    [[ $path =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]] || die "'$path' holds spaces or shell characters, which DeepSpeed's pdsh launch does not quote: launch from (and install Python in) a plainer path"
  done
fi

case $launcher in
  pdsh)
    # pdsh hands the command to each host's shell: pass the arguments as one encoded word so
    # quotes, $, spaces and brackets in overrides arrive intact.
    word=$(helper encode -- "$@")
    cmd=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$work/hostfile" --launcher pdsh
         --master_addr "$master_addr" --master_port "$master_port" --no_ssh_check --no_local_rank
         ${ssh_port:+--ssh_port "$ssh_port"} ${launcher_args:+--launcher_args "$launcher_args"}
         --module megadiff.launch_env run "$word") ;;
  openmpi)
    # mpirun passes argv as is. DeepSpeed adds `--mca btl_tcp_if_include eth0` unless
    # --launcher-args names btl_tcp_if_include; with --ssh-port, tell Open MPI's ssh too.
    # DeepSpeed's Open MPI runner leaves the rendezvous to mpi4py; megadiff gets it from here.
    launcher_args="-x MASTER_ADDR=$master_addr -x MASTER_PORT=$master_port $launcher_args"
    if [[ -n $ssh_port ]]; then
      launcher_args="--mca plm_rsh_args '-p $ssh_port -o BatchMode=yes -o ConnectTimeout=$ssh_timeout' $launcher_args"
    fi
    cmd=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$work/hostfile" --launcher openmpi
         --master_addr "$master_addr" --master_port "$master_port" --no_ssh_check --no_local_rank
         ${launcher_args:+--launcher_args "$launcher_args"} --module megadiff.cli "$@") ;;
  mpich)
    # DeepSpeed 0.19's MPICH runner runs `python -m <path>/launcher_helper.py` (broken with
    # --module) and drops the exit status, so start Hydra's mpiexec directly; megadiff reads
    # the PMI rank layout itself (megadiff/engine/dist_env.py).
    mpiexec=$(command -v "${MPIEXEC:-mpiexec}") || die "no ${MPIEXEC:-mpiexec} on PATH (set MPIEXEC)"
    version=$("$mpiexec" --version 2>&1 || true)
    grep -qiE 'hydra|intel' <<<"$version" || die "$mpiexec is not MPICH/Hydra: set MPIEXEC=mpiexec.hydra, or use --launcher openmpi"
    [[ -z $ssh_port ]] || die "--ssh-port is not passed to Hydra: set Port in ~/.ssh/config instead"
    genv=()  # the same variables DeepSpeed would export, from the same file
    while IFS='=' read -r key value; do genv+=(-genv "$key" "$value"); done <"$work/.deepspeed_env"
    # --launcher-args split like a shell line, without eval
    helper split --name=--launcher-args -- "$launcher_args" >/dev/null || exit 2
    mapfile -d '' extra < <(helper split -- "$launcher_args")
    hosts=$(cut -d' ' -f1 "$work/hostfile" | paste -sd, -)
    cmd=("$mpiexec" -n "$((nodes * ppn))" -ppn "$ppn" -hosts "$hosts" "${extra[@]}" "${genv[@]}"
         -genv MASTER_ADDR "$master_addr" -genv MASTER_PORT "$master_port"
         "$PYTHON" -u -m megadiff.cli "$@") ;;
esac

printf 'megadiff launch: %s node(s) x %s rank(s), %s, rendezvous %s:%s\n' "$nodes" "$ppn" "$launcher" "$master_addr" "$master_port" >&2
printf 'megadiff launch: each rank runs: megadiff' >&2; printf ' %q' "$@" >&2; printf '\n' >&2
printf 'megadiff launch: exported to every node: %s\n' "$(cut -d= -f1 "$work/.deepspeed_env" | paste -sd' ' -)" >&2
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"; printf '\n'
  printf 'megadiff launch: dry run; files kept in %s\n' "$work" >&2
  exit 0
fi

"${cmd[@]}" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' INT TERM
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do wait "$child" || rc=$?; done
exit "$rc"
