"""Machine description and result writing shared by the benchmark scripts."""
import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import megatron.core

        mcore = megatron.core.__version__
    except ImportError:
        mcore = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        rev = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "megatron_core": mcore,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "git_revision": rev, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(dict(payload, machine=machine_info()), indent=2))
    print(f"wrote {path}")
    return path
