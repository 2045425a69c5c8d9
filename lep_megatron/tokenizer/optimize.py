"""Shrink an original BPE vocabulary, then extend it (the paper's "Optimized" Llama-3 variant).

Modes:
- `frequency` (the paper): keep the most frequent `keep_fraction` of the original's tokens
  as counted on the target corpus;
- `id_cutoff` (the reference code): keep ids below `id_cutoff` (BPE ids follow merge order).
Either way the base alphabet (byte-level bytes; SentencePiece byte pieces and single
characters) and the special/added tokens stay, and a merge stays only if its parts and its
result survive and are reachable from the alphabet. Kept tokens are renumbered densely in
original order, added tokens follow, then the extension. id_map.safetensors holds
`old_to_new` (int64 [old vocab], -1 = dropped).
"""
import copy
import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lep_megatron.common.io import UserInputError, atomic_dir
from lep_megatron.tokenizer import corpus as C
from lep_megatron.tokenizer import originals as O
from lep_megatron.tokenizer import vocab as V
from lep_megatron.tokenizer.extend import DEFAULT_CACHE, extend_spec, train_target_bpe
from lep_megatron.tokenizer.token_map import build_token_map


@dataclass
class OptimizeConfig:
    """How to shrink and extend an original tokenizer."""

    original: str
    """Original tokenizer: an HF tokenizer dir, or a packaged name (llama-3, qwen2, mistral-7b)."""
    out_dir: str
    """Output HF tokenizer dir with token_map.safetensors and id_map.safetensors."""
    corpus: List[str]
    """Target-language text: token frequencies (mode=frequency) and the new BPE."""
    mode: str = "frequency"
    """`frequency` (the paper) or `id_cutoff` (the reference code)."""
    keep_fraction: float = 0.5
    """mode=frequency: share of the original's ordinary tokens to keep."""
    id_cutoff: int = 64000
    """mode=id_cutoff: keep original ids below this."""
    new_tokenizer: Optional[str] = None
    """An already trained target-language BPE dir to extend with (else one is trained)."""
    new_vocab_size: int = 64000
    """Vocabulary of the target-language BPE trained for the extension."""
    max_sentences: int = 2_000_000
    """Lines sampled for training the new BPE and for counting frequencies."""
    text_field: str = "text"
    """Field holding the text in JSONL corpus files."""
    cache_dir: str = str(DEFAULT_CACHE)
    """Where packaged originals are materialized as tokenizer dirs."""
    overwrite: bool = False
    """Replace an existing non-empty out_dir."""

    def __post_init__(self):
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if self.mode not in ("frequency", "id_cutoff"):
            raise UserInputError(f"mode={self.mode!r}: choose frequency or id_cutoff")
        if not 0 < self.keep_fraction <= 1:
            raise UserInputError(f"keep_fraction={self.keep_fraction} must lie in (0, 1]")
        if self.id_cutoff < 1:
            raise UserInputError(f"id_cutoff={self.id_cutoff} must be >= 1")


def optimize(cfg: OptimizeConfig) -> Path:
    old_dir = O.resolve(cfg.original, Path(cfg.cache_dir))
    old = V.load_tokenizer_json(old_dir, "original")
    if old["model"]["type"] != "BPE":
        raise UserInputError("optimize: the original must be a BPE tokenizer")
    with atomic_dir(Path(cfg.out_dir), cfg.overwrite) as tmp:
        if cfg.mode == "frequency":
            lines = C.sample_lines(C.corpus_files(cfg.corpus), cfg.max_sentences, text_field=cfg.text_field)
            keep = frequent_ids(old, lines, cfg.keep_fraction)
        else:
            keep = {i for i in V.model_vocab(old).values() if i < cfg.id_cutoff}
        shrunk, old_to_new = shrink_spec(old, keep)
        new_dir = Path(cfg.new_tokenizer) if cfg.new_tokenizer else train_target_bpe(cfg, tmp / "_target_bpe")
        spec, stats = extend_spec(shrunk, V.load_tokenizer_json(new_dir, "new_tokenizer"))
        stats["kept_original"] = int((old_to_new >= 0).sum())
        # the original's config with the added tokens at their new ids
        config_path = old_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else V.tokenizer_config(spec, *O.family_tokens(old_dir))
        config["added_tokens_decoder"] = V.tokenizer_config(spec, None, None)["added_tokens_decoder"]
        V.save_tokenizer_dir(tmp, spec, config, copy_from=old_dir)
        save_file({"old_to_new": old_to_new}, str(tmp / "id_map.safetensors"), metadata={"mode": cfg.mode})
        (tmp / "optimize_config.json").write_text(json.dumps({"config": asdict(cfg), "stats": stats}, indent=2) + "\n")
        build_token_map(tmp, old_dir).save(tmp / "token_map.safetensors")
        if not cfg.new_tokenizer:
            shutil.rmtree(new_dir)
    return Path(cfg.out_dir)


