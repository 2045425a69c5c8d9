"""Streaming training text: files, globs and JSONL (a text field), one sample per line;
documents for the data stage: a line of a text file, a whole JSONL record.

Tokenizer trainers see a bounded, seeded reservoir sample of lines, so memory stays fixed
however large the corpus is. Invalid UTF-8 is an error naming the file and line, not a
silent replacement character in the vocabulary.
"""
import glob
import json
import random
from pathlib import Path
from typing import Iterator, List, Sequence, Union

from lep_megatron.common.io import UserInputError


def corpus_files(corpus: Union[str, Sequence[str]], key: str = "corpus") -> List[Path]:
    """Expand paths and globs (a list, or one comma-separated string) into existing files."""
    specs = [s for s in (corpus.split(",") if isinstance(corpus, str) else corpus) if str(s).strip()]
    if not specs:
        raise UserInputError(f"{key} is empty; pass text/JSONL files or globs, e.g. {key}=data/corpus/train.txt")
    files: List[Path] = []
    for spec in specs:
        matches = sorted(glob.glob(str(spec).strip(), recursive=True)) or [str(spec).strip()]
        for match in matches:
            path = Path(match)
            if not path.is_file():
                raise UserInputError(f"{key}: {path} does not exist (or is not a file)")
            files.append(path)
    return files


def iter_lines(files: Sequence[Path], text_field: str = "text") -> Iterator[str]:
    """Non-empty lines of text files; for *.jsonl files, the lines of each record's text_field."""
    for path in files:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    raise UserInputError(f"{path}:{n}: invalid UTF-8 at byte {err.start}; re-encode the file as UTF-8") from err
                if path.suffix == ".jsonl" and line.strip():
                    try:
                        text = json.loads(line)[text_field]
                    except (ValueError, KeyError, TypeError) as err:
                        raise UserInputError(f"{path}:{n}: not a JSON object with a {text_field!r} field ({err})") from err
                    yield from (part for part in str(text).splitlines() if part.strip())
                elif line.strip():
                    yield line


def iter_documents(files: Sequence[Path], text_field: str = "text") -> Iterator[str]:
    """Documents of a corpus: each non-empty line of a text file, each JSONL record's text_field
    whole (its paragraphs and newlines kept: a web page or a chat stays one document)."""
    for path in files:
        if path.suffix != ".jsonl":
            yield from iter_lines([path], text_field)
            continue
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    text = json.loads(raw.decode("utf-8"))[text_field]
                except UnicodeDecodeError as err:
                    raise UserInputError(f"{path}:{n}: invalid UTF-8 at byte {err.start}; re-encode the file as UTF-8") from err
                except (ValueError, KeyError, TypeError) as err:
                    raise UserInputError(f"{path}:{n}: not a JSON object with a {text_field!r} field ({err})") from err
                if str(text).strip():
                    yield str(text)


def sample_lines(files: Sequence[Path], max_lines: int, seed: int = 0, text_field: str = "text") -> List[str]:
    """Reservoir sample of at most max_lines lines (all of them, in order, if fewer)."""
    rng = random.Random(seed)
    sample: List[str] = []
    for i, line in enumerate(iter_lines(files, text_field)):
        if i < max_lines:
            sample.append(line)
        else:
            j = rng.randrange(i + 1)
            if j < max_lines:
                sample[j] = line
    if not sample:
        raise UserInputError(f"corpus {', '.join(map(str, files))} holds no text lines")
    return sample
