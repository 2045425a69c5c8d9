"""Preemption and kills under the real SLURM of tests/cluster/slurm_up.sh (2 gloo ranks on one CPU node):
a job whose time limit comes close during training gets SLURM's `--signal=USR1@120` in its
training step, checkpoints the step it reached, exits 75, requeues itself (SLURM_RESTART_COUNT=1
in its second attempt's log), resumes and finishes; its per-step losses equal an uninterrupted
torchrun run's bit for bit and no step is trained twice.

The time limit is brought close with `scontrol update TimeLimit=` once training runs (a job
submitted with a few minutes would be signalled during start-up, which launch/pretrain.sh
refuses); slurmctld then sends the signal at its next time-limit check (every 30 s)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.common.launch import torchrun
from lep_megatron.models.tiny import make_hf_model
from tests.cluster.slurm import cancel, job_info, sbatch, wait_finished, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.megatron, pytest.mark.primary_only, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
STEPS = 2000  # long enough that the signal lands mid-training (~40-80 ms a step here)


def overrides(ckpt: Path, out: Path) -> list:
    return [f"checkpoint={ckpt}", f"out_dir={out}", "data.kind=synthetic", f"train.steps={STEPS}",
            "train.seq_length=16", "train.micro_batch_size=1", "train.global_batch_size=4", "train.warmup_steps=10",
            "train.lr=1e-2", "train.log_every=200", "train.tensorboard=false"]


def logs(tmp: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(tmp.rglob("*.txt")) + sorted(tmp.rglob("*.log")))


def steps_done(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(tmp_path):
    make_hf_model(tmp_path / "hf", "llama", vocab_size=131, layers=2)
    run(ConvertConfig("hf-to-mcore", tmp_path / "hf", tmp_path / "mc"))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, NPROC_PER_NODE="2", OMP_NUM_THREADS="1", LEP_SIGNAL_LEAD="120",
               LOG_DIR=str(tmp_path / "logs"))
    job = sbatch(["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=30", "--signal=USR1@120",
                  f"--output={tmp_path}/job-%j.out", ROOT / "launch" / "pretrain.sh"] + overrides(tmp_path / "mc", out),
                 cwd=tmp_path, env=env)
    try:
        metrics = out / "metrics.jsonl"
        wait_for(lambda: steps_done(metrics) >= 5, 300, f"the first steps: {logs(tmp_path)}")
        # the end of the job 1-2 minutes from now: within the 120 s lead, so the signal is due at once
        used = job_info(job)["RunTime"]
        h, m, s = (int(x) for x in used.split("-")[-1].rjust(8, "0").split(":"))
        subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={math.ceil((h * 3600 + m * 60 + s) / 60) + 1}"],
                       check=True)
        wait_for(lambda: job_info(job)["Restarts"] == "1", 240, f"the requeue: {logs(tmp_path)}")
        stopped_at = steps_done(metrics)
        assert 5 <= stopped_at < STEPS, "the signal must land mid-training"
        # the second attempt (eligible ~30 s after the requeue: slurm_up.sh's cred_expire) is not signalled again
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=30"], check=True)
        assert wait_finished(job, 600)["JobState"] == "COMPLETED", logs(tmp_path)
    finally:
        cancel(job)

    first = (tmp_path / "logs" / job / "attempt-0" / "pretrain.log").read_text()
    assert "received SIGUSR1" in first and "exit code 75" in first
    assert "SLURM_RESTART_COUNT=1" in (tmp_path / "logs" / job / "attempt-1" / "launch.txt").read_text()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # none lost, none trained twice

    torchrun(2, ["-m", "lep_megatron", "pretrain"] + overrides(tmp_path / "mc", tmp_path / "straight"), timeout=900)
    straight = [json.loads(line)["loss"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == straight


def test_kill_mid_save_keeps_the_previous_checkpoint(tmp_path):
    """`scancel --signal=KILL --full` while a checkpoint is being written: `latest` still names the
    previous, complete checkpoint; `scontrol requeue` then restarts the job, which resumes from it
    and finishes; every loss it recorded (the steps after that checkpoint trained twice) equals an
    uninterrupted run's."""
    make_hf_model(tmp_path / "hf", "llama", vocab_size=32000, layers=2)  # big tables: saves take a while
    run(ConvertConfig("hf-to-mcore", tmp_path / "hf", tmp_path / "mc"))
    out = tmp_path / "run"
    steps = 12
    args = [f"checkpoint={tmp_path / 'mc'}", f"out_dir={out}", "data.kind=synthetic", f"train.steps={steps}",
            "train.save_every=2", "train.keep_last=0", "train.seq_length=16", "train.global_batch_size=4",
            "train.warmup_steps=1", "train.lr=1e-2", "train.tensorboard=false"]
    env = dict(os.environ, PYTHON=sys.executable, NPROC_PER_NODE="2", OMP_NUM_THREADS="1", LOG_DIR=str(tmp_path / "logs"))
    job = sbatch(["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=30", f"--output={tmp_path}/job-%j.out",
                  ROOT / "launch" / "pretrain.sh"] + args, cwd=tmp_path, env=env)
    checkpoints = out / "checkpoints"
    try:
        def second_save_started():
            return checkpoints.is_dir() and any(p.name.endswith(".partial") and int(p.name[5:12]) > 2
                                                for p in checkpoints.iterdir())

        wait_for(second_save_started, 300, f"the second save: {logs(tmp_path)}", interval=0.02)
        subprocess.run(["scancel", "--signal=KILL", "--full", job], check=True)
        wait_finished(job, 120)
        latest = (checkpoints / "latest").read_text().strip()
        partial = [p.name for p in checkpoints.iterdir() if p.name.endswith(".partial")]
        assert partial and latest < partial[0], (latest, partial)
        assert (checkpoints / latest / "lep_model.json").is_file()
        subprocess.run(["scontrol", "requeue", job], check=True)
        wait_for(lambda: job_info(job)["Restarts"] == "1", 120, "the requeue")
        assert wait_finished(job, 600)["JobState"] == "COMPLETED", logs(tmp_path)
    finally:
        cancel(job)
    assert (checkpoints / "latest").read_text().strip() == f"step_{steps:07d}"
    assert "resumed from" in (tmp_path / "logs" / job / "attempt-1" / "pretrain.log").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records} == set(range(1, steps + 1))
    torchrun(2, ["-m", "lep_megatron", "pretrain"] + [a.replace(str(out), str(tmp_path / "straight")) for a in args],
             timeout=900)
    straight = {json.loads(line)["step"]: json.loads(line)["loss"]
                for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()}
    assert all(r["loss"] == straight[r["step"]] for r in records)
