#!/usr/bin/env bash
# bert-dist: train on SEVERAL nodes under SLURM (DDP or FSDP via accelerate,
# torchrun c10d rendezvous on the first node of the allocation).
#
#   sbatch launch/slurm_multi_node.sh [extra run.py args...]
#   sbatch --nodes=4 --export=ALL,CONFIG=accelerate_configs/fsdp.yaml launch/slurm_multi_node.sh
#   DRY_RUN=1 SLURM_JOB_NODELIST='gpu[07-08]' SLURM_NNODES=2 HEAD_NODE=gpu07 \
#       bash launch/slurm_multi_node.sh --init ckpt       # print, run nothing
#
# How it works: the batch step (this script, on the first node) resolves the head
# node and runs `srun` with one task per node; every task runs this same file
# again with BERT_DIST_NODE_STAGE=1, and that stage execs
#   accelerate launch --num_machines $NNODES --machine_rank $SLURM_NODEID
#       --num_processes $((NNODES*GPUS_PER_NODE)) --main_process_ip $HEAD_NODE ...
# (the machine rank has to be read inside each srun task, not in the batch step).
# Submit from the repository root, on a filesystem all nodes see.
#
# Settings (environment variables, all optional):
#   TASK=sst2              passed as --task (empty: no --task)
#   ARGS=""                extra run.py args, word-split (use "$@" for args with spaces)
#   NNODES                 number of nodes (default: $SLURM_NNODES / $SLURM_JOB_NUM_NODES)
#   GPUS_PER_NODE          processes per node (default: $SLURM_GPUS_ON_NODE, else 8)
#   PRECISION              no|fp16|bf16 (default bf16; with CONFIG: whatever the config says)
#   CONFIG                 accelerate YAML (accelerate_configs/multi_node.yaml or fsdp.yaml);
#                          replaces --multi_gpu, the flags here override its per-node values
#   PORT=29500             rendezvous port on the head node (must be free and reachable)
#   RDZV_BACKEND=c10d      torchrun rendezvous backend (c10d or static)
#   HEAD_NODE              rendezvous host (default: first host of $SLURM_JOB_NODELIST via scontrol)
#   NODE_RANK              this node's rank in the node stage (default: $SLURM_NODEID, else $SLURM_PROCID)
#   NCCL_SOCKET_IFNAME     NCCL's interfaces, in NCCL's syntax (ib0, a prefix like ib, =ib0 exact, ^lo,docker0 all
#                          but those); each node turns it into its own interface name for gloo (below)
#   GLOO_SOCKET_IFNAME     the interface of gloo (the run's per-step SIGTERM agreement, and all of a CPU run);
#                          default: on each node, the first up interface with a global address that
#                          NCCL_SOCKET_IFNAME selects, else the one that reaches HEAD_NODE (never the loopback of
#                          a hostname that resolves to 127.0.x.x); unset when neither can be found (gloo picks)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT=210  seconds torchrun waits for its workers after forwarding a SIGTERM before it
#                          kills them (torch's default: 30): the --signal lead time below plus SLURM's KillWait
#   SRUN_ARGS=""           extra srun flags, word-split (e.g. "--gpus-per-node=8 --cpu-bind=none")
#   SCRIPT=bert_dist/run.py  training entry point
#   PYTHON                 interpreter for python -m accelerate.commands.launch (default: `accelerate` on PATH)
#   REPO_DIR               repository root (default: $SLURM_SUBMIT_DIR, else this script's ..)
#   DRY_RUN=1              print the srun command and every node's command, exit 0
#
# The #SBATCH lines are defaults; override them on the sbatch command line.
#SBATCH --job-name=bert-dist-mn       # name in squeue; also %x in the log name
#SBATCH --nodes=2                     # number of nodes; NNODES follows it ($SLURM_NNODES)
#SBATCH --ntasks-per-node=1           # exactly ONE launcher per node; accelerate forks one process per GPU
#SBATCH --gres=gpu:8                  # GPUs per node; GPUS_PER_NODE follows it ($SLURM_GPUS_ON_NODE)
#SBATCH --cpus-per-task=64            # CPU cores per node for data loading + threads
#SBATCH --exclusive                   # whole nodes: no other job competing for NICs/GPUs
#SBATCH --time=12:00:00               # wall-clock limit (HH:MM:SS)
#SBATCH --output=%x-%j.out            # log file in the submit dir (%x job name, %j job id)
#SBATCH --signal=TERM@180             # SIGTERM to every process 180 s before the time limit: the run saves a
#                                     # checkpoint at its next step and exits 0 (SLURM's own SIGTERM comes only
#                                     # KillWait, 30 s by default, before its SIGKILL); rerun with --resume

