"""Hydra app of `lep-megatron convert`."""
import sys

import hydra

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.common.io import UserInputError


@hydra.main(version_base=None, config_path="pkg://lep_megatron.conf", config_name="convert")
def main(cfg) -> None:
    try:
        run(ConvertConfig(
            action=cfg.action, in_dir=cfg.in_dir, out_dir=cfg.out_dir, dtype=cfg.dtype,
            tp=cfg.parallel.tp, pp=cfg.parallel.pp,
            make_vocab_size_divisible_by=cfg.parallel.make_vocab_size_divisible_by,
            max_shard_size_gb=cfg.max_shard_size_gb, overwrite=cfg.overwrite,
        ))
    except UserInputError as e:
        print(f"lep-megatron convert: error: {e}", file=sys.stderr)
        sys.exit(2)
