"""The three models LEP reads (base B, instruct S, donor A), checked against each other before
anything is computed, and the row designs of the fits (conversion: the donor's token map T;
overlap: the tokens base and donor share).

A model is an HF directory or, for the donor (the model the pretrain stage trained), a Megatron
dist checkpoint of ours (lep_model.json, tokenizer in hf/). Only the embedding and head tables are
ever read, one whole table at a time; the padding rows of a Megatron table are dropped.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch

from lep_megatron.checkpoint.hf_io import SafetensorsReader
from lep_megatron.checkpoint.megatron_io import HF_SUBDIR, META_NAME, CheckpointMeta, CheckpointTensors
from lep_megatron.common.io import UserInputError
from lep_megatron.embeddings.initialize import EMBED, HEAD
from lep_megatron.models.hf_config import HFModelShape
from lep_megatron.tokenizer import vocab as V
from lep_megatron.tokenizer.token_map import TokenMap, build_token_map, tokenizer_fingerprint

MEGATRON_EMBED, MEGATRON_HEAD = "embedding.word_embeddings.weight", "output_layer.weight"


@dataclass
class Model:
    """One checkpoint as LEP sees it: its shape, tokenizer and embedding / head tables."""

    key: str
    """The config key that named it (base, instruct, donor): error messages name it."""
    path: Path
    """The directory given."""
    shape: HFModelShape
    """From config.json (HF) or lep_model.json (Megatron)."""
    rows: int
    """Rows of the tables (a Megatron checkpoint's true vocabulary, without the padding)."""
    tokenizer_dir: Path
    """Where its tokenizer.json (and a donor's token_map.safetensors) lie."""
    tokenizer: dict
    """Its tokenizer.json."""
    config_name: ClassVar[str]
    """The file its shape comes from (for error messages)."""

    def table(self, head: bool) -> torch.Tensor:
        """The input embedding [rows, d], or the LM head (the embedding again when tied), as stored."""
        raise NotImplementedError


@dataclass
class HFModel(Model):
    config_name = "config.json"
    reader: SafetensorsReader
    """Tensor access to the safetensors shards (the instruct model's body is copied through it)."""

    def table(self, head: bool) -> torch.Tensor:
        return self.reader.get(HEAD if head and not self.shape.tie_word_embeddings else EMBED)


@dataclass
class MegatronModel(Model):
    config_name = META_NAME

    def table(self, head: bool) -> torch.Tensor:
        name = MEGATRON_HEAD if head and not self.shape.tie_word_embeddings else MEGATRON_EMBED
        return CheckpointTensors(self.path)[name][:self.rows]


def open_model(key: str, path: str) -> Model:
    """An HF model dir, or a Megatron checkpoint dir (recognised by its lep_model.json)."""
    path = Path(path)
    if (path / META_NAME).is_file():
        return _open_megatron(key, path)
    shape = HFModelShape.from_dir(path)
    reader = SafetensorsReader(path)
    rows, width = reader.shape(EMBED) if EMBED in reader else (None, None)
    if (rows, width) != (shape.vocab_size, shape.hidden_size):
        raise UserInputError(f"{key}={path}: {EMBED} has shape {(rows, width)} but config.json says "
                             f"vocab_size={shape.vocab_size}, hidden_size={shape.hidden_size}")
    return HFModel(key, path, shape, rows, path, _tokenizer(key, path, path), reader)


def _open_megatron(key: str, path: Path) -> MegatronModel:
    meta = CheckpointMeta.read(path)
    shape = meta.shape
    stored = CheckpointTensors(path).stored
    names = [MEGATRON_EMBED] if shape.tie_word_embeddings else [MEGATRON_EMBED, MEGATRON_HEAD]
    for name in names:
        found = tuple(stored[name].global_shape) if name in stored else None
        if found != (meta.padded_vocab_size, shape.hidden_size):
            raise UserInputError(f"{key}={path}: {name} has shape {found} but {META_NAME} says padded_vocab_size="
                                 f"{meta.padded_vocab_size}, hidden_size={shape.hidden_size}; the checkpoint is "
                                 "incomplete or not of this model")
    return MegatronModel(key, path, shape, meta.vocab_size, path / HF_SUBDIR,
                         _tokenizer(key, path, path / HF_SUBDIR))


def _tokenizer(key: str, path: Path, tokenizer_dir: Path) -> dict:
    if not (tokenizer_dir / "tokenizer.json").is_file():
        where = "" if tokenizer_dir == path else f"{tokenizer_dir.name}/"
        raise UserInputError(f"{key}={path}: no {where}tokenizer.json; LEP needs every model's tokenizer "
                             "(copy it from where the model came from)")
    return V.load_tokenizer_json(tokenizer_dir, key)


def check_compatible(base: Model, instruct: Model, donor: Model) -> None:
    for other in (instruct, donor):
        if other.shape.hidden_size != base.shape.hidden_size:
            raise UserInputError(f"{other.key}={other.path}: {other.config_name} hidden_size="
                                 f"{other.shape.hidden_size} but base has {base.shape.hidden_size}; "
                                 "LEP needs models of one architecture")
        if other.shape.model_type != base.shape.model_type:
            raise UserInputError(f"{other.key}={other.path}: {other.config_name} model_type="
                                 f"{other.shape.model_type!r} but base is {base.shape.model_type!r}; "
                                 "base, instruct and donor must be one family")
    base_vocab, inst_vocab = V.model_vocab(base.tokenizer), V.model_vocab(instruct.tokenizer)
    if base_vocab != inst_vocab:
        differs = next((p for p, i in base_vocab.items() if inst_vocab.get(p) != i), None)
        raise UserInputError(
            f"instruct={instruct.path}: tokenizer.json vocabulary differs from base={base.path} "
            f"(e.g. piece {differs!r}: {base_vocab.get(differs)} vs {inst_vocab.get(differs)}); "
            "the instruct model must be tuned from this base")
    if instruct.rows < base.rows:
        raise UserInputError(f"instruct={instruct.path}: {EMBED} has {instruct.rows} rows, fewer than the "
                             f"base's {base.rows}")


def conversion_rows(token_map: Optional[str], base: Model, donor: Model) -> TokenMap:
    """T of the donor's tokenizer over the base's: token_map, else the donor dir's, else built."""
    path = Path(token_map) if token_map else donor.tokenizer_dir / "token_map.safetensors"
    key = "token_map" if token_map else f"donor={donor.path}: token_map.safetensors"
    if not path.is_file() and not token_map:
        return build_token_map(donor.tokenizer_dir, base.tokenizer_dir)
    tm = TokenMap.load(path)
    made_for = tm.meta.get("new_tokenizer")
    if made_for and made_for != tokenizer_fingerprint(donor.tokenizer_dir):
        raise UserInputError(f"{key} ({path}) was built for another tokenizer than the donor's "
                             f"tokenizer.json; rebuild it or pass token_map= the donor's map")
    if tm.old_vocab_size > base.rows:
        raise UserInputError(f"{key} ({path}) refers to {tm.old_vocab_size} original tokens but base={base.path} "
                             f"has {base.rows} rows; it was built against another original tokenizer")
    return tm


def overlap_rows(base: Model, donor: Model) -> TokenMap:
    """One row per base token whose string (decoded piece bytes, or added-token text) the donor
    also has: the selection C of the overlap mode."""
    base_kind, donor_kind = V.tokenizer_kind(base.tokenizer), V.tokenizer_kind(donor.tokenizer)
    donor_bytes = {V.piece_to_bytes(piece, donor_kind) for piece in V.model_vocab(donor.tokenizer)} - {None}
    shared = {i for piece, i in V.model_vocab(base.tokenizer).items()
              if V.piece_to_bytes(piece, base_kind) in donor_bytes}
    base_added = {t["content"]: t["id"] for t in base.tokenizer.get("added_tokens", [])}
    shared |= {base_added[t["content"]] for t in donor.tokenizer.get("added_tokens", []) if t["content"] in base_added}
    n_rows = base.rows
    ids = torch.tensor(sorted(i for i in shared if i < n_rows), dtype=torch.long)
    return TokenMap(offsets=torch.arange(ids.numel() + 1), indices=ids, weights=torch.ones(ids.numel()),
                    old_vocab_size=n_rows, meta={"rows": "tokens shared by base and donor"})
