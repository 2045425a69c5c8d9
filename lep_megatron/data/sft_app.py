"""Hydra app of `lep-megatron sft-data`."""
from omegaconf import OmegaConf

from lep_megatron.common.app import stage_app
from lep_megatron.data.sft import SFTDataConfig, build_sft_data


@stage_app("sft-data")
def main(cfg) -> None:
    files = OmegaConf.to_container(cfg.files) if OmegaConf.is_list(cfg.files) else cfg.files
    build_sft_data(SFTDataConfig(tokenizer=cfg.tokenizer, out_dir=cfg.out_dir, files=files,
                                 max_length=cfg.max_length, messages_field=cfg.messages_field,
                                 overwrite=cfg.overwrite))


if __name__ == "__main__":
    main()
