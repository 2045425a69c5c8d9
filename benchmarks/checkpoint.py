"""Checkpoint cost of a frozen-body run: bytes and save/load seconds of a full checkpoint
(train.save_frozen_weights=true) against a trainable-only one (the default: embedding and head
tensors + their optimizer state, the body read from the base checkpoint), on one process and on
2 data-parallel ranks (megatron's fully-parallel save/load strategies split the shards), for the
~56M CPU config (8 layers, hidden 512, vocabulary 32,000, fp32). The Llama-3-8B figures follow
by arithmetic from lep_megatron.training.plan.checkpoint_bytes, the function the dry run prints.
    python benchmarks/checkpoint.py [--repeats 3]        -> results/checkpoint.json
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

SHAPE_56M = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=8)


def worker(ckpt: str, out: str, repeats: int, result: str) -> None:
    """Under torchrun: build the trainer (the base load timed), then save and load each kind."""
    import torch.distributed as dist

    from lep_megatron.compat import optimizer_resume
    from lep_megatron.training.trainer import TrainConfig, build, checkpoint_dir, resume_step, save_checkpoint

    rows = {}
    for kind, full in (("full", True), ("trainable_only", False)):
        cfg = TrainConfig(checkpoint=ckpt, out_dir=f"{out}/{kind}", steps=2, warmup_steps=0, seq_length=16,
                          global_batch_size=dist.get_world_size() if dist.is_initialized() else 1,
                          save_frozen_weights=full, keep_last=0, tensorboard=False)
        start = time.perf_counter()
        model, optimizer, scheduler, meta = build(cfg)
        base_load = time.perf_counter() - start
        optimizer_resume.initialise_state(model, optimizer)  # the optimizer state a checkpoint holds
        saves, loads = [], []
        for i in range(1, repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            path = save_checkpoint(cfg, i, model, optimizer, scheduler, meta)
            saves.append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            resume_step(cfg, model, optimizer, scheduler)
            dist.barrier()
            loads.append(time.perf_counter() - start)
        files = [f for f in checkpoint_dir(cfg, repeats).rglob("*") if f.is_file()]
        rows[kind] = {"bytes": sum(f.stat().st_size for f in files),
                      "tensor_bytes": sum(f.stat().st_size for f in files if f.suffix == ".distcp"),
                      "save_s": round(statistics.median(saves), 3), "load_s": round(statistics.median(loads), 3),
                      "base_load_s": round(base_load, 3), "path": str(path)}
    if dist.get_rank() == 0:
        Path(result).write_text(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        ckpt, out, repeats, result = args.worker
        return worker(ckpt, out, int(repeats), result)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lep_megatron.checkpoint.convert import ConvertConfig, run
    from lep_megatron.common.launch import torchrun
    from lep_megatron.models.hf_config import HFModelShape
    from lep_megatron.models.gpt import padded_vocab_size
    from lep_megatron.training.plan import checkpoint_bytes

    load_before = os.getloadavg()  # other work on the machine slows saves and loads: recorded
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, **SHAPE_56M)).save_pretrained(tmp / "hf")
        run(ConvertConfig("hf-to-mcore", tmp / "hf", tmp / "mc"))
        measured = {}
        for ranks in (1, 2):
            result = tmp / f"result_{ranks}.json"
            torchrun(ranks, [__file__, "--worker", tmp / "mc", tmp / f"runs_{ranks}", args.repeats, result],
                     timeout=1800, threads_per_rank=max(1, 2 // ranks))
            measured[f"dp{ranks}"] = json.loads(result.read_text())
            for row in measured[f"dp{ranks}"].values():
                row.pop("path")
            print(f"dp{ranks}: {json.dumps(measured[f'dp{ranks}'])}", flush=True)
    from omegaconf import OmegaConf

    shape56 = HFModelShape.from_hf_config(LlamaConfig(**SHAPE_56M).to_dict(), "56m")
    llama = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "pretrain_groups" / "model" / "llama3_8b.yaml")
    shape8b = HFModelShape.from_hf_config(dict(OmegaConf.to_container(llama.hf_config), vocab_size=174816), "llama3_8b")
    arithmetic = {"56m_float32": checkpoint_bytes(shape56, padded_vocab_size(32000, 128, 1), "float32"),
                  "llama3_8b_174816_bfloat16": checkpoint_bytes(shape8b, padded_vocab_size(174816, 128, 1), "bfloat16")}
    payload = {"config": dict(SHAPE_56M, dtype="float32"), "repeats": args.repeats, "measured": measured,
               "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
               "arithmetic": {name: size._asdict() for name, size in arithmetic.items()}}
    write_result("checkpoint", payload)


if __name__ == "__main__":
    main()
