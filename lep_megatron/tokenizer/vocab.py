"""Vocabulary representations and tokenizer.json builders.

Two piece alphabets occur in the models we adapt:
- `sentencepiece`: text pieces with `▁` for a space and `<0xNN>` byte-fallback pieces
  (Mistral, Llama-2, every tokenizer `train` makes with SentencePiece);
- `byte_level`: GPT-2's byte-to-unicode alphabet, one printable character per byte
  (Llama-3, Qwen2).
Every piece maps to the bytes it stands for, which is how pieces move between alphabets.
A tokenizer dir is the HF layout: tokenizer.json (+ tokenizer_config.json); `tokenizers`
encodes it, and transformers.AutoTokenizer loads it unchanged.
"""
import json
import re
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lep_megatron.common.io import UserInputError

SENTENCEPIECE = "sentencepiece"
BYTE_LEVEL = "byte_level"
SPACE_MARK = "\u2581"  # ▁
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


@lru_cache(maxsize=1)
def byte_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@lru_cache(maxsize=1)
def unicode_to_byte() -> Dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


# bytes <-> byte-level string in C calls: latin-1 spells byte b as chr(b); characters
# outside the alphabet translate to U+0100 (not latin-1), so encoding them fails
_LATIN1_TO_BYTE_LEVEL = {b: c for b, c in byte_to_unicode().items()}
_BYTE_LEVEL_TO_LATIN1 = {**{c: "\u0100" for c in range(0x200)}, **{ord(c): chr(b) for b, c in byte_to_unicode().items()}}


def byte_piece(b: int) -> str:
    return f"<0x{b:02X}>"


def is_byte_piece(piece: str) -> bool:
    return bool(_BYTE_PIECE.match(piece))


def model_vocab(spec: dict) -> Dict[str, int]:
    """piece -> id of a tokenizer.json model (BPE stores a dict, Unigram a scored list)."""
    vocab = spec["model"]["vocab"]
    return dict(vocab) if isinstance(vocab, dict) else {piece: i for i, (piece, _) in enumerate(vocab)}


def piece_to_bytes(piece: str, kind: str) -> Optional[bytes]:
    """The bytes a vocabulary piece stands for; None if the piece is not in the alphabet."""
    if kind == BYTE_LEVEL:
        try:
            return piece.translate(_BYTE_LEVEL_TO_LATIN1).encode("latin-1")
        except UnicodeEncodeError:  # a character outside the byte-level alphabet
            return None
    match = _BYTE_PIECE.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace(SPACE_MARK, " ").encode("utf-8")


def bytes_to_piece(data: bytes, kind: str) -> Optional[str]:
    """The piece spelling `data` in an alphabet; None if a sentencepiece piece would not be UTF-8."""
    if kind == BYTE_LEVEL:
        return data.decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL)
    if len(data) == 1 and data[0] >= 0x80:
        return byte_piece(data[0])
    try:
        return data.decode("utf-8").replace(" ", SPACE_MARK)
    except UnicodeDecodeError:
        return None


def pipeline_only(spec: dict) -> Tokenizer:
    """The spec's normalizer and pre-tokenizer on an empty model: cheap to load."""
    light = dict(spec, model={"type": "BPE", "vocab": {}, "merges": []}, added_tokens=[])
    return Tokenizer.from_str(json.dumps(light))


def tokenizer_kind(spec: dict) -> str:
    """The piece alphabet of a tokenizer.json, from its decoder (what turns pieces back into text)."""
    def types(node):
        if not node:
            return []
        if node.get("type") == "Sequence":
            return [t for child in node.get("decoders", node.get("pretokenizers", [])) for t in types(child)]
        return [node]

    for dec in types(spec.get("decoder")):
        if dec["type"] == "ByteLevel":
            return BYTE_LEVEL
        if dec["type"] == "Metaspace" or (dec["type"] == "Replace" and dec.get("pattern", {}).get("String") == SPACE_MARK):
            return SENTENCEPIECE
    raise UserInputError(
        "tokenizer.json: cannot tell the piece alphabet from its decoder (expected ByteLevel or "
        "SentencePiece-style Metaspace/Replace('▁')); only BPE/Unigram tokenizers of those kinds are supported"
    )


