"""benchmarks/cpt.py's GPU path, checked without a GPU: the 1b config and --device cuda are
accepted as arguments, and a machine without CUDA gets a clear refusal (the measurement itself
runs on a lent GPU: `python benchmarks/cpt.py --device cuda --configs 1b`)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpt.py"


def cpt(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the benchmark would run")
def test_cuda_path_without_a_gpu_is_refused_clearly():
    proc = cpt("--device", "cuda", "--configs", "1b")
    assert proc.returncode == 2 and "--device cuda: no CUDA device visible to torch" in proc.stderr


def test_unknown_config_is_refused():
    proc = cpt("--configs", "tiny,2b")
    assert proc.returncode == 2 and "unknown ['2b']; choose from ['1b', '50m', 'tiny']" in proc.stderr
