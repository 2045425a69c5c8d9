"""Chat-format JSONL -> Megatron indexed datasets of token ids + an assistant-only loss mask.

Input: JSONL files, one conversation per line: {"messages": [{"role": "system" | "user" |
"assistant", "content": "..."}, ...]} with at least one assistant turn. Each conversation is
rendered with the tokenizer's own chat template and tokenized once, whole; a token counts in the
loss when it starts inside an assistant turn's span of the rendered text: from the end of the
prompt the template renders for that turn (add_generation_prompt) to the end of the turn
(its end-of-turn tokens included, so the model learns to stop).

Output (out_dir, written atomically): sft_tokens.bin/.idx and sft_mask.bin/.idx (megatron
IndexedDatasets, one document per conversation; the mask 0/1 per token, aligned with the tokens),
and sft.json (tokenizer fingerprint, counts). The trainer (data.kind=sft) pads each conversation
to seq_length + 1 with masked tokens: one conversation per sample, so no attention crosses samples.
"""
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder, get_bin_path, get_idx_path

from lep_megatron.common.io import UserInputError, atomic_dir, progress
from lep_megatron.tokenizer.corpus import corpus_files
from lep_megatron.tokenizer.token_map import tokenizer_fingerprint

ROLES = ("system", "user", "assistant")
META_FILE = "sft.json"
FORMAT_VERSION = "1"
TOKENS, MASK = "sft_tokens", "sft_mask"


@dataclass
class SFTDataConfig:
    """`lep-megatron sft-data`: chat JSONL -> token ids + assistant-only loss masks."""

    tokenizer: str
    """HF tokenizer dir with a chat template (tokenizer_config.json `chat_template`)."""
    out_dir: str
    """Output dir: sft_tokens / sft_mask .bin/.idx and sft.json."""
    files: List[str]
    """Chat JSONL files or globs."""
    max_length: int = 4096
    """Conversations longer than this many tokens are left out (counted in sft.json); the
    trainer's seq_length + 1 must be at least the longest kept one, or it truncates."""
    messages_field: str = "messages"
    """JSONL field holding the list of messages."""
    overwrite: bool = False
    """Replace a non-empty out_dir."""

    def __post_init__(self):
        if isinstance(self.files, str):
            self.files = [s for s in self.files.split(",") if s.strip()]
        if not self.files:
            raise UserInputError("files: give one or more chat JSONL files or globs")
        if self.max_length < 2:
            raise UserInputError(f"max_length={self.max_length} must be >= 2")