def load_tokenizer_json(tokenizer_dir: Path, key: str = "tokenizer") -> dict:
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise UserInputError(
            f"{key}={tokenizer_dir}: no tokenizer.json there; pass an HF tokenizer dir or a packaged "
            "original name (see `lep-megatron tokenizer originals`)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def merges_as_pairs(model: dict) -> List[Tuple[str, str]]:
    """BPE merges of a tokenizer.json model; older files store them as "a b" strings."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def sentencepiece_merges(pieces: Sequence[Tuple[str, float]], mergeable: Iterable[int]) -> List[Tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE model: every split of a piece into two pieces,
    ordered by the piece's score (SentencePiece merges the best-scored adjacent pair first)."""
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    order = sorted(mergeable, key=lambda i: -pieces[i][1])
    merges = []
    for i in order:
        piece = pieces[i][0]
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    return merges


def sentencepiece_decoder(add_dummy_prefix: bool):
    steps = [decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def tokenizer_from_sentencepiece(model_file: Path) -> Tokenizer:
    """Exact tokenizer.json twin of a SentencePiece BPE or Unigram model (checked against
    sentencepiece's own encode in the tests): no pre-tokenizer, as SentencePiece encodes a
    whole normalized line; `▁` replaces spaces; unknown characters fall back to bytes."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(model_file).read_bytes())
    except Exception as err:  # protobuf raises its own DecodeError
        raise UserInputError(f"{model_file} is not a SentencePiece model ({err})") from err
    pieces = [(p.piece, p.score) for p in proto.pieces]
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    unk = trainer.unk_piece or "<unk>"
    if trainer.model_type == sp_pb2.TrainerSpec.UNIGRAM:
        model = models.Unigram(pieces, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == sp_pb2.TrainerSpec.BPE:
        normal = [i for i, p in enumerate(proto.pieces) if p.type == sp_pb2.ModelProto.SentencePiece.NORMAL]
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        model = models.BPE(vocab, sentencepiece_merges(pieces, normal), unk_token=unk, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    else:
        raise UserInputError(f"{model_file}: only SentencePiece BPE and Unigram models are supported")
    tok = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE_MARK))
    steps.append(normalizers.Replace(" ", SPACE_MARK))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = sentencepiece_decoder(norm.add_dummy_prefix)
    kinds = sp_pb2.ModelProto.SentencePiece
    tok.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type in (kinds.CONTROL, kinds.UNKNOWN)]
    )
    tok.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces if p.type == kinds.USER_DEFINED])
    return tok


def read_tiktoken_ranks(path: Path) -> Dict[bytes, int]:
    """A tiktoken BPE file: one `base64(token) rank` per line."""
    import base64

    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as err:
            raise UserInputError(f"{path}:{n}: not a tiktoken BPE line (`base64 rank`)") from err
    return ranks


def tokenizer_from_tiktoken(
    ranks: Dict[bytes, int], pattern: str, specials: Dict[str, int], nfc: bool = False
) -> Tokenizer:
    """Byte-level BPE twin of a tiktoken encoding. Merges are every split of a token into two
    tokens, ordered by the token's rank: tiktoken merges the adjacent pair whose concatenation
    has the lowest rank. ignore_merges: tiktoken emits a pre-token found in the vocab whole."""
    piece = {token: bytes_to_piece(token, BYTE_LEVEL) for token in ranks}
    vocab = {piece[token]: rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        if len(splits) > 1:
            splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges += [(piece[left], piece[right]) for left, right in splits]
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    ordered = sorted(specials.items(), key=lambda kv: kv[1])
    if [idx for _, idx in ordered] != list(range(len(ranks), len(ranks) + len(ordered))):
        raise UserInputError(f"special token ids {[i for _, i in ordered][:3]}... must follow the {len(ranks)} ranks contiguously")
    tok.add_special_tokens([AddedToken(content, special=True, normalized=False) for content, _ in ordered])
    return tok


def add_bos(tok: Tokenizer, bos: Optional[str]) -> None:
    """Prepend bos on encode(add_special_tokens=True), as the family's HF tokenizers do."""
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )


def save_tokenizer_dir(
    out_dir: Path, tok_json: dict, config: dict, copy_from: Optional[Path] = None, extra_files: Sequence[Path] = ()
) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ the original's other config files)."""
    out_dir = Path(out_dir)
    text = json.dumps(tok_json, ensure_ascii=False)
    Tokenizer.from_str(text)  # refuse to write what `tokenizers` cannot load
    if copy_from is not None:
        for name in CONFIG_FILES:
            if (Path(copy_from) / name).is_file():
                shutil.copy2(Path(copy_from) / name, out_dir / name)
    for path in extra_files:
        shutil.copy2(path, out_dir / Path(path).name)
    (out_dir / "tokenizer.json").write_text(text, encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def tokenizer_config(tok_json: dict, bos: Optional[str], eos: Optional[str], unk: Optional[str] = None, **extra) -> dict:
    """tokenizer_config.json for transformers: the generic fast class loads tokenizer.json as is."""
    decoder = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "rstrip", "normalized", "single_word", "special")}
        for t in tok_json.get("added_tokens", [])
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": bos,
        "eos_token": eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    if unk is not None:
        config["unk_token"] = unk
    config.update(extra)
    return config
