"""HF export of a checkpoint with LoRA adapters (lep_megatron.models.lora): merged into the
weights, or as a peft adapter beside the unmerged model.

In the dist checkpoint an adapter is stored as `<linear>.lora_a` [r, in] and `<linear>.lora_b`
[out, r] in megatron's TP1 layout (B's rows follow the weight's: linear_qkv grouped per query
group, linear_fc1 cat(gate, up)), stacked over the adapted layers. Merging adds
(alpha / r) B A to the megatron weight before the state-dict adapter unfuses it; the peft adapter
unfuses B the same way and repeats A for each part (q, k, v share the input, so one A serves all).
"""
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Dict

import torch
from safetensors.torch import save_file

from lep_megatron.checkpoint.megatron_io import CheckpointTensors
from lep_megatron.models.lora import TARGETS, LoRAConfig, adapted_layers
from lep_megatron.models.state_dict_adapter import StateDictAdapter

ADAPTER_SUBDIR = "adapter"
_WEIGHT = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.weight$")
# megatron linear -> the HF module holding its projections
_HF_PARENT = {"self_attention.linear_qkv": "self_attn", "self_attention.linear_proj": "self_attn",
              "mlp.linear_fc1": "mlp", "mlp.linear_fc2": "mlp"}


class LoRATensors:
    """The adapters of a checkpoint, read one at a time, whole."""

    def __init__(self, state: CheckpointTensors, lora: dict, num_layers: int):
        self.state = state
        self.cfg = LoRAConfig(**lora)
        self.layers = adapted_layers(self.cfg, num_layers)

    def get(self, layer: int, target: str, attr: str) -> torch.Tensor:
        name = f"decoder.layers.{layer}.{target}.{attr}"
        if name in self.state.stored:  # a megatron that stores each layer under its own key
            return self.state.read(name)
        # stacked over the adapted layers (lora.py _adapter_offsets)
        return self.state.read(f"decoder.layers.{target}.{attr}", self.layers.index(layer))

    def delta(self, layer: int, target: str) -> torch.Tensor:
        """(alpha / r) B A in float64."""
        a, b = self.get(layer, target, "lora_a").double(), self.get(layer, target, "lora_b").double()
        return self.cfg.scaling * b @ a


class MergedLoRA(Mapping):
    """A checkpoint's name -> tensor view with every adapted weight replaced by W + (alpha / r) B A."""

    def __init__(self, state: CheckpointTensors, adapters: LoRATensors):
        self.state, self.adapters = state, adapters

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.state[name]
        m = _WEIGHT.match(name)
        if m and m.group(2) in TARGETS and int(m.group(1)) in self.adapters.layers:
            tensor = (tensor.double() + self.adapters.delta(int(m.group(1)), m.group(2))).to(tensor.dtype)
        return tensor

    def __contains__(self, name) -> bool:
        return name in self.state

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def peft_adapter(adapters: LoRATensors, hf_adapter: StateDictAdapter, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """peft's tensors (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, ...)."""
    out = {}
    for layer in adapters.layers:
        for target, projections in TARGETS.items():
            a, b = adapters.get(layer, target, "lora_a"), adapters.get(layer, target, "lora_b")
            if target == "self_attention.linear_qkv":
                parts = hf_adapter.split_qkv(b)
            else:
                parts = b.chunk(len(projections), dim=0)  # linear_fc1: cat(gate, up)
            for proj, part in zip(projections, parts):
                key = f"base_model.model.model.layers.{layer}.{_HF_PARENT[target]}.{proj}"
                out[f"{key}.lora_A.weight"] = a.to(dtype).clone()  # one copy per part: safetensors refuses shared storage
                out[f"{key}.lora_B.weight"] = part.to(dtype).contiguous()
    return out


def write_peft_adapter(adapters: LoRATensors, hf_adapter: StateDictAdapter, dtype: torch.dtype,
                       out_dir: Path, base_model: str) -> None:
    """adapter_model.safetensors + adapter_config.json (peft LoRA) into out_dir."""
    out_dir.mkdir(parents=True)
    save_file(peft_adapter(adapters, hf_adapter, dtype), str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    cfg = adapters.cfg
    all_layers = adapters.layers == list(range(hf_adapter.shape.num_layers))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
        "target_modules": sorted(p for ps in TARGETS.values() for p in ps),
        "layers_to_transform": None if all_layers else adapters.layers,
        "layers_pattern": None if all_layers else "layers",
        "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
