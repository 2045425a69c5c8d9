"""GPU parity: tiny Llama/Mistral/Qwen2 converted to Megatron, logits in bf16 and fp32 on the GPU
against transformers (fp32 CPU reference; transformers' own bf16 GPU error as the floor).
Writes $OUT/gpu_parity.json. Run by tests/gpu/run_all.sh."""
import json
import os
import sys
import tempfile
from pathlib import Path

from lep_megatron.checkpoint import parity
from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.models.gpt import transformer_engine_available
from lep_megatron.models.tiny import make_hf_model


def main() -> None:
    out = Path(os.environ.get("OUT", "gpu_results"))
    out.mkdir(parents=True, exist_ok=True)
    results = {"transformer_engine": transformer_engine_available(), "checks": {}}
    work = Path(tempfile.mkdtemp())
    for arch in ("llama", "mistral", "qwen2"):
        make_hf_model(work / arch / "hf", arch, vocab_size=32005)
        run(ConvertConfig("hf-to-mcore", work / arch / "hf", work / arch / "mc"))
        for dtype in ("bfloat16", "float32"):
            res = work / arch / f"{dtype}.json"
            try:  # one rank, in this process (one GPU)
                parity.main(["--hf", str(work / arch / "hf"), "--mcore", str(work / arch / "mc"),
                             "--dtype", dtype, "--out", str(res)])
                results["checks"][f"{arch}/{dtype}"] = json.loads(res.read_text())
            except Exception as e:  # record and go on to the next check
                results["checks"][f"{arch}/{dtype}"] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
    (out / "gpu_parity.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v.get("layouts", v.get("error", "")[-300:]) for k, v in results["checks"].items()}, indent=1))
    failed = [k for k, v in results["checks"].items() if "error" in v]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
