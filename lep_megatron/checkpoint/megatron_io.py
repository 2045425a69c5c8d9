"""Megatron checkpoints: a dist_checkpointing directory plus what is needed to rebuild the model.

Layout of a checkpoint directory:
    <dir>/                 dist_checkpointing (torch_dist) files: resharded on load to any TP/PP
    <dir>/lep_model.json   CheckpointMeta: HF config, true and padded vocabulary, dtype
    <dir>/hf/              config.json, generation config and tokenizer files for HF export
"""
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

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
               overwrite: bool = False, extra_state=None) -> None:
    """Collectively save `model` (this rank's stage/shard) to `out_dir`, atomically;
    `extra_state(model_sharded_state_dict) -> dict` (e.g. a trainer's optimizer and scheduler)
    is saved beside the model's tensors.

    All ranks write into `<out_dir>.partial`; rank 0 renames it to `out_dir` once every rank is
    done, so a save killed half-way leaves only a `.partial` directory behind.
    """
    from lep_megatron.checkpoint.hf_io import copy_side_files

    out_dir = Path(out_dir).absolute()
    partial = out_dir.with_name(out_dir.name + ".partial")
    if _rank() == 0:
        check_out_dir(out_dir, overwrite)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    model_state = model.sharded_state_dict()
    extra = extra_state(model_state) if extra_state else {}
    dist_checkpointing.save({"model": model_state, **extra}, str(partial))
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
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt_dir))
    model.load_state_dict(state["model"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class _BoxLoadPlanner(DefaultLoadPlanner):
    """Reads one box (offsets, buffer shape) of one stored tensor straight into a buffer.

    megatron's own partial loads describe a slice as one fragment of an evenly split tensor and
    expect the other fragments on other ranks; one process reading one layer has no such ranks.
    """

    def __init__(self, key: str, offsets, buffer: torch.Tensor):
        super().__init__()
        self.key, self.offsets, self.buffer = key, offsets, buffer

    def create_local_plan(self) -> LoadPlan:
        box = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.buffer.size())
        return LoadPlan(create_read_items_for_chunk_list(self.key, self.metadata.state_dict_metadata[self.key], [box]))

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.buffer


_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


class CheckpointTensors(Mapping):
    """Read-only name -> full tensor view of a checkpoint that reads one tensor at a time.

    Names are GPTModel.state_dict() names at TP1/PP1 (`decoder.layers.3.mlp.linear_fc1.weight`);
    whatever TP/PP wrote the checkpoint, a tensor comes back whole. Layers may be stored stacked
    under one key with a leading layer axis (megatron-core 0.16) or under one key per layer;
    either way only the requested layer is read.
    """

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir = str(ckpt_dir)
        self.num_layers = CheckpointMeta.read(ckpt_dir).shape.num_layers
        self.stored = {k: v for k, v in dist_checkpointing.load_tensors_metadata(self.ckpt_dir).items()
                       if isinstance(v, ShardedTensor)}

    def _locate(self, name: str):
        """(stored key, layer index within a stacked key or None), or None when absent."""
        if name in self.stored:
            return name, None
        m = _LAYER_NAME.match(name)
        stacked = f"decoder.layers.{m.group(2)}" if m else None
        if stacked in self.stored and self.stored[stacked].global_shape[0] == self.num_layers:
            return stacked, int(m.group(1))
        return None

    def __contains__(self, name) -> bool:
        return self._locate(name) is not None

    def __getitem__(self, name: str) -> torch.Tensor:
        where = self._locate(name)
        if where is None:
            raise KeyError(f"{name} is not in checkpoint {self.ckpt_dir}")
        key, layer = where
        shape, dtype = tuple(self.stored[key].global_shape), self.stored[key].dtype
        if layer is None:
            offsets = (0,) * len(shape)
        else:
            offsets, shape = (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:]
        buffer = torch.empty(shape, dtype=dtype)
        dcp.load({key: buffer}, storage_reader=dcp.FileSystemReader(self.ckpt_dir),
                 planner=_BoxLoadPlanner(key, offsets, buffer))
        return buffer if layer is None else buffer[0]

    def __iter__(self):
        raise TypeError("CheckpointTensors is read by name")

    def __len__(self) -> int:
        return len(self.stored)
