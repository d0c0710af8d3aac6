#!/bin/bash
# megadiff on ALCF Polaris (PBS Pro; 4x A100-40GB, 32 cores per node; Cray PALS mpiexec).
#
#   qsub -A <project> -q debug -l select=2 -l walltime=01:00:00 -l filesystems=home:eagle \
#        -v MEGADIFF_ENV_SETUP=$PWD/polaris_env.sh,MEGADIFF_ARGS="train --recipe sd3m-full-ft --output-dir /eagle/<project>/runs/ft1 --resume auto" \
#        launch/pbs_polaris.sh
#   qsub -A <project> -q prod -l select=16 -l walltime=06:00:00 -l filesystems=home:eagle \
#        -- "$PWD/launch/pbs_polaris.sh" train --recipe sd3m-full-ft --output-dir /eagle/<project>/runs/ft1
#
# Submit from the megadiff checkout (the job starts in $PBS_O_WORKDIR and runs its
# launch/pbs_generic.sh, or MEGADIFF_LAUNCH_SCRIPTS/pbs_generic.sh). The `-- script args` form
# ignores the #PBS lines below, so give every resource on the qsub line there.
# polaris_env.sh (yours) activates the Python environment, e.g.:
#   module use /soft/modulefiles; module load conda; conda activate base; source ~/venvs/megadiff/bin/activate
#
# Resources:
#   -A project            the allocation to charge (required on Polaris)
#   -q queue              debug (1-2 nodes, 1 h), debug-scaling (<=10 nodes, 1 h), prod (10+ nodes)
#   select=N:system=polaris   N nodes; PBS lists each node once in $PBS_NODEFILE, so ranks per
#                         node come from the GPUs (4) unless MEGADIFF_PPN says otherwise
#   place=scatter         one chunk per node
#   walltime=hh:mm:ss     save often (train.save_interval), resubmit with --resume auto
#   filesystems=home:eagle    every filesystem the job touches (Polaris requires the list)
#PBS -N megadiff
#PBS -l select=2:system=polaris
#PBS -l place=scatter
#PBS -l walltime=01:00:00
#PBS -l filesystems=home:eagle
#PBS -q debug
#PBS -j oe
#
# Settings: everything pbs_generic.sh reads (MEGADIFF_PPN, MEGADIFF_NODES, MEGADIFF_ENV_SETUP,
# MPIEXEC, MPIEXEC_ARGS, MEGADIFF_DEPTH, PYTHON, MASTER_PORT), with MEGADIFF_LAUNCHER=mpiexec
# by default (PALS starts the ranks; megadiff reads PMI_RANK / PALS_LOCAL_RANKID). With
# MEGADIFF_LAUNCHER=deepspeed the job runs deepspeed --hostfile over pdsh/ssh instead.
set -euo pipefail

# NCCL over Slingshot with the AWS OFI plugin, as ALCF documents for Polaris. Check
# https://docs.alcf.anl.gov/polaris/ for the current plugin path before enabling these:
#   export NCCL_NET_GDR_LEVEL=PHB NCCL_CROSS_NIC=1 NCCL_COLLNET_ENABLE=1 NCCL_NET="AWS Libfabric"
#   export LD_LIBRARY_PATH=/soft/libraries/aws-ofi-nccl/v1.9.1-aws/lib:/soft/libraries/hwloc/lib:$LD_LIBRARY_PATH
#   export FI_CXI_DISABLE_HOST_REGISTER=1 FI_MR_CACHE_MONITOR=userfaultfd FI_CXI_DEFAULT_CQ_SIZE=131072
# Compute nodes reach the internet only through the proxy (for wandb online, the hub):
#   export HTTP_PROXY=http://proxy.alcf.anl.gov:3128 HTTPS_PROXY=http://proxy.alcf.anl.gov:3128
export MEGADIFF_LAUNCHER=${MEGADIFF_LAUNCHER:-mpiexec}

cd "${PBS_O_WORKDIR:-$PWD}"
launch_dir=${MEGADIFF_LAUNCH_SCRIPTS:-$PWD/launch}
if [[ ! -f $launch_dir/pbs_generic.sh ]]; then
  printf 'pbs_polaris.sh: error: no %s/pbs_generic.sh: submit from the megadiff checkout or set MEGADIFF_LAUNCH_SCRIPTS\n' "$launch_dir" >&2
  exit 2
fi
exec bash "$launch_dir/pbs_generic.sh" "$@"
