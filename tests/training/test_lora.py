"""LoRA on megatron-core's tensor-parallel linears (gloo, 2 ranks): TP2 equals TP1 for the same
full adapter weights (losses, every adapter's full gradient: a missing TP reduction shows here),
both equal the plain model with W + (alpha / r) B A merged in, a TP2 dist checkpoint reloads at
TP1; under `calibration` the frozen base stays bit-identical while the adapters and the
embeddings/head learn, with the same loss curve at TP1, TP2 and PP2 (clipping active)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lep_megatron.checkpoint.convert import ConvertConfig, run
from lep_megatron.checkpoint.lora_export import ADAPTER_SUBDIR
from lep_megatron.common.io import UserInputError
from lep_megatron.common.launch import torchrun
from lep_megatron.models import HFModelShape, build_stage_model
from lep_megatron.models.lora import LoRAConfig, add_lora, lora_parameters
from lep_megatron.models.tiny import tiny_hf_config
from lep_megatron.parallel import init_distributed
from lep_megatron.training.batches import global_batch
from lep_megatron.training.trainer import TrainConfig

pytestmark = pytest.mark.megatron
WORKER = Path(__file__).with_name("lora_worker.py")
SEQ = 12  # lora_worker.SEQ


@pytest.fixture(scope="module")
def tp_run(checkpoint, tmp_path_factory):
    """The worker's TP1 / TP2 results and its TP2 checkpoint with adapters."""
    d = tmp_path_factory.mktemp("tp")
    torchrun(2, [WORKER, "tp", checkpoint, d / "tp.json"])
    return json.loads((d / "tp.json").read_text()), d / "tp.tp2ckpt"


@pytest.mark.slow  # the shared fixture: two torchrun ranks at TP1 and TP2 (~50 s)
def test_lora_tp2_equals_tp1_and_merged(tp_run):
    r, _ = tp_run
    tp1, tp2 = r["tp1"], r["tp2"]
    assert tp1["zero_b_loss"] == tp1["plain_loss"]  # B starts at zero: the adapter changes nothing
    assert np.abs(np.subtract(tp1["loss"], tp1["plain_loss"])).max() > 1e-2  # the set adapters do
    np.testing.assert_allclose(tp2["loss"], tp1["loss"], rtol=0, atol=2e-5)
    for t in (tp1, tp2):
        np.testing.assert_allclose(t["merged_loss"], t["loss"], rtol=0, atol=2e-5)
    assert tp1["grads"].keys() == tp2["grads"].keys() and len(tp1["grads"]) == 16  # 2 layers x 4 linears x A, B
    for name, g1 in tp1["grads"].items():
        g1, g2 = np.array(g1), np.array(tp2["grads"][name])
        assert np.abs(g1).max() > 0, name
        np.testing.assert_allclose(g2, g1, rtol=0, atol=2e-5 * np.abs(g1).max(), err_msg=name)
    assert r["reload_equal"]
    np.testing.assert_allclose(r["reload_loss"], tp1["loss"], rtol=0, atol=2e-5)


@pytest.mark.slow
def test_calibration_trains_adapters_embeddings_and_head(checkpoint, tmp_path):
    torchrun(1, [WORKER, "train", checkpoint, tmp_path / "one.json", "1x1"])
    torchrun(2, [WORKER, "train", checkpoint, tmp_path / "two.json", "2x1,1x2"])
    single = json.loads((tmp_path / "one.json").read_text())["1x1"]
    reference = single["losses"]
    assert reference[-1] < reference[0] - 0.05, reference
    assert single["resumed_losses"] == reference  # exact resume with adapters
    layouts = [("one process", single)] + [(k, v) for k, v in json.loads((tmp_path / "two.json").read_text()).items()]
    for name, result in layouts:
        assert result["losses"] == pytest.approx(reference, rel=2e-5), name
        assert result["base_bit_identical"], name
        for rank in result["ranks"]:
            lora = [n for n in rank["trainable"] if n.endswith((".lora_a", ".lora_b"))]
            whole = [n for n in rank["trainable"] if n not in lora]
            assert all(n.startswith(("embedding.word_embeddings", "output_layer")) for n in whole), (name, whole)
            assert lora and all(n.startswith(("decoder.layers.0.", "decoder.layers.1.", "decoder.layers.3."))
                                for n in lora), (name, lora)
            assert rank["changed"] == rank["trainable"], name  # every adapter (B from zero) and table moved
            assert rank["grad_buffer_numel"] == rank["trainable_numel"], name
    # 4 layers, adapters on the first and last only: 2 layers x 4 linears x (A, B) over the ranks
    one_rank = single["ranks"][0]["trainable"]
    assert sorted({n.split(".")[2] for n in one_rank if "lora" in n}) == ["0", "3"]
    assert len([n for n in one_rank if "lora" in n]) == 16


