"""torchrun worker of test_resume.py: an uninterrupted run, and the same run stopped after step 3
(checkpointed), with a save killed half-way left behind, then resumed."""
import json
import sys
from pathlib import Path

import torch.distributed as dist

from lep_megatron.training.batches import rank_batches
from lep_megatron.training.trainer import TrainConfig, train


def main() -> None:
    ckpt, out = sys.argv[1], Path(sys.argv[2])

    def config(name, **kw):
        return TrainConfig(checkpoint=ckpt, out_dir=str(out / name), steps=6, seq_length=16, micro_batch_size=1,
                           global_batch_size=4, lr=1e-2, warmup_steps=1, save_every=3, **kw)

    batches = rank_batches(131, 4, 1, 16)
    straight, _ = train(config("straight"), batches)
    first, _ = train(config("resumed", exit_after=3), batches)
    if dist.get_rank() == 0:  # a save of step 5 killed half-way
        (out / "resumed" / "checkpoints" / "step_0000005.partial").mkdir()
    dist.barrier()
    rest, _ = train(config("resumed"), batches)
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps({"straight": straight, "first": first, "rest": rest}))


if __name__ == "__main__":
    main()
