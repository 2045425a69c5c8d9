#!/usr/bin/env bash
#SBATCH --job-name=lep-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --output=logs/%x-%j.out
# Frozen-body continued pre-training on SLURM (one node or many) or on one machine without it.
#
#   sbatch [--nodes=N] launch/pretrain.sh checkpoint=CKPT out_dir=RUN data.dir=DATA [key=value ...]
#   LAUNCHER=srun sbatch --ntasks-per-node=8 launch/pretrain.sh ...   one task per GPU, ranks from SLURM
#   bash launch/pretrain.sh ...       no SLURM: torchrun here with NPROC_PER_NODE ranks (default: GPUs, else 1)
#   bash launch/pretrain.sh model=llama3_8b out_dir=RUN dry_run=true [cluster.nodes=N]   plan only, no launch
#
# Hydra overrides pass through unchanged. Default launcher: one srun task per node running
# torchrun, rendezvous on the first node of the allocation. Preemption / time limit: SLURM sends
# USR1 600 s before the end, the job requeues itself, and the requeued run continues from
# out_dir/checkpoints/latest (train.resume=true); set train.save_every so little is lost.
# LEP_ON_SUCCESS=script: run it once training succeeded (the pipeline records the step with it).
set -euo pipefail
PYTHON=${PYTHON:-python3}
LAUNCHER=${LAUNCHER:-torchrun}
# dry_run=true: print the config, the parallel plan and the memory estimate here; launch nothing
for arg in "$@"; do
  case "$arg" in dry_run=true | dry_run=True | ++dry_run=true | ++dry_run=True) exec "$PYTHON" -m lep_megatron pretrain "$@" ;; esac
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
LOG_DIR=${LOG_DIR:-logs/${SLURM_JOB_ID:-local-$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$LOG_DIR"
echo "lep-megatron pretrain: launcher=$LAUNCHER logs=$LOG_DIR overrides: $*" | tee "$LOG_DIR/launch.txt"

if [ -z "${SLURM_JOB_ID:-}" ]; then
  NPROC=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
  [ "${NPROC:-0}" -ge 1 ] || NPROC=1
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m lep_megatron pretrain "$@" \
    2>&1 | tee "$LOG_DIR/pretrain.log"
  status=${PIPESTATUS[0]}
  [ "$status" != 0 ] || [ -z "${LEP_ON_SUCCESS:-}" ] || bash "$LEP_ON_SUCCESS"
  exit "$status"
fi

requeue() {
  echo "USR1: requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint" | tee -a "$LOG_DIR/launch.txt"
  scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
NNODES=${SLURM_JOB_NUM_NODES:-1}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}
if [ "$LAUNCHER" = srun ]; then
  # one task per GPU; lep_megatron.parallel takes the ranks from SLURM_PROCID / SLURM_NTASKS
  srun --kill-on-bad-exit=1 "$PYTHON" -m lep_megatron pretrain "$@" > "$LOG_DIR/pretrain.log" 2>&1 &
else
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" \
    --nproc-per-node "$GPUS_PER_NODE" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "$SLURM_JOB_ID" -m lep_megatron pretrain "$@" > "$LOG_DIR/pretrain.log" 2>&1 &
fi
# wait in the background so that the USR1 trap runs while training does
wait $! || status=$?
tail -n 5 "$LOG_DIR/pretrain.log"
[ "${status:-0}" != 0 ] || [ -z "${LEP_ON_SUCCESS:-}" ] || bash "$LEP_ON_SUCCESS"
exit "${status:-0}"
