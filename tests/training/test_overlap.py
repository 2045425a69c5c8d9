"""Overlapped data-parallel communication (2 gloo ranks, distributed optimizer): overlapping the
gradient reduce-scatter with the backward pass and the parameter all-gather with the next forward
(with validation between steps, which must see the updated parameters) gives the losses of the
unoverlapped run bit for bit; a bf16 gradient reduction stays within bf16 rounding of the fp32 one
and moves half the gradient bytes; each step records the bytes handed to the collectives."""
import json
from pathlib import Path

import pytest

from lep_megatron.common.launch import torchrun

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def result(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("overlap")
    torchrun(2, [Path(__file__).with_name("overlap_worker.py"), checkpoint, out], timeout=900)
    return json.loads((out / "result.json").read_text())


def test_overlap_gives_the_same_losses(result):
    assert result["overlap"] == result["no_overlap"]
    valid = [[r.get("valid_loss") for r in result[k + "_metrics"]] for k in ("overlap", "no_overlap")]
    assert valid[0] == valid[1] and valid[0][1] is not None


def test_bf16_gradient_reduction(result):
    fp32, bf16 = result["bf16_reduce_fp32"], result["bf16_reduce_bf16"]
    assert fp32 != bf16  # the reduction really ran in another dtype
    assert all(abs(a - b) <= 2e-2 * abs(a) for a, b in zip(fp32, bf16)), (fp32, bf16)


def test_communication_bytes(result, checkpoint):
    from lep_megatron.checkpoint.megatron_io import CheckpointMeta

    meta = CheckpointMeta.read(checkpoint)
    table = meta.padded_vocab_size * meta.shape.hidden_size  # embeddings + head: the trainable tensors
    fp32 = result["overlap_metrics"][0]
    assert fp32["grad_reduce_bytes"] == 2 * table * 4 and fp32["param_gather_bytes"] == 2 * table * 4
    bf16 = result["bf16_reduce_bf16_metrics"][0]
    assert bf16["grad_reduce_bytes"] == 2 * table * 2 and bf16["param_gather_bytes"] == 2 * table * 2
