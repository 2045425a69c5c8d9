"""torchrun worker of test_overlap.py (2 gloo ranks, data-parallel, distributed optimizer): the same
steps with the gradient reduction and parameter all-gather overlapped (the default) and not, in
fp32; and in bf16 with the reduction in fp32 and in bf16."""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from lep_megatron.training.batches import rank_batches
from lep_megatron.training.trainer import TrainConfig, train


def main() -> None:
    ckpt, out = sys.argv[1], Path(sys.argv[2])
    tokens = rank_batches(131, 8, 2, 16)
    runs = {"overlap": {}, "no_overlap": {"overlap_grad_reduce": False, "overlap_param_gather": False},
            "bf16_reduce_fp32": {"dtype": "bfloat16"},
            "bf16_reduce_bf16": {"dtype": "bfloat16", "grad_reduce_dtype": "bfloat16"}}
    result = {}
    for name, kw in runs.items():
        cfg = TrainConfig(checkpoint=ckpt, out_dir=str(out / name), steps=5, seq_length=16, micro_batch_size=2,
                          global_batch_size=8, lr=1e-2, warmup_steps=1, tensorboard=False, eval_every=2, **kw)
        losses, _ = train(cfg, tokens, valid_batches=rank_batches(131, 8, 2, 16, seed=1))
        result[name] = losses
        if dist.get_rank() == 0:
            result[name + "_metrics"] = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