def _alphabet(spec: dict) -> set:
    kind = V.tokenizer_kind(spec)
    vocab = V.model_vocab(spec)
    if kind == V.BYTE_LEVEL:
        return {p for p in vocab if len(p) == 1}
    return {p for p in vocab if len(p) == 1 or V.is_byte_piece(p)}


def frequent_ids(spec: dict, lines: List[str], keep_fraction: float) -> set:
    """Ids of the most frequent `keep_fraction` of ordinary tokens on the lines (ties: lower id)."""
    tok = Tokenizer.from_str(json.dumps(spec))
    counts: Counter = Counter()
    for start in range(0, len(lines), 1024):
        for enc in tok.encode_batch(lines[start:start + 1024], add_special_tokens=False):
            counts.update(enc.ids)
    added = {t["id"] for t in spec.get("added_tokens", [])}
    ordinary = [i for i in V.model_vocab(spec).values() if i not in added]
    n_keep = int(round(keep_fraction * len(ordinary)))
    return set(sorted(ordinary, key=lambda i: (-counts[i], i))[:n_keep])


def shrink_spec(spec: dict, keep_ids: set) -> Tuple[dict, torch.Tensor]:
    """tokenizer.json restricted to keep_ids + alphabet + added tokens, renumbered densely."""
    vocab = V.model_vocab(spec)
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    wanted = {p for p, i in vocab.items() if i in keep_ids} | _alphabet(spec)
    reachable = {p for p in wanted if len(p) == 1 or V.is_byte_piece(p) or p in added}
    merges: List[Tuple[str, str]] = []
    for left, right in V.merges_as_pairs(spec["model"]):
        if left in reachable and right in reachable and left + right in wanted:
            reachable.add(left + right)
            merges.append((left, right))
    ordinary = sorted((i, p) for p, i in vocab.items() if p in reachable and p not in added)
    new_vocab: Dict[str, int] = {p: n for n, (_, p) in enumerate(ordinary)}
    for content, _ in sorted(added.items(), key=lambda kv: kv[1]):
        new_vocab[content] = len(new_vocab)
    old_size = max([*vocab.values(), *added.values()]) + 1
    old_to_new = torch.full((old_size,), -1, dtype=torch.long)
    for piece, n in new_vocab.items():
        old_to_new[vocab.get(piece, added.get(piece))] = n
    out = dict(spec, model=dict(spec["model"], vocab=new_vocab, merges=[list(m) for m in merges]))
    out["added_tokens"] = [dict(t, id=new_vocab[t["content"]]) for t in spec.get("added_tokens", [])]
    out["post_processor"] = copy.deepcopy(spec.get("post_processor"))
    _renumber_post_processor(out, {t["content"]: new_vocab[t["content"]] for t in spec.get("added_tokens", [])})
    return out, old_to_new


def _renumber_post_processor(spec: dict, ids: Dict[str, int]) -> None:
    """TemplateProcessing stores the bos/eos ids; point them at the renumbered tokens."""
    proc = spec.get("post_processor") or {}
    nodes = proc.get("processors", [proc]) if proc.get("type") == "Sequence" else [proc]
    for node in nodes:
        for name, entry in (node.get("special_tokens") or {}).items():
            entry["ids"] = [ids.get(tok, i) for tok, i in zip(entry.get("tokens", []), entry.get("ids", []))]
