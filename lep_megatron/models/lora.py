"""LoRA adapters on megatron-core's tensor-parallel linears (the local layer spec).

`add_lora(model, cfg)` turns the chosen layers' ColumnParallelLinear (`linear_qkv`, `linear_fc1`)
and RowParallelLinear (`linear_proj`, `linear_fc2`) into LoRA linears in place: y = W x +
(alpha / r) B A dropout(x), B zero-initialised. The base parameters keep their names, and the
adapters are ordinary parameters of the same module (`<linear>.lora_a`, `<linear>.lora_b`), so
megatron's DDP, optimizer, grad clipping and dist checkpoints treat them like any other.

Tensor parallelism (the layout each TP rank holds, and where the TP reduction happens):
- column-parallel W [out/tp, in]: A [r, in] replicated, B [out/tp, r] sharded along the output
  like W. The low-rank activation A x passes through megatron's copy-to-TP region, whose backward
  all-reduces its gradient over TP, so A's gradient (and the input's) sums every rank's slice of B.
- row-parallel W [out, in/tp]: A [r, in/tp] sharded along the input like W, B [out, r]
  replicated. The partial low-rank activations A_i x_i are all-reduced over TP (megatron's
  reduce-from-TP region) before B, so B sees the full A x.
Either way the replicated parameter's gradient is complete and equal on every TP rank from the
backward pass itself; finalize_model_grads has nothing to add (without sequence parallelism).
The sharded ones are marked `tensor_model_parallel` (partition_dim 0 or 1), so grad-norm clipping
counts them on every rank and the replicated ones once. In the dist checkpoint B of a SwiGLU
`linear_fc1` is stored through megatron's SwiGLU factory, as cat(gate, up) rows, like the weight.

Not supported (refused with a message): sequence parallelism (the low-rank activation would be
gathered along the sequence and A's gradient all-reduced as megatron does for norms marked
`sequence_parallel`), and the TE spec's linears: TELayerNormColumnParallelLinear fuses the norm
into the linear, so the LoRA branch would need the normalised input (TE's
`return_layernorm_output=True`) and the adapter would have to be built beside TE's module. The
trainer therefore builds LoRA runs with the local spec on every machine; megatron maps the local
spec's norm keys onto the TE spec's in dist checkpoints, so the same checkpoints load in both.
"""
import inspect
import math
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from lep_megatron.common.io import UserInputError

# megatron linear (layer-local name) -> HF projections it fuses, in megatron's row order
TARGETS = {
    "self_attention.linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "self_attention.linear_proj": ("o_proj",),
    "mlp.linear_fc1": ("gate_proj", "up_proj"),
    "mlp.linear_fc2": ("down_proj",),
}


