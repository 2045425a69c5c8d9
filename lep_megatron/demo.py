"""`lep-megatron demo` (make demo): the conversion round trip with a printed parity table."""
import json
import shutil
from pathlib import Path

import torch

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.checkpoint.hf_io import SafetensorsReader
from lep_megatron.common.app import stage_app
from lep_megatron.common.launch import torchrun
from lep_megatron.models.tiny import make_hf_model

LAYOUT_NAMES = {"1x1": "TP1", "2x1": "TP2", "1x2": "PP2", "2x2": "TP2xPP2"}


def roundtrip_identical(a_dir: Path, b_dir: Path) -> bool:
    a, b = SafetensorsReader(a_dir), SafetensorsReader(b_dir)
    return sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


def demo(out_dir: Path, archs, vocab_size: int, layouts: str, nproc: int) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    results = {}
    for arch in archs:
        d = out_dir / arch
        print(f"[{arch}] tiny HF model (vocab {vocab_size}) -> Megatron (padded for TP2) -> parity at {layouts}")
        make_hf_model(d / "hf", arch, vocab_size=vocab_size)
        run(ConvertConfig("hf-to-mcore", d / "hf", d / "mcore", tp=2))
        torchrun(nproc, ["-m", "lep_megatron.checkpoint.parity", "--hf", d / "hf", "--mcore", d / "mcore",
                         "--layouts", layouts, "--out", d / "parity.json"])
        parity = json.loads((d / "parity.json").read_text())["layouts"]
        run(ConvertConfig("mcore-to-hf", d / "mcore", d / "hf_export"))
        results[arch] = {"max_abs_diff": {k: v["max_abs_diff"] for k, v in parity.items()},
                         "roundtrip_bit_identical": roundtrip_identical(d / "hf", d / "hf_export")}
    (out_dir / "parity.json").write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict) -> str:
    layouts = list(next(iter(results.values()))["max_abs_diff"])
    head = ["model"] + [LAYOUT_NAMES.get(x, x) for x in layouts] + ["HF round trip"]
    rows = [head, ["---"] * len(head)]
    for arch, r in results.items():
        rows.append([arch] + [f"{r['max_abs_diff'][x]:.2e}" for x in layouts]
                    + ["bit-identical" if r["roundtrip_bit_identical"] else "DIFFERS"])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


@stage_app("demo")
def main(cfg) -> None:
    results = demo(Path(cfg.out_dir).absolute(), list(cfg.archs), cfg.vocab_size, cfg.layouts, cfg.nproc)
    print("\nmax |logits_megatron - logits_transformers| (fp32, CPU, gloo):")
    print(format_table(results))
    print(f"\nwritten to {Path(cfg.out_dir) / 'parity.json'}")
    ok = all(max(r["max_abs_diff"].values()) < 1e-4 and r["roundtrip_bit_identical"] for r in results.values())
    if not ok:
        raise SystemExit("parity check FAILED")
