"""Logit parity of a Megatron checkpoint with its HF source, at any TP/PP layout.

Run under torchrun with tp x pp (x dp) ranks:
    torchrun --nproc-per-node 4 -m lep_megatron.checkpoint.parity \
        --hf HF_DIR --mcore MCORE_DIR --layouts 1x1,2x1,1x2,2x2 --out parity.json
Every layout loads the checkpoint through dist_checkpointing (resharding on load) and runs
megatron's own forward schedule; rank 0 compares the gathered logits with transformers'.
`--resave-dir` additionally saves the checkpoint from the first layout and reloads that copy in
the other layouts (resharding a checkpoint written at TP/PP > 1).
"""
import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from lep_megatron.checkpoint.megatron_io import CheckpointMeta, load_model, save_model
from lep_megatron.models import build_stage_model
from lep_megatron.models.hf_config import parse_dtype
from lep_megatron.parallel import init_distributed


def sample_batch(vocab_size: int, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq + 1), generator=g)


def megatron_forward(model, tokens: torch.Tensor, vocab_size: int):
    """(logits [b, s, vocab_size] gathered over TP, mean next-token loss) on the last pipeline
    stage; (None, None) elsewhere. `tokens` is [b, s + 1]: inputs and shifted labels."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    ids, labels = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
    b, s = ids.shape
    captured = {}

    def loss_func(output):
        # the loss over the true vocabulary (padding columns excluded), as transformers computes it
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(output)[..., :vocab_size].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), labels.reshape(-1))
        captured["logits"], captured["loss"] = logits, loss
        return loss, {"loss": loss}

    def forward_step(data_iterator, model):
        batch_ids = next(data_iterator)
        out = model(batch_ids, torch.arange(s, device=batch_ids.device).expand(b, s), None)
        return out, loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([ids]), model=[model],
            num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None, None
    return captured["logits"].cpu(), float(captured["loss"])


def hf_forward(hf_dir: Path, tokens: torch.Tensor, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logits = model(ids.to(device)).logits.float().cpu()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return logits, float(loss)


def parse_layout(text: str):
    tp, pp = (int(x) for x in text.lower().split("x"))
    return tp, pp


def run_layout(ckpt_dir: Path, meta: CheckpointMeta, tp: int, pp: int, tokens, dtype, resave_dir=None):
    init_distributed(tp, pp)
    meta.check_tp(tp)
    model = build_stage_model(meta.shape, meta.padded_vocab_size, dtype).eval()
    load_model(model, ckpt_dir)
    if resave_dir is not None:
        save_model(model, resave_dir, meta, hf_side_dir=Path(ckpt_dir) / "hf", overwrite=True)
    return megatron_forward(model, tokens, meta.vocab_size)


def _report(results: dict, key: str, logits, loss) -> None:
    """Send the last stage's result to rank 0 (the first rank of the last stage holds it)."""
    payload = [None]
    is_holder = (logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0
                 and parallel_state.get_data_parallel_rank() == 0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL reduces only GPU tensors
    holder = torch.tensor([dist.get_rank() if is_holder else 0], device=device)
    dist.all_reduce(holder, op=dist.ReduceOp.MAX)
    holder = int(holder)
    if dist.get_rank() == holder:
        payload = [(logits, loss)]
    dist.broadcast_object_list(payload, src=holder)
    results[key] = payload[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="HF model directory (the reference)")
    p.add_argument("--mcore", required=True, help="Megatron checkpoint converted from --hf")
    p.add_argument("--layouts", default="1x1", help="comma-separated TPxPP layouts")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--resave-dir", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    init_distributed(1, 1)
    meta = CheckpointMeta.read(args.mcore)
    dtype = parse_dtype(args.dtype)
    tokens = sample_batch(meta.vocab_size)
    layouts = [parse_layout(x) for x in args.layouts.split(",")]
    results, resaved = {}, {}
    for i, (tp, pp) in enumerate(layouts):
        resave = args.resave_dir if (args.resave_dir and i == 0) else None
        logits, loss = run_layout(args.mcore, meta, tp, pp, tokens, dtype, resave)
        _report(results, f"{tp}x{pp}", logits, loss)
        if args.resave_dir and i > 0:
            logits, loss = run_layout(args.resave_dir, meta, tp, pp, tokens, dtype)
            _report(resaved, f"{tp}x{pp}", logits, loss)
    if dist.get_rank() == 0:
        ref_logits, ref_loss = hf_forward(Path(args.hf), tokens)
        out = {
            "dtype": args.dtype,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "layouts": {k: {"max_abs_diff": float((v[0] - ref_logits).abs().max()), "loss": v[1]}
                        for k, v in results.items()},
            "hf_loss": ref_loss,
            "reference": "transformers, float32, CPU",
            "resaved_from": f"{layouts[0][0]}x{layouts[0][1]}" if args.resave_dir else None,
            "resaved_loss": {k: v[1] for k, v in resaved.items()},
        }
        if dtype != torch.float32:
            # transformers' own error in this dtype and device: the floor for megatron's
            device = "cuda" if torch.cuda.is_available() else "cpu"
            same_dtype, _ = hf_forward(Path(args.hf), tokens, dtype, device)
            out["hf_same_dtype_max_abs_diff"] = float((same_dtype - ref_logits).abs().max())
        Path(args.out).write_text(json.dumps(out, indent=2))
    dist.barrier()


if __name__ == "__main__":
    main()
