"""HF -> Megatron (TP2) -> HF on a synthetic checkpoint with Llama-3-8B shapes.

vocab 128,256, hidden 4096, 32 heads / 8 KV heads, SwiGLU 14,336, untied head, `--layers` full
layers (default 2), bf16. Each conversion runs in its own process so that its peak RSS is its own
(wait4: the largest of the process and any it forks).
    python benchmarks/convert.py [--layers 2] [--max-shard-gb 1] [--work /tmp/lep-bench-convert]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

LLAMA3_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                 rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
                 hidden_act="silu", torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128001)


def timed_child(args) -> dict:
    """Run `lep-megatron convert ARGS` in a child; its wall time and its own peak RSS (wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lep_megatron", "convert"] + args, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert {args[0]} failed")
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/lep-bench-convert")
    ap.add_argument("--max-shard-gb", type=float, default=1.0, help="mcore-to-hf output shard size")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    # in a child too: a child's ru_maxrss starts at its parent's RSS when forked (Linux keeps
    # the forked memory's high-water mark across exec), so this process stays small
    config = json.dumps(dict(LLAMA3_8B, num_hidden_layers=args.layers))
    nbytes = int(subprocess.run(
        [sys.executable, "-c", "import json, sys; from lep_megatron.models.tiny import write_random_checkpoint; "
         "print(write_random_checkpoint(sys.argv[1], json.loads(sys.argv[2])))", str(work / "hf"), config],
        check=True, capture_output=True, text=True).stdout.split()[-1])
    print(f"synthetic checkpoint: {nbytes / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s")
    to_mcore = timed_child(["hf-to-mcore", f"in_dir={work / 'hf'}", f"out_dir={work / 'mcore'}", "parallel.tp=2"])
    print("hf-to-mcore", to_mcore)
    to_hf = timed_child(["mcore-to-hf", f"in_dir={work / 'mcore'}", f"out_dir={work / 'hf_back'}",
                         f"max_shard_size_gb={args.max_shard_gb}"])
    print("mcore-to-hf", to_hf)

    import torch

    from lep_megatron.checkpoint.hf_io import SafetensorsReader

    a, b = SafetensorsReader(work / "hf"), SafetensorsReader(work / "hf_back")
    identical = sorted(a.keys()) == sorted(b.keys()) and all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
    gib = nbytes / 2**30
    write_result("convert", {
        "what": "HF -> Megatron TP2 -> HF, synthetic Llama-3-8B shapes, bf16, one process each way",
        "command": f"python benchmarks/convert.py --layers {args.layers} --max-shard-gb {args.max_shard_gb}",
        "mcore_to_hf_max_shard_gib": args.max_shard_gb,
        "layers": args.layers, "checkpoint_gib": round(gib, 3),
        "hf_to_mcore": dict(to_mcore, gib_per_s=round(gib / to_mcore["wall_s"], 3)),
        "mcore_to_hf": dict(to_hf, gib_per_s=round(gib / to_hf["wall_s"], 3)),
        "roundtrip_bit_identical": identical,
        # the 2 cores are shared: wall times mean little when this is far above 2
        "load_average_1m": round(os.getloadavg()[0], 1),
    })
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
