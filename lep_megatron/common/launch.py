"""Start a local multi-process job with torchrun (tests, demo, single-node stages)."""
import os
import socket
import subprocess
import sys
from typing import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: Sequence, timeout: int = 1800, threads_per_rank: int = 1) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc ARGS` with this interpreter; raises RuntimeError with the
    ranks' output when it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port())] + [str(a) for a in args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_rank), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc
