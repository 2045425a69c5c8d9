"""Extend an original BPE tokenizer with the pieces of a target-language BPE (method section 1).

New pieces absent from the original are appended after the original's largest id; every
original token keeps its id, its special/added tokens, normalizer, pre-tokenizer, decoder,
post-processor and chat template. Merges: the target BPE's first (the target language gets
priority), then the original's not already present. Pieces move between alphabets through
their bytes: `▁при` (SentencePiece) is ` при`, which byte-level BPE spells `ĠÐ¿ÑĢÐ¸`.
For a byte-level original a piece is kept only if the original's pre-tokenizer leaves its
text whole (else no encoding could ever produce it), and each multi-byte character of the
new pieces gets merges that build it from its bytes.
"""
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tokenizers import Tokenizer

from lep_megatron.common.io import UserInputError, atomic_dir
from lep_megatron.tokenizer import originals as O
from lep_megatron.tokenizer import vocab as V
from lep_megatron.tokenizer.token_map import build_token_map
from lep_megatron.tokenizer.train import TrainConfig, train

DEFAULT_CACHE = Path.home() / ".cache" / "lep_megatron" / "originals"


@dataclass
class ExtendConfig:
    """How to extend an original tokenizer."""

    original: str
    """Original tokenizer: an HF tokenizer dir, or a packaged name (mistral-7b, llama-3, qwen2)."""
    out_dir: str
    """Output HF tokenizer dir (written atomically), with token_map.safetensors."""
    corpus: Optional[List[str]] = None
    """Target-language text to train the new BPE on (unless new_tokenizer is given)."""
    new_tokenizer: Optional[str] = None
    """An already trained target-language BPE tokenizer dir to take the pieces from."""
    new_vocab_size: int = 32000
    """Vocabulary of the target-language BPE (the paper: 32k for Mistral, 64k for Llama-3)."""
    max_sentences: int = 2_000_000
    """Lines sampled from the corpus to train the new BPE."""
    text_field: str = "text"
    """Field holding the text in JSONL corpus files."""
    first_new_id: Optional[int] = None
    """Id of the first appended piece; default right after the original's largest id."""
    cache_dir: str = str(DEFAULT_CACHE)
    """Where packaged originals are materialized as tokenizer dirs."""
    token_map: bool = True
    """Also write token_map.safetensors (the averaging matrix against the original)."""
    overwrite: bool = False
    """Replace an existing non-empty out_dir."""

    def __post_init__(self):
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if not self.corpus and not self.new_tokenizer:
            raise UserInputError("extend needs corpus=FILES (to train the new BPE) or new_tokenizer=DIR")


def extend(cfg: ExtendConfig) -> Path:
    old_dir = O.resolve(cfg.original, Path(cfg.cache_dir))
    with atomic_dir(Path(cfg.out_dir), cfg.overwrite) as tmp:
        new_dir = Path(cfg.new_tokenizer) if cfg.new_tokenizer else train_target_bpe(cfg, tmp / "_target_bpe")
        spec, stats = extend_spec(V.load_tokenizer_json(old_dir, "original"), V.load_tokenizer_json(new_dir, "new_tokenizer"), cfg.first_new_id)
        write_like_original(tmp, spec, old_dir)
        (tmp / "extend_config.json").write_text(json.dumps({"config": asdict(cfg), "stats": stats}, indent=2) + "\n")
        if cfg.token_map:
            build_token_map(tmp, old_dir).save(tmp / "token_map.safetensors")
        if not cfg.new_tokenizer:
            shutil.rmtree(new_dir)
    return Path(cfg.out_dir)


def train_target_bpe(cfg: ExtendConfig, out: Path) -> Path:
    """The paper's target-language BPE: SentencePiece, split digits, byte fallback."""
    return train(TrainConfig(corpus=cfg.corpus, out_dir=str(out), vocab_size=cfg.new_vocab_size, max_sentences=cfg.max_sentences, text_field=cfg.text_field))


def write_like_original(out: Path, spec: dict, old_dir: Path) -> None:
    """tokenizer.json + the original's config files (chat template, special-token map)."""
    cfg_path = old_dir / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else V.tokenizer_config(spec, *O.family_tokens(old_dir))
    V.save_tokenizer_dir(out, spec, config, copy_from=old_dir)


