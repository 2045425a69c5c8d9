"""Frozen-body training on megatron-core (gloo, 2 ranks): the body stays bit-identical, only the
embeddings and head learn and get grad buffers, the loss falls, and DP2 (distributed optimizer),
TP2 and PP2 follow the same loss curve as one process, which starts at transformers' loss of the
HF model (Megatron's padded vocabulary rows out of the softmax)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lep_megatron.common.launch import torchrun
from lep_megatron.training.batches import global_batch

pytestmark = pytest.mark.megatron
WORKER = Path(__file__).with_name("frozen_body_worker.py")


def test_frozen_body_and_layouts(checkpoint, tmp_path):
    torchrun(1, [WORKER, checkpoint, tmp_path / "single.json", "1x1"])
    torchrun(2, [WORKER, checkpoint, tmp_path / "two.json", "1x1,2x1,1x2"])
    single = json.loads((tmp_path / "single.json").read_text())["1x1"]
    layouts = json.loads((tmp_path / "two.json").read_text())
    reference = single["losses"]
    assert reference[-1] < reference[0] - 0.1, reference  # the embeddings and head learn
    # the first step's loss is computed before any update: the HF model's loss on that batch
    # (the checkpoint pads 131 ids to 256 rows for TP2; the padding must not enter the softmax)
    tokens = global_batch(0, 131, 4, 16)
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(checkpoint.parent / "hf", torch_dtype=torch.float32)
        logits = hf(tokens[:, :-1]).logits
    hf_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()
    assert reference[0] == pytest.approx(hf_loss, rel=1e-5)
    for name, result in [("one process", single)] + [(f"{k} on 2 ranks", v) for k, v in layouts.items()]:
        assert result["losses"] == pytest.approx(reference, rel=2e-5), name
        assert result["frozen_bit_identical"], name
        for rank in result["ranks"]:
            assert rank["trainable"] and all(n.startswith(("embedding.word_embeddings", "output_layer"))
                                             for n in rank["trainable"]), (name, rank["trainable"])
            assert rank["changed"] == rank["trainable"], name  # every trainable tensor moved
            assert rank["grad_buffer_numel"] == rank["trainable_numel"], name  # no buffers for the body
