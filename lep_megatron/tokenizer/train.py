"""Train a new BPE or Unigram tokenizer (full vocabulary replacement, method section 1).

Backends: SentencePiece (the paper: split_digits, byte_fallback, `<unk>`=0 `<s>`=1 `</s>`=2, 256
byte pieces, then learned pieces) and HF `tokenizers` BPE. Output: an HF tokenizer dir
(tokenizer.json, tokenizer_config.json, + tokenizer.model for SentencePiece) whose special
tokens follow the original model family's layout.
"""
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Tuple

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from tokenizers import decoders as hf_decoders

from lep_megatron.common.io import UserInputError, atomic_dir
from lep_megatron.tokenizer import corpus as C
from lep_megatron.tokenizer import originals as O
from lep_megatron.tokenizer import vocab as V

SP_SPECIALS = ("<unk>", "<s>", "</s>")

# family -> (pattern of its byte-level pre-tokenizer, special tokens appended after the
# learned vocabulary, bos, eos); `mistral` keeps SentencePiece's own <unk>/<s>/</s>.
FAMILIES = {
    "mistral": (None, (), "<s>", "</s>"),
    "llama3": (O.LLAMA3_PATTERN, tuple(O.llama3_specials()), "<|begin_of_text|>", "<|end_of_text|>"),
    "qwen2": (O.QWEN2_PATTERN, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|endoftext|>"),
}


@dataclass
class TrainConfig:
    """How to train a new tokenizer."""

    corpus: List[str]
    """Text/JSONL files or globs."""
    out_dir: str
    """Output HF tokenizer dir (written atomically)."""
    model_type: str = "bpe"
    """`bpe` or `unigram` (unigram needs backend=sentencepiece)."""
    backend: str = "sentencepiece"
    """`sentencepiece` (the paper's) or `hf` (HF tokenizers BPE)."""
    vocab_size: int = 32000
    """Learned vocabulary incl. <unk>/<s>/</s> and the 256 byte pieces; the family's extra
    special tokens (llama3, qwen2) come on top, as in the originals (128,000 + 256)."""
    family: str = "mistral"
    """Special-token layout and, for backend=hf, the alphabet: `mistral` (SentencePiece-style
    pieces with byte fallback), `llama3` or `qwen2` (byte-level, the family's pre-tokenizer)."""
    normalization: str = "identity"
    """SentencePiece normalization rule. The paper used `nmt_nfkc`, which rewrites text
    (… -> ..., № -> No) so decode(encode(x)) != x; `identity` keeps tokenization lossless."""
    split_digits: bool = True
    """One token per digit (the paper's setting)."""
    byte_fallback: bool = True
    """Characters outside the vocabulary become byte pieces instead of <unk>."""
    character_coverage: float = 0.9999
    """Share of corpus characters that get their own piece; the rest fall back to bytes."""
    max_sentences: int = 2_000_000
    """Lines sampled (seeded reservoir) from the corpus: bounds trainer memory."""
    max_sentence_length: int = 16384
    """Longer lines (bytes) are skipped by SentencePiece."""
    text_field: str = "text"
    """Field holding the text in JSONL files."""
    seed: int = 0
    """Seed of the line sampling."""
    num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Trainer threads."""
    overwrite: bool = False
    """Replace an existing non-empty out_dir."""

    def __post_init__(self):
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        self.corpus = [str(c) for c in self.corpus]
        if self.model_type not in ("bpe", "unigram"):
            raise UserInputError(f"model_type={self.model_type!r}: choose bpe or unigram")
        if self.backend not in ("sentencepiece", "hf"):
            raise UserInputError(f"backend={self.backend!r}: choose sentencepiece or hf")
        if self.backend == "hf" and self.model_type != "bpe":
            raise UserInputError("backend=hf trains BPE only; use backend=sentencepiece for model_type=unigram")
        if self.family not in FAMILIES:
            raise UserInputError(f"family={self.family!r}: choose one of {sorted(FAMILIES)}")
        if self.normalization not in ("identity", "nmt_nfkc", "nfkc"):
            raise UserInputError(f"normalization={self.normalization!r}: choose identity, nmt_nfkc or nfkc")
        if self.max_sentences < 1:
            raise UserInputError(f"max_sentences={self.max_sentences} must be >= 1")
        if self.vocab_size <= self.reserved_ids + 1:
            raise UserInputError(
                f"vocab_size={self.vocab_size} leaves no room for learned pieces: {self.reserved_ids} ids go to "
                f"special tokens{' and byte pieces' if self.byte_fallback else ''}; raise vocab_size"
            )

    @property
    def byte_level(self) -> bool:
        return self.backend == "hf" and self.family != "mistral"

    @property
    def reserved_ids(self) -> int:
        """Ids taken before learning: SentencePiece specials + byte pieces (the byte-level
        alphabet itself for byte-level BPE)."""
        if self.byte_level:
            return 256
        return len(SP_SPECIALS) + (256 if self.byte_fallback else 0)


def train(cfg: TrainConfig) -> Path:
    files = C.corpus_files(cfg.corpus)
    lines = C.sample_lines(files, cfg.max_sentences, cfg.seed, cfg.text_field)
    with atomic_dir(Path(cfg.out_dir), cfg.overwrite) as tmp:
        if cfg.backend == "sentencepiece":
            tok, extra = _train_sentencepiece(cfg, lines, tmp)
        else:
            tok, extra = _train_hf_bpe(cfg, lines), ()
        _, specials, bos, eos = FAMILIES[cfg.family]
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        V.add_bos(tok, bos)
        tok_json = json.loads(tok.to_str())
        unk = None if cfg.byte_level else "<unk>"
        V.save_tokenizer_dir(tmp, tok_json, V.tokenizer_config(tok_json, bos, eos, unk))
        (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        for path in extra:
            os.replace(path, tmp / "tokenizer.model")
    return Path(cfg.out_dir)


def _train_sentencepiece(cfg: TrainConfig, lines: List[str], tmp: Path) -> Tuple[Tokenizer, Tuple[Path, ...]]:
    import sentencepiece as spm

    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", dir=tmp, delete=False) as f:
        f.write("\n".join(lines) + "\n")
    prefix = tmp / "sp"
    try:
        spm.SentencePieceTrainer.train(
            input=f.name,
            model_prefix=str(prefix),
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            split_digits=cfg.split_digits,
            byte_fallback=cfg.byte_fallback,
            normalization_rule_name=cfg.normalization,
            remove_extra_whitespaces=False,  # keep decode(encode(x)) == x
            input_sentence_size=0,  # the sample above already bounds memory
            max_sentence_length=cfg.max_sentence_length,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=cfg.num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise UserInputError(f"SentencePiece could not train vocab_size={cfg.vocab_size} on corpus {cfg.corpus}: {err}") from err
    finally:
        os.unlink(f.name)
    os.unlink(f"{prefix}.vocab")
    return V.tokenizer_from_sentencepiece(Path(f"{prefix}.model")), (Path(f"{prefix}.model"),)


def _train_hf_bpe(cfg: TrainConfig, lines: List[str]) -> Tokenizer:
    pattern = FAMILIES[cfg.family][0]
    if cfg.byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = hf_decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(lines, trainer)
        return tok
    # SentencePiece-style pieces: ▁ for every space plus one in front (as SentencePiece's
    # dummy prefix, so a leading space survives decoding); words start at ▁; digits alone;
    # rare characters fall back to bytes
    steps = [pre_tokenizers.Split(V.SPACE_MARK, behavior="merged_with_next")]
    if cfg.split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=cfg.byte_fallback))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(V.SPACE_MARK), normalizers.Replace(" ", V.SPACE_MARK)])
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    n_bytes = 256 if cfg.byte_fallback else 0
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size - n_bytes, special_tokens=list(SP_SPECIALS), limit_alphabet=_alphabet_size(lines, cfg.character_coverage), show_progress=False
    )
    tok.train_from_iterator(lines, trainer)
    # SentencePiece's layout: specials, then the 256 byte pieces, then learned pieces
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    head, tail = learned[: len(SP_SPECIALS)], learned[len(SP_SPECIALS):]
    pieces = [p for p, _ in head] + [V.byte_piece(b) for b in range(n_bytes)] + [p for p, _ in tail if not V.is_byte_piece(p)]
    spec["model"]["vocab"] = {p: i for i, p in enumerate(pieces)}
    spec["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = V.sentencepiece_decoder(add_dummy_prefix=True)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SP_SPECIALS])
    return tok


def _alphabet_size(lines: List[str], coverage: float) -> int:
    """Characters needed to cover `coverage` of all character occurrences (SentencePiece's rule)."""
    from collections import Counter

    counts = Counter()
    for line in lines:
        counts.update(line)
    total, covered = sum(counts.values()), 0
    for n, (_, c) in enumerate(counts.most_common(), 1):
        covered += c
        if covered >= coverage * total:
            return n
    return len(counts)