def extend_spec(old: dict, new: dict, first_new_id: Optional[int] = None) -> Tuple[dict, Dict[str, int]]:
    """The extended tokenizer.json and counts of what was added."""
    if old["model"]["type"] != "BPE" or new["model"]["type"] != "BPE":
        raise UserInputError("extend: the original and the new tokenizer must both be BPE models")
    old_kind, new_kind = V.tokenizer_kind(old), V.tokenizer_kind(new)
    old_pipeline = V.pipeline_only(old)
    vocab: Dict[str, int] = dict(old["model"]["vocab"])
    added = {t["content"]: t["id"] for t in old.get("added_tokens", [])}
    taken = set(vocab.values()) | set(added.values())
    next_id = max(taken) + 1 if first_new_id is None else first_new_id
    if next_id <= max(taken):
        clash = next((p for p, i in {**vocab, **added}.items() if i == next_id), None)
        raise UserInputError(
            f"first_new_id={next_id} would collide with the original's ids (largest {max(taken)}"
            f"{f', id {next_id} is {clash!r}' if clash else ''}); leave first_new_id unset or use >= {max(taken) + 1}"
        )
    new_added = {t["content"] for t in new.get("added_tokens", [])}

    def convert(piece: str) -> Optional[str]:
        if new_kind == old_kind:
            return piece
        data = V.piece_to_bytes(piece, new_kind)
        return None if data is None else V.bytes_to_piece(data, old_kind)

    stats = {"original": len(taken), "appended": 0, "unreachable": 0, "char_pieces": 0}
    char_merges: List[Tuple[str, str]] = []

    def append(piece: str, key: str) -> None:
        nonlocal next_id
        vocab[piece] = next_id
        next_id += 1
        stats[key] += 1

    new_pieces = sorted(V.model_vocab(new).items(), key=lambda kv: kv[1])
    for piece, _ in new_pieces:
        if piece in new_added or V.is_byte_piece(piece):
            continue
        target = convert(piece)
        if target is None or target in vocab or target in added:
            continue
        if old_kind == V.BYTE_LEVEL and not _whole_pretoken(old_pipeline, V.piece_to_bytes(target, old_kind)):
            stats["unreachable"] += 1
            continue
        if old_kind == V.BYTE_LEVEL:
            for left, right in _char_merges(V.piece_to_bytes(target, old_kind)):
                if left + right not in vocab:
                    append(left + right, "char_pieces")
                char_merges.append((left, right))
        if target not in vocab:  # a one-character piece was just built by its char merges
            append(target, "appended")

    merges: List[Tuple[str, str]] = []
    seen = set()
    converted_new = ((convert(a), convert(b)) for a, b in V.merges_as_pairs(new["model"]))
    for left, right in [*char_merges, *converted_new, *V.merges_as_pairs(old["model"])]:
        if left is None or right is None or (left, right) in seen:
            continue
        if left in vocab and right in vocab and left + right in vocab:
            seen.add((left, right))
            merges.append((left, right))
    stats["merges"] = len(merges)
    spec = dict(old, model=dict(old["model"]))
    # added tokens enter the model vocabulary too: `tokenizers` gives an added token that the
    # model does not know the next free id on load, which would now be an appended piece's id
    spec["model"]["vocab"] = {**vocab, **added}
    spec["model"]["merges"] = [list(m) for m in merges]
    return spec, stats


def _whole_pretoken(old_tok: Tokenizer, data: bytes) -> bool:
    """Whether the original's normalizer and pre-tokenizer keep this text as one piece."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return True  # partial characters only occur inside a pre-token
    if old_tok.normalizer is not None and old_tok.normalizer.normalize_str(text) != text:
        return False
    if old_tok.pre_tokenizer is None:
        return True
    return len(old_tok.pre_tokenizer.pre_tokenize_str(text)) == 1


def _char_merges(data: bytes) -> List[Tuple[str, str]]:
    """Byte-level merges that build each multi-byte UTF-8 character of `data` from its bytes."""
    merges = []
    text = data.decode("utf-8", errors="ignore")
    for ch in dict.fromkeys(text):
        raw = ch.encode("utf-8")
        for k in range(1, len(raw)):
            merges.append((V.bytes_to_piece(raw[:k], V.BYTE_LEVEL), V.bytes_to_piece(raw[k:k + 1], V.BYTE_LEVEL)))
    return merges
