"""Peak memory of each conversion direction, in one process: `python memory_worker.py WORK OUT_JSON`.

WORK holds `warmup/` and `model/` HF checkpoints. Both directions first run on the warm-up model
(imports and one-time set-up are then paid), then on the model with the peak RSS reset before
each (/proc/self/clear_refs): the growth reported is what the conversion itself holds.
"""
import json
import re
import sys
from pathlib import Path


def rss(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def peak_growth(fn) -> int:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = rss("VmRSS")
    fn()
    return rss("VmHWM") - before


def main() -> None:
    from lep_megatron.checkpoint.convert import ConvertConfig, run

    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    for name in ("warmup", "model"):
        growth = [peak_growth(lambda: run(ConvertConfig("hf-to-mcore", work / name, work / f"{name}-mc", tp=2))),
                  peak_growth(lambda: run(ConvertConfig("mcore-to-hf", work / f"{name}-mc", work / f"{name}-back")))]
    out.write_text(json.dumps({"hf_to_mcore": growth[0], "mcore_to_hf": growth[1]}))


if __name__ == "__main__":
    main()
