"""Frozen-body training on megatron-core (gloo, 2 ranks): the body stays bit-identical, only the
embeddings and head learn and get grad buffers, the loss falls, and DP2 (distributed optimizer),
TP2 and PP2 follow the same loss curve as one process."""
import json
from pathlib import Path

import pytest

from lep_megatron.common.launch import torchrun

pytestmark = pytest.mark.megatron
WORKER = Path(__file__).with_name("frozen_body_worker.py")


def test_frozen_body_and_layouts(checkpoint, tmp_path):
    torchrun(1, [WORKER, checkpoint, tmp_path / "single.json", "1x1"])
    torchrun(2, [WORKER, checkpoint, tmp_path / "two.json", "1x1,2x1,1x2"])
    single = json.loads((tmp_path / "single.json").read_text())["1x1"]
    layouts = json.loads((tmp_path / "two.json").read_text())
    reference = single["losses"]
    assert reference[-1] < reference[0] - 0.1, reference  # the embeddings and head learn
    for name, result in [("one process", single)] + [(f"{k} on 2 ranks", v) for k, v in layouts.items()]:
        assert result["losses"] == pytest.approx(reference, rel=2e-5), name
        assert result["frozen_bit_identical"], name
        for rank in result["ranks"]:
            assert rank["trainable"] and all(n.startswith(("embedding.word_embeddings", "output_layer"))
                                             for n in rank["trainable"]), (name, rank["trainable"])
            assert rank["changed"] == rank["trainable"], name  # every trainable tensor moved
            assert rank["grad_buffer_numel"] == rank["trainable_numel"], name  # no buffers for the body
