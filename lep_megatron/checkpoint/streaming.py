"""Write a Megatron dist checkpoint straight from HF safetensors, without building the model.

A GPTModel built on the meta device has no storage, but its sharded state dict is the exact
checkpoint layout: keys (layers stacked under one key in megatron-core 0.16 and 0.19), global
shapes, dtypes and this rank's boxes with their replica ids. It goes through megatron's own
`dist_checkpointing.save` (factories, sharding validation, common state, metadata.json), whose
torch_dist strategy here writes the torch.distributed.checkpoint (DCP) files with a planner whose
`resolve_data` reads each box from the HF files just in time (StateDictAdapter.megatron_rows: QKV
interleave, gate/up fusion, vocabulary padding). Boxes are split into row blocks of at most
`max_chunk_bytes`, so memory holds one block, whatever the size of the model or of its largest
tensor. The directory is the one `dist_checkpointing.save` writes, for either megatron-core.
"""
import dataclasses
import math
import re
from pathlib import Path
from typing import Tuple

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
# the translation the torch_dist strategy applies before its DCP save (0.16 and 0.19 alike)
from megatron.core.dist_checkpointing.strategies.torch import (MCoreSavePlanner, TorchDistSaveShardedStrategy,
                                                               _replace_state_dict_keys_with_sharded_keys,
                                                               mcore_to_pyt_state_dict)
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from lep_megatron.checkpoint.hf_io import SafetensorsReader
from lep_megatron.checkpoint.megatron_io import CheckpointMeta, partial_checkpoint_dir
from lep_megatron.common.io import progress
from lep_megatron.models import HFModelShape, StateDictAdapter, build_stage_model

MAX_CHUNK_BYTES = 64 * 2**20
"""Largest block written (and so read back by DCP) in one piece."""

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED_PREFIX = "decoder.layers."


