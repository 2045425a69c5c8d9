"""Fixtures shared by the trainer tests."""
import pytest

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.models.tiny import make_hf_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama (vocabulary 131) as a Megatron checkpoint padded for TP2."""
    d = tmp_path_factory.mktemp("tiny_llama")
    make_hf_model(d / "hf", "llama", vocab_size=131)
    run(ConvertConfig("hf-to-mcore", d / "hf", d / "mc", tp=2))
    return d / "mc"
