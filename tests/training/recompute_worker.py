"""torchrun worker of test_recompute.py: the same training steps with recompute none, selective
and full; per mode the loss curve, the last step's embedding and head gradients, and whether the
body stayed bit-identical to the checkpoint."""
import json
import sys

import torch

from lep_megatron.checkpoint.megatron_io import CheckpointMeta, load_model
from lep_megatron.models import build_stage_model
from lep_megatron.parallel import init_distributed
from lep_megatron.training.batches import rank_batches
from lep_megatron.training.trainer import TrainConfig, train


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    meta = CheckpointMeta.read(ckpt)
    init_distributed()
    start = build_stage_model(meta.shape, meta.padded_vocab_size)
    load_model(start, ckpt)
    before = {n: p.detach().clone() for n, p in start.named_parameters()}
    results = {}
    for mode in ("none", "selective", "full"):
        cfg = TrainConfig(checkpoint=ckpt, out_dir=f"{out}.{mode}", steps=3, seq_length=32, micro_batch_size=2,
                          global_batch_size=4, lr=1e-2, warmup_steps=1, recompute=mode)
        batches = rank_batches(meta.vocab_size, 4, 2, 32)
        losses, model = train(cfg, lambda step: batches(0))  # one fixed batch: the loss falls
        params = dict(model.module.named_parameters())
        results[mode] = {
            "losses": losses,
            # megatron DDP's grad buffer still holds the last step's gradients
            "grads": {n: params[n].main_grad.flatten().tolist()
                      for n in ("embedding.word_embeddings.weight", "output_layer.weight")},
            "frozen_bit_identical": all(torch.equal(p, before[n]) for n, p in params.items() if not p.requires_grad),
        }
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
