"""Hydra app of `lep-megatron convert`."""

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.checkpoint.megatron_io import resolve_checkpoint
from lep_megatron.common.app import stage_app


@stage_app("convert")
def main(cfg) -> None:
    run(ConvertConfig(
        action=cfg.action,
        in_dir=str(resolve_checkpoint(cfg.in_dir)) if cfg.action == "mcore-to-hf" else cfg.in_dir, out_dir=cfg.out_dir, dtype=cfg.dtype,
        tp=cfg.parallel.tp, pp=cfg.parallel.pp,
        make_vocab_size_divisible_by=cfg.parallel.make_vocab_size_divisible_by,
        max_shard_size_gb=cfg.max_shard_size_gb, overwrite=cfg.overwrite, lora=cfg.lora,
    ))
