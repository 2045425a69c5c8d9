"""Fixtures shared by every test package."""
from pathlib import Path

import pytest

from lep_megatron.common.io import UserInputError

CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "corpus"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    if not (CORPUS_DIR / "heldout.txt").is_file():
        from lep_megatron.data.debian_corpus import build_corpus

        try:
            build_corpus(CORPUS_DIR)
        except UserInputError as err:
            if "apt-get download" in str(err):
                pytest.skip(f"Debian mirror unreachable, cannot build the Russian corpus: {err}")
            raise
    return CORPUS_DIR


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, corpus_dir) -> dict:
    """A tiny Mistral (d 64, 2 layers, sharded safetensors) with the real Mistral tokenizer, and that
    tokenizer extended by 2,000 Russian pieces: {"base", "ext", "original"} directories."""
    from lep_megatron.models.tiny import make_hf_model
    from lep_megatron.tokenizer import originals
    from lep_megatron.tokenizer.extend import ExtendConfig, extend

    d = tmp_path_factory.mktemp("tiny_mistral")
    original = originals.resolve("mistral-7b", d / "cache")
    make_hf_model(d / "base", "mistral", vocab_size=32000, layers=2, tokenizer_dir=original, max_shard_size="2MB")
    extend(ExtendConfig(original=str(original), out_dir=str(d / "ext"), corpus=[str(corpus_dir / "train.txt")],
                        new_vocab_size=2000, max_sentences=20000, cache_dir=str(d / "cache")))
    return {"base": d / "base", "ext": d / "ext", "original": original}
