#!/usr/bin/env bash
#SBATCH --job-name=lep-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# Frozen-body continued pre-training on SLURM (one node or many) or on one machine without it.
#
#   sbatch [--nodes=N] launch/pretrain.sh checkpoint=CKPT out_dir=RUN data.dir=DATA [key=value ...]
#   LAUNCHER=srun sbatch --ntasks-per-node=8 --cpus-per-task=8 launch/pretrain.sh ...
#                                     one task per GPU, ranks from SLURM (give --cpus-per-task too:
#                                     the 64 of this header are per task, 8 x 64 fits no node)
#   sbatch --gpus-per-node=0 --cpus-per-task=C [NPROC_PER_NODE=R] launch/pretrain.sh ...
#                                     a CPU partition: R ranks per node (default 1), gloo
#   bash launch/pretrain.sh ...       no SLURM: torchrun here with NPROC_PER_NODE ranks (default: GPUs, else 1)
#   bash launch/pretrain.sh model=llama3_8b out_dir=RUN dry_run=true [cluster.nodes=N]   plan only, no launch
#
# Hydra overrides pass through unchanged (`dry_run`, `out_dir` are read by the python side, as
# the stage reads them). Default launcher: one srun task per node running torchrun (through
# lep_megatron.common.agent), ranks per node = the node's GPUs (SLURM_GPUS_ON_NODE, or a typed
# SLURM_GPUS_PER_NODE such as h100:8), else NPROC_PER_NODE, else 1; rendezvous on the first node.
#
# Preemption and time limits: SLURM sends SIGUSR1 to every process of the training step
# LEP_SIGNAL_LEAD seconds (600, the --signal above: change both together) before the time limit;
# the ranks agree on it after the current step, checkpoint it and exit 75
# (lep_megatron/common/exit_codes.py); this script then requeues the job (`scontrol requeue`),
# which resumes from out_dir/checkpoints/latest (train.resume=true) as attempt N+1. A job whose
# --time is not longer than the lead (+ LEP_SIGNAL_MARGIN, 120 s) is refused at its start: it
# would be signalled before training anything and requeue itself forever. SLURM makes a requeued
# job eligible about 2 minutes later. Exit 0 runs LEP_ON_SUCCESS (a script; the pipeline records
# the step with it); any other exit code fails the job.
#
# Logs: the job's own output %x-%j.out in the submission directory (appended by each attempt);
# per attempt LOG_DIR/<jobid>/attempt-<SLURM_RESTART_COUNT>/{launch.txt,pretrain.log}
# (LOG_DIR=logs, relative to the submission directory). Per-step FutureWarnings of
# torch.distributed's deprecated collectives (megatron's optimizer calls them) are filtered.
#
# Environment (defaults set here when unset):
#   OMP_NUM_THREADS                  CPUs per rank (the task's CPUs / ranks per task)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a rank's NCCL error or timeout ends the job instead of hanging it
#   CUDA_DEVICE_MAX_CONNECTIONS=1    megatron's overlap of TP communication needs it
#   NCCL_IB_TIMEOUT=22               InfiniBand: wait longer (4.096 us x 2^22, ~17 s) for a lost packet
#   NCCL_DEBUG=WARN                  INFO to see which interfaces / transports NCCL picked
#   LEP_TASK_WAIT=120                seconds srun lets the other tasks finish once the first exited
#                                    (a crashed node then takes the others down after this)
# Left to the user / cluster: NCCL_SOCKET_IFNAME (e.g. ib0, or ^lo,docker0: the interface NCCL's
# bootstrap and socket transport use), NCCL_IB_HCA, NCCL_NET_GDR_LEVEL, NCCL_CROSS_NIC, MASTER_PORT.
set -euo pipefail
PYTHON=${PYTHON:-python3}
LAUNCHER=${LAUNCHER:-torchrun}
EXIT_RESUMABLE=75  # lep_megatron/common/exit_codes.py

# the stage's own config decides: a dry run plans in this process and launches nothing
settings=$("$PYTHON" -m lep_megatron.common.config pretrain dry_run:bool out_dir -- "$@")
dry_run=$(sed -n 1p <<< "$settings")
out_dir=$(sed -n 2p <<< "$settings")
[ "$dry_run" != true ] || exec "$PYTHON" -m lep_megatron pretrain "$@"

