#!/usr/bin/env bash
# bert-dist: train on all GPUs of ONE node under SLURM (DDP via accelerate).
#
#   sbatch launch/slurm_single_node.sh [extra run.py args...]
#   sbatch --gres=gpu:4 --export=ALL,TASK=sst2,PRECISION=fp16 launch/slurm_single_node.sh --init ckpt/pretrain
#   DRY_RUN=1 GPUS_PER_NODE=4 bash launch/slurm_single_node.sh --init ckpt   # print, run nothing
#
# Submit from the repository root (the job cd's to $SLURM_SUBMIT_DIR).
# Settings (environment variables, all optional):
#   TASK=sst2              passed as --task (empty: no --task)
#   ARGS=""                extra run.py args, word-split (use "$@" for args with spaces)
#   GPUS_PER_NODE / GPUS   processes to start (default: $SLURM_GPUS_ON_NODE, else 8)
#   PRECISION              no|fp16|bf16 (default bf16; with CONFIG: whatever the config says)
#   CONFIG                 accelerate YAML (e.g. accelerate_configs/fsdp.yaml); replaces --multi_gpu
#   PORT=0                 rendezvous port on this node (0 = pick a free one)
#   SCRIPT=bert_dist/run.py  training entry point
#   PYTHON                 interpreter to run accelerate with (python -m accelerate.commands.launch);
#                          default: the `accelerate` command on PATH
#   REPO_DIR               repository root (default: $SLURM_SUBMIT_DIR, else this script's ..)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT=210  seconds torchrun waits for its workers after forwarding a SIGTERM before it
#                          kills them (torch's default: 30): the --signal lead time below plus SLURM's KillWait
#   DRY_RUN=1              print the resolved command and exit 0
#
# The #SBATCH lines below are defaults; override any of them on the sbatch
# command line (sbatch --gres=gpu:4 --time=1:00:00 ...).
#SBATCH --job-name=bert-dist          # name in squeue; also %x in the log name
#SBATCH --nodes=1                     # one node: all processes on the same machine
#SBATCH --ntasks-per-node=1           # one launcher task; accelerate forks one process per GPU
#SBATCH --gres=gpu:8                  # GPUs per node; keep equal to GPUS_PER_NODE (auto-detected)
#SBATCH --cpus-per-task=32            # CPU cores for the task: data loading + ~4 threads per GPU
#SBATCH --time=04:00:00               # wall-clock limit (HH:MM:SS)
#SBATCH --output=%x-%j.out            # log file in the submit dir (%x job name, %j job id)
#SBATCH --signal=TERM@180             # SIGTERM to every process 180 s before the time limit: the run saves a
#                                     # checkpoint at its next step and exits 0 (SLURM's own SIGTERM comes only
#                                     # KillWait, 30 s by default, before its SIGKILL); rerun with --resume

set -euo pipefail

die() { echo "slurm_single_node.sh: error: $*" >&2; exit 1; }
quote() { local s; s=$(printf '%q ' "$@"); printf '%s' "${s% }"; }

DRY_RUN="${DRY_RUN:-0}"
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
TASK="${TASK-sst2}"
ARGS="${ARGS:-}"
SCRIPT="${SCRIPT:-bert_dist/run.py}"
CONFIG="${CONFIG:-}"
PRECISION="${PRECISION:-}"
PORT="${PORT:-0}"
PYTHON="${PYTHON:-}"
GPUS="${GPUS:-${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}}"

[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE/GPUS must be a positive integer, got '$GPUS'"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$PORT'"

if [[ -n "$PYTHON" ]]; then
    cmd=("$PYTHON" -m accelerate.commands.launch)
else
    cmd=(accelerate launch)
fi
if [[ -n "$CONFIG" ]]; then
    # The config decides the distributed type (MULTI_GPU, FSDP, ...); the flags
    # below only override the process count / precision / port.
    cmd+=(--config_file "$CONFIG")
elif ((GPUS > 1)); then
    cmd+=(--multi_gpu)
fi
cmd+=(--num_processes "$GPUS" --num_machines 1)
if [[ -n "$PRECISION" ]]; then
    cmd+=(--mixed_precision "$PRECISION")
elif [[ -z "$CONFIG" ]]; then
    cmd+=(--mixed_precision bf16)
fi
if ((GPUS > 1)); then
    cmd+=(--main_process_port "$PORT")
fi
if [[ -z "$CONFIG" ]]; then
    cmd+=(--dynamo_backend no)
fi
cmd+=("$SCRIPT")
if [[ -n "$TASK" ]]; then
    cmd+=(--task "$TASK")
fi
read -r -a extra <<<"$ARGS"
cmd+=("${extra[@]}" "$@")

envs=("TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-210}")
echo "# bert-dist single node: $GPUS process(es), job ${SLURM_JOB_ID:-<none>}, cwd $REPO_DIR" >&2
if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s ' "${envs[@]}"
    quote "${cmd[@]}"
    echo
    exit 0
fi

cd "$REPO_DIR"
exec env "${envs[@]}" "${cmd[@]}"
