"""torchrun worker of test_lora.py.

`tp CKPT OUT`: the same full LoRA weights at TP1 and TP2: per-token losses, the adapters' full
gradients, the loss of the plain model with the update merged into its weights, and a dist
checkpoint saved at TP2 and loaded back at TP1.
`train CKPT OUT LAYOUTS`: `calibration` steps through the trainer at each layout: loss curve,
which parameters changed, frozen base bit-identical, grad buffers only for trainable tensors;
at 1x1 also the curve of a run stopped after step 2 and resumed.
"""
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from lep_megatron.checkpoint.megatron_io import HF_SUBDIR, CheckpointMeta, load_model, save_model
from lep_megatron.models import build_stage_model, tp_shard
from lep_megatron.models.lora import LoRAConfig, add_lora, lora_parameters, lora_shard
from lep_megatron.parallel import init_distributed
from lep_megatron.training.batches import global_batch, rank_batches
from lep_megatron.training.trainer import TrainConfig, train

LORA = LoRAConfig(rank=4, alpha=2.0, layers=(0, -1))
SEQ = 12


def full_adapters(model) -> dict:
    """Deterministic full (TP1-layout) A and B for every adapter of `model` (B non-zero)."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, module in sorted(model.named_modules()):
        if hasattr(module, "lora_scaling"):
            out[name + ".lora_a"] = torch.randn(LORA.rank, module.input_size, generator=g) * 0.3
            out[name + ".lora_b"] = torch.randn(module.output_size, LORA.rank, generator=g) * 0.3
    return out


def set_adapters(model, full: dict) -> None:
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_scaling"):
                for attr in ("lora_a", "lora_b"):
                    getattr(module, attr).copy_(lora_shard(module, attr, full[f"{name}.{attr}"]))


def gather_full(module, attr: str, local: torch.Tensor) -> torch.Tensor:
    """Inverse of lora_shard: the full tensor from every TP rank's slice."""
    group = parallel_state.get_tensor_model_parallel_group()
    size = group.size()
    sharded_attr, dim = module.SHARDED
    if attr != sharded_attr or size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if module.lora_gated:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


def losses_of(model, tokens: torch.Tensor) -> torch.Tensor:
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(SEQ).expand(ids.shape[0], SEQ)
    return model(ids, position_ids, None, labels=labels)


def tp_mode(ckpt: str, out: str) -> None:
    meta = CheckpointMeta.read(ckpt)
    tokens = global_batch(0, meta.vocab_size, 2, SEQ)
    result = {}
    saved = Path(out).with_suffix(".tp2ckpt")
    for tp in (1, 2):
        init_distributed(tp, 1)
        model = build_stage_model(meta.shape, meta.padded_vocab_size)
        load_model(model, ckpt)
        plain_loss = losses_of(model, tokens).detach()
        add_lora(model, LORA)
        zero_b_loss = losses_of(model, tokens).detach()  # B starts at zero: no change
        full = full_adapters(model)
        set_adapters(model, full)
        for p in model.parameters():
            p.requires_grad = p in set(dict(lora_parameters(model)).values())
        loss = losses_of(model, tokens)
        loss.sum().backward()
        grads = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_scaling"):
                for attr in ("lora_a", "lora_b"):
                    grads[f"{name}.{attr}"] = gather_full(module, attr, getattr(module, attr).grad).tolist()
        # the update merged into the plain model's weights: W + (alpha / r) B A, sharded as megatron does
        merged = build_stage_model(meta.shape, meta.padded_vocab_size)
        load_model(merged, ckpt)
        base = {n: p for n, p in model.named_parameters()}
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for name, module in model.named_modules():
                if hasattr(module, "lora_scaling"):
                    w = merged.get_parameter(name + ".weight")
                    delta = LORA.scaling * full[name + ".lora_b"] @ full[name + ".lora_a"]
                    w += tp_shard(name + ".weight", delta, tp_rank, tp)
        merged_loss = losses_of(merged, tokens).detach()
        if tp == 2:
            save_model(model, saved, replace(meta, lora=asdict(LORA)), hf_side_dir=Path(ckpt) / HF_SUBDIR,
                       overwrite=True)
        else:
            with torch.no_grad():
                result["tp1_logits"] = model(tokens[:, :-1], torch.arange(SEQ).expand(2, SEQ), None)[
                    ..., :meta.vocab_size].tolist()
        result[f"tp{tp}"] = {"loss": loss.detach().tolist(), "plain_loss": plain_loss.tolist(),
                             "zero_b_loss": zero_b_loss.tolist(), "merged_loss": merged_loss.tolist(),
                             "grads": grads, "base_names": sorted(n for n in base if "lora" not in n)}
    # the TP2 checkpoint's adapters load at TP1 (fresh adapters are overwritten)
    init_distributed(1, 1)
    model = build_stage_model(meta.shape, meta.padded_vocab_size)
    add_lora(model, LORA)
    load_model(model, saved)
    reloaded = full_adapters(model)  # the values saved at TP2 were these
    result["reload_equal"] = all(torch.equal(model.get_parameter(n), t) for n, t in reloaded.items())
    result["reload_loss"] = losses_of(model, tokens).detach().tolist()
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))


def train_mode(ckpt: str, out: str, layouts) -> None:
    meta = CheckpointMeta.read(ckpt)
    results = {}
    for layout in layouts:
        tp, pp = (int(x) for x in layout.split("x"))
        # a small clip_grad keeps clipping active: a wrong grad norm under TP changes the curve
        cfg = TrainConfig(checkpoint=ckpt, out_dir=f"{out}.{layout}", steps=5, seq_length=16, micro_batch_size=1,
                          global_batch_size=4, lr=2e-2, warmup_steps=1, clip_grad=0.05, tp=tp, pp=pp,
                          trainable="calibration", lora_rank=4, lora_alpha=8.0)
        batches = rank_batches(meta.vocab_size, 4, 1, 16)
        losses, model = train(cfg, lambda step: batches(0))
        start = build_stage_model(meta.shape, meta.padded_vocab_size)
        load_model(start, ckpt)
        before = dict(start.named_parameters())
        params = dict(model.module.named_parameters())
        base_same = all(torch.equal(p, before[n]) for n, p in params.items() if n in before and not p.requires_grad)
        changed = sorted(n for n, p in params.items() if p.requires_grad and (n not in before or not torch.equal(p, before[n])))
        trainable = sorted(n for n, p in params.items() if p.requires_grad)
        flags = torch.tensor([int(base_same)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, {
            "trainable": trainable, "changed": changed,
            "grad_buffer_numel": sum(p.numel() for b in model.buffers for p in b.params),
            "trainable_numel": sum(p.numel() for p in params.values() if p.requires_grad)})
        results[layout] = {"losses": losses, "base_bit_identical": bool(flags), "ranks": per_rank}
        if layout == "1x1":
            # stopped after step 2 and resumed from its checkpoint (adapters, their optimizer state)
            stopped = replace(cfg, out_dir=f"{out}.resumed", exit_after=2)
            first, _ = train(stopped, lambda step: batches(0))
            rest, _ = train(replace(stopped, exit_after=0), lambda step: batches(0))
            results[layout]["resumed_losses"] = first + rest
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "tp":
        tp_mode(sys.argv[2], sys.argv[3])
    else:
        train_mode(sys.argv[2], sys.argv[3], sys.argv[4].split(","))
