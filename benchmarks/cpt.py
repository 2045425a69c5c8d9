"""Frozen-body vs full training, one process, same model and batch, side by side: megatron-core
(our trainer, `lep-megatron pretrain`) and transformers + torch AdamW (the stack of the paper's
reference code, body frozen the same way). Step time is the median over the steps after the
first. On the CPU (fp32) peak memory is each run's peak RSS (wait4); on a GPU (bf16) the peak of
torch.cuda.max_memory_allocated, with tokens/s/GPU and achieved TFLOP/s counted with the FLOPs
each step really does (lep_megatron.training.flops: a frozen body skips its weight gradients).
    python benchmarks/cpt.py [--steps 6] [--configs tiny,50m]          -> results/cpt.json
    python benchmarks/cpt.py --device cuda --configs 1b [--steps 10]   -> results/cpt_cuda.json
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

CONFIGS = {
    # name: (hf config overrides, micro batch, sequence length)
    "tiny": (dict(vocab_size=131, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2), 4, 256),
    "50m": (dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=8), 4, 256),
    # Llama-3.2-1B's shape (1.24B parameters, its 128,256 vocabulary): a GPU config
    "1b": (dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0), 4, 1024),
}
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}


def run_child(cmd, env=None) -> float:
    """Run a command; the peak RSS (GiB) of it and the processes it waited for."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}")
    return round(usage.ru_maxrss / 2**20, 3)


def megatron_run(ckpt: Path, out: Path, trainable: str, mbs: int, seq: int, steps: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "lep_megatron", "pretrain", f"checkpoint={ckpt}", f"out_dir={out}",
           f"train.steps={steps}", f"train.seq_length={seq}", f"train.micro_batch_size={mbs}",
           f"train.global_batch_size={mbs}", "train.warmup_steps=1", "train.lr=1e-4", f"train.dtype={DTYPES[device]}",
           f"train.trainable={trainable}", "data.kind=synthetic",
           # GPU: the trainer's default distributed optimizer (with megatron-core 0.19.2, bf16 and the
           # plain optimizer, saving a fully trained model's optimizer state fails: "Param id ... does
           # not match any model sharded param"); CPU: the plain one, as the committed results
           f"train.use_distributed_optimizer={'true' if device == 'cuda' else 'false'}",
           "train.tensorboard=false"]
    rss = run_child(cmd)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row = {"step_s": round(statistics.median(r["step_s"] for r in records[1:]), 4)}
    if device == "cpu":
        return dict(row, peak_rss_gib=rss)
    # the trainer's own figures: frozen-body FLOP count, torch.cuda.max_memory_allocated
    return dict(row, peak_memory_gib=round(max(r["peak_memory_gib"] for r in records), 3))


def hf_worker(model_dir: str, trainable: str, mbs: int, seq: int, steps: int, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPES[device])).to(device)
    for name, p in model.named_parameters():
        p.requires_grad = trainable == "full" or name.startswith(("model.embed_tokens", "lm_head"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                            eps=1e-5, weight_decay=0.1)
    ids = torch.randint(0, model.config.vocab_size, (mbs, seq + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(ids[:, :-1], labels=ids[:, :-1]).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    row = {"step_s": round(statistics.median(times[1:]), 4)}
    if device == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    Path(out).write_text(json.dumps(row))


def hf_run(model_dir: Path, trainable: str, mbs: int, seq: int, steps: int, tmp: Path, device: str) -> dict:
    out = tmp / f"hf_{trainable}.json"
    rss = run_child([sys.executable, __file__, "--hf-worker", str(model_dir), trainable, str(mbs), str(seq),
                     str(steps), str(out)])
    row = json.loads(out.read_text())
    return row if device == "cuda" else dict(row, peak_rss_gib=rss)


def throughput(row: dict, shape, trainable: str, mbs: int, seq: int) -> dict:
    """tokens/s on the one device and TFLOP/s from the FLOPs the step really does."""
    from lep_megatron.training.flops import step_flops

    flops = step_flops(shape, seq, body_trainable=trainable == "full").per_token * mbs * seq
    return dict(row, tokens_per_s=round(mbs * seq / row["step_s"], 1),
                tflops=float(f"{flops / row['step_s'] / 1e12:.4g}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--configs", default="tiny,50m", help=f"comma-separated, of {sorted(CONFIGS)}")
    ap.add_argument("--device", choices=sorted(DTYPES), default="cpu",
                    help="cpu: fp32, peak RSS; cuda: bf16 on one GPU, peak allocated memory")
    ap.add_argument("--hf-worker", nargs=6, metavar=("DIR", "TRAINABLE", "MBS", "SEQ", "STEPS", "OUT"))
    args = ap.parse_args()
    if args.hf_worker:
        d, trainable, mbs, seq, steps, out = args.hf_worker
        return hf_worker(d, trainable, int(mbs), int(seq), int(steps), out)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        ap.error(f"--configs: unknown {sorted(unknown)}; choose from {sorted(CONFIGS)}")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lep_megatron.checkpoint.convert import ConvertConfig, run
    from lep_megatron.models.hf_config import HFModelShape

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to torch")
    memory = "peak_rss_gib" if args.device == "cpu" else "peak_memory_gib"

    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.configs.split(","):
            overrides, mbs, seq = CONFIGS[name]
            torch.manual_seed(0)
            hf_config = LlamaConfig(max_position_embeddings=max(1024, seq), **overrides)
            model = LlamaForCausalLM(hf_config)
            params = sum(p.numel() for p in model.parameters())
            model.save_pretrained(str(tmp / name / "hf"))
            del model
            run(ConvertConfig("hf-to-mcore", tmp / name / "hf", tmp / name / "mc", dtype=DTYPES[args.device]))
            shape = HFModelShape.from_hf_config(hf_config.to_dict())
            row = {"parameters": params, "micro_batch": mbs, "seq_length": seq}
            for trainable in ("embeddings_only", "full"):
                runs = {"megatron": megatron_run(tmp / name / "mc", tmp / name / f"run_{trainable}", trainable, mbs,
                                                 seq, args.steps, args.device),
                        "transformers": hf_run(tmp / name / "hf", trainable, mbs, seq, args.steps, tmp, args.device)}
                for stack, measured in runs.items():
                    row[f"{stack}_{trainable}"] = throughput(measured, shape, trainable, mbs, seq)
                print(name, trainable, row[f"megatron_{trainable}"], row[f"transformers_{trainable}"], flush=True)
            for stack in ("megatron", "transformers"):
                frozen, full = row[f"{stack}_embeddings_only"], row[f"{stack}_full"]
                row[f"{stack}_frozen_over_full_step_time"] = round(frozen["step_s"] / full["step_s"], 3)
                row[f"{stack}_frozen_over_full_peak_memory"] = round(frozen[memory] / full[memory], 3)
            results[name] = row
    on = "one CPU process" if args.device == "cpu" else f"one GPU ({torch.cuda.get_device_name()})"
    write_result("cpt" if args.device == "cpu" else "cpt_cuda", {
        "what": f"frozen-body (embeddings + head) vs full training step, {DTYPES[args.device]}, {on}",
        "command": f"python benchmarks/cpt.py --device {args.device} --steps {args.steps} --configs {args.configs}",
        "configs": results,
    })


if __name__ == "__main__":
    main()
