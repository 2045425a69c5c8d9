"""lep_megatron.common.agent: torchrun that ignores SIGUSR1 and passes EXIT_RESUMABLE on (workers
are tests/launch/fake_trainer.py; no SLURM, no model)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lep_megatron.common.agent import failure_exit_code
from lep_megatron.common.exit_codes import EXIT_RESUMABLE
from lep_megatron.common.launch import free_port

WORKER = Path(__file__).resolve().parent / "fake_trainer.py"


def agent(tmp_path, mode, nproc=2, **kwargs):
    cmd = [sys.executable, "-m", "lep_megatron.common.agent", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), str(WORKER), f"out_dir={tmp_path}"]
    env = dict(os.environ, FAKE_MODE=mode, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_exit_code_mapping_rule():
    assert EXIT_RESUMABLE == 75
    assert failure_exit_code([75]) == 75
    assert failure_exit_code([75, -15]) == 75  # the agent stopped the other worker after the first exit
    assert failure_exit_code([75, 3]) is None and failure_exit_code([3]) is None
    assert failure_exit_code([-9]) is None and failure_exit_code([1, 75]) is None


@pytest.mark.parametrize("codes,expected", [("75,75", 75), ("75,sleep", 75), ("3,75", None),
                                            ("0,0", 0)])
def test_agent_exit_code(tmp_path, codes, expected):
    proc = agent(tmp_path, f"exit:{codes}")
    out, _ = proc.communicate(timeout=120)
    if expected is None:  # a real failure: torchrun's report and its exit code, never 75
        assert proc.returncode not in (0, EXIT_RESUMABLE), out[-3000:]
        assert "ChildFailedError" in out or "FAILED" in out, out[-3000:]
    else:
        assert proc.returncode == expected, out[-3000:]


def test_agent_survives_sigusr1_and_workers_handle_it(tmp_path):
    """SIGUSR1 to the agent leaves it running (torchrun's would die of it); the workers start with
    SIGUSR1 ignored (inherited) and, once their handler is in, stop with 75 on it: the agent exits 75."""
    proc = agent(tmp_path, "no_progress")
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"ready-0-{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        ready = [(tmp_path / f"ready-0-{r}").read_text().split() for r in (0, 1)]
        assert [disposition for disposition, _ in ready] == ["ignored", "ignored"]
        proc.send_signal(signal.SIGUSR1)  # the agent alone: it must not die of it
        time.sleep(1)
        assert proc.poll() is None
        for _, pid in ready:  # as SLURM does: every process of the step (torchrun's workers have their own sessions)
            os.kill(int(pid), signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_RESUMABLE, out[-3000:]
    events = (tmp_path / "events").read_text()
    assert events.count("got SIGUSR1") == 2, events
