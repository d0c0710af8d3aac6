#!/bin/bash
# megadiff under PBS Pro / OpenPBS / Torque: every rank on every node of the job.
#
#   qsub -l select=2:ncpus=32:ngpus=4:mpiprocs=4 -l walltime=04:00:00 \
#        -v MEGADIFF_ARGS="train --recipe sd3m-full-ft --output-dir /shared/runs/ft1 --resume auto" \
#        launch/pbs_generic.sh
#   qsub [resources] -- "$PWD/launch/pbs_generic.sh" train --recipe sd3m-full-ft --output-dir ...
#
# The megadiff command (what follows `megadiff`) comes from the script's arguments, else from
# MEGADIFF_ARGS (split like a shell line; qsub -v splits on commas, so an override with a
# comma needs the `-- script args` form or `qsub -V` with MEGADIFF_ARGS exported).
# Submit from the megadiff checkout (the job starts in $PBS_O_WORKDIR).
#
# Resources (edit the #PBS lines or override them on the qsub line):
#   select=N          N chunks = N nodes with place=scatter
#   ncpus=C ngpus=G   per chunk; megadiff runs one rank per GPU
#   mpiprocs=P        ranks per node PBS writes into $PBS_NODEFILE (P lines per node); set P=G
#   place=scatter     one chunk per node (excl: no other job shares the nodes)
#   walltime          hh:mm:ss; save often enough (train.save_interval) and resubmit with
#                     --resume auto to continue
#PBS -N megadiff
#PBS -l select=2:ncpus=32:ngpus=4:mpiprocs=4
#PBS -l place=scatter:excl
#PBS -l walltime=04:00:00
#PBS -j oe
#
# Settings (environment; pass with qsub -v NAME=value or export before qsub -V):
#   MEGADIFF_LAUNCHER   deepspeed (default: deepspeed --hostfile over pdsh/ssh) | mpiexec
#   MEGADIFF_PPN        ranks per node (default: mpiprocs from $PBS_NODEFILE, else GPUs per node)
#   MEGADIFF_NODES      use only the first N nodes of the job
#   MEGADIFF_ENV_SETUP  file sourced first, e.g. `module load conda; conda activate megadiff`
#   MPIEXEC, MPIEXEC_FLAVOR  the mpiexec to use and its kind: pals | hydra | openmpi (detected)
#   MPIEXEC_ARGS        extra mpiexec arguments, one string split like a shell line
#   MEGADIFF_DEPTH      PALS --depth (cores per rank; default: this node's cores / ranks per node)
#   PYTHON              default python3; MASTER_ADDR / MASTER_PORT default to the first node /
#                       a port derived from the job id
set -euo pipefail
die() { printf 'pbs_generic.sh: error: %s\n' "$*" >&2; exit 2; }

cd "${PBS_O_WORKDIR:-$PWD}"
if [[ -n ${MEGADIFF_ENV_SETUP:-} ]]; then
  set +u; source "$MEGADIFF_ENV_SETUP"; set -u  # conda/module scripts read unset variables
fi
PYTHON=$(command -v "${PYTHON:-python3}") || die "no ${PYTHON:-python3} on PATH (set PYTHON or MEGADIFF_ENV_SETUP)"
"$PYTHON" -c 'import megadiff.launch_env' 2>/dev/null || die "$PYTHON cannot import megadiff (set MEGADIFF_ENV_SETUP)"
helper() { "$PYTHON" -m megadiff.launch_env "$@"; }