set -euo pipefail

die() { echo "slurm_multi_node.sh: error: $*" >&2; exit 1; }
quote() { local s; s=$(printf '%q ' "$@"); printf '%s' "${s% }"; }

DRY_RUN="${DRY_RUN:-0}"
STAGE="${BERT_DIST_NODE_STAGE:-0}"
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
TASK="${TASK-sst2}"
ARGS="${ARGS:-}"
SCRIPT="${SCRIPT:-bert_dist/run.py}"
CONFIG="${CONFIG:-}"
PRECISION="${PRECISION:-}"
PORT="${PORT:-29500}"
RDZV_BACKEND="${RDZV_BACKEND:-c10d}"
PYTHON="${PYTHON:-}"
SRUN_ARGS="${SRUN_ARGS:-}"
NNODES="${NNODES:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-}}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
HEAD_NODE="${HEAD_NODE:-}"

[[ -n "$NNODES" ]] || die "NNODES unknown: run under sbatch or set NNODES/SLURM_NNODES"
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE'"
[[ "$PORT" =~ ^[1-9][0-9]*$ ]] || die "PORT must be a fixed port number for multi-node, got '$PORT'"
NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))

if [[ -z "$HEAD_NODE" ]]; then
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set: run under sbatch or set HEAD_NODE"
    command -v scontrol >/dev/null 2>&1 || die "scontrol not found: set HEAD_NODE"
    # `|| true`: head closing the pipe early must not trip pipefail; emptiness is checked below.
    HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1 || true)
    [[ -n "$HEAD_NODE" ]] || die "could not resolve the head node from SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
fi

# The command one node runs; $1 = its machine rank.
node_command() {
    local rank="$1"
    if [[ -n "$PYTHON" ]]; then
        cmd=("$PYTHON" -m accelerate.commands.launch)
    else
        cmd=(accelerate launch)
    fi
    if [[ -n "$CONFIG" ]]; then
        cmd+=(--config_file "$CONFIG")
    else
        cmd+=(--multi_gpu)
    fi
    cmd+=(
        --num_processes "$NUM_PROCESSES"
        --num_machines "$NNODES"
        --machine_rank "$rank"
        --main_process_ip "$HEAD_NODE"
        --main_process_port "$PORT"
        --rdzv_backend "$RDZV_BACKEND"
    )
    if [[ -n "$PRECISION" ]]; then
        cmd+=(--mixed_precision "$PRECISION")
    elif [[ -z "$CONFIG" ]]; then
        cmd+=(--mixed_precision bf16)
    fi
    if [[ -z "$CONFIG" ]]; then
        cmd+=(--dynamo_backend no)
    fi
    cmd+=("$SCRIPT")
    if [[ -n "$TASK" ]]; then
        cmd+=(--task "$TASK")
    fi
    local extra=()
    read -r -a extra <<<"$ARGS"
    cmd+=("${extra[@]}")
}

# The interfaces of this node that an NCCL_SOCKET_IFNAME value ($1) selects, up and holding a global address, one a
# line. NCCL's syntax: a comma-separated list of name prefixes; '=' before the list: exact names; '^': all but those.
nccl_interfaces() {
    local spec="$1" exclude=0 exact=0 path name item match
    if [[ "$spec" == ^* ]]; then exclude=1 spec="${spec#^}"; fi
    if [[ "$spec" == =* ]]; then exact=1 spec="${spec#=}"; fi
    local items=()
    IFS=, read -r -a items <<<"$spec"
    for path in /sys/class/net/*; do
        name="${path##*/}" match=0
        for item in "${items[@]}"; do
            item="${item%%:*}"  # a port suffix (NCCL accepts name:port)
            if ((exact)); then [[ "$name" == "$item" ]] && match=1; else [[ "$name" == "$item"* ]] && match=1; fi
        done
        ((match != exclude)) || continue
        [[ -n "$(ip -o addr show dev "$name" up scope global 2>/dev/null)" ]] && echo "$name"
    done
    return 0
}

# The interface of this node that reaches host $1: the one holding its address if it is this node, else the route's.
interface_to() {
    local addr dev
    addr=$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}')
    [[ -n "$addr" ]] || return 0
    dev=$(ip -o addr show to "$addr" 2>/dev/null | awk 'NR == 1 {print $2}')
    [[ -n "$dev" ]] || dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
    echo "$dev"
}

