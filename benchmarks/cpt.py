"""Frozen-body vs full training, one process on the CPU, same model and batch, side by side:
megatron-core (our trainer, `lep-megatron pretrain`) and transformers + torch AdamW (the stack of
the paper's reference code, body frozen the same way). Step time is the median over the steps
after the first; peak RSS is each run's own process (wait4).
    python benchmarks/cpt.py [--steps 6] [--configs tiny,50m]
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
}


def run_child(cmd, env=None) -> float:
    """Run a command; the peak RSS (GiB) of it and the processes it waited for."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}")
    return round(usage.ru_maxrss / 2**20, 3)


def megatron_run(ckpt: Path, out: Path, trainable: str, mbs: int, seq: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "lep_megatron", "pretrain", f"checkpoint={ckpt}", f"out_dir={out}",
           f"train.steps={steps}", f"train.seq_length={seq}", f"train.micro_batch_size={mbs}",
           f"train.global_batch_size={mbs}", "train.warmup_steps=1", "train.lr=1e-4",
           f"train.trainable={trainable}", "train.use_distributed_optimizer=false", "data.kind=synthetic"]
    rss = run_child(cmd)
    steps_s = [json.loads(line)["step_s"] for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"step_s": round(statistics.median(steps_s), 4), "peak_rss_gib": rss}


def hf_worker(model_dir: str, trainable: str, mbs: int, seq: int, steps: int, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, p in model.named_parameters():
        p.requires_grad = trainable == "full" or name.startswith(("model.embed_tokens", "lm_head"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                            eps=1e-5, weight_decay=0.1)
    ids = torch.randint(0, model.config.vocab_size, (mbs, seq + 1), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(ids[:, :-1], labels=ids[:, :-1]).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    Path(out).write_text(json.dumps({"step_s": round(statistics.median(times[1:]), 4)}))


def hf_run(model_dir: Path, trainable: str, mbs: int, seq: int, steps: int, tmp: Path) -> dict:
    out = tmp / f"hf_{trainable}.json"
    rss = run_child([sys.executable, __file__, "--hf-worker", str(model_dir), trainable, str(mbs), str(seq),
                     str(steps), str(out)])
    return dict(json.loads(out.read_text()), peak_rss_gib=rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--configs", default="tiny,50m")
    ap.add_argument("--hf-worker", nargs=6, metavar=("DIR", "TRAINABLE", "MBS", "SEQ", "STEPS", "OUT"))
    args = ap.parse_args()
    if args.hf_worker:
        d, trainable, mbs, seq, steps, out = args.hf_worker
        return hf_worker(d, trainable, int(mbs), int(seq), int(steps), out)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lep_megatron.checkpoint.convert import ConvertConfig, run

    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name in args.configs.split(","):
            overrides, mbs, seq = CONFIGS[name]
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, **overrides))
            params = sum(p.numel() for p in model.parameters())
            model.save_pretrained(str(tmp / name / "hf"))
            del model
            run(ConvertConfig("hf-to-mcore", tmp / name / "hf", tmp / name / "mc"))
            row = {"parameters": params, "micro_batch": mbs, "seq_length": seq}
            for trainable in ("embeddings_only", "full"):
                row[f"megatron_{trainable}"] = megatron_run(tmp / name / "mc", tmp / name / f"run_{trainable}",
                                                            trainable, mbs, seq, args.steps)
                row[f"transformers_{trainable}"] = hf_run(tmp / name / "hf", trainable, mbs, seq, args.steps, tmp)
                print(name, trainable, row[f"megatron_{trainable}"], row[f"transformers_{trainable}"], flush=True)
            for stack in ("megatron", "transformers"):
                frozen, full = row[f"{stack}_embeddings_only"], row[f"{stack}_full"]
                row[f"{stack}_frozen_over_full_step_time"] = round(frozen["step_s"] / full["step_s"], 3)
                row[f"{stack}_frozen_over_full_peak_rss"] = round(frozen["peak_rss_gib"] / full["peak_rss_gib"], 3)
            results[name] = row
    write_result("cpt", {
        "what": "frozen-body (embeddings + head) vs full training step, fp32, one CPU process",
        "command": f"python benchmarks/cpt.py --steps {args.steps} --configs {args.configs}",
        "configs": results,
    })


if __name__ == "__main__":
    main()
