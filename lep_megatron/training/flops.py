"""FLOPs of one training step when the transformer body is frozen.

Per token, a matrix of n parameters costs 2n FLOPs forward. Backward through a trainable matrix
costs 4n (the input gradient and the weight gradient, 2n each); through a frozen one 2n (the input
gradient only; megatron's LinearWithFrozenWeight skips the weight GEMM). The attention scores
(QK^T and AV: 4 * seq * width per token and layer, halved by the causal mask in practice but
counted whole, as Megatron-LM does) follow the same rule as frozen matrices. The input embedding
is a lookup: no matrix FLOPs; its gradient is a scatter-add. Megatron's own 6N counter assumes
everything trains: for Llama-3-8B at 1024 tokens it counts 1.43x what a frozen-body step does.
LoRA adapters (calibration, sft) are trainable matrices A [r, in] and B [out, r] beside the frozen
linears of their layers: 2 FLOPs per adapter parameter forward, 4 backward.
"""
from dataclasses import dataclass

from lep_megatron.models.hf_config import HFModelShape


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per token, split by where they go."""

    body_forward: float
    body_backward: float
    head_forward: float
    head_backward: float

    @property
    def per_token(self) -> float:
        return self.body_forward + self.body_backward + self.head_forward + self.head_backward


def body_matrix_params(shape: HFModelShape) -> int:
    """Parameters of the linear layers of all transformer layers (norms and biases excluded)."""
    d, heads, groups, hd = shape.hidden_size, shape.num_attention_heads, shape.query_groups, shape.head_dim
    attention = d * (heads + 2 * groups) * hd + heads * hd * d
    mlp = 3 * d * shape.intermediate_size
    return shape.num_layers * (attention + mlp)


def lora_params(shape: HFModelShape, rank: int, layers: int) -> int:
    """Adapter parameters of `layers` layers at `rank`: r (in + out) per adapted linear (qkv,
    attention output, fused gate+up, down)."""
    d, heads, groups, hd, ffn = (shape.hidden_size, shape.num_attention_heads, shape.query_groups, shape.head_dim,
                                 shape.intermediate_size)
    per_layer = (d + (heads + 2 * groups) * hd) + (heads * hd + d) + (d + 2 * ffn) + (ffn + d)
    return layers * rank * per_layer


def step_flops(shape: HFModelShape, seq_length: int, body_trainable: bool = False,
               head_trainable: bool = True, lora_rank: int = 0, lora_layers: int = 0) -> StepFlops:
    n_body = body_matrix_params(shape)
    attention_scores = shape.num_layers * 4 * seq_length * shape.num_attention_heads * shape.head_dim
    n_lora = lora_params(shape, lora_rank, lora_layers)
    body_forward = 2 * n_body + attention_scores + 2 * n_lora
    # input gradients always flow back to the embeddings; weight gradients only if the body trains
    body_backward = body_forward + (2 * n_body if body_trainable else 0) + 2 * n_lora
    n_head = shape.vocab_size * shape.hidden_size
    head_forward = 2 * n_head
    head_backward = 2 * n_head + (2 * n_head if head_trainable else 0)
    return StepFlops(body_forward, body_backward, head_forward, head_backward)
