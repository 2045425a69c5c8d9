"""The frozen-body FLOP count against a hand computation."""
from transformers import LlamaConfig

from lep_megatron.models.hf_config import HFModelShape
from lep_megatron.training.flops import body_matrix_params, lora_params, step_flops


def llama3_8b() -> HFModelShape:
    return HFModelShape.from_hf_config(LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8).to_dict())


def test_llama3_8b_body_parameters():
    # per layer: q 4096x4096, k and v 4096x1024, o 4096x4096, gate/up/down 4096x14336
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert body_matrix_params(llama3_8b()) == 32 * per_layer == 6_979_321_856


def test_frozen_body_step_is_two_thirds_of_full_in_the_body():
    shape, seq = llama3_8b(), 1024
    n_body, n_head = 6_979_321_856, 128256 * 4096
    scores = 32 * 4 * seq * 32 * 128
    frozen = step_flops(shape, seq)
    assert frozen.body_forward == 2 * n_body + scores
    assert frozen.body_backward == 2 * n_body + scores  # input gradients only
    assert frozen.head_forward == 2 * n_head and frozen.head_backward == 4 * n_head
    full = step_flops(shape, seq, body_trainable=True)
    assert full.per_token - frozen.per_token == 2 * n_body
    assert frozen.per_token == 4 * n_body + 2 * scores + 6 * n_head
    # about 0.70 of the FLOPs of training everything
    assert 0.69 < frozen.per_token / full.per_token < 0.72


def test_lora_adapters_add_their_own_flops():
    # calibration on Llama-3-8B: rank 8 on layers 0 and 31; per layer r (in + out) of
    # qkv 4096 -> 6144, o 4096 -> 4096, gate+up 4096 -> 28672, down 14336 -> 4096
    shape, seq = llama3_8b(), 1024
    n_lora = 2 * 8 * ((4096 + 6144) + (4096 + 4096) + (4096 + 28672) + (14336 + 4096))
    assert lora_params(shape, 8, 2) == n_lora == 1_114_112
    frozen, calibration = step_flops(shape, seq), step_flops(shape, seq, lora_rank=8, lora_layers=2)
    assert calibration.body_forward - frozen.body_forward == 2 * n_lora
    assert calibration.body_backward - frozen.body_backward == 4 * n_lora
    assert calibration.head_forward == frozen.head_forward and calibration.head_backward == frozen.head_backward
