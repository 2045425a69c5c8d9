"""Hydra app of `lep-megatron propagate`."""


from lep_megatron.common.app import stage_app
from lep_megatron.propagation.propagate import PropagateConfig, propagate


@stage_app("propagate")
def main(cfg) -> None:
    out = propagate(PropagateConfig(
        base=cfg.base, instruct=cfg.instruct, donor=cfg.donor, out_dir=cfg.out_dir, mode=cfg.mode,
        solver=cfg.solver, token_map=cfg.token_map, chunk_rows=cfg.chunk_rows, overwrite=cfg.overwrite,
    ))
    print(f"wrote {out}")
