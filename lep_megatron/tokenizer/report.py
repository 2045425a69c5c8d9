"""Compression and losslessness of tokenizers on target-language text, side by side.

chars_per_token is the paper's "symbols per token" (SPT); byte_fallback_rate is the share of
tokens that stand for less than a whole character (`<0xNN>` pieces, or byte-level tokens
that are not valid UTF-8 alone); roundtrip_ok means decode(encode(x)) == x on every line.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

from tokenizers import Tokenizer

from lep_megatron.common.io import UserInputError
from lep_megatron.tokenizer import corpus as C
from lep_megatron.tokenizer import vocab as V

BATCH = 1024


@dataclass
class ReportConfig:
    """What to measure."""

    tokenizers: List[str]
    """Tokenizer dirs or packaged original names to compare."""
    corpus: List[str]
    """Target-language text files (one sample per line)."""
    out: str
    """JSON file to write: {tokenizer: metrics}."""
    max_lines: int = 100_000
    """Lines read from the corpus (the first ones; the held-out split is meant to be small)."""
    text_field: str = "text"
    """Field holding the text in JSONL files."""

    def __post_init__(self):
        if isinstance(self.tokenizers, str):
            self.tokenizers = [t for t in self.tokenizers.split(",") if t]
        if not self.tokenizers:
            raise UserInputError("report needs tokenizer=DIR (or a comma-separated list / [a,b])")
        if self.max_lines < 1:
            raise UserInputError(f"max_lines={self.max_lines} must be >= 1")


def measure(tokenizer_dir: Path, lines: Sequence[str]) -> Dict:
    spec = V.load_tokenizer_json(tokenizer_dir)
    kind = V.tokenizer_kind(spec)
    tok = Tokenizer.from_str(json.dumps(spec))
    partial = _partial_char_ids(tok, kind)
    chars = sum(len(line) for line in lines)
    words = sum(len(line.split()) for line in lines)
    tokens = fallback = failures = 0
    for start in range(0, len(lines), BATCH):
        batch = lines[start:start + BATCH]
        encodings = tok.encode_batch(batch, add_special_tokens=False)
        ids = [e.ids for e in encodings]
        for line, decoded, row in zip(batch, tok.decode_batch(ids, skip_special_tokens=False), ids):
            tokens += len(row)
            fallback += sum(i in partial for i in row)
            failures += decoded != line
    return {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "chars_per_token": chars / max(tokens, 1),
        "tokens_per_word": tokens / max(words, 1),
        "byte_fallback_rate": fallback / max(tokens, 1),
        "roundtrip_ok": failures == 0,
        "roundtrip_failures": failures,
        "lines": len(lines),
        "chars": chars,
        "tokens": tokens,
    }


def _partial_char_ids(tok: Tokenizer, kind: str) -> set:
    out = set()
    for piece, idx in tok.get_vocab(with_added_tokens=False).items():
        if kind == V.SENTENCEPIECE:
            if V.is_byte_piece(piece):
                out.add(idx)
            continue
        data = V.piece_to_bytes(piece, kind)
        try:
            data is not None and data.decode("utf-8")
        except UnicodeDecodeError:
            out.add(idx)
    return out


def report(cfg: ReportConfig, resolve) -> Dict[str, Dict]:
    """Metrics per tokenizer, written to cfg.out and printed as a table. `resolve` turns a
    tokenizer argument (dir or packaged name) into a dir."""
    lines: List[str] = []
    for line in C.iter_lines(C.corpus_files(cfg.corpus), cfg.text_field):
        lines.append(line)
        if len(lines) >= cfg.max_lines:
            break
    if not lines:
        raise UserInputError(f"corpus={cfg.corpus} holds no text lines")
    results = {name: measure(resolve(name), lines) for name in cfg.tokenizers}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)
    print(format_table(results), file=sys.stdout)
    return results


def format_table(results: Dict[str, Dict]) -> str:
    head = f"{'tokenizer':<40} {'vocab':>8} {'chars/tok':>9} {'tok/word':>9} {'bytes%':>7} {'roundtrip':>9}"
    rows = [
        f"{name[-40:]:<40} {r['vocab_size']:>8} {r['chars_per_token']:>9.3f} {r['tokens_per_word']:>9.3f} "
        f"{100 * r['byte_fallback_rate']:>6.2f}% {('ok' if r['roundtrip_ok'] else str(r['roundtrip_failures']) + ' bad'):>9}"
        for name, r in results.items()
    ]
    return "\n".join([head, *rows])
