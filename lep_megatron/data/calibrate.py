"""Self-calibration data (lep-method.md section 5): the ORIGINAL instruct model's own answers to a
prompt set, plus "repeat this text" dialogues cut from a plain-text corpus (the copy task), as chat
JSONL that `lep-megatron sft-data` renders with the LEP model's template.

Prompts: JSONL, one per line: {"messages": [system / user turns, ending with a user turn]} or
{"prompt": "text"} (one user turn); with `min_score`, only items whose numeric `score_field`
(e.g. a judge's rating) is at least min_score are answered. The instruct model answers greedily,
in batches (left padding, the prompts sorted by length), each prompt rendered by its chat template
with add_generation_prompt; an answer ends at the tokenizer's or generation config's eos ids.

Output (`out`, written aside and renamed): {"messages": [..., {"role": "assistant", "content":
answer}]} per answered prompt, then {"messages": [{"role": "user", "content": instruction with
the passage}, {"role": "assistant", "content": passage}]} per copy example.
"""
import json
import os
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from lep_megatron.common.io import UserInputError, progress
from lep_megatron.data.sft import check_messages, load_chat_tokenizer, read_json_lines
from lep_megatron.tokenizer.corpus import corpus_files, iter_lines

# the Darumeru copy task's own wording (RefalMachine/darumeru cp_sent_ru): the skill Copy-RU scores
COPY_INSTRUCTIONS = ("Скопируйте текст без изменений.\nТекст: {text}",)


@dataclass
class CopyConfig:
    """The copy-task ("repeat this text") examples."""

    corpus: Optional[List[str]] = None
    """Plain-text files, globs or directories (their *.txt files, recursively); JSONL files give
    their `text` field. None: no copy examples."""
    examples: int = 10000
    """Number of examples (the paper: 10k); fewer if the corpus holds fewer passages."""
    instructions: Union[str, List[str]] = COPY_INSTRUCTIONS
    """The user turn, with `{text}` where the passage goes; a list: one drawn per example."""
    min_chars: int = 50
    """Consecutive lines are joined (by newlines) until a passage has at least this many characters."""
    max_chars: int = 500
    """Passages stay within this many characters (a longer line is cut at a space)."""
    seed: int = 0
    """Seed of the passage sample and of the instruction draw."""

    def __post_init__(self):
        if isinstance(self.corpus, str):
            self.corpus = [s for s in self.corpus.split(",") if s.strip()]
        if isinstance(self.instructions, str):
            self.instructions = [self.instructions]
        self.instructions = list(self.instructions)
        if not self.instructions:
            raise UserInputError("copy.instructions is empty; give at least one wording with {text}")
        for text in self.instructions:
            if "{text}" not in text:
                raise UserInputError(f"copy.instructions: {text!r} has no {{text}} where the passage goes")
        if self.examples < 0 or not 1 <= self.min_chars <= self.max_chars:
            raise UserInputError(f"copy: examples={self.examples} must be >= 0 and 1 <= min_chars={self.min_chars} "
                                 f"<= max_chars={self.max_chars}")


@dataclass
class CalibrateDataConfig:
    """`lep-megatron calibrate-data`: the instruct model's answers + copy examples as chat JSONL."""

    model: str
    """The ORIGINAL instruct model (HF dir with a chat template): it answers the prompts."""
    out: str
    """Chat JSONL to write (for `lep-megatron sft-data files=`)."""
    prompts: Optional[List[str]] = None
    """Prompt JSONL files or globs; None: copy examples only."""
    messages_field: str = "messages"
    """Field of a prompt item holding its messages (system / user turns)."""
    prompt_field: str = "prompt"
    """Field of a prompt item holding a bare prompt (one user turn), used when it has no messages."""
    score_field: str = "score"
    """Numeric field of each prompt item compared with min_score."""
    min_score: Optional[float] = None
    """Answer only prompts whose score_field is >= this (None: all prompts)."""
    max_prompts: Optional[int] = None
    """Answer at most this many prompts (the first ones kept by the filter; None: all)."""
    max_new_tokens: int = 1024
    """Longest answer, in tokens."""
    keep_unfinished: bool = False
    """Keep answers cut at max_new_tokens (no end-of-turn token); by default they are dropped."""
    batch_size: int = 16
    """Prompts per generate call."""
    dtype: str = "auto"
    """Model dtype (auto: the checkpoint's; float32 | bfloat16 | float16)."""
    device: Optional[str] = None
    """cuda | cpu; None: cuda when there is a GPU."""
    copy: CopyConfig = field(default_factory=CopyConfig)
    """The "repeat this text" examples."""
    overwrite: bool = False
    """Replace an existing `out`."""

    def __post_init__(self):
        if isinstance(self.copy, dict):
            self.copy = CopyConfig(**self.copy)
        if isinstance(self.prompts, str):
            self.prompts = [s for s in self.prompts.split(",") if s.strip()]
        if not self.prompts and not (self.copy.corpus and self.copy.examples):
            raise UserInputError("nothing to make: give prompts= (prompt JSONL) and/or copy.corpus= (text) "
                                 "with copy.examples > 0")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise UserInputError(f"max_new_tokens={self.max_new_tokens} and batch_size={self.batch_size} must be >= 1")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise UserInputError(f"max_prompts={self.max_prompts} must be >= 1 (or null: all)")


