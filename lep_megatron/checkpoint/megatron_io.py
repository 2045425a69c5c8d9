"""Megatron checkpoints: a dist_checkpointing directory plus what is needed to rebuild the model.

Layout of a checkpoint directory:
    <dir>/                 dist_checkpointing (torch_dist) files: resharded on load to any TP/PP
    <dir>/lep_model.json   CheckpointMeta: HF config, true and padded vocabulary, dtype
    <dir>/hf/              config.json, generation config and tokenizer files for HF export
"""
import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

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
    lora: Optional[dict] = None
    """LoRA adapters in the checkpoint (lep_megatron.models.lora.LoRAConfig as a dict: rank,
    alpha, layers, ...); None: none. Export merges them (or writes them as a peft adapter)."""

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


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint dir itself, or a `lep-megatron pretrain` run dir -> the checkpoint its
    checkpoints/latest pointer names (what a later stage of a pipeline reads)."""
    path = Path(path)
    pointer = path / "checkpoints" / "latest"
    if not (path / META_NAME).is_file() and pointer.is_file():
        return pointer.parent / pointer.read_text().strip()
    return path


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_model(model, out_dir: Path, meta: CheckpointMeta, hf_side_dir: Path = None,
               overwrite: bool = False, extra_state=None) -> None:
    """Collectively save `model` (this rank's stage/shard) to `out_dir`, atomically;
    `extra_state(model_sharded_state_dict) -> dict` (e.g. a trainer's optimizer and scheduler)
    is saved beside the model's tensors."""
    with partial_checkpoint_dir(out_dir, meta, hf_side_dir, overwrite) as partial:
        model_state = model.sharded_state_dict()
        extra = extra_state(model_state) if extra_state else {}
        dist_checkpointing.save({"model": model_state, **extra}, str(partial))


@contextlib.contextmanager
def partial_checkpoint_dir(out_dir: Path, meta: CheckpointMeta, hf_side_dir: Path = None,
                           overwrite: bool = False) -> Iterator[Path]:
    """Collectively: yields `<out_dir>.partial` for every rank to write the dist checkpoint into;
    then rank 0 adds lep_model.json and hf/ and renames it to `out_dir` once every rank is done,
    so a save killed half-way leaves only a `.partial` directory behind."""
    from lep_megatron.checkpoint.hf_io import copy_side_files

    out_dir = Path(out_dir).absolute()
    partial = out_dir.with_name(out_dir.name + ".partial")
    if _rank() == 0:
        check_out_dir(out_dir, overwrite)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    yield partial
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
    either way only the requested layer is read. With `shapes_only`, items are meta tensors of
    the stored shape and dtype: the layout, with nothing read.
    """

    def __init__(self, ckpt_dir: Path, shapes_only: bool = False):
        self.ckpt_dir = str(ckpt_dir)
        self.shapes_only = shapes_only
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
        return self.read(*where)

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """Stored tensor `key` whole, or its slice `layer` along a leading stacking axis."""
        shape, dtype = tuple(self.stored[key].global_shape), self.stored[key].dtype
        if layer is None:
            offsets = (0,) * len(shape)
        else:
            offsets, shape = (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:]
        if self.shapes_only:
            return torch.empty(shape if layer is None else shape[1:], dtype=dtype, device="meta")
        buffer = torch.empty(shape, dtype=dtype)
        dcp.load({key: buffer}, storage_reader=dcp.FileSystemReader(self.ckpt_dir),
                 planner=_BoxLoadPlanner(key, offsets, buffer))
        return buffer if layer is None else buffer[0]

    def __iter__(self):
        raise TypeError("CheckpointTensors is read by name")

    def __len__(self) -> int:
        return len(self.stored)
