"""Hydra app of `lep-megatron init`."""
import sys

import hydra

from lep_megatron.checkpoint.convert import ConvertConfig, hf_to_mcore
from lep_megatron.common.io import UserInputError
from lep_megatron.embeddings.initialize import InitConfig, initialize


@hydra.main(version_base=None, config_path="pkg://lep_megatron.conf", config_name="init")
def main(cfg) -> None:
    try:
        out = initialize(InitConfig(
            base=cfg.base, tokenizer=cfg.tokenizer, out_dir=cfg.out_dir, token_map=cfg.token_map,
            method=cfg.method, wmean_decay=cfg.wmean_decay, untrained_norm=cfg.untrained_norm,
            seed=cfg.seed, overwrite=cfg.overwrite,
        ))
        print(f"wrote {out}")
        if cfg.mcore_out_dir:
            hf_to_mcore(ConvertConfig(
                "hf-to-mcore", out, cfg.mcore_out_dir, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                make_vocab_size_divisible_by=cfg.parallel.make_vocab_size_divisible_by, overwrite=cfg.overwrite))
            print(f"wrote {cfg.mcore_out_dir}")
    except UserInputError as e:
        print(f"lep-megatron init: error: {e}", file=sys.stderr)
        sys.exit(2)
