"""launch/pipeline.sh on a SLURM login node: the job graph it prints on a dry run and the afterok
chain it submits (sbatch shimmed: it records its arguments and answers job ids), the pretrain
job's success script that records the step so that a resubmission skips it; then the same on the
real SLURM of tests/cluster/slurm_up.sh (marked `slurm`): SLURM's record of the held chain, a
resubmission skipping finished steps, a failing step cancelling every job that waits for it."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SBATCH = """#!/usr/bin/env bash
n=$(( $(cat "$SBATCH_LOG.count" 2>/dev/null || echo 100) + 1 ))
echo $n > "$SBATCH_LOG.count"
printf '%s\\n' "$n $*" >> "$SBATCH_LOG"
echo "$n;cluster"
"""
# step -> the steps its job waits for (afterok)
EXPECTED_AFTER = {
    "tokenizer": [], "tokenizer_report": ["tokenizer"], "init": ["tokenizer"], "convert": ["init"],
    "data": ["tokenizer"], "pretrain": ["convert", "data"], "export": ["pretrain"],
    "propagate_swap": ["export", "init"], "propagate_conversion": ["export", "init"],
    "eval_base": [], "eval_instruct": [], "eval_adapted_base": ["export"],
    "eval_lep_swap": ["propagate_swap"], "eval_lep_conversion": ["propagate_conversion"],
}


@pytest.fixture
def login_node(tmp_path):
    for name in ("base", "instruct"):
        (tmp_path / name).mkdir()
    (tmp_path / "ru.txt").write_text("текст\n")
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "sbatch").write_text(SBATCH)
    (shims / "sbatch").chmod(0o755)
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}", PYTHON=sys.executable, SLURM_CLUSTER_NAME="sim",
               SBATCH_LOG=str(tmp_path / "sbatch.log"), PYTHONWARNINGS="ignore")
    args = ["bash", str(ROOT / "launch" / "pipeline.sh"), "run_dir=run", "base=base", "instruct=instruct",
            "corpus=ru.txt", "heldout=ru.txt", "propagate.modes=[swap,conversion]", "slurm.partition=gpu", "+pretrain.train.lr=1e-4"]
    return tmp_path, env, args


def test_dry_run_prints_the_dependency_chain(login_node):
    tmp_path, env, args = login_node
    proc = subprocess.run(args + ["dry_run=true"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "sbatch.log").exists()  # nothing submitted
    for step, after in EXPECTED_AFTER.items():
        line = next(line for line in proc.stdout.splitlines() if line.startswith(f"{step} ("))
        assert line.endswith(f"after [{', '.join(f'<{a}>' for a in after)}]:"), line
    assert "launch/pretrain.sh" in proc.stdout and "--partition=gpu" in proc.stdout
    assert "report after all:" in proc.stdout and "15 jobs (dry run: nothing submitted)" in proc.stdout


def test_submission_chains_job_ids_with_afterok(login_node):
    tmp_path, env, args = login_node
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs, calls = {}, {}
    for line in (tmp_path / "sbatch.log").read_text().splitlines():
        job_id, argv = line.split(" ", 1)
        name = next(a for a in argv.split() if a.startswith("--job-name=")).split("=", 1)[1][len("lep-"):]
        jobs[name], calls[name] = job_id, argv
    for step, after in EXPECTED_AFTER.items():
        deps = [a.split("=", 1)[1] for a in calls[step].split() if a.startswith("--dependency=")]
        assert deps == ([f"afterok:{':'.join(jobs[a] for a in after)}"] if after else []), (step, calls[step])
    assert str(ROOT / "launch" / "pretrain.sh") in calls["pretrain"] and "train.lr=0.0001" in calls["pretrain"]
    assert "action=step step=eval_base" in calls["eval_base"] and "corpus=ru.txt" in calls["eval_base"]
    assert calls["report"].count(":") >= len(EXPECTED_AFTER)  # the report waits for every job


def test_pretrain_job_records_its_step_on_success(login_node):
    tmp_path, env, args = login_node
    assert subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300).returncode == 0
    pretrain_call = next(line for line in (tmp_path / "sbatch.log").read_text().splitlines() if "lep-pretrain" in line)
    script = Path(next(a for a in pretrain_call.split() if a.startswith("--export=")).split("LEP_ON_SUCCESS=", 1)[1])
    assert "action=record step=pretrain" in script.read_text()
    # the jobs before pretrain recorded themselves (action=step); then what launch/pretrain.sh does
    # once training succeeded, with the step's output in place
    for step, output in [("tokenizer", "tokenizer"), ("init", "init_hf"), ("convert", "init_mcore"),
                         ("data", "data"), ("pretrain", "pretrain")]:
        (tmp_path / "run" / output).mkdir()
        text = script.read_text().replace("step=pretrain", f"step={step}")
        proc = subprocess.run(["bash", "-c", text], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(args + ["dry_run=true"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "pretrain: done earlier, no job" in proc.stdout
    assert next(line for line in proc.stdout.splitlines() if line.startswith("export (")).endswith("after []:")


# --- the same submissions to the real SLURM of tests/cluster/slurm_up.sh (CPU nodes) ---

REAL = ["slurm.step_gpus=0", "slurm.gpus_per_node=0", "slurm.cpus_per_task=1", "slurm.pretrain_cpus_per_task=1",
        "slurm.time=00:20:00"]


def submitted_jobs(stdout: str) -> dict:
    """step -> job id from the submission's `step: job N [after A:B]` lines."""
    return {line.split(":")[0]: line.split("job ")[1].split()[0] for line in stdout.splitlines() if ": job " in line}


