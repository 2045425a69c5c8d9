"""SIGKILL during a checkpoint save (2 gloo ranks under torchrun): `latest` still names the previous
checkpoint, which loads, and a restarted run resumes from it and ends with the losses of an
uninterrupted run. The kill comes from this test process, which watches for the `.partial`
directory of the next save and kills torchrun and every process under it at once (torchrun starts
its ranks in sessions of their own, so killing its process group would leave them running)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.common.launch import free_port
from lep_megatron.models.tiny import make_hf_model

pytestmark = [pytest.mark.megatron, pytest.mark.slow]


def pretrain(ckpt: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "lep_megatron", "pretrain", f"checkpoint={ckpt}", f"out_dir={out}", "data.kind=synthetic",
           "train.steps=6", "train.save_every=2", "train.seq_length=16", "train.micro_batch_size=1",
           "train.global_batch_size=4", "train.warmup_steps=1", "train.lr=1e-2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun, its ranks, their helpers)."""
    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs[1:], timeout=30)  # not the root: Popen reaps it (and reads its status)


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return output


def losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.primary_only
def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    make_hf_model(tmp_path / "hf", "llama", vocab_size=131, layers=2)
    run(ConvertConfig("hf-to-mcore", tmp_path / "hf", tmp_path / "mc"))
    finish(pretrain(tmp_path / "mc", tmp_path / "straight"))

    out = tmp_path / "killed"
    checkpoints = out / "checkpoints"
    partial = checkpoints / "step_0000004.partial"
    proc = pretrain(tmp_path / "mc", out)
    deadline = time.monotonic() + 600
    while not partial.exists():
        assert proc.poll() is None, f"the run ended before saving step 4:\n{proc.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    kill_tree(proc.pid)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert (checkpoints / "latest").read_text().strip() == "step_0000002"
    assert not (checkpoints / "step_0000004").exists()

    output = finish(pretrain(tmp_path / "mc", out))
    assert f"resumed from {checkpoints / 'step_0000002'} (step 2)" in output
    straight, resumed = losses(tmp_path / "straight"), losses(out)
    assert [resumed[s] for s in range(3, 7)] == [straight[s] for s in range(3, 7)]
    assert (checkpoints / "latest").read_text().strip() == "step_0000006"
