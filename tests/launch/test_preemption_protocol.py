"""launch/pretrain.sh's side of the preemption contract on the real SLURM of
tests/cluster/slurm_up.sh, with tests/launch/fake_trainer.py in place of the trainer (a copy of the
script launching it instead of `-m lep_megatron pretrain`; no model, seconds per attempt):
SIGUSR1 sent to the job's steps (what `--signal=USR1@N` without `B:` does) reaches every rank on
both nodes through torchrun's agent and through srun tasks; exit 75 requeues the job, whose next
attempt (SLURM_RESTART_COUNT=1) keeps its own logs and runs LEP_ON_SUCCESS once it finishes; a
stop without a new checkpoint, a crashed rank and a time limit within the signal lead fail the
job instead of requeueing it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.slurm import cancel, job_info, node_cpus, sbatch, wait_finished, wait_for

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).resolve().parent / "fake_trainer.py"


@pytest.fixture
def script(tmp_path):
    """launch/pretrain.sh launching the fake trainer (both launchers' lines)."""
    text = (ROOT / "launch" / "pretrain.sh").read_text()
    launch = '-m lep_megatron pretrain "$@" > "$LOG/pretrain.log"'
    assert text.count(launch) == 2
    path = tmp_path / "pretrain_fake.sh"
    path.write_text(text.replace(launch, f'{FAKE} "$@" > "$LOG/pretrain.log"'))
    return path


def submit(tmp_path, script, launcher, mode, sbatch_args=(), **env):
    out = tmp_path / "run"
    on_success = tmp_path / "on_success.sh"
    on_success.write_text(f"echo ran >> {tmp_path / 'succeeded'}\n")
    nodes, tasks = (2, 1) if launcher == "torchrun" else (1, 2)
    job_env = dict(os.environ, PYTHON=sys.executable, LAUNCHER=launcher, FAKE_MODE=mode, OMP_NUM_THREADS="1",
                   LEP_ON_SUCCESS=str(on_success), **env)
    job = sbatch([f"--nodes={nodes}", f"--ntasks-per-node={tasks}", f"--cpus-per-task={max(1, node_cpus() // tasks)}",
                  "--gpus-per-node=0", "--time=20", *sbatch_args, script, f"out_dir={out}", "checkpoint=unused"],
                 cwd=tmp_path, env=job_env)
    return job, out


def wait_ready(out: Path, job: str, attempt: int = 0):
    wait_for(lambda: all((out / f"ready-{attempt}-{r}").exists() for r in (0, 1))
             or job_info(job).get("JobState") in ("FAILED", "COMPLETED", "CANCELLED"), 120,
             f"both ranks of attempt {attempt} to install their SIGUSR1 handler")
    assert all((out / f"ready-{attempt}-{r}").exists() for r in (0, 1)), diagnostics(out.parent, job)


def diagnostics(tmp_path: Path, job: str) -> str:
    parts = [str(job_info(job))]
    for path in sorted(tmp_path.glob(f"lep-pretrain-{job}.out")) + sorted(tmp_path.glob(f"logs/{job}/*/*")):
        parts.append(f"--- {path}\n{path.read_text()[-3000:]}")
    events = tmp_path / "run" / "events"
    parts.append(events.read_text() if events.exists() else "no events")
    return "\n".join(parts)


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_signal_checkpoints_requeues_and_resumes(tmp_path, script, launcher):
    job, out = submit(tmp_path, script, launcher, "train")
    try:
        wait_ready(out, job)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)  # the job steps, not the batch shell
        # exit 75 -> scontrol requeue: pending again, started once its credential expired (30 s here)
        wait_for(lambda: job_info(job).get("Restarts") == "1", 120, "the job to be requeued")
        info = wait_finished(job, 180)
    finally:
        cancel(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", diagnostics(tmp_path, job)
    events = (out / "events").read_text()
    nodes = {"n1", "n2"} if launcher == "torchrun" else {"n1"}
    got = [line for line in events.splitlines() if line.startswith("attempt 0") and "got SIGUSR1" in line]
    assert len(got) == 2 and {line.split()[5].rstrip(":") for line in got} == nodes, events
    # a signal before the handler is ignored, not fatal (the agent's / the srun task's disposition)
    assert all((out / f"ready-0-{r}").read_text().startswith("ignored") for r in (0, 1))
    assert "attempt 1 rank 0" in events and "resumed from step 1" in events
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    logs = tmp_path / "logs" / job
    assert sorted(p.name for p in logs.iterdir()) == ["attempt-0", "attempt-1"]
    first = (logs / "attempt-0" / "launch.txt").read_text()
    assert "stopped at checkpoint step_0000001 (exit 75): requeueing" in first
    assert "SLURM_RESTART_COUNT=1" in (logs / "attempt-1" / "launch.txt").read_text()
    output = (tmp_path / f"lep-pretrain-{job}.out").read_text()  # both attempts appended to it
    assert "attempt 0 (SLURM_RESTART_COUNT=0)" in output and "attempt 1 (SLURM_RESTART_COUNT=1)" in output
    assert (tmp_path / "succeeded").read_text() == "ran\n"  # LEP_ON_SUCCESS once, after the last attempt


def test_stop_without_new_checkpoint_fails_instead_of_requeueing(tmp_path, script):
    job, out = submit(tmp_path, script, "torchrun", "no_progress")
    try:
        wait_ready(out, job)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        info = wait_finished(job, 120)
    finally:
        cancel(job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", diagnostics(tmp_path, job)
    assert "wrote no new checkpoint" in (tmp_path / f"lep-pretrain-{job}.out").read_text()
    assert not (tmp_path / "succeeded").exists()


def test_crashed_rank_fails_the_job_and_stops_the_other_node(tmp_path, script):
    """Rank 1 (node n2) exits 3; rank 0 (n1) would wait 120 s: srun ends the step LEP_TASK_WAIT
    seconds after the first task exited."""
    job, out = submit(tmp_path, script, "torchrun", "crash", LEP_TASK_WAIT="5")
    try:
        info = wait_finished(job, 100)
    finally:
        cancel(job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", diagnostics(tmp_path, job)
    assert "no signal: finished" not in (out / "events").read_text()
    assert "training failed" in (tmp_path / f"lep-pretrain-{job}.out").read_text()
    assert not (tmp_path / "succeeded").exists()


def test_time_limit_within_the_signal_lead_is_refused(tmp_path, script):
    """--time=10 with --signal=USR1@600: SLURM would signal it at its start, forever; refused before launch."""
    job, out = submit(tmp_path, script, "torchrun", "train", sbatch_args=["--time=10"])
    info = wait_finished(job, 60)
    output = (tmp_path / f"lep-pretrain-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", diagnostics(tmp_path, job)
    assert "--time=10:00" in output and "--signal=USR1@600" in output and "LEP_SIGNAL_LEAD" in output
    assert not (out / "events").exists()
