"""Hydra app of `lep-megatron pretrain` (run it under torchrun / srun for several ranks)."""
from pathlib import Path

from omegaconf import OmegaConf

from lep_megatron.checkpoint.megatron_io import HF_SUBDIR, CheckpointMeta
from lep_megatron.common.app import stage_app
from lep_megatron.common.io import UserInputError
from lep_megatron.data.loader import build_gpt_datasets
from lep_megatron.parallel import init_distributed
from lep_megatron.training.batches import dataset_batches, rank_batches
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
    if cfg.data.kind != "indexed":
        raise UserInputError(f"data.kind={cfg.data.kind!r}: choose indexed or synthetic")
    if not cfg.data.dir:
        raise UserInputError("data.dir is required for data.kind=indexed (make it with `lep-megatron data`)")
    init_distributed(train_cfg.tp, train_cfg.pp, train_cfg.seed)
    tokenizer = cfg.data.tokenizer or str(Path(cfg.checkpoint) / HF_SUBDIR)
    evaluations = -(-train_cfg.steps // train_cfg.eval_every) if evaluating else 0
    train_set, valid_set = build_gpt_datasets(
        Path(cfg.data.dir), Path(tokenizer), seq, train_cfg.steps * gbs,
        evaluations * train_cfg.eval_batches * gbs if evaluating else None, seed=cfg.data.seed)
    if evaluating and valid_set is None:
        raise UserInputError(f"train.eval_every={train_cfg.eval_every} but {cfg.data.dir} has no validation split; "
                             "rebuild it with valid_fraction > 0 or set train.eval_every=0")
    valid = dataset_batches(valid_set, gbs, mbs) if evaluating else None
    return dataset_batches(train_set, gbs, mbs), valid


@stage_app("pretrain")
def main(cfg) -> None:
    train_cfg = TrainConfig(checkpoint=cfg.checkpoint, out_dir=cfg.out_dir, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                            **OmegaConf.to_container(cfg.train))
    train(train_cfg, *make_batches(cfg, train_cfg))