def load_chat_tokenizer(tokenizer_dir: Path, key: str = "tokenizer"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not getattr(tok, "chat_template", None):
        raise UserInputError(f"{key}={tokenizer_dir} has no chat template (tokenizer_config.json "
                             "`chat_template`); use the instruct model's tokenizer or add one")
    if not tok.is_fast:
        raise UserInputError(f"{key}={tokenizer_dir}: a fast tokenizer (tokenizer.json) is needed for offsets")
    return tok


def check_messages(messages, where: str, answered: bool = True) -> None:
    """A conversation's messages are {role, content} with known roles; with `answered`, at least
    one assistant turn (training data), without, the last turn a user's (a prompt to answer)."""
    if not isinstance(messages, list) or not messages:
        raise UserInputError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserInputError(f"{where}: message {i} must be {{\"role\": ..., \"content\": \"text\"}}")
        if m.get("role") not in ROLES:
            raise UserInputError(f"{where}: message {i} has role {m.get('role')!r}; roles are {', '.join(ROLES)}")
    if not answered:
        if messages[-1]["role"] != "user":
            raise UserInputError(f"{where}: the prompt ends with a {messages[-1]['role']!r} message; it must end "
                                 "with the user turn to answer (drop the trailing answer)")
    elif not any(m["role"] == "assistant" for m in messages):
        raise UserInputError(f"{where}: no assistant message: nothing to train on; drop the line or add the answer")


def render(tok, messages: list, where: str) -> Tuple[List[int], List[int]]:
    """(token ids, mask: 1 for tokens of assistant turns) of one conversation."""
    check_messages(messages, where)
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise UserInputError(f"{where}: the chat template does not render conversations incrementally "
                                 "(a prefix of the messages is not a prefix of the text); cannot locate the assistant turns")
        spans.append((len(prompt), len(upto)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def read_json_lines(files) -> Iterator[Tuple[str, Any]]:
    """("file:line", parsed value) of each non-empty line of JSONL files."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserInputError(f"{where}: not JSON ({e})") from e


def read_conversations(files: List[str], field: str) -> Iterator[Tuple[str, list]]:
    for where, record in read_json_lines(files):
        if not isinstance(record, dict) or field not in record:
            raise UserInputError(f"{where}: no `{field}` field (messages_field={field})")
        yield where, record[field]


def build_sft_data(cfg: SFTDataConfig) -> Path:
    tok = load_chat_tokenizer(Path(cfg.tokenizer))
    files = corpus_files(cfg.files)
    out_dir = Path(cfg.out_dir)
    token_dtype = DType.optimal_dtype(len(tok))
    kept = dropped = tokens = trained = longest = 0
    with atomic_dir(out_dir, cfg.overwrite) as tmp:
        ids_out = IndexedDatasetBuilder(get_bin_path(str(tmp / TOKENS)), dtype=token_dtype)
        mask_out = IndexedDatasetBuilder(get_bin_path(str(tmp / MASK)), dtype=numpy.uint8)
        for where, messages in progress(read_conversations(files, cfg.messages_field), None, "sft-data conversations"):
            ids, mask = render(tok, messages, where)
            if len(ids) > cfg.max_length:
                dropped += 1
                continue
            ids_out.add_document(torch.tensor(ids), [len(ids)])
            mask_out.add_document(torch.tensor(mask, dtype=torch.uint8), [len(mask)])
            kept, tokens, trained, longest = kept + 1, tokens + len(ids), trained + sum(mask), max(longest, len(ids))
        if not kept:
            raise UserInputError(f"files={cfg.files}: no conversation of at most max_length={cfg.max_length} tokens")
        ids_out.finalize(get_idx_path(str(tmp / TOKENS)))
        mask_out.finalize(get_idx_path(str(tmp / MASK)))
        meta = {"format_version": FORMAT_VERSION, "tokenizer": {"path": str(Path(cfg.tokenizer).absolute()),
                                                               "fingerprint": tokenizer_fingerprint(cfg.tokenizer)},
                "conversations": kept, "dropped_too_long": dropped, "max_length": cfg.max_length,
                "tokens": tokens, "trained_tokens": trained, "longest": longest}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    print(f"sft-data: {kept} conversations ({dropped} longer than {cfg.max_length} left out), "
          f"{tokens} tokens, {trained} in assistant turns -> {out_dir}", flush=True)
    return out_dir


def read_sft_meta(data_dir: Path, tokenizer_dir: Optional[Path] = None) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise UserInputError(f"data.dir={data_dir}: no {META_FILE}; build it with `lep-megatron sft-data`")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserInputError(f"{path}: format {meta.get('format_version')!r} is not {FORMAT_VERSION!r}; rebuild it")
    if tokenizer_dir is not None and tokenizer_fingerprint(tokenizer_dir) != meta["tokenizer"]["fingerprint"]:
        raise UserInputError(f"data.dir={data_dir} was built with the tokenizer {meta['tokenizer']['path']}, not "
                             f"{tokenizer_dir}; rebuild it with the model's tokenizer")
    return meta


def sft_batches(data_dir: Path, global_batch_size: int, micro_batch_size: int, seq_length: int, pad_id: int,
                dp_rank: int, dp_size: int, seed: int = 0) -> Callable[[int], Iterator[dict]]:
    """`batches(step)` for the trainer: this data-parallel rank's micro-batches of step `step`,
    dicts {"tokens": [mbs, seq_length + 1], "loss_mask": [mbs, seq_length]}; conversations in a
    seeded random order, reshuffled each epoch; padding (pad_id) and truncated tails are masked."""
    tokens, masks = IndexedDataset(str(Path(data_dir) / TOKENS)), IndexedDataset(str(Path(data_dir) / MASK))
    n = len(tokens)
    per_rank = global_batch_size // dp_size

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> torch.Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

    def sample(index: int):
        epoch, i = divmod(index, n)
        j = int(order(epoch)[i])
        ids = torch.full((seq_length + 1,), pad_id, dtype=torch.long)
        mask = torch.zeros(seq_length + 1, dtype=torch.long)
        t, m = torch.from_numpy(tokens[j].astype(numpy.int64)), torch.from_numpy(masks[j].astype(numpy.int64))
        k = min(len(t), seq_length + 1)
        ids[:k], mask[:k] = t[:k], m[:k]
        return ids, mask

    def batches(step: int) -> Iterator[dict]:
        first = (step - 1) * global_batch_size + dp_rank * per_rank
        rows = [sample(first + i) for i in range(per_rank)]
        ids = torch.stack([r[0] for r in rows])
        mask = torch.stack([r[1] for r in rows])[:, 1:]  # the mask of each label (tokens[:, 1:])
        return iter({"tokens": a, "loss_mask": b} for a, b in zip(ids.split(micro_batch_size), mask.split(micro_batch_size)))

    return batches
