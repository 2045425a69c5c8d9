"""Weight layout mapping between HF Llama/Mistral/Qwen2 checkpoints and megatron-core GPTModel.

Megatron layouts handled here:
- linear_qkv rows are grouped per query group: [q heads of group g, k_g, v_g] for g in groups;
  tensor parallelism splits whole groups, so a TP rank's slice is a contiguous block of rows;
- linear_fc1 is cat(gate, up); under TP each rank holds cat(gate_r, up_r);
- the vocabulary is padded (zero rows) to a multiple of make_vocab_size_divisible_by x TP.
Names are those of `GPTModel.state_dict()` with the local (per pipeline stage) layer index; the
TE spec's fused names (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`) are
understood too.
"""
import re
from collections.abc import Mapping
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from lep_megatron.common.io import UserInputError
from lep_megatron.models.hf_config import HFModelShape

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# megatron layer-local name -> HF layer-local name, for tensors that map one to one
_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")


class RowSegment(NamedTuple):
    """`rows` consecutive rows of a megatron tensor: HF tensor `hf_name` from row `start`, or
    zero (vocabulary padding) when hf_name is None."""

    hf_name: Optional[str]
    start: int
    rows: int


class StateDictAdapter:
    """Maps tensors of one HF checkpoint to a megatron GPTModel's state dict and back."""

    def __init__(self, shape: HFModelShape, padded_vocab: int):
        if padded_vocab < shape.vocab_size:
            raise UserInputError(f"padded vocabulary {padded_vocab} < vocab_size {shape.vocab_size}")
        self.shape = shape
        self.padded_vocab = padded_vocab

    # ---- HF -> megatron ------------------------------------------------------------------------
    def hf_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Every tensor the HF checkpoint must hold, with the shape config.json implies."""
        s = self.shape
        h, q_rows, kv_rows = s.hidden_size, s.num_attention_heads * s.head_dim, s.query_groups * s.head_dim
        shapes = {"model.embed_tokens.weight": (s.vocab_size, h), "model.norm.weight": (h,)}
        if not s.tie_word_embeddings:
            shapes["lm_head.weight"] = (s.vocab_size, h)
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q_rows, h), p + "self_attn.k_proj.weight": (kv_rows, h),
                p + "self_attn.v_proj.weight": (kv_rows, h), p + "self_attn.o_proj.weight": (h, q_rows),
                p + "mlp.gate_proj.weight": (s.intermediate_size, h),
                p + "mlp.up_proj.weight": (s.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, s.intermediate_size),
            })
            if s.qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q_rows,), p + "self_attn.k_proj.bias": (kv_rows,),
                               p + "self_attn.v_proj.bias": (kv_rows,)})
        return shapes

    def megatron_rows(self, name: str) -> List[RowSegment]:
        """The rows of the full (unsharded) megatron tensor `name` (global layer index), in order,
        as segments of HF tensors: enough to read any row range of it without building the rest."""
        s = self.shape
        if name in _VOCAB:
            src = ("model.embed_tokens.weight" if name == "embedding.word_embeddings.weight"
                   or s.tie_word_embeddings else "lm_head.weight")
            return [RowSegment(src, 0, s.vocab_size), RowSegment(None, 0, self.padded_vocab - s.vocab_size)]
        if name == "decoder.final_layernorm.weight":
            return [RowSegment("model.norm.weight", 0, s.hidden_size)]
        m = _LAYER.match(name)
        local = m.group(2) if m else None
        p = f"model.layers.{m.group(1)}." if m else ""
        if local in _DIRECT:  # norms, o_proj and down_proj: hidden_size rows each
            return [RowSegment(p + _DIRECT[local], 0, s.hidden_size)]
        if local in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind, hd = local.rsplit(".", 1)[1], s.head_dim
            per_group = s.num_attention_heads // s.query_groups * hd
            return [seg for g in range(s.query_groups) for seg in (
                RowSegment(f"{p}self_attn.q_proj.{kind}", g * per_group, per_group),
                RowSegment(f"{p}self_attn.k_proj.{kind}", g * hd, hd),
                RowSegment(f"{p}self_attn.v_proj.{kind}", g * hd, hd))]
        if local == "mlp.linear_fc1.weight":
            return [RowSegment(p + "mlp.gate_proj.weight", 0, s.intermediate_size),
                    RowSegment(p + "mlp.up_proj.weight", 0, s.intermediate_size)]
        raise UserInputError(f"no HF source for megatron tensor {name!r}")

    def split_qkv(self, qkv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v rows of a fused linear_qkv weight or bias (full, TP1 layout)."""
        s = self.shape
        g, hd = s.query_groups, s.head_dim
        per_group = s.num_attention_heads // g * hd
        tail = qkv.shape[1:]
        q, k, v = qkv.reshape(g, per_group + 2 * hd, *tail).split([per_group, hd, hd], dim=1)
        return tuple(t.reshape(-1, *tail) for t in (q, k, v))

    # ---- megatron (full, TP1 layout) -> HF ----------------------------------------------------
    def to_hf(self, mc: Mapping) -> Iterator[Tuple[str, torch.Tensor]]:
        """HF tensors, in HF order, from a full megatron state dict (all layers, TP1 layout);
        `mc` is read one name at a time, in order, so it may load lazily."""
        s = self.shape
        yield "model.embed_tokens.weight", mc["embedding.word_embeddings.weight"][: s.vocab_size]
        for i in range(s.num_layers):
            p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            yield p + "input_layernorm.weight", _first(mc, m + "input_layernorm.weight",
                                                       m + "self_attention.linear_qkv.layer_norm_weight")
            kinds = ("weight", "bias") if s.qkv_bias else ("weight",)
            for kind in kinds:
                q, k, v = self.split_qkv(mc[f"{m}self_attention.linear_qkv.{kind}"])
                for x, t in zip("qkv", (q, k, v)):
                    yield f"{p}self_attn.{x}_proj.{kind}", t
            yield p + "self_attn.o_proj.weight", mc[m + "self_attention.linear_proj.weight"]
            yield p + "post_attention_layernorm.weight", _first(mc, m + "pre_mlp_layernorm.weight",
                                                                m + "mlp.linear_fc1.layer_norm_weight")
            gate, up = mc[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            yield p + "mlp.gate_proj.weight", gate
            yield p + "mlp.up_proj.weight", up
            yield p + "mlp.down_proj.weight", mc[m + "mlp.linear_fc2.weight"]
        yield "model.norm.weight", mc["decoder.final_layernorm.weight"]
        if not s.tie_word_embeddings:
            yield "lm_head.weight", mc["output_layer.weight"][: s.vocab_size]


def _first(mc: Mapping, name: str, alias: str) -> torch.Tensor:
    """A norm weight under its local-spec name or its TE-spec (fused) name."""
    return mc[name] if name in mc else mc[alias]


def tp_shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The slice of a full (TP1-layout) megatron tensor that tensor-parallel rank `rank` holds."""
    if size == 1:
        return full
    local = _LAYER.sub(r"\2", name)
    if name in _VOCAB or local in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        return full.chunk(size, dim=0)[rank]
    if local in _ROW_PARALLEL:
        return full.chunk(size, dim=1)[rank]
    if local == "mlp.linear_fc1.weight":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full  # norms are replicated