def real_login_node(login_node):
    tmp_path, env, args = login_node
    env = {k: v for k, v in env.items() if k != "SBATCH_LOG"}
    env["PATH"] = os.environ["PATH"]  # the real sbatch, not the shim
    args = [a for a in args if not a.startswith("slurm.partition=")] + REAL
    return tmp_path, env, args


@pytest.mark.slurm
def test_real_submission_chains_afterok_and_skips_finished_steps(login_node):
    """Held jobs (nothing runs): SLURM's own record of each job's afterok dependencies is the
    step graph; once the steps up to pretrain are recorded as finished, a resubmission submits only
    the rest, export depending on nothing."""
    from tests.cluster.slurm import cancel, job_info

    tmp_path, env, args = real_login_node(login_node)
    jobs = {}
    try:
        proc = subprocess.run(args + ["slurm.extra=['--hold']"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        jobs = submitted_jobs(proc.stdout)
        assert set(jobs) == set(EXPECTED_AFTER) | {"report"}, proc.stdout
        for step, after in EXPECTED_AFTER.items():
            info = job_info(jobs[step])
            assert info["JobState"] == "PENDING" and info["JobName"] == f"lep-{step}", info
            deps = set(re.findall(r"afterok:(\d+)", info["Dependency"]))
            assert deps == {jobs[a] for a in after}, (step, info["Dependency"])
        assert set(re.findall(r"afterok:(\d+)", job_info(jobs["report"])["Dependency"])) == {
            jobs[s] for s in EXPECTED_AFTER}
        pretrain = job_info(jobs["pretrain"])
        assert pretrain["Command"].endswith("launch/pretrain.sh") and pretrain["TresPerNode"] == "gres:gpu:0"
    finally:
        for job in jobs.values():
            cancel(job)
    # the steps before pretrain recorded themselves; pretrain.sh's success script records pretrain
    script = tmp_path / "run" / "state" / "pretrain.on_success.sh"
    for step, output in [("tokenizer", "tokenizer"), ("init", "init_hf"), ("convert", "init_mcore"),
                         ("data", "data"), ("pretrain", "pretrain")]:
        (tmp_path / "run" / output).mkdir()
        text = script.read_text().replace("step=pretrain", f"step={step}")
        proc = subprocess.run(["bash", "-c", text], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        proc = subprocess.run(args + ["slurm.extra=['--hold']"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        jobs = submitted_jobs(proc.stdout)
        for step in ("tokenizer", "init", "convert", "data", "pretrain"):
            assert f"{step}: done earlier, no job" in proc.stdout and step not in jobs
        assert "export" in jobs and job_info(jobs["export"])["Dependency"] == "(null)"
        assert set(re.findall(r"afterok:(\d+)", job_info(jobs["propagate_swap"])["Dependency"])) == {jobs["export"]}
    finally:
        for job in jobs.values():
            cancel(job)


@pytest.mark.slurm
def test_real_failing_step_cancels_its_dependants(login_node):
    """The first step fails (its base model is an empty directory): every job waiting for it,
    directly or not, is cancelled by SLURM (DependencyNeverSatisfied, not left pending), the
    failing job's log says why."""
    from tests.cluster.slurm import cancel, wait_finished

    tmp_path, env, args = real_login_node(login_node)
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = submitted_jobs(proc.stdout)
    try:
        infos = {step: wait_finished(job, 180) for step, job in jobs.items()}
    finally:
        for job in jobs.values():
            cancel(job)
    log = (tmp_path / "run" / "logs" / f"lep-tokenizer-{jobs['tokenizer']}.out").read_text()
    assert infos["tokenizer"]["JobState"] == "FAILED", (infos["tokenizer"], log[-3000:])
    assert "lep-megatron pipeline: error: step tokenizer" in log and "no tokenizer.json" in log, log[-3000:]
    downstream = [s for s in jobs if s not in ("tokenizer", "eval_base", "eval_instruct")]
    for step in downstream:
        assert infos[step]["JobState"] == "CANCELLED" and infos[step]["Reason"] == "DependencyNeverSatisfied", (
            step, infos[step])
    assert not (tmp_path / "run" / "state" / "tokenizer.json").exists()
