"""New tokenizers: exact twins of SentencePiece's encode, the family layouts, bad input."""
import json

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from lep_megatron.common.io import UserInputError
from lep_megatron.tokenizer.train import TrainConfig, train


@pytest.fixture(scope="module")
def small_corpus(corpus_dir, tmp_path_factory):
    lines = (corpus_dir / "train.txt").read_text().splitlines()[::10]
    path = tmp_path_factory.mktemp("c") / "small.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_twin(model_type, small_corpus, heldout_lines, tmp_path):
    out = train(TrainConfig(corpus=[str(small_corpus)], out_dir=str(tmp_path / "tok"), model_type=model_type, vocab_size=3000))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    lines = heldout_lines[:800]
    assert [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)] == [sp.encode(s) for s in lines]
    assert tok.decode_batch([sp.encode(s) for s in lines]) == lines
    assert [tok.id_to_token(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert tok.get_vocab_size() == 3000
    assert not any(tok.id_to_token(i)[1:].isdigit() and len(tok.id_to_token(i)) > 2 for i in range(259, 3000))  # split_digits
    hf = AutoTokenizer.from_pretrained(str(out))
    assert hf(lines[20])["input_ids"] == [1] + sp.encode(lines[20])


@pytest.mark.parametrize("family,first_special", [("mistral", None), ("llama3", "<|begin_of_text|>"), ("qwen2", "<|endoftext|>")])
def test_hf_bpe_family_layout(family, first_special, small_corpus, heldout_lines, tmp_path):
    out = train(TrainConfig(corpus=[str(small_corpus)], out_dir=str(tmp_path / "tok"), backend="hf", family=family, vocab_size=3000))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    lines = heldout_lines[:800]
    ids = [e.ids for e in tok.encode_batch(lines, add_special_tokens=False)]
    assert tok.decode_batch(ids) == lines
    hf = AutoTokenizer.from_pretrained(str(out))
    assert hf(lines[3], add_special_tokens=False)["input_ids"] == ids[3]
    if first_special is None:
        assert [tok.id_to_token(i) for i in (0, 1, 2, 3)] == ["<unk>", "<s>", "</s>", "<0x00>"]
        assert tok.get_vocab_size() == 3000
    else:
        assert tok.token_to_id(first_special) == 3000  # family specials follow the learned vocabulary
        assert tok.id_to_token(0) == "!"  # byte-level alphabet first, as in Llama-3 and Qwen2


def test_jsonl_and_glob_input(small_corpus, tmp_path):
    lines = small_corpus.read_text().splitlines()[:2000]
    for k in range(2):
        (tmp_path / f"part{k}.jsonl").write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines[k::2]))
    out = train(TrainConfig(corpus=[str(tmp_path / "*.jsonl")], out_dir=str(tmp_path / "tok"), vocab_size=1000, max_sentences=1500))
    assert json.loads((out / "train_config.json").read_text())["max_sentences"] == 1500
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == 1000


def test_bad_input_is_clear_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserInputError, match="holds no text lines"):
        train(TrainConfig(corpus=[str(empty)], out_dir=str(out), vocab_size=1000))
    bad = tmp_path / "bad.txt"
    bad.write_bytes("строка\n".encode() + b"\xd0\xbf\xff\xfe oops\n")
    with pytest.raises(UserInputError, match=r"bad.txt:2: invalid UTF-8 at byte 2"):
        train(TrainConfig(corpus=[str(bad)], out_dir=str(out), vocab_size=1000))
    with pytest.raises(UserInputError, match="vocab_size=200 leaves no room"):
        TrainConfig(corpus=[str(bad)], out_dir=str(out), vocab_size=200)
    with pytest.raises(UserInputError, match="does not exist"):
        train(TrainConfig(corpus=[str(tmp_path / "missing.txt")], out_dir=str(out)))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "empty.txt"]
