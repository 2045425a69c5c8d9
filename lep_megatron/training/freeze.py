"""Which parameters train: LEP's continued pre-training moves only the embeddings and LM head."""
from typing import Dict

import torch

# policy -> parameter-name prefixes that stay trainable (everything else is frozen)
TRAINABLE_PREFIXES: Dict[str, tuple] = {
    "embeddings_only": ("embedding.word_embeddings.", "output_layer."),
    "full": ("",),
}


def apply_freeze(model: torch.nn.Module, policy: str = "embeddings_only") -> int:
    """Set requires_grad per policy, BEFORE the DDP wrap (frozen parameters then get no grad
    buffer, and megatron's linears skip their weight-gradient GEMMs). Returns the number of
    trainable parameters on this rank."""
    if policy not in TRAINABLE_PREFIXES:
        raise ValueError(f"train.trainable={policy!r}: choose one of {sorted(TRAINABLE_PREFIXES)}")
    prefixes = TRAINABLE_PREFIXES[policy]
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(prefixes)
        trainable += param.numel() if param.requires_grad else 0
    return trainable
