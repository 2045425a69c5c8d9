"""torchrun worker of test_preemption.py (2 gloo ranks, data-parallel): an uninterrupted run; the
same run with SIGUSR1 sent to rank 1 alone during step 3 (the ranks agree, checkpoint step 3 and
raise ResumableExit), resumed from its trainable-only checkpoint; the same with
train.save_frozen_weights=true (a full checkpoint); with background saves after every step
(train.async_save); a wall-clock budget that runs out after the
first step; time-based saves every step with keep_last=2; load_model of the trainable-only and
the full checkpoint of the same step."""
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lep_megatron.checkpoint.megatron_io import CheckpointMeta, load_model

from lep_megatron.common.exit_codes import EXIT_RESUMABLE
from lep_megatron.models import build_stage_model
from lep_megatron.training.batches import rank_batches
from lep_megatron.training.preemption import ResumableExit
from lep_megatron.training.trainer import TrainConfig, train

VOCAB = 4096


def same_model(a: Path, b: Path) -> bool:
    """load_model (what eval and parity use) gives the same parameters from both checkpoints."""
    models = []
    for ckpt in (a, b):
        meta = CheckpointMeta.read(ckpt)
        model = build_stage_model(meta.shape, meta.padded_vocab_size)
        load_model(model, ckpt)
        models.append(dict(model.named_parameters()))
    flag = torch.tensor([int(all(torch.equal(p, models[1][n]) for n, p in models[0].items()))])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def main() -> None:
    ckpt, out = sys.argv[1], Path(sys.argv[2])
    tokens = rank_batches(VOCAB, 4, 1, 16)

    def config(name, **kw):
        return TrainConfig(checkpoint=ckpt, out_dir=str(out / name), steps=6, seq_length=16, micro_batch_size=1,
                           global_batch_size=4, lr=1e-2, warmup_steps=1, tensorboard=False, **kw)

    def signalled(step):
        if step == 3 and dist.get_rank() == 1:  # mid-step, on one rank only: both must stop after it
            os.kill(os.getpid(), signal.SIGUSR1)
        return tokens(step)

    def interrupted(cfg, batches):
        try:
            train(cfg, batches)
        except ResumableExit as stop:
            return {"step": stop.step, "reason": stop.reason, "code": stop.code}
        return None

    result = {"straight": train(config("straight"), tokens)[0]}
    for name, kw in (("trainable_only", {}), ("full", {"save_frozen_weights": True}),
                     ("async", {"async_save": True, "save_every": 1})):
        stop = interrupted(config(name, **kw), signalled)
        rest = train(config(name, **kw), tokens)[0]
        result[name] = {"stop": stop, "rest": rest}
    result["budget"] = interrupted(config("budget", exit_duration_minutes=1e-6), tokens)
    train(config("interval", save_interval_minutes=1e-6, keep_last=2), tokens)
    result["exit_resumable"] = EXIT_RESUMABLE
    result["loads_equal"] = same_model(out / "trainable_only" / "checkpoints" / "step_0000003",
                                       out / "full" / "checkpoints" / "step_0000003")
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