class HFBoxReader:
    """Boxes (offsets, sizes) of the global megatron tensors, read from HF safetensors."""

    def __init__(self, reader: SafetensorsReader, adapter: StateDictAdapter):
        self.reader, self.adapter = reader, adapter

    def read(self, key: str, offsets: Tuple[int, ...], sizes: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The box of checkpoint key `key`: under a stacked key (`decoder.layers.<name>`, leading
        layer axis) a box lies within one layer."""
        if key.startswith(_STACKED_PREFIX) and not _LAYER_KEY.match(key):
            if sizes[0] != 1:
                raise ValueError(f"{key}: a box {offsets}+{sizes} spans several layers")
            name, lead = f"{_STACKED_PREFIX}{offsets[0]}.{key[len(_STACKED_PREFIX):]}", 1
        else:
            name, lead = key, 0
        offsets, inner = offsets[lead:], sizes[lead:]
        out = torch.empty(inner, dtype=dtype)
        cols = slice(offsets[1], offsets[1] + inner[1]) if len(inner) > 1 else None
        self._fill_rows(name, offsets[0], out, cols)
        return out.view(sizes)

    def _fill_rows(self, name: str, first: int, out: torch.Tensor, cols) -> None:
        """out <- rows [first, first + len(out)) of megatron tensor `name`, columns `cols`."""
        last, pos = first + out.shape[0], 0
        for seg in self.adapter.megatron_rows(name):
            a, b = max(first, pos), min(last, pos + seg.rows)
            if a < b:
                dst = out[a - first:b - first]
                if seg.hf_name is None:
                    dst.zero_()
                else:
                    start = seg.start + a - pos
                    whole_rows = cols is None or (cols.start == 0 and cols.stop == self.reader.shape(seg.hf_name)[1])
                    if whole_rows and self.reader.dtype(seg.hf_name) == out.dtype:
                        self.reader.read_rows(seg.hf_name, start, start + b - a, out=dst)
                    else:
                        rows = self.reader.read_rows(seg.hf_name, start, start + b - a)
                        dst.copy_(rows if whole_rows else rows[:, cols])
            pos += seg.rows


def _row_blocks(item: WriteItem, max_bytes: int):
    """`item` split along its first axis longer than 1 into boxes of at most max_bytes."""
    chunk = item.tensor_data.chunk
    sizes = list(chunk.sizes)
    axis = next((a for a, n in enumerate(sizes) if n > 1), None)
    if axis is None:
        return [item]
    row_bytes = math.prod(sizes[axis + 1:]) * item.tensor_data.properties.dtype.itemsize
    if row_bytes * sizes[axis] <= max_bytes:
        return [item]
    step = max(1, max_bytes // row_bytes)
    blocks = []
    for start in range(0, sizes[axis], step):
        offsets, block = list(chunk.offsets), list(sizes)
        offsets[axis] += start
        block[axis] = min(step, sizes[axis] - start)
        box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(block))
        blocks.append(dataclasses.replace(
            item, index=MetadataIndex(item.index.fqn, torch.Size(offsets)),
            tensor_data=dataclasses.replace(item.tensor_data, chunk=box)))
    return blocks


class _HFSavePlanner(MCoreSavePlanner):
    """megatron's torch_dist save planner, with the tensors' data read from HF when written."""

    def __init__(self, boxes: HFBoxReader, max_chunk_bytes: int):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self.boxes, self.max_chunk_bytes = boxes, max_chunk_bytes
        self.ticks = iter(())
        self.written = None

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = [block for item in plan.items for block in
                 (_row_blocks(item, self.max_chunk_bytes) if item.type != WriteItemType.BYTE_IO else [item])]
        self.plan = dataclasses.replace(plan, items=items)
        n = sum(item.type != WriteItemType.BYTE_IO for item in items)
        self.ticks = progress(range(n), n, "hf-to-mcore blocks")
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)  # ShardedObjects, already serialized
        next(self.ticks, None)
        if self.written is not None:
            # torch's FileSystemWriter keeps every tensor it wrote (for its safetensors format),
            # which would hold one block per key: free the previous block, on disk by now
            self.written.untyped_storage().resize_(0)
        box, props = write_item.tensor_data.chunk, write_item.tensor_data.properties
        self.written = self.boxes.read(write_item.index.fqn, tuple(box.offsets), tuple(box.sizes), props.dtype)
        return self.written


class _StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """dist_checkpointing.save's torch_dist strategy, writing synchronously with _HFSavePlanner
    (megatron's own writes through a pool of writer processes, from tensors in memory)."""

    def __init__(self, planner: _HFSavePlanner):
        super().__init__("torch_dist", 1)
        self.planner = planner

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        # one thread, nothing resolved ahead: a block is written before the next is read
        writer = dcp.FileSystemWriter(checkpoint_dir, thread_count=1, per_thread_copy_ahead=0)
        dcp.save(mcore_to_pyt_state_dict(sharded, False), storage_writer=writer, planner=self.planner)
        next(self.planner.ticks, None)  # the last progress line


def save_from_hf(reader: SafetensorsReader, shape: HFModelShape, padded_vocab: int, dtype: torch.dtype,
                 out_dir: Path, meta: CheckpointMeta, hf_side_dir: Path = None, overwrite: bool = False,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
    """Collectively write this rank's stage/shard (at the TP/PP parallel_state was initialized
    with) of the HF model into a dist checkpoint at `out_dir`, atomically."""
    with torch.device("meta"):
        layout = build_stage_model(shape, padded_vocab, dtype, perform_initialization=False,
                                   use_cpu_initialization=True)
    planner = _HFSavePlanner(HFBoxReader(reader, StateDictAdapter(shape, padded_vocab)), max_chunk_bytes)
    with partial_checkpoint_dir(out_dir, meta, hf_side_dir, overwrite) as partial:
        # megatron's own save: factories, sharding validation, common state, metadata.json
        dist_checkpointing.save({"model": layout.sharded_state_dict()}, str(partial),
                                sharded_strategy=_StreamingSaveStrategy(planner))
