"""HF -> Megatron -> HF in one process: every tensor bit-identical, padding stripped."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.checkpoint.hf_io import SafetensorsReader
from lep_megatron.checkpoint.megatron_io import CheckpointMeta
from lep_megatron.models.tiny import make_hf_model

pytestmark = pytest.mark.megatron


def read_all(model_dir):
    reader = SafetensorsReader(model_dir)
    return {k: reader.get(k) for k in reader.keys()}


@pytest.mark.parametrize("arch,vocab,divisible_by,dtype,padded", [
    ("llama", 32005, 128, None, 32256),     # padded for tp=2, stripped on export
    ("mistral", 131, 128, None, 256),
    ("qwen2", 131, 200, None, 400),         # tied embeddings, q/k/v bias
    ("llama", 131, 128, "bfloat16", 256),   # written in bf16 both ways
])
def test_roundtrip_bit_identical(tmp_path, arch, vocab, divisible_by, dtype, padded):
    hf = tmp_path / "hf"
    make_hf_model(hf, arch, vocab_size=vocab, max_shard_size="200KB")
    assert (hf / "model.safetensors.index.json").is_file()  # the input is sharded
    run(ConvertConfig("hf-to-mcore", hf, tmp_path / "mc", tp=2, dtype=dtype,
                      make_vocab_size_divisible_by=divisible_by))
    meta = CheckpointMeta.read(tmp_path / "mc")
    assert (meta.vocab_size, meta.padded_vocab_size) == (vocab, padded)
    run(ConvertConfig("mcore-to-hf", tmp_path / "mc", tmp_path / "back", max_shard_size_gb=300e3 / 2**30))

    want, got = read_all(hf), read_all(tmp_path / "back")
    assert sorted(want) == sorted(got)
    for name, tensor in want.items():
        expect = tensor if dtype is None else tensor.to(torch.bfloat16)
        assert got[name].dtype == expect.dtype and torch.equal(got[name], expect), name
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()  # the output is sharded
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "back" / side).is_file(), side
    cfg_in, cfg_out = (json.loads((d / "config.json").read_text()) for d in (hf, tmp_path / "back"))
    assert cfg_out["vocab_size"] == cfg_in["vocab_size"] == vocab


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # tied Llama (as Llama-3.2-1B); the word-level test tokenizer suits no Qwen2 tokenizer class
    ref = make_hf_model(tmp_path / "hf", "llama", vocab_size=131, tie=True)
    run(ConvertConfig("hf-to-mcore", tmp_path / "hf", tmp_path / "mc", tp=2))
    run(ConvertConfig("mcore-to-hf", tmp_path / "mc", tmp_path / "back"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    text = "w5 w17 w42 w99 w3"
    src_tok, out_tok = (AutoTokenizer.from_pretrained(str(d)) for d in (tmp_path / "hf", tmp_path / "back"))
    assert out_tok(text).input_ids == src_tok(text).input_ids and len(out_tok) == len(src_tok) == 100
    ids = torch.tensor([[5, 17, 42, 99, 130, 0]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert model.generation_config.eos_token_id == 2


def test_single_file_checkpoint_roundtrip(tmp_path):
    make_hf_model(tmp_path / "hf", "mistral", vocab_size=131)
    run(ConvertConfig("hf-to-mcore", tmp_path / "hf", tmp_path / "mc"))
    run(ConvertConfig("mcore-to-hf", tmp_path / "mc", tmp_path / "back"))
    a = load_file(str(tmp_path / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
