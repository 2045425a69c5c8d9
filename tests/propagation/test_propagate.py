"""`lep-megatron propagate` end to end on the synthetic setup of conftest.py: the maps D_true and
U_true recovered (exactly without noise, within the noise level with it), output rows = donor
rows . D in float64, the instruct model's chat tokens and template carried over, a tied model, bad
input and a failure while writing, the CLI."""
import importlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lep_megatron.common.io import UserInputError
from lep_megatron.embeddings.initialize import EMBED, HEAD, InitConfig, initialize
from lep_megatron.models.tiny import make_hf_model, save_word_tokenizer
from lep_megatron.propagation import PropagateConfig, propagate
from lep_megatron.tokenizer.token_map import TokenMap
from tests.propagation.conftest import CHAT_TOKENS, DIM, OLD_VOCAB, copy_model, make_instruct, random_map, read_tensors


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(lep, out, **kw):
    cfg = dict(base=str(lep["base"]), instruct=str(lep["instruct"]), donor=str(lep["donor"]), out_dir=str(out))
    return propagate(PropagateConfig(**dict(cfg, **kw)))


@pytest.mark.parametrize("mode,solver", [("conversion", "normal"), ("overlap", "qr"), ("sum_conversion", "normal")])
def test_maps_recovered_exactly(lep, tmp_path, mode, solver):
    out = run(lep, tmp_path / "out", mode=mode, solver=solver)
    maps = load_file(str(out / "propagation_maps.safetensors"))
    assert rel(maps["embed_tokens"], lep["D"]) < 1e-6 and rel(maps["lm_head"], lep["U"]) < 1e-6
    donor, inst, res = read_tensors(lep["donor"]), read_tensors(lep["instruct"]), read_tensors(out)
    n_donor = donor[EMBED].shape[0]
    assert res[EMBED].shape == (n_donor + 2, DIM)
    # donor rows . true map, in float64; the instruct model's added tokens (<unk>, <s>, </s> at
    # ids 0-2, ChatML appended) keep the instruct rows
    assert rel(res[EMBED][3:n_donor], donor[EMBED][3:].double() @ lep["D"]) < 1e-6
    assert rel(res[HEAD][3:n_donor], donor[HEAD][3:].double() @ lep["U"]) < 1e-6
    for name in (EMBED, HEAD):
        assert torch.equal(res[name][:3], inst[name][:3]) and torch.equal(res[name][n_donor:], inst[name][OLD_VOCAB:])
    body = [k for k in inst if k not in (EMBED, HEAD)]
    assert all(torch.equal(res[k], inst[k]) for k in body)

    report = json.loads((out / "propagation_report.json").read_text())
    tm = TokenMap.load(lep["donor"] / "token_map.safetensors")
    want_rows = int((tm.offsets.diff() > 0).sum()) if "conversion" in mode else OLD_VOCAB - 3
    for table in ("embed_tokens", "lm_head"):
        assert report["tables"][table]["residual"] < 1e-6
        assert report["tables"][table]["rows_used"] >= want_rows
    assert report["mode"] == mode and report["vocab_size"] == n_donor + 2


@pytest.mark.parametrize("mode", ["conversion", "overlap"])
def test_noisy_instruct_degrades_gracefully(lep, tmp_path, mode):
    """S = B.D_true + noise: the map's error stays well below the noise level and grows with it, and
    the reported residual is the noise level (the rows of T average few entries, so hardly less)."""
    errors = []
    for noise in (1e-3, 1e-2):
        instruct = tmp_path / f"instruct-{noise}"
        make_instruct(lep["base"], instruct, lep["D"], lep["U"], noise=noise)
        out = run(lep, tmp_path / f"out-{noise}", instruct=str(instruct), mode=mode)
        maps = load_file(str(out / "propagation_maps.safetensors"))
        report = json.loads((out / "propagation_report.json").read_text())
        for table, true in (("embed_tokens", lep["D"]), ("lm_head", lep["U"])):
            errors.append(rel(maps[table], true))
            assert errors[-1] < 0.2 * noise, (table, noise)
            assert 0.8 * noise < report["tables"][table]["residual"] < 1.2 * noise, (table, noise)
    assert errors[0] < errors[2] and errors[1] < errors[3]


