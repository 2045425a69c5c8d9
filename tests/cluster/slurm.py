"""Helpers of the tests marked `slurm`: submit to the cluster of tests/cluster/slurm_up.sh, read a
job's record, wait for a state. Its nodes have no GPU: jobs go with --gpus-per-node=0 and a
--cpus-per-task the nodes have (node_cpus())."""
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def node_cpus() -> int:
    """The CPUs of the smallest node."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%c"], capture_output=True, text=True, check=True).stdout
    return min(int(c) for c in out.split())


def sbatch(args: Sequence[str], cwd: Path, env: Dict[str, str], wait: bool = False, timeout: float = 300) -> str:
    """Submit; returns the job id (with wait=True once the job ended, whatever its exit code)."""
    cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    job = proc.stdout.strip().split(";")[0].splitlines()[0] if proc.stdout.strip() else ""
    if not job.isdigit():
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return job


def job_info(job: str) -> Dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...; kept MinJobAge=3600 s)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(condition: Callable[[], Optional[object]], timeout: float, what: str, interval: float = 0.5):
    """Poll until condition() is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_finished(job: str, timeout: float = 300) -> Dict[str, str]:
    """The job's record once it reached a final state."""
    return wait_for(lambda: (lambda i: i if i.get("JobState") in FINISHED else None)(job_info(job)), timeout,
                    f"job {job} to finish")


def cancel(job: str) -> None:
    subprocess.run(["scancel", job], capture_output=True)
