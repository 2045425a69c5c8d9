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
