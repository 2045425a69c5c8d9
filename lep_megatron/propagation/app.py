"""Hydra app of `lep-megatron propagate`."""
import sys

import hydra

from lep_megatron.common.io import UserInputError
from lep_megatron.propagation.propagate import PropagateConfig, propagate


@hydra.main(version_base=None, config_path="pkg://lep_megatron.conf", config_name="propagate")
def main(cfg) -> None:
    try:
        out = propagate(PropagateConfig(
            base=cfg.base, instruct=cfg.instruct, donor=cfg.donor, out_dir=cfg.out_dir, mode=cfg.mode,
            solver=cfg.solver, token_map=cfg.token_map, chunk_rows=cfg.chunk_rows, overwrite=cfg.overwrite,
        ))
        print(f"wrote {out}")
    except UserInputError as e:
        print(f"lep-megatron propagate: error: {e}", file=sys.stderr)
        sys.exit(2)
