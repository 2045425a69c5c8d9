"""launch/pipeline.sh under a simulated SLURM login node: the job graph it prints on a dry run and
the afterok chain it submits (sbatch shimmed: it records its arguments and answers job ids), and
the pretrain job's success script that records the step so that a resubmission skips it."""
import os
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
