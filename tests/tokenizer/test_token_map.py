"""The T matrix against real originals, checked against the reference libraries' encodes."""
import random

import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Tokenizer

from lep_megatron.tokenizer import originals as O
from lep_megatron.tokenizer import vocab as V
from lep_megatron.tokenizer.token_map import TokenMap, build_token_map

from .test_originals import reference_encoder


def rows(tm: TokenMap):
    return [tm.indices[tm.offsets[t]:tm.offsets[t + 1]].tolist() for t in range(tm.new_vocab_size)]


@pytest.fixture(scope="module")
def llama_to_mistral(original_dir):
    return build_token_map(original_dir("llama-3"), original_dir("mistral-7b"))


def test_byte_level_pieces_decoded_then_encoded_without_dummy_prefix(llama_to_mistral, original_dir):
    """Llama-3 token text -> Mistral ids, reference: sentencepiece with its dummy prefix off."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(O.locate("mistral-7b").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    llama = Tokenizer.from_file(str(original_dir("llama-3") / "tokenizer.json"))
    mistral_vocab = Tokenizer.from_file(str(original_dir("mistral-7b") / "tokenizer.json")).get_vocab()
    got = rows(llama_to_mistral)
    checked = 0
    for t in random.Random(0).sample(range(128000), 3000):
        text_bytes = V.piece_to_bytes(llama.id_to_token(t), V.BYTE_LEVEL)
        try:
            text = text_bytes.decode("utf-8")
        except UnicodeDecodeError:
            assert got[t] == [mistral_vocab[V.byte_piece(b)] for b in text_bytes]
            continue
        single = V.bytes_to_piece(text_bytes, V.SENTENCEPIECE)
        expected = [mistral_vocab[single]] if single in mistral_vocab else sp.encode(text)
        assert got[t] == expected, (llama.id_to_token(t), text)
        checked += 1
    assert checked > 2500
    # hand-checked: "Ġпри" is " при" = Mistral's "▁при"; "при" alone has no ▁
    assert got[llama.token_to_id("ĠÐ¿ÑĢÐ¸")] == [mistral_vocab["▁при"]]
    assert got[llama.token_to_id("Ð¿ÑĢÐ¸")] == [mistral_vocab["при"]]


def test_sentencepiece_pieces_to_byte_level_original(original_dir):
    tm = build_token_map(original_dir("mistral-7b"), original_dir("llama-3"))
    ref = reference_encoder("llama-3")
    mistral = Tokenizer.from_file(str(original_dir("mistral-7b") / "tokenizer.json"))
    got = rows(tm)
    assert got[:3] == [[], [], []]  # <unk> <s> </s>: Llama-3 has no such strings -> init fallback
    llama = Tokenizer.from_file(str(original_dir("llama-3") / "tokenizer.json"))
    assert got[3] == [llama.token_to_id("Ā")] and got[3 + 0xD0] == [llama.token_to_id("Ð")]  # <0x00>, <0xD0>
    for t in range(259, 32000, 7):
        assert got[t] == ref(V.piece_to_bytes(mistral.id_to_token(t), V.SENTENCEPIECE).decode()), mistral.id_to_token(t)
    row_of = torch.repeat_interleave(torch.arange(tm.new_vocab_size), tm.offsets.diff())
    sums = torch.zeros(tm.new_vocab_size).index_add_(0, row_of, tm.weights)
    assert torch.allclose(sums[3:], torch.ones(32000 - 3))


def test_identity_map_and_specials(original_dir):
    tm = build_token_map(original_dir("llama-3"), original_dir("llama-3"))
    assert torch.equal(tm.indices, torch.arange(128256)) and torch.equal(tm.offsets, torch.arange(128257))
    assert tm.meta["rules"] == '{"same_piece": 128000, "special": 256}'


def test_excluded_rows_and_wmean_and_save_load(llama_to_mistral, original_dir, tmp_path):
    llama = Tokenizer.from_file(str(original_dir("llama-3") / "tokenizer.json"))
    t = llama.token_to_id("ĠÑĢÐ°Ð·ÑĢÐ°Ð±Ð¾ÑĤ")  # " разработ" -> several Mistral pieces
    row = rows(llama_to_mistral)[t]
    assert len(row) > 1
    tm = build_token_map(original_dir("llama-3"), original_dir("mistral-7b"), exclude_old_ids=[row[0]], weighting="wmean", wmean_decay=1.0)
    new_row = rows(tm)[t]
    w = tm.weights[tm.offsets[t]:tm.offsets[t + 1]]
    assert new_row == row[1:]
    expected = torch.exp(-torch.arange(len(new_row), dtype=torch.float32))
    assert torch.allclose(w, expected / expected.sum())
    tm.save(tmp_path / "t.safetensors")
    back = TokenMap.load(tmp_path / "t.safetensors")
    assert torch.equal(back.indices, tm.indices) and back.meta["method"] == "wmean(decay=1.0)"
