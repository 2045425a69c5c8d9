"""HF model shape -> megatron-core TransformerConfig + GPTModel (TE spec on GPU, local spec on CPU)."""
import importlib.util

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from lep_megatron.common.io import UserInputError
from lep_megatron.models.hf_config import HFModelShape


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # a broken TE install raises more than ImportError
        return False
    return torch.cuda.is_available()


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary so each TP rank holds an equal, aligned slice."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def check_parallel_fits(shape: HFModelShape, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise UserInputError(f"parallel.tp={tp} and parallel.pp={pp} must be >= 1")
    for what, n in (("num_attention_heads", shape.num_attention_heads),
                    ("num_key_value_heads", shape.num_key_value_heads),
                    ("intermediate_size", shape.intermediate_size)):
        if n % tp:
            raise UserInputError(f"parallel.tp={tp} does not divide the model's {what}={n}; choose a tp that does")
    if shape.num_layers % pp:
        raise UserInputError(
            f"parallel.pp={pp} does not divide the model's num_hidden_layers={shape.num_layers}; "
            "choose a pp that does"
        )


def transformer_config(shape: HFModelShape, tp: int = 1, pp: int = 1,
                       params_dtype: torch.dtype = torch.float32, **overrides) -> TransformerConfig:
    """megatron-core config equal to the HF architecture; `overrides` set training options."""
    check_parallel_fits(shape, tp, pp)
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_key_value_heads,
        kv_channels=shape.head_dim,
        layernorm_epsilon=shape.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # without CUDA, weights are created on the CPU; the fused kernels are CUDA-only
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu and fused_softmax_built(),
        bias_dropout_fusion=on_gpu,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def fused_softmax_built() -> bool:
    """megatron's fused masked softmax (local spec) calls CUDA extensions that the megatron-core
    wheel does not ship (Megatron-LM / apex builds do); without them, torch's softmax."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"))


def layer_spec(use_te: bool):
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt_model(shape: HFModelShape, config: TransformerConfig, padded_vocab: int,
                    pre_process: bool = True, post_process: bool = True,
                    use_te: bool = None) -> GPTModel:
    """The GPTModel for one pipeline stage; parallel_state must already be initialized."""
    if use_te is None:
        use_te = transformer_engine_available()
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(use_te),
        vocab_size=padded_vocab,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta),
    )
    if post_process and padded_vocab > shape.vocab_size:
        mask_vocab_padding(model.output_layer, shape.vocab_size)
    if shape.rope_scaling:
        # megatron's rope_scaling flag fixes low/high_freq_factor and the original context
        # (Llama-3.1 values); apply the checkpoint's own values with megatron's formula instead
        rope = model.rotary_pos_emb
        rope.inv_freq = rope._apply_scaling(rope.inv_freq, **shape.rope_scaling)
    if torch.cuda.is_available() and not any(p.is_meta for p in model.parameters()):
        # megatron's parallel linears allocate on the GPU; torch norms are created on the CPU
        # (a model built on the meta device only describes a checkpoint's layout: nothing to move)
        model.cuda(torch.cuda.current_device())
    return model


def mask_vocab_padding(output_layer: torch.nn.Module, vocab_size: int) -> None:
    """Put the logits of Megatron's padding rows (ids >= vocab_size) at -inf, out of every softmax.

    Those rows do not exist in the HF model: left at logit 0 they would inflate the training loss
    and evaluation's probabilities, and take gradient. The output is this TP rank's vocabulary
    slice [s, b, padded / tp]; masked_fill passes no gradient to the masked columns."""
    def forward_hook(module, args, output):
        logits, bias = output
        local = logits.shape[-1]
        first = parallel_state.get_tensor_model_parallel_rank() * local
        if first + local <= vocab_size:
            return output
        padding = torch.arange(first, first + local, device=logits.device) >= vocab_size
        return logits.masked_fill(padding, float("-inf")), bias

    output_layer.register_forward_hook(forward_hook)


def build_stage_model(shape: HFModelShape, padded_vocab: int, params_dtype: torch.dtype = torch.float32,
                      use_te: bool = None, **config_overrides) -> GPTModel:
    """This rank's pipeline stage at the TP/PP sizes parallel_state was initialized with
    (use_te None: TransformerEngine's spec where it is usable)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = transformer_config(shape, tp, pp, params_dtype, **config_overrides)
    return build_gpt_model(shape, config, padded_vocab,
                           pre_process=parallel_state.is_pipeline_first_stage(),
                           post_process=parallel_state.is_pipeline_last_stage(), use_te=use_te)


def stage_layer_offset(shape: HFModelShape) -> int:
    """Global index of this pipeline stage's first layer (layers split evenly)."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    return parallel_state.get_pipeline_model_parallel_rank() * (shape.num_layers // pp)
