"""Hydra app of `lep-megatron calibrate-data`."""
from omegaconf import OmegaConf

from lep_megatron.common.app import stage_app
from lep_megatron.data.calibrate import CalibrateDataConfig, build_calibration_data


@stage_app("calibrate-data")
def main(cfg) -> None:
    build_calibration_data(CalibrateDataConfig(**OmegaConf.to_container(cfg, resolve=True)))


if __name__ == "__main__":
    main()
