#!/usr/bin/env bash
# bert-dist: run on THIS machine, no scheduler.
#
#   launch/local.sh [extra run.py args...]                  # GPUs if present, else 1 CPU process
#   NPROC=2 launch/local.sh --max-steps 20                  # 2 gloo processes on the CPU
#   DEVICE=cpu launch/local.sh                              # CPU even if a GPU is visible
#   CONFIG=accelerate_configs/single_gpu_fp16.yaml launch/local.sh
#   DRY_RUN=1 NPROC=2 launch/local.sh                       # print, run nothing
#
# CPU with NPROC>1 uses `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
# --num_processes N`: with accelerate 1.15 this is the form that really starts
# N gloo ranks. `accelerate launch --cpu --num_processes N` silently runs ONE
# process, and a MULTI_GPU config with use_cpu: true but without the env var
# starts N independent non-distributed processes.
#
# Settings (environment variables, all optional):
#   TASK=sst2         passed as --task (empty: no --task)
#   ARGS=""           extra run.py args, word-split (use "$@" for args with spaces)
#   DEVICE=auto       auto (GPUs if any) | cpu | gpu
#   GPUS              number of visible GPUs (default: counted with nvidia-smi; 0 if absent)
#   NPROC             processes to start (default: number of GPUs, or 1 on CPU;
#                     with CONFIG: the config's num_processes unless NPROC is set)
#   PRECISION         no|fp16|bf16 (default: bf16 on GPU, no on CPU; with CONFIG: the config's)
#   CONFIG            accelerate YAML; replaces the device flags (ACCELERATE_USE_CPU=1 is
#                     still added on CPU, which multi_cpu.yaml needs)
#   PORT=0            rendezvous port when NPROC>1 (0 = pick a free one)
#   SCRIPT=bert_dist/run.py  training entry point
#   PYTHON            interpreter for python -m accelerate.commands.launch (default: `accelerate` on PATH)
#   REPO_DIR          repository root (default: this script's ..)
#   DRY_RUN=1         print the resolved command and exit 0

set -euo pipefail

die() { echo "local.sh: error: $*" >&2; exit 1; }
quote() { local s; s=$(printf '%q ' "$@"); printf '%s' "${s% }"; }

DRY_RUN="${DRY_RUN:-0}"
REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
TASK="${TASK-sst2}"
ARGS="${ARGS:-}"
SCRIPT="${SCRIPT:-bert_dist/run.py}"
CONFIG="${CONFIG:-}"
PRECISION="${PRECISION:-}"
PORT="${PORT:-0}"
PYTHON="${PYTHON:-}"
DEVICE="${DEVICE:-auto}"

case "$DEVICE" in
    cpu) GPUS=0 ;;
    auto | gpu)
        if [[ -z "${GPUS:-}" ]]; then
            if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
                # nvidia-smi lists every GPU of the machine, not the visible ones: count what is visible.
                GPUS=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c '[^[:space:]]' || true)
            elif command -v nvidia-smi >/dev/null 2>&1; then
                GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
            else
                GPUS=0
            fi
        fi
        ;;
    *) die "DEVICE must be auto, cpu or gpu, got '$DEVICE'" ;;
esac
[[ "$GPUS" =~ ^[0-9]+$ ]] || die "GPUS must be a non-negative integer, got '$GPUS'"
if [[ "$DEVICE" == gpu ]] && ((GPUS == 0)); then
    die "DEVICE=gpu but no GPU found (set GPUS=N to override detection)"
fi
NPROC_GIVEN="${NPROC:+1}"
if ((GPUS > 0)); then
    NPROC="${NPROC:-$GPUS}"
else
    NPROC="${NPROC:-1}"
fi
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'"

envs=()
if [[ -n "$PYTHON" ]]; then
    cmd=("$PYTHON" -m accelerate.commands.launch)
else
    cmd=(accelerate launch)
fi

if ((GPUS == 0)); then
    # CPU. The env var is what makes the worker processes use the CPU/gloo.
    envs+=(ACCELERATE_USE_CPU=1)
    if [[ -n "$CONFIG" ]]; then
        cmd+=(--config_file "$CONFIG")
    elif ((NPROC > 1)); then
        cmd+=(--multi_gpu --num_processes "$NPROC" --num_machines 1)
    else
        envs=()  # --cpu sets ACCELERATE_USE_CPU for the single process itself
        cmd+=(--cpu --num_processes 1 --num_machines 1)
    fi
    default_precision=no
else
    ((NPROC <= GPUS)) || die "NPROC=$NPROC but only $GPUS GPU(s)"
    if [[ -n "$CONFIG" ]]; then
        cmd+=(--config_file "$CONFIG")
    elif ((NPROC > 1)); then
        cmd+=(--multi_gpu --num_processes "$NPROC" --num_machines 1)
    else
        cmd+=(--num_processes 1 --num_machines 1)
    fi
    default_precision=bf16
fi
if [[ -n "$CONFIG" && -n "$NPROC_GIVEN" ]]; then
    # With a config, only override its process count / port when NPROC is given.
    cmd+=(--num_processes "$NPROC")
fi
if [[ -n "$PRECISION" ]]; then
    cmd+=(--mixed_precision "$PRECISION")
elif [[ -z "$CONFIG" ]]; then
    cmd+=(--mixed_precision "$default_precision")
fi
if ((NPROC > 1)) && [[ -z "$CONFIG" || -n "$NPROC_GIVEN" ]]; then
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

if [[ -n "$CONFIG" && -z "$NPROC_GIVEN" ]]; then
    nproc_desc="num_processes from $CONFIG"
else
    nproc_desc="$NPROC process(es)"
fi
echo "# bert-dist local: $nproc_desc on $( ((GPUS > 0)) && echo "$GPUS GPU(s)" || echo CPU), cwd $REPO_DIR" >&2
if [[ "$DRY_RUN" == 1 ]]; then
    if ((${#envs[@]})); then
        printf '%s ' "${envs[@]}"
    fi
    quote "${cmd[@]}"
    echo
    exit 0
fi

cd "$REPO_DIR"
exec env "${envs[@]}" "${cmd[@]}"
