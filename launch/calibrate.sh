#!/usr/bin/env bash
#SBATCH --job-name=lep-calibrate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@600
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# Post-LEP calibration (or SFT) with LoRA on SLURM: launch/pretrain.sh with finetune=calibration
# (the paper's settings, conf/pretrain_groups/finetune/) unless a finetune= is given.
#
#   sbatch launch/calibrate.sh checkpoint=LEP_CKPT out_dir=RUN data.dir=SFT_DATA [key=value ...]
#   sbatch launch/calibrate.sh finetune=sft checkpoint=... out_dir=... data.dir=...
#
# Everything else (launchers, CPU partitions, requeue on preemption, logs per attempt, resume,
# dry_run=true) is pretrain.sh's; keep this header's --signal, --open-mode and --output as its.
set -euo pipefail
# sbatch runs a copy of this script: pretrain.sh is found beside the original, else under the
# submission directory (submit from the repository root), else set LEP_LAUNCH_DIR
HERE=${LEP_LAUNCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
[ -f "$HERE/pretrain.sh" ] || HERE=${SLURM_SUBMIT_DIR:-.}/launch
if [ ! -f "$HERE/pretrain.sh" ]; then
  echo "launch/calibrate.sh: launch/pretrain.sh not found; submit from the repository root or set LEP_LAUNCH_DIR" >&2
  exit 2
fi
finetune=finetune=calibration
for arg in "$@"; do
  case "$arg" in finetune=* | +finetune=* | ++finetune=*) finetune= ;; esac
done
exec bash "$HERE/pretrain.sh" ${finetune:+"$finetune"} "$@"