@pytest.mark.slow  # the shared fixture: two torchrun ranks at TP1 and TP2 (~50 s)
def test_hf_export_merged_and_peft_equal_megatron(tp_run, tmp_path):
    """mcore-to-hf of the TP2 LoRA checkpoint: the merged model (transformers) and the unmerged
    one with the peft adapter (transformers + peft) give megatron's logits with the adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    r, ckpt = tp_run
    reference = np.array(r["tp1_logits"])
    ids = global_batch(0, reference.shape[-1], 2, SEQ)[:, :-1]
    run(ConvertConfig("mcore-to-hf", ckpt, tmp_path / "merged"))
    run(ConvertConfig("mcore-to-hf", ckpt, tmp_path / "peft", lora="peft"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "peft"), dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits.numpy()
        peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft" / ADAPTER_SUBDIR)).eval()
        merged_logits, peft_logits = merged(ids).logits.numpy(), peft_model(ids).logits.numpy()
    assert np.abs(base_logits - reference).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(merged_logits, reference, rtol=0, atol=1e-4)
    np.testing.assert_allclose(peft_logits, reference, rtol=0, atol=1e-4)
    config = json.loads((tmp_path / "peft" / ADAPTER_SUBDIR / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["layers_to_transform"]) == (4, 2.0, [0, 3])
    adapted = {n.split(".")[4] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {"0", "3"}


def test_lora_config_errors(tmp_path):
    common = dict(checkpoint="c", out_dir=str(tmp_path), warmup_steps=1)
    with pytest.raises(UserInputError, match="train.lora_rank=0"):
        TrainConfig(**common, trainable="calibration", lora_rank=0)
    with pytest.raises(UserInputError, match="has no LoRA adapters"):
        TrainConfig(**common, trainable="embeddings_only", lora_rank=8)
    with pytest.raises(UserInputError, match="train.lora_dropout"):
        TrainConfig(**common, trainable="sft", lora_dropout=1.0)
    assert TrainConfig(**common, trainable="calibration").lora().layers == (0, -1)
    sft = TrainConfig(**common, trainable="sft").lora()
    assert (sft.rank, sft.alpha, sft.layers) == (32, 16.0, None)


def test_lora_dropout_only_while_training():
    """Dropout acts on the adapters' input in training mode only (one process, TP1)."""
    init_distributed(1, 1)
    shape = HFModelShape.from_hf_config(tiny_hf_config("llama", layers=2).to_dict())
    model = build_stage_model(shape, 256)
    add_lora(model, LoRAConfig(rank=4, alpha=4.0, dropout=0.5))
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.normal_(0, 0.5)
    ids = torch.randint(0, shape.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8).expand(2, 8)
    model.eval()
    with torch.no_grad():
        first, second = model(ids, pos, None), model(ids, pos, None)
        model.train()
        dropped = model(ids, pos, None)
    assert torch.equal(first, second)
    vocab = shape.vocab_size  # the padded rows' logits are -inf in every mode
    assert (dropped - first)[..., :vocab].abs().max() > 1e-3