def test_swap_keeps_donor_rows_and_chat_works(lep, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run(lep, tmp_path / "out", mode="swap")
    donor, inst, res = read_tensors(lep["donor"]), read_tensors(lep["instruct"]), read_tensors(out)
    n_donor = donor[EMBED].shape[0]
    # the donor already has <s>, </s>, <unk> (ids 0-2): those take the instruct rows too
    assert torch.equal(res[EMBED][3:n_donor], donor[EMBED][3:]) and torch.equal(res[HEAD][3:n_donor], donor[HEAD][3:])
    assert torch.equal(res[EMBED][:3], inst[EMBED][:3]) and torch.equal(res[EMBED][n_donor:], inst[EMBED][OLD_VOCAB:])
    assert not (out / "propagation_maps.safetensors").exists()
    report = json.loads((out / "propagation_report.json").read_text())
    assert report["tables"]["embed_tokens"]["map"] == "identity" and report["tables"]["embed_tokens"]["residual"] > 0.1

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(list(CHAT_TOKENS)) == [n_donor, n_donor + 1]
    assert tok.eos_token == "<|im_end|>" and len(tok) == n_donor + 2
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, n_donor + 1]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == n_donor + 1
    # the donor's Russian pieces are in the vocabulary
    text = "Программа запускается при старте системы."
    assert any(i >= OLD_VOCAB for i in tok(text, add_special_tokens=False).input_ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids[0, 0] == n_donor
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)
        logits = model(ids).logits
    assert generated.shape[1] == ids.shape[1] + 5 or generated[0, -1] in gen["eos_token_id"]
    # logits = hidden . head^T with the written head
    assert logits.shape[-1] == n_donor + 2 and torch.isfinite(logits).all()


def test_tied_embeddings(lep, tmp_path):
    from transformers import AutoModelForCausalLM

    d = tmp_path
    make_hf_model(d / "base", "mistral", vocab_size=OLD_VOCAB, layers=1, tie=True, tokenizer_dir=lep["original"])
    initialize(InitConfig(base=str(d / "base"), tokenizer=str(lep["ext"]), out_dir=str(d / "donor")))
    d_true = random_map(12)
    make_instruct(d / "base", d / "instruct", d_true, None)
    out = propagate(PropagateConfig(base=str(d / "base"), instruct=str(d / "instruct"), donor=str(d / "donor"),
                                    out_dir=str(d / "out")))
    res, donor = read_tensors(out), read_tensors(d / "donor")
    assert HEAD not in res and json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    assert set(load_file(str(out / "propagation_maps.safetensors"))) == {"embed_tokens"}
    n_donor = donor[EMBED].shape[0]
    assert rel(res[EMBED][3:n_donor], donor[EMBED][3:].double() @ d_true) < 1e-6
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_bad_input(lep, tmp_path):
    out = tmp_path / "out"

    def fails(match, **kw):
        with pytest.raises(UserInputError, match=match):
            run(lep, out, **kw)
        assert not out.exists()

    fails("mode='average'", mode="average")
    fails("solver='svd'", solver="svd")
    # a donor of another width
    narrow = copy_model(lep["donor"], tmp_path / "narrow")
    config = json.loads((narrow / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps(dict(config, hidden_size=32, head_dim=8)))
    tensors = read_tensors(narrow)
    save_file({EMBED: tensors[EMBED][:, :32].contiguous()}, str(narrow / "model.safetensors"))
    fails(r"donor=.*hidden_size=32 but base has 64", donor=str(narrow))
    # an instruct model of another family
    llama = copy_model(lep["instruct"], tmp_path / "llama")
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    fails(r"instruct=.*model_type='llama' but base is 'mistral'", instruct=str(llama))
    # an instruct model with another vocabulary
    other_vocab = copy_model(lep["instruct"], tmp_path / "other_vocab")
    save_word_tokenizer(other_vocab, 100)
    fails(r"instruct=.*tokenizer.json vocabulary differs from base", instruct=str(other_vocab))
    # a donor without its tokenizer
    no_tok = copy_model(lep["donor"], tmp_path / "no_tok")
    (no_tok / "tokenizer.json").unlink()
    fails(r"donor=.*no tokenizer.json", donor=str(no_tok))
    # a token map built for another tokenizer
    other = tmp_path / "other_map.safetensors"
    TokenMap(offsets=torch.arange(3), indices=torch.tensor([0, 1]), weights=torch.ones(2), old_vocab_size=OLD_VOCAB,
             meta={"new_tokenizer": "0" * 64}).save(other)
    fails(r"token_map .*built for another tokenizer", token_map=str(other))


def test_failure_while_writing_leaves_nothing(lep, tmp_path, monkeypatch):
    """The disk fills up after the first output table: no out_dir, no temporary dir left beside it."""
    module = importlib.import_module("lep_megatron.propagation.propagate")
    written = []

    def disk_full_after_one(*args):
        if written:
            raise OSError(28, "No space left on device")
        written.append(args[1])
        return real(*args)

    real = module.output_table
    monkeypatch.setattr(module, "output_table", disk_full_after_one)
    with pytest.raises(OSError, match="No space left"):
        run(lep, tmp_path / "out", mode="swap")
    assert written and list(tmp_path.iterdir()) == []
    # an existing result is not replaced without overwrite=true
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous run")
    with pytest.raises(UserInputError, match=r"out_dir=.* exists and is not empty; .* overwrite=true"):
        run(lep, tmp_path / "out", mode="swap")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_cli(lep, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lep_megatron", "propagate", f"base={lep['base']}", f"instruct={lep['instruct']}",
         f"donor={lep['donor']}", f"out_dir={tmp_path / 'out'}", "mode=overlap"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "propagation_report.json").read_text())["mode"] == "overlap"
