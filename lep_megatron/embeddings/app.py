"""Hydra app of `lep-megatron init`."""


from lep_megatron.checkpoint.convert import ConvertConfig, hf_to_mcore
from lep_megatron.common.app import stage_app
from lep_megatron.embeddings.initialize import InitConfig, initialize


@stage_app("init")
def main(cfg) -> None:
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
