"""A stage's hydra config composed outside its app, and its boolean flags read one way everywhere.

launch/pretrain.sh asks this module, not a string match, whether a command line is a dry run
(and where its out_dir is) before it launches anything:

    python -m lep_megatron.common.config pretrain dry_run:bool out_dir -- key=value ...

prints one line per requested key (a `:bool` key as true/false, a missing or null value as an
empty line); a bad override or a flag that is not a boolean ends with `lep-megatron <stage>:
error: ...` and exit code 2, as the stage itself would.
"""
import sys
from typing import Any, List, Optional, Sequence

from lep_megatron.common.io import UserInputError


def stage_overrides(argv: Sequence[str]) -> List[str]:
    """The overrides the stage app sees for a command line (as lep_megatron.cli: a bare first
    word is the stage's action)."""
    argv = list(argv)
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        argv = [f"action={argv[0]}"] + argv[1:]
    return argv


def compose(stage: str, overrides: Sequence[str] = ()):
    """conf/<stage>.yaml with the overrides, as the stage's hydra app composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if GlobalHydra.instance().is_initialized():
            return hydra_compose(config_name=stage, overrides=list(overrides))
        with initialize_config_module("lep_megatron.conf", version_base=None):
            return hydra_compose(config_name=stage, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise UserInputError(str(err).strip()) from err


def flag(value: Any, key: str) -> bool:
    """A boolean setting the way OmegaConf converts one to bool (true/false, yes/no, on/off, y/n,
    1/0 and other integers; null is false); anything else is an error naming the key."""
    from omegaconf.errors import ValidationError
    from omegaconf.nodes import BooleanNode

    try:
        return bool(BooleanNode(value)._value())
    except ValidationError:
        raise UserInputError(f"{key}={value!r} is not a boolean: use {key}=true or {key}=false") from None


def _value(cfg, key: str) -> Optional[Any]:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv or argv.index("--") < 2:
        print("usage: python -m lep_megatron.common.config STAGE KEY[:bool] ... -- [key=value ...]", file=sys.stderr)
        sys.exit(2)
    split = argv.index("--")
    stage, keys, overrides = argv[0], argv[1:split], argv[split + 1:]
    try:
        cfg = compose(stage, stage_overrides(overrides))
        lines = []
        for key in keys:
            name, _, kind = key.partition(":")
            value = _value(cfg, name)
            if kind == "bool":
                lines.append("true" if flag(value, name) else "false")
            else:
                lines.append("" if value is None else str(value))
    except UserInputError as err:
        print(f"lep-megatron {stage}: error: {err}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
