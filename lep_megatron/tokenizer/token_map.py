"""The token map: the averaging matrix T of the method (new vocabulary x original vocabulary).

Row t lists the original ids that new token t decomposes into, with weights summing to 1
(CSR: offsets [N_new + 1], indices [nnz], weights [nnz]). An empty row means "no
decomposition" (the init stage applies its fallback rule). Written by the tokenizer stage,
read by the init stage (I_new = T.I_old, O_new = T.O_old) and by LEP's conversion mode.
"""
import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lep_megatron.common.io import UserInputError
from lep_megatron.tokenizer import vocab as V

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


def _without_auto_prefix(spec: dict) -> dict:
    """A copy of a tokenizer.json that adds no leading-space piece and no bos/eos: the method
    encodes a new token's text as a fragment of running text, not as the start of a document."""
    spec = dict(spec, normalizer=copy.deepcopy(spec.get("normalizer")), pre_tokenizer=copy.deepcopy(spec.get("pre_tokenizer")))

    def strip(node, seq_key):
        if not node:
            return node
        if node.get("type") == "Sequence":
            node[seq_key] = [strip(child, seq_key) for child in node[seq_key] if child.get("type") != "Prepend"]
            return node
        if node.get("type") == "Prepend":
            return None
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
        if node.get("type") == "ByteLevel":
            node["add_prefix_space"] = False
        return node

    spec["normalizer"] = strip(spec.get("normalizer"), "normalizers")
    spec["pre_tokenizer"] = strip(spec.get("pre_tokenizer"), "pretokenizers")
    spec["post_processor"] = None
    return spec


def _row_weights(pieces: List[str], old_kind: str, weighting: str, decay: float) -> List[float]:
    if weighting == "mean":
        return [1.0 / len(pieces)] * len(pieces)
    # "wmean": later sub-tokens count less; whitespace-only ones barely count
    raw = []
    for i, piece in enumerate(pieces):
        text = V.piece_to_bytes(piece, old_kind) or b"x"
        raw.append(math.exp(-decay * i) * (0.1 if not text.strip() else 1.0))
    total = sum(raw)
    return [w / total for w in raw]


def build_token_map(
    new_dir: Path,
    old_dir: Path,
    exclude_old_ids: Iterable[int] = (),
    weighting: str = "mean",
    wmean_decay: float = 0.5,
) -> "TokenMap":
    """T for a new tokenizer dir against an original tokenizer dir (method section 2).

    Per new token, first rule that applies:
    1. an added/special token: the original id of the same string, else an empty row;
    2. the same piece in the original vocabulary (same alphabet): that id;
    3. a piece spelling the same bytes in the original (`▁при` ~ `Ġпри`, `<0xD0>` ~ `Ð`): that id;
    4. the piece's text (byte-level pieces decoded first) encoded by the original without
       automatic prefix or bos: those ids, averaged;
    5. bytes that are not whole UTF-8 text: the original's byte pieces for them.
    Ids in exclude_old_ids (untrained rows) are dropped from every row.
    """
    if weighting not in ("mean", "wmean"):
        raise UserInputError(f"weighting={weighting!r}: choose mean or wmean")
    new_spec, old_spec = V.load_tokenizer_json(new_dir, "tokenizer"), V.load_tokenizer_json(old_dir, "original")
    new_kind, old_kind = V.tokenizer_kind(new_spec), V.tokenizer_kind(old_spec)
    old_tok = Tokenizer.from_str(json.dumps(_without_auto_prefix(old_spec)))
    old_vocab = old_tok.get_vocab(with_added_tokens=True)
    old_added = {t["content"] for t in old_spec.get("added_tokens", [])}
    model_vocab = V.model_vocab(old_spec)
    old_by_bytes: Dict[bytes, int] = {}
    # byte pieces first so that a text piece with the same bytes wins ("A" over "<0x41>")
    for is_text in (False, True):
        for piece, idx in model_vocab.items():
            data = V.piece_to_bytes(piece, old_kind)
            if data and piece not in old_added and V.is_byte_piece(piece) != is_text:
                old_by_bytes[data] = idx
    new_added = {t["id"]: t for t in new_spec.get("added_tokens", [])}
    # averages never include added tokens (their strings can occur inside a piece's text)
    excluded = set(int(i) for i in exclude_old_ids) | {old_vocab[t] for t in old_added}

    new_pieces = {i: p for p, i in V.model_vocab(new_spec).items()}
    new_pieces.update((i, t["content"]) for i, t in new_added.items())
    n_new = max(new_pieces) + 1
    rows: List[List[int]] = [[] for _ in range(n_new)]
    rule = [""] * n_new
    to_encode: Dict[int, str] = {}
    for t in range(n_new):
        piece = new_pieces.get(t)
        if piece is None:
            rule[t] = "hole"
        elif t in new_added and (new_added[t].get("special", False) or piece in old_added):
            rows[t], rule[t] = ([old_vocab[piece]] if piece in old_vocab else []), "special"
        elif new_kind == old_kind and piece in old_vocab and piece not in old_added:
            rows[t], rule[t] = [old_vocab[piece]], "same_piece"
        else:
            data = piece.encode() if t in new_added else V.piece_to_bytes(piece, new_kind)
            if data is None:
                rule[t] = "unknown"
            elif data in old_by_bytes:
                rows[t], rule[t] = [old_by_bytes[data]], "same_bytes"
            else:
                try:
                    to_encode[t] = data.decode("utf-8")
                    rule[t] = "averaged"
                except UnicodeDecodeError:
                    rows[t], rule[t] = _byte_pieces(data, old_kind, old_tok, old_vocab), "bytes"
    ids = list(to_encode)
    for t, enc in zip(ids, old_tok.encode_batch([to_encode[t] for t in ids], add_special_tokens=False)):
        rows[t] = enc.ids

    offsets, indices, weights = [0], [], []
    for row, how in zip(rows, rule):
        if how in ("averaged", "bytes"):
            row = [i for i in row if i not in excluded]
        if row:
            indices += row
            weights += _row_weights([old_tok.id_to_token(i) for i in row], old_kind, weighting, wmean_decay)
        offsets.append(len(indices))
    counts = {name: rule.count(name) for name in sorted(set(rule))}
    meta = {
        "new_tokenizer": tokenizer_fingerprint(new_dir),
        "old_tokenizer": tokenizer_fingerprint(old_dir),
        "method": weighting if weighting == "mean" else f"wmean(decay={wmean_decay})",
        "rules": json.dumps(counts),
        "excluded_old_ids": json.dumps(sorted(excluded)),
    }
    return TokenMap(
        offsets=torch.tensor(offsets, dtype=torch.long),
        indices=torch.tensor(indices, dtype=torch.long),
        weights=torch.tensor(weights, dtype=torch.float32),
        old_vocab_size=old_tok.get_vocab_size(with_added_tokens=True),
        meta=meta,
    )


def _byte_pieces(data: bytes, old_kind: str, old_tok: Tokenizer, old_vocab: Dict[str, int]) -> List[int]:
    if old_kind == V.BYTE_LEVEL:
        return [tok.id for tok in old_tok.model.tokenize(V.bytes_to_piece(data, V.BYTE_LEVEL))]
    pieces = [V.byte_piece(b) for b in data]
    return [old_vocab[p] for p in pieces] if all(p in old_vocab for p in pieces) else []
