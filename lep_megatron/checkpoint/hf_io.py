"""Hugging Face checkpoint files: sharded safetensors in and out, one tensor (or row block) at a time.

Both directions handle the documented safetensors layout themselves (8-byte little-endian header
length, JSON header of dtype / shape / data_offsets, then the raw bytes) so that no tensor is
copied on its way: reads go with pread straight into the destination tensor (no memory map, whose
touched pages would stay in the process's RSS), writes go from each tensor's own memory (the
safetensors package serializes a whole shard into one bytes object first).
"""
import ctypes
import json
import math
import os
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

from lep_megatron.common.io import UserInputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# files that travel with the weights: tokenizer, chat template, generation settings
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# bytes moved per read/write call: bounds the transient of a dtype conversion while writing
IO_BLOCK_BYTES = 64 * 2**20
_HEADER_LIMIT = 100 * 2**20  # the safetensors format's own limit


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy; valid while the tensor lives.
    (Not through numpy, which would make the tensor's storage non-resizable for good.)"""
    if tensor.nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())).cast("B")


class _Entry:
    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype, shape, begin, end):
        self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end


def _read_header(path: Path) -> Tuple[int, Dict[str, _Entry]]:
    """(byte offset of the data section, name -> entry); UserInputError naming the file if the
    file is unreadable, not safetensors, or shorter than its header says (truncated)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > _HEADER_LIMIT or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        entries = {name: _Entry(DTYPES[e["dtype"]], tuple(e["shape"]), *e["data_offsets"])
                   for name, e in header.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise UserInputError(f"shard {path} is unreadable (truncated or not safetensors?): {e}") from e
    end = max((e.end for e in entries.values()), default=0)
    if 8 + n + end > size:
        raise UserInputError(f"shard {path} is truncated: its header needs {8 + n + end} bytes, the file "
                             f"has {size}; re-download it")
    return 8 + n, entries


class SafetensorsReader:
    """Name -> tensor access over a (sharded) safetensors checkpoint; reads only what is asked for."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserInputError(f"{index} is not a safetensors index (no weight_map): {e}") from e
        elif (self.model_dir / SINGLE_NAME).is_file():
            weight_map = None
        elif list(self.model_dir.glob("*.bin")):
            raise UserInputError(
                f"{self.model_dir} holds PyTorch .bin weights; convert them to safetensors first "
                "(transformers: model.save_pretrained(dir, safe_serialization=True))"
            )
        else:
            raise UserInputError(f"{self.model_dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        self._files: Dict[str, Tuple[int, Dict[str, _Entry]]] = {}
        if weight_map is None:
            self._file_of = {k: SINGLE_NAME for k in self._header(SINGLE_NAME)[1]}
        else:
            self._file_of = dict(weight_map)
            for name in sorted(set(weight_map.values())):
                keys = set(self._header(name)[1])
                listed = {k for k, f in weight_map.items() if f == name}
                if listed - keys:
                    raise UserInputError(
                        f"{self.model_dir / name} lacks tensors that {INDEX_NAME} places there "
                        f"(e.g. {sorted(listed - keys)[0]}); the shard is incomplete or the index stale"
                    )

    def _header(self, file_name: str):
        if file_name not in self._files:
            path = self.model_dir / file_name
            if not path.is_file():
                raise UserInputError(f"shard {path} is missing (listed in {INDEX_NAME}); re-download it")
            self._files[file_name] = _read_header(path)
        return self._files[file_name]

    def _entry(self, name: str) -> _Entry:
        if name not in self._file_of:
            raise UserInputError(f"{self.model_dir}: tensor {name!r} missing from the checkpoint")
        return self._header(self._file_of[name])[1][name]

    def keys(self) -> List[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self.read_rows(name, 0, self.shape(name)[0] if self.shape(name) else None)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (its first dimension), read into `out` (a contiguous
        tensor of the stored dtype and shape) or a new tensor. A 0-d tensor is read whole."""
        e = self._entry(name)
        shape = (stop - start,) + e.shape[1:] if e.shape else ()
        if out is None:
            out = torch.empty(shape, dtype=e.dtype)
        if tuple(out.shape) != shape or out.dtype != e.dtype or not out.is_contiguous():
            raise ValueError(f"read_rows({name}): out is {out.dtype} {tuple(out.shape)}, needs {e.dtype} {shape}")
        row_bytes = out.element_size() * math.prod(e.shape[1:])
        data_start = self._header(self._file_of[name])[0]
        offset = data_start + e.begin + start * row_bytes
        path = self.model_dir / self._file_of[name]
        buf = _as_bytes(out)
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < len(buf):
                n = os.preadv(f.fileno(), [buf[done:done + IO_BLOCK_BYTES]], offset + done)
                if n == 0:
                    raise UserInputError(f"shard {path} ended while reading {name!r}: truncated?")
                done += n
        return out


def _header_bytes(specs: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in specs:
        nbytes = _nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _write_tensor(f, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """Write `tensor` as `dtype`, from its own memory; a dtype change goes one row block at a time."""
    tensor = tensor.detach().cpu().contiguous()
    flat = tensor.reshape(-1)
    if tensor.dtype == dtype:
        buf = _as_bytes(flat)
        for i in range(0, len(buf), IO_BLOCK_BYTES):
            f.write(buf[i:i + IO_BLOCK_BYTES])
        return
    step = max(1, IO_BLOCK_BYTES // max(tensor.element_size(), _nbytes((), dtype)))
    for i in range(0, flat.numel(), step):
        block = flat[i:i + step].to(dtype)
        f.write(_as_bytes(block))


class ShardedSafetensorsWriter:
    """Writes tensors in order into shards of at most `max_shard_bytes`, then an index json.

    With `expect(specs)` (name, shape, dtype of every tensor, in the order they will be added) the
    shard layout is known up front: each shard's header is written first and every tensor goes to
    disk as it is added, so memory holds one tensor. Without it, tensors are held until their shard
    is full (the header needs all of them), then written.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 2**30):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: List[Tuple[str, torch.Tensor]] = []
        self._pending_bytes = 0
        self._planned: List[List[Tuple[str, Tuple[int, ...], torch.dtype]]] = None
        self._next = (0, 0)  # (shard, position) of the next expected tensor
        self._stream = None
        self._files: List[Tuple[str, List[str]]] = []
        self.total_bytes = 0

    def expect(self, specs: Iterable[Tuple[str, Sequence[int], torch.dtype]]) -> None:
        if self._planned is not None or self._pending or self._files:
            raise RuntimeError("expect() must come first and only once")
        shards, size = [[]], 0
        for name, shape, dtype in specs:
            nbytes = _nbytes(shape, dtype)
            if shards[-1] and size + nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        self._planned = shards

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Add the next tensor; with expect(), it is written now, as the declared dtype."""
        if self._planned is None:
            nbytes = tensor.numel() * tensor.element_size()
            if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
                self._flush()
            self._pending.append((name, tensor.contiguous()))
            self._pending_bytes += nbytes
            self.total_bytes += nbytes
            return
        shard, pos = self._next
        if shard >= len(self._planned):
            raise RuntimeError(f"{name}: more tensors added than expected")
        want = self._planned[shard][pos]
        if (name, tuple(tensor.shape)) != want[:2]:
            raise RuntimeError(f"added {name} {tuple(tensor.shape)}, expected {want[0]} {want[1]}")
        if pos == 0:
            self._stream = self._open_shard(self._planned[shard])
        _write_tensor(self._stream, tensor, want[2])
        self.total_bytes += _nbytes(want[1], want[2])
        if pos + 1 == len(self._planned[shard]):
            self._stream.close()
            self._next = (shard + 1, 0)
        else:
            self._next = (shard, pos + 1)

    def _open_shard(self, specs):
        tmp_name = f"shard-{len(self._files):05d}.safetensors"
        self._files.append((tmp_name, [s[0] for s in specs]))
        stream = open(self.out_dir / tmp_name, "wb")
        stream.write(_header_bytes(specs))
        return stream

    def _flush(self) -> None:
        specs = [(name, tuple(t.shape), t.dtype) for name, t in self._pending]
        with self._open_shard(specs) as stream:
            for _, tensor in self._pending:
                _write_tensor(stream, tensor, tensor.dtype)
        self._pending, self._pending_bytes = [], 0

    def close(self) -> None:
        if self._planned is not None:
            if self._next[0] < len(self._planned) and self._planned[self._next[0]]:
                raise RuntimeError(f"closed before {self._planned[self._next[0]][self._next[1]][0]} was added")
            if not self._files:
                self._open_shard([]).close()
        elif self._pending or not self._files:
            self._flush()
        n = len(self._files)
        if n == 1:
            (self.out_dir / self._files[0][0]).rename(self.out_dir / SINGLE_NAME)
            return
        weight_map = {}
        for i, (tmp_name, names) in enumerate(self._files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out_dir / tmp_name).rename(self.out_dir / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def copy_side_files(src: Path, dst: Path, names: Iterable[str] = SIDE_FILES) -> List[str]:
    copied = []
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
