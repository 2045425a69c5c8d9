"""`lep-megatron init` on a tiny Mistral-shaped model with the real Mistral tokenizer, extended
with Russian pieces: shared rows bit-identical, new rows = T.I in float64, the rules for untrained
rows and empty decompositions, wmean and random, bad input."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from lep_megatron.checkpoint.hf_io import SafetensorsReader
from lep_megatron.common.io import UserInputError
from lep_megatron.embeddings.initialize import InitConfig, initialize
from lep_megatron.tokenizer.token_map import TokenMap

OLD_VOCAB = 32000


@pytest.fixture(scope="module")
def setup(tiny_mistral):
    """The directory holding base (tiny Mistral, real tokenizer) and ext (its extension)."""
    return tiny_mistral["base"].parent


def tables(model_dir):
    r = SafetensorsReader(model_dir)
    return r.get("model.embed_tokens.weight"), r.get("lm_head.weight")


def test_mean_init_rows_and_logits(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = initialize(InitConfig(base=str(setup / "base"), tokenizer=str(setup / "ext"), out_dir=str(tmp_path / "out"),
                                token_map=str(setup / "ext" / "token_map.safetensors")))
    tm = TokenMap.load(out / "token_map.safetensors")
    (old_in, old_out), (new_in, new_out) = tables(setup / "base"), tables(out)
    n_new = tm.new_vocab_size
    assert n_new > OLD_VOCAB + 500 and new_in.shape == new_out.shape == (n_new, 64)
    # every original token keeps its id and its rows, bit for bit
    assert torch.equal(new_in[:OLD_VOCAB], old_in) and torch.equal(new_out[:OLD_VOCAB], old_out)
    # new rows: T . I_old in float64
    T = tm.dense(torch.float64)
    has_parts = tm.offsets.diff() > 0
    for new, old in ((new_in, old_in), (new_out, old_out)):
        want = T @ old.double()
        assert torch.allclose(new[has_parts].double(), want[has_parts], rtol=1e-6, atol=1e-7)
        assert torch.allclose(new[~has_parts].double(), old.double().mean(0).expand(int((~has_parts).sum()), -1), atol=1e-6)
    report = json.loads((out / "init_report.json").read_text())
    assert report["rows_averaged"] > 500 and report["new_vocab_size"] == n_new

    base = AutoModelForCausalLM.from_pretrained(str(setup / "base")).eval()
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert model.config.vocab_size == n_new
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == n_new
    ids = torch.randint(3, OLD_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits[..., :OLD_VOCAB], base(ids).logits, rtol=0, atol=1e-5)
    # a Russian text encodes to fewer tokens with the new vocabulary, and to new ids
    text = "Программа запускается при старте системы и проверяет настройки пользователя."
    new_ids = tok(text, add_special_tokens=False).input_ids
    assert any(i >= OLD_VOCAB for i in new_ids)


def test_untrained_rows_are_never_averaged(setup, tmp_path):
    tm = TokenMap.load(setup / "ext" / "token_map.safetensors")
    lengths = tm.offsets.diff()
    t = int(torch.nonzero(lengths == 2)[0])
    a, b = tm.indices[tm.offsets[t]: tm.offsets[t + 1]].tolist()
    base = tmp_path / "base"
    shutil.copytree(setup / "base", base)
    # make original row `a` untrained (zero) in both tables
    from safetensors.torch import load_file, save_file

    for shard in base.glob("model-*.safetensors"):
        tensors = load_file(str(shard))
        changed = False
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in tensors:
                tensors[name][a] = 0
                changed = True
        if changed:
            save_file(tensors, str(shard), metadata={"format": "pt"})
    out = initialize(InitConfig(base=str(base), tokenizer=str(setup / "ext"), out_dir=str(tmp_path / "out")))
    (old_in, old_out), (new_in, new_out) = tables(base), tables(out)
    report = json.loads((out / "init_report.json").read_text())
    assert a in report["untrained_original_rows"]
    assert torch.equal(new_in[t], old_in[b]) and torch.equal(new_out[t], old_out[b])


def test_wmean_and_random(setup, tmp_path):
    mean = initialize(InitConfig(base=str(setup / "base"), tokenizer=str(setup / "ext"), out_dir=str(tmp_path / "mean")))
    wmean = initialize(InitConfig(base=str(setup / "base"), tokenizer=str(setup / "ext"), out_dir=str(tmp_path / "wmean"),
                                  method="wmean"))
    tm = TokenMap.load(wmean / "token_map.safetensors")
    old_in, _ = tables(setup / "base")
    (m_in, _), (w_in, _) = tables(mean), tables(wmean)
    t = int(torch.nonzero(tm.offsets.diff() == 3)[0])
    w = tm.weights[tm.offsets[t]: tm.offsets[t + 1]]
    assert w[0] > w[1] > w[2] and float(w.sum()) == pytest.approx(1.0)
    want = (w.double()[:, None] * old_in[tm.indices[tm.offsets[t]: tm.offsets[t + 1]]].double()).sum(0)
    assert torch.allclose(w_in[t].double(), want, atol=1e-6) and not torch.allclose(w_in[t], m_in[t])

    rnd = initialize(InitConfig(base=str(setup / "base"), tokenizer=str(setup / "ext"), out_dir=str(tmp_path / "rnd"),
                                method="random"))
    r_in, _ = tables(rnd)
    assert torch.equal(r_in[:OLD_VOCAB], old_in)
    new_rows = r_in[OLD_VOCAB:]
    assert float(new_rows.std()) == pytest.approx(float(old_in.std()), rel=0.1)
    assert not torch.allclose(new_rows, m_in[OLD_VOCAB:])


def test_bad_input(setup, tmp_path):
    with pytest.raises(UserInputError, match="method='median'"):
        InitConfig(base=str(setup / "base"), tokenizer=str(setup / "ext"), out_dir=str(tmp_path / "o"), method="median")
    with pytest.raises(UserInputError, match="no tokenizer.json"):
        InitConfig(base=str(setup / "base"), tokenizer=str(tmp_path), out_dir=str(tmp_path / "o"))
    # a token map made for another tokenizer (here: the base tokenizer against itself)
    other = tmp_path / "other_map.safetensors"
    TokenMap(offsets=torch.arange(3), indices=torch.tensor([0, 1]), weights=torch.ones(2), old_vocab_size=OLD_VOCAB,
             meta={"new_tokenizer": "0" * 64}).save(other)
    with pytest.raises(UserInputError, match="built for another tokenizer"):
        initialize(InitConfig(base=str(setup / "base"), tokenizer=str(setup / "ext"), out_dir=str(tmp_path / "o"),
                              token_map=str(other)))
    assert not (tmp_path / "o").exists()


@pytest.mark.megatron
def test_cli_writes_hf_and_megatron_checkpoints(setup, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lep_megatron", "init", f"base={setup / 'base'}", f"tokenizer={setup / 'ext'}",
         f"out_dir={tmp_path / 'hf'}", f"mcore_out_dir={tmp_path / 'mc'}", "parallel.tp=2"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "mc" / "lep_model.json").read_text())
    n_new = TokenMap.load(tmp_path / "hf" / "token_map.safetensors").new_vocab_size
    assert meta["vocab_size"] == n_new and meta["padded_vocab_size"] % 256 == 0
