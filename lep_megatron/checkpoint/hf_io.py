"""Hugging Face checkpoint files: sharded safetensors in (lazily) and out (in size-bounded shards)."""
import json
import shutil
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lep_megatron.common.io import UserInputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# files that travel with the weights: tokenizer, chat template, generation settings
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)


class SafetensorsReader:
    """Name -> tensor access over a (sharded) safetensors checkpoint, one tensor in memory at a time."""

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
        self._handles = {}
        if weight_map is None:
            self._file_of = {k: SINGLE_NAME for k in self._open(SINGLE_NAME).keys()}
        else:
            self._file_of = dict(weight_map)
            for name in sorted(set(weight_map.values())):
                keys = set(self._open(name).keys())
                listed = {k for k, f in weight_map.items() if f == name}
                if listed - keys:
                    raise UserInputError(
                        f"{self.model_dir / name} lacks tensors that {INDEX_NAME} places there "
                        f"(e.g. {sorted(listed - keys)[0]}); the shard is incomplete or the index stale"
                    )

    def _open(self, file_name: str):
        if file_name not in self._handles:
            path = self.model_dir / file_name
            if not path.is_file():
                raise UserInputError(f"shard {path} is missing (listed in {INDEX_NAME}); re-download it")
            try:
                self._handles[file_name] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise UserInputError(f"shard {path} is unreadable (truncated or corrupt?): {e}") from e
        return self._handles[file_name]

    def keys(self) -> List[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise UserInputError(f"{self.model_dir}: tensor {name!r} missing from the checkpoint")
        file_name = self._file_of[name]
        try:
            return self._open(file_name).get_tensor(name)
        except SafetensorError as e:
            raise UserInputError(f"{self.model_dir / file_name}: cannot read {name!r}: {e}") from e

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())


class ShardedSafetensorsWriter:
    """Writes tensors in order into shards of at most `max_shard_bytes`, then an index json."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = 5 * 2**30):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: Dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: List[Dict[str, torch.Tensor]] = []
        self._files: List[Tuple[str, List[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        tmp_name = f"shard-{len(self._files):05d}.safetensors"
        save_file(self._pending, str(self.out_dir / tmp_name), metadata={"format": "pt"})
        self._files.append((tmp_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._files:
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


def iter_tensors(reader: SafetensorsReader, names: Iterable[str]) -> Iterator[Tuple[str, torch.Tensor]]:
    for name in names:
        yield name, reader.get(name)
