"""Hydra app of `lep-megatron pretrain` (run it under torchrun / srun for several ranks)."""
import math
import os
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from lep_megatron.checkpoint.megatron_io import HF_SUBDIR, CheckpointMeta
from lep_megatron.common.app import stage_app
from lep_megatron.common.config import flag
from lep_megatron.common.io import UserInputError
from lep_megatron.data.loader import build_gpt_datasets
from lep_megatron.data.sft import read_sft_meta, sft_batches
from lep_megatron.evaluation.train_hook import DarumeruHook, TrainEvalConfig
from lep_megatron.parallel import init_distributed
from lep_megatron.models.hf_config import HFModelShape
from lep_megatron.training.batches import dataset_batches, rank_batches
from lep_megatron.models.gpt import padded_vocab_size
from lep_megatron.training.plan import GIB, PlanRequest, checkpoint_bytes, checkpoint_lines, estimate_memory, plan
from lep_megatron.training.trainer import TrainConfig, train


def make_batches(cfg, train_cfg: TrainConfig):
    """(train, validation) batch sources named by data.kind (built on every rank, after the
    process group); validation is None when train.eval_every is 0."""
    gbs, mbs, seq = train_cfg.global_batch_size, train_cfg.micro_batch_size, train_cfg.seq_length
    evaluating = train_cfg.eval_every > 0
    if cfg.data.kind == "synthetic":
        vocab = CheckpointMeta.read(cfg.checkpoint).vocab_size
        valid = rank_batches(vocab, gbs, mbs, seq, cfg.data.seed + 1) if evaluating else None
        return rank_batches(vocab, gbs, mbs, seq, cfg.data.seed), valid
    if cfg.data.kind == "sft":
        return sft_data_batches(cfg, train_cfg), None
    if cfg.data.kind != "indexed":
        raise UserInputError(f"data.kind={cfg.data.kind!r}: choose indexed, sft or synthetic")
    if not cfg.data.dir:
        raise UserInputError("data.dir is required for data.kind=indexed (make it with `lep-megatron data`)")
    init_distributed(train_cfg.tp, train_cfg.pp, train_cfg.seed)
    tokenizer = cfg.data.tokenizer or str(Path(cfg.checkpoint) / HF_SUBDIR)
    evaluations = -(-train_cfg.steps // train_cfg.eval_every) if evaluating else 0
    cache_dir = cfg.data.get("cache_dir")
    train_set, valid_set = build_gpt_datasets(
        Path(cfg.data.dir), Path(tokenizer), seq, train_cfg.steps * gbs,
        evaluations * train_cfg.eval_batches * gbs if evaluating else None, seed=cfg.data.seed,
        cache_dir=Path(cache_dir) if cache_dir else None)
    if evaluating and valid_set is None:
        raise UserInputError(f"train.eval_every={train_cfg.eval_every} but {cfg.data.dir} has no validation split; "
                             "rebuild it with valid_fraction > 0 or set train.eval_every=0")
    valid = dataset_batches(valid_set, gbs, mbs) if evaluating else None
    return dataset_batches(train_set, gbs, mbs), valid


def dry_run(cfg) -> None:
    """Print the resolved config, the planner's layout for cluster= and the memory estimate of
    the configured one; start nothing (no process group, no checkpoint read beyond its meta)."""
    print(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.checkpoint:
        shape, source = CheckpointMeta.read(cfg.checkpoint).shape, f"checkpoint {cfg.checkpoint}"
    elif cfg.get("model"):
        shape = HFModelShape.from_hf_config(OmegaConf.to_container(cfg.model.hf_config), "model.hf_config")
        source = "model="
    else:
        raise UserInputError("dry_run=true needs a model shape: checkpoint=CKPT or "
                             "model=llama3_8b|mistral_7b|qwen2_7b|tiny")
    t, cluster = cfg.train, cfg.cluster
    req = PlanRequest(shape, num_gpus=cluster.nodes * cluster.gpus_per_node, gpu_memory_gib=cluster.gpu_memory_gib,
                      seq_length=t.seq_length, global_batch_size=t.global_batch_size, dtype=t.dtype,
                      trainable=t.trainable, gpus_per_node=cluster.gpus_per_node,
                      use_distributed_optimizer=t.use_distributed_optimizer,
                      make_vocab_size_divisible_by=cfg.parallel.make_vocab_size_divisible_by)
    print(f"model shape from {source}: {shape.num_layers} layers, hidden {shape.hidden_size}, vocab {shape.vocab_size}")
    print("\n".join(plan(req).lines()))
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if req.num_gpus % (tp * pp) == 0:
        dp = req.num_gpus // (tp * pp)
        est = estimate_memory(req, tp, pp, dp, t.micro_batch_size, t.recompute)
        verdict = "fits" if est.total <= req.gpu_memory_gib * req.usable_fraction * GIB else "does NOT fit"
        print(f"configured: tp={tp} pp={pp} dp={dp} micro_batch_size={t.micro_batch_size} recompute={t.recompute}: "
              f"{est.total / GIB:.1f} GiB per device, {verdict}")
    # megatron stores the tables at the vocabulary padded for the configured tp
    padded = padded_vocab_size(shape.vocab_size, cfg.parallel.make_vocab_size_divisible_by, tp)
    size = checkpoint_bytes(shape, padded, t.dtype, t.trainable, t.lora_rank, t.lora_layers, t.use_distributed_optimizer)
    print(f"checkpoint tables at padded vocab {padded} (parallel.tp={tp}), trainable={t.trainable}")
    print("\n".join(checkpoint_lines(size, t.dtype, t.keep_last, t.save_frozen_weights)))
    print("dry run: nothing launched")


def sft_data_batches(cfg, train_cfg: TrainConfig):
    """Loss-masked chat batches from a `lep-megatron sft-data` dir (built with the checkpoint's
    tokenizer unless data.tokenizer names another), padded with the tokenizer's pad (else eos) id."""
    if not cfg.data.dir:
        raise UserInputError("data.dir is required for data.kind=sft (make it with `lep-megatron sft-data`)")
    if train_cfg.eval_every:
        raise UserInputError("train.eval_every: data.kind=sft has no validation split; set train.eval_every=0")
    tokenizer = Path(cfg.data.tokenizer or Path(cfg.checkpoint) / HF_SUBDIR)
    meta = read_sft_meta(Path(cfg.data.dir), tokenizer)
    hf = AutoTokenizer.from_pretrained(str(tokenizer))
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    init_distributed(train_cfg.tp, train_cfg.pp, train_cfg.seed)
    if meta["longest"] > train_cfg.seq_length + 1 and dist.get_rank() == 0:
        print(f"warning: conversations of up to {meta['longest']} tokens are truncated to train.seq_length + 1 = "
              f"{train_cfg.seq_length + 1} (their tails do not count)", flush=True)
    return sft_batches(Path(cfg.data.dir), train_cfg.global_batch_size, train_cfg.micro_batch_size,
                       train_cfg.seq_length, pad, parallel_state.get_data_parallel_rank(),
                       parallel_state.get_data_parallel_world_size(), seed=cfg.data.seed)


def epoch_steps(cfg, epochs: float, global_batch_size: int, warmup_steps: int) -> int:
    """train.epochs -> optimizer steps: passes over the conversations of a data.kind=sft dir, at
    global_batch_size conversations a step (the last step of a pass may run into the next one)."""
    if cfg.data.kind != "sft":
        raise UserInputError(f"train.epochs={epochs}: epochs count conversations of data.kind=sft; "
                             f"with data.kind={cfg.data.kind} set train.steps (and train.epochs=null)")
    if not epochs > 0:
        raise UserInputError(f"train.epochs={epochs} must be > 0 (or null: train.steps counts)")
    if not cfg.data.dir:
        raise UserInputError("data.dir is required for data.kind=sft (make it with `lep-megatron sft-data`)")
    conversations = read_sft_meta(Path(cfg.data.dir))["conversations"]
    steps = max(1, math.ceil(epochs * conversations / global_batch_size))
    if warmup_steps >= steps:
        raise UserInputError(f"train.warmup_steps={warmup_steps} must be below the {steps} steps of train.epochs="
                             f"{epochs} ({conversations} conversations / global batch {global_batch_size}); "
                             "lower train.warmup_steps")
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"train.epochs={epochs}: {conversations} conversations / global batch {global_batch_size} "
              f"-> {steps} steps", flush=True)
    return steps


@stage_app("pretrain")
def main(cfg) -> None:
    if flag(cfg.dry_run, "dry_run"):  # the same reading as launch/pretrain.sh's
        return dry_run(cfg)
    if not cfg.checkpoint:
        raise UserInputError("checkpoint= is required: a Megatron checkpoint (lep-megatron convert hf-to-mcore / "
                             "init); model= alone only plans (dry_run=true)")
    settings = OmegaConf.to_container(cfg.train, resolve=True)
    epochs = settings.pop("epochs", None)
    if epochs is not None:
        settings["steps"] = epoch_steps(cfg, epochs, settings["global_batch_size"], settings["warmup_steps"])
    train_cfg = TrainConfig(checkpoint=cfg.checkpoint, out_dir=cfg.out_dir, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                            **settings)
    eval_cfg = TrainEvalConfig(**OmegaConf.to_container(cfg.eval))
    hooks = [DarumeruHook(eval_cfg, cfg.checkpoint)] if eval_cfg.every else []
    train(train_cfg, *make_batches(cfg, train_cfg), hooks=hooks)
