"""Process exit codes shared by the trainer and the launchers (launch/pretrain.sh,
lep_megatron.common.agent).

EXIT_RESUMABLE: a rank stopped early on purpose, after the checkpoint of the step it reached was
complete on every rank: on SIGUSR1 (SLURM's `--signal=USR1@N` before the time limit or a
preemption), on SIGTERM, or when its wall-clock budget (train.exit_duration_minutes) ran out.
Every rank exits with it. The run is not finished; rerunning the same command resumes from
out_dir/checkpoints/latest. torchrun's agent (through lep_megatron.common.agent) passes it on,
and launch/pretrain.sh answers it under SLURM with `scontrol requeue` (and does not run
LEP_ON_SUCCESS). 75 is EX_TEMPFAIL of sysexits.h: "temporary failure, try again later".
"""

EXIT_RESUMABLE = 75
