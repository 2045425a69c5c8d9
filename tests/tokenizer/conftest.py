"""Shared inputs: the Russian demo corpus (built once into data/corpus), the packaged
original tokenizers as HF dirs, and one target-language BPE reused by extend/optimize."""
from pathlib import Path

import pytest


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def heldout_lines(corpus_dir) -> list:
    tricky = (FIXTURES / "tricky_ru.txt").read_text(encoding="utf-8").splitlines()
    return tricky + (corpus_dir / "heldout.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def originals_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("originals")


@pytest.fixture(scope="session")
def original_dir(originals_cache):
    from lep_megatron.tokenizer import originals as O

    return lambda name: O.resolve(name, originals_cache)


@pytest.fixture(scope="session")
def target_bpe(corpus_dir, tmp_path_factory) -> Path:
    """The paper's target-language SentencePiece BPE (16k, so the suite stays fast)."""
    from lep_megatron.tokenizer.train import TrainConfig, train

    return train(TrainConfig(corpus=[str(corpus_dir / "train.txt")], out_dir=str(tmp_path_factory.mktemp("t") / "bpe16k"), vocab_size=16000))


def chars_per_token(tok, lines) -> float:
    encs = tok.encode_batch(lines, add_special_tokens=False)
    return sum(map(len, lines)) / sum(len(e.ids) for e in encs)
