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
from typing import Callable, Iterator, Tuple

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


class StateDictAdapter:
    """Maps tensors of one HF checkpoint to a megatron GPTModel's state dict and back."""

    def __init__(self, shape: HFModelShape, padded_vocab: int):
        if padded_vocab < shape.vocab_size:
            raise UserInputError(f"padded vocabulary {padded_vocab} < vocab_size {shape.vocab_size}")
        self.shape = shape
        self.padded_vocab = padded_vocab

    # ---- HF -> megatron (full, TP1 layout) ----------------------------------------------------
    def to_megatron(self, name: str, layer_offset: int, hf: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The full (unsharded) tensor for megatron parameter `name` of a stage whose first layer
        is global layer `layer_offset`; `hf(name)` returns an HF tensor."""
        s = self.shape
        if name == "embedding.word_embeddings.weight":
            return self._pad(hf("model.embed_tokens.weight"), "model.embed_tokens.weight")
        if name == "output_layer.weight":
            src = "model.embed_tokens.weight" if s.tie_word_embeddings else "lm_head.weight"
            return self._pad(hf(src), src)
        if name == "decoder.final_layernorm.weight":
            return hf("model.norm.weight")
        m = _LAYER.match(name)
        if not m:
            raise UserInputError(f"no HF source for megatron tensor {name!r}")
        layer, local = int(m.group(1)) + layer_offset, m.group(2)
        p = f"model.layers.{layer}."
        if local in _DIRECT:
            return hf(p + _DIRECT[local])
        if local in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = local.rsplit(".", 1)[1]
            q, k, v = (hf(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv")
            return self.fuse_qkv(q, k, v, layer)
        if local == "mlp.linear_fc1.weight":
            return torch.cat([hf(p + "mlp.gate_proj.weight"), hf(p + "mlp.up_proj.weight")], dim=0)
        raise UserInputError(f"no HF source for megatron tensor {name!r}")

    def fuse_qkv(self, q, k, v, layer: int) -> torch.Tensor:
        s = self.shape
        g, hd = s.query_groups, s.head_dim
        per_group = s.num_attention_heads // g * hd
        expect = (s.num_attention_heads * hd, g * hd, g * hd)
        got = (q.shape[0], k.shape[0], v.shape[0])
        if got != expect:
            raise UserInputError(
                f"layer {layer}: q/k/v projections have {got} rows but config.json implies {expect} "
                "(num_attention_heads, num_key_value_heads, head_dim): config and weights disagree"
            )
        tail = q.shape[1:]
        return torch.cat([q.reshape(g, per_group, *tail), k.reshape(g, hd, *tail),
                          v.reshape(g, hd, *tail)], dim=1).reshape(-1, *tail)

    def _pad(self, table: torch.Tensor, src: str) -> torch.Tensor:
        s = self.shape
        if tuple(table.shape) != (s.vocab_size, s.hidden_size):
            raise UserInputError(
                f"{src} has shape {tuple(table.shape)} but config.json says vocab_size={s.vocab_size}, "
                f"hidden_size={s.hidden_size}: config and weights disagree"
            )
        out = table.new_zeros(self.padded_vocab, s.hidden_size)
        out[: s.vocab_size] = table
        return out

    # ---- megatron (full, TP1 layout) -> HF ----------------------------------------------------
    def to_hf(self, mc: Mapping) -> Iterator[Tuple[str, torch.Tensor]]:
        """HF tensors, in HF order, from a full megatron state dict (all layers, TP1 layout);
        `mc` is read one name at a time, in order, so it may load lazily."""
        s = self.shape
        yield "model.embed_tokens.weight", mc["embedding.word_embeddings.weight"][: s.vocab_size]
        g, hd = s.query_groups, s.head_dim
        per_group = s.num_attention_heads // g * hd
        for i in range(s.num_layers):
            p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            yield p + "input_layernorm.weight", _first(mc, m + "input_layernorm.weight",
                                                       m + "self_attention.linear_qkv.layer_norm_weight")
            kinds = ("weight", "bias") if s.qkv_bias else ("weight",)
            for kind in kinds:
                qkv = mc[f"{m}self_attention.linear_qkv.{kind}"]
                tail = qkv.shape[1:]
                q, k, v = qkv.reshape(g, per_group + 2 * hd, *tail).split([per_group, hd, hd], dim=1)
                for x, t in zip("qkv", (q, k, v)):
                    yield f"{p}self_attn.{x}_proj.{kind}", t.reshape(-1, *tail)
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