@dataclass(frozen=True)
class LoRAConfig:
    """Which linears get adapters and how large they are."""

    rank: int
    """r: inner dimension of B A."""
    alpha: float
    """The update is scaled by alpha / r."""
    layers: Optional[Sequence[int]] = None
    """Global transformer layer indices (0-based) that get adapters; None: every layer."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training."""
    seed: int = 0
    """Seed of A's initialisation (the same full A whatever the TP size)."""

    def __post_init__(self):
        if self.rank < 1:
            raise UserInputError(f"train.lora_rank={self.rank} must be >= 1")
        if self.alpha <= 0:
            raise UserInputError(f"train.lora_alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise UserInputError(f"train.lora_dropout={self.dropout} must be in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class _LoRAMixin:
    """Adapter state and initialisation shared by the column- and row-parallel LoRA linears."""

    # which of lora_a / lora_b is sharded over TP, and along which of its dimensions
    SHARDED: tuple
    # the base parameters' TP axes in the checkpoint (as the megatron linear's sharded_state_dict)
    BASE_TP_AXES: dict

    def _init_lora(self, cfg: LoRAConfig, gated: bool, name: str, layer: int, stack: tuple) -> None:
        weight, in_features, out_features = self.weight, self.input_size, self.output_size
        self.lora_scaling = cfg.scaling
        self.lora_dropout = cfg.dropout
        self.lora_gated = gated  # B's rows are cat(gate, up), sharded per half like the weight
        self.lora_layer = layer
        self.lora_stack = stack  # (position among the adapted layers, number of adapted layers)
        # A as peft initialises it (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(in))), drawn whole from a
        # generator seeded by the layer's name so every TP size gets the same full A
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = 1.0 / math.sqrt(in_features)
        full_a = (torch.rand(cfg.rank, in_features, generator=g) * 2 - 1) * bound
        full_b = torch.zeros(out_features, cfg.rank)
        for attr, full in (("lora_a", full_a), ("lora_b", full_b)):
            local = lora_shard(self, attr, full)
            param = torch.nn.Parameter(local.to(device=weight.device, dtype=weight.dtype))
            sharded = self.SHARDED[0] == attr
            set_tensor_model_parallel_attributes(param, sharded, self.SHARDED[1] if sharded else -1, 1)
            self.register_parameter(attr, param)

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        adapters = {k: state.pop(k) for k in ("lora_a", "lora_b")}
        groups = dict(tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        out = make_sharded_tensors_for_checkpoint(state, prefix, self.BASE_TP_AXES, sharded_offsets, **groups)
        offsets = self._adapter_offsets(sharded_offsets)
        out.update(make_sharded_tensors_for_checkpoint(adapters, prefix, dict([self.SHARDED]), offsets, **groups))
        if self.lora_gated:
            # the MLP applies this factory to linear_fc1.weight only; B's rows follow the same layout
            key = f"{prefix}lora_b"
            out[key] = _swiglu_factory(out[key], offsets, metadata, self.tp_group)
        return out

    def _adapter_offsets(self, sharded_offsets: tuple) -> tuple:
        """megatron stores every layer's tensor under one key, stacked along a leading layer axis
        (the first offset: (0, global layer, layers)); only some layers have adapters, so theirs
        are stacked over the adapted layers instead, or the stacked tensor would have holes."""
        if not sharded_offsets:
            return sharded_offsets
        axis, index, _ = sharded_offsets[0]
        if (axis, index) != (0, self.lora_layer):
            raise RuntimeError(f"unexpected layer offset {sharded_offsets[0]} for layer {self.lora_layer}")
        return ((0,) + tuple(self.lora_stack),) + tuple(sharded_offsets[1:])


class LoRAColumnParallelLinear(_LoRAMixin, ColumnParallelLinear):
    """ColumnParallelLinear + LoRA: A replicated, B sharded along the output."""

    SHARDED = ("lora_b", 0)
    BASE_TP_AXES = {"weight": 0, "bias": 0}

    def forward(self, input_, weight=None, runtime_gather_output=None):
        output, bias = super().forward(input_, weight, runtime_gather_output)
        low = F.linear(self._lora_input(input_), self.lora_a)
        # identity forward; backward all-reduces over TP: each rank's B slice contributes to dA, dx
        low = copy_to_tensor_model_parallel_region(low, group=self.tp_group)
        return output + self.lora_scaling * F.linear(low, self.lora_b), bias


class LoRARowParallelLinear(_LoRAMixin, RowParallelLinear):
    """RowParallelLinear + LoRA: A sharded along the input, B replicated."""

    SHARDED = ("lora_a", 1)
    BASE_TP_AXES = {"weight": 1}

    def forward(self, input_):
        output, bias = super().forward(input_)
        if self.lora_dropout and self.training:
            # the input is TP-sharded: each rank draws its own mask, as megatron does for sharded activations
            with get_cuda_rng_tracker().fork():
                x = self._lora_input(input_)
        else:
            x = input_
        low = reduce_from_tensor_model_parallel_region(F.linear(x, self.lora_a), group=self.tp_group)
        return output + self.lora_scaling * F.linear(low, self.lora_b), bias


_LORA_CLASS = {ColumnParallelLinear: LoRAColumnParallelLinear, RowParallelLinear: LoRARowParallelLinear}


def _swiglu_factory(sharded_tensor, sharded_offsets, metadata, tp_group):
    kwargs = dict(singleton_local_shards=(metadata or {}).get("singleton_local_shards", False))
    # megatron-core >= 0.17 takes the groups explicitly; 0.16 reads them from parallel_state
    if "tp_group" in inspect.signature(apply_swiglu_sharded_factory).parameters:
        kwargs.update(tp_group=tp_group, dp_group=metadata["dp_cp_group"])
    return apply_swiglu_sharded_factory(sharded_tensor, sharded_offsets, **kwargs)


def lora_shard(linear: _LoRAMixin, attr: str, full: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of a full (TP1-layout) lora_a / lora_b of a LoRA linear."""
    name, dim = linear.SHARDED
    size = linear.tp_group.size()
    if attr != name or size == 1:
        return full
    rank = linear.tp_group.rank()
    if linear.lora_gated:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=dim)[rank]


def add_lora(model: torch.nn.Module, cfg: LoRAConfig) -> int:
    """Turn the attention and MLP linears of cfg.layers (all when None) of this pipeline stage into
    LoRA linears, in place; returns the number of linears adapted on this rank. Call it after the
    base weights are loaded and before freezing and the DDP wrap."""
    config = model.config
    if config.sequence_parallel:
        raise UserInputError("LoRA with sequence parallelism is not supported; set sequence_parallel off")
    layers = adapted_layers(cfg, config.num_layers)
    adapted = 0
    for layer in model.decoder.layers:
        index = layer.layer_number - 1  # megatron numbers layers globally from 1
        if index not in layers:
            continue
        for target in TARGETS:
            linear = layer.get_submodule(target)
            if type(linear) not in _LORA_CLASS:
                raise UserInputError(
                    f"LoRA wraps megatron's ColumnParallelLinear / RowParallelLinear (the local layer spec); "
                    f"decoder.layers.{index}.{target} is a {type(linear).__name__} (TE spec): build the model "
                    "without TransformerEngine")
            if getattr(linear, "gather_output", False) or not getattr(linear, "input_is_parallel", True):
                raise UserInputError(f"decoder.layers.{index}.{target}: LoRA expects megatron's GPT layout "
                                     "(no output gather, parallel row input)")
            # the module keeps its parameters and names; it only gains the adapter and its forward
            linear.__class__ = _LORA_CLASS[type(linear)]
            linear._init_lora(cfg, gated=target == "mlp.linear_fc1" and config.gated_linear_unit,
                              name=f"decoder.layers.{index}.{target}", layer=index,
                              stack=(layers.index(index), len(layers)))
            adapted += 1
    return adapted


def adapted_layers(cfg: LoRAConfig, num_layers: int) -> list:
    """Sorted global indices of the layers that get adapters (negative indices count from the end)."""
    if cfg.layers is None:
        return list(range(num_layers))
    bad = [i for i in cfg.layers if not -num_layers <= i < num_layers]
    if bad:
        raise UserInputError(f"train.lora_layers={list(cfg.layers)}: {bad} out of range for {num_layers} "
                             f"layers (0..{num_layers - 1}, or negative from the end)")
    return sorted({i % num_layers for i in cfg.layers})


def lora_parameters(model: torch.nn.Module):
    """(name, parameter) of every adapter of `model`."""
    return [(n, p) for n, p in model.named_parameters() if n.endswith((".lora_a", ".lora_b"))]
