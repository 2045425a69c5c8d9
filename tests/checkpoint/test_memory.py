"""Conversion memory is bounded by the largest tensor, not by the model: measured as the peak RSS
growth of a process converting a model ~20x larger than its largest tensor, both directions."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lep_megatron.checkpoint.hf_io import SafetensorsReader
from lep_megatron.models.tiny import write_random_checkpoint

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=8000, hidden_size=1024,
              intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4, rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
              hidden_act="silu", torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
MiB = 2**20


@pytest.mark.primary_only
def test_peak_memory_is_bounded_by_largest_tensor_not_model(tmp_path):
    model_bytes = write_random_checkpoint(tmp_path / "model", dict(CONFIG, num_hidden_layers=16),
                                          max_shard_bytes=64 * MiB)
    write_random_checkpoint(tmp_path / "warmup", dict(CONFIG, num_hidden_layers=1, vocab_size=500,
                                                      hidden_size=256, intermediate_size=512))
    # the largest tensor on either side: the vocabulary table padded for TP2 (fc1 is 11 MiB)
    largest = 8192 * 1024 * 2
    assert model_bytes > 20 * largest
    out = tmp_path / "rss.json"
    subprocess.run([sys.executable, str(Path(__file__).with_name("memory_worker.py")), str(tmp_path), str(out)],
                   check=True, timeout=600)
    growth = json.loads(out.read_text())
    print({k: f"{v / MiB:.1f} MiB" for k, v in growth.items()}, f"model {model_bytes / MiB:.0f} MiB, "
          f"largest tensor {largest / MiB:.0f} MiB")
    for direction, nbytes in growth.items():
        # building the model (the old import) or holding a 5 GB output shard would need >= model_bytes
        assert nbytes < 6 * largest < model_bytes / 3, (direction, nbytes / MiB, growth)
    a, b = SafetensorsReader(tmp_path / "model"), SafetensorsReader(tmp_path / "model-back")
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        assert torch.equal(a.get(name), b.get(name)), name
