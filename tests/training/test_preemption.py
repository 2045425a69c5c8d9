"""Preemption and time limits (2 gloo ranks): a signal to one rank stops both after the same step
with a checkpoint and exit code 75; resuming gives an uninterrupted run's losses bit for bit, from
a trainable-only checkpoint (no body tensor in it, its bytes those of the trainable tensors and
their optimizer state) as from a full one and with background (async) saves; the wall-clock budget stops a run; time-based saves
keep only the newest train.keep_last checkpoints."""
import json
from pathlib import Path

import pytest
from megatron.core import dist_checkpointing

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.checkpoint.megatron_io import CheckpointMeta, CheckpointTensors
from lep_megatron.common.launch import torchrun
from lep_megatron.models.tiny import make_hf_model

pytestmark = pytest.mark.megatron
VOCAB, HIDDEN = 4096, 64  # big tables, so that the checkpoint's bytes are mostly theirs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("preemption")
    make_hf_model(d / "hf", "llama", vocab_size=VOCAB, layers=2)
    run(ConvertConfig("hf-to-mcore", d / "hf", d / "mc"))
    torchrun(2, [Path(__file__).with_name("preemption_worker.py"), d / "mc", d / "runs"], timeout=900)
    return d, json.loads((d / "runs" / "result.json").read_text())


def distcp_bytes(ckpt: Path) -> int:
    return sum(f.stat().st_size for f in ckpt.glob("*.distcp"))


@pytest.mark.parametrize("kind", ["trainable_only", "full", "async"])
def test_signal_checkpoints_and_resumes_exactly(runs, kind):
    d, result = runs
    stop = result[kind]["stop"]
    assert stop == {"step": 3, "reason": "SIGUSR1", "code": result["exit_resumable"]} and stop["code"] == 75
    # steps 4-6 after the resume equal the uninterrupted run's: nothing lost, nothing trained twice
    assert result[kind]["rest"] == result["straight"][3:]
    metrics = [json.loads(line)["step"] for line in (d / "runs" / kind / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2, 3, 4, 5, 6]


def test_trainable_only_checkpoint_holds_what_trains(runs):
    d, result = runs
    ckpt = d / "runs" / "trainable_only" / "checkpoints" / "step_0000003"
    meta = CheckpointMeta.read(ckpt)
    assert Path(meta.base_checkpoint) == (d / "mc").absolute()
    assert meta.trained_tensors == ["embedding.word_embeddings.weight", "output_layer.weight"]
    stored = dist_checkpointing.load_tensors_metadata(str(ckpt))
    assert not [k for k in stored if k.startswith("decoder.")]
    # fp32 tables: the tensors (4 bytes) + the distributed optimizer's fp32 param, exp_avg, exp_avg_sq
    padded = CheckpointMeta.read(d / "mc").padded_vocab_size
    expected = 2 * padded * HIDDEN * 4 * 4
    assert abs(distcp_bytes(ckpt) - expected) / expected < 0.05, (distcp_bytes(ckpt), expected)
    full = d / "runs" / "full" / "checkpoints" / "step_0000003"
    assert CheckpointMeta.read(full).base_checkpoint is None
    assert distcp_bytes(full) > distcp_bytes(ckpt)
    # read through the reference, tensor by tensor: the body from the base, the tables from the run
    assert result["loads_equal"]  # load_model (eval, parity) follows the reference to the base
    through, base, whole = CheckpointTensors(ckpt), CheckpointTensors(d / "mc"), CheckpointTensors(full)
    name = "decoder.layers.1.mlp.linear_fc2.weight"
    assert through[name].equal(base[name]) and through[name].equal(whole[name])
    table = "embedding.word_embeddings.weight"
    assert through[table].equal(whole[table]) and not through[table].equal(base[table])


def test_async_saves_complete_and_pruned(runs):
    d, _ = runs
    checkpoints = d / "runs" / "async" / "checkpoints"
    # a save per step, the newest 3 kept (keep_last's default), none half-written, latest the last
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0000004", "step_0000005", "step_0000006"]
    assert (checkpoints / "latest").read_text().strip() == "step_0000006"
    assert CheckpointMeta.read(checkpoints / "step_0000006").base_checkpoint is not None


def test_budget_and_time_based_saves(runs):
    d, result = runs
    assert result["budget"]["step"] == 1 and result["budget"]["reason"].startswith("train.exit_duration_minutes")
    checkpoints = d / "runs" / "interval" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0000005", "step_0000006"]