@dataclass
class Counts:
    prompts: int = 0
    """Prompt items read."""
    below_min_score: int = 0
    too_long: int = 0
    """Prompts whose tokens + max_new_tokens exceed the model's context."""
    unfinished: int = 0
    """Answers cut at max_new_tokens."""
    empty: int = 0
    """Empty answers (always dropped)."""
    answered: int = 0
    """Answers written."""
    copy: int = 0
    """Copy examples written."""


def read_prompts(cfg: CalibrateDataConfig, counts: Counts) -> List[Tuple[str, list]]:
    """(where, messages) of the prompts to answer, filtered by score, at most max_prompts."""
    try:
        files = corpus_files(cfg.prompts, key="prompts")
    except UserInputError as err:
        raise UserInputError(f"{err}; give the prompt JSONL ({{\"{cfg.messages_field}\": [...]}} or "
                             f"{{\"{cfg.prompt_field}\": \"...\"}} per line)") from err
    kept = []
    for where, item in read_json_lines(files):
        if not isinstance(item, dict):
            raise UserInputError(f"{where}: a prompt item is a JSON object")
        counts.prompts += 1
        if cfg.min_score is not None:
            score = item.get(cfg.score_field)
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise UserInputError(f"{where}: min_score={cfg.min_score} but the item has no numeric "
                                     f"`{cfg.score_field}` (score_field={cfg.score_field}); fix the field "
                                     "name or set min_score=null")
            if score < cfg.min_score:
                counts.below_min_score += 1
                continue
        if cfg.messages_field in item:
            messages = item[cfg.messages_field]
        elif isinstance(item.get(cfg.prompt_field), str):
            messages = [{"role": "user", "content": item[cfg.prompt_field]}]
        else:
            raise UserInputError(f"{where}: neither `{cfg.messages_field}` (a list of system / user turns) nor "
                                 f"`{cfg.prompt_field}` (a string); add one (or set messages_field= / prompt_field=)")
        check_messages(messages, where, answered=False)
        kept.append((where, messages))
        if cfg.max_prompts is not None and len(kept) == cfg.max_prompts:
            return kept
    return kept


def eos_ids(tokenizer, model) -> List[int]:
    """The end-of-answer ids: the tokenizer's eos and the generation config's (chat models end a
    turn with a token of their own, e.g. Llama-3's <|eot_id|>)."""
    ids = []
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in (value if isinstance(value, (list, tuple)) else [value]):
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def answer(cfg: CalibrateDataConfig, prompts: List[Tuple[str, list]], counts: Counts) -> Iterator[list]:
    """Yield each answered conversation (prompt order); greedy, batched, on the instruct model."""
    from lep_megatron.evaluation.backends.hf import HFBackend

    tok = load_chat_tokenizer(Path(cfg.model), key="model")  # refuses a tokenizer without a chat template
    backend = HFBackend.from_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device)
    stops = eos_ids(tok, backend.model)
    if not stops:
        raise UserInputError(f"model={cfg.model}: neither the tokenizer nor generation_config.json names an eos "
                             "token; answers could not end")
    print(f"calibrate-data: {len(prompts)} prompts answered by {cfg.model} on {backend.device} "
          f"(greedy, batch {cfg.batch_size}, max_new_tokens {cfg.max_new_tokens})", file=sys.stderr, flush=True)
    encoded = []
    for where, messages in prompts:
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        if len(ids) + cfg.max_new_tokens > backend.max_positions:
            counts.too_long += 1
        else:
            encoded.append((len(encoded), messages, ids))
    # longest first, so each batch pads little and a too-large batch fails at once
    order = sorted(encoded, key=lambda e: -len(e[2]))
    answers = {}
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    for batch in progress(batches, len(batches), "calibrate-data: answered batches"):
        for (i, _, _), new in zip(batch, backend.generate_ids([e[2] for e in batch], cfg.max_new_tokens, stops, [])):
            finished = bool(new) and new[-1] in stops
            answers[i] = (tok.decode(new[:-1] if finished else new, skip_special_tokens=True).strip(), finished)
    for i, messages, _ in encoded:
        text, finished = answers[i]
        if not text:
            counts.empty += 1
        elif not finished and not cfg.keep_unfinished:
            counts.unfinished += 1
        else:
            counts.unfinished += not finished
            yield messages + [{"role": "assistant", "content": text}]


