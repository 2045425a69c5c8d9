"""Megatron checkpoints: a dist_checkpointing directory plus what is needed to rebuild the model.

Layout of a checkpoint directory:
    <dir>/                 dist_checkpointing (torch_dist) files: resharded on load to any TP/PP
    <dir>/lep_model.json   CheckpointMeta: HF config, true and padded vocabulary, dtype
    <dir>/hf/              config.json, generation config and tokenizer files for HF export
"""
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

from lep_megatron.common.io import UserInputError, check_out_dir
from lep_megatron.models.hf_config import HFModelShape

META_NAME = "lep_model.json"
HF_SUBDIR = "hf"


@dataclass
class CheckpointMeta:
    """What a Megatron checkpoint of ours records beside the weights."""

    hf_config: dict
    """The HF config.json the model was converted from (architecture, special token ids)."""
    vocab_size: int
    """True vocabulary size; rows beyond it are padding and are stripped on export."""
    padded_vocab_size: int
    """Rows of the embedding / output tables as stored (divisible by the TP it was padded for)."""
    make_vocab_size_divisible_by: int
    """Padding granularity per TP rank."""
    dtype: str
    """Parameter dtype of the stored tensors."""
    megatron_core_version: str
    """megatron-core that wrote the checkpoint."""

    @property
    def shape(self) -> HFModelShape:
        return HFModelShape.from_hf_config(self.hf_config, source=META_NAME)

    def check_tp(self, tp: int) -> None:
        if self.padded_vocab_size % tp:
            raise UserInputError(
                f"checkpoint vocabulary is padded to {self.padded_vocab_size} rows, not divisible by "
                f"parallel.tp={tp}; re-convert it with `lep-megatron convert hf-to-mcore parallel.tp={tp}`"
            )

    def write(self, ckpt_dir: Path) -> None:
        (Path(ckpt_dir) / META_NAME).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def read(cls, ckpt_dir: Path) -> "CheckpointMeta":
        path = Path(ckpt_dir) / META_NAME
        if not Path(ckpt_dir).is_dir():
            raise UserInputError(f"Megatron checkpoint directory {ckpt_dir} does not exist")
        if not path.is_file():
            raise UserInputError(
                f"{path} not found: {ckpt_dir} is not a lep-megatron checkpoint "
                "(make one with `lep-megatron convert hf-to-mcore`)"
            )
        return cls(**json.loads(path.read_text()))


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_model(model, out_dir: Path, meta: CheckpointMeta, hf_side_dir: Path = None,
               overwrite: bool = False) -> None:
    """Collectively save `model` (this rank's stage/shard) to `out_dir`, atomically.

    All ranks write into `<out_dir>.partial`; rank 0 renames it to `out_dir` once every rank is done.
    """
    from lep_megatron.checkpoint.hf_io import copy_side_files

    out_dir = Path(out_dir).absolute()
    partial = out_dir.with_name(out_dir.name + ".partial")
    if _rank() == 0:
        check_out_dir(out_dir, overwrite)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(partial))
    if _rank() == 0:
        meta.write(partial)
        (partial / HF_SUBDIR).mkdir()
        (partial / HF_SUBDIR / "config.json").write_text(json.dumps(meta.hf_config, indent=2))
        if hf_side_dir is not None:
            copy_side_files(hf_side_dir, partial / HF_SUBDIR)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(partial, out_dir)
    _barrier()


def load_model(model, ckpt_dir: Path) -> None:
    """Load this rank's part of `model` from a checkpoint saved at any TP/PP."""
    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir))
    model.load_state_dict(state)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
