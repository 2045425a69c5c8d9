"""torchrun worker of test_resume.py: an uninterrupted run, and the same run stopped after step 3
(checkpointed), with a save killed half-way left behind, then resumed. Each step draws from the
python, numpy and torch generators a rank-dependent number of times (as data sampling or dropout
would), so the generators after the run show whether resume restored each rank's RNG state."""
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lep_megatron.training.batches import rank_batches
from lep_megatron.training.trainer import TrainConfig, train


def main() -> None:
    ckpt, out = sys.argv[1], Path(sys.argv[2])

    def config(name, **kw):
        return TrainConfig(checkpoint=ckpt, out_dir=str(out / name), steps=6, seq_length=16, micro_batch_size=1,
                           global_batch_size=4, lr=1e-2, warmup_steps=1, save_every=3, **kw)

    tokens = rank_batches(131, 4, 1, 16)

    def batches(step):
        for _ in range(dist.get_rank() + 1):
            torch.rand(1), random.random(), np.random.rand()
        return tokens(step)

    def run(cfg):
        # each run starts from the seeds a fresh process would have
        torch.manual_seed(cfg.seed), random.seed(cfg.seed), np.random.seed(cfg.seed)
        losses, _ = train(cfg, batches)
        return losses

    def draws():
        mine = [torch.rand(3).tolist(), random.random(), float(np.random.rand())]
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        return every

    straight = run(config("straight"))
    straight_rng = draws()
    first = run(config("resumed", exit_after=3))
    if dist.get_rank() == 0:  # a save of step 5 killed half-way
        (out / "resumed" / "checkpoints" / "step_0000005.partial").mkdir()
    dist.barrier()
    rest = run(config("resumed"))
    resumed_rng = draws()
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps({"straight": straight, "first": first, "rest": rest,
                                                     "straight_rng": straight_rng, "resumed_rng": resumed_rng}))


if __name__ == "__main__":
    main()