if [[ "$STAGE" == 1 ]]; then
    # ---- node stage: one srun task per node ----
    NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-${SLURM_PROCID:-}}}"
    [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "node rank unknown: SLURM_NODEID/SLURM_PROCID/NODE_RANK not set"
    ((NODE_RANK < NNODES)) || die "node rank $NODE_RANK >= NNODES $NNODES"
    # gloo takes one exact interface name of this node; NCCL's values (^lo,docker0 =ib0 ib) are none, and without
    # one gloo binds the address the hostname resolves to (127.0.1.1 on some nodes: a run that hangs).
    envs=("TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-210}")
    if [[ -n "${GLOO_SOCKET_IFNAME:-}" ]]; then
        envs+=("GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME")
    else
        gloo_if="" from=""
        if [[ -n "${NCCL_SOCKET_IFNAME:-}" ]]; then
            gloo_if=$(nccl_interfaces "$NCCL_SOCKET_IFNAME" | head -n 1 || true)
            from="NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME"
            [[ -n "$gloo_if" ]] || echo "# warning: NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME selects no up interface" \
                "with an address on $(hostname)" >&2
        fi
        if [[ -z "$gloo_if" ]]; then
            gloo_if=$(interface_to "$HEAD_NODE" || true)
            from="the route to $HEAD_NODE"
        fi
        if [[ "$gloo_if" == lo ]] && ((NNODES > 1)); then
            # The head's name resolves to a loopback address here (Debian's 127.0.1.1 for the own hostname, on the
            # head node itself): the other nodes cannot reach that. The interface of the default route instead.
            gloo_if=$(ip -o route show default 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n 1 || true)
            from="the default route ($HEAD_NODE resolves to a loopback address here)"
        fi
        if [[ -n "$gloo_if" ]]; then
            envs+=("GLOO_SOCKET_IFNAME=$gloo_if")
            echo "# gloo interface $gloo_if (from $from)" >&2
        fi
    fi
    node_command "$NODE_RANK"
    cmd+=("$@")
    echo "# bert-dist node $NODE_RANK/$NNODES on $(hostname): head $HEAD_NODE:$PORT, $NUM_PROCESSES processes" >&2
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%s ' "${envs[@]}"
        quote "${cmd[@]}"
        echo
        exit 0
    fi
    cd "$REPO_DIR"
    exec env "${envs[@]}" "${cmd[@]}"
fi

# ---- batch stage: resolve everything once, then one task per node ----
SELF="$REPO_DIR/launch/slurm_multi_node.sh"
read -r -a srun_extra <<<"$SRUN_ARGS"
srun_cmd=(srun --nodes "$NNODES" --ntasks "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1)
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    # Some SLURM versions (22.05) don't pass the job's --cpus-per-task on to srun steps,
    # which would pin each node's launcher (and all its ranks/data workers) to 1 core.
    srun_cmd+=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
fi
srun_cmd+=("${srun_extra[@]}" bash "$SELF" "$@")

# Hand the resolved values to every node (srun exports the environment by default)
# so all nodes agree on the head node, sizes and port. Each node picks its own gloo interface.
export BERT_DIST_NODE_STAGE=1 HEAD_NODE NNODES GPUS_PER_NODE PORT REPO_DIR

if [[ "$DRY_RUN" == 1 ]]; then
    echo "# head node $HEAD_NODE:$PORT, $NNODES node(s) x $GPUS_PER_NODE GPU(s) = $NUM_PROCESSES processes, rdzv $RDZV_BACKEND"
    echo "# batch step runs (with BERT_DIST_NODE_STAGE=1 HEAD_NODE=$HEAD_NODE NNODES=$NNODES GPUS_PER_NODE=$GPUS_PER_NODE PORT=$PORT exported):"
    quote "${srun_cmd[@]}"
    echo
    echo "# each node runs its command with TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-210} and" \
        "GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-<its interface from NCCL_SOCKET_IFNAME or to $HEAD_NODE>}"
    for ((r = 0; r < NNODES; r++)); do
        echo "# node $r runs:"
        node_command "$r"
        cmd+=("$@")
        quote "${cmd[@]}"
        echo
    done
    exit 0
fi

[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a SLURM job: submit with sbatch (or use DRY_RUN=1)"
[[ -f "$SELF" ]] || die "$SELF not found: submit from the repository root or set REPO_DIR"
echo "# bert-dist multi-node job $SLURM_JOB_ID: head $HEAD_NODE:$PORT, $NNODES x $GPUS_PER_NODE = $NUM_PROCESSES processes" >&2
cd "$REPO_DIR"
exec "${srun_cmd[@]}"
