"""torchrun worker of test_sft_data.py: `sft` steps (LoRA on every layer, head trained) on
loss-masked chat batches at several micro-batch sizes; writes each one's loss curve."""
import json
import sys
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from lep_megatron.data.sft import sft_batches
from lep_megatron.parallel import init_distributed
from lep_megatron.training.trainer import TrainConfig, train

SEQ, GBS = 48, 4


def main() -> None:
    ckpt, data, pad, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    results = {}
    for mbs in (int(x) for x in sys.argv[5].split(",")):
        cfg = TrainConfig(checkpoint=ckpt, out_dir=f"{out}.{mbs}", steps=3, seq_length=SEQ, micro_batch_size=mbs,
                          global_batch_size=GBS, lr=1e-2, warmup_steps=1, trainable="sft", lora_rank=4)
        init_distributed(cfg.tp, cfg.pp, cfg.seed)
        batches = sft_batches(data, GBS, mbs, SEQ, pad, parallel_state.get_data_parallel_rank(),
                              parallel_state.get_data_parallel_world_size())
        results[str(mbs)], _ = train(cfg, batches)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
