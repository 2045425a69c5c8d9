"""Step time and peak memory of the trainable-parameter policies, one CPU process, same model and
batch: embeddings_only (LEP's CPT), calibration (LoRA r8 on the first and last layers + embeddings
and head) and sft (LoRA r32 on every layer + head), through `lep-megatron pretrain`. Step time is
the median over the steps after the first; peak RSS is the run's own process.
    python benchmarks/lora.py [--steps 6] [--configs 50m]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

POLICIES = ("embeddings_only", "calibration", "sft")
# name: (hf config overrides, micro batch, sequence length)
CONFIGS = {
    "50m": (dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=8), 4, 256),
}


def megatron_run(ckpt: Path, out: Path, trainable: str, mbs: int, seq: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "lep_megatron", "pretrain", f"checkpoint={ckpt}", f"out_dir={out}",
           f"train.steps={steps}", f"train.seq_length={seq}", f"train.micro_batch_size={mbs}",
           f"train.global_batch_size={mbs}", "train.warmup_steps=1", "train.lr=1e-4",
           f"train.trainable={trainable}", "train.use_distributed_optimizer=false", "data.kind=synthetic"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}")
    steps_s = [json.loads(line)["step_s"] for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"step_s": round(statistics.median(steps_s), 4), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--configs", default="50m")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lep_megatron.checkpoint.convert import ConvertConfig, run

    results = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.configs.split(","):
            overrides, mbs, seq = CONFIGS[name]
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, **overrides))
            row = {"parameters": sum(p.numel() for p in model.parameters()), "micro_batch": mbs, "seq_length": seq}
            model.save_pretrained(str(tmp / name / "hf"))
            del model
            run(ConvertConfig("hf-to-mcore", tmp / name / "hf", tmp / name / "mc"))
            for policy in POLICIES:
                row[policy] = megatron_run(tmp / name / "mc", tmp / name / f"run_{policy}", policy, mbs, seq, args.steps)
                print(name, policy, row[policy], flush=True)
            for policy in POLICIES[1:]:
                row[f"{policy}_over_embeddings_only_step_time"] = round(
                    row[policy]["step_s"] / row["embeddings_only"]["step_s"], 3)
            results[name] = row
    write_result("lora", {
        "what": "step time / peak RSS of embeddings_only vs calibration vs sft (LoRA), fp32, one CPU process",
        "command": f"python benchmarks/lora.py --steps {args.steps} --configs {args.configs}",
        "configs": results,
        # other jobs on the machine skew the timings: the 1-minute load average before and after
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    })


if __name__ == "__main__":
    main()
