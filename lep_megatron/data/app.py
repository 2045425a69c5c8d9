"""Hydra app of `lep-megatron data`."""
import logging

from omegaconf import OmegaConf

from lep_megatron.common.app import stage_app
from lep_megatron.common.io import UserInputError
from lep_megatron.data.build import DataConfig, build_dataset


@stage_app("data")
def main(cfg) -> None:
    # megatron logs six INFO lines per partial index merged; the stage prints its own progress
    logging.getLogger("megatron.core.datasets.indexed_dataset").setLevel(logging.WARNING)
    corpora = OmegaConf.to_container(cfg.corpora) if cfg.corpora is not None else {}
    if cfg.corpus is not None:
        if corpora:
            raise UserInputError("pass corpus= or corpora=, not both")
        corpora = {"corpus": {"files": OmegaConf.to_container(cfg.corpus) if OmegaConf.is_list(cfg.corpus) else cfg.corpus}}
    out = build_dataset(DataConfig(
        tokenizer=cfg.tokenizer, out_dir=cfg.out_dir, corpora=corpora, text_field=cfg.text_field,
        valid_fraction=cfg.valid_fraction, workers=cfg.workers, launcher=cfg.launcher,
        batch_size=cfg.batch_size, overwrite=cfg.overwrite,
    ))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
