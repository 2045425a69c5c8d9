"""torchrun worker of test_frozen_body.py: trains the same steps at several TP x PP layouts and
writes, per layout, the loss curve and what changed in the parameters."""
import json
import sys

import torch
import torch.distributed as dist

from lep_megatron.checkpoint.megatron_io import CheckpointMeta, load_model
from lep_megatron.models import build_stage_model
from lep_megatron.training.batches import rank_batches
from lep_megatron.training.trainer import TrainConfig, train


def main() -> None:
    ckpt, out, layouts = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    meta = CheckpointMeta.read(ckpt)
    results = {}
    for layout in layouts:
        tp, pp = (int(x) for x in layout.split("x"))
        cfg = TrainConfig(checkpoint=ckpt, out_dir=f"{out}.{layout}", steps=6, seq_length=16, micro_batch_size=1,
                          global_batch_size=4, lr=1e-2, warmup_steps=1, tp=tp, pp=pp)
        batches = rank_batches(meta.vocab_size, 4, 1, 16)
        # one fixed batch: the loss then measures learning, not batch-to-batch noise
        losses, model = train(cfg, lambda step: batches(0))
        start = build_stage_model(meta.shape, meta.padded_vocab_size)
        load_model(start, ckpt)
        before = dict(start.named_parameters())
        frozen_same = all(torch.equal(p, before[n]) for n, p in model.module.named_parameters() if not p.requires_grad)
        changed = sorted(n for n, p in model.module.named_parameters() if p.requires_grad and not torch.equal(p, before[n]))
        trainable = sorted(n for n, p in model.module.named_parameters() if p.requires_grad)
        buffered = sum(p.numel() for b in model.buffers for p in b.params)
        flags = torch.tensor([int(frozen_same)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, {"trainable": trainable, "changed": changed, "grad_buffer_numel": buffered,
                                          "trainable_numel": sum(p.numel() for p in model.module.parameters() if p.requires_grad)})
        results[layout] = {"losses": losses, "frozen_bit_identical": bool(flags), "ranks": per_rank}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