args=("$@")
if [[ ${#args[@]} -eq 0 ]]; then
  helper split >/dev/null || exit 2
  mapfile -d '' args < <(helper split)
fi
[[ ${#args[@]} -gt 0 ]] || die "no megadiff command: qsub -v MEGADIFF_ARGS='train --recipe NAME --output-dir DIR' ..."
[[ -n ${PBS_NODEFILE:-} && -r ${PBS_NODEFILE:-} ]] || die "PBS_NODEFILE is not set or unreadable: submit this script with qsub"

jobid=${PBS_JOBID:-$$}
work=${MEGADIFF_LAUNCH_DIR:-${TMPDIR:-/tmp}/megadiff-pbs-${jobid%%.*}}
mkdir -p "$work"
# $PBS_NODEFILE -> DeepSpeed hostfile (HOST slots=PPN); refuses more ranks than PBS granted
# (mpiprocs) or than this node has GPUs (or cores, without GPUs).
summary=$(helper hostfile from-nodefile "$PBS_NODEFILE" --out "$work/hostfile" --check-capacity \
            ${MEGADIFF_NODES:+--nodes "$MEGADIFF_NODES"} ${MEGADIFF_PPN:+--ppn "$MEGADIFF_PPN"}) || exit 2
read -r nodes ppn first_host <<<"$summary"
cut -d' ' -f1 "$work/hostfile" >"$work/hosts"

jobnum=${jobid%%.*}; jobnum=${jobnum//[!0-9]/}
export MASTER_ADDR=${MASTER_ADDR:-$first_host}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${jobnum:-0} % 10000))}
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export HF_HOME=${HF_HOME:-$HOME/.cache/huggingface}

launcher=${MEGADIFF_LAUNCHER:-deepspeed}
printf 'pbs: job %s: %s node(s) x %s rank(s), %s, rendezvous %s:%s\n' "$jobid" "$nodes" "$ppn" "$launcher" "$MASTER_ADDR" "$MASTER_PORT" >&2
case $launcher in
  deepspeed)
    launch_dir=${MEGADIFF_LAUNCH_SCRIPTS:-$(helper launch-dir)} || exit 2
    exec bash "$launch_dir/deepspeed_multinode.sh" --hostfile "$work/hostfile" --master-addr "$MASTER_ADDR" \
      --master-port "$MASTER_PORT" -- "${args[@]}" ;;
  mpiexec)
    mpiexec=$(command -v "${MPIEXEC:-mpiexec}") || die "no ${MPIEXEC:-mpiexec} on PATH (set MPIEXEC)"
    flavor=${MPIEXEC_FLAVOR:-}
    if [[ -z $flavor ]]; then
      version=$("$mpiexec" --version 2>&1 || true)
      if grep -qiE 'open ?mpi|openrte' <<<"$version"; then flavor=openmpi
      elif grep -qiE 'hydra|intel' <<<"$version"; then flavor=hydra
      else flavor=pals; fi
    fi
    extra=()
    if [[ -n ${MPIEXEC_ARGS:-} ]]; then
      helper split --name=MPIEXEC_ARGS -- "$MPIEXEC_ARGS" >/dev/null || exit 2
      mapfile -d '' extra < <(helper split -- "$MPIEXEC_ARGS")
    fi
    n=$((nodes * ppn))
    case $flavor in
      pals)     # Cray PALS (Polaris, Aurora): passes the whole environment by default;
                # --depth = cores per rank, each rank bound to its own block of cores
        depth=${MEGADIFF_DEPTH:-$(( $(nproc) / ppn > 0 ? $(nproc) / ppn : 1 ))}
        cmd=("$mpiexec" -n "$n" --ppn "$ppn" --depth "$depth" --cpu-bind depth --hostfile "$work/hosts" "${extra[@]}") ;;
      hydra)    # MPICH / Intel MPI
        cmd=("$mpiexec" -n "$n" -ppn "$ppn" -f "$work/hosts" -genvall "${extra[@]}") ;;
      openmpi)  # forwards only what -x names (by name: values stay off the command line)
        cmd=("$mpiexec" -n "$n" --hostfile "$work/hostfile" --map-by "ppr:$ppn:node" --bind-to none)
        [[ $EUID -ne 0 ]] || cmd+=(--allow-run-as-root)
        for name in $(helper env-names --with-secrets) MASTER_ADDR MASTER_PORT; do
          [[ -z ${!name+set} ]] || cmd+=(-x "$name")
        done
        cmd+=("${extra[@]}") ;;
      *) die "MPIEXEC_FLAVOR=$flavor: use pals, hydra or openmpi" ;;
    esac
    printf 'pbs: each rank runs: megadiff' >&2; printf ' %q' "${args[@]}" >&2; printf '\n' >&2
    exec "${cmd[@]}" "$PYTHON" -u -m megadiff.cli "${args[@]}" ;;
  *) die "MEGADIFF_LAUNCHER=$launcher: use deepspeed or mpiexec" ;;
esac
