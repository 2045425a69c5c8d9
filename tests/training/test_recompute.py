"""Activation recomputation (train.recompute): selective (megatron's core_attn) and full (every
layer, uniform) give the losses and embedding / head gradients of no recomputation, on megatron's
local spec on the CPU, and the frozen body stays bit-identical."""
import json
from pathlib import Path

import pytest

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.common.io import UserInputError
from lep_megatron.common.launch import torchrun
from lep_megatron.models.tiny import make_hf_model
from lep_megatron.training.trainer import TrainConfig

pytestmark = pytest.mark.megatron


def test_recompute_modes_agree(tmp_path):
    make_hf_model(tmp_path / "hf", "llama", vocab_size=131)  # GQA: 4 heads, 2 key/value heads
    run(ConvertConfig("hf-to-mcore", tmp_path / "hf", tmp_path / "mc"))
    torchrun(1, [Path(__file__).with_name("recompute_worker.py"), tmp_path / "mc", tmp_path / "result.json"])
    result = json.loads((tmp_path / "result.json").read_text())
    reference = result["none"]
    assert reference["losses"][-1] < reference["losses"][0]
    for mode in ("selective", "full"):
        assert result[mode]["losses"] == pytest.approx(reference["losses"], rel=1e-6), mode
        for name, grad in reference["grads"].items():
            assert max(map(abs, grad)) > 0
            assert result[mode]["grads"][name] == pytest.approx(grad, rel=1e-5, abs=1e-7), (mode, name)
    assert all(r["frozen_bit_identical"] for r in result.values())


def test_unknown_mode_is_refused():
    with pytest.raises(UserInputError, match="train.recompute='block'.*none"):
        TrainConfig(checkpoint="c", out_dir="o", steps=10, warmup_steps=1, recompute="block")
