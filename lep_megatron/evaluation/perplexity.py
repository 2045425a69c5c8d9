"""Per-character perplexity of held-out text: exp(total NLL / characters).

Per-token perplexity is not comparable across tokenizers (a tokenizer with longer tokens predicts
fewer, harder tokens); normalising the same text's negative log-likelihood by its characters is,
so a model with an adapted vocabulary can be compared with the original it came from."""
import math
from pathlib import Path
from typing import Dict, List, Sequence

from lep_megatron.common.io import UserInputError, progress
from lep_megatron.evaluation.backends.base import LMBackend


def read_lines(path: Path, max_lines: int) -> List[str]:
    """The first `max_lines` non-empty lines of a UTF-8 text file (one document per line)."""
    if not Path(path).is_file():
        raise UserInputError(f"perplexity_text={path}: no such file (a UTF-8 text file, one document per line)")
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\n"))
                if len(lines) == max_lines:
                    break
    if not lines:
        raise UserInputError(f"perplexity_text={path} has no non-empty lines")
    return lines


def windows(ids: List[int], bos: List[int], size: int) -> List[List[int]]:
    """Cut a document's ids into windows of at most `size` ids, each starting with bos (if any),
    so every text token is predicted exactly once within the model's context."""
    step = size - len(bos)
    if step < 1:
        raise ValueError(f"context of {size} positions leaves no room after bos")
    return [bos + ids[i:i + step] for i in range(0, len(ids), step)]


def char_perplexity(backend: LMBackend, texts: Sequence[str], batch_size: int = 8) -> Dict[str, float]:
    """NLL of every token of every text (each text starting after bos) summed in float64, over
    the texts' characters."""
    bos = [backend.tokenizer.bos_token_id] if backend.tokenizer.bos_token_id is not None else []
    # without bos the first token has no context: it is conditioned on nothing and not scored
    sequences, tokens = [], 0
    for text in texts:
        ids = backend.encode(text)
        tokens += len(ids)
        sequences += windows(ids, bos, backend.max_positions)
    sequences.sort(key=len, reverse=True)  # similar lengths per batch: less padding
    nll = 0.0
    batches = [sequences[i:i + batch_size] for i in range(0, len(sequences), batch_size)]
    for batch in progress(batches, len(batches), "perplexity batches"):
        for logprobs in backend.token_logprobs(batch):
            nll -= float(logprobs[1:].double().sum())
    chars = sum(len(t) for t in texts)
    return {"documents": len(texts), "chars": chars, "tokens": tokens, "nll": nll,
            "char_perplexity": math.exp(nll / chars), "bits_per_char": nll / chars / math.log(2),
            "chars_per_token": chars / tokens}
