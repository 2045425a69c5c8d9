#!/usr/bin/env bash
# The whole LEP pipeline as SLURM jobs chained with afterok (run it on a login node):
#
#   launch/pipeline.sh recipe=llama3_8b_ru run_dir=RUN base=HF_BASE instruct=HF_INSTRUCT \
#       corpus='DATA/*.jsonl' heldout=HELDOUT.txt eval.data_dir=DARUMERU [key=value ...]
#   launch/pipeline.sh ... dry_run=true     print the job graph, submit nothing
#
# One job per step still to run (finished steps are skipped; force=[step] redoes one and what
# reads it); pretrain goes through launch/pretrain.sh, the others run
# `lep-megatron pipeline action=step step=NAME` with the same overrides. Hydra overrides pass
# through unchanged; slurm.* keys set partition, account, time, nodes and GPUs.
set -euo pipefail
PYTHON=${PYTHON:-python3}
exec "$PYTHON" -m lep_megatron pipeline action=slurm "$@"
