"""The pipeline as SLURM jobs: one sbatch per step still to run, chained with afterok.

pretrain goes through launch/pretrain.sh (torchrun per node, requeue on preemption: its
SLURM_RESTART_COUNT-numbered attempts append to one job log); every other
step runs `lep-megatron pipeline action=step step=NAME <the same pipeline overrides>`, which
rebuilds the step list from the same config and runs that one step through the local runner
(so its state record is written as on a laptop)."""
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from lep_megatron.common.io import UserInputError
from lep_megatron.pipeline.steps import Step

PRETRAIN_SH = Path(__file__).resolve().parents[2] / "launch" / "pretrain.sh"


def sbatch_args(step: Step, run_dir: Path, slurm: Dict, dependencies: Sequence[str]) -> List[str]:
    # pretrain.sh takes the step's overrides (relative to the run dir); a step job takes the
    # pipeline's own command line, whose paths are relative to where it was submitted
    workdir = run_dir if step.stage == "pretrain" else Path.cwd()
    # run_dir/logs exists before the first sbatch (submit makes it); a requeued pretrain appends;
    # a failed job cancels the jobs waiting for it (else they stay pending, DependencyNeverSatisfied)
    args = ["sbatch", "--parsable", f"--job-name=lep-{step.name}", f"--chdir={workdir}",
            f"--output={run_dir}/logs/%x-%j.out", "--open-mode=append", "--kill-on-invalid-dep=yes",
            f"--time={slurm['time']}"]
    for key in ("partition", "account"):
        if slurm.get(key):
            args.append(f"--{key}={slurm[key]}")
    if dependencies:
        args.append("--dependency=afterok:" + ":".join(dependencies))
    args += list(slurm.get("extra") or [])
    return args


def step_job(step: Step, run_dir: Path, slurm: Dict, pipeline_overrides: Sequence[str],
             dependencies: Sequence[str]) -> List[str]:
    """The sbatch command line of one step."""
    args = sbatch_args(step, run_dir, slurm, dependencies)
    if step.stage == "pretrain":
        # pretrain.sh runs this script once training succeeded: the step's state record, so that a
        # resubmitted pipeline skips it (a requeued or failed job records nothing)
        cpus = slurm.get("pretrain_cpus_per_task")
        return args + [f"--export=ALL,LEP_ON_SUCCESS={on_success_script(step, run_dir)}",
                       f"--nodes={slurm['pretrain_nodes']}", f"--gpus-per-node={slurm['gpus_per_node']}",
                       *([f"--cpus-per-task={cpus}"] if cpus else []), str(PRETRAIN_SH)] + step.overrides
    inner = pipeline_command("step", step, pipeline_overrides)
    return args + ["--nodes=1", "--ntasks=1", f"--cpus-per-task={slurm['cpus_per_task']}",
                   f"--gpus-per-node={slurm['step_gpus']}", "--wrap", " ".join(shlex.quote(a) for a in inner)]


def pipeline_command(action: str, step: Step, pipeline_overrides: Sequence[str]) -> List[str]:
    """`lep-megatron pipeline action=ACTION step=NAME` with the submission's own overrides."""
    inner = [sys.executable, "-m", "lep_megatron", "pipeline", f"action={action}", f"step={step.name}"]
    return inner + [o for o in pipeline_overrides if not o.lstrip("+").startswith(("action=", "step=", "dry_run="))]


def on_success_script(step: Step, run_dir: Path) -> Path:
    return Path(run_dir) / "state" / f"{step.name}.on_success.sh"


def write_on_success(step: Step, run_dir: Path, pipeline_overrides: Sequence[str]) -> None:
    """The script pretrain.sh runs once training succeeded: `pipeline action=record` from the
    directory the pipeline was submitted from (its paths are relative to it)."""
    cmd = " ".join(shlex.quote(a) for a in pipeline_command("record", step, pipeline_overrides))
    path = on_success_script(step, run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/usr/bin/env bash\nset -e\ncd {shlex.quote(str(Path.cwd()))}\n{cmd}\n")


def submit(schedule: Sequence[tuple], run_dir: Path, slurm: Dict, pipeline_overrides: Sequence[str],
           dry_run: bool) -> Dict[str, str]:
    """sbatch every step that needs running; returns step -> job id (`<step>` placeholders on a
    dry run, which prints the commands and submits nothing)."""
    jobs: Dict[str, str] = {}
    (Path(run_dir) / "logs").mkdir(parents=True, exist_ok=True)
    for step, reason in schedule:
        if reason is None:
            print(f"{step.name}: done earlier, no job", flush=True)
            continue
        deps = [jobs[a] for a in step.after if a in jobs]
        cmd = step_job(step, run_dir, slurm, pipeline_overrides, deps)
        if dry_run:
            jobs[step.name] = f"<{step.name}>"
            print(f"{step.name} ({reason}) after [{', '.join(deps)}]:\n  {' '.join(shlex.quote(a) for a in cmd)}",
                  flush=True)
            continue
        if step.stage == "pretrain":
            write_on_success(step, run_dir, pipeline_overrides)
        jobs[step.name] = _sbatch(cmd)
        print(f"{step.name}: job {jobs[step.name]}" + (f" after {':'.join(deps)}" if deps else ""), flush=True)
    if jobs:  # the report once everything else has succeeded
        report = Step("report", "pipeline", [], output="report.md")
        cmd = sbatch_args(report, run_dir, slurm, list(jobs.values())) + [
            "--nodes=1", "--ntasks=1", "--wrap",
            " ".join(shlex.quote(a) for a in [sys.executable, "-m", "lep_megatron", "pipeline", "action=report",
                                              f"run_dir={run_dir}"])]
        if dry_run:
            print(f"report after all:\n  {' '.join(shlex.quote(a) for a in cmd)}", flush=True)
            jobs["report"] = "<report>"
        else:
            jobs["report"] = _sbatch(cmd)
            print(f"report: job {jobs['report']} after all", flush=True)
    return jobs


def _sbatch(cmd: List[str]) -> Optional[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserInputError("sbatch not found: action=slurm needs a SLURM login node (use action=run locally)")
    if proc.returncode != 0:
        raise UserInputError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip().split(";")[0]
