"""Which parameters train: LEP's continued pre-training moves only the embeddings and LM head;
the post-LEP calibration and SFT add LoRA adapters to the body (lep-method.md section 5)."""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from lep_megatron.models.lora import LoRAConfig

EMBEDDINGS, HEAD = "embedding.word_embeddings.", "output_layer."
LORA_SUFFIXES = (".lora_a", ".lora_b")


@dataclass(frozen=True)
class Policy:
    """A trainable-parameter policy: whole tensors that train, and the LoRA defaults if any."""

    prefixes: tuple
    """Parameter-name prefixes that train whole (everything else, but adapters, is frozen)."""
    lora_rank: Optional[int] = None
    """Default LoRA rank; None: no adapters."""
    lora_alpha: Optional[float] = None
    """Default LoRA alpha (the update is scaled by alpha / rank)."""
    lora_layers: Optional[tuple] = None
    """Default adapted layers (global indices, negative from the end); None: every layer."""


POLICIES: Dict[str, Policy] = {
    "embeddings_only": Policy((EMBEDDINGS, HEAD)),
    "full": Policy(("",)),
    # the paper's self-calibration: first and last layers, rank 8, alpha 1, embeddings + head whole
    "calibration": Policy((EMBEDDINGS, HEAD), lora_rank=8, lora_alpha=1.0, lora_layers=(0, -1)),
    # the paper's continued instruction tuning: every layer, rank 32, alpha 16, head whole
    "sft": Policy((HEAD,), lora_rank=32, lora_alpha=16.0),
}


def lora_config(policy: str, rank: Optional[int] = None, alpha: Optional[float] = None,
                layers: Optional[Sequence[int]] = None, dropout: float = 0.0, seed: int = 0) -> Optional[LoRAConfig]:
    """The adapters of `policy`, its defaults overridden by the arguments given; None when the
    policy has no adapters."""
    p = POLICIES[policy]
    if p.lora_rank is None:
        return None
    return LoRAConfig(rank=p.lora_rank if rank is None else rank, alpha=p.lora_alpha if alpha is None else alpha,
                      layers=tuple(layers) if layers is not None else p.lora_layers, dropout=dropout, seed=seed)


def apply_freeze(model: torch.nn.Module, policy: str = "embeddings_only") -> int:
    """Set requires_grad per policy, BEFORE the DDP wrap (frozen parameters then get no grad
    buffer, and megatron's linears skip their weight-gradient GEMMs); LoRA adapters, when the
    model has them, always train. Returns the number of trainable parameters on this rank."""
    if policy not in POLICIES:
        raise ValueError(f"train.trainable={policy!r}: choose one of {sorted(POLICIES)}")
    prefixes = POLICIES[policy].prefixes
    if HEAD in prefixes and getattr(model, "share_embeddings_and_output_weights", False):
        prefixes += (EMBEDDINGS,)  # tied embeddings: the head is the embedding table
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(prefixes) or name.endswith(LORA_SUFFIXES)
        trainable += param.numel() if param.requires_grad else 0
    return trainable
