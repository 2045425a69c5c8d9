"""Megatron checkpoints: a dist_checkpointing directory plus what is needed to rebuild the model.

Layout of a checkpoint directory:
    <dir>/                 dist_checkpointing (torch_dist) files: resharded on load to any TP/PP
    <dir>/lep_model.json   CheckpointMeta: HF config, true and padded vocabulary, dtype
    <dir>/hf/              config.json, generation config and tokenizer files for HF export

A trainable-only checkpoint (what a frozen-body run saves) holds the tensors that train and
names its base_checkpoint for the rest; every reader here (load_model, CheckpointTensors)
follows that reference, so export, propagation, eval and resume take either kind.
"""
import contextlib
import inspect
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.serialization import (get_default_load_sharded_strategy,
                                                            get_default_save_sharded_strategy)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (FullyParallelLoadStrategyWrapper,
                                                                        FullyParallelSaveStrategyWrapper)
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
    base_checkpoint: Optional[str] = None
    """Absolute path of the checkpoint that holds the tensors this one does not (a trainable-only
    checkpoint of a frozen-body run; the base may itself be one); None: self-contained."""
    trained_tensors: Optional[List[str]] = None
    """Checkpoint keys of the model tensors stored here when base_checkpoint is set (the
    trainable ones); every other model tensor is read from base_checkpoint."""

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


def checkpoint_chain(ckpt_dir: Path) -> List[Tuple[Path, CheckpointMeta]]:
    """(directory, meta) of a checkpoint and of the base checkpoints it refers to, itself first."""
    chain = [(Path(ckpt_dir), CheckpointMeta.read(ckpt_dir))]
    while chain[-1][1].base_checkpoint is not None:
        referrer, base = chain[-1][0], Path(chain[-1][1].base_checkpoint)
        if not (base / META_NAME).is_file():
            raise UserInputError(f"{referrer} holds only the tensors that trained; the rest are in its base checkpoint "
                                 f"{base} (named in {referrer / META_NAME}), which is missing: restore it there, or "
                                 "save self-contained checkpoints with train.save_frozen_weights=true")
        if any(base.resolve() == d.resolve() for d, _ in chain):
            raise UserInputError(f"{referrer / META_NAME}: base_checkpoint {base} refers back to the chain {chain[0][0]}")
        chain.append((base, CheckpointMeta.read(base)))
    return chain


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
               overwrite: bool = False, extra_state=None, base_checkpoint: Optional[Path] = None,
               async_queue=None, then: Sequence[Callable[[], None]] = ()) -> None:
    """Collectively save `model` (this rank's stage/shard) to `out_dir`, atomically;
    `extra_state(model_sharded_state_dict) -> dict` (e.g. a trainer's optimizer and scheduler)
    is saved beside the model's tensors. With `base_checkpoint`, only the parameters that
    require grad are written and the checkpoint refers to the base for the others. With
    `async_queue` (megatron's AsyncCallsQueue) the shards are written by a background process and
    the directory is renamed into place, then `then` runs (collectively), when the queue
    finalizes the save; without it, the save is complete on return (the caller runs `then`)."""
    model_state = model.sharded_state_dict()
    if base_checkpoint is not None:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model_state = {name: entry for name, entry in model_state.items() if name in trainable}
        keys = [entry.key for entry in model_state.values()]
        if dist.is_initialized():  # each pipeline stage holds its own tensors; the meta lists them all
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, keys)
            keys = [key for rank_keys in every for key in rank_keys]
        meta = replace(meta, base_checkpoint=str(Path(base_checkpoint).absolute()), trained_tensors=sorted(set(keys)))
    extra = extra_state(model_state) if extra_state else {}
    if async_queue is None:
        with partial_checkpoint_dir(out_dir, meta, hf_side_dir, overwrite) as partial:
            dist_checkpointing.save({"model": model_state, **extra}, str(partial), sharded_strategy=_save_strategy())
        return
    partial = begin_partial(out_dir, overwrite)
    # megatron-core >= 0.17 defaults to NVIDIA's resiliency extension for async saves; its own
    # implementation (what 0.16 always uses) goes with its own AsyncCallsQueue
    own = {"async_strategy": "mcore"} if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters else {}
    request = dist_checkpointing.save({"model": model_state, **extra}, str(partial), sharded_strategy=_save_strategy(),
                                      async_sharded_save=True, **own)
    request.add_finalize_fn(lambda: finish_partial(partial, out_dir, meta, hf_side_dir))
    for fn in then:
        request.add_finalize_fn(fn)
    async_queue.schedule_async_request(request)