def _expand(specs: Sequence[str]) -> List[Path]:
    """Files and globs as they are; a directory: its *.txt files, recursively."""
    out = []
    for spec in specs:
        path = Path(str(spec).strip())
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise UserInputError(f"copy.corpus: the directory {path} holds no .txt files")
            out += found
        else:
            out += corpus_files([str(spec)], key="copy.corpus")
    return out


def _cut(line: str, max_chars: int) -> str:
    if len(line) <= max_chars:
        return line
    head = line[:max_chars + 1]
    space = head.rfind(" ")
    return (head[:space] if space > 0 else line[:max_chars]).rstrip()


def passages(lines: Iterator[str], min_chars: int, max_chars: int) -> Iterator[str]:
    """Runs of consecutive lines joined by newlines, each min_chars..max_chars characters."""
    run: List[str] = []
    for line in lines:
        line = _cut(line.strip(), max_chars)
        if not line:
            continue
        if run and len("\n".join(run + [line])) > max_chars:
            run = []  # a run that cannot reach min_chars within max_chars starts over
        run.append(line)
        text = "\n".join(run)
        if len(text) >= min_chars:
            yield text
            run = []


def copy_examples(cfg: CopyConfig) -> List[list]:
    """A seeded uniform sample (reservoir) of `examples` passages, each as a copy dialogue."""
    rng = random.Random(cfg.seed)
    sample: List[str] = []
    found = passages(iter_lines(_expand(cfg.corpus)), cfg.min_chars, cfg.max_chars)
    for i, text in enumerate(progress(found, None, "calibrate-data: copy.corpus passages", every_s=10.0)):
        if i < cfg.examples:
            sample.append(text)
        else:
            j = rng.randrange(i + 1)
            if j < cfg.examples:
                sample[j] = text
    if len(sample) < cfg.examples:
        print(f"calibrate-data: copy.corpus holds only {len(sample)} passages of {cfg.min_chars}-{cfg.max_chars} "
              f"characters (copy.examples={cfg.examples})", file=sys.stderr, flush=True)
    return [[{"role": "user", "content": rng.choice(cfg.instructions).replace("{text}", text)},
             {"role": "assistant", "content": text}] for text in sample]


def build_calibration_data(cfg: CalibrateDataConfig) -> Counts:
    out = Path(cfg.out).absolute()
    if out.exists() and not cfg.overwrite:
        raise UserInputError(f"out={out} exists; choose another out or pass overwrite=true")
    counts = Counts()
    prompts = read_prompts(cfg, counts) if cfg.prompts else []
    copies = copy_examples(cfg.copy) if cfg.copy.corpus and cfg.copy.examples else []
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for source in (answer(cfg, prompts, counts) if prompts else (), copies):
                for messages in source:
                    check_messages(messages, "calibrate-data output")  # what sft-data requires
                    f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                    if source is copies:
                        counts.copy += 1
                    else:
                        counts.answered += 1
        if not counts.answered + counts.copy:
            raise UserInputError(
                f"no conversation to write: {counts.prompts} prompts, {counts.below_min_score} below "
                f"min_score={cfg.min_score}, {counts.too_long} too long for the context with max_new_tokens="
                f"{cfg.max_new_tokens}, {counts.unfinished} unfinished (keep_unfinished=true keeps them), "
                f"{counts.empty} empty answers; {len(copies)} copy examples; lower min_score, raise max_new_tokens "
                "or give copy.corpus")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"calibrate-data: {counts.answered} answers ({counts.prompts} prompts: {counts.below_min_score} below "
          f"min_score, {counts.too_long} too long, {counts.unfinished} unfinished"
          f"{' (kept)' if cfg.keep_unfinished else ''}, {counts.empty} empty) + {counts.copy} copy examples -> {out}",
          flush=True)
    return counts
