"""`lep-megatron tokenizer <action>`: the hydra entry of the tokenizer stage (conf/tokenizer.yaml).

    lep-megatron tokenizer train corpus=data/corpus/train.txt out_dir=runs/tok/bpe vocab_size=32000
    lep-megatron tokenizer extend original=mistral-7b corpus=data/corpus/train.txt out_dir=runs/tok/ext
    lep-megatron tokenizer optimize original=llama-3 corpus=... new_vocab_size=64000 out_dir=...
    lep-megatron tokenizer report tokenizer=[mistral-7b,runs/tok/ext] corpus=data/corpus/heldout.txt out=r.json
    lep-megatron tokenizer map tokenizer=runs/tok/bpe original=mistral-7b out=runs/tok/bpe/token_map.safetensors
    lep-megatron tokenizer originals out_dir=runs/originals   # write the packaged originals as HF dirs
"""
import logging
from dataclasses import MISSING, fields
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lep_megatron.common.app import stage_app
from lep_megatron.common.io import UserInputError
from lep_megatron.tokenizer import originals as O
from lep_megatron.tokenizer.extend import ExtendConfig, extend
from lep_megatron.tokenizer.optimize import OptimizeConfig, optimize
from lep_megatron.tokenizer.report import ReportConfig, report
from lep_megatron.tokenizer.token_map import build_token_map
from lep_megatron.tokenizer.train import TrainConfig, train

log = logging.getLogger("lep_megatron.tokenizer")


def _build(cls, cfg: dict, **renamed):
    """A config dataclass from the flat hydra keys it declares (`renamed`: field <- key)."""
    key = {f.name: renamed.get(f.name, f.name) for f in fields(cls)}
    values = {name: cfg[k] for name, k in key.items() if cfg.get(k) is not None}
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [key[name] for name in required if name not in values]
    if missing:
        raise UserInputError(f"tokenizer {cfg['action']} needs {', '.join(f'{k}=...' for k in missing)}")
    return cls(**values)


def run(cfg: dict) -> None:
    action = cfg["action"]
    cache = Path(cfg["cache_dir"]).expanduser()
    if action == "train":
        log.info("wrote %s", train(_build(TrainConfig, cfg)))
    elif action == "extend":
        log.info("wrote %s", extend(_build(ExtendConfig, dict(cfg, cache_dir=str(cache)))))
    elif action == "optimize":
        log.info("wrote %s", optimize(_build(OptimizeConfig, dict(cfg, cache_dir=str(cache)))))
    elif action == "report":
        report(_build(ReportConfig, cfg, tokenizers="tokenizer"), lambda name: O.resolve(name, cache, "tokenizer"))
    elif action == "map":
        for key in ("tokenizer", "original", "out"):
            if not cfg.get(key):
                raise UserInputError(f"tokenizer map needs {key}=...")
        token_map = build_token_map(
            O.resolve(cfg["tokenizer"], cache, "tokenizer"), O.resolve(cfg["original"], cache),
            cfg["exclude_old_ids"] or (), cfg["weighting"], cfg["wmean_decay"],
        )
        Path(cfg["out"]).parent.mkdir(parents=True, exist_ok=True)
        token_map.save(Path(cfg["out"]))
        log.info("wrote %s (%s)", cfg["out"], token_map.meta["rules"])
    elif action == "originals":
        if not cfg.get("out_dir"):
            raise UserInputError("tokenizer originals needs out_dir=DIR")
        for name in O.ORIGINALS:
            log.info("wrote %s", O.materialize(name, Path(cfg["out_dir"]) / name, cfg["overwrite"]))
    else:
        raise UserInputError(f"action={action!r}: choose train, extend, optimize, report, map or originals")


@stage_app("tokenizer")
def main(cfg: DictConfig) -> None:
    run(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