export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# torch.distributed's deprecation warnings (once per rank and call site; megatron's distributed
# optimizer and dist_checkpointing make them at every step / save); other warnings stay
export PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore::FutureWarning:torch.distributed.c10d_logger,\
ignore:Please use DTensor instead:FutureWarning,ignore::FutureWarning:megatron.core.dist_checkpointing.strategies.torch"
AGENT=("$PYTHON" -m lep_megatron.common.agent)
LOG_ROOT=${LOG_DIR:-logs}

gpu_count() {  # "8", "h100:8", "gpu:h100:8", "a100:4,v100:2" -> the number of GPUs; "", "0", "(null)" -> 0
  local total=0 item n items
  IFS=, read -ra items <<< "$1"
  for item in "${items[@]}"; do
    n=${item##*:}
    n=${n%%(*}
    [[ "$n" =~ ^[0-9]+$ ]] && total=$((total + n))
  done
  echo "$total"
}

to_seconds() {  # squeue's time limit ([days-][hours:]minutes:seconds) -> seconds; nothing for UNLIMITED etc.
  local t=$1 days=0 parts
  [[ "$t" =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ ]] || return 0
  if [[ "$t" == *-* ]]; then days=${t%%-*}; t=${t#*-}; fi
  IFS=: read -ra parts <<< "$t"
  case ${#parts[@]} in
    1) echo $(( days * 86400 + 10#${parts[0]} * 60 )) ;;
    2) echo $(( days * 86400 + 10#${parts[0]} * 60 + 10#${parts[1]} )) ;;
    3) echo $(( days * 86400 + 10#${parts[0]} * 3600 + 10#${parts[1]} * 60 + 10#${parts[2]} )) ;;
  esac
}

latest_checkpoint() { cat "$out_dir/checkpoints/latest" 2> /dev/null || true; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
  LOG=$LOG_ROOT/local-$(date +%Y%m%d-%H%M%S)
  mkdir -p "$LOG"
  echo "lep-megatron pretrain: local torchrun, logs=$LOG overrides: $*" | tee "$LOG/launch.txt"
  NPROC=${NPROC_PER_NODE:-$(nvidia-smi -L 2> /dev/null | wc -l || true)}
  [ "${NPROC:-0}" -ge 1 ] || NPROC=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
  set +e
  "${AGENT[@]}" --standalone --nproc-per-node "$NPROC" -m lep_megatron pretrain "$@" 2>&1 | tee "$LOG/pretrain.log"
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" = "$EXIT_RESUMABLE" ]; then
    echo "stopped early at checkpoint $(latest_checkpoint) (exit $status): run the same command again to resume" | tee -a "$LOG/launch.txt"
  fi
  [ "$status" != 0 ] || [ -z "${LEP_ON_SUCCESS:-}" ] || bash "$LEP_ON_SUCCESS"
  exit "$status"
fi

RESTARTS=${SLURM_RESTART_COUNT:-0}
LOG=$LOG_ROOT/$SLURM_JOB_ID/attempt-$RESTARTS
mkdir -p "$LOG"
log() { echo "$*" | tee -a "$LOG/launch.txt"; }
log "lep-megatron pretrain: job $SLURM_JOB_ID attempt $RESTARTS (SLURM_RESTART_COUNT=$RESTARTS) on ${SLURM_JOB_NODELIST:-?}" \
  "at $(date '+%F %T'): launcher=$LAUNCHER logs=$LOG latest checkpoint: $(latest_checkpoint || true) overrides: $*"

# a time limit within the signal lead: SIGUSR1 at the start, requeue, again, forever
LEAD=${LEP_SIGNAL_LEAD:-600}
MARGIN=${LEP_SIGNAL_MARGIN:-120}
limit=$(squeue -h -j "$SLURM_JOB_ID" -o %l 2> /dev/null || true)
limit_s=$(to_seconds "$limit")
if [ -n "$limit_s" ] && [ "$limit_s" -le $((LEAD + MARGIN)) ]; then
  log "error: the job's time limit --time=$limit (${limit_s} s) is not longer than the preemption signal's lead" \
    "--signal=USR1@$LEAD (LEP_SIGNAL_LEAD=$LEAD) + ${MARGIN} s (LEP_SIGNAL_MARGIN; SLURM signals up to 60 s early):" \
    "the job would be signalled before training anything and requeue itself forever. Submit with a longer --time," \
    "or a shorter lead: sbatch --signal=USR1@SECONDS with LEP_SIGNAL_LEAD=SECONDS." >&2
  exit 2
fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
NNODES=${SLURM_JOB_NUM_NODES:-1}
GPUS=$(gpu_count "${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}")
if [ "$LAUNCHER" = srun ]; then
  TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / NNODES ))}
  RANKS_PER_TASK=1
else
  TASKS_PER_NODE=1
  RANKS_PER_TASK=${NPROC_PER_NODE:-$GPUS}
  [ "$RANKS_PER_TASK" -ge 1 ] || RANKS_PER_TASK=1  # no GPU in the allocation: a CPU partition
fi
# SLURM 22.05+: an srun inside the job does not inherit --cpus-per-task; without one, the node's CPUs shared
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-$(( ${SLURM_CPUS_ON_NODE:-1} / TASKS_PER_NODE ))}
[ "$CPUS_PER_TASK" -ge 1 ] || CPUS_PER_TASK=1
export SRUN_CPUS_PER_TASK=$CPUS_PER_TASK
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS_PER_TASK / RANKS_PER_TASK > 0 ? CPUS_PER_TASK / RANKS_PER_TASK : 1 ))}
WAIT=${LEP_TASK_WAIT:-120}
log "nodes=$NNODES gpus/node=$GPUS tasks/node=$TASKS_PER_NODE ranks/task=$RANKS_PER_TASK cpus/task=$CPUS_PER_TASK" \
  "OMP_NUM_THREADS=$OMP_NUM_THREADS rendezvous=$MASTER_ADDR:$MASTER_PORT time limit=${limit:-?} signal lead=${LEAD}s"

before=$(latest_checkpoint)
# no --kill-on-bad-exit: ranks that checkpointed exit 75 one after another, and srun would kill
# the later ones; --wait ends the step that long after the first task exited (a crash included)
set +e
if [ "$LAUNCHER" = srun ]; then
  # one task per rank; lep_megatron.parallel takes the ranks from SLURM_PROCID / SLURM_NTASKS;
  # SIGUSR1 ignored until the trainer installs its handler (as the torchrun agent does)
  srun --kill-on-bad-exit=0 --wait="$WAIT" bash -c 'trap "" USR1; exec "$@"' lep-rank \
    "$PYTHON" -m lep_megatron pretrain "$@" > "$LOG/pretrain.log" 2>&1
else
  srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0 --wait="$WAIT" \
    "${AGENT[@]}" --nnodes "$NNODES" --nproc-per-node "$RANKS_PER_TASK" --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID-$RESTARTS" \
    -m lep_megatron pretrain "$@" > "$LOG/pretrain.log" 2>&1
fi
status=$?
set -e
tail -n 5 "$LOG/pretrain.log" || true
after=$(latest_checkpoint)
case $status in
  0)
    log "training finished (attempt $RESTARTS, latest checkpoint $after)"
    [ -z "${LEP_ON_SUCCESS:-}" ] || bash "$LEP_ON_SUCCESS"
    exit 0 ;;
  "$EXIT_RESUMABLE")
    if [ -z "$after" ] || [ "$after" = "$before" ]; then
      log "error: training stopped to be resumed (exit $status) but wrote no new checkpoint (latest: ${after:-none});" \
        "not requeueing a job that makes no progress (signal lead too close to the start?)" >&2
      exit 1
    fi
    log "stopped at checkpoint $after (exit $status): requeueing job $SLURM_JOB_ID; attempt $((RESTARTS + 1)) resumes from it"
    # the job ends here (SLURM stops this script) and starts again once eligible
    if ! scontrol requeue "$SLURM_JOB_ID"; then
      log "error: scontrol requeue $SLURM_JOB_ID failed: submit the same command again to resume from $after" >&2
      exit "$status"
    fi
    sleep 60  # SLURM ends this script as it requeues the job
    exit 0 ;;
  *)
    log "error: training failed (exit $status), attempt $RESTARTS: see $LOG/pretrain.log" >&2
    exit "$status" ;;
esac
