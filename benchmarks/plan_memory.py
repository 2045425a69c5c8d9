"""The planner's memory estimate against measured memory: the trainer (`lep_megatron.training.
trainer.train`, one CPU process, fp32) runs a few steps of each config; the peak resident memory
of the steps after the first (the kernel's high-water mark, reset once the optimizer state exists)
minus the process's memory before the model was built is compared with
`plan.estimate_memory(..., device="cpu")`. glibc is told to return large blocks to the system at
once (MALLOC_MMAP_THRESHOLD_), so resident memory follows live tensors.
    python benchmarks/plan_memory.py [--configs tiny,50m] [--recompute none,selective,full] [--out FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from cpt import CONFIGS  # noqa: E402  (the same tiny and ~50M configs as the frozen-vs-full benchmark)

STEPS = 3
# beyond its tensors a training process holds about this much more after its first step (thread
# pools, gloo buffers, autograd and python objects): measured on the tiny config, whose tensors
# are a few MiB; it stands for PlanRequest.overhead_gib on a CPU
CPU_OVERHEAD_MIB = 32
# agreement asked of the estimate: within this share of the measurement, or this many MiB
REL_TOLERANCE, ABS_TOLERANCE_MIB = 0.10, 16


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _HighWater:
    """Step hook: resets the peak RSS after step 1 (optimizer state allocated) and reads it at
    the last step (before the final checkpoint save)."""

    every = 1

    def __init__(self, steps: int):
        self.steps, self.peak_kib = steps, None

    def __call__(self, step, model):
        if step == 1:
            Path("/proc/self/clear_refs").write_text("5")
        if step == self.steps:
            self.peak_kib = _status_kib("VmHWM")
        return {}


def worker(ckpt: str, out_dir: str, mbs: int, seq: int, recompute: str, result: str) -> None:
    from lep_megatron.checkpoint.megatron_io import CheckpointMeta
    from lep_megatron.parallel import init_distributed
    from lep_megatron.training.batches import rank_batches
    from lep_megatron.training.plan import PlanRequest, estimate_memory
    from lep_megatron.training.trainer import TrainConfig, train

    cfg = TrainConfig(checkpoint=ckpt, out_dir=out_dir, steps=STEPS, seq_length=seq, micro_batch_size=mbs,
                      global_batch_size=mbs, warmup_steps=1, lr=1e-4, recompute=recompute)
    init_distributed(1, 1, cfg.seed)
    baseline_kib = _status_kib("VmRSS")
    meta = CheckpointMeta.read(ckpt)
    hook = _HighWater(STEPS)
    train(cfg, rank_batches(meta.vocab_size, mbs, mbs, seq), hooks=[hook])
    req = PlanRequest(meta.shape, num_gpus=1, gpu_memory_gib=1024, seq_length=seq, global_batch_size=mbs,
                      dtype=cfg.dtype, device="cpu", overhead_gib=CPU_OVERHEAD_MIB / 1024)
    est = estimate_memory(req, 1, 1, 1, mbs, recompute)
    Path(result).write_text(json.dumps({
        "measured_mib": round((hook.peak_kib - baseline_kib) / 1024, 1),
        "estimate_mib": round(est.total / 2**20, 1),
        "estimate_parts_mib": {k: round(v / 2**20, 1) for k, v in vars(est).items()},
        "baseline_rss_mib": round(baseline_kib / 1024, 1)}))


def measure(configs, recomputes, tmp: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lep_megatron.checkpoint.convert import ConvertConfig, run

    results = {}
    for name in configs:
        overrides, mbs, seq = CONFIGS[name]
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, **overrides)).save_pretrained(str(tmp / name / "hf"))
        run(ConvertConfig("hf-to-mcore", tmp / name / "hf", tmp / name / "mc"))
        for recompute in recomputes:
            out = tmp / name / f"{recompute}.json"
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
            subprocess.run([sys.executable, __file__, "--worker", str(tmp / name / "mc"),
                            str(tmp / name / f"run_{recompute}"), str(mbs), str(seq), recompute, str(out)],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            row = json.loads(out.read_text())
            measured, estimate = row["measured_mib"], row["estimate_mib"]
            row["estimate_over_measured"] = round(estimate / measured, 3)
            row["agrees"] = abs(estimate - measured) <= max(REL_TOLERANCE * measured, ABS_TOLERANCE_MIB)
            results[f"{name}/{recompute}"] = dict(row, micro_batch=mbs, seq_length=seq)
            print(name, recompute, row, flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,50m")
    ap.add_argument("--recompute", default="none,selective,full")
    ap.add_argument("--out", help="write the rows to this JSON file instead of benchmarks/results/")
    ap.add_argument("--worker", nargs=6, metavar=("CKPT", "OUT_DIR", "MBS", "SEQ", "RECOMPUTE", "RESULT"))
    args = ap.parse_args()
    if args.worker:
        ckpt, out_dir, mbs, seq, recompute, result = args.worker
        return worker(ckpt, out_dir, int(mbs), int(seq), recompute, result)
    with tempfile.TemporaryDirectory() as tmp:
        results = measure(args.configs.split(","), args.recompute.split(","), Path(tmp))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        return
    write_result("plan_memory", {
        "what": "planner memory estimate vs measured peak RSS minus the pre-model baseline, fp32, one CPU process",
        "tolerance": f"|estimate - measured| <= max({REL_TOLERANCE:.0%} of measured, {ABS_TOLERANCE_MIB} MiB)",
        "command": f"python benchmarks/plan_memory.py --configs {args.configs} --recompute {args.recompute}",
        "configs": results,
    })


if __name__ == "__main__":
    main()
