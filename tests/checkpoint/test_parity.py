"""Megatron vs transformers logits at TP1, TP2, PP2 and TP2xPP2 (4 gloo ranks), and resharding a
checkpoint written at TP2 back to TP1 / PP2 / TP2xPP2."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.checkpoint.hf_io import SafetensorsReader
from lep_megatron.common.launch import torchrun
from lep_megatron.models.tiny import make_hf_model

pytestmark = pytest.mark.megatron

LAYOUTS = "2x1,1x1,1x2,2x2"  # the first one also re-saves the checkpoint (written at TP2)


@pytest.mark.parametrize("arch,vocab", [("llama", 32005), ("mistral", 131), ("qwen2", 131)])
def test_logit_parity_and_resharding(tmp_path, arch, vocab):
    make_hf_model(tmp_path / "hf", arch, vocab_size=vocab)
    run(ConvertConfig("hf-to-mcore", tmp_path / "hf", tmp_path / "mc", tp=2))
    out = tmp_path / "parity.json"
    torchrun(4, ["-m", "lep_megatron.checkpoint.parity", "--hf", tmp_path / "hf", "--mcore", tmp_path / "mc",
                     "--layouts", LAYOUTS, "--resave-dir", tmp_path / "resaved", "--out", out])
    result = json.loads(out.read_text())
    print(arch, json.dumps(result["layouts"]))
    assert set(result["layouts"]) == set(LAYOUTS.split(","))
    for layout, r in result["layouts"].items():
        assert r["max_abs_diff"] < 1e-4, (arch, layout, r)
        assert r["loss"] == pytest.approx(result["hf_loss"], rel=1e-5)
    # the checkpoint saved by TP2 ranks gives the same loss at every other layout
    assert set(result["resaved_loss"]) == {"1x1", "1x2", "2x2"}
    for layout, loss in result["resaved_loss"].items():
        assert loss == pytest.approx(result["layouts"]["2x1"]["loss"], rel=1e-6), layout


def test_convert_under_torchrun_tp2_pp2(tmp_path):
    """Each of 4 ranks builds its TP2xPP2 shard from the HF files; exporting gives back every tensor."""
    make_hf_model(tmp_path / "hf", "mistral", vocab_size=261)
    torchrun(4, ["-m", "lep_megatron", "convert", "hf-to-mcore", f"in_dir={tmp_path / 'hf'}",
                     f"out_dir={tmp_path / 'mc'}", "parallel.tp=2", "parallel.pp=2"])
    run(ConvertConfig("mcore-to-hf", tmp_path / "mc", tmp_path / "back"))
    want = load_file(str(tmp_path / "hf" / "model.safetensors"))
    got = SafetensorsReader(tmp_path / "back")
    assert sorted(want) == sorted(got.keys())
    for name, tensor in want.items():
        assert torch.equal(got.get(name), tensor), name