def _data_parallel_group():
    """The group over which ranks hold the same shards (None: one rank, or no megatron groups)."""
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return group if dist.get_world_size(group) > 1 else None


def _save_strategy():
    """Megatron's fully-parallel save: the data-parallel replicas split the writing of their
    shared shards instead of the first replica writing them all."""
    group = _data_parallel_group()
    if group is None:
        return None
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def load_sharded(request: dict, ckpt_dir: Path) -> dict:
    """dist_checkpointing.load with megatron's fully-parallel load: each data-parallel replica
    reads a share of the shards and they exchange the rest."""
    group = _data_parallel_group()
    strategy = None
    if group is not None:
        strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(ckpt_dir)), group)
    return dist_checkpointing.load(request, str(ckpt_dir), sharded_strategy=strategy)


@contextlib.contextmanager
def partial_checkpoint_dir(out_dir: Path, meta: CheckpointMeta, hf_side_dir: Path = None,
                           overwrite: bool = False) -> Iterator[Path]:
    """Collectively: yields `<out_dir>.partial` for every rank to write the dist checkpoint into;
    then rank 0 adds lep_model.json and hf/ and renames it to `out_dir` once every rank is done,
    so a save killed half-way leaves only a `.partial` directory behind."""
    partial = begin_partial(out_dir, overwrite)
    yield partial
    finish_partial(partial, out_dir, meta, hf_side_dir)


def begin_partial(out_dir: Path, overwrite: bool = False) -> Path:
    """Collectively: a fresh `<out_dir>.partial` directory for every rank to write into."""
    out_dir = Path(out_dir).absolute()
    partial = out_dir.with_name(out_dir.name + ".partial")
    if _rank() == 0:
        check_out_dir(out_dir, overwrite)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    return partial


def finish_partial(partial: Path, out_dir: Path, meta: CheckpointMeta, hf_side_dir: Path = None) -> None:
    """Collectively, once every rank's writes into `partial` are complete: rank 0 adds
    lep_model.json and hf/ and renames it to `out_dir`."""
    from lep_megatron.checkpoint.hf_io import copy_side_files

    out_dir = Path(out_dir).absolute()
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


def split_by_source(model_state: dict, ckpt_dir: Path) -> List[Tuple[Path, dict]]:
    """A model's sharded state dict split by the checkpoint of the chain that stores each entry:
    [(directory, entries)], the entries that trained first."""
    parts, rest = [], dict(model_state)
    for directory, meta in checkpoint_chain(ckpt_dir):
        held = set(meta.trained_tensors) if meta.base_checkpoint is not None else None
        mine = {name: entry for name, entry in rest.items() if held is None or entry.key in held}
        if mine:
            parts.append((directory, mine))
        rest = {name: entry for name, entry in rest.items() if name not in mine}
    return parts


def load_model(model, ckpt_dir: Path) -> None:
    """Load this rank's part of `model` from a checkpoint saved at any TP/PP (a trainable-only
    one too: its base checkpoints supply the other tensors)."""
    parts = split_by_source(model.sharded_state_dict(), ckpt_dir)
    for directory, request in parts:
        state = load_sharded({"model": request}, directory)
        model.load_state_dict(state["model"], strict=len(parts) == 1)


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
        chain = checkpoint_chain(ckpt_dir)
        self.num_layers = chain[0][1].shape.num_layers
        # a trainable-only checkpoint's tensors, then its bases' for the rest
        self.stored, self.source = {}, {}
        for directory, _ in chain:
            for key, value in dist_checkpointing.load_tensors_metadata(str(directory)).items():
                if isinstance(value, ShardedTensor) and key not in self.stored:
                    self.stored[key], self.source[key] = value, str(directory)

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
        dcp.load({key: buffer}, storage_reader=dcp.FileSystemReader(self.source[key]),
                 planner=_BoxLoadPlanner(key, offsets, buffer))
        return buffer if layer is None else buffer[0]

    def __iter__(self):
        raise TypeError("CheckpointTensors is read by name")

    def __len__(self) -> int:
        return len(self.stored)
