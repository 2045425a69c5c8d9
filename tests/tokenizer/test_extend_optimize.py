"""Extended and optimized real originals: ids kept, compression gained, lossless, loadable."""
import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from lep_megatron.common.io import UserInputError
from lep_megatron.tokenizer.extend import ExtendConfig, extend
from lep_megatron.tokenizer.optimize import OptimizeConfig, optimize
from lep_megatron.tokenizer.token_map import TokenMap

from .conftest import chars_per_token


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mistral-7b", "llama-3", "qwen2"])
def test_extend_real_original(name, original_dir, originals_cache, target_bpe, heldout_lines, tmp_path):
    out = extend(ExtendConfig(original=name, out_dir=str(tmp_path / "ext"), new_tokenizer=str(target_bpe), cache_dir=str(originals_cache)))
    old = Tokenizer.from_file(str(original_dir(name) / "tokenizer.json"))
    new = Tokenizer.from_file(str(out / "tokenizer.json"))
    old_vocab = old.get_vocab(with_added_tokens=True)
    assert all(new.token_to_id(p) == i for p, i in old_vocab.items())  # every original token keeps its id
    stats = json.loads((out / "extend_config.json").read_text())["stats"]
    size = new.get_vocab_size(with_added_tokens=True)
    assert size == len(old_vocab) + stats["appended"] + stats["char_pieces"]
    assert all(new.id_to_token(i) is not None for i in range(size))  # no holes
    assert chars_per_token(new, heldout_lines) >= 1.25 * chars_per_token(old, heldout_lines)
    ids = [e.ids for e in new.encode_batch(heldout_lines, add_special_tokens=False)]
    assert new.decode_batch(ids) == heldout_lines
    hf = AutoTokenizer.from_pretrained(str(out))
    for line in heldout_lines[:30]:
        assert hf(line)["input_ids"] == new.encode(line).ids
    old_cfg = json.loads((original_dir(name) / "tokenizer_config.json").read_text())
    assert hf.chat_template == old_cfg.get("chat_template") and hf.eos_token == old_cfg["eos_token"]
    tm = TokenMap.load(out / "token_map.safetensors")
    n_old = len(old_vocab)
    assert tm.new_vocab_size == new.get_vocab_size(with_added_tokens=True) and tm.old_vocab_size == n_old
    assert torch.equal(tm.offsets[: n_old + 1], torch.arange(n_old + 1)) and torch.equal(tm.indices[:n_old], torch.arange(n_old))


def test_extension_collision_and_missing_original(target_bpe, originals_cache, tmp_path):
    with pytest.raises(UserInputError, match=r"first_new_id=31999 would collide .* id 31999 is '梦'"):
        extend(ExtendConfig(original="mistral-7b", out_dir=str(tmp_path / "o"), new_tokenizer=str(target_bpe), first_new_id=31999, cache_dir=str(originals_cache)))
    with pytest.raises(UserInputError, match="neither a tokenizer dir nor a packaged original"):
        extend(ExtendConfig(original="mistral-8x", out_dir=str(tmp_path / "o"), new_tokenizer=str(target_bpe), cache_dir=str(originals_cache)))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frequency", "id_cutoff"])
def test_optimize_llama3(mode, original_dir, originals_cache, target_bpe, corpus_dir, heldout_lines, tmp_path):
    out = optimize(OptimizeConfig(
        original="llama-3", out_dir=str(tmp_path / "opt"), corpus=[str(corpus_dir / "train.txt")], mode=mode,
        new_tokenizer=str(target_bpe), max_sentences=20000, cache_dir=str(originals_cache),
    ))
    old = Tokenizer.from_file(str(original_dir("llama-3") / "tokenizer.json"))
    new = Tokenizer.from_file(str(out / "tokenizer.json"))
    old_to_new = load_file(str(out / "id_map.safetensors"))["old_to_new"]
    kept = (old_to_new >= 0).nonzero().flatten().tolist()
    assert 64000 <= len(kept) <= 64256 + 256
    assert all(new.id_to_token(old_to_new[i].item()) == old.id_to_token(i) for i in kept)
    assert old_to_new[128000].item() == new.token_to_id("<|begin_of_text|>") == len(kept) - 256
    if mode == "id_cutoff":
        assert kept == list(range(64000)) + list(range(128000, 128256))
    ids = [e.ids for e in new.encode_batch(heldout_lines, add_special_tokens=False)]
    assert new.decode_batch(ids) == heldout_lines
    assert chars_per_token(new, heldout_lines) >= 1.25 * chars_per_token(old, heldout_lines)
    hf = AutoTokenizer.from_pretrained(str(out))
    assert hf(heldout_lines[40])["input_ids"] == new.encode(heldout_lines[40]).ids and hf.bos_token_id == old_to_new[128000].item()
