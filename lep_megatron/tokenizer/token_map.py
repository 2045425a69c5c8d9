"""The token map: the averaging matrix T of the method (new vocabulary x original vocabulary).

Row t lists the original ids that new token t decomposes into, with weights summing to 1
(CSR: offsets [N_new + 1], indices [nnz], weights [nnz]). An empty row means "no
decomposition" (the init stage applies its fallback rule). Written by the tokenizer stage,
read by the init stage (I_new = T.I_old, O_new = T.O_old) and by LEP's conversion mode.
"""
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lep_megatron.common.io import UserInputError

FORMAT_VERSION = "1"


@dataclass
class TokenMap:
    """CSR averaging matrix from a new tokenizer's ids to an original tokenizer's ids."""

    offsets: torch.Tensor
    """int64 [new_vocab_size + 1]: row t spans indices[offsets[t]:offsets[t+1]]."""
    indices: torch.Tensor
    """int64 [nnz]: original token ids."""
    weights: torch.Tensor
    """float32 [nnz]: averaging weights; each non-empty row sums to 1."""
    old_vocab_size: int
    """Number of rows of the original embedding table the indices refer to."""
    meta: Dict[str, str] = field(default_factory=dict)
    """Free-form provenance: tokenizer fingerprints (`new_tokenizer`, `old_tokenizer`), method."""

    def __post_init__(self):
        n = self.offsets.numel() - 1
        if n < 0 or self.offsets[0] != 0 or self.offsets[-1] != self.indices.numel():
            raise UserInputError("token map: offsets must start at 0 and end at len(indices)")
        if self.indices.numel() != self.weights.numel():
            raise UserInputError("token map: indices and weights differ in length")
        if self.indices.numel() and (self.indices.min() < 0 or self.indices.max() >= self.old_vocab_size):
            raise UserInputError(
                f"token map: original ids must lie in [0, {self.old_vocab_size}); "
                "the map was built for another original tokenizer"
            )

    @property
    def new_vocab_size(self) -> int:
        return self.offsets.numel() - 1

    def dense(self, dtype=torch.float64) -> torch.Tensor:
        """T as a dense [new_vocab_size, old_vocab_size] matrix (tests and small models only)."""
        rows = torch.repeat_interleave(torch.arange(self.new_vocab_size), self.offsets.diff())
        out = torch.zeros(self.new_vocab_size, self.old_vocab_size, dtype=dtype)
        out.index_put_((rows, self.indices), self.weights.to(dtype), accumulate=True)
        return out

    def save(self, path: Path) -> None:
        meta = dict(self.meta, format_version=FORMAT_VERSION, old_vocab_size=str(self.old_vocab_size))
        tensors = {"offsets": self.offsets.long(), "indices": self.indices.long(), "weights": self.weights.float()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> "TokenMap":
        path = Path(path)
        if not path.is_file():
            raise UserInputError(f"token_map={path} does not exist; build it with `lep-megatron tokenizer map`")
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            missing = {"offsets", "indices", "weights"} - set(f.keys())
            if missing or "old_vocab_size" not in meta:
                raise UserInputError(f"token_map={path} is not a token map (missing {sorted(missing) or 'metadata'})")
            tensors = {k: f.get_tensor(k) for k in ("offsets", "indices", "weights")}
        old = int(meta.pop("old_vocab_size"))
        meta.pop("format_version", None)
        return cls(old_vocab_size=old, meta=meta, **tensors)


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """sha256 over the tokenizer's vocabulary files, to tie artifacts to the tokenizer that made them."""
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model"):
        p = Path(tokenizer_dir) / name
        if p.is_file():
            h.update(name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()
